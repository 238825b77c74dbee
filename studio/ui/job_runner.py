"""One job's lifecycle for every tab: submit, the engine's answers as typed signals, cancel, engine crashes.

A tab owns a JobRunner (the Chat tab one per streaming answer) and connects to its signals instead of
reading protocol Messages itself. The engine is anything with QtEngine's face: `submit(job) -> job_id`,
`cancel(job_id)` and a `message` signal carrying every protocol Message (tests pass a scripted fake).

When the engine process dies mid-job the client reports the job as an error of kind `engine_crashed` or
`engine_hung` and starts a new engine; the runner turns that into `failed(kind, message, True)` and
drops the job, so every tab is usable again at once and its next submit goes to the new engine.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QImage

from studio.protocol import Message
from studio.ui.pyside_fixes import guard_true_refcount

# Error kinds the client synthesises when the engine process is gone; the job did not fail on its own.
ENGINE_LOST = ("engine_crashed", "engine_hung")
ENGINE_GONE = (*ENGINE_LOST, "engine_stopped", "engine_failed")
# The link to a remote engine was lost for good: the job may still finish there, and the server keeps
# its result for a while, so the runner can fetch it later (EngineClient.resume) instead of running it again.
RESUMABLE = ("connection_lost",)
FETCH_ACTION = "Fetch result"


def failure_text(message: str, engine_restarted: bool, action: str = "Generate", kind: str = "") -> str:
    """What a tab shows for a failed job: the engine's words, plus what to do after a crash or a lost link."""
    if kind in RESUMABLE:
        return (f"{message} Press {FETCH_ACTION} once the remote engine is reachable again: the job may have "
                "finished there.")
    if engine_restarted:
        return f"{message} Press {action} to try again: a new engine takes the next job."
    return message


class JobRunner(QObject):
    accepted = Signal(int)  # jobs ahead of this one in the engine's queue
    started = Signal()  # the engine began working on the job
    progress = Signal(int, int, str)  # step, total, stage
    preview = Signal(QImage)  # a decoded preview (undecodable ones are dropped)
    token = Signal(str)  # streamed text
    finished = Signal(dict)  # the result dict exactly as the engine sent it
    failed = Signal(str, str, bool)  # kind, message, engine_restarted
    cancelled = Signal()
    busy_changed = Signal(bool)

    def __init__(self, engine: Any, parent: QObject | None = None) -> None:
        super().__init__(parent)
        guard_true_refcount()  # every tab's signals go through here; see pyside_fixes
        self.engine = engine
        self.job_id: str | None = None
        self.job: Any = None  # the running job, or the last one (tabs resubmit it for Retry)
        self.cancelling = False
        self.lost_job_id: str | None = None  # a job whose link was lost, whose result can still be fetched
        self._connected = True
        engine.message.connect(self._on_message)

    @property
    def busy(self) -> bool:
        return self.job_id is not None

    def submit(self, job: Any) -> str:
        """Send a job; the runner then follows it until it finishes, fails or is cancelled."""
        if self.busy:
            raise RuntimeError(f"job {self.job_id} is still running: cancel it or wait for it first")
        if not self._connected:
            raise RuntimeError("this JobRunner was closed; make a new one")
        self.job = job
        self.cancelling = False
        self.lost_job_id = None
        self.job_id = self.engine.submit(job)
        self.busy_changed.emit(True)
        return self.job_id

    @property
    def can_resume(self) -> bool:
        return self.lost_job_id is not None and not self.busy

    def resume(self) -> str | None:
        """Follow the job whose link was lost again: the remote engine sends its result, or its progress if it
        still runs (the engine's `resume(job_id)`). None when there is no such job."""
        if not self.can_resume or not self._connected:
            return None
        self.job_id, self.lost_job_id = self.lost_job_id, None
        self.cancelling = False
        self.busy_changed.emit(True)
        self.engine.resume(self.job_id)
        return self.job_id

    def cancel(self) -> bool:
        """Ask the engine to stop the job; `cancelled` (or a result/failure that won the race) follows."""
        if self.job_id is None or self.cancelling:
            return False
        self.cancelling = True
        self.engine.cancel(self.job_id)
        return True

    def close(self) -> None:
        """Stop listening (the tab is going away); a running job is cancelled first."""
        self.cancel()
        if self._connected:
            self._connected = False
            self.engine.message.disconnect(self._on_message)

    def _end(self) -> None:
        self.job_id = None
        self.cancelling = False
        self.busy_changed.emit(False)

    def _on_message(self, msg: Message) -> None:
        if self.job_id is None or msg.get("job_id") != self.job_id:
            return
        match msg.type:
            case "accepted":
                self.accepted.emit(int(msg.get("position", 0) or 0))
            case "started":
                self.started.emit()
            case "progress":
                self.progress.emit(int(msg["step"]), int(msg["total"]), str(msg["stage"]))
            case "preview":
                image = QImage.fromData(msg.payloads[0]) if msg.payloads else QImage()
                if not image.isNull():
                    self.preview.emit(image)
            case "token":
                self.token.emit(str(msg["text"]))
            case "result":
                # The busy state ends first so a handler may submit the next job from `finished`.
                self._end()
                result = msg["result"]
                self.finished.emit(result if isinstance(result, dict) else {"value": result})
            case "error":
                kind = str(msg.get("kind") or "error")
                restarted = kind in ENGINE_LOST and self._engine_restarts()
                self.lost_job_id = self.job_id if kind in RESUMABLE else None
                self._end()
                self.failed.emit(kind, str(msg.get("message") or kind), restarted)
            case "cancelled":
                self._end()
                self.cancelled.emit()

    def _engine_restarts(self) -> bool:
        restarts = getattr(self.engine, "restarts_after_crash", True)
        return bool(restarts() if callable(restarts) else restarts)
