"""The first-run card: what hardware the engine found, where models and outputs go, what to try first.

Shown over the window's tabs on the first start (Settings.first_run_done) and again from Help > Welcome.
Everything on it comes from the engine's own status message, so it says what the engine will really use,
not what the window guesses.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from studio.families import Starter, starters_for
from studio.paths import Paths
from studio.settings import Settings
from studio.units import fmt_bytes

BUNDLED_NAME = "SmolLM2 135M"
MAX_SUGGESTIONS = 4

STYLE = """
QWidget#WelcomeBackdrop { background: rgba(0, 0, 0, 110); }
QFrame#WelcomeCard { background: palette(window); border: 1px solid palette(mid); border-radius: 10px; }
QLabel#WelcomeTitle { font-size: 17pt; font-weight: 600; }
QLabel#WelcomeSection { font-weight: 600; }
QLabel#WelcomePath { font-family: monospace; }
QFrame#WelcomeSuggestion { border: 1px solid palette(mid); border-radius: 6px; }
"""


def hardware_text(status: dict | None) -> str:
    """One line from an engine_status message: device, VRAM, RAM and threads the engine will use."""
    device = (status or {}).get("device") or {}
    if not device.get("kind"):
        return "Looking at this machine's hardware… (the engine is starting)"
    kind = device["kind"]
    ram = int(device.get("total_ram") or (status.get("memory") or {}).get("ram_total") or 0)
    # image and video jobs use every thread; chat may use fewer (the engine's rule for decode)
    threads = int((device.get("extra") or {}).get("all_threads") or device.get("threads") or 0)
    parts = []
    if kind == "cpu":
        parts.append("CPU only (no GPU found)")
    else:
        parts.append(f"{kind.upper()} · {device.get('name') or 'GPU'}")
        vram = int(device.get("total_vram") or 0)
        if vram and kind != "mps":  # a Mac's GPU shares the RAM: its "VRAM" would count the same bytes twice
            parts.append(f"{fmt_bytes(vram)} VRAM")
    if ram:
        parts.append(f"{fmt_bytes(ram)} RAM")
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    return " · ".join(parts)


def machine_memory(status: dict | None) -> tuple[int, int]:
    """(RAM, VRAM) in bytes from an engine_status message; VRAM 0 without a GPU."""
    device = (status or {}).get("device") or {}
    ram = int(device.get("total_ram") or ((status or {}).get("memory") or {}).get("ram_total") or 0)
    vram = int(device.get("total_vram") or 0) if device.get("kind") not in (None, "cpu") else 0
    return ram, vram


def suggestions(status: dict | None) -> list[Starter]:
    """The starter downloads this machine can run, GPU ones first when there is a GPU."""
    device = (status or {}).get("device") or {}
    if not device.get("kind"):
        return []
    ram, vram = machine_memory(status)
    fitting = starters_for(ram, vram)
    # With a GPU, the models that need one are the better first download; on a CPU they are filtered out.
    fitting.sort(key=lambda s: -s.min_vram)
    return fitting[:MAX_SUGGESTIONS]


class FirstRunCard(QFrame):
    open_chat = Signal()
    download = Signal(str)  # a starter's id
    folder_changed = Signal(str, str)  # "models" or "outputs", the new folder (already saved in Settings)
    dismissed = Signal()

    def __init__(self, paths: Paths, settings: Settings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("WelcomeCard")
        self.paths = paths
        self.settings = settings
        self.status: dict | None = None

        title = QLabel("Welcome to Studio")
        title.setObjectName("WelcomeTitle")
        intro = QLabel("Images, video and chat on this computer. Nothing leaves it.")
        intro.setWordWrap(True)

        self.hardware = QLabel(hardware_text(None))
        self.hardware.setWordWrap(True)
        self.hardware.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        folders = QGridLayout()
        folders.setColumnStretch(1, 1)
        self.models_label = QLabel()
        self.outputs_label = QLabel()
        self.models_button = QPushButton("Change…")
        self.outputs_button = QPushButton("Change…")
        self.models_button.setToolTip("Where downloaded and added models are kept")
        self.outputs_button.setToolTip("Where generated images and videos are saved")
        self.models_button.clicked.connect(lambda: self.choose_folder("models"))
        self.outputs_button.clicked.connect(lambda: self.choose_folder("outputs"))
        for row, (name, label, button) in enumerate((("Models", self.models_label, self.models_button),
                                                     ("Outputs", self.outputs_label, self.outputs_button))):
            label.setObjectName("WelcomePath")
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            folders.addWidget(QLabel(name), row, 0)
            folders.addWidget(label, row, 1)
            folders.addWidget(button, row, 2)
        self._show_folders()

        chat_row = QHBoxLayout()
        chat_text = QLabel(f"The bundled chat model ({BUNDLED_NAME}) is ready now: small and quick, good for "
                           "trying things out.")
        chat_text.setWordWrap(True)
        self.chat_button = QPushButton("Open Chat")
        self.chat_button.clicked.connect(self.open_chat)
        chat_row.addWidget(chat_text, 1)
        chat_row.addWidget(self.chat_button)

        self.suggestion_note = QLabel()
        self.suggestion_note.setWordWrap(True)
        self.suggestion_box = QVBoxLayout()
        self.suggestion_buttons: dict[str, QPushButton] = {}  # starter id -> its Download button
        self._suggestion_rows: list[QFrame] = []

        self.close_button = QPushButton("Get started")
        self.close_button.setDefault(True)
        self.close_button.clicked.connect(self.dismissed)
        reopen = QLabel("Help > Welcome shows this again.")
        reopen.setEnabled(False)
        bottom = QHBoxLayout()
        bottom.addWidget(reopen, 1)
        bottom.addWidget(self.close_button)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(24, 20, 24, 20)
        lay.addWidget(title)
        lay.addWidget(intro)
        lay.addSpacing(6)
        lay.addWidget(_section("This computer"))
        lay.addWidget(self.hardware)
        lay.addSpacing(6)
        lay.addWidget(_section("Folders"))
        lay.addLayout(folders)
        lay.addSpacing(6)
        lay.addWidget(_section("Chat"))
        lay.addLayout(chat_row)
        lay.addSpacing(6)
        lay.addWidget(_section("More models (one click to download)"))
        lay.addWidget(self.suggestion_note)
        lay.addLayout(self.suggestion_box)
        lay.addSpacing(8)
        lay.addLayout(bottom)
        self.set_status(None)

    # -- hardware and suggestions ---------------------------------------------------------------------
    def set_status(self, status: dict | None) -> None:
        """The engine's status message: fills in the hardware line and the suggestions that fit it."""
        if status is not None and not (status.get("device") or {}).get("kind"):
            return  # a status without a device says nothing new
        self.status = status
        self.hardware.setText(hardware_text(status))
        found = suggestions(status)
        ids = [s.id for s in found]
        if ids == list(self.suggestion_buttons):
            return
        for row in self._suggestion_rows:
            self.suggestion_box.removeWidget(row)
            row.deleteLater()
        self._suggestion_rows.clear()
        self.suggestion_buttons.clear()
        for s in found:
            row, button = _suggestion_row(s)
            button.clicked.connect(lambda _checked=False, sid=s.id: self.download.emit(sid))
            self.suggestion_box.addWidget(row)
            self._suggestion_rows.append(row)
            self.suggestion_buttons[s.id] = button
        if status is None:
            self.suggestion_note.setText("Suggestions appear once the engine has looked at the hardware.")
        elif not found:
            ram, _ = machine_memory(status)
            self.suggestion_note.setText(f"None of the starter models fits {fmt_bytes(ram)} of RAM; the bundled "
                                         "chat model still works, and any model file can be dropped on the window.")
        else:
            self.suggestion_note.setText("Chosen for this machine's memory. Or drop any model file on the window.")

    # -- folders ---------------------------------------------------------------------------------------
    def folder(self, which: str) -> Path:
        if which == "models":
            return self.settings.models_path(self.paths)
        return self.settings.outputs_path(self.paths)

    def _show_folders(self) -> None:
        for which, label in (("models", self.models_label), ("outputs", self.outputs_label)):
            path = str(self.folder(which))
            label.setText(path)
            label.setToolTip(path)

    def choose_folder(self, which: str) -> str:
        """Ask for a folder; saves it in Settings and returns it ("" when the user cancelled)."""
        title = "Folder for models" if which == "models" else "Folder for generated images and videos"
        chosen = QFileDialog.getExistingDirectory(self, title, str(self.folder(which)))
        if not chosen:
            return ""
        return self.set_folder(which, chosen)

    def set_folder(self, which: str, folder: str) -> str:
        path = Path(folder).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".studio-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            self.suggestion_note.setText(f"{path} cannot be used ({exc.strerror or exc}); choose a folder you "
                                         "can write to.")
            return ""
        if which == "models":
            self.settings.models_folder = str(path)
        else:
            self.settings.outputs_folder = str(path)
        try:
            self.settings.save(self.paths)
        except OSError as exc:
            self.suggestion_note.setText(f"Could not save the settings ({exc}); the folder is used until Studio "
                                         "closes.")
        self._show_folders()
        self.folder_changed.emit(which, str(path))
        return str(path)


def _section(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("WelcomeSection")
    return label


def _suggestion_row(s: Starter) -> tuple[QFrame, QPushButton]:
    """A starter as a framed row: name and what it needs (wrapped), and its Download button."""
    needs = f"needs a GPU with {fmt_bytes(s.min_vram)}" if s.min_vram else "runs on a CPU"
    text = QLabel(f"<b>{s.label}</b><br>{fmt_bytes(s.size)} · {s.licence} · {needs}. {s.note}")
    text.setWordWrap(True)
    button = QPushButton("Download")
    button.setToolTip(f"Download {s.repo}/{s.file} into the models folder")
    row = QFrame()
    row.setObjectName("WelcomeSuggestion")
    lay = QHBoxLayout(row)
    lay.setContentsMargins(10, 6, 10, 6)
    lay.addWidget(text, 1)
    lay.addWidget(button, 0, Qt.AlignmentFlag.AlignVCenter)
    return row, button


class WelcomeOverlay(QWidget):
    """The card centred over `host` (the tabs) on a dimmed backdrop, following the host's size."""

    def __init__(self, host: QWidget, card: FirstRunCard) -> None:
        super().__init__(host)
        self.setObjectName("WelcomeBackdrop")
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        self.setStyleSheet(STYLE)
        self.card = card
        card.setParent(self)
        card.setMaximumWidth(640)
        lay = QVBoxLayout(self)
        lay.addStretch(1)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(card, 4)
        row.addStretch(1)
        lay.addLayout(row)
        lay.addStretch(1)
        host.installEventFilter(self)
        self.setGeometry(host.rect())

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt override)
        if watched is self.parent() and event.type() == QEvent.Type.Resize:
            self.setGeometry(self.parentWidget().rect())
        return False
