"""Reading a diffusion model's weight files and finding the companion files it needs (VAE, text
encoders, image encoders) beside it: one reader and one finder for every family."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from studio.engine.context import UserError

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".pth", ".pt", ".bin", ".ckpt")
MAX_FILES_LOOKED_AT = 2000  # a folder of a whole disk's downloads must not stall a job


def read_state_dict(path: Path | str, compact: bool = False) -> dict[str, torch.Tensor]:
    """A weights file, or every weights file of a (sharded) diffusers component folder, merged.

    compact=True keeps quantized weights as stored (GGUF blocks, fp8 with their scales) for a model
    builder that takes them; otherwise they come dequantized. Pickles load weights-only or not at all.
    """
    from studio.models.weights_io import load_weights

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and not p.name.startswith("."))
        if not files:
            raise UserError("model_not_found", f"No weights in {path}: the download looks incomplete.")
    else:
        files = [path]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_weights(f, compact=compact))
        except UserError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError("bad_model", f"Cannot read {f.name}: {exc}. The file may be damaged or incomplete: "
                            "download it again.") from None
    return sd


def companion_dirs(model_file: Path, folders: tuple[str, ...]) -> list[tuple[Path, bool]]:
    """Where a part of `model_file` may be, with whether to look into subfolders: the model's own folder
    (flat: it may be Downloads), then ComfyUI's folders beside it (models/unet/x -> models/vae, searched
    through, as users sort them into subfolders) and inside it (a folder holding vae/, text_encoder/)."""
    base = model_file.parent
    return [(base, False), *((base.parent / f, True) for f in folders), *((base / f, True) for f in folders)]


def find_companion(model_file: Path, folders: tuple[str, ...], accept: Callable[[Path], bool],
                   accept_entry: Callable[[Any], bool] | None = None) -> Path | None:
    """The first weights file `accept` takes (it reads headers, never names) near `model_file`, in the
    order of companion_dirs, sorted by path within each; else the first library entry `accept_entry` takes."""
    looked = 0
    for folder, deep in companion_dirs(Path(model_file), folders):
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*") if deep else folder.iterdir()):
            if p == model_file or p.suffix.lower() not in WEIGHT_SUFFIXES or not p.is_file():
                continue
            looked += 1
            if looked > MAX_FILES_LOOKED_AT:
                break
            if accept(p):
                return p
    if accept_entry is None:
        return None
    try:
        from studio.library.library import Library, LibraryError

        with Library() as lib:
            for e in lib.list(include_missing=False):
                if accept_entry(e) and e.path.exists():
                    return e.path
    except (LibraryError, OSError):
        pass
    return None
