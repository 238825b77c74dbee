"""The main window: Image, Video and Chat tabs, the engine status bar, settings, model drops."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from PySide6.QtCore import QByteArray, QFileSystemWatcher, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QAction, QDesktopServices, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QLabel,
    QMainWindow,
    QMessageBox,
    QTabWidget,
    QWidget,
)

from studio import __version__, families
from studio.client import EngineOptions
from studio.paths import Paths
from studio.settings import Settings
from studio.ui.chat.chat_tab import ChatTab
from studio.ui.engine_qt import QtEngine
from studio.ui.image_tab import ImageTab
from studio.ui.job_runner import JobRunner, failure_text
from studio.ui.memory_panel import MemoryPanel
from studio.ui.models_panel import ModelsPanel
from studio.ui.settings_dialog import SettingsDialog
from studio.ui.theme import app_icon, apply_theme
from studio.ui.video_tab import VideoTab

log = logging.getLogger("studio.ui")

GiB = 1 << 30
DOCK_WIDTH = 480
RESCAN_DELAY_MS = 1500

STATE_TEXT = {
    "starting": ("#d9a441", "Engine starting…"),
    "ready": ("#4caf50", "Engine ready"),
    "busy": ("#e8704f", "Engine busy"),
    "restarting": ("#d9a441", "Engine restarting after a crash…"),
    "stopped": ("#d9534f", "Engine stopped"),
}


def engine_options(settings: Settings, paths: Paths | None = None) -> EngineOptions:
    paths = paths or Paths.default()
    return EngineOptions(device=settings.device, vram_budget=settings.vram_budget, reserve=settings.vram_reserve,
                         settings={"outputs": str(settings.outputs_path(paths))},
                         remote=settings.engine_address.strip(), token=settings.engine_token)


class MainWindow(QMainWindow):
    files_dropped = Signal(list)  # local paths dropped on the window
    scan_done = Signal(object, str)  # ScanReport or None, error message

    def __init__(self, paths: Paths, settings: Settings, engine: QtEngine | None = None) -> None:
        super().__init__()
        self.paths = paths
        self.settings = settings
        self.engine = engine or QtEngine(paths, engine_options(settings, paths), self)
        self.library = self._open_library()
        self.setWindowTitle("Studio")
        self.setWindowIcon(app_icon())
        self.setAcceptDrops(True)
        self.resize(1280, 820)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.image_tab = self._make_image_tab()
        self.video_tab = self._make_video_tab()
        self.chat_tab = self._make_chat_tab()
        self.tabs.addTab(self.image_tab, "Image")
        self.tabs.addTab(self.video_tab, "Video")
        self.tabs.addTab(self.chat_tab, "Chat")
        self.setCentralWidget(self.tabs)

        self._build_status_bar()
        self._build_api()
        self._build_docks()
        self._build_menus()
        self._selftest = JobRunner(self.engine, self)
        self._selftest.finished.connect(self._on_selftest)
        self._selftest.failed.connect(lambda _kind, message, restarted: self.statusBar().showMessage(
            f"Self-test failed: {failure_text(message, restarted, 'Run device self-test')}", 20000))
        self._trust_notices: set[str] = set()
        self.trust_notice: QMessageBox | None = None
        self.engine.state_changed.connect(self._on_state)
        self.engine.status_changed.connect(self._on_status)
        self._on_state(self.engine.state, "")
        self._restore_geometry()
        self._closing = False
        self._scan_thread: threading.Thread | None = None
        self.scan_done.connect(self._on_scan_done)
        # Files added to or removed from the model folders (a download finishing in ComfyUI's folder)
        # trigger a rescan, debounced so a burst of changes costs one scan.
        self._watcher = QFileSystemWatcher(self)
        self._rescan = QTimer(self)
        self._rescan.setSingleShot(True)
        self._rescan.setInterval(RESCAN_DELAY_MS)
        self._rescan.timeout.connect(self.scan_model_folders)
        self._watcher.directoryChanged.connect(lambda _path: self._rescan.start())
        self.scan_model_folders()

    def _open_library(self):
        from studio.library.library import Library, LibraryError

        try:
            library = Library(self.paths.data / "library.db", self.settings.models_path(self.paths))
            library.ensure_bundled()  # the model Chat uses is listed in the Models panel like any other
            return library
        except LibraryError as exc:
            # The window still opens (Chat works on the bundled model); the user sees why models are missing.
            QMessageBox.warning(self, "Model library unavailable", str(exc))
            return None

    # -- tabs ------------------------------------------------------------------------
    def _make_image_tab(self) -> QWidget:
        return ImageTab(self.engine, self.paths, self.settings, self, library=self.library)

    def _make_video_tab(self) -> QWidget:
        return VideoTab(self.engine, self.paths, self.settings, self, library=self.library)

    def _make_chat_tab(self) -> QWidget:
        return ChatTab(self.engine, self.paths, self.settings, self, library=self.library)

    # -- status bar ------------------------------------------------------------------
    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.state_label = QLabel()
        self.state_label.setObjectName("EngineState")
        self.device_label = QLabel("Device: probing…")
        self.device_label.setObjectName("DeviceLabel")
        self.memory_label = QLabel("")
        self.memory_label.setObjectName("MemoryLabel")
        bar.addPermanentWidget(self.memory_label)
        bar.addPermanentWidget(self.device_label)
        bar.addPermanentWidget(self.state_label)

    def _build_api(self) -> None:
        from studio.server.catalog import BUNDLED_ID
        from studio.ui.api_status import ApiServer, ApiStatus

        self.api = ApiServer(self.engine.client, self)
        self.api_status = ApiStatus(self.api, BUNDLED_ID)
        self.statusBar().addPermanentWidget(self.api_status)
        self.apply_api()

    def apply_api(self) -> None:
        """Serve (or stop serving) the API as Settings say; a port in use shows in the status line."""
        if self.settings.api_serve:
            self.api.start(self.settings.api_port)
        else:
            self.api.error = ""
            self.api.stop()

    def _on_state(self, state: str, detail: str) -> None:
        color, text = STATE_TEXT.get(state, ("#888", state))
        if state == "restarting" and detail:
            text = detail  # the client's own words: a lost link to a remote engine is not a crash
        elif state == "starting" and self.settings.engine_address:
            text = f"Connecting to the remote engine at {self.settings.engine_address}…"
        if state == "starting" and detail.startswith("Trusted "):
            self._show_trust_notice(detail)
        self.state_label.setText(f"<span style='color:{color}'>●</span> {text}")
        self.state_label.setToolTip(detail or text)
        self.state_label.setProperty("state", state)
        if detail and state in ("restarting", "stopped"):
            self.statusBar().showMessage(detail, 15000)

    def _show_trust_notice(self, detail: str) -> None:
        """The fingerprint pinned on first use, once per server: the user compares it with the server's."""
        if detail in self._trust_notices:
            return
        self._trust_notices.add(detail)
        self.statusBar().showMessage(detail, 60000)
        box = QMessageBox(QMessageBox.Icon.Information, "New remote engine trusted",
                          f"{detail}.\n\nCompare it with the fingerprint `studio engine serve` printed on the server "
                          "(or `studio engine fingerprint` there). If they differ, remove the address in Settings > "
                          "Remote engine and press Forget certificate: someone may be intercepting the connection.",
                          QMessageBox.StandardButton.Ok, self)
        box.setModal(False)  # a notice: the window stays usable while the user checks the server
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.show()
        self.trust_notice = box

    def _on_status(self, status: dict) -> None:
        device = status.get("device", {})
        self.device_label.setText(device.get("label", "?"))
        warning = device.get("extra", {}).get("warning")
        self.device_label.setToolTip(warning or f"torch {device.get('torch_version', '?')} "
                                                f"({device.get('torch_build', '?')})")
        mem = status.get("memory", {})
        parts = []
        if mem.get("vram_total"):
            used = mem["vram_total"] - mem.get("vram_free", 0)
            parts.append(f"VRAM {used / GiB:.1f}/{mem['vram_total'] / GiB:.1f} GiB")
        if mem.get("rss"):
            parts.append(f"engine RAM {mem['rss'] / GiB:.2f} GiB")
        models = status.get("models", [])
        if models:
            parts.append(f"{len(models)} model{'s' if len(models) != 1 else ''} loaded")
        self.memory_label.setText(" · ".join(parts))
        if self.memory_panel is not None:
            self.memory_panel.update_status(status)
        if self.models_panel is not None:
            loaded: dict[str, str] = {}
            for m in models:
                if m.get("path"):
                    # a model split over VRAM and RAM (a streamed UNet) shows where most of it runs
                    path = os.path.realpath(m["path"])  # the library keys models by their resolved path
                    where = m.get("where") or "RAM"
                    loaded[path] = "VRAM" if "VRAM" in (where, loaded.get(path)) else where
            if loaded != getattr(self, "_last_loaded", None):
                self._last_loaded = loaded
                self.models_panel.set_loaded(loaded)

    # -- docks ---------------------------------------------------------------------------
    def _build_docks(self) -> None:
        self.models_panel = None
        self.memory_panel = None
        self.models_dock = None
        self.memory_dock = None
        if self.library is not None:
            self.models_panel = ModelsPanel(self.library, parent=self)
            self.models_dock = self._dock("Models", self.models_panel, Qt.DockWidgetArea.RightDockWidgetArea)
            self.models_panel.installer.finished.connect(lambda *_: self.refresh_model_pickers())
            self.models_panel.use_model.connect(self.use_model)
        self.memory_panel = MemoryPanel(self)
        self.memory_panel.unload_all_requested.connect(lambda: self.engine.unload(None))
        self.memory_dock = self._dock("Memory", self.memory_panel, Qt.DockWidgetArea.RightDockWidgetArea)

    def scan_model_folders(self) -> None:
        """Register what the user's other apps keep in the folders named in Settings (in the background:
        hashing nothing, reading headers only). Files gone since the last scan are marked missing."""
        folders = [f for f in self.settings.model_folders if f]
        self._watch(folders)
        if not folders or self.library is None:
            return
        if self._scan_thread is not None and self._scan_thread.is_alive():
            self._rescan.start()  # one scan at a time: try again shortly
            return
        library = self.library

        def work() -> None:
            from studio.library.scan import scan

            try:
                self.scan_done.emit(scan(library, folders), "")
            except (OSError, ValueError) as exc:
                self.scan_done.emit(None, str(exc))

        self.statusBar().showMessage(f"Scanning {len(folders)} model folder(s)…")
        self._scan_thread = threading.Thread(target=work, name="studio-scan", daemon=True)
        self._scan_thread.start()

    def _watch(self, folders: list[str]) -> None:
        """Watch each model folder and its immediate subfolders (checkpoints/, loras/, ...)."""
        wanted: list[str] = []
        for folder in folders:
            root = Path(folder).expanduser()
            if root.is_dir():
                wanted.append(str(root))
                try:
                    wanted += [str(p) for p in root.iterdir() if p.is_dir()][:64]
                except OSError:
                    pass
        current = set(self._watcher.directories())
        if current - set(wanted):
            self._watcher.removePaths(list(current - set(wanted)))
        if set(wanted) - current:
            self._watcher.addPaths(sorted(set(wanted) - current))

    def _on_scan_done(self, report, error: str) -> None:
        if self._closing:
            return
        if report is None:
            self.statusBar().showMessage(f"Scanning model folders failed: {error}", 15000)
            return
        self.statusBar().showMessage(f"Model folders scanned: {report.summary()}", 10000)
        if self.models_panel is not None:
            self.models_panel.refresh()
        self.refresh_model_pickers()

    def refresh_model_pickers(self) -> None:
        """A model was installed or removed: every tab's picker lists what is there now."""
        for tab in (self.image_tab, self.video_tab, self.chat_tab):
            refresh = getattr(tab, "refresh_models", None)
            if refresh is not None:
                refresh()

    def use_model(self, path: str, role: str) -> None:
        """'Use' in the Models panel: open the tab for that kind of model with it selected."""
        if role == "llm":
            self.tabs.setCurrentWidget(self.chat_tab)
            combo = getattr(self.chat_tab, "model_combo", None)
            if combo is not None:
                self.chat_tab.refresh_models()
                index = combo.findData(path)
                if index >= 0:
                    combo.setCurrentIndex(index)
                    combo.activated.emit(index)
            return
        family = ""
        if self.library is not None:
            entry = self.library.get(path)
            family = entry.effective_family if entry is not None else ""
        target = self.video_tab if families.tab_kind(family) is families.Kind.VIDEO else self.image_tab
        self.tabs.setCurrentWidget(target)
        use = getattr(target, "use_model", None)
        if use is not None:
            use(path, role)

    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"{title}Dock")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        dock.hide()

        def widen(visible: bool) -> None:  # the table's columns need room; Qt's default dock is narrow
            if visible and dock.width() < DOCK_WIDTH and not dock.isFloating():
                self.resizeDocks([dock], [DOCK_WIDTH], Qt.Orientation.Horizontal)

        dock.visibilityChanged.connect(widen)
        return dock

    # -- menus -----------------------------------------------------------------------------
    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self._action(file_menu, "&Add model…", self.add_model_dialog, QKeySequence.StandardKey.Open)
        self._action(file_menu, "Open &outputs folder", self.open_outputs)
        file_menu.addSeparator()
        self._action(file_menu, "&Settings…", self.open_settings, QKeySequence("Ctrl+,"))
        file_menu.addSeparator()
        self._action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)

        view = self.menuBar().addMenu("&View")
        for i, name in enumerate(("Image", "Video", "Chat")):
            # triggered passes `checked` positionally: take it explicitly so it never lands in the index
            self._action(view, name, lambda _checked=False, i=i: self.tabs.setCurrentIndex(i),
                         QKeySequence(f"Ctrl+{i + 1}"))
        view.addSeparator()
        if self.models_dock is not None:
            act = self.models_dock.toggleViewAction()
            act.setShortcut(QKeySequence("Ctrl+M"))
            view.addAction(act)
        if self.memory_dock is not None:
            view.addAction(self.memory_dock.toggleViewAction())

        engine = self.menuBar().addMenu("&Engine")
        self._action(engine, "Run device &self-test", self.run_selftest)
        self._action(engine, "&Unload all models", lambda: self.engine.unload(None))
        self._action(engine, "&Restart engine", lambda: self.engine.restart(engine_options(self.settings, self.paths)))

        help_menu = self.menuBar().addMenu("&Help")
        self._action(help_menu, "&Welcome", self.show_welcome)
        self._action(help_menu, "&About Studio", self.about)

    def _action(self, menu, text: str, slot, shortcut=None) -> QAction:
        act = QAction(text, self)
        if shortcut is not None:
            act.setShortcut(shortcut)
        act.triggered.connect(slot)
        menu.addAction(act)
        return act

    def open_outputs(self) -> None:
        folder = self.settings.outputs_path(self.paths)
        folder.mkdir(parents=True, exist_ok=True)
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def add_model_dialog(self) -> None:
        from PySide6.QtWidgets import QFileDialog

        files, _ = QFileDialog.getOpenFileNames(self, "Add models", "",
                                                "Models (*.safetensors *.gguf *.sft);;All files (*)")
        if files:
            self.install_paths(files)

    def install_paths(self, paths: list[str]) -> None:
        self.files_dropped.emit(paths)
        if self.models_panel is not None:
            self.models_panel.installer.install(paths)
            if self.models_dock is not None:
                self.models_dock.show()
        else:
            self.statusBar().showMessage("The model library could not be opened, so models cannot be installed; "
                                         "see the warning shown at start.", 10000)

    def run_selftest(self) -> None:
        from studio.protocol import SelfTestJob

        if self._selftest.busy:
            self.statusBar().showMessage("The device self-test is already running…")
            return
        self._selftest.submit(SelfTestJob())
        self.statusBar().showMessage("Running the device self-test…")

    def _on_selftest(self, r: dict) -> None:
        self.statusBar().showMessage(f"Self-test on {r['device_label']}: {r['tflops']:.2f} TFLOP/s "
                                     f"({r['dtype']}), {'correct' if r['ok'] else 'WRONG RESULTS'}", 20000)

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self, self.engine.client.last_status, paths=self.paths)
        try:
            accepted = dialog.exec() == SettingsDialog.DialogCode.Accepted
            new = dialog.result_settings() if accepted else None
        finally:
            # Delete the dialog while Qt runs: one left as the window's child until interpreter shutdown was
            # destroyed there out of order ("shared QObject was deleted directly", then a bus error on quit).
            dialog.deleteLater()
        if new is None:
            return
        engine_changed = (new.device, new.vram_budget, new.vram_reserve, new.outputs_folder, new.engine_address,
                          new.engine_token) != (self.settings.device, self.settings.vram_budget,
                                                self.settings.vram_reserve, self.settings.outputs_folder,
                                                self.settings.engine_address, self.settings.engine_token)
        theme_changed = new.theme != self.settings.theme
        old_folders = list(self.settings.model_folders)
        self.settings = new
        self.save_settings()
        if theme_changed:
            apply_theme(QApplication.instance(), new.theme)
        if new.model_folders != old_folders:
            self.scan_model_folders()
        if engine_changed:
            self.engine.restart(engine_options(new, self.paths))
        self.apply_api()

    # -- first run -------------------------------------------------------------------------------
    def maybe_show_welcome(self) -> bool:
        """On the first start, the welcome card; afterwards only from Help > Welcome."""
        if self.settings.first_run_done:
            return False
        self.show_welcome()
        self.settings.first_run_done = True
        self.save_settings()
        return True

    def show_welcome(self) -> None:
        from studio.ui.first_run import FirstRunCard, WelcomeOverlay

        if getattr(self, "welcome", None) is not None:
            self.welcome.show()
            self.welcome.raise_()
            return
        card = FirstRunCard(self.paths, self.settings)
        card.set_status(self.engine.client.last_status)
        self.engine.status_changed.connect(card.set_status)
        card.open_chat.connect(lambda: (self.tabs.setCurrentWidget(self.chat_tab), self.close_welcome()))
        card.download.connect(self._download_starter)
        card.folder_changed.connect(self._on_folder_changed)
        card.dismissed.connect(self.close_welcome)
        self.welcome = WelcomeOverlay(self.tabs, card)
        self.welcome.show()
        self.welcome.raise_()

    def close_welcome(self) -> None:
        if getattr(self, "welcome", None) is not None:
            self.engine.status_changed.disconnect(self.welcome.card.set_status)
            self.welcome.hide()
            self.welcome.deleteLater()
            self.welcome = None

    def _download_starter(self, starter_id: str):
        """A suggestion on the welcome card: the Models panel's Download view, already fetching it."""
        if self.models_panel is None:
            self.statusBar().showMessage("The model library could not be opened, so nothing can be downloaded; "
                                         "see the warning shown at start.", 10000)
            return None
        if self.models_dock is not None:
            self.models_dock.show()
        dialog = self.models_panel.open_download()
        if not dialog.busy:
            dialog.source.setText(starter_id)
            dialog.start()
        return dialog

    def _on_folder_changed(self, which: str, folder: str) -> None:
        if which == "models" and self.library is not None:
            self.library.models_dir = Path(folder)
        elif which == "outputs":  # the engine writes the outputs: it needs the new folder
            if self.engine.state != "stopped":
                self.engine.restart(engine_options(self.settings, self.paths))
            else:  # not started: the next start takes the new options
                self.engine.client.options = engine_options(self.settings, self.paths)

    def about(self) -> None:
        QMessageBox.about(self, "About Studio", f"<b>Studio {__version__}</b><br>Local, private image, video and "
                          "chat generation on your own hardware.<br>Nothing leaves this computer.")

    # -- drag and drop -----------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 (Qt name)
        if any(url.isLocalFile() for url in event.mimeData().urls()):
            event.acceptProposedAction()
            self.statusBar().showMessage("Drop to install models…")
        else:
            event.ignore()

    def dragLeaveEvent(self, event) -> None:  # noqa: N802
        self.statusBar().clearMessage()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        paths = [url.toLocalFile() for url in event.mimeData().urls() if url.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.install_paths(paths)

    # -- persistence -----------------------------------------------------------------------------
    def _restore_geometry(self) -> None:
        if self.settings.window_geometry:
            self.restoreGeometry(QByteArray.fromHex(self.settings.window_geometry.encode()))
        if self.settings.window_state:
            self.restoreState(QByteArray.fromHex(self.settings.window_state.encode()))
        if 0 <= self.settings.last_tab < self.tabs.count():
            self.tabs.setCurrentIndex(self.settings.last_tab)

    def save_settings(self) -> None:
        self.settings.window_geometry = bytes(self.saveGeometry().toHex()).decode()
        self.settings.window_state = bytes(self.saveState().toHex()).decode()
        self.settings.last_tab = self.tabs.currentIndex()
        try:
            self.settings.save(self.paths)
        except OSError as exc:
            self.statusBar().showMessage(f"Could not save settings: {exc}", 10000)

    def closeEvent(self, event) -> None:  # noqa: N802
        self._closing = True
        if self._scan_thread is not None:
            self._scan_thread.join(10)  # the scan writes to the library we are about to close
        self.save_settings()
        for tab in (self.image_tab, self.video_tab, self.chat_tab):
            shutdown = getattr(tab, "shutdown", None)
            if shutdown is not None:
                shutdown()
        if self.models_panel is not None:
            self.models_panel.installer.stop()
        self.api.stop()
        self.engine.close()
        if self.library is not None:
            self.library.close()
        super().closeEvent(event)
