"""Qt face of EngineClient: the same client, its events re-emitted as signals on the GUI thread."""

from __future__ import annotations

import threading
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from studio.client import EngineClient, EngineOptions
from studio.paths import Paths
from studio.protocol import Message
from studio.ui.pyside_fixes import guard_true_refcount


class QtEngine(QObject):
    """Signals are emitted from the client's reader thread; Qt queues them to the receivers' thread."""

    state_changed = Signal(str, str)  # state, detail
    status_changed = Signal(dict)  # engine_status fields
    message = Signal(object)  # every protocol Message (token, progress, preview, result, error, ...)

    def __init__(self, paths: Paths, options: EngineOptions, parent: QObject | None = None) -> None:
        super().__init__(parent)
        guard_true_refcount()  # one emit per engine message: the busiest signal in the app
        self.client = EngineClient(paths, options)
        self.client.add_listener(self._on_message)
        self._poll = QTimer(self)
        self._poll.setInterval(2000)  # memory in the status bar stays fresh without flooding the socket
        self._poll.timeout.connect(self.client.request_status)
        self._submit_lock = threading.Lock()

    @property
    def state(self) -> str:
        return self.client.state

    @property
    def restarts_after_crash(self) -> bool:
        """Whether the client starts a new engine by itself when one dies (JobRunner tells the tabs)."""
        return self.client.options.auto_restart

    def start(self) -> None:
        self.client.start(wait=False)
        self._poll.start()

    def restart(self, options: EngineOptions | None = None) -> None:
        """Stop the engine and start a fresh one (after Settings change the device, say)."""

        def work() -> None:
            self.client.close()
            if options is not None:
                self.client.options = options
            self.client.start(wait=True)

        threading.Thread(target=work, daemon=True).start()

    def submit(self, job: Any, job_id: str | None = None) -> str:
        """Queue a job without blocking the GUI, even while the engine is still starting."""
        from studio import protocol

        job_id = job_id or protocol.new_job_id()

        def work() -> None:
            with self._submit_lock:  # keeps submission order when several are queued during a start
                self.client.submit(job, job_id)

        threading.Thread(target=work, daemon=True).start()
        return job_id

    def resume(self, job_id: str) -> None:
        """Fetch a job's result (or progress) from the remote engine after a lost link, without blocking the GUI:
        its messages then arrive on `message` as a submitted job's do."""
        threading.Thread(target=self.client.resume, args=(job_id,), daemon=True).start()

    def cancel(self, job_id: str) -> None:
        self.client.cancel(job_id)

    def unload(self, model: str | None = None) -> None:
        self.client.unload(model)

    def request_status(self) -> None:
        self.client.request_status()

    def close(self) -> None:
        self._poll.stop()
        self.client.remove_listener(self._on_message)
        self.client.close()

    def _on_message(self, msg: Message) -> None:
        if msg.type == "state":
            self.state_changed.emit(msg["state"], msg.get("detail", ""))
            return
        if msg.type == "engine_status":
            self.status_changed.emit(dict(msg.fields))
        self.message.emit(msg)
