"""JobRunner against a scripted fake engine, and every tab surviving an engine crash the same way."""

from __future__ import annotations

import io
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6.QtCore import QObject, Signal  # noqa: E402
from PySide6.QtGui import QImage  # noqa: E402

from studio.paths import Paths  # noqa: E402
from studio.protocol import ChatJob, ImageJob, make  # noqa: E402
from studio.settings import Settings  # noqa: E402
from studio.ui.job_runner import JobRunner  # noqa: E402

CRASH = ("The engine stopped unexpectedly (exit code -9). The job was not finished; a new engine is starting.")


class ScriptedEngine(QObject):
    """QtEngine's face for the tabs: submit/cancel record, `send` replays what the engine would say.

    `crash()` does what EngineClient does when the engine process dies mid-job: the running jobs end
    with an `engine_crashed` error, and the next submit goes to a freshly started engine."""

    message = Signal(object)

    def __init__(self, restarts: bool = True) -> None:
        super().__init__()
        self.submitted: list[tuple[str, object]] = []
        self.cancelled: list[str] = []
        self.restarts_after_crash = restarts
        self.engines_started = 1
        self._crashed = False

    def submit(self, job, job_id=None) -> str:
        if self._crashed:  # the client starts a new engine for the next job
            self.engines_started += 1
            self._crashed = False
        job_id = job_id or f"job{len(self.submitted) + 1}"
        self.submitted.append((job_id, job))
        return job_id

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def send(self, type_: str, payloads=None, **fields) -> None:
        self.message.emit(make(type_, payloads, **fields))  # make() validates like the engine's own messages

    def crash(self, job_id: str) -> None:
        self._crashed = True
        self.send("error", job_id=job_id, kind="engine_crashed", message=CRASH, detail="")


def jpeg(w: int = 32, h: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


class Recorder:
    def __init__(self, runner: JobRunner) -> None:
        self.events: list[tuple] = []
        for name in ("accepted", "started", "progress", "preview", "token", "finished", "failed", "cancelled",
                     "busy_changed"):
            getattr(runner, name).connect(lambda *args, n=name: self.events.append((n, *args)))

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


@pytest.fixture
def engine(qapp):
    return ScriptedEngine()


@pytest.fixture
def runner(engine):
    r = JobRunner(engine)
    yield r
    r.close()


# -- the runner --------------------------------------------------------------------------------------------

def test_progress_preview_tokens_and_the_result_arrive_as_typed_signals(runner, engine):
    rec = Recorder(runner)
    job_id = runner.submit(ImageJob(prompt="a fox", model="m.safetensors"))
    assert runner.busy and runner.job_id == job_id
    engine.send("accepted", job_id=job_id, position=2)
    engine.send("started", job_id=job_id)
    engine.send("progress", job_id=job_id, step=3, total=20, stage="sampling")
    engine.send("progress", job_id="someone-else", step=9, total=20, stage="sampling")  # not ours
    engine.send("preview", [jpeg()], job_id=job_id, mime="image/jpeg", width=32, height=24)
    engine.send("preview", [b"not a jpeg"], job_id=job_id, mime="image/jpeg", width=32, height=24)
    engine.send("token", job_id=job_id, text="Hel")
    engine.send("result", job_id=job_id, result={"images": [{"path": "/x.png"}], "seconds": 1.5})
    assert rec.names() == ["busy_changed", "accepted", "started", "progress", "preview", "token", "busy_changed",
                           "finished"]
    assert rec.events[0] == ("busy_changed", True) and rec.events[6] == ("busy_changed", False)
    assert rec.events[1] == ("accepted", 2)
    assert rec.events[3] == ("progress", 3, 20, "sampling")
    image = rec.events[4][1]
    assert isinstance(image, QImage) and (image.width(), image.height()) == (32, 24)
    assert rec.events[5] == ("token", "Hel")
    assert rec.events[7] == ("finished", {"images": [{"path": "/x.png"}], "seconds": 1.5})
    assert not runner.busy and runner.job is not None  # the last job stays for Retry


def test_an_engine_error_fails_the_job_without_a_restart(runner, engine):
    rec = Recorder(runner)
    job_id = runner.submit(ImageJob(prompt="x"))
    engine.send("error", job_id=job_id, kind="out_of_memory", message="Not enough GPU memory.", detail="")
    assert rec.events[-1] == ("failed", "out_of_memory", "Not enough GPU memory.", False)
    assert not runner.busy


def test_cancel_asks_the_engine_once_and_cancelled_ends_the_job(runner, engine):
    rec = Recorder(runner)
    job_id = runner.submit(ImageJob(prompt="x"))
    assert runner.cancel() and not runner.cancel()  # a second press does not send a second cancel
    assert engine.cancelled == [job_id] and runner.busy
    engine.send("cancelled", job_id=job_id)
    assert rec.names()[-2:] == ["busy_changed", "cancelled"] and not runner.busy
    assert not runner.cancel()


def test_an_engine_crash_fails_with_engine_restarted_and_the_next_job_goes_to_a_new_engine(runner, engine):
    rec = Recorder(runner)
    job_id = runner.submit(ImageJob(prompt="x"))
    engine.crash(job_id)
    assert rec.events[-1] == ("failed", "engine_crashed", CRASH, True)
    assert not runner.busy
    runner.submit(ImageJob(prompt="again"))
    assert engine.engines_started == 2 and runner.busy


def test_a_crash_with_restarts_off_says_no_engine_was_restarted(qapp):
    engine = ScriptedEngine(restarts=False)
    runner = JobRunner(engine)
    rec = Recorder(runner)
    engine.crash(runner.submit(ImageJob(prompt="x")))
    assert rec.events[-1][-1] is False


def test_a_second_submit_while_busy_is_refused_and_a_closed_runner_hears_nothing(runner, engine):
    job_id = runner.submit(ImageJob(prompt="x"))
    with pytest.raises(RuntimeError, match="still running"):
        runner.submit(ImageJob(prompt="y"))
    rec = Recorder(runner)
    runner.close()
    assert engine.cancelled == [job_id]  # closing with a job running stops it
    engine.send("result", job_id=job_id, result={})
    assert rec.events == []


# -- every tab, the same way --------------------------------------------------------------------------------

@pytest.fixture
def paths(tmp_path) -> Paths:
    root = tmp_path / "home"
    return Paths(root / "config", root / "data", root / "cache", root / "logs", root / "models", root / "outputs",
                 root / "run")


def test_the_image_tab_survives_an_engine_crash(qtbot, engine, paths):
    from studio.ui.image_tab import ImageTab

    tab = ImageTab(engine, paths, Settings())
    qtbot.addWidget(tab)
    tab.params.checkpoints = [object()]  # a model is installed: Generate is allowed
    job_id = tab.submit(ImageJob(prompt="a fox", model="m.safetensors"))
    assert tab.busy and not tab.generate_button.isEnabled() and tab.cancel_button.isEnabled()
    engine.crash(job_id)
    assert not tab.busy and tab.generate_button.isEnabled() and not tab.cancel_button.isEnabled()
    assert "Press Retry to try again" in tab.preview.error_label.text()
    assert tab.retry() is not None and engine.engines_started == 2


def test_the_video_tab_survives_an_engine_crash(qtbot, engine, paths, monkeypatch):
    from studio.ui.video_tab import VideoTab

    tab = VideoTab(engine, paths, Settings())
    qtbot.addWidget(tab)
    monkeypatch.setattr(tab, "model_path", lambda: "/models/wan.safetensors")
    job_id = tab.generate()
    assert tab.busy and not tab.generate_button.isEnabled()
    engine.crash(job_id)
    assert not tab.busy and tab.generate_button.isEnabled() and not tab.cancel_button.isEnabled()
    assert "Press Generate to try again" in tab.status.text() and not tab.notice.isHidden()
    assert tab.generate() is not None and engine.engines_started == 2


def test_the_chat_tab_survives_an_engine_crash(qtbot, engine, paths):
    from studio.ui.chat.chat_tab import ChatTab

    tab = ChatTab(engine, paths, Settings())
    qtbot.addWidget(tab)
    tab.input.setPlainText("hello")
    answer = tab.send()
    job_id, job = engine.submitted[-1]
    assert isinstance(job, ChatJob) and tab.busy and tab.send_button.text() == "Stop"
    engine.send("token", job_id=job_id, text="Hi th")
    engine.crash(job_id)
    assert not tab.busy and tab.send_button.text() == "Send"
    m = tab.store.message(answer)
    assert (m.status, m.content, m.error["kind"]) == ("interrupted", "Hi th", "engine_crashed")
    assert "Press Retry to try again" in tab.view.bubbles[answer].error_label.text()
    tab.regenerate(answer)
    assert engine.engines_started == 2 and tab.busy
    tab.shutdown()


MANY_EMITS = """
import sys
from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QApplication
from studio.ui.job_runner import JobRunner

class Engine(QObject):
    message = Signal(object)
    def submit(self, job): return "j"
    def cancel(self, job_id): pass

app = QApplication([])
engine = Engine()
runner = JobRunner(engine)  # applies the Signal.emit workaround where this PySide6 needs it
for _ in range(20000):  # ~ a few long chat answers: each token is emitted by QtEngine and by the runner
    runner.token.emit("x")
print("ok")
"""


def test_twenty_thousand_emits_do_not_free_true_and_abort_the_app(tmp_path):
    """PySide6 6.12's Signal.emit drops a reference to True on every call; unguarded this aborts with
    'bool_dealloc: deallocating True or False' (after long chats, on quit)."""
    import subprocess
    import sys

    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "STUDIO_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", MANY_EMITS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
