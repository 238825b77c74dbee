"""What the Video tab offers to pick: the Wan size presets and the library's Wan models, VAEs and encoders.

Kept apart from the tab's widgets so the size rules and the library filter read (and test) on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio import families

VIDEO_FAMILIES = families.ids(families.Kind.VIDEO, runnable=True)

# name -> (width, height); which apply depends on the model (see presets_for)
PRESETS = {"480p landscape": (832, 480), "480p portrait": (480, 832), "720p landscape": (1280, 720),
           "720p portrait": (720, 1280), "704p landscape": (1280, 704), "704p portrait": (704, 1280)}


def presets_for(variant: str) -> list[str]:
    """Resolutions a Wan model was trained at: 1.3B at 480p, TI2V 5B at 1280x704, the 14B models at both."""
    v = variant.lower()
    if "1.3b" in v:
        return ["480p landscape", "480p portrait"]
    if "5b" in v:
        return ["704p landscape", "704p portrait"]
    return ["480p landscape", "480p portrait", "720p landscape", "720p portrait"]


def nearest_4n1(frames: int) -> int:
    return 1 + 4 * max(0, int((frames - 1) / 4 + 0.5))


@dataclass
class Choice:
    label: str
    path: str
    variant: str = ""


def library_choices(library: Any) -> tuple[list[Choice], list[Choice], list[Choice]]:
    """Wan transformers (files or diffusers folders), Wan VAEs and umT5 encoders from the library."""
    models: list[Choice] = []
    vaes: list[Choice] = []
    encoders: list[Choice] = []
    if library is not None:
        for e in library.list(include_missing=False):
            family = e.effective_family
            if family in VIDEO_FAMILIES and e.role in ("diffusion_model", "checkpoint"):
                models.append(Choice(f"{e.name}  ({e.variant})" if e.variant else e.name, str(e.path), e.variant))
            elif family == "wan-vae":
                vaes.append(Choice(f"{e.name}  (Wan {e.variant})", str(e.path), e.variant))
            elif family == "umt5":
                encoders.append(Choice(e.name, str(e.path), e.variant))
    return models, vaes, encoders
