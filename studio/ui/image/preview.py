"""The big picture area: live previews while sampling, progress with ETA, errors with Retry."""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import QRectF, QSize, Qt, Signal
from PySide6.QtGui import QImage, QPainter, QPaintEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QStackedLayout,
    QVBoxLayout,
    QWidget,
)

from studio.ui.image.options import runnable_image_families

STAGES = {"loading": "Loading the model", "encoding": "Encoding the prompt", "sampling": "Sampling",
          "decoding": "Decoding"}


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressClock:
    """Steps per second within a stage, and so the time left in it.

    The rate is measured from the first step seen in the stage, not from the job start, so the
    model loading time does not make the sampling ETA look slow.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.stage = ""
        self.t0 = 0.0
        self.s0 = 0

    def update(self, stage: str, step: int, total: int) -> str:
        now = self.clock()
        if stage != self.stage or step < self.s0:
            self.stage, self.t0, self.s0 = stage, now, step
        label = STAGES.get(stage, stage.capitalize())
        text = f"{label} {step}/{total}" if total > 1 else f"{label}…"
        if step > self.s0 and total > step:
            rate = (now - self.t0) / (step - self.s0)
            text += f" · about {format_seconds(rate * (total - step))} left"
        return text


class ImageView(QWidget):
    """An image scaled to fit, centred, never upscaled past 2x (small previews stay readable)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image: QImage | None = None
        self.logical: QSize | None = None  # the size the image stands for (a preview is smaller than the result)
        self.placeholder = "Your images appear here"
        self.setMinimumSize(200, 160)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt override)
        return QSize(640, 480)

    def set_image(self, image: QImage | None, logical: QSize | None = None) -> None:
        self.image = image if image is not None and not image.isNull() else None
        self.logical = logical if logical is not None and not logical.isEmpty() else None
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        p = QPainter(self)
        if self.image is None:
            p.setPen(self.palette().placeholderText().color())
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, self.placeholder)
            return
        # A latent preview (1/8 of the size) is drawn as big as the final image will be, so the
        # picture does not jump in size when the result replaces it.
        size = self.logical or self.image.size()
        w, h = size.width(), size.height()
        scale = min(self.width() / w, self.height() / h, 2.0)
        r = QRectF((self.width() - w * scale) / 2, (self.height() - h * scale) / 2, w * scale, h * scale)
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        p.drawImage(r, self.image)


class EmptyPanel(QFrame):
    """What to do first when no image model is installed."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ImageEmpty")
        title = QLabel("No image model yet")
        title.setObjectName("EmptyTitle")
        body = QLabel(f"Drop a {runnable_image_families()} model (.safetensors, .gguf or a diffusers folder) on "
                      "this window to install it, or get one with Download… in the Models panel (View > Models).\n\nIt stays where it is on disk; Studio only remembers where it lives. "
                      "Images you make here also open in A1111 and ComfyUI, and dropping one of theirs "
                      "on this tab loads its settings.")
        body.setObjectName("EmptyBody")
        body.setWordWrap(True)
        for label in (title, body):
            label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.body = body
        layout = QVBoxLayout(self)
        layout.addStretch()
        layout.addWidget(title)
        layout.addSpacing(8)
        layout.addWidget(body)
        layout.addStretch()
        layout.setContentsMargins(40, 20, 40, 20)


class PreviewPanel(QWidget):
    retry = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.view = ImageView()
        self.empty = EmptyPanel()
        self.stack = QStackedLayout()
        self.stack.addWidget(self.view)
        self.stack.addWidget(self.empty)
        self.clock = ProgressClock()

        self.progress = QProgressBar()
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(6)
        self.status_label = QLabel("")
        self.status_label.setObjectName("ImageStatus")

        self.error_frame = QFrame()
        self.error_frame.setObjectName("ImageError")
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.retry_button = QPushButton("Retry")
        self.retry_button.clicked.connect(self.retry)
        row = QHBoxLayout(self.error_frame)
        row.addWidget(self.error_label, 1)
        row.addWidget(self.retry_button, 0, Qt.AlignmentFlag.AlignTop)
        self.error_frame.hide()

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self.stack, 1)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addWidget(self.error_frame)
        self.set_idle("")

    def set_empty(self, empty: bool) -> None:
        """The install hint while there is nothing to show and no model to make anything with."""
        self.stack.setCurrentWidget(self.empty if empty and self.view.image is None else self.view)

    def show_image(self, image: QImage | None, logical: QSize | None = None) -> None:
        self.view.set_image(image, logical)
        self.stack.setCurrentWidget(self.view)

    def start(self, text: str = "Sending to the engine…") -> None:
        self.clock = ProgressClock(self.clock.clock)
        self.error_frame.hide()
        self.progress.setRange(0, 0)  # busy until the first step arrives
        self.progress.show()
        self.status_label.setText(text)

    def set_progress(self, stage: str, step: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(min(step, max(total, 1)))
        self.status_label.setText(self.clock.update(stage, step, total))

    def set_idle(self, text: str) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.hide()
        self.status_label.setText(text)

    def show_error(self, text: str, retry: bool = True) -> None:
        """Inline, beside the picture it concerns; Retry resends the same job (a fix may be outside the app)."""
        self.set_idle("")
        self.error_label.setText(text)
        self.retry_button.setVisible(retry)
        self.error_frame.show()
