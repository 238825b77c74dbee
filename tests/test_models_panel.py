"""The Models panel and drag-and-drop install, driven with pytest-qt (offscreen)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from library_fixtures import SAFETENSORS_CASES, smollm2_gguf, write_safetensors  # noqa: E402
from PySide6.QtCore import QMimeData, QPoint, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDragEnterEvent, QDropEvent  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from studio.library.library import Library  # noqa: E402
from studio.ui import models_panel  # noqa: E402
from studio.ui.models_panel import DropInstaller, ModelsPanel, accepts_drop  # noqa: E402


@pytest.fixture
def lib(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    with Library() as library:
        yield library


def model(path: Path, case: str) -> Path:
    return write_safetensors(path, SAFETENSORS_CASES[case][0])


@pytest.fixture
def panel(qtbot, lib):
    p = ModelsPanel(lib, DropInstaller(lib, hash_files=False))
    qtbot.addWidget(p)
    yield p
    p.installer.wait()


def mime_for(*paths: str) -> QMimeData:
    m = QMimeData()
    m.setUrls([QUrl(p) if "://" in p else QUrl.fromLocalFile(p) for p in paths])
    return m


def test_panel_lists_added_models_grouped_by_kind(panel, lib, tmp_path):
    lib.add(model(tmp_path / "flux.safetensors", "flux_dev"))
    lib.add(model(tmp_path / "style.safetensors", "lora_kohya_sdxl"))
    lib.add(model(tmp_path / "clip.safetensors", "clip_l"))
    panel.refresh()
    rows = {r["Name"]: r for r in panel.rows()}
    assert set(rows) == {"flux", "style", "clip"}
    assert (rows["flux"]["Family"], rows["flux"]["Variant"], rows["flux"]["Role"]) == ("flux", "dev",
                                                                                       "diffusion model")
    assert rows["style"]["Location"] == "disk" and rows["style"]["Size"].endswith("KiB")
    groups = [panel.proxy.index(g, 0).data() for g in range(panel.proxy.rowCount())]
    assert groups == ["Diffusion models", "Text encoders", "LoRAs"]


def test_search_filters_rows_by_any_column(panel, lib, tmp_path):
    lib.add(model(tmp_path / "a.safetensors", "flux_dev"))
    lib.add(model(tmp_path / "b.safetensors", "sd15_ldm"))
    lib.add(model(tmp_path / "c.safetensors", "lora_kohya_flux"))
    panel.refresh()
    panel.search.setText("flux")
    assert sorted(r["Name"] for r in panel.rows()) == ["a", "c"]
    panel.search.setText("flux lora")
    assert [r["Name"] for r in panel.rows()] == ["c"]
    panel.search.setText("")
    assert len(panel.rows()) == 3


def test_accepts_drop_keeps_only_local_existing_paths(tmp_path):
    f = model(tmp_path / "x.safetensors", "vae_sd")
    assert accepts_drop(mime_for(str(f), "https://example.com/model.safetensors", str(tmp_path / "nope"),
                                 str(tmp_path))) == [str(f), str(tmp_path)]
    text_only = QMimeData()
    text_only.setText("hello")
    assert accepts_drop(text_only) == []


def test_drop_installer_installs_in_a_worker_and_emits_finished(qtbot, lib, tmp_path, monkeypatch):
    gate = threading.Event()
    real_detect = models_panel.detect
    threads = []

    def slow_detect(path):
        threads.append(threading.get_ident())
        gate.wait(10)
        return real_detect(path)
    monkeypatch.setattr(models_panel, "detect", slow_detect)
    inst = DropInstaller(lib, hash_files=False)
    done = []
    inst.finished.connect(lambda p, d: done.append((p, d)))
    f = model(tmp_path / "sdxl.safetensors", "sdxl_base_ldm")
    with qtbot.waitSignal(inst.started, timeout=5000):
        inst.install([str(f)])
    assert done == []  # install() returned while the worker is still reading the header
    with qtbot.waitSignal(inst.finished, timeout=10000) as blocker:
        gate.set()
    path, result = blocker.args
    assert path == str(f) and result["detection"]["family"] == "sdxl" and result["entry"]["name"] == "sdxl"
    assert threads and threads[0] != threading.get_ident()
    assert lib.get("sdxl").role == "checkpoint"
    inst.wait()


def test_dropping_files_on_the_panel_highlights_installs_and_shows_cards(qtbot, panel, lib, tmp_path):
    a = model(tmp_path / "drop" / "wan.safetensors", "wan_t2v_1_3b")
    b = smollm2_gguf()
    mime = mime_for(str(a), str(b))
    enter = QDragEnterEvent(QPoint(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    panel.dragEnterEvent(enter)
    assert enter.isAccepted() and panel.property("dropTarget") is True
    drop = QDropEvent(QPoint(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    with qtbot.waitSignals([panel.installer.finished, panel.installer.finished], timeout=10000):
        panel.dropEvent(drop)
    assert panel.property("dropTarget") is False
    qtbot.waitUntil(lambda: len(panel.rows()) == 2, timeout=5000)
    names = {r["Name"]: r["Family"] for r in panel.rows()}
    assert names == {"wan": "wan", "SmolLM2-135M-Instruct.Q4_1": "llama"}
    card = panel.card(str(b))
    assert card.state == "done" and card.bar.value() == 1000 and "llama" in card.status.text()
    # in place: the dropped file was not copied
    assert lib.get("wan").path == a.resolve() and lib.get("wan").mode == "inplace"


def test_drag_of_web_urls_is_not_accepted(qtbot, panel):
    mime = mime_for("https://example.com/x.safetensors")
    enter = QDragEnterEvent(QPoint(1, 1), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    enter.setAccepted(False)
    panel.dragEnterEvent(enter)
    assert not enter.isAccepted() and not panel.property("dropTarget")


def test_dropping_a_folder_of_models_installs_each(qtbot, panel, lib, tmp_path):
    folder = tmp_path / "loras"
    model(folder / "one.safetensors", "lora_kohya_sd15")
    model(folder / "two.safetensors", "lora_peft_flux")
    with qtbot.waitSignals([panel.installer.finished] * 2, timeout=10000):
        panel.installer.install([str(folder)])
    assert sorted(e.name for e in lib.list(role="lora")) == ["one", "two"]


def test_bad_files_and_empty_folders_fail_with_a_message_and_change_nothing(qtbot, panel, lib, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with qtbot.waitSignal(panel.installer.failed, timeout=5000) as blocker:
        panel.installer.install([str(bad)])
    assert "not valid JSON" in blocker.args[1]
    (tmp_path / "empty").mkdir()
    with qtbot.waitSignal(panel.installer.failed, timeout=5000) as blocker:
        panel.installer.install([str(tmp_path / "empty")])
    assert "no model in this folder" in blocker.args[1]
    assert lib.list() == []
    assert panel.card(str(bad)).state == "failed"


def test_installer_hashes_after_install(qtbot, lib, tmp_path):
    inst = DropInstaller(lib, hash_files=True)
    f = write_safetensors(tmp_path / "v.safetensors", {"encoder.conv_in.weight": (8, 3, 3, 3),
                                                       "encoder.conv_out.weight": (8, 8, 3, 3),
                                                       "decoder.conv_out.weight": (3, 8, 3, 3)})
    with qtbot.waitSignal(inst.hashed, timeout=10000) as blocker:
        inst.install([str(f)])
    import hashlib
    assert blocker.args[1] == hashlib.sha256(f.read_bytes()).hexdigest() == lib.get("v").sha256
    inst.wait()


def test_use_reveal_remove_and_override_family_actions(qtbot, panel, lib, tmp_path, monkeypatch):
    f = model(tmp_path / "m" / "base.safetensors", "sdxl_base_ldm")
    lib.add(f)
    panel.refresh()
    assert panel.select("base")
    with qtbot.waitSignal(panel.use_model) as blocker:
        panel.use_button.click()
    assert blocker.args == [str(f.resolve()), "checkpoint"]

    opened = []
    monkeypatch.setattr(models_panel.QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile()))
    panel.reveal_button.click()
    assert opened == [str(f.resolve().parent)]

    panel.override_family("base", "sd2")
    assert panel.rows()[0]["Family"] == "sd2 (set)" and lib.get("base").effective_family == "sd2"

    monkeypatch.setattr(models_panel.QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    panel.select("base")
    panel.remove_button.click()
    assert panel.rows() == [] and lib.list() == [] and f.exists()


def test_set_loaded_shows_where_each_model_lives(panel, lib, tmp_path):
    lib.add(model(tmp_path / "a.safetensors", "flux_dev"))
    lib.add(model(tmp_path / "b.safetensors", "vae_flux"))
    panel.set_loaded({"a": "VRAM"})
    assert {r["Name"]: r["Location"] for r in panel.rows()} == {"a": "VRAM", "b": "disk"}


def test_panel_module_does_not_import_torch():
    import subprocess
    import sys
    code = ("import os; os.environ['QT_QPA_PLATFORM']='offscreen'; import sys; import studio.ui.models_panel, "
            "studio.library.scan, studio.cli.models; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr


def test_stop_abandons_hashing_quietly_so_the_window_can_close(qtbot, lib, tmp_path):
    import time
    inst = DropInstaller(lib, hash_files=True)
    failed = []
    inst.failed.connect(lambda p, m: failed.append(m))
    big = write_safetensors(tmp_path / "big.safetensors", {**SAFETENSORS_CASES["vae_sd"][0], "x": (40000, 40000)})
    with qtbot.waitSignal(inst.finished, timeout=10000):
        inst.install([str(big)])  # 3.2 GB declared: hashing it takes seconds
    t = time.perf_counter()
    assert inst.stop(wait_ms=5000)
    assert time.perf_counter() - t < 2.0
    qtbot.wait(50)
    assert failed == [] and lib.get("big").sha256 is None


def test_install_card_says_when_a_dropped_file_duplicates_an_installed_one(qtbot, lib, tmp_path):
    shapes = {"encoder.conv_in.weight": (8, 3, 3, 3), "encoder.conv_out.weight": (8, 8, 3, 3),
              "decoder.conv_out.weight": (3, 8, 3, 3)}
    a = write_safetensors(tmp_path / "a" / "vae.safetensors", shapes)
    b = write_safetensors(tmp_path / "b" / "vae-copy.safetensors", shapes)
    p = ModelsPanel(lib, DropInstaller(lib, hash_files=True))
    qtbot.addWidget(p)
    with qtbot.waitSignals([p.installer.hashed, p.installer.hashed], timeout=10000):
        p.installer.install([str(a), str(b)])
    assert "Same file as “vae”" in p.card(str(b)).status.text()
    p.installer.wait()
