"""CPU image generation that is honest: all cores for image/video jobs, a time estimate before Generate,
and defaults that finish in about a minute on a CPU."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from multiprocessing import Pipe  # noqa: E402

import pytest  # noqa: E402

from studio.protocol import ChatJob, ImageJob, VideoJob  # noqa: E402


def test_job_threads_rule():
    from studio.engine.device import job_threads

    assert job_threads("image", 1, 2) == 2
    assert job_threads("video", 1, 8) == 8
    assert job_threads("chat", 1, 2) == 1
    assert job_threads("embed", 3, 8) == 3
    assert job_threads("image", 1, 0) == 1


def test_each_job_kind_runs_with_its_thread_count():
    """The engine sets torch's thread count per job: every core for image/video, chat's rule for chat,
    whatever ran before."""
    import torch

    from studio.engine.server import Engine, QueuedJob

    ours, theirs = Pipe()
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # as torch's default on a 4-core machine
        engine = Engine(ours, device_override="cpu")
        engine._init_threads()
        seen: dict[str, int] = {}

        class Done:
            def to_dict(self) -> dict:
                return {}

        def record(job, ctx):
            seen[job.kind] = torch.get_num_threads()
            return Done()

        engine.pipelines = {"chat": record, "image": record, "video": record}
        with_chat = engine.device.threads
        for job in (ChatJob(), ImageJob(), ChatJob(), VideoJob()):
            engine._run(QueuedJob(job.kind + "1", job))
            if job.kind == "chat":
                assert seen["chat"] == with_chat  # back to chat's rule after an image job
        assert seen == {"chat": with_chat, "image": 4, "video": 4}
        assert engine.device.extra["all_threads"] == 4
        assert engine.device.to_dict()["extra"]["all_threads"] == 4  # the status message carries it
    finally:
        torch.set_num_threads(saved)
        ours.close()
        theirs.close()


# -- the estimate -------------------------------------------------------------------------------------

def test_estimate_scales_with_steps_and_pixels():
    from studio.ui.image.estimate import StepTimes

    times = StepTimes({})
    key = ("sd1", "cpu")
    assert times.estimate(*key, 512, 512, 20) is None
    times.record(*key, 512, 512, steps=10, per_step=2.0, total=30.0)
    est = times.estimate(*key, 512, 512, 20)
    assert est == pytest.approx(10.0 + 20 * 2.0)  # fixed part (load, encode, decode) + steps
    bigger = times.estimate(*key, 1024, 1024, 20)
    assert bigger == pytest.approx(10.0 * 4 + 20 * 2.0 * 4)  # 4x the pixels: 4x the step and the decode
    assert times.estimate("sd1", "cuda", 512, 512, 20) is None  # another device: not measured
    assert times.estimate("sdxl", "cpu", 512, 512, 20) is None


def test_estimate_keeps_the_nearest_measured_size():
    from studio.ui.image.estimate import StepTimes

    times = StepTimes({})
    times.record("sd1", "cpu", 512, 512, steps=10, per_step=2.0, total=25.0)
    times.record("sd1", "cpu", 256, 256, steps=10, per_step=0.6, total=7.0)
    assert times.estimate("sd1", "cpu", 256, 256, 10) == pytest.approx(7.0)
    assert times.estimate("sd1", "cpu", 512, 512, 10) == pytest.approx(25.0)


def test_bad_stored_times_are_ignored():
    from studio.ui.image.estimate import StepTimes

    times = StepTimes({"sd1|cpu|512x512": {"per_step": "fast"}, "x": 3, "sd1|cpu|64x64": {"per_step": -1}})
    assert times.estimate("sd1", "cpu", 512, 512, 10) is None


# -- the Image tab --------------------------------------------------------------------------------------

from library_fixtures import SAFETENSORS_CASES, write_safetensors  # noqa: E402
from PySide6.QtCore import Signal  # noqa: E402
from test_image_tab import MockEngine, make_paths  # noqa: E402

GB = 1 << 30


class StatusEngine(MockEngine):
    status_changed = Signal(dict)

    def report(self, kind: str) -> None:
        self.status_changed.emit({"device": {"kind": kind, "name": "Test CPU" if kind == "cpu" else "Test GPU",
                                             "threads": 1, "total_ram": 16 * GB, "extra": {"all_threads": 4}}})


@pytest.fixture(scope="module")
def sd_library(tmp_path_factory):
    from studio.library.library import Library

    root = tmp_path_factory.mktemp("models")
    lib = Library(root / "library.db", root / "installed")
    lib.add(write_safetensors(root / "sd15.safetensors", SAFETENSORS_CASES["sd15_ldm"][0]))
    yield lib
    lib.close()


@pytest.fixture
def make_tab(qtbot, tmp_path, sd_library):
    from studio.settings import Settings
    from studio.ui.image_tab import ImageTab

    tabs = []

    def make(engine):
        tab = ImageTab(engine, make_paths(tmp_path), Settings(), library=sd_library)
        qtbot.addWidget(tab)
        tab.show()
        tabs.append(tab)
        return tab

    yield make
    for tab in tabs:
        tab.gallery.shutdown()


def play_job(engine, tab, monkeypatch, per_step: float, seconds: float) -> None:
    """Generate, then answer like the engine: sampling steps at `per_step` apart, a result after `seconds`."""
    import studio.ui.image.estimate as est

    clock = [100.0]
    monkeypatch.setattr(est, "_now", lambda: clock[0])
    job_id = tab.generate()
    job = tab.job
    engine.send("started", job_id=job_id)
    engine.send("progress", job_id=job_id, step=0, total=2, stage="loading")
    for step in range(1, job.steps + 1):
        clock[0] += per_step
        engine.send("progress", job_id=job_id, step=step, total=job.steps, stage="sampling")
    engine.send("result", job_id=job_id, result={"images": [], "seconds": seconds, "model": "sd15",
                                                 "family": "sd1", "prediction": "eps"})


def test_on_a_cpu_generate_says_how_long_from_a_measured_step_time(make_tab, monkeypatch):
    engine = StatusEngine()
    tab = make_tab(engine)
    assert tab.params.family() == "sd1"
    assert not tab.buttons.note.isVisible()  # nothing said before the engine told us its device
    engine.report("cpu")
    # fresh tab on a CPU: native size, fewer steps, and the user is told why
    assert (tab.params.width_spin.value(), tab.params.height_spin.value()) == (512, 512)
    assert tab.params.steps_spin.value() == 12
    assert "CPU" in tab.notice.text()
    assert tab.buttons.note.text() == "first run: timing will be measured"
    play_job(engine, tab, monkeypatch, per_step=2.0, seconds=30.0)
    assert tab.buttons.note.text() == "about 30 s"  # 6 s fixed + 12 steps x 2 s
    tab.params.steps_spin.setValue(24)
    assert tab.buttons.note.text() == "about 54 s"
    tab.params.set_size(768, 768)
    assert tab.buttons.note.text() == f"about {round(54 * 2.25 / 60)} min"  # 121.5 s
    # measured once, remembered for the next window on this machine
    again = make_tab(StatusEngine())
    again.timing.set_status({"device": {"kind": "cpu", "name": "Test CPU"}})
    again.params.steps_spin.setValue(12)
    again.params.set_size(512, 512)
    assert again.buttons.note.text() == "about 30 s"


def test_measured_cpu_defaults_fit_a_minute(make_tab, monkeypatch, tmp_path):
    from studio.ui.image.estimate import StepTimes

    times = StepTimes.load(make_paths(tmp_path).data)
    times.record("sd1", "cpu:Test CPU", 512, 512, steps=10, per_step=4.0, total=50.0)  # 10 s fixed, 4 s a step
    times.save()
    engine = StatusEngine()
    tab = make_tab(engine)
    engine.report("cpu")
    assert tab.params.steps_spin.value() == 12  # (60 - 10) / 4 = 12 steps in a minute (not more than 25)


def test_on_a_gpu_nothing_changes(make_tab):
    engine = StatusEngine()
    tab = make_tab(engine)
    before = tab.params.values()
    engine.report("cuda")
    assert tab.params.values() == before
    assert not tab.buttons.note.isVisible()


def test_a_used_tab_keeps_its_settings_on_a_cpu(make_tab):
    first = make_tab(StatusEngine())
    first.params.steps_spin.setValue(30)
    first.save_state()
    engine = StatusEngine()
    tab = make_tab(engine)
    engine.report("cpu")
    assert tab.params.steps_spin.value() == 30  # the user's choice, not the CPU default
    assert tab.buttons.note.text() == "first run: timing will be measured"
