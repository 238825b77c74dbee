"""What the Image tab offers (samplers, schedules, sizes per family) and its small JSON files."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("studio.ui.image")

SAMPLERS = [("euler", "Euler"), ("euler_a", "Euler a"), ("heun", "Heun"), ("dpmpp_2m", "DPM++ 2M"),
            ("dpmpp_2m_sde", "DPM++ 2M SDE"), ("dpmpp_sde", "DPM++ SDE"), ("ddim", "DDIM"), ("lcm", "LCM")]
SCHEDULES = [("normal", "Normal"), ("karras", "Karras"), ("exponential", "Exponential"),
             ("sgm_uniform", "SGM uniform")]
QUANTIZATIONS = [("", "Full precision"), ("int8", "int8 (half the VRAM)"), ("fp8", "fp8 (half, GPU)"),
                 ("int4", "int4 (a quarter, lower quality)")]
PREDICTIONS = [("auto", "Auto (from the model)"), ("eps", "epsilon"), ("v", "v-prediction")]
IMAGE_FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

# The sizes each family was trained at: other sizes work but drift (doubled heads, stretched bodies).
SDXL_BUCKETS = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536)]
SD1_SIZES = [(512, 512), (512, 768), (768, 512)]
SD2_V_SIZES = [(768, 768), (768, 512), (512, 768)]
SD2_EPS_SIZES = [(512, 512), (512, 768), (768, 512)]


def size_presets(family: str, prediction: str = "") -> list[tuple[int, int]]:
    """Preset sizes for a model family; the first one is the family's native size.

    SD 2.x v-prediction models (and those whose prediction is unknown, "v?") are the 768 ones;
    the eps 2.x base model is 512.
    """
    if family == "sdxl":
        return list(SDXL_BUCKETS)
    if family == "sd2":
        return list(SD2_EPS_SIZES if prediction == "eps" else SD2_V_SIZES)
    return list(SD1_SIZES)


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
