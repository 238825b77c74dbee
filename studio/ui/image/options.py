"""What the Image tab offers (samplers, schedules, sizes per family) and its small JSON files."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from studio import families
from studio.families import Kind

log = logging.getLogger("studio.ui.image")

SAMPLERS = [(name, families.SAMPLER_LABELS[name]) for name in families.DIFFUSION_SAMPLERS]
SCHEDULES = [(name, families.SCHEDULE_LABELS[name]) for name in families.SCHEDULES]
QUANTIZATIONS = [(mode, families.QUANT_LABELS[mode]) for mode in ("", *families.DIFFUSION_QUANT_MODES)]
PREDICTIONS = [("auto", "Auto (from the model)"), ("eps", "epsilon"), ("v", "v-prediction")]
# The image families the Image tab can run today, with their labels.
IMAGE_FAMILIES = families.ids(Kind.IMAGE, runnable=True)
FAMILY_LABELS = {f: families.label(f) for f in IMAGE_FAMILIES}
DEFAULT_FAMILY = IMAGE_FAMILIES[0]


def runnable_image_families() -> str:
    """'SD 1.x, SD 2.x, SDXL or Flux.1': the image families Studio runs, for messages."""
    labels = [FAMILY_LABELS[f] for f in IMAGE_FAMILIES]
    return ", ".join(labels[:-1]) + " or " + labels[-1] if len(labels) > 1 else labels[0]


def size_presets(family: str, prediction: str = "") -> list[tuple[int, int]]:
    """Preset sizes for a model family; the first one is the family's native size (the catalog's)."""
    return families.size_presets(family, prediction)


def snap8(value: int) -> int:
    """Nearest multiple of 8 (the VAE downsamples by 8), at least 64."""
    return max(64, int(round(value / 8)) * 8)


def refuse_file_drops(widget: Any) -> None:
    """Text fields inside the tab take file drags as text (file managers add the path as text/plain);
    turning that off lets a dropped model file reach the window's installer instead."""
    from PySide6.QtWidgets import QLineEdit

    for edit in widget.findChildren(QLineEdit):
        edit.setAcceptDrops(False)


def read_json(path: Path, default: Any) -> Any:
    """A small JSON file, or `default` when it is missing or damaged (a damaged one is kept aside)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); starting fresh", path, exc)
        try:
            path.replace(path.with_suffix(path.suffix + ".broken"))
        except OSError:
            pass
        return default


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
