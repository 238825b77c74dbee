"""OpenAI-compatible servers as chat models: the server list, its models, and a runner that streams from one.

A server model is stored in a thread as "<base url> · <model id>", so history, search and export work as
for local models. Base URLs live in Settings.chat_servers; keys in the OS keychain (studio.remote_chat),
or for this session only when the system has no keychain. Requests run on worker threads: nothing here
blocks the window.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from studio.paths import Paths
from studio.remote_chat import RemoteChat, RemoteChatError, load_key, normalise_base, save_key
from studio.settings import Settings

SEP = " · "
ADD_SERVER = "\x00add-server"  # the model list's "Add server…" entry (no model path or URL looks like it)
REMOTE_PARAMS = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty")


def server_model(base: str, model_id: str) -> str:
    return f"{base}{SEP}{model_id}"


def split_server_model(model: str) -> tuple[str, str] | None:
    """'http://host:8000/v1 · name' -> ('http://host:8000/v1', 'name'); None for a local model."""
    if not model.startswith(("http://", "https://")) or SEP not in model:
        return None
    base, model_id = model.split(SEP, 1)
    return base, model_id


def host_of(base: str) -> str:
    return urlsplit(base).netloc or base


def model_label(model: str) -> str:
    """What the model list shows for a thread's model that is not offered now."""
    found = split_server_model(model)
    if found is None:
        return f"{model.replace(chr(92), '/').rsplit('/', 1)[-1]} (not installed)"
    return f"{found[1]} on {host_of(found[0])} (not connected)"


class ChatServers(QObject):
    """The servers the user added and the models each one offers (listed in the background)."""

    changed = Signal()  # a server's model list (or error) changed
    _listed = Signal(str, object, str)  # base, [ids] or None, error text

    def __init__(self, settings: Callable[[], Settings], paths: Paths, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._settings = settings  # the window's current Settings (the Settings dialog replaces the object)
        self.paths = paths
        self.models: dict[str, list[str]] = {}
        self.errors: dict[str, str] = {}
        self.session_keys: dict[str, str] = {}  # where no keychain exists; forgotten on quit
        self._listing: set[str] = set()
        self._listed.connect(self._on_listed)

    @property
    def bases(self) -> list[str]:
        return list(self._settings().chat_servers)

    def key_for(self, base: str) -> str:
        return self.session_keys.get(base) or load_key(base)

    def client(self, base: str, timeout: float = 60.0) -> RemoteChat:
        return RemoteChat(base, api_key=self.key_for(base), timeout=timeout, connect_timeout=5)

    def refresh(self) -> None:
        """List every server's models again (each in its own thread)."""
        for base in self.bases:
            self.list_models(base)

    def list_models(self, base: str) -> None:
        if base in self._listing:
            return
        self._listing.add(base)

        def work() -> None:
            try:
                with self.client(base, timeout=15) as rc:
                    ids = [m["id"] for m in rc.models()]
                self._listed.emit(base, ids, "")
            except RemoteChatError as exc:
                self._listed.emit(base, None, str(exc))

        threading.Thread(target=work, name="studio-list-models", daemon=True).start()

    def _on_listed(self, base: str, ids: list[str] | None, error: str) -> None:
        self._listing.discard(base)
        if ids is None:
            self.errors[base] = error
        else:
            self.models[base] = ids
            self.errors.pop(base, None)
        self.changed.emit()

    def add(self, base: str, key: str, ids: list[str]) -> str:
        """Remember a checked server; returns a note for the user when the key could not go to a keychain."""
        base = normalise_base(base)
        settings = self._settings()
        if base not in settings.chat_servers:
            settings.chat_servers = [*settings.chat_servers, base]
        note = ""
        if key and not save_key(base, key):
            self.session_keys[base] = key
            note = ("This system has no keychain, so the key is kept only until Studio closes (or set "
                    "STUDIO_API_KEY).")
        try:
            settings.save(self.paths)
        except OSError as exc:
            note = f"Could not save the server list ({exc}); it is used until Studio closes."
        self.models[base] = ids
        self.errors.pop(base, None)
        self.changed.emit()
        return note

    def remove(self, base: str) -> None:
        settings = self._settings()
        settings.chat_servers = [b for b in settings.chat_servers if b != base]
        self.models.pop(base, None)
        self.errors.pop(base, None)
        try:
            settings.save(self.paths)
        except OSError:
            pass  # stays removed for this session; the list on disk keeps it
        self.changed.emit()

    def add_items(self, combo: QComboBox) -> None:
        """Append every server's models, a line for each server that did not answer, and "Add server…"."""
        for base in self.bases:
            host = host_of(base)
            for model_id in self.models.get(base, []):
                combo.addItem(f"{model_id} · {host}", server_model(base, model_id))
                combo.setItemData(combo.count() - 1, f"{model_id} on {base}", Qt.ItemDataRole.ToolTipRole)
            if base in self.errors:
                combo.addItem(f"{host}: not reachable", None)
                index = combo.count() - 1
                combo.setItemData(index, self.errors[base], Qt.ItemDataRole.ToolTipRole)
                combo.model().item(index).setEnabled(False)
        combo.addItem("Add server…", ADD_SERVER)
        combo.setItemData(combo.count() - 1, "Chat with a model on an OpenAI-compatible server (vLLM, llama.cpp, "
                          "Ollama, another Studio)", Qt.ItemDataRole.ToolTipRole)

    def ask_add(self, parent: QWidget) -> str:
        """The Add server dialog; returns the first model of the added server as a thread model ("" if none)."""
        dialog = AddServerDialog(self, parent)
        try:
            if dialog.exec() != QDialog.DialogCode.Accepted or not dialog.ids:
                return ""
            return server_model(dialog.base, dialog.ids[0])
        finally:
            dialog.deleteLater()


class AddServerDialog(QDialog):
    """Base URL and optional key; OK checks the server (lists its models) before it is added."""

    _checked = Signal(object, str)  # model ids or None, error

    def __init__(self, servers: ChatServers, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add a chat server")
        self.servers = servers
        self.base = ""
        self.ids: list[str] = []
        self.note = ""
        self.url = QLineEdit()
        self.url.setPlaceholderText("http://host:8000/v1")
        self.key = QLineEdit()
        self.key.setEchoMode(QLineEdit.EchoMode.Password)
        self.key.setPlaceholderText("optional; kept in the system keychain")
        form = QFormLayout()
        form.addRow("Address", self.url)
        form.addRow("API key", self.key)
        hint = QLabel("Any OpenAI-compatible server: vLLM, SGLang, llama.cpp's server, Ollama "
                      "(http://localhost:11434/v1), LM Studio, or `studio serve` on another machine.")
        hint.setWordWrap(True)
        hint.setEnabled(False)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.check)
        self.buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(hint)
        lay.addWidget(self.status)
        lay.addWidget(self.buttons)
        self._checked.connect(self._on_checked)
        self.setMinimumWidth(480)

    def check(self) -> None:
        """List the server's models in a thread; the dialog closes once it answered with some."""
        try:
            base = normalise_base(self.url.text())
        except RemoteChatError as exc:
            self.status.setText(str(exc))
            return
        key = self.key.text().strip()
        self.base = base
        self.status.setText(f"Asking {host_of(base)} for its models…")
        self.buttons.setEnabled(False)

        def work() -> None:
            try:
                with RemoteChat(base, api_key=key or self.servers.key_for(base), timeout=15,
                                connect_timeout=5) as rc:
                    self._checked.emit([m["id"] for m in rc.models()], "")
            except RemoteChatError as exc:
                self._checked.emit(None, str(exc))

        threading.Thread(target=work, name="studio-check-server", daemon=True).start()

    def _on_checked(self, ids: list[str] | None, error: str) -> None:
        self.buttons.setEnabled(True)
        if ids is None:
            self.status.setText(error)
            return
        if not ids:
            self.status.setText(f"{self.base} answered but lists no models; load one on the server first.")
            return
        self.ids = ids
        self.note = self.servers.add(self.base, self.key.text().strip(), ids)
        self.accept()


class RemoteRunner(QObject):
    """JobRunner's face for a chat job whose model is on a server: the same signals, so the Chat tab treats
    both alike. The stream runs on a thread; Stop ends the answer at once and closes the stream (the
    connection drops, so the server stops generating too)."""

    accepted = Signal(int)
    started = Signal()
    progress = Signal(int, int, str)
    preview = Signal(object)
    token = Signal(str)
    finished = Signal(dict)
    failed = Signal(str, str, bool)
    cancelled = Signal()
    busy_changed = Signal(bool)
    _piece = Signal(str, str)  # job id, text
    _done = Signal(str, object, str, str)  # job id, result dict or None, error kind, message

    def __init__(self, servers: ChatServers, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.servers = servers
        self.job_id: str | None = None
        self.job: Any = None
        self._stop: threading.Event | None = None
        self._piece.connect(self._on_piece)
        self._done.connect(self._on_done)

    @property
    def busy(self) -> bool:
        return self.job_id is not None

    def submit(self, job: Any) -> str:
        if self.busy:
            raise RuntimeError(f"job {self.job_id} is still running: stop it or wait for it first")
        found = split_server_model(job.model)
        if found is None:
            raise ValueError(f"{job.model!r} is not a server model")
        base, model_id = found
        self.job = job
        self.job_id = job_id = uuid.uuid4().hex[:12]
        self._stop = stop = threading.Event()
        messages = ([{"role": "system", "content": job.system}] if job.system else []) + list(job.messages)
        params = {k: getattr(job, k) for k in REMOTE_PARAMS}
        params["stop"] = params["stop"] or None
        servers, piece, done = self.servers, self._piece, self._done

        def work() -> None:
            t0 = time.monotonic()
            first: float | None = None
            try:
                with servers.client(base) as rc:
                    stream = rc.stream(model_id, messages, **params)
                    try:
                        for text in stream:
                            if stop.is_set():
                                return
                            first = first if first is not None else time.monotonic() - t0
                            piece.emit(job_id, text)
                    finally:
                        stream.close()  # closes the HTTP response: the server sees the client leave
                    last = rc.last
            except RemoteChatError as exc:
                done.emit(job_id, None, exc.kind, str(exc))
                return
            elapsed = time.monotonic() - t0
            usage = last.usage or {}
            completion = int(usage.get("completion_tokens") or 0)
            decode = elapsed - (first or 0.0)
            done.emit(job_id, {"text": last.text, "finish_reason": last.finish_reason or "stop",
                               "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                               "completion_tokens": completion, "ttft_s": round(first or elapsed, 4),
                               "tokens_per_s": round(completion / decode, 2) if completion and decode > 0 else 0.0,
                               "model": model_id, "server": base}, "", "")

        self.busy_changed.emit(True)
        threading.Thread(target=work, name="studio-remote-chat", daemon=True).start()
        self.started.emit()
        return job_id

    def cancel(self) -> bool:
        if self.job_id is None or self._stop is None:
            return False
        self._stop.set()
        self._end()
        self.cancelled.emit()
        return True

    def close(self) -> None:
        self.cancel()

    def _end(self) -> None:
        self.job_id = None
        self.busy_changed.emit(False)

    def _on_piece(self, job_id: str, text: str) -> None:
        if job_id == self.job_id:
            self.token.emit(text)

    def _on_done(self, job_id: str, result: dict | None, kind: str, message: str) -> None:
        if job_id != self.job_id:
            return  # stopped meanwhile: the answer was already ended
        self._end()
        if result is None:
            self.failed.emit(kind, message, False)
        else:
            self.finished.emit(result)
