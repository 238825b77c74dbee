"""The Video tab against a scripted mock engine (pytest-qt, offscreen)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")
from PIL import Image  # noqa: E402
from PySide6.QtCore import QObject, Signal  # noqa: E402

from studio import protocol  # noqa: E402
from studio.media.video import write_mp4  # noqa: E402
from studio.paths import Paths  # noqa: E402
from studio.protocol import VideoJob  # noqa: E402
from studio.settings import Settings  # noqa: E402
from studio.ui.video_tab import VideoTab, nearest_4n1, presets_for  # noqa: E402


class MockEngine(QObject):
    """Records submit / cancel; the test replays engine messages through `message`."""

    message = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[tuple[str, VideoJob]] = []
        self.cancelled: list[str] = []

    def submit(self, job, job_id=None) -> str:
        job_id = job_id or f"job{len(self.submitted)}"
        self.submitted.append((job_id, job))
        return job_id

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def send(self, type_: str, payloads=None, **fields) -> None:
        self.message.emit(protocol.make(type_, payloads, **fields))


@dataclass
class Entry:
    name: str
    path: Path
    variant: str
    role: str
    effective_family: str


class FakeLibrary:
    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries

    def list(self, role=None, family=None, include_missing=True):
        return [e for e in self.entries if role is None or e.role == role]


@pytest.fixture
def paths(tmp_path) -> Paths:
    root = tmp_path / "home"
    return Paths(root / "config", root / "data", root / "cache", root / "logs", root / "models", root / "outputs",
                 root / "run")


@pytest.fixture
def library(tmp_path) -> FakeLibrary:
    return FakeLibrary([
        Entry("wan-1.3b", tmp_path / "wan_1.3b.safetensors", "t2v-1.3B", "diffusion_model", "wan"),
        Entry("wan-14b", tmp_path / "wan_14b.safetensors", "t2v-14B", "diffusion_model", "wan"),
        Entry("wan-vae", tmp_path / "wan_2.1_vae.safetensors", "2.1", "vae", "wan-vae"),
        Entry("umt5", tmp_path / "umt5.safetensors", "xxl", "text_encoder", "umt5"),
        Entry("sdxl", tmp_path / "sdxl.safetensors", "base", "checkpoint", "sdxl"),
    ])


@pytest.fixture
def tab(qtbot, paths, library):
    engine = MockEngine()
    t = VideoTab(engine, paths, Settings(), library=library)
    qtbot.addWidget(t)
    t.engine_mock = engine
    return t


def _jpeg(w: int = 40, h: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 80, 20)).save(buf, format="JPEG")
    return buf.getvalue()


def _video(path: Path, frames: int = 9) -> Path:
    arr = np.stack([np.full((32, 48, 3), 20 * i, np.uint8) for i in range(frames)])
    write_mp4(path, arr, fps=8)
    return path


def test_model_pickers_list_only_wan_parts_and_presets_follow_the_model(tab):
    labels = [tab.model.itemText(i) for i in range(tab.model.count())]
    assert len(labels) == 2 and all("wan" in label for label in labels)
    assert tab.vae.count() == 2 and tab.text_encoder.count() == 2  # Automatic + the one installed
    tab.model.setCurrentIndex(0)  # 1.3B: 480p only
    assert [tab.preset.itemData(i) for i in range(tab.preset.count())] == ["480p landscape", "480p portrait", ""]
    assert (tab.width_spin.value(), tab.height_spin.value()) == (832, 480)
    tab.model.setCurrentIndex(1)  # 14B: 480p and 720p
    assert "720p portrait" in [tab.preset.itemData(i) for i in range(tab.preset.count())]
    tab.preset.setCurrentIndex(tab.preset.findData("720p portrait"))
    assert (tab.width_spin.value(), tab.height_spin.value()) == (720, 1280)
    assert not tab.width_spin.isEnabled()
    assert presets_for("2.2-ti2v-5B") == ["704p landscape", "704p portrait"]


def test_the_job_is_built_from_the_controls(tab):
    tab.model.setCurrentIndex(1)
    tab.prompt.setPlainText("  a fox in snow  ")
    tab.negative.setPlainText("blurry")
    tab.preset.setCurrentIndex(tab.preset.findData("480p portrait"))
    tab.frames.setValue(10)
    tab.frames.editingFinished.emit()
    assert tab.frames.value() == nearest_4n1(10) == 9
    tab.fps.setValue(24)
    tab.steps.setValue(12)
    tab.cfg.setValue(6.5)
    tab.shift.setValue(3.0)
    tab.sampler.setCurrentText("euler")
    tab.seed.setValue(42)
    tab.image.setText("/tmp/start.png")
    job_id = tab.generate()
    assert job_id == "job0"
    (_, job), = tab.engine_mock.submitted
    assert job == VideoJob(model=tab.model.currentData().path, prompt="a fox in snow", negative="blurry", width=480,
                           height=832, frames=9, fps=24.0, steps=12, cfg=6.5, shift=3.0, sampler="euler", seed=42,
                           image="/tmp/start.png")
    assert tab.busy and not tab.generate_button.isEnabled() and tab.cancel_button.isEnabled()
    assert tab.generate() is None and len(tab.engine_mock.submitted) == 1  # one at a time


def test_progress_and_previews_update_while_sampling(tab):
    job_id = tab.generate()
    eng = tab.engine_mock
    eng.send("progress", job_id=job_id, step=1, total=4, stage="sampling")
    eng.send("preview", [_jpeg()], job_id=job_id, mime="image/jpeg", width=40, height=24)
    assert tab.stack.currentWidget() is tab.preview
    assert tab.preview.image is not None and tab.preview.image.width() == 40
    assert (tab.progress.value(), tab.progress.maximum()) == (1, 4)
    assert "Sampling 1/4" in tab.status.text()
    eng.send("progress", job_id=job_id, step=2, total=4, stage="sampling")
    assert "left" in tab.status.text()  # an ETA once two steps are seen
    eng.send("progress", job_id="someone-else", step=4, total=4, stage="sampling")
    assert tab.progress.value() == 2  # messages of other jobs are ignored


def test_result_shows_in_the_player_and_gallery_and_plays(tab, qtbot, tmp_path):
    job_id = tab.generate()
    video = _video(tmp_path / "out.mp4")
    tab.engine_mock.send("result", job_id=job_id, result={
        "videos": [{"path": str(video), "frames": 9, "width": 48, "height": 32, "fps": 8.0, "seed": 3}],
        "seconds": 1.5, "notes": ["Wan makes 1 + 4n frames: 10 frames became 9."], "partial": False,
        "job": {"prompt": "a fox", "seed": 3, "width": 48, "height": 32, "frames": 9, "fps": 8.0}})
    assert not tab.busy and tab.generate_button.isEnabled()
    assert tab.gallery.count() == 1 and tab.past[0]["path"] == str(video)
    assert "10 frames became 9" in tab.notice.text()
    assert tab.stack.currentWidget() is tab.player
    player = tab.player
    qtbot.waitUntil(lambda: len(player.frames) == 9, timeout=5000)
    assert player.playing and player.frames[0].size().width() == 48
    player.stop()
    player.slider.setValue(5)  # scrub
    assert player.index == 5 and player.view.image is player.frames[5]
    player.loop.setChecked(False)
    player.seek(8)
    player.play()  # from the end: starts over
    assert player.index == 0
    player.seek(8)
    player._tick()  # last frame without loop: stops
    assert not player.playing
    player.loop.setChecked(True)
    player.play()
    player.seek(8)
    player._tick()
    assert player.index == 0 and player.playing
    player.stop()
    # the gallery survives a restart
    again = VideoTab(MockEngine(), tab.paths, Settings(), library=tab.library)
    qtbot.addWidget(again)
    assert again.gallery.count() == 1 and again.past[0]["job"]["prompt"] == "a fox"


def test_cancel_sends_cancel_and_the_tab_recovers(tab):
    job_id = tab.generate()
    tab.cancel_button.click()
    assert tab.engine_mock.cancelled == [job_id]
    assert "Cancelling" in tab.status.text() and not tab.cancel_button.isEnabled()
    tab.engine_mock.send("cancelled", job_id=job_id)
    assert not tab.busy and tab.generate_button.isEnabled() and tab.status.text() == "Cancelled."


def test_engine_errors_are_shown_and_generate_is_enabled_again(tab):
    job_id = tab.generate()
    tab.engine_mock.send("error", job_id=job_id, kind="bad_input",
                         message="Width 500 is not a multiple of 16: use 496 or 512.", detail="")
    assert not tab.busy and tab.generate_button.isEnabled()
    assert "496 or 512" in tab.notice.text()


def test_export_frames_and_reuse_settings(tab, tmp_path):
    video = _video(tmp_path / "clip.mp4", frames=5)
    tab.add_to_gallery(str(video), {"prompt": "again", "width": 832, "height": 480, "frames": 5, "steps": 7,
                                    "seed": 99, "cfg": 4.0, "sampler": "euler", "fps": 12.0})
    out = tab.export_frames()
    assert len(out) == 5 and out[0].parent == tmp_path / "clip-frames"
    assert len(tab.export_frames()) == 5 and (tmp_path / "clip-frames-2").is_dir()  # never overwrites
    tab.reuse_settings()
    job = tab.build_job()
    assert (job.prompt, job.frames, job.steps, job.seed, job.cfg, job.sampler, job.fps) == \
        ("again", 5, 7, 99, 4.0, "euler", 12.0)
    assert tab.preset.currentData() == "480p landscape"


def test_without_a_wan_model_generate_explains_what_to_install(qtbot, paths):
    t = VideoTab(MockEngine(), paths, Settings(), library=FakeLibrary([]))
    qtbot.addWidget(t)
    assert not t.generate_button.isEnabled()
    assert "Drop a Wan 2.1 / 2.2 transformer" in t.notice.text()  # said before the user tries
    assert t.generate() is None
    assert "Drop a Wan 2.1 / 2.2 transformer" in t.notice.text()
    assert t.gallery_hint.isVisibleTo(t) and not t.export_button.isEnabled()


def test_settings_are_restored_at_the_next_start(tab, qtbot):
    tab.model.setCurrentIndex(1)
    tab.prompt.setPlainText("remember me")
    tab.steps.setValue(17)
    tab.generate()
    saved = json.loads((tab.paths.data / "video_tab.json").read_text())
    assert saved["prompt"] == "remember me"
    again = VideoTab(MockEngine(), tab.paths, Settings(), library=tab.library)
    qtbot.addWidget(again)
    assert again.prompt.toPlainText() == "remember me" and again.steps.value() == 17
    assert again.model_path() == tab.model_path()


def test_models_panel_use_picks_the_model_and_parts(tab, library):
    tab.model.setCurrentIndex(0)
    tab.use_model(str(library.entries[1].path), "diffusion_model")
    assert tab.model_path() == str(library.entries[1].path)
    tab.use_model(str(library.entries[2].path), "vae")
    assert tab.vae.currentData() == str(library.entries[2].path)
    tab.use_model(str(library.entries[3].path), "text_encoder")
    assert tab.text_encoder.currentData() == str(library.entries[3].path)


def test_ctrl_enter_generates_and_escape_cancels(tab, qtbot):
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QApplication

    tab.show()
    tab.activateWindow()  # the shortcuts act only while focus is inside the tab
    qtbot.waitUntil(lambda: QApplication.activeWindow() is tab, timeout=3000)
    tab.prompt.setFocus()
    qtbot.keyClick(tab.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert len(tab.engine_mock.submitted) == 1 and tab.busy
    assert tab.prompt.toPlainText() == ""  # the shortcut took the key; no newline was typed
    qtbot.keyClick(tab.prompt, Qt.Key.Key_Escape)
    assert tab.engine_mock.cancelled == [tab.job_id]
