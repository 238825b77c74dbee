"""Download view: pull a model from Hugging Face or a URL (or a starter) into the library, with progress and cancel.

The transfer runs studio.library.download.pull in a thread; progress comes back as Qt signals. Cancel
discards what was fetched, so nothing partial stays in the models folder; closing the window mid-way
does the same.
"""

from __future__ import annotations

import threading

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from studio.families import STARTERS, starter
from studio.library.download import DownloadError, Progress, pull
from studio.library.library import Library
from studio.units import fmt_bytes


class _Signals(QObject):
    progress = Signal(object)  # Progress
    finished = Signal(object)  # ModelEntry
    ended = Signal(str, str)  # "done" or a DownloadError kind, its message


def describe(p: Progress) -> str:
    """"model.gguf: 1.2 GiB of 4.7 GiB · 35.0 MiB/s · 1:42 left" (or verifying / installing)."""
    if p.stage != "downloading":
        return f"{p.stage.capitalize()} {p.file}…"
    parts = [f"{p.file}: {fmt_bytes(p.done)}" + (f" of {fmt_bytes(p.total)}" if p.total else "")]
    if p.speed:
        parts.append(f"{fmt_bytes(int(p.speed))}/s")
    if p.eta is not None:
        parts.append(f"{int(p.eta // 60)}:{int(p.eta % 60):02d} left")
    return " · ".join(parts)


class DownloadDialog(QDialog):
    """Source (REPO, REPO/FILE, a link, or a starter), an optional token, Download / Cancel, progress."""

    installed = Signal(object)  # ModelEntry, once a model is in the library

    def __init__(self, library: Library, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Download a model")
        self.library = library
        self._cancel: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._signals = _Signals(self)
        self._signals.progress.connect(self._on_progress)
        self._signals.finished.connect(self._on_finished)
        self._signals.ended.connect(self._on_ended)

        self.starters = QComboBox()
        self.starters.addItem("Choose a starter model…", "")
        for s in STARTERS:
            hw = f"GPU {fmt_bytes(s.min_vram)}+" if s.min_vram else "CPU ok"
            self.starters.addItem(f"{s.label} · {fmt_bytes(s.size)} · {s.licence} · {hw}"
                                  + ("" if s.runs else " · not runnable yet"), s.id)
        self.starters.currentIndexChanged.connect(self._starter_chosen)
        self.source = QLineEdit()
        self.source.setPlaceholderText("owner/name, owner/name/file.gguf, or a download link")
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("only for gated models (default: HF_TOKEN)")
        form = QFormLayout()
        form.addRow("Starter", self.starters)
        form.addRow("Source", self.source)
        form.addRow("Token", self.token)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.download_button = QPushButton("Download")
        self.download_button.setDefault(True)
        self.download_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.download_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        lay.addLayout(buttons)
        self.resize(560, 0)

    def _starter_chosen(self) -> None:
        s = starter(self.starters.currentData() or "")
        if s is not None:
            self.source.setText(s.id)
            self.status.setText(s.note)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        text = self.source.text().strip()
        if not text or self.busy:
            return
        found = starter(text)
        sources = [f"{found.repo}/{f}" for f in (found.file, *found.companions)] if found else [text]
        token = self.token.text().strip() or None
        self._cancel = cancel = threading.Event()
        self.download_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.bar.setValue(0)
        self.status.setText("Looking up the model…")
        signals, library = self._signals, self.library

        def work() -> None:
            try:
                for source in sources:
                    signals.finished.emit(pull(source, library, token=token, progress=signals.progress.emit,
                                               cancel=cancel, discard_on_cancel=True))
                signals.ended.emit("done", "")
            except DownloadError as exc:
                signals.ended.emit(exc.kind, str(exc))

        self._thread = threading.Thread(target=work, name="studio-download", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        if self._cancel is not None and self.busy:
            self._cancel.set()
            self.status.setText("Cancelling…")

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _on_progress(self, p: Progress) -> None:
        if p.total:
            self.bar.setValue(int(1000 * min(1.0, p.done / p.total)))
        else:
            self.bar.setRange(0, 0)  # unknown size: a busy bar
        self.status.setText(describe(p))

    def _on_finished(self, entry) -> None:
        self.installed.emit(entry)
        self.status.setText(f"Installed {entry.name} ({entry.role.replace('_', ' ')}, {fmt_bytes(entry.size)}).")

    def _on_ended(self, kind: str, message: str) -> None:
        self.download_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.bar.setRange(0, 1000)
        if kind == "done":
            self.bar.setValue(1000)
        elif kind == "cancelled":
            self.bar.setValue(0)
            self.status.setText("Cancelled; nothing was kept.")
        else:
            self.status.setText(message)

    def done(self, result: int) -> None:  # closing mid-download cancels it, as the Cancel button does
        self.cancel()
        super().done(result)
