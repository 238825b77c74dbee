"""How long an image job will take on this machine, from what the last jobs measured here.

After a job the Image tab records seconds per sampling step and the fixed part (load, encode, decode,
save) for the model family, the device and the image size. Before the next job it scales the nearest
measurement by the steps and the pixel count: a UNet step and a VAE decode both grow about linearly
with the pixels. Nothing is guessed before a first measurement; the tab says so instead.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from studio.ui.image.options import read_json, write_json

STEP_TIMES_FILE = "image_step_times.json"
CPU_TARGET_S = 60.0  # what a default job on a CPU should take
CPU_DEFAULT_STEPS = 12  # before any measurement: about a minute for SD 1.5 at 512² on a few cores
CPU_MIN_STEPS = 8  # below this most samplers give mush
_now = time.monotonic  # tests replace it to play a job at a known pace


def device_key(status: dict | None) -> str:
    """'cpu:<name>' / 'cuda:<GPU name>' from an engine_status message; '' before one came."""
    device = (status or {}).get("device") or {}
    return f"{device['kind']}:{device.get('name', '')}" if device.get("kind") else ""


def _key(family: str, device: str, width: int, height: int) -> str:
    return f"{family}|{device}|{width}x{height}"


class StepTimes:
    """Measured timings keyed by family, device and size: {key: {"per_step": s, "fixed": s, ...}}."""

    def __init__(self, data: dict, path: Path | None = None) -> None:
        self.path = path
        self.data: dict[str, dict] = {}
        for key, value in (data.items() if isinstance(data, dict) else ()):
            # a hand-edited or damaged file: keep only entries that make sense
            if (isinstance(key, str) and key.count("|") == 2 and isinstance(value, dict)
                    and _positive(value.get("per_step")) and _nonneg(value.get("fixed", 0.0))):
                self.data[key] = value

    @classmethod
    def load(cls, folder: Path) -> StepTimes:
        path = folder / STEP_TIMES_FILE
        return cls(read_json(path, {}), path)

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.data)

    def record(self, family: str, device: str, width: int, height: int, steps: int, per_step: float,
               total: float, images: int = 1, passes: int = 1) -> None:
        """One finished job: `per_step` seconds per sampling step of a batch of `images`, `total` seconds for
        `passes` batches. Stored per image and per pass."""
        if not (family and device and steps > 0 and _positive(per_step) and _positive(total)):
            return
        one = per_step / max(1, images)
        fixed = max(0.0, total / max(1, passes) - steps * per_step) / max(1, images)
        self.data[_key(family, device, width, height)] = {"per_step": round(one, 4), "fixed": round(fixed, 3),
                                                          "when": int(time.time())}

    def _nearest(self, family: str, device: str, pixels: int) -> tuple[dict, float] | None:
        """The measurement whose pixel count is closest (by ratio), and the ratio to scale it by."""
        best: tuple[float, dict, float] | None = None
        prefix = f"{family}|{device}|"
        for key, value in self.data.items():
            if not key.startswith(prefix):
                continue
            try:
                w, h = (int(v) for v in key[len(prefix):].split("x"))
            except ValueError:
                continue
            ratio = pixels / max(1, w * h)
            distance = abs(math.log(ratio))
            if best is None or distance < best[0]:
                best = (distance, value, ratio)
        return None if best is None else (best[1], best[2])

    def estimate(self, family: str, device: str, width: int, height: int, steps: int, images: int = 1,
                 passes: int = 1) -> float | None:
        """Seconds for the job, or None when nothing was measured for this family on this device."""
        found = self._nearest(family, device, width * height)
        if found is None:
            return None
        m, scale = found
        one = (float(m.get("fixed", 0.0)) + steps * float(m["per_step"])) * scale
        return one * max(1, images) * max(1, passes)

    def steps_for(self, family: str, device: str, width: int, height: int, target: float, most: int) -> int | None:
        """The most steps (at most `most`) that finish within `target` seconds, or None if not measured."""
        found = self._nearest(family, device, width * height)
        if found is None:
            return None
        m, scale = found
        room = target / scale - float(m.get("fixed", 0.0))
        return max(CPU_MIN_STEPS, min(most, int(room / float(m["per_step"])) if room > 0 else CPU_MIN_STEPS))


def about(seconds: float) -> str:
    """'about 40 s', 'about 3 min', 'about 1.5 h'."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


class StepClock:
    """Seconds per sampling step, from the progress messages of one job (first to last sampling step)."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def progress(self, stage: str, step: int, now: float | None = None) -> None:
        if stage != "sampling":
            return
        now = _now() if now is None else now
        if self.first is None or self.last is None:
            self.first = self.last = (step, now)
        elif step > self.last[0]:
            self.last = (step, now)

    def per_step(self) -> float | None:
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _nonneg(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
