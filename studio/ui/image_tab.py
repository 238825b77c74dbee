"""The Image tab: prompts and settings on the left, live preview and results on the right.

State lives in the widgets; a job is one ImageJob built from them. A JobRunner follows it and
reports progress, previews, the result, a failure (an engine crash included) or the cancel.
Nothing here blocks: submit returns at once and thumbnails load in a pool.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QImage, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QLabel,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.library.pngmeta import read_png_parameters
from studio.paths import Paths
from studio.protocol import ImageJob, job_to_dict
from studio.settings import Settings
from studio.ui.cluster_panel import ClusterPanel, ray_available
from studio.ui.image.gallery import Gallery, GalleryItem
from studio.ui.image.mask_canvas import InitImagePanel
from studio.ui.image.options import IMAGE_FAMILIES, read_json, refuse_file_drops, write_json
from studio.ui.image.params import ModelChoice, ParamsPanel
from studio.ui.image.preview import PreviewPanel, format_seconds
from studio.ui.image.prompt_box import PromptEdit, PromptHistory
from studio.ui.image.timing import ImageTiming
from studio.ui.job_runner import FETCH_ACTION, JobRunner, failure_text
from studio.ui.job_widgets import GenerateBar, NaturalHeight, guard_wheel

STATE_FILE = "image_tab.json"
HISTORY_FILE = "image_prompt_history.json"
SOURCES = {"studio": "Studio", "a1111": "A1111", "comfyui": "ComfyUI"}

STYLE = """
QPushButton#GenerateButton { background: #e8704f; color: white; font-weight: 600; padding: 7px 14px;
                             border: none; border-radius: 4px; }
QPushButton#GenerateButton:hover { background: #f0805f; }
QPushButton#GenerateButton:disabled { background: palette(mid); color: palette(base); }
QFrame#ImageError { border: 1px solid #d9534f; border-left: 4px solid #d9534f; border-radius: 4px;
                    background: rgba(217, 83, 79, 30); }
QFrame#ImageEmpty { border: 2px dashed palette(mid); border-radius: 10px; }
QLabel#ImageNotice { color: palette(text); background: rgba(232, 112, 79, 28); border-radius: 4px;
                     padding: 4px 6px; }
QLabel#SectionTitle { font-weight: 600; }
"""


class ImageTab(QWidget):
    png_read = Signal(str, object)  # (path, parameters dict or error text), from the reader thread

    def __init__(self, engine: Any, paths: Paths, settings: Settings, parent: QWidget | None = None,
                 library: Any = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.paths = paths
        self.settings = settings
        self.library = library
        self.state_path = paths.data / STATE_FILE
        self.history = PromptHistory(paths.data / HISTORY_FILE)
        self.runner = JobRunner(engine, self)
        self._installer_hooked = False
        self.png_read.connect(self.load_image_parameters)
        self.setStyleSheet(STYLE)

        self.prompt = PromptEdit(self.history, "prompt", "Describe the picture: subject, style, light…  "
                                 "(↑ for earlier prompts, Ctrl+Enter to generate)")
        self.negative = PromptEdit(self.history, "negative", "Negative prompt: what to keep out")
        self.prompt.setMinimumHeight(70)
        self.prompt.setMaximumHeight(130)  # the settings below need the height more than a long prompt does
        self.negative.setMinimumHeight(40)
        self.negative.setMaximumHeight(64)
        self.buttons = GenerateBar("Stop this image (Esc)")
        self.generate_button = self.buttons.generate_button
        self.cancel_button = self.buttons.cancel_button
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button.clicked.connect(self.cancel)
        self.notice = QLabel()
        self.notice.setObjectName("ImageNotice")
        self.notice.setWordWrap(True)
        self.notice.hide()
        self._notice_timer = QTimer(self)
        self._notice_timer.setSingleShot(True)
        self._notice_timer.timeout.connect(self.notice.hide)

        self.params = ParamsPanel()
        self.init_panel = InitImagePanel()
        self.init_panel.failed.connect(self.show_notice)
        settings_box = NaturalHeight()
        box = QVBoxLayout(settings_box)
        box.setContentsMargins(0, 0, 6, 8)  # the group box frame stays in view when scrolled to the end
        box.addWidget(self.params)
        box.addWidget(self.init_panel)
        # Offered only where Ray is installed; the batch runs in a CLI subprocess, so Ray never loads here.
        self.cluster = ClusterPanel(paths.cache / "cluster") if ray_available() else None
        if self.cluster is not None:
            box.addWidget(self.cluster)
        box.addStretch()
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(settings_box)
        guard_wheel(settings_box)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(8, 8, 4, 8)
        left_layout.addWidget(self.prompt, 2)
        left_layout.addWidget(self.negative, 1)
        left_layout.addWidget(self.buttons)
        left_layout.addWidget(self.notice)
        left_layout.addWidget(self.scroll, 5)
        left.setMinimumWidth(360)

        self.preview = PreviewPanel()
        self.preview.retry.connect(self.retry)
        self.gallery = Gallery()
        self.gallery.selected.connect(self._show_item)
        self.gallery.send_to_img2img.connect(self.send_to_img2img)
        self.gallery.rerun.connect(self.rerun)
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.preview)
        right.addWidget(self.gallery)
        right.setStretchFactor(0, 4)
        right.setStretchFactor(1, 1)
        right.setSizes([560, 190])
        right.setChildrenCollapsible(False)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([400, 880])
        split.setChildrenCollapsible(False)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(split)
        right.setContentsMargins(0, 8, 8, 8)

        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            QShortcut(QKeySequence(keys), self, self.generate, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        QShortcut(QKeySequence("Esc"), self, self.cancel, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        self.setAcceptDrops(True)
        refuse_file_drops(self)
        runner = self.runner
        runner.accepted.connect(self._on_accepted)
        runner.started.connect(lambda: self.preview.status_label.setText("Starting…"))
        runner.progress.connect(lambda step, total, stage: self.preview.set_progress(stage, step, total))
        runner.preview.connect(self._on_preview)
        runner.finished.connect(self._on_result)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(lambda: self._finish("Cancelled."))
        runner.busy_changed.connect(self._set_busy)
        if self.cluster is not None:
            self.cluster.result.connect(self._on_cluster_result)
            self.cluster.status.connect(self.preview.status_label.setText)
            self.cluster.running_changed.connect(self._set_busy)
            self.cluster.finished.connect(self._on_cluster_finished)

        self.timing = ImageTiming(self)  # before load_state: it notes whether the tab was ever used
        self.refresh_models()
        self.load_state()
        self._set_busy(False)
        # Last used values survive a crash too: saved a moment after the user stops changing them.
        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(2000)
        self._save_timer.timeout.connect(self.save_state)
        for signal in (self.params.changed, self.prompt.textChanged, self.negative.textChanged,
                       self.init_panel.changed):
            signal.connect(self._save_timer.start)

    # -- models --------------------------------------------------------------------------------------------
    def refresh_models(self) -> None:
        """Read the library again: models installed since the tab was built appear in the pickers."""
        checkpoints: list[ModelChoice] = []
        vaes: list[ModelChoice] = []
        loras: list[ModelChoice] = []
        if self.library is not None:
            for e in self.library.list(role="checkpoint", include_missing=False):
                if e.effective_family in IMAGE_FAMILIES:
                    checkpoints.append(ModelChoice.from_entry(e))
            # TAESD decodes previews only; it is picked up by the engine, not offered as the VAE.
            vaes = [ModelChoice.from_entry(e) for e in self.library.list(role="vae", include_missing=False)
                    if e.family != "taesd"]
            loras = [ModelChoice.from_entry(e) for e in self.library.list(role="lora", include_missing=False)]
        self.params.set_models(checkpoints, vaes, loras)
        self.preview.set_empty(not checkpoints)
        self._set_busy(self.busy)

    def use_model(self, path: str, role: str) -> None:
        """From the Models panel's "Use": pick a checkpoint or VAE, or stack a LoRA."""
        self.refresh_models()
        if role == "checkpoint":
            self.params.set_model(path)
        elif role == "vae":
            self.params.apply({"vae": path})
        elif role == "lora":
            self.params.add_lora(path)

    def showEvent(self, event) -> None:  # noqa: N802 (Qt override)
        super().showEvent(event)
        self._hook_installer()
        self.refresh_models()

    def _hook_installer(self) -> None:
        """Refresh when the window's installer adds a model, so a dropped checkpoint is ready to use."""
        panel = getattr(self.window(), "models_panel", None)
        installer = getattr(panel, "installer", None)
        if installer is not None and not self._installer_hooked:
            installer.finished.connect(lambda *_: self.refresh_models())
            self._installer_hooked = True

    # -- the job -----------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.runner.busy or (self.cluster is not None and self.cluster.busy)

    @property
    def job_id(self) -> str | None:
        return self.runner.job_id

    @property
    def job(self) -> ImageJob | None:
        """The running job, or the last one (Retry resubmits it)."""
        return self.runner.job

    def build_job(self, roll_seed: bool = True) -> ImageJob:
        """The ImageJob the controls describe. Unlocked, the seed is rolled first (and shown)."""
        values = self.params.values()
        if roll_seed:
            values["seed"] = self.params.next_seed()
        init = self.init_panel
        job = ImageJob(prompt=self.prompt.text().strip(), negative=self.negative.text().strip(), **values)
        if init.path:
            job.init_image = init.path
            job.strength = round(init.strength_spin.value(), 3)
        return job

    def generate(self) -> str | None:
        """Build a job from the controls and submit it; returns its id (None when refused)."""
        if self.busy:
            self.show_notice("An image is already being made: wait for it or press Esc to cancel.")
            return None
        if not self.params.model_path():
            self.preview.show_error("No model chosen. Drop a Stable Diffusion checkpoint (.safetensors) on this "
                                    "window to install one, then pick it under Model.", retry=False)
            return None
        job = self.build_job()
        if self.init_panel.inpainting():
            mask = self.paths.cache / "masks" / f"mask-{uuid.uuid4().hex[:12]}.png"
            try:
                self.init_panel.canvas.save_mask(mask)
            except (OSError, ValueError) as exc:
                self.preview.show_error(f"Could not save the inpainting mask: {exc}", retry=False)
                return None
            job.mask = str(mask)
        self.history.add("prompt", job.prompt)
        self.history.add("negative", job.negative)
        try:
            self.history.save()
        except OSError as exc:
            self.show_notice(f"Prompt history not saved ({exc}).")
        self.save_state()
        if self.cluster is not None and self.cluster.enabled():
            return self._send_to_cluster(job)
        return self.submit(job)

    def submit(self, job: ImageJob) -> str:
        self.preview.start()
        return self.runner.submit(job)

    def retry(self) -> str | None:
        """Send the job that failed again, exactly as it was (same seed)."""
        if self.job is None or self.busy:
            return None
        if self.runner.can_resume:
            self.preview.start("Fetching the result from the remote engine…")
            return self.runner.resume()
        return self.submit(self.job)

    def cancel(self) -> None:
        if self.cluster is not None and self.cluster.busy:
            self.cluster.cancel()
            return
        if self.runner.cancel():
            self.cancel_button.setEnabled(False)
            self.preview.status_label.setText("Cancelling…")

    def _set_busy(self, busy: bool) -> None:
        self.buttons.set_busy(busy or self.busy, bool(self.params.checkpoints),
                              "Install a Stable Diffusion checkpoint first: drop it on this window")

    def _finish(self, text: str) -> None:
        self.preview.set_idle(text)

    # -- Send to cluster ---------------------------------------------------------------------------------------------
    def _send_to_cluster(self, job: ImageJob) -> str | None:
        """The job as a batch on the Ray cluster (prompt list, seed sweep); "cluster" when it started."""
        try:
            self.cluster.run(job)
        except (ValueError, OSError) as exc:
            self.preview.show_error(str(exc), retry=False)
            return None
        self.preview.start("Starting the Ray cluster…")
        return "cluster"

    def _on_cluster_result(self, index: int, result: dict | None, error: str) -> None:
        if result is None:
            self.show_notice(f"Cluster job {index + 1} failed: {error}")
        else:
            self._on_result(result)  # results arrive in the list's order: each goes to the gallery's front
            if self.gallery.items:  # the tab counts as busy until the batch ends, so show the newest here
                self.preview.show_image(QImage(self.gallery.items[0].path))

    def _on_cluster_finished(self, error: str) -> None:
        if error:
            self.preview.show_error(f"Cluster batch: {error}", retry=False)
        else:
            self._finish(self.cluster.progress_label.text())

    # -- the runner's reports -------------------------------------------------------------------------------------
    def _on_accepted(self, ahead: int) -> None:
        if ahead > 0:
            self.preview.status_label.setText(f"Waiting for {ahead} job{'s' if ahead > 1 else ''} ahead in the engine…")

    def _on_preview(self, image: QImage) -> None:
        job = self.job
        self.preview.show_image(image, QSize(job.width, job.height) if job else None)

    def _on_failed(self, kind: str, message: str, engine_restarted: bool) -> None:
        # After a lost link to a remote engine the button fetches the job's result instead of running it again.
        self.preview.retry_button.setText(FETCH_ACTION if self.runner.can_resume else "Retry")
        self.preview.show_error(failure_text(message, engine_restarted, "Retry", kind) + f"  ({kind})")

    def _on_result(self, result: dict) -> None:
        images = [i for i in result.get("images", []) if isinstance(i, dict) and i.get("path")]
        job = result.get("job") if isinstance(result.get("job"), dict) else (job_to_dict(self.job) if self.job else {})
        model = str(result.get("model", ""))
        seconds = float(result.get("seconds", 0.0) or 0.0)
        count = f"{len(images)} image{'s' if len(images) != 1 else ''}"
        took = f"{seconds:.1f} s" if seconds < 60 else format_seconds(seconds)
        self._finish(f"Done: {count} in {took}" if seconds else f"Done: {count}")
        # Add the batch last first so the first image ends up at the front, selected and shown.
        for info in reversed(images):
            self.gallery.add(GalleryItem(str(info["path"]), int(info.get("seed", -1)), int(info.get("width", 0)),
                                         int(info.get("height", 0)), dict(job), model, seconds),
                             select=info is images[0])
        self.save_state()

    def _show_item(self, item: GalleryItem) -> None:
        if self.busy:
            return  # the live preview has the area while a job runs
        image = QImage(item.path)
        if image.isNull():
            self.preview.show_image(None)
            self.preview.view.placeholder = f"{Path(item.path).name} is gone from disk"
        else:
            self.preview.show_image(image)

    # -- gallery actions --------------------------------------------------------------------------------------------------
    def send_to_img2img(self, item: GalleryItem) -> None:
        if self.init_panel.set_image(item.path):
            image = self.init_panel.canvas.image
            self.params.set_size(image.width(), image.height())
            self.scroll.ensureWidgetVisible(self.init_panel)
            self.show_notice(f"{Path(item.path).name} is the image to start from; lower Strength to keep more of it.")

    def rerun(self, item: GalleryItem) -> str | None:
        """Load the image's settings with its seed locked, then generate again.

        When something it used is not installed any more, the controls are filled but nothing is
        sent: the user decides what to use instead rather than getting a different image silently.
        """
        skipped = self.apply_parameters(item.parameters())
        if skipped:
            self.show_notice("Not re-run: " + "; ".join(skipped) + ". Pick a replacement, then Generate.")
            return None
        return None if self.busy else self.generate()

    # -- parameters from images ---------------------------------------------------------------------------------------------
    def apply_parameters(self, params: dict) -> list[str]:
        """Fill the controls from an image's parameters; returns the settings that could not be used."""
        if "prompt" in params:
            self.prompt.set_text(str(params.get("prompt") or ""))
        if "negative" in params:
            self.negative.set_text(str(params.get("negative") or ""))
        skipped = self.params.apply(params)
        if params.get("init_image") and Path(str(params["init_image"])).is_file():
            self.init_panel.set_image(str(params["init_image"]))
        if isinstance(params.get("strength"), (int, float)):
            self.init_panel.strength_spin.setValue(float(params["strength"]))
        return skipped

    def load_image_parameters(self, path: str, params: dict | str | None = None) -> bool:
        """A PNG dropped on the tab: its settings go into the controls. One without any becomes the init image.

        `params` is what a reader thread already got from the file (a dict, or the error text)."""
        name = Path(path).name
        if params is None:
            try:
                params = read_png_parameters(path)
            except ValueError as exc:
                params = str(exc)
        if isinstance(params, str):
            self.show_notice(params)
            return False
        if not params:
            self.init_panel.set_image(path)
            self.show_notice(f"{name} holds no generation settings, so it is now the image to start from.")
            return False
        skipped = self.apply_parameters(params)
        text = f"Loaded the settings of {name} (made with {SOURCES.get(params.get('source'), 'another tool')})."
        if skipped:
            text += " Not used: " + "; ".join(skipped) + "."
        self.show_notice(text)
        return True

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt override)
        # Only a single PNG is ours; anything else (model files) goes on to the window's installer.
        if self._dropped_png(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:  # noqa: N802
        path = self._dropped_png(event.mimeData())
        if path is None:
            event.ignore()
            return
        event.acceptProposedAction()
        # A crafted PNG can take long to parse: read it off the GUI thread so the window keeps responding.
        threading.Thread(target=self._read_png, args=(path,), name="png-parameters", daemon=True).start()

    def _read_png(self, path: str) -> None:
        try:
            params: dict | str = read_png_parameters(path)
        except ValueError as exc:
            params = str(exc)
        try:
            self.png_read.emit(path, params)  # queued to the GUI thread
        except RuntimeError:  # the tab was closed meanwhile
            pass

    @staticmethod
    def _dropped_png(mime) -> str | None:
        urls = mime.urls() if mime.hasUrls() else []
        if len(urls) == 1 and urls[0].isLocalFile() and urls[0].toLocalFile().lower().endswith(".png"):
            return urls[0].toLocalFile()
        return None

    def show_notice(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.show()
        self._notice_timer.start(15000)

    # -- persistence -----------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"prompt": self.prompt.text(), "negative": self.negative.text(), **self.params.values(),
                "seed_locked": self.params.lock_check.isChecked(),
                "strength": round(self.init_panel.strength_spin.value(), 3),
                "gallery": [i.to_json() for i in reversed(self.gallery.items)]}

    def save_state(self) -> None:
        try:
            write_json(self.state_path, self.state())
        except OSError as exc:
            self.show_notice(f"Could not save the Image tab's settings to {self.state_path} ({exc}).")

    def load_state(self) -> None:
        state = read_json(self.state_path, {})
        if not isinstance(state, dict) or not state:
            return
        try:
            self.apply_parameters({k: v for k, v in state.items() if k not in ("gallery", "seed", "init_image")})
            if isinstance(state.get("seed"), int):
                self.params.set_seed(state["seed"], lock=bool(state.get("seed_locked", False)))
        except (TypeError, ValueError) as exc:  # a hand-edited file with odd values: keep the defaults
            self.show_notice(f"Some saved Image tab settings were ignored ({exc}).")
        for info in state.get("gallery", []) if isinstance(state.get("gallery"), list) else []:
            if isinstance(info, dict) and isinstance(info.get("path"), str) and Path(info["path"]).is_file():
                self.gallery.add(GalleryItem(info["path"], int(info.get("seed", -1)), int(info.get("width", 0)),
                                             int(info.get("height", 0)), None, str(info.get("model", "")),
                                             float(info.get("seconds", 0.0))), select=False)

    def shutdown(self) -> None:
        """Called by the window on close: remember the settings, stop loading thumbnails."""
        self._save_timer.stop()
        self.save_state()
        self.gallery.shutdown()
