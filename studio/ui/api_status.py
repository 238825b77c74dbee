"""The window's engine over the OpenAI-compatible API (Settings > Serve API), and its status line.

The app is studio.server's, on uvicorn in a thread, submitting to the window's own EngineClient: a model
loaded for the window serves the API and the other way round, and API requests queue with the tabs'
jobs. Only on 127.0.0.1 (no token needed there; `studio serve --host` with a token is for the network).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtWidgets import QApplication, QHBoxLayout, QLabel, QToolButton, QWidget

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
REFRESH_MS = 2000


def curl_example(base: str, model: str) -> str:
    return (f"curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", "
            f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")


class ApiServer(QObject):
    """Start and stop the API on a port; `served` and `last_error` come from the app's engine bridge."""

    changed = Signal()

    def __init__(self, client: Any, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.client = client
        self.port = 0
        self.error = ""  # why the last start failed
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._app: Any = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> str:
        return f"http://{HOST}:{self.port}" if self.running else ""

    @property
    def served(self) -> int:
        return self._app.state.api.bridge.served if self._app is not None else 0

    @property
    def last_error(self) -> str:
        return self._app.state.api.bridge.last_error if self._app is not None else ""

    def start(self, port: int) -> bool:
        """Serve on 127.0.0.1:port; False with `error` set when it could not (port taken, no uvicorn)."""
        if self.running:
            if port == self.port:
                return True
            self.stop()
        try:
            import starlette  # noqa: F401 - studio.server is built on it
            import uvicorn
        except ModuleNotFoundError as exc:
            if exc.name not in ("starlette", "uvicorn"):
                raise
            self.error = f"The API needs {exc.name}: pip install starlette uvicorn."
            self.changed.emit()
            return False
        from studio.server import ServerConfig, create_app

        app = create_app(ServerConfig(host=HOST, port=port), self.client)
        server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
        thread = threading.Thread(target=self._serve, args=(server,), name="studio-api", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)  # uvicorn binds in well under a second; the window waits that long once
        if not server.started:
            server.should_exit = True
            self.error = (f"Could not serve the API on {HOST}:{port}: the port is in use or not allowed. "
                          "Choose another port in Settings.")
            self.changed.emit()
            return False
        self._server, self._thread, self._app, self.port, self.error = server, thread, app, port, ""
        self.changed.emit()
        return True

    @staticmethod
    def _serve(server: Any) -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports that
            pass

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        remove = getattr(self.client, "remove_listener", None)
        if remove is not None:  # the app's bridge listens to every engine message: stop that too
            remove(self._app.state.api.bridge._on_message)
        self._server = self._thread = self._app = None
        self.changed.emit()


class ApiStatus(QWidget):
    """Status bar line: address, requests served, last error, and a button that copies a curl example."""

    def __init__(self, api: ApiServer, model: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.api = api
        self.model = model
        self.label = QLabel()
        self.label.setObjectName("ApiStatus")
        self.copy_button = QToolButton()
        self.copy_button.setText("Copy curl")
        self.copy_button.setToolTip("Copy an example request to the clipboard")
        self.copy_button.clicked.connect(self.copy_example)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.label)
        row.addWidget(self.copy_button)
        self._timer = QTimer(self)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)
        api.changed.connect(self.refresh)
        self.refresh()

    def example(self) -> str:
        return curl_example(self.api.address, self.model)

    def copy_example(self) -> None:
        QApplication.clipboard().setText(self.example())

    def refresh(self) -> None:
        api = self.api
        if not api.running:
            self._timer.stop()
            self.copy_button.hide()
            self.label.setText(f"<span style='color:#d9534f'>API off:</span> {api.error}" if api.error else "")
            self.label.setToolTip(api.error)
            self.setVisible(bool(api.error))
            return
        self._timer.start()
        served = api.served
        text = f"API {api.address}/v1 · {served} request{'s' if served != 1 else ''} served"
        if api.last_error:
            text += f" · last error: {api.last_error[:60]}"
        self.label.setText(text)
        self.label.setToolTip(f"{api.last_error}\n\n{self.example()}" if api.last_error else self.example())
        self.copy_button.show()
        self.show()
