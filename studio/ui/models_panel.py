"""The Models panel: installed models by kind, search, actions, and drag-and-drop install.

Everything slow (header reads, copies, hashing) runs in a QThreadPool worker; the widgets
only ever see signals, so the window never blocks. Never imports torch.
"""

from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import (
    QMimeData,
    QModelIndex,
    QObject,
    QRunnable,
    QSortFilterProxyModel,
    Qt,
    QThreadPool,
    QUrl,
    Signal,
)
from PySide6.QtGui import QDesktopServices, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMenu,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QToolButton,
    QTreeView,
    QVBoxLayout,
    QWidget,
)

from studio.library.detect import IMAGE_FAMILIES, LLM_FAMILIES, VIDEO_FAMILIES, detect
from studio.library.headers import HeaderError, read_folder
from studio.library.library import Library, LibraryError, ModelEntry
from studio.library.scan import iter_models

ROLE_TITLES = {"checkpoint": "Checkpoints", "diffusion_model": "Diffusion models", "vae": "VAEs",
               "text_encoder": "Text encoders", "image_encoder": "Image encoders", "lora": "LoRAs",
               "controlnet": "ControlNets", "llm": "Chat models",
               "unknown": "Not recognised"}
COLUMNS = ("Name", "Family", "Variant", "Role", "Size", "Location")
ENTRY_ROLE = Qt.ItemDataRole.UserRole + 1  # the library id on every cell of a model row


def accepts_drop(mime: QMimeData) -> list[str]:
    """Local files and folders in a drag, in order; web URLs and anything else are left out."""
    if not mime.hasUrls():
        return []
    out = []
    for url in mime.urls():
        if url.isLocalFile():
            p = url.toLocalFile()
            if p and Path(p).exists() and p not in out:
                out.append(p)
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------------------
# Installing: detection + library.add in a worker thread.

class _InstallJob(QRunnable):
    def __init__(self, installer: DropInstaller, path: str) -> None:
        super().__init__()
        self.installer, self.path = installer, path

    def run(self) -> None:
        inst = self.installer
        try:
            targets = _expand(Path(self.path))
        except (HeaderError, OSError) as e:
            inst.failed.emit(self.path, str(e))
            return
        if not targets:
            inst.failed.emit(self.path, f"{self.path}: no model in this folder (.safetensors, .gguf, .ckpt, "
                                        "diffusers or Hugging Face folders); drop a model file instead")
            return
        for target in targets:
            inst._install_one(str(target))


def _expand(p: Path) -> list[Path]:
    """A dropped folder is one model (diffusers/HF) or a folder of models."""
    if not p.is_dir():
        return [p]
    try:
        read_folder(p)
        return [p]
    except HeaderError:
        errors: list[tuple[str, str]] = []
        return list(iter_models(p, errors))


class DropInstaller(QObject):
    """Installs dropped paths in the background. One worker, so big copies don't fight over the disk."""

    started = Signal(str)  # path
    progress = Signal(str, float)  # path, 0..1
    finished = Signal(str, dict)  # path, {"entry": ModelEntry.to_dict(), "detection": Detection.to_dict()}
    failed = Signal(str, str)  # path, message
    hashed = Signal(str, str)  # path, sha256 (after finished; used to spot duplicates)

    def __init__(self, library: Library, mode: str = "inplace", hash_files: bool = True,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.library, self.mode, self.hash_files = library, mode, hash_files
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)
        self._stop = threading.Event()

    def install(self, paths: list[str]) -> None:
        """Queue paths and return at once; results arrive as signals."""
        for p in paths:
            self.pool.start(_InstallJob(self, p))

    def wait(self, msecs: int = 30000) -> bool:
        return self.pool.waitForDone(msecs)

    def stop(self, wait_ms: int = 5000) -> bool:
        """Drop queued installs, abandon hashing, and wait for the running one (before closing the library).

        Installs already recorded stay recorded; a copy in progress finishes or cleans up its temp file.
        """
        self._stop.set()
        self.pool.clear()
        return self.pool.waitForDone(wait_ms)

    def _install_one(self, path: str) -> None:
        self.started.emit(path)
        try:
            det = detect(path)
            self.progress.emit(path, 0.05)
            entry = self.library.add(path, mode=self.mode, detection=det, exist_ok=True,
                                     progress=lambda f, _s: self.progress.emit(path, 0.05 + 0.9 * f))
            self.progress.emit(path, 1.0)
            self.finished.emit(path, {"entry": entry.to_dict(), "detection": det.to_dict()})
            if self.hash_files and entry.sha256 is None and not self._stop.is_set():
                self.hashed.emit(path, self.library.hash_entry(entry.id, stop=self._stop))
        except (HeaderError, LibraryError) as e:
            if self._stop.is_set():
                return  # shutting down: hashing was abandoned on purpose
            self.failed.emit(path, str(e))
        except OSError as e:
            self.failed.emit(path, f"{path}: cannot read ({e.strerror or e})")
        # A worker must report every failure: an uncaught exception here would vanish silently.
        except Exception as e:  # noqa: BLE001
            self.failed.emit(path, f"{path}: unexpected error ({type(e).__name__}: {e}); please report it")


class InstallCard(QFrame):
    """One install in progress: name, progress bar, then what the file turned out to be."""

    def __init__(self, path: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path = path
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.title = QLabel(Path(path).name or path)
        self.title.setStyleSheet("font-weight: bold")
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.status = QLabel("reading header…")
        self.status.setWordWrap(True)
        close = QToolButton()
        close.setText("×")
        close.setAutoRaise(True)
        close.clicked.connect(self.deleteLater)
        top = QHBoxLayout()
        top.addWidget(self.title, 1)
        top.addWidget(close)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        self.state = "running"

    def set_progress(self, fraction: float) -> None:
        self.bar.setValue(int(max(0.0, min(1.0, fraction)) * 1000))

    def set_finished(self, result: dict) -> None:
        d, e = result.get("detection", {}), result.get("entry", {})
        self.state = "done"
        self.bar.setValue(1000)
        what = f"{d.get('family', '?')} {d.get('variant', '')} {str(d.get('role', '')).replace('_', ' ')}".strip()
        lines = [f"Installed as “{e.get('name', '?')}”: {what}"]
        if d.get("params"):
            lines.append(f"{d['params'] / 1e9:.2f}B parameters, {d.get('dtype', '')}, "
                         f"needs ~{_human_bytes(d.get('vram_bytes', 0))} VRAM")
        lines += [str(n) for n in d.get("notes", [])[:3]]
        self.status.setText("\n".join(lines))

    def add_note(self, text: str) -> None:
        self.status.setText(self.status.text() + "\n" + text)

    def set_failed(self, message: str) -> None:
        self.state = "failed"
        self.bar.hide()
        self.status.setText(message)
        self.status.setStyleSheet("color: #c0392b")


# ---------------------------------------------------------------------------
# The panel.

class _Filter(QSortFilterProxyModel):
    """Every search word must appear in some column of a model row; group rows show if a child does."""

    text = ""

    def set_text(self, text: str) -> None:
        self.text = text.strip().lower()
        self.invalidateFilter()

    def filterAcceptsRow(self, row: int, parent: QModelIndex) -> bool:  # noqa: N802 (Qt override)
        text = self.text
        if not text:
            return True
        src = self.sourceModel()
        if not parent.isValid():
            return False  # group rows: shown through recursive filtering when a child matches
        cells = " ".join(src.index(row, c, parent).data() or "" for c in range(src.columnCount()))
        return all(word in cells.lower() for word in text.split())


class ModelsPanel(QWidget):
    """Installed models grouped by kind, with search and actions. Accepts dropped files and folders."""

    use_model = Signal(str, str)  # path, role
    scanned = Signal(str)  # summary of a "Scan folder…" run, or what went wrong

    def __init__(self, library: Library, installer: DropInstaller | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.library = library
        self.installer = installer or DropInstaller(library, parent=self)
        self._loaded: dict[str, str] = {}
        self.cards: list[InstallCard] = []

        self.search = QLineEdit()
        self.search.setPlaceholderText("Search models (name, family, role…)")
        self.search.setClearButtonEnabled(True)
        self.model = QStandardItemModel(0, len(COLUMNS), self)
        self.model.setHorizontalHeaderLabels(list(COLUMNS))
        self.proxy = _Filter(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setRecursiveFilteringEnabled(True)
        self.view = QTreeView()
        self.view.setModel(self.proxy)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.view.customContextMenuRequested.connect(self._context_menu)
        self.view.doubleClicked.connect(lambda _i: self._use())

        self.use_button = QPushButton("Use")
        self.reveal_button = QPushButton("Reveal")
        self.remove_button = QPushButton("Remove")
        self.family_button = QPushButton("Set family…")
        self.use_button.clicked.connect(self._use)
        self.reveal_button.clicked.connect(self._reveal)
        self.remove_button.clicked.connect(self._ask_remove)
        self.family_button.clicked.connect(self._ask_family)
        buttons = QHBoxLayout()
        for b in (self.use_button, self.reveal_button, self.remove_button, self.family_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        self.add_button = QPushButton("Add…")
        self.add_button.setToolTip("Choose model files to add (.safetensors, .gguf, .ckpt …)")
        self.add_button.clicked.connect(self._ask_add)
        self.scan_button = QPushButton("Scan folder…")
        self.scan_button.setToolTip("Add every model in a folder and its subfolders (ComfyUI, A1111, LM Studio …)")
        self.scan_button.clicked.connect(self._ask_scan)
        self.download_button = QPushButton("Download…")
        self.download_button.setToolTip("Get a model from Hugging Face, a link (Civitai …) or the starter list")
        self.download_button.clicked.connect(self.open_download)
        self.download_dialog = None
        adding = QHBoxLayout()
        adding.addWidget(self.add_button)
        adding.addWidget(self.scan_button)
        adding.addWidget(self.download_button)
        adding.addStretch(1)
        self.hint = QLabel("Add models with the buttons above, or drop files and folders here")
        self.hint.setEnabled(False)
        self.card_area = QVBoxLayout()

        lay = QVBoxLayout(self)
        lay.addLayout(adding)
        lay.addWidget(self.search)
        lay.addWidget(self.view, 1)
        lay.addLayout(buttons)
        lay.addLayout(self.card_area)
        lay.addWidget(self.hint)

        self.search.textChanged.connect(self._filter)
        self.view.selectionModel().selectionChanged.connect(lambda *_: self._update_buttons())
        self.installer.started.connect(self._card_started)
        self.installer.progress.connect(self._card_progress)
        self.installer.finished.connect(self._card_finished)
        self.installer.failed.connect(self._card_failed)
        self.installer.hashed.connect(self._card_hashed)
        self.scanned.connect(self._scan_finished)
        self.setAcceptDrops(True)
        self.refresh()

    # -- adding -------------------------------------------------------------------------------

    def _ask_add(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Add models", "", "Models (*.safetensors *.gguf *.ckpt *.pt "
                                                "*.pth *.bin *.sft);;All files (*)")
        if paths:
            self.installer.install(paths)

    def open_download(self):
        """The Download view (one per panel; closing it mid-download cancels the download)."""
        from studio.ui.download_dialog import DownloadDialog

        if self.download_dialog is None:
            self.download_dialog = DownloadDialog(self.library, self)
            self.download_dialog.installed.connect(lambda _entry: self.refresh())
        self.download_dialog.show()
        self.download_dialog.raise_()
        return self.download_dialog

    def _ask_scan(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Scan a folder for models")
        if folder:
            self.scan_folder(folder)

    def scan_folder(self, folder: str) -> threading.Thread:
        """Register every model under `folder` in the background (headers only); `scanned` tells the outcome."""
        from studio.library.scan import scan

        self.scan_button.setEnabled(False)
        self.hint.setText(f"Scanning {folder}…")

        def work() -> None:
            try:
                self.scanned.emit(f"{folder}: {scan(self.library, [folder]).summary()}")
            except (OSError, ValueError) as exc:  # LibraryError is a ValueError
                self.scanned.emit(f"Could not scan {folder}: {exc}")

        thread = threading.Thread(target=work, name="studio-scan-folder", daemon=True)
        thread.start()
        return thread

    def _scan_finished(self, summary: str) -> None:
        self.scan_button.setEnabled(True)
        self.hint.setText(summary)
        self.refresh()

    # -- contents -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rebuild the list from the library, keeping the selection."""
        keep = self.selected_entry()
        self.model.removeRows(0, self.model.rowCount())
        groups: dict[str, QStandardItem] = {}
        try:
            entries = self.library.list()
        except LibraryError as e:
            self.hint.setText(str(e))
            entries = []
        for e in entries:
            if e.role not in groups:
                g = QStandardItem(ROLE_TITLES.get(e.role, e.role))
                g.setSelectable(False)
                groups[e.role] = g
            groups[e.role].appendRow(self._row(e))
        for role in ROLE_TITLES:
            if role in groups:
                self.model.appendRow([groups[role]] + [_blank() for _ in COLUMNS[1:]])
        self.view.expandAll()
        for c in range(len(COLUMNS)):
            self.view.resizeColumnToContents(c)
        if keep is not None:
            self.select(keep.name)
        self._update_buttons()

    def _row(self, e: ModelEntry) -> list[QStandardItem]:
        family = e.effective_family + (" (set)" if e.family_override else "")
        cells = [e.name, family, e.variant, e.role.replace("_", " "), _human_bytes(e.size), self._location(e)]
        items = [QStandardItem(c) for c in cells]
        for it in items:
            it.setData(e.id, ENTRY_ROLE)
            it.setToolTip(str(e.path))
        return items

    def _location(self, e: ModelEntry) -> str:
        if e.missing:
            return "missing"
        return self._loaded.get(str(e.path)) or self._loaded.get(e.name) or "disk"

    def set_loaded(self, loaded: dict[str, str]) -> None:
        """Where each model is loaded: {path or name: "VRAM" | "RAM"}; everything else is on disk."""
        self._loaded = dict(loaded)
        self.refresh()

    def rows(self) -> list[dict[str, str]]:
        """The visible model rows (after filtering), for tests and accessibility."""
        out = []
        for g in range(self.proxy.rowCount()):
            gi = self.proxy.index(g, 0)
            for r in range(self.proxy.rowCount(gi)):
                out.append({col: self.proxy.index(r, c, gi).data() for c, col in enumerate(COLUMNS)})
        return out

    def _filter(self, text: str) -> None:
        self.proxy.set_text(text)
        self.view.expandAll()

    # -- selection and actions ----------------------------------------------------------------

    def select(self, name: str) -> bool:
        for g in range(self.proxy.rowCount()):
            gi = self.proxy.index(g, 0)
            for r in range(self.proxy.rowCount(gi)):
                idx = self.proxy.index(r, 0, gi)
                if idx.data() == name:
                    self.view.setCurrentIndex(idx)
                    self.view.selectionModel().select(idx, self.view.selectionModel().SelectionFlag.ClearAndSelect
                                                      | self.view.selectionModel().SelectionFlag.Rows)
                    return True
        return False

    def selected_entry(self) -> ModelEntry | None:
        idx = self.view.currentIndex() if hasattr(self, "view") else QModelIndex()
        entry_id = idx.data(ENTRY_ROLE) if idx.isValid() else None
        return self.library.get(int(entry_id)) if entry_id is not None else None

    def _update_buttons(self) -> None:
        e = self.selected_entry()
        for b in (self.use_button, self.reveal_button, self.remove_button, self.family_button):
            b.setEnabled(e is not None)
        if e is not None:
            self.use_button.setEnabled(not e.missing and e.role != "unknown")

    def _use(self) -> None:
        e = self.selected_entry()
        if e is not None and not e.missing:
            self.use_model.emit(str(e.path), e.role)

    def _reveal(self) -> None:
        e = self.selected_entry()
        if e is not None:
            folder = e.path if e.path.is_dir() else e.path.parent
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def remove_model(self, name: str | int, delete_file: bool = False) -> None:
        try:
            self.library.remove(name, delete_file=delete_file)
        except LibraryError as err:
            QMessageBox.warning(self, "Remove model", str(err))
        self.refresh()

    def _ask_remove(self) -> None:
        e = self.selected_entry()
        if e is None:
            return
        answer = QMessageBox.question(self, "Remove model",
                                      f"Remove “{e.name}” from the library?\nThe file stays on disk: {e.path}")
        if answer == QMessageBox.StandardButton.Yes:
            self.remove_model(e.id)  # the id: a name of digits is not an id

    def override_family(self, name: str | int, family: str | None) -> None:
        self.library.override_family(name, family)
        self.refresh()

    def _ask_family(self) -> None:
        e = self.selected_entry()
        if e is None:
            return
        choices = ["(detected: " + e.family + ")", *IMAGE_FAMILIES, *VIDEO_FAMILIES,
                   *sorted(set(LLM_FAMILIES.values()))]
        family, ok = QInputDialog.getItem(self, "Model family", f"Family of “{e.name}”:", choices, 0, True)
        if ok:
            self.override_family(e.id, None if family.startswith("(detected") else family.strip())

    def _context_menu(self, pos) -> None:
        if self.selected_entry() is None:
            return
        menu = QMenu(self)
        menu.addAction("Use", self._use)
        menu.addAction("Reveal in file manager", self._reveal)
        menu.addAction("Set family…", self._ask_family)
        menu.addAction("Remove from library", self._ask_remove)
        menu.exec(self.view.viewport().mapToGlobal(pos))

    # -- drag and drop ------------------------------------------------------------------------

    def _set_highlight(self, on: bool) -> None:
        self.setProperty("dropTarget", on)
        self.setStyleSheet("ModelsPanel { border: 2px dashed palette(highlight); }" if on else "")

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt override)
        if accepts_drop(event.mimeData()):
            self._set_highlight(True)
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragLeaveEvent(self, event) -> None:  # noqa: N802
        self._set_highlight(False)
        event.accept()

    def dropEvent(self, event) -> None:  # noqa: N802
        self._set_highlight(False)
        paths = accepts_drop(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.installer.install(paths)
        else:
            event.ignore()

    # -- install cards ------------------------------------------------------------------------

    def card(self, path: str) -> InstallCard | None:
        return next((c for c in reversed(self.cards) if c.path == path), None)

    def _card_started(self, path: str) -> None:
        c = InstallCard(path, self)
        self.cards.append(c)
        c.destroyed.connect(lambda _o=None, c=c: self.cards.remove(c) if c in self.cards else None)
        self.card_area.addWidget(c)

    def _card_progress(self, path: str, fraction: float) -> None:
        c = self.card(path)
        if c is not None:
            c.set_progress(fraction)

    def _card_finished(self, path: str, result: dict) -> None:
        c = self.card(path)
        if c is not None:
            c.set_finished(result)
        self.refresh()

    def _card_hashed(self, path: str, sha256: str) -> None:
        """Tell the user at once when a dropped file is a copy of one they already have."""
        c = self.card(path)
        mine = Path(path).resolve()
        same = [e.name for group in self.library.find_duplicates() for e in group
                if e.sha256 == sha256 and e.path != mine]
        if c is not None and same:
            c.add_note("Same file as " + ", ".join(f"“{n}”" for n in same) + ": you may remove one copy")

    def _card_failed(self, path: str, message: str) -> None:
        c = self.card(path)
        if c is None:  # failed before it started (a folder with nothing in it)
            self._card_started(path)
            c = self.card(path)
        c.set_failed(message)


def _blank() -> QStandardItem:
    it = QStandardItem("")
    it.setSelectable(False)
    return it
