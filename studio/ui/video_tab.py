"""The Video tab: Wan settings on the left; live preview, player and gallery of past videos on the right.

A job is one VideoJob built from the widgets; a JobRunner follows it and reports progress, previews,
the result, a failure (an engine crash included) or the cancel.

The player (video_player.py) decodes the MP4 with OpenCV in a worker thread and shows the frames
on a timer: play, pause, scrub, loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QImage, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio import families
from studio.paths import Paths
from studio.protocol import VideoJob, job_to_dict
from studio.settings import Settings
from studio.ui.cluster_panel import ClusterPanel, ray_available
from studio.ui.image.preview import ImageView, ProgressClock, format_seconds
from studio.ui.job_runner import FETCH_ACTION, JobRunner, failure_text
from studio.ui.job_widgets import GenerateBar, NaturalHeight, SeedField, guard_wheel
from studio.ui.video_choices import PRESETS, Choice, library_choices, nearest_4n1, presets_for
from studio.ui.video_player import VideoPlayer, thumbnail

GALLERY_FILE = "video_gallery.json"
NO_MODEL = ("No Wan model installed yet. Drop a Wan 2.1 / 2.2 transformer (.safetensors) or a diffusers Wan "
            "folder on this window, with its VAE and umT5 text encoder. Video wants a GPU with 8 GiB or more.")
STATE_FILE = "video_tab.json"
SAMPLERS = families.FLOW_SAMPLERS


# ---------------------------------------------------------------------------------- the tab

class VideoTab(QWidget):
    def __init__(self, engine: Any, paths: Paths, settings: Settings, parent: QWidget | None = None,
                 library: Any = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.paths = paths
        self.settings = settings
        self.library = library
        self.runner = JobRunner(engine, self)
        self.clock = ProgressClock()
        self.gallery_path = paths.data / GALLERY_FILE
        self.past: list[dict] = []  # {"path": str, "job": dict}, newest first

        # -- settings column ------------------------------------------------------------------------
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Describe the video: subject, motion, camera, light…  (Ctrl+Enter to generate)")
        self.prompt.setMaximumHeight(110)
        self.negative = QPlainTextEdit()
        self.negative.setPlaceholderText("Negative prompt: what to keep out (blur, static, distortion…)")
        self.negative.setMaximumHeight(60)
        self.model = QComboBox()
        self.model.setPlaceholderText("No Wan model installed")
        self.model.currentIndexChanged.connect(self._model_changed)
        self.vae = QComboBox()
        self.text_encoder = QComboBox()
        self.preset = QComboBox()
        self.preset.currentIndexChanged.connect(self._preset_changed)
        self.width_spin = self._spin(16, 4096, 832, 16)
        self.height_spin = self._spin(16, 4096, 480, 16)
        self.frames = self._spin(1, 1001, 81, 4)
        self.frames.editingFinished.connect(lambda: self.frames.setValue(nearest_4n1(self.frames.value())))
        self.fps = self._dspin(1, 120, 16, 1)
        self.duration = QLabel("")
        self.frames.valueChanged.connect(self._update_duration)
        self.fps.valueChanged.connect(self._update_duration)
        self.steps = self._spin(1, 200, 30, 1)
        self.cfg = self._dspin(1, 20, 5.0, 0.5)
        self.shift = self._dspin(0.1, 20, 5.0, 0.5)
        self.sampler = QComboBox()
        self.sampler.addItems(SAMPLERS)
        self.seed = SeedField()
        self.image = QLineEdit()
        self.image.setPlaceholderText("Optional: an image to start from (I2V / TI2V models)")
        # Tool buttons stay narrow, so the path field gets the row's width.
        browse = QToolButton()
        browse.setText("…")
        browse.setToolTip("Choose an image")
        browse.clicked.connect(self._browse_image)
        clear = QToolButton()
        clear.setText("×")
        clear.setToolTip("No init image")
        clear.clicked.connect(self.image.clear)
        image_row = QHBoxLayout()
        image_row.addWidget(self.image, 1)
        image_row.addWidget(browse)
        image_row.addWidget(clear)
        size_row = QHBoxLayout()
        size_row.addWidget(self.width_spin)
        size_row.addWidget(QLabel("×"))
        size_row.addWidget(self.height_spin)
        size_row.addStretch()
        frames_row = QHBoxLayout()
        frames_row.addWidget(self.frames)
        frames_row.addWidget(self.duration, 1)

        form = QFormLayout()
        form.addRow("Model", self.model)
        form.addRow("VAE", self.vae)
        form.addRow("Text encoder", self.text_encoder)
        form.addRow("Resolution", self.preset)
        form.addRow("Size", size_row)
        form.addRow("Frames", frames_row)
        form.addRow("FPS", self.fps)
        form.addRow("Steps", self.steps)
        form.addRow("CFG", self.cfg)
        form.addRow("Shift", self.shift)
        form.addRow("Sampler", self.sampler)
        form.addRow("Seed", self.seed)
        form.addRow("Init image", image_row)

        self.buttons = GenerateBar("Cancel (Esc)")
        self.generate_button = self.buttons.generate_button
        self.cancel_button = self.buttons.cancel_button
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button.clicked.connect(self.cancel)
        self.notice = QLabel("")
        self.notice.setObjectName("VideoNotice")
        self.notice.setWordWrap(True)
        self.notice.hide()

        left_box = NaturalHeight()
        col = QVBoxLayout(left_box)
        col.addWidget(QLabel("Prompt"))
        col.addWidget(self.prompt)
        col.addWidget(QLabel("Negative prompt"))
        col.addWidget(self.negative)
        col.addLayout(form)
        col.addWidget(self.buttons)
        col.addWidget(self.notice)
        # After a lost link to a remote engine: fetch the job's result (kept there a while) instead of rerunning it.
        self.fetch_button = QPushButton(FETCH_ACTION)
        self.fetch_button.hide()
        self.fetch_button.clicked.connect(self.fetch_result)
        col.addWidget(self.fetch_button)
        # Offered only where Ray is installed; the batch runs in a CLI subprocess, so Ray never loads here.
        self.cluster = ClusterPanel(paths.cache / "cluster") if ray_available() else None
        if self.cluster is not None:
            col.addWidget(self.cluster)
        col.addStretch()
        # The column scrolls when the window is short rather than cutting the init image row off.
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(left_box)
        guard_wheel(left_box)
        left = self.scroll

        # -- preview / player / gallery ------------------------------------------------------------------
        self.preview = ImageView()
        self.preview.placeholder = "The middle frame appears here while the video is made"
        self.player = VideoPlayer()
        self.stack = QStackedWidget()
        self.stack.addWidget(self.player)
        self.stack.addWidget(self.preview)
        self.progress = QProgressBar()
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(6)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.gallery = QListWidget()
        self.gallery.setViewMode(QListWidget.ViewMode.IconMode)
        self.gallery.setIconSize(QSize(128, 80))
        self.gallery.setMaximumHeight(130)
        self.gallery.setFlow(QListWidget.Flow.LeftToRight)
        self.gallery.setWrapping(False)
        self.gallery.currentRowChanged.connect(self._show_row)
        self.export_button = QPushButton("Export frames as PNG")
        self.export_button.clicked.connect(self.export_frames)
        self.reuse_button = QPushButton("Use these settings")
        self.reuse_button.clicked.connect(self.reuse_settings)
        self.gallery_hint = QLabel("Finished videos collect here. Click one to play it again.")
        self.gallery_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.gallery_hint.setEnabled(False)
        self.gallery_hint.setMinimumHeight(80)
        actions = QHBoxLayout()
        actions.addStretch()
        actions.addWidget(self.reuse_button)
        actions.addWidget(self.export_button)

        right = QWidget()
        rcol = QVBoxLayout(right)
        rcol.addWidget(self.stack, 1)
        rcol.addWidget(self.progress)
        rcol.addWidget(self.status)
        rcol.addWidget(self.gallery)
        rcol.addWidget(self.gallery_hint)
        rcol.addLayout(actions)

        split = QSplitter()
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        left.setMinimumWidth(360)
        split.setSizes([400, 880])  # a scroll area's own size hint is small: give the settings their width
        layout = QHBoxLayout(self)
        layout.addWidget(split)

        # only while focus is in this tab: Esc in the Chat tab must not cancel a video
        scope = Qt.ShortcutContext.WidgetWithChildrenShortcut
        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            QShortcut(QKeySequence(keys), self, self.generate, context=scope)
        QShortcut(QKeySequence("Esc"), self, self.cancel, context=scope)
        runner = self.runner
        runner.progress.connect(self._on_progress)
        runner.preview.connect(self._on_preview)
        runner.finished.connect(self._on_result)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(self._on_cancelled)
        runner.busy_changed.connect(self._set_busy)
        if self.cluster is not None:
            self.cluster.result.connect(self._on_cluster_result)
            self.cluster.status.connect(self.status.setText)
            self.cluster.running_changed.connect(self._set_busy)
            self.cluster.finished.connect(self._on_cluster_finished)
        self.refresh_models()
        self.load_state()
        self.load_gallery()
        self._update_gallery_state()
        self._update_duration()
        self._set_busy(False)

    @staticmethod
    def _spin(lo: int, hi: int, value: int, step: int) -> QSpinBox:
        s = QSpinBox()
        s.setRange(lo, hi)
        s.setSingleStep(step)
        s.setValue(value)
        return s

    @staticmethod
    def _dspin(lo: float, hi: float, value: float, step: float) -> QDoubleSpinBox:
        s = QDoubleSpinBox()
        s.setRange(lo, hi)
        s.setSingleStep(step)
        s.setDecimals(2)
        s.setValue(value)
        return s

    # -- models ----------------------------------------------------------------------------------------------
    def refresh_models(self) -> None:
        """Wan transformers (files or diffusers folders), Wan VAEs and umT5 encoders from the library."""
        models, vaes, encoders = library_choices(self.library)
        current = self.model_path()
        self.model.blockSignals(True)
        self.model.clear()
        for c in models:
            self.model.addItem(c.label, c)
        self.model.blockSignals(False)
        for combo, items in ((self.vae, vaes), (self.text_encoder, encoders)):
            keep = combo.currentData()
            combo.clear()
            combo.addItem("Automatic (next to the model, or the library)", "")
            for c in items:
                combo.addItem(c.label, c.path)
            combo.setCurrentIndex(max(0, combo.findData(keep)))
        index = next((i for i, c in enumerate(models) if c.path == current), 0)
        self.model.setCurrentIndex(index if models else -1)
        self._model_changed()
        if not models:
            self.show_notice(NO_MODEL)
        elif self.notice.text() == NO_MODEL:
            self.notice.hide()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt override)
        super().showEvent(event)
        self.refresh_models()  # models installed while the tab was hidden appear in the pickers

    def use_model(self, path: str, role: str) -> None:
        """From the Models panel's "Use": pick a Wan transformer, VAE or text encoder."""
        self.refresh_models()
        if role in ("diffusion_model", "checkpoint"):
            index = next((i for i in range(self.model.count()) if self.model.itemData(i).path == path), -1)
            if index >= 0:
                self.model.setCurrentIndex(index)
        else:
            combo = self.vae if role == "vae" else self.text_encoder if role == "text_encoder" else None
            if combo is not None and combo.findData(path) >= 0:
                combo.setCurrentIndex(combo.findData(path))

    def model_path(self) -> str:
        c = self.model.currentData()
        return c.path if isinstance(c, Choice) else ""

    def _model_changed(self, *_: Any) -> None:
        c = self.model.currentData()
        names = presets_for(c.variant if isinstance(c, Choice) else "")
        size = (self.width_spin.value(), self.height_spin.value())
        self.preset.blockSignals(True)
        self.preset.clear()
        for name in names:
            w, h = PRESETS[name]
            self.preset.addItem(f"{name}  ({w}×{h})", name)
        self.preset.addItem("Custom", "")
        match = next((i for i, n in enumerate(names) if PRESETS[n] == size), None)
        self.preset.blockSignals(False)
        self.preset.setCurrentIndex(0 if match is None and self.model.count() else (match or 0))
        self._preset_changed()
        self._set_busy(self.busy)

    def _preset_changed(self, *_: Any) -> None:
        name = self.preset.currentData()
        custom = not name
        self.width_spin.setEnabled(custom)
        self.height_spin.setEnabled(custom)
        if name in PRESETS:
            w, h = PRESETS[name]
            self.width_spin.setValue(w)
            self.height_spin.setValue(h)

    def _update_duration(self, *_: Any) -> None:
        frames = nearest_4n1(self.frames.value())
        self.duration.setText(f"{frames / self.fps.value():.1f} s at {self.fps.value():g} fps")

    def _browse_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Init image", "", "Images (*.png *.jpg *.jpeg *.webp *.bmp)")
        if path:
            self.image.setText(path)

    # -- the job ---------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.runner.busy or (self.cluster is not None and self.cluster.busy)

    @property
    def job_id(self) -> str | None:
        return self.runner.job_id

    @property
    def job(self) -> VideoJob | None:
        return self.runner.job

    def build_job(self) -> VideoJob:
        values = dict(model=self.model_path(), prompt=self.prompt.toPlainText().strip(),
                      negative=self.negative.toPlainText().strip(), width=self.width_spin.value(),
                      height=self.height_spin.value(), frames=nearest_4n1(self.frames.value()),
                      fps=round(self.fps.value(), 3), steps=self.steps.value(), cfg=round(self.cfg.value(), 3),
                      shift=round(self.shift.value(), 3), sampler=self.sampler.currentText(), seed=self.seed.value(),
                      image=self.image.text().strip())
        # explicit VAE / text encoder choices; left empty the engine finds them by their headers
        for name, combo in (("vae", self.vae), ("text_encoder", self.text_encoder)):
            if combo.currentData():
                values[name] = combo.currentData()
        return VideoJob(**values)

    def generate(self) -> str | None:
        if self.busy:
            self.show_notice("A video is being made: wait for it, or press Esc to cancel.")
            return None
        if not self.model_path():
            self.show_notice(NO_MODEL)
            return None
        self.notice.hide()
        self.fetch_button.hide()
        self.preview.set_image(None)
        self.stack.setCurrentWidget(self.preview)
        self.player.stop()
        self.status.setText("Sending to the engine…")
        self.progress.setRange(0, 0)
        if self.cluster is not None and self.cluster.enabled():
            job_id = self._send_to_cluster(self.build_job())
        else:
            job_id = self.runner.submit(self.build_job())
        self.save_state()
        return job_id

    def cancel(self) -> None:
        if self.cluster is not None and self.cluster.busy:
            self.cluster.cancel()
            return
        if self.runner.cancel():
            self.cancel_button.setEnabled(False)
            self.status.setText("Cancelling…")

    def _set_busy(self, busy: bool) -> None:
        self.buttons.set_busy(busy or self.busy, bool(self.model_path()), NO_MODEL)

    def _finish(self, text: str) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status.setText(text)

    def show_notice(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.show()

    # -- the runner's reports -------------------------------------------------------------------------------
    def _on_progress(self, step: int, total: int, stage: str) -> None:
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(min(step, max(1, total)))
        self.status.setText(self.clock.update(stage, step, total))

    def _on_preview(self, image: QImage) -> None:
        job = self.job
        self.preview.set_image(image, QSize(job.width, job.height) if job else None)

    # -- Send to cluster -------------------------------------------------------------------------------
    def _send_to_cluster(self, job: VideoJob) -> str | None:
        """The job as a batch on the Ray cluster (prompt list, seed sweep); "cluster" when it started."""
        try:
            self.cluster.run(job)
        except (ValueError, OSError) as exc:
            self._finish("")
            self.show_notice(str(exc))
            return None
        return "cluster"

    def _on_cluster_result(self, index: int, result: dict | None, error: str) -> None:
        if result is None:
            self.show_notice(f"Cluster job {index + 1} failed: {error}")
        else:
            self._on_result(result)  # in the list's order

    def _on_cluster_finished(self, error: str) -> None:
        self._finish(f"Cluster batch: {error}" if error else self.cluster.progress_label.text())

    def fetch_result(self) -> str | None:
        self.fetch_button.hide()
        if self.runner.can_resume:
            self.status.setText("Fetching the result from the remote engine…")
            self.progress.setRange(0, 0)
        return self.runner.resume()

    def _on_failed(self, kind: str, message: str, engine_restarted: bool) -> None:
        self.fetch_button.setVisible(self.runner.can_resume)
        text = failure_text(message, engine_restarted, kind=kind)
        self._finish(f"Failed: {text}")
        self.show_notice(text)
        self.stack.setCurrentWidget(self.player)

    def _on_cancelled(self) -> None:
        self._finish("Cancelled.")
        self.stack.setCurrentWidget(self.player)

    def _on_result(self, result: dict) -> None:
        videos = [v for v in result.get("videos", []) if isinstance(v, dict) and v.get("path")]
        seconds = float(result.get("seconds", 0.0) or 0.0)
        took = f"{seconds:.1f} s" if seconds < 60 else format_seconds(seconds)
        partial = " (partial: cancelled early)" if result.get("partial") else ""
        self._finish(f"Done in {took}{partial}.")
        notes = [str(n) for n in result.get("notes", [])]
        if notes:
            self.show_notice("\n".join(notes))
        job = result.get("job") if isinstance(result.get("job"), dict) else {}
        for v in videos:
            self.add_to_gallery(str(v["path"]), job)
        self.stack.setCurrentWidget(self.player)
        self.save_gallery()

    # -- gallery -------------------------------------------------------------------------------------------
    def add_to_gallery(self, path: str, job: dict, select: bool = True) -> None:
        self.past.insert(0, {"path": path, "job": job})
        item = QListWidgetItem(Path(path).stem)
        item.setToolTip(f"{path}\n{job.get('prompt', '')}")
        icon = thumbnail(path)
        if icon is not None:
            item.setIcon(icon)
        self.gallery.insertItem(0, item)
        self._update_gallery_state()
        if select:
            self.gallery.setCurrentRow(0)

    def _show_row(self, row: int) -> None:
        if 0 <= row < len(self.past) and not self.busy:
            self.stack.setCurrentWidget(self.player)
            self.player.load(self.past[row]["path"])
        self._update_gallery_state()

    def _update_gallery_state(self) -> None:
        """An empty gallery says what it is for; actions on a video need one chosen."""
        empty = self.gallery.count() == 0
        self.gallery.setVisible(not empty)
        self.gallery_hint.setVisible(empty)
        chosen = self.current_entry() is not None
        self.export_button.setEnabled(chosen)
        self.reuse_button.setEnabled(chosen)

    def current_entry(self) -> dict | None:
        row = self.gallery.currentRow()
        return self.past[row] if 0 <= row < len(self.past) else None

    def export_frames(self) -> list[Path]:
        from studio.media.video import export_video_frames

        entry = self.current_entry()
        if entry is None:
            return []
        video = Path(entry["path"])
        folder = video.with_name(video.stem + "-frames")
        n = 1
        while folder.exists():
            n += 1
            folder = video.with_name(f"{video.stem}-frames-{n}")
        try:
            out = export_video_frames(video, folder)
        except (OSError, ValueError) as exc:
            self.show_notice(f"Could not export the frames: {exc}")
            return []
        self.show_notice(f"{len(out)} frames saved as PNG in {folder}")
        return out

    def reuse_settings(self) -> None:
        entry = self.current_entry()
        if entry is not None:
            self.apply_job(entry["job"])

    def apply_job(self, job: dict) -> None:
        """Put a past job's parameters back in the controls (the seed too, so it can be re-made)."""
        self.prompt.setPlainText(str(job.get("prompt", "")))
        self.negative.setPlainText(str(job.get("negative", "")))
        size = (job.get("width"), job.get("height"))
        preset = next((i for i in range(self.preset.count()) if PRESETS.get(self.preset.itemData(i)) == size), None)
        self.preset.setCurrentIndex(self.preset.count() - 1 if preset is None else preset)  # else custom
        for spin, key in ((self.width_spin, "width"), (self.height_spin, "height"), (self.frames, "frames"),
                          (self.steps, "steps"), (self.seed, "seed")):
            if isinstance(job.get(key), int):
                spin.setValue(job[key])
        for spin, key in ((self.fps, "fps"), (self.cfg, "cfg"), (self.shift, "shift")):
            if isinstance(job.get(key), (int, float)):
                spin.setValue(float(job[key]))
        if job.get("sampler") in SAMPLERS:
            self.sampler.setCurrentText(job["sampler"])
        self.image.setText(str(job.get("image", "")))

    def load_gallery(self) -> None:
        try:
            entries = json.loads(self.gallery_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = []
        for e in reversed(entries if isinstance(entries, list) else []):
            if isinstance(e, dict) and isinstance(e.get("path"), str) and Path(e["path"]).is_file():
                self.add_to_gallery(e["path"], e.get("job") if isinstance(e.get("job"), dict) else {}, select=False)

    def save_gallery(self) -> None:
        try:
            self.gallery_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.gallery_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.past[:500], ensure_ascii=False), encoding="utf-8")
            tmp.replace(self.gallery_path)
        except OSError as exc:
            self.show_notice(f"The gallery list was not saved ({exc}).")

    def save_state(self) -> None:
        """The controls as they were at the last Generate, restored at the next start."""
        try:
            self.paths.data.mkdir(parents=True, exist_ok=True)
            (self.paths.data / STATE_FILE).write_text(json.dumps(job_to_dict(self.build_job())), encoding="utf-8")
        except OSError as exc:
            self.show_notice(f"The tab's settings were not saved ({exc}).")

    def load_state(self) -> None:
        try:
            job = json.loads((self.paths.data / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(job, dict):
            return
        index = next((i for i in range(self.model.count()) if self.model.itemData(i).path == job.get("model")), -1)
        if index >= 0:
            self.model.setCurrentIndex(index)
        self.apply_job({**job, "seed": job.get("seed", -1)})

    def shutdown(self) -> None:
        self.player.stop()

