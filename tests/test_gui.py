"""The window with a real engine: three tabs, the status bar reaches ready, settings persist."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from studio.paths import Paths  # noqa: E402
from studio.settings import Settings  # noqa: E402


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    from studio.ui.main_window import MainWindow

    paths = Paths.default().ensure()
    settings = Settings.load(paths)
    settings.device = "cpu"
    win = MainWindow(paths, settings)
    qtbot.addWidget(win)
    yield win
    win.close()


def test_window_opens_with_image_video_and_chat_tabs(window):
    assert [window.tabs.tabText(i) for i in range(window.tabs.count())] == ["Image", "Video", "Chat"]
    assert window.tabs.currentIndex() == 2  # Chat: works with the bundled model, nothing to install


def test_status_bar_reaches_ready_from_a_real_engine(window, qtbot):
    window.engine.start()
    qtbot.waitUntil(lambda: window.state_label.property("state") == "ready", timeout=60000)
    assert "Engine ready" in window.state_label.text()
    qtbot.waitUntil(lambda: window.device_label.text().startswith("CPU"), timeout=20000)
    assert "thread" in window.device_label.text()


def test_selftest_from_the_menu_reports_throughput(window, qtbot):
    window.engine.start()
    qtbot.waitUntil(lambda: window.state_label.property("state") == "ready", timeout=60000)
    window.run_selftest()
    qtbot.waitUntil(lambda: "TFLOP/s" in window.statusBar().currentMessage(), timeout=60000)
    assert "correct" in window.statusBar().currentMessage()


def test_settings_and_geometry_persist_across_launches(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    from studio.ui.main_window import MainWindow

    paths = Paths.default().ensure()
    settings = Settings.load(paths)
    settings.vram_budget = "6GiB"
    settings.model_folders = ["/somewhere/ComfyUI/models"]
    win = MainWindow(paths, settings)
    qtbot.addWidget(win)
    win.resize(700, 500)
    win.tabs.setCurrentIndex(1)
    win.close()

    again = Settings.load(paths)
    assert again.vram_budget == "6GiB" and again.model_folders == ["/somewhere/ComfyUI/models"]
    assert again.last_tab == 1 and again.window_geometry
    win2 = MainWindow(paths, again)
    qtbot.addWidget(win2)
    assert win2.tabs.currentIndex() == 1
    assert (win2.width(), win2.height()) == (700, 500)
    win2.close()


def test_settings_dialog_refuses_a_bad_budget(qtbot):
    from studio.ui.settings_dialog import SettingsDialog

    dialog = SettingsDialog(Settings())
    qtbot.addWidget(dialog)
    dialog.budget.setText("lots")
    assert dialog.result_settings() is None
    assert "4GiB" in dialog.error.text()
    dialog.budget.setText("4GiB")
    assert dialog.result_settings().vram_budget == "4GiB"


def test_a_damaged_settings_file_is_kept_aside_and_defaults_are_used(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    paths = Paths.default().ensure()
    (paths.config / "settings.json").write_text("{not json")
    assert Settings.load(paths) == Settings()
    assert (paths.config / "settings.json.broken").read_text() == "{not json"


def test_gui_process_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, os; os.environ['QT_QPA_PLATFORM']='offscreen';"
            "from PySide6.QtWidgets import QApplication; app = QApplication([]);"
            "from studio.ui.main_window import MainWindow; from studio.paths import Paths;"
            "from studio.settings import Settings; w = MainWindow(Paths.default(), Settings());"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_use_in_the_models_panel_opens_the_chat_tab_with_that_model(window, tmp_path):
    entry = window.library.ensure_bundled()  # the window lists the bundled model like any other
    window.refresh_model_pickers()
    window.tabs.setCurrentIndex(0)
    window.use_model(str(entry.path), "llm")
    assert window.tabs.currentWidget() is window.chat_tab
    assert window.chat_tab.model_combo.currentData() == str(entry.path)


def test_the_models_panel_shows_where_a_loaded_model_lives(window):
    entry = window.library.ensure_bundled()
    window._on_status({"device": {"label": "CPU · 2 threads"}, "memory": {},
                       "models": [{"key": "llm:x", "bytes": 1, "path": str(entry.path), "where": "RAM"}]})
    window.models_panel.refresh()
    rows = {r["Name"]: r for r in window.models_panel.rows()}
    assert rows[entry.name]["Location"] == "RAM"


def test_dropping_a_model_on_the_window_installs_it_and_the_chat_picker_lists_it(window, qtbot):
    from PySide6.QtCore import QMimeData, QPoint, Qt, QUrl
    from PySide6.QtGui import QDragEnterEvent, QDropEvent

    from studio.models.bundled import default_chat_model

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(default_chat_model()))])
    enter = QDragEnterEvent(QPoint(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    window.dragEnterEvent(enter)
    assert enter.isAccepted()
    drop = QDropEvent(QPoint(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    with qtbot.waitSignal(window.models_panel.installer.finished, timeout=20000):
        window.dropEvent(drop)
    assert window.models_dock.isVisibleTo(window)
    qtbot.waitUntil(lambda: window.chat_tab.model_combo.findData(str(default_chat_model().resolve())) >= 0,
                    timeout=5000)


def test_model_folders_from_settings_are_scanned_at_start(qtbot, tmp_path, monkeypatch):
    import shutil

    from studio.models.bundled import default_chat_model
    from studio.ui.main_window import MainWindow

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    comfy = tmp_path / "ComfyUI" / "models" / "text_encoders"
    comfy.mkdir(parents=True)
    shutil.copy(default_chat_model(), comfy.parent / "smol.gguf")  # an LLM at the models root
    paths = Paths.default().ensure()
    settings = Settings(model_folders=[str(tmp_path / "ComfyUI" / "models")], device="cpu")
    win = MainWindow(paths, settings)
    qtbot.addWidget(win)
    qtbot.waitUntil(lambda: "scanned" in win.statusBar().currentMessage(), timeout=30000)
    assert any(e.path.name == "smol.gguf" for e in win.library.list())
    win.close()


def test_a_model_copied_into_a_watched_folder_is_registered_without_a_restart(qtbot, tmp_path, monkeypatch):
    import shutil

    from studio.models.bundled import default_chat_model
    from studio.ui.main_window import MainWindow

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    loras = tmp_path / "ComfyUI" / "models" / "loras"
    loras.mkdir(parents=True)
    paths = Paths.default().ensure()
    win = MainWindow(paths, Settings(model_folders=[str(tmp_path / "ComfyUI" / "models")], device="cpu"))
    qtbot.addWidget(win)
    qtbot.waitUntil(lambda: "scanned" in win.statusBar().currentMessage(), timeout=30000)
    assert [e.source for e in win.library.list()] == ["bundled"]  # nothing from the empty folder
    shutil.copy(default_chat_model(), tmp_path / "ComfyUI" / "models" / "late.gguf")
    qtbot.waitUntil(lambda: any(e.path.name == "late.gguf" for e in win.library.list()), timeout=30000)
    win.close()


def test_view_menu_and_ctrl_digits_open_each_tab(window):
    from PySide6.QtGui import QKeySequence

    view = next(a.menu() for a in window.menuBar().actions() if a.text() == "&View")
    actions = {a.text(): a for a in view.actions()}
    for name, index in (("Video", 1), ("Chat", 2), ("Image", 0)):
        actions[name].trigger()  # triggered(checked=False): the checked flag must not become the index
        assert window.tabs.currentIndex() == index, name
    # Ctrl+N fires the same action (offscreen windows never become active, so keys can't be sent here).
    assert [actions[n].shortcut() for n in ("Image", "Video", "Chat")] == [
        QKeySequence(f"Ctrl+{i}") for i in (1, 2, 3)]


QUIT_AFTER_SETTINGS = """
import sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
from studio.paths import Paths
from studio.settings import Settings
from studio.ui.main_window import MainWindow

app = QApplication(sys.argv)
paths = Paths.default().ensure()
window = MainWindow(paths, Settings.load(paths))
window.show()
quit_action = next(a for m in window.menuBar().actions() for a in m.menu().actions() if a.text() == "&Quit")

def settings_then_quit():
    QTimer.singleShot(300, lambda: QApplication.activeModalWidget().reject())  # Esc
    window.open_settings()  # Ctrl+,
    QTimer.singleShot(300, quit_action.trigger)  # Ctrl+Q

QTimer.singleShot(500, settings_then_quit)
QTimer.singleShot(60000, lambda: app.exit(3))
sys.exit(app.exec())
"""


def test_quitting_after_settings_was_opened_exits_cleanly(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "STUDIO_HOME": str(tmp_path), "QT_QPA_PLATFORM": "offscreen"}
    out = subprocess.run([sys.executable, "-c", QUIT_AFTER_SETTINGS], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"exit code {out.returncode}: {out.stderr[-2000:]}"


def test_settings_offer_only_the_devices_the_engine_found(qtbot):
    from studio.ui.settings_dialog import SettingsDialog

    cpu_only = {"device": {"kind": "cpu", "label": "CPU · 2 threads", "torch_build": "cpu"}}
    dialog = SettingsDialog(Settings(), None, cpu_only)
    qtbot.addWidget(dialog)
    assert [dialog.device.itemText(i) for i in range(dialog.device.count())] == ["auto", "cpu"]
    assert "No GPU" in dialog.device_note.text()
    assert not dialog.budget.isEnabled() and not dialog.reserve.isEnabled()
    assert "no VRAM" in dialog.budget.toolTip()

    cuda = {"device": {"kind": "cuda", "label": "CUDA · RTX 4090 · 24 GiB", "extra": {"device_count": 2}}}
    dialog = SettingsDialog(Settings(), None, cuda)
    qtbot.addWidget(dialog)
    assert [dialog.device.itemText(i) for i in range(dialog.device.count())] == ["auto", "cpu", "cuda", "cuda:1"]
    assert dialog.budget.isEnabled()

    unknown = SettingsDialog(Settings(), None, None)  # before the engine reported: everything, and why
    qtbot.addWidget(unknown)
    assert unknown.device.count() == 6 and "not reported" in unknown.device_note.text()


def test_at_the_default_size_the_init_image_controls_fit_and_both_seeds_start_random(window, qtbot):
    from PySide6.QtCore import QPoint

    window.resize(1280, 820)
    window.show()
    qtbot.waitExposed(window)
    image, video = window.image_tab, window.video_tab
    for tab, scroll, field in ((image, image.scroll, image.init_panel), (video, video.scroll, video.image)):
        window.tabs.setCurrentWidget(tab)
        qtbot.wait(50)
        bar = scroll.verticalScrollBar()
        bar.setValue(bar.maximum())
        qtbot.wait(50)
        top = field.mapTo(scroll.viewport(), QPoint(0, 0)).y()
        assert top >= 0 and top + field.height() <= scroll.viewport().height(), type(tab).__name__
        assert field.height() >= field.sizeHint().height(), type(tab).__name__  # not squeezed to its minimum
    assert image.init_panel.canvas.height() >= image.init_panel.canvas.sizeHint().height()
    assert video.image.width() >= 200  # the path field, not its two buttons, gets the row
    assert image.params.seed_edit.text() == "" and image.params.seed_edit.placeholderText() == "random"
    assert video.seed.value() == -1 and video.seed.edit.placeholderText() == "random"
