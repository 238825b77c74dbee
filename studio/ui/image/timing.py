"""The Image tab's honesty on a CPU: "about N s" beside Generate, measured here, and CPU-sized defaults.

Only on a CPU: there a job takes minutes and people need to know before they press Generate. On a GPU
the bar stays as it is. Timings are measured from the job's own progress messages (see estimate.py).
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject

from studio.ui.image.estimate import (
    CPU_DEFAULT_STEPS,
    CPU_TARGET_S,
    StepClock,
    StepTimes,
    about,
    device_key,
)

FIRST_RUN = "first run: timing will be measured"


class ImageTiming(QObject):
    def __init__(self, tab: Any) -> None:
        super().__init__(tab)
        self.tab = tab
        self.times = StepTimes.load(tab.paths.data)
        self.status: dict | None = None
        self.clock: StepClock | None = None
        # Fresh: the user has never used the tab, so CPU defaults replace the GPU-sized ones without
        # overriding anything they chose.
        self.fresh = not tab.state_path.exists()
        self.defaults_applied = False
        status_changed = getattr(tab.engine, "status_changed", None)
        if status_changed is not None:  # scripted test engines have none
            status_changed.connect(self.set_status)
        client = getattr(tab.engine, "client", None)
        if getattr(client, "last_status", None):
            self.set_status(client.last_status)
        tab.params.changed.connect(self.update)
        tab.runner.started.connect(self._on_started)
        tab.runner.progress.connect(self._on_progress)
        tab.runner.finished.connect(self._on_finished)

    @property
    def device(self) -> str:
        return device_key(self.status)

    @property
    def on_cpu(self) -> bool:
        return ((self.status or {}).get("device") or {}).get("kind") == "cpu"

    def set_status(self, status: dict) -> None:
        if not (status.get("device") or {}).get("kind"):
            return
        changed = device_key(status) != self.device
        self.status = status
        if self.on_cpu and self.fresh and not self.defaults_applied and not self.tab.busy:
            self.apply_cpu_defaults()
        if changed:
            self.update()

    def apply_cpu_defaults(self) -> None:
        """The family's native size and the steps that finish in about a minute (measured, else a few)."""
        params = self.tab.params
        self.defaults_applied = True
        width, height = params.presets()[0]
        params.set_size(width, height)
        most = params.steps_spin.value()
        steps = self.times.steps_for(params.family(), self.device, width, height, CPU_TARGET_S, most)
        params.steps_spin.setValue(min(most, steps or CPU_DEFAULT_STEPS))
        self.tab.show_notice(f"This engine runs on the CPU, so steps start at {params.steps_spin.value()} for an "
                             "image in about a minute. More steps add detail and time; the estimate beside "
                             "Generate follows your settings.")

    def estimate(self) -> float | None:
        v = self.tab.params.values()
        family = self.tab.params.family()
        if not family:
            return None
        return self.times.estimate(family, self.device, v["width"], v["height"], v["steps"], v["batch_size"],
                                   v["batch_count"])

    def update(self) -> None:
        bar = self.tab.buttons
        if not self.on_cpu or not self.tab.params.family():
            bar.set_note("")
            return
        seconds = self.estimate()
        if seconds is None:
            bar.set_note(FIRST_RUN, "Nothing was measured yet for this model family at this size on this CPU; "
                         "the first image measures it and later ones show how long they will take.")
        else:
            bar.set_note(about(seconds), "Measured on this CPU from the last image of this model family, scaled "
                         "by steps, size and batch.")

    def _on_started(self) -> None:
        self.clock = StepClock()

    def _on_progress(self, step: int, total: int, stage: str) -> None:
        if self.clock is not None:
            self.clock.progress(stage, step)

    def _on_finished(self, result: dict) -> None:
        clock, self.clock = self.clock, None
        job = self.tab.job
        per_step = clock.per_step() if clock is not None else None
        seconds = float(result.get("seconds") or 0.0)
        family = str(result.get("family") or self.tab.params.family())
        if job is None or per_step is None or not self.device:
            return
        self.times.record(family, self.device, job.width, job.height, job.steps, per_step, seconds,
                          job.batch_size, job.batch_count)
        try:
            self.times.save()
        except OSError:
            pass  # a timing that was not kept is measured again next time; not worth a message
        self.update()
