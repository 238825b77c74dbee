"""The Image tab against a scripted mock engine: jobs from the controls, previews, results, drops, persistence."""

from __future__ import annotations

import io
import json
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from library_fixtures import SAFETENSORS_CASES, write_safetensors  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402
from PySide6.QtCore import QMimeData, QObject, QPoint, QPointF, QSize, Qt, QUrl, Signal  # noqa: E402
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QGuiApplication  # noqa: E402
from PySide6.QtWidgets import QWidget  # noqa: E402

from studio.library.library import Library  # noqa: E402
from studio.library.pngmeta import parse_a1111, write_png  # noqa: E402
from studio.paths import Paths  # noqa: E402
from studio.protocol import ImageJob, job_to_dict, make  # noqa: E402
from studio.settings import Settings  # noqa: E402
from studio.ui.image.gallery import GalleryItem  # noqa: E402
from studio.families import FAMILIES, SDXL  # noqa: E402
from studio.ui.image.preview import ProgressClock  # noqa: E402
from studio.ui.image_tab import ImageTab  # noqa: E402


class MockEngine(QObject):
    """Same face as QtEngine for the tab: submit/cancel and a `message` signal we replay messages on."""

    message = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[tuple[str, ImageJob]] = []
        self.cancelled: list[str] = []

    def submit(self, job, job_id=None) -> str:
        job_id = job_id or f"job{len(self.submitted) + 1}"
        self.submitted.append((job_id, job))
        return job_id

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def send(self, type_: str, payloads=None, **fields) -> None:
        self.message.emit(make(type_, payloads, **fields))  # make() validates like the real engine's messages


MODELS = {"sd15": "sd15_ldm", "sd21": "sd21_ldm", "sdxl": "sdxl_base_ldm", "vae": "vae_sd",
          "taesd": "taesd_decoder", "lora15": "lora_kohya_sd15", "loraxl": "lora_kohya_sdxl"}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    lib = Library(root / "library.db", root / "installed")
    for name, case in MODELS.items():
        lib.add(write_safetensors(root / f"{name}.safetensors", SAFETENSORS_CASES[case][0]))
    yield lib
    lib.close()


def make_paths(root) -> Paths:
    return Paths(root / "config", root / "data", root / "cache", root / "logs", root / "models", root / "outputs",
                 root / "run").ensure()


@pytest.fixture
def paths(tmp_path):
    return make_paths(tmp_path)


@pytest.fixture
def engine():
    return MockEngine()


@pytest.fixture
def make_tab(qtbot, engine, paths, library):
    tabs = []

    def make_one(lib=library, eng=engine):
        tab = ImageTab(eng, paths, Settings(), library=lib)
        qtbot.addWidget(tab)
        tab.resize(1200, 800)
        tab.show()
        qtbot.waitExposed(tab)
        tabs.append(tab)
        return tab

    yield make_one
    for tab in tabs:
        tab.gallery.shutdown()


@pytest.fixture
def tab(make_tab):
    return make_tab()


def model_path(library, name: str) -> str:
    return str(library.get(name).path)


def png(path, color=(200, 40, 40), size=(64, 48), text: dict | None = None):
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    Image.new("RGB", size, color).save(path, pnginfo=info)
    return str(path)


def drag_events(path: str):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(path)])
    enter = QDragEnterEvent(QPoint(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    drop = QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    return mime, enter, drop


# ---------------------------------------------------------------------------------------------------------------


def test_job_built_from_the_controls_carries_every_field(tab, engine, library, tmp_path, qtbot):
    p = tab.params
    tab.prompt.set_text("a lighthouse at dusk, (oil painting:1.2)")
    tab.negative.set_text("blurry")
    assert p.set_model(model_path(library, "sdxl"))
    tab.params.apply({"vae": model_path(library, "vae")})
    p.add_lora(model_path(library, "loraxl"), 0.8)
    p.add_lora(model_path(library, "loraxl"), -0.5)
    p.size_combo.setCurrentIndex(p.size_combo.findData("1216x832"))
    p.steps_spin.setValue(12)
    p.cfg_spin.setValue(5.5)
    p.sampler_combo.setCurrentIndex(p.sampler_combo.findData("dpmpp_2m_sde"))
    p.schedule_combo.setCurrentIndex(p.schedule_combo.findData("karras"))
    p.set_seed(123456789012, lock=True)
    p.batch_size_spin.setValue(2)
    p.batch_count_spin.setValue(3)
    p.clip_skip_spin.setValue(2)
    p.prediction_combo.setCurrentIndex(p.prediction_combo.findData("v"))
    p.quant_combo.setCurrentIndex(p.quant_combo.findData("int8"))
    init = png(tmp_path / "init.png", size=(80, 60))
    assert tab.init_panel.set_image(init)
    tab.init_panel.strength_spin.setValue(0.6)
    tab.init_panel.inpaint_check.setChecked(True)
    tab.init_panel.brush_spin.setValue(10)
    canvas = tab.init_panel.canvas
    centre = canvas.image_rect().center().toPoint()
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=centre)
    qtbot.mouseMove(canvas, centre + QPoint(20, 0))
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=centre + QPoint(20, 0))

    job_id = tab.generate()
    assert job_id == "job1" and len(engine.submitted) == 1
    job = engine.submitted[0][1]
    assert isinstance(job, ImageJob)
    mask = job.mask
    assert job_to_dict(job) == job_to_dict(ImageJob(
        model=model_path(library, "sdxl"), prompt="a lighthouse at dusk, (oil painting:1.2)", negative="blurry",
        width=1216, height=832, steps=12, cfg=5.5, sampler="dpmpp_2m_sde", schedule="karras", seed=123456789012,
        batch_size=2, batch_count=3, clip_skip=2, vae=model_path(library, "vae"),
        loras=[{"path": model_path(library, "loraxl"), "weight": 0.8},
               {"path": model_path(library, "loraxl"), "weight": -0.5}],
        init_image=str((tmp_path / "init.png").resolve()), strength=0.6, mask=mask, prediction="v", quant="int8"))
    with Image.open(mask) as m:
        assert m.size == (80, 60) and m.mode == "L"
        assert m.getpixel((40, 30)) == 255 and m.getpixel((2, 2)) == 0  # painted stroke vs untouched corner
    assert not tab.generate_button.isEnabled() and tab.cancel_button.isEnabled()


def test_unlocked_seed_is_rolled_and_shown_for_each_job(tab, engine):
    tab.params.set_seed(7, lock=False)
    tab.generate()
    first = engine.submitted[-1][1].seed
    assert str(first) == tab.params.seed_edit.text()
    engine.send("cancelled", job_id="job1")
    tab.generate()
    assert engine.submitted[-1][1].seed == int(tab.params.seed_edit.text())
    assert {first, engine.submitted[-1][1].seed} != {7}


def test_ctrl_enter_generates_and_esc_cancels(tab, engine, qtbot):
    tab.prompt.setFocus()
    qtbot.keyClick(tab.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert [j for j, _ in engine.submitted] == ["job1"]
    assert tab.prompt.text() == ""  # the shortcut did not type a newline
    qtbot.keyClick(tab.prompt, Qt.Key.Key_Escape)
    assert engine.cancelled == ["job1"]
    assert "Cancelling" in tab.preview.status_label.text()
    engine.send("cancelled", job_id="job1")
    assert not tab.busy and tab.generate_button.isEnabled() and "Cancelled" in tab.preview.status_label.text()


def test_previews_and_progress_update_the_preview_area_with_eta(tab, engine):
    now = [100.0]
    tab.preview.clock = ProgressClock(lambda: now[0])
    job_id = tab.generate()
    engine.send("progress", job_id=job_id, step=0, total=1, stage="loading")
    assert "Loading the model" in tab.preview.status_label.text()
    now[0] = 130.0  # loading took 30 s: that must not count against the sampling rate
    engine.send("progress", job_id=job_id, step=1, total=20, stage="sampling")
    now[0] = 132.0
    engine.send("progress", job_id=job_id, step=5, total=20, stage="sampling")
    assert tab.preview.status_label.text() == "Sampling 5/20 · about 8 s left"  # 0.5 s/step, 15 steps left
    assert (tab.preview.progress.value(), tab.preview.progress.maximum()) == (5, 20)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
    engine.send("preview", [buf.getvalue()], job_id=job_id, mime="image/jpeg", width=64, height=48)
    shown = tab.preview.view.image
    assert shown is not None and (shown.width(), shown.height()) == (64, 48)
    c = shown.pixelColor(32, 24)
    assert c.green() > 150 and c.red() < 60
    assert tab.preview.view.logical == QSize(512, 512)  # drawn at the size the result will have
    engine.send("preview", [b"not a jpeg"], job_id=job_id, mime="image/jpeg", width=64, height=48)
    assert tab.preview.view.image is shown  # a broken preview is skipped, the last good one stays
    engine.send("progress", job_id="someone-else", step=9, total=20, stage="sampling")
    assert tab.preview.progress.value() == 5  # other jobs' messages are not ours


def result_images(tmp_path, job: ImageJob, seeds=(11, 12)) -> list[dict]:
    out = []
    for i, seed in enumerate(seeds):
        path = tmp_path / "outputs" / f"img-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, Image.new("RGB", (job.width, job.height), (30 * i, 60, 90)), {**job_to_dict(job), "seed": seed})
        out.append({"path": str(path), "seed": seed, "width": job.width, "height": job.height})
    return out


def finish_with_result(tab, engine, tmp_path, seeds=(11, 12)) -> list[dict]:
    job_id = tab.generate()
    job = engine.submitted[-1][1]
    images = result_images(tmp_path, job, seeds)
    engine.send("result", job_id=job_id, result={"images": images, "seconds": 3.5, "model": "sd15",
                                                 "job": job_to_dict(job)})
    return images


def test_result_appears_in_the_gallery_with_its_parameters(tab, engine, tmp_path, qtbot, monkeypatch):
    tab.prompt.set_text("red fox, snow")
    images = finish_with_result(tab, engine, tmp_path)
    assert not tab.busy and tab.generate_button.isEnabled()
    assert "Done: 2 images in 3.5 s" in tab.preview.status_label.text()
    assert [i.path for i in tab.gallery.items] == [images[0]["path"], images[1]["path"]]
    assert tab.gallery.current().path == images[0]["path"]
    text = tab.gallery.params_text.toPlainText()
    assert "red fox, snow" in text and "Seed: 11" in text and "Model: sd15" in text
    assert (tab.preview.view.image.width(), tab.preview.view.image.height()) == (512, 512)
    tab.gallery.select(1)
    assert "Seed: 12" in tab.gallery.params_text.toPlainText()
    tab.gallery.copy_button.click()
    assert QGuiApplication.clipboard().text().startswith("red fox, snow\n")
    opened = []
    monkeypatch.setattr("studio.ui.image.gallery.QDesktopServices.openUrl", lambda url: opened.append(url))
    tab.gallery.folder_button.click()
    assert opened and opened[0].toLocalFile() == str(tmp_path / "outputs")
    qtbot.waitUntil(lambda: not tab.gallery.list.item(0).icon().isNull(), timeout=5000)  # thumbnail loaded


def test_error_shows_inline_and_retry_resubmits_the_same_job(tab, engine):
    tab.params.set_seed(42, lock=True)
    job_id = tab.generate()
    engine.send("error", job_id=job_id, kind="out_of_memory", message="Not enough GPU memory for 1024x1024.",
                detail="")
    assert tab.preview.error_frame.isVisibleTo(tab)
    assert "Not enough GPU memory" in tab.preview.error_label.text()
    assert not tab.busy and tab.generate_button.isEnabled()
    tab.params.set_seed(99)  # changing the controls afterwards does not change what Retry sends
    tab.preview.retry_button.click()
    assert len(engine.submitted) == 2 and engine.submitted[1][1] is engine.submitted[0][1]
    assert engine.submitted[1][1].seed == 42
    assert not tab.preview.error_frame.isVisibleTo(tab) and tab.busy


def test_generate_without_a_model_says_how_to_get_one(make_tab, engine, tmp_path):
    empty = Library(tmp_path / "empty.db", tmp_path / "m")
    tab = make_tab(lib=empty)
    assert tab.preview.stack.currentWidget() is tab.preview.empty
    body = tab.preview.empty.body.text()
    assert "on this window" in body and "Download" in body
    for family in ("SD 1.x", "SDXL"):  # every family Studio runs is named, from the catalog
        assert family in body
    assert not tab.generate_button.isEnabled()
    assert tab.generate() is None and engine.submitted == []
    assert "No model chosen" in tab.preview.error_label.text() and not tab.preview.retry_button.isVisibleTo(tab)
    empty.close()


def test_rerun_with_this_seed_fills_the_controls_and_generates(tab, engine, tmp_path, library):
    tab.prompt.set_text("castle")
    tab.params.set_model(model_path(library, "sd15"))
    tab.params.steps_spin.setValue(9)
    finish_with_result(tab, engine, tmp_path, seeds=(5001, 5002))
    tab.prompt.set_text("something else")
    tab.params.steps_spin.setValue(30)
    tab.params.set_seed(1, lock=False)
    tab.gallery.select(1)
    tab.gallery.rerun_button.click()
    job = engine.submitted[-1][1]
    assert (job.prompt, job.steps, job.seed) == ("castle", 9, 5002)
    assert tab.prompt.text() == "castle" and tab.params.seed() == 5002 and tab.params.lock_check.isChecked()


def test_send_to_img2img_sets_the_init_image_and_its_size(tab, engine, tmp_path):
    tab.params.set_size(768, 512)
    images = finish_with_result(tab, engine, tmp_path)
    tab.params.set_size(512, 512)
    tab.gallery.send_button.click()
    assert tab.init_panel.path == str(os.path.realpath(images[0]["path"]))
    assert (tab.params.width_spin.value(), tab.params.height_spin.value()) == (768, 512)
    job = tab.build_job()
    assert job.init_image == tab.init_panel.path and job.strength == 0.75 and job.mask == ""


A1111_TEXT = ("masterpiece, a cat in a hat\nNegative prompt: lowres, bad hands\n"
              "Steps: 23, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
              "Size: 512x768, Model hash: abcdef1234, Model: sd15, Clip skip: 2, Version: v1.10.0")
COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 777, "steps": 17, "cfg": 4.0, "sampler_name": "euler_ancestral",
                                               "scheduler": "sgm_uniform", "denoise": 1.0, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a misty forest", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
}


@pytest.mark.parametrize("source", ["a1111", "comfyui", "studio"])
def test_dropping_a_png_loads_its_parameters(qtbot, tab, library, tmp_path, source):
    if source == "a1111":
        path = png(tmp_path / "a.png", text={"parameters": A1111_TEXT})
        want = ("masterpiece, a cat in a hat", "lowres, bad hands", "sd15", 23, 6.5, "dpmpp_2m", "karras",
                3141592653, (512, 768), 2)
    elif source == "comfyui":
        path = png(tmp_path / "c.png", text={"prompt": json.dumps(COMFY_PROMPT)})
        want = ("a misty forest", "text, watermark", "sdxl", 17, 4.0, "euler_a", "sgm_uniform", 777, (832, 1216), 1)
    else:
        job = ImageJob(model=model_path(library, "sd21"), prompt="studio prompt", negative="studio neg", steps=31,
                       cfg=8.0, sampler="heun", schedule="exponential", seed=2024, width=768, height=768, clip_skip=3)
        path = str(tmp_path / "s.png")
        write_png(path, Image.new("RGB", (32, 32)), job_to_dict(job))
        want = ("studio prompt", "studio neg", "sd21", 31, 8.0, "heun", "exponential", 2024, (768, 768), 3)
    mime, enter, drop = drag_events(path)
    tab.dragEnterEvent(enter)
    assert enter.isAccepted()
    tab.dropEvent(drop)
    qtbot.waitUntil(lambda: "Loaded the settings" in tab.notice.text())  # read in a thread
    p = tab.params
    got = (tab.prompt.text(), tab.negative.text(), library.get(p.model().name).name, p.steps_spin.value(),
           p.cfg_spin.value(), p.sampler_combo.currentData(), p.schedule_combo.currentData(), p.seed(),
           (p.width_spin.value(), p.height_spin.value()), p.clip_skip_spin.value())
    assert got == want
    assert p.lock_check.isChecked()
    assert "Loaded the settings" in tab.notice.text()


def test_a_png_without_parameters_becomes_the_init_image(qtbot, tab, tmp_path):
    path = png(tmp_path / "photo.png")
    mime, enter, drop = drag_events(path)
    tab.dragEnterEvent(enter)
    tab.dropEvent(drop)
    qtbot.waitUntil(lambda: bool(tab.init_panel.path))  # read in a thread
    assert tab.init_panel.path == str((tmp_path / "photo.png").resolve())


def test_model_file_drops_are_left_to_the_window(qtbot, engine, paths, library, tmp_path):
    class Window(QWidget):
        def __init__(self) -> None:
            super().__init__()
            self.setAcceptDrops(True)
            self.entered: list[str] = []

        def dragEnterEvent(self, event) -> None:  # noqa: N802
            self.entered.append(event.mimeData().urls()[0].toLocalFile())
            event.acceptProposedAction()

    window = Window()
    qtbot.addWidget(window)
    tab = ImageTab(engine, paths, Settings(), window, library=library)
    model = write_safetensors(tmp_path / "new.safetensors", SAFETENSORS_CASES["sd15_ldm"][0])
    mime, enter, _ = drag_events(str(model))  # the events point at the mime data: keep it alive
    QGuiApplication.sendEvent(tab, enter)
    assert window.entered == [str(model)]  # the tab ignored it; the window (installer) got it
    mime.setText(str(model))  # file managers add the path as text too: text fields must not take it
    QGuiApplication.sendEvent(tab.params.seed_edit, enter)
    QGuiApplication.sendEvent(tab.params.add_lora().weight.lineEdit(), enter)
    assert window.entered == [str(model)] * 3
    mime_png, enter_png, _ = drag_events(png(tmp_path / "x.png"))
    QGuiApplication.sendEvent(tab, enter_png)
    assert enter_png.isAccepted() and window.entered == [str(model)] * 3
    tab.gallery.shutdown()


def test_size_presets_follow_the_model_family(tab, library):
    p = tab.params

    p.set_model(model_path(library, "sd15"))
    assert p.offered_sizes() == [(512, 512), (512, 768), (768, 512)]
    assert (p.width_spin.value(), p.height_spin.value()) == (512, 512)
    p.set_model(model_path(library, "sdxl"))
    assert p.offered_sizes() == list(FAMILIES[SDXL].sizes)
    assert (p.width_spin.value(), p.height_spin.value()) == (1024, 1024)  # 512 is not an SDXL size: moved
    p.add_lora()
    assert p.lora_rows[0].path() == model_path(library, "loraxl")  # only LoRAs made for SDXL are offered
    p.set_model(model_path(library, "sd21"))  # prediction unknown ("v?"): the 768 v-model sizes
    assert p.offered_sizes()[0] == (768, 768) and (p.width_spin.value(), p.height_spin.value()) == (768, 768)
    p.width_spin.setValue(640)
    assert p.size_combo.currentData() == "custom"
    p.width_spin.setValue(643)
    p.width_spin.editingFinished.emit()
    assert p.width_spin.value() == 640  # snapped to a multiple of 8
    vaes = [p.vae_combo.itemData(i) for i in range(p.vae_combo.count())]
    assert vaes == ["", model_path(library, "vae")]  # TAESD is for previews, not offered as the VAE


def test_prompt_history_walks_with_arrow_keys_and_persists(make_tab, engine, qtbot):
    tab = make_tab()
    for text in ("first prompt", "second\nprompt"):
        tab.prompt.set_text(text)
        job_id = tab.generate()
        engine.send("cancelled", job_id=job_id)
    tab.prompt.set_text("draft")
    tab.prompt.setFocus()
    qtbot.keyClick(tab.prompt, Qt.Key.Key_Up)
    assert tab.prompt.text() == "second\nprompt"
    tab.prompt.moveCursor(tab.prompt.textCursor().MoveOperation.Start)
    qtbot.keyClick(tab.prompt, Qt.Key.Key_Up)
    assert tab.prompt.text() == "first prompt"
    qtbot.keyClick(tab.prompt, Qt.Key.Key_Down)
    qtbot.keyClick(tab.prompt, Qt.Key.Key_Down)  # on the last line of the two-line prompt: next entry
    assert tab.prompt.text() == "draft"
    again = make_tab()
    again.prompt.set_text("")
    again.prompt.setFocus()
    qtbot.keyClick(again.prompt, Qt.Key.Key_Up)
    assert again.prompt.text() == "second\nprompt"


def test_settings_persist_across_recreation(make_tab, library, tmp_path, engine):
    tab = make_tab()
    tab.prompt.set_text("kept prompt")
    tab.negative.set_text("kept negative")
    tab.params.set_model(model_path(library, "sdxl"))
    tab.params.set_size(896, 1152)
    tab.params.steps_spin.setValue(33)
    tab.params.cfg_spin.setValue(3.5)
    tab.params.sampler_combo.setCurrentIndex(tab.params.sampler_combo.findData("lcm"))
    tab.params.add_lora(model_path(library, "loraxl"), 0.3)
    tab.params.set_seed(4242, lock=True)
    tab.params.clip_skip_spin.setValue(2)
    images = finish_with_result(tab, engine, tmp_path, seeds=(4242,))
    before = tab.build_job(roll_seed=False)
    tab.shutdown()
    again = make_tab()
    assert job_to_dict(again.build_job(roll_seed=False)) == job_to_dict(before)
    assert again.prompt.text() == "kept prompt" and again.params.lock_check.isChecked()
    assert [i.path for i in again.gallery.items] == [images[0]["path"]]
    again.gallery.select(0)
    assert "Seed: 4242" in again.gallery.params_text.toPlainText()  # read back from the PNG itself


def test_damaged_state_file_is_set_aside(make_tab, paths):
    (paths.data / "image_tab.json").write_text("{not json")
    tab = make_tab()
    assert tab.params.steps_spin.value() == 25
    assert (paths.data / "image_tab.json.broken").exists()


def test_changed_settings_are_saved_without_waiting_for_close(tab, paths, qtbot):
    tab._save_timer.setInterval(20)
    tab.params.steps_spin.setValue(41)
    tab.prompt.set_text("autosaved")
    state = paths.data / "image_tab.json"
    qtbot.waitUntil(lambda: state.exists() and json.loads(state.read_text())["steps"] == 41, timeout=3000)
    assert json.loads(state.read_text())["prompt"] == "autosaved"


def test_a1111_model_hash_finds_a_renamed_model(tab, library):
    entry = library.get("sdxl")
    library.hash_entry(entry.id)
    tab.refresh_models()
    digest = library.get("sdxl").sha256
    tab.params.set_model(model_path(library, "sd15"))
    text = A1111_TEXT.replace("Model hash: abcdef1234, Model: sd15", f"Model hash: {digest[:10]}, Model: renamed")
    skipped = tab.apply_parameters(parse_a1111(text))
    assert skipped == [] and tab.params.model().name == "sdxl"


def test_rerun_of_an_image_whose_model_is_gone_fills_but_does_not_send(tab, engine, tmp_path):
    path = tmp_path / "old.png"
    write_png(path, Image.new("RGB", (32, 32)), job_to_dict(ImageJob(model="/gone/model.safetensors", seed=9)))
    tab.gallery.add(GalleryItem(str(path)))
    tab.gallery.rerun_button.click()
    assert engine.submitted == []
    assert "model.safetensors is not installed" in tab.notice.text()
    assert tab.params.seed() == 9


def test_mask_brush_paints_erases_and_clears(tab, engine, tmp_path):
    assert tab.init_panel.set_image(png(tmp_path / "i.png", size=(100, 100)))
    canvas = tab.init_panel.canvas
    tab.init_panel.inpaint_check.setChecked(True)  # the brush tools are enabled only while painting a mask
    assert tab.init_panel.clear_mask_button.isEnabled()
    canvas.brush = 20
    canvas.stroke(QPointF(50, 50), QPointF(50, 50))
    assert canvas.has_mask()
    tab.init_panel.erase_check.setChecked(True)
    canvas.stroke(QPointF(50, 50), QPointF(50, 50))
    assert not canvas.has_mask()  # erased back to nothing
    tab.init_panel.erase_check.setChecked(False)
    canvas.stroke(QPointF(10, 10), QPointF(90, 90))
    assert canvas.has_mask()
    tab.init_panel.clear_mask_button.click()
    assert not canvas.has_mask() and not tab.init_panel.inpainting()
    tab.generate()
    job = engine.submitted[-1][1]
    assert job.mask == "" and job.init_image  # inpaint on with nothing painted: plain img2img
