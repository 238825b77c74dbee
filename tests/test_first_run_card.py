"""The first-run card: shown once, hardware from the engine's status, suggestions that fit, folders saved."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from studio.families import STARTERS  # noqa: E402
from studio.paths import Paths  # noqa: E402
from studio.settings import Settings  # noqa: E402

GB = 1_000_000_000


def fake_status(kind: str = "cpu", ram: int = 16 * GB, vram: int = 0, threads: int = 8, name: str = "") -> dict:
    device = {"kind": kind, "name": name or ("CPU" if kind == "cpu" else "NVIDIA RTX 4070"), "total_ram": ram,
              "total_vram": vram, "threads": threads, "torch_device": "cpu" if kind == "cpu" else "cuda:0",
              "label": "CPU · 8 threads" if kind == "cpu" else f"CUDA · {name}", "extra": {}}
    return {"device": device, "memory": {"ram_total": ram, "ram_free": ram // 2, "rss": 0}, "models": [],
            "queue": 0}


@pytest.fixture
def make_window(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    from studio.ui.main_window import MainWindow

    windows = []

    def make():
        paths = Paths.default().ensure()
        win = MainWindow(paths, Settings.load(paths))
        qtbot.addWidget(win)
        win.show()
        windows.append(win)
        return win

    yield make
    for win in windows:
        win.close()


def test_welcome_card_shows_on_the_first_start_only(make_window):
    first = make_window()
    assert first.maybe_show_welcome() is True
    assert first.welcome is not None and first.welcome.isVisible()
    assert first.welcome.geometry() == first.tabs.rect()  # it covers the tabs, inside the window
    first.welcome.card.close_button.click()
    assert first.welcome is None
    first.close()

    second = make_window()
    assert second.maybe_show_welcome() is False
    assert getattr(second, "welcome", None) is None
    # Help > Welcome brings it back
    action = next(a for a in second.menuBar().actions() if a.text() == "&Help").menu().actions()[0]
    assert action.text() == "&Welcome"
    action.trigger()
    assert second.welcome is not None and second.welcome.isVisible()


def test_hardware_line_comes_from_the_engine_status(make_window):
    win = make_window()
    win.show_welcome()
    card = win.welcome.card
    assert "engine is starting" in card.hardware.text()
    win.engine.status_changed.emit(fake_status("cpu", ram=16 * GB, threads=8))
    assert card.hardware.text() == "CPU only (no GPU found) · 14.9 GiB RAM · 8 threads"
    win.engine.status_changed.emit(fake_status("cuda", ram=64 * GB, vram=12 * GB, threads=16, name="RTX 4070"))
    text = card.hardware.text()
    assert text.startswith("CUDA · RTX 4070") and "11.2 GiB VRAM" in text and "59.6 GiB RAM" in text
    assert "16 threads" in text


def test_suggestions_fit_the_machines_ram_and_vram(make_window):
    win = make_window()
    win.show_welcome()
    card = win.welcome.card
    win.engine.status_changed.emit(fake_status("cpu", ram=6 * GB))
    small = list(card.suggestion_buttons)
    assert small == ["qwen3-1.7b"]  # SD 1.5 wants 8 GB of RAM; every GPU model is left out on a CPU
    win.engine.status_changed.emit(fake_status("cpu", ram=2 * GB))
    assert not card.suggestion_buttons and "None of the starter models fits" in card.suggestion_note.text()
    win.engine.status_changed.emit(fake_status("cuda", ram=32 * GB, vram=12 * GB))
    gpu = list(card.suggestion_buttons)
    by_id = {s.id: s for s in STARTERS}
    assert "sdxl" in gpu and "qwen3-8b" in gpu
    assert all(by_id[i].runs and by_id[i].min_vram <= 12 * GB and by_id[i].min_ram <= 32 * GB for i in gpu)
    assert "flux-schnell" not in gpu  # it does not run in Studio yet, whatever the card


def test_a_suggestion_starts_its_download_in_the_models_panel(make_window, monkeypatch, qtbot):
    import studio.ui.download_dialog as dd

    pulled = []

    def fake_pull(source, library, **kw):
        pulled.append(source)
        raise dd.DownloadError("network", "no network in tests")

    monkeypatch.setattr(dd, "pull", fake_pull)
    win = make_window()
    win.show_welcome()
    win.engine.status_changed.emit(fake_status("cpu", ram=16 * GB))
    win.welcome.card.suggestion_buttons["sd15"].click()
    dialog = win.models_panel.download_dialog
    assert dialog is not None and dialog.isVisible() and win.models_dock.isVisible()
    dialog.wait(10)
    qtbot.waitUntil(lambda: dialog.download_button.isEnabled(), timeout=5000)
    sd15 = next(s for s in STARTERS if s.id == "sd15")
    assert pulled == [f"{sd15.repo}/{sd15.file}"]
    assert dialog.status.text() == "no network in tests"


def test_changing_a_folder_saves_it(make_window, monkeypatch, tmp_path):
    import studio.ui.first_run as fr

    win = make_window()
    win.show_welcome()
    card = win.welcome.card
    chosen = {"models": tmp_path / "my models", "outputs": tmp_path / "my pictures"}
    for which in ("models", "outputs"):
        monkeypatch.setattr(fr.QFileDialog, "getExistingDirectory", lambda *a, w=which: str(chosen[w]))
        button = card.models_button if which == "models" else card.outputs_button
        button.click()
    assert card.models_label.text() == str(chosen["models"])
    assert card.outputs_label.text() == str(chosen["outputs"])
    assert win.library.models_dir == chosen["models"]  # new downloads go there at once
    saved = Settings.load(win.paths)
    assert saved.models_folder == str(chosen["models"]) and saved.outputs_folder == str(chosen["outputs"])
    from studio.library.library import Library

    with Library(tmp_path / "cli-library.db") as cli_library:  # as `studio models pull` opens it
        assert cli_library.models_dir == chosen["models"]
    # a cancelled chooser changes nothing
    monkeypatch.setattr(fr.QFileDialog, "getExistingDirectory", lambda *a: "")
    card.models_button.click()
    assert Settings.load(win.paths).models_folder == str(chosen["models"])


def test_a_folder_that_cannot_be_written_is_refused(make_window, tmp_path):
    win = make_window()
    win.show_welcome()
    card = win.welcome.card
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    assert card.set_folder("models", str(blocker / "models")) == ""
    assert "cannot be used" in card.suggestion_note.text()
    assert Settings.load(win.paths).models_folder == ""


def test_open_chat_switches_to_the_chat_tab(make_window):
    win = make_window()
    win.tabs.setCurrentIndex(0)
    win.show_welcome()
    win.welcome.card.chat_button.click()
    assert win.tabs.currentWidget() is win.chat_tab and win.welcome is None
