"""The init image for img2img, and a canvas to paint the inpainting mask over it."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QImage, QImageReader, QMouseEvent, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_TINT = QColor(232, 112, 79)  # the theme's accent, so the mask reads as "this part changes"


def dropped_image(mime) -> str | None:
    """The one local image file in a drag, if that is what it holds."""
    urls = mime.urls() if mime.hasUrls() else []
    if len(urls) == 1 and urls[0].isLocalFile() and urls[0].toLocalFile().lower().endswith(IMAGE_SUFFIXES):
        return urls[0].toLocalFile()
    return None


class MaskCanvas(QWidget):
    """Shows the init image fitted to the widget; with painting on, strokes mark what to repaint.

    The mask lives at the image's own resolution (white = repaint, black = keep), painted in
    step with a tinted overlay so nothing is recomputed per mouse move.
    """

    image_dropped = Signal(str)
    painted = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image: QImage | None = None
        self.mask: QImage | None = None  # ARGB32, opaque white/black
        self._overlay: QImage | None = None  # ARGB32 premultiplied: tint where masked, clear elsewhere
        self.painting = False
        self.erasing = False
        self.brush = 48  # diameter in image pixels
        self._last: QPointF | None = None
        self._hover: QPointF | None = None
        self.setAcceptDrops(True)
        self.setMouseTracking(True)
        self.setMinimumHeight(150)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt override)
        return QSize(300, 200)

    def set_image(self, image: QImage | None) -> None:
        self.image = image
        if image is None:
            self.mask = self._overlay = None
        else:
            self.mask = QImage(image.size(), QImage.Format.Format_ARGB32)
            self.mask.fill(Qt.GlobalColor.black)
            self._overlay = QImage(image.size(), QImage.Format.Format_ARGB32_Premultiplied)
            self._overlay.fill(Qt.GlobalColor.transparent)
        self.update()

    def clear_mask(self) -> None:
        if self.mask is not None and self._overlay is not None:
            self.mask.fill(Qt.GlobalColor.black)
            self._overlay.fill(Qt.GlobalColor.transparent)
            self.update()
            self.painted.emit()

    def has_mask(self) -> bool:
        if self.mask is None:
            return False
        gray = self.mask.convertToFormat(QImage.Format.Format_Grayscale8)
        # Antialiased erasing can leave faint edge pixels: only what is at least half painted counts.
        return max(memoryview(gray.constBits()).cast("B"), default=0) >= 128

    def save_mask(self, path: Path) -> None:
        if self.mask is None:
            raise ValueError("no init image, so there is no mask to save")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.mask.convertToFormat(QImage.Format.Format_Grayscale8).save(str(path), "PNG"):
            raise OSError(f"could not write the mask to {path}")

    # -- geometry: widget <-> image coordinates ------------------------------------------------------
    def image_rect(self) -> QRectF:
        if self.image is None or self.image.isNull():
            return QRectF()
        w, h = self.image.width(), self.image.height()
        scale = min(self.width() / w, self.height() / h)
        return QRectF((self.width() - w * scale) / 2, (self.height() - h * scale) / 2, w * scale, h * scale)

    def to_image(self, pos: QPointF) -> QPointF:
        r = self.image_rect()
        scale = self.image.width() / r.width() if r.width() else 1.0
        return QPointF((pos.x() - r.x()) * scale, (pos.y() - r.y()) * scale)

    # -- painting -------------------------------------------------------------------------------------
    def stroke(self, a: QPointF, b: QPointF) -> None:
        """Paint (or erase) a line of the brush's width between two image points."""
        if self.mask is None or self._overlay is None:
            return
        for target, color in ((self.mask, QColor(Qt.GlobalColor.black if self.erasing else Qt.GlobalColor.white)),
                              (self._overlay, MASK_TINT)):
            p = QPainter(target)
            p.setRenderHint(QPainter.RenderHint.Antialiasing)
            if target is self._overlay and self.erasing:
                p.setCompositionMode(QPainter.CompositionMode.CompositionMode_Clear)
            else:
                p.setCompositionMode(QPainter.CompositionMode.CompositionMode_Source)
            p.setPen(QPen(color, self.brush, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap,
                          Qt.PenJoinStyle.RoundJoin))
            if a == b:
                p.drawPoint(a)
            else:
                p.drawLine(a, b)
            p.end()
        self.update()
        self.painted.emit()

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 (Qt override)
        if self.painting and self.image is not None and event.button() == Qt.MouseButton.LeftButton:
            self._last = self.to_image(event.position())
            self.stroke(self._last, self._last)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        self._hover = event.position()
        if self._last is not None:
            point = self.to_image(event.position())
            self.stroke(self._last, point)
            self._last = point
        elif self.painting:
            self.update()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        self._last = None

    def leaveEvent(self, event) -> None:  # noqa: N802
        self._hover = None
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        p = QPainter(self)
        p.fillRect(self.rect(), self.palette().base())
        if self.image is None:
            p.setPen(self.palette().placeholderText().color())
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                       "Drop an image here or Browse…\nto start from it (img2img)")
            return
        r = self.image_rect()
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        p.drawImage(r, self.image)
        if self._overlay is not None:
            p.setOpacity(0.55)
            p.drawImage(r, self._overlay)
            p.setOpacity(1.0)
        if self.painting and self._hover is not None and r.width():
            radius = self.brush * r.width() / self.image.width() / 2
            p.setPen(QPen(QColor(255, 255, 255, 200), 1))
            p.drawEllipse(self._hover, radius, radius)
            p.setPen(QPen(QColor(0, 0, 0, 160), 1))
            p.drawEllipse(self._hover, radius + 1, radius + 1)

    def dragEnterEvent(self, event) -> None:  # noqa: N802
        if dropped_image(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:  # noqa: N802
        path = dropped_image(event.mimeData())
        if path:
            event.acceptProposedAction()
            self.image_dropped.emit(path)


class InitImagePanel(QGroupBox):
    """img2img: the starting image and its strength; inpainting: the mask painted over it."""

    changed = Signal()
    failed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Image to image", parent)
        self.path = ""
        self.canvas = MaskCanvas()
        self.canvas.image_dropped.connect(self.set_image)
        self.file_label = QLabel("No image: text to image")
        self.file_label.setEnabled(False)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self.browse)
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.clear)
        # Ignored width: a long file name must not widen the whole settings column.
        self.file_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        buttons = QHBoxLayout()
        buttons.addWidget(browse)
        buttons.addWidget(self.remove_button)
        buttons.addStretch()

        self.strength_spin = QDoubleSpinBox()
        self.strength_spin.setRange(0.0, 1.0)
        self.strength_spin.setSingleStep(0.05)
        self.strength_spin.setValue(0.75)
        self.strength_spin.setToolTip("How much to change the image: 0 keeps it, 1 ignores it")
        self.inpaint_check = QCheckBox("Paint a mask (inpaint only there)")
        self.inpaint_check.toggled.connect(self._on_inpaint)
        self.brush_spin = QSpinBox()
        self.brush_spin.setRange(2, 512)
        self.brush_spin.setValue(self.canvas.brush)
        self.brush_spin.setSuffix(" px")
        self.brush_spin.valueChanged.connect(lambda v: setattr(self.canvas, "brush", v))
        self.erase_check = QCheckBox("Erase")
        self.erase_check.toggled.connect(lambda on: setattr(self.canvas, "erasing", on))
        self.clear_mask_button = QPushButton("Clear mask")
        self.clear_mask_button.clicked.connect(self.canvas.clear_mask)
        brush_row = QHBoxLayout()
        brush_row.addWidget(self.brush_spin, 1)
        brush_row.addWidget(self.erase_check)
        brush_row.addWidget(self.clear_mask_button)
        self.brush_row = QWidget()
        self.brush_row.setLayout(brush_row)
        brush_row.setContentsMargins(0, 0, 0, 0)

        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Strength", self.strength_spin)
        form.addRow("", self.inpaint_check)
        form.addRow("Brush", self.brush_row)
        layout = QVBoxLayout(self)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.file_label)
        layout.addLayout(buttons)
        layout.addLayout(form)
        self.strength_spin.valueChanged.connect(self.changed)
        self._update()

    def set_image(self, path: str) -> bool:
        reader = QImageReader(path)
        reader.setAutoTransform(True)  # phone photos carry their rotation in EXIF
        image = reader.read()
        if image.isNull():
            self.failed.emit(f"Could not open {Path(path).name} as an image ({reader.errorString()}); "
                             "use a PNG, JPEG or WebP file.")
            return False
        self.path = str(Path(path).resolve())
        self.canvas.set_image(image.convertToFormat(QImage.Format.Format_RGB32))
        self.file_label.setText(f"{Path(path).name}  ({image.width()} × {image.height()})")
        self.file_label.setToolTip(self.path)
        self._update()
        self.changed.emit()
        return True

    def clear(self) -> None:
        self.path = ""
        self.canvas.set_image(None)
        self.file_label.setText("No image: text to image")
        self.file_label.setToolTip("")
        self.inpaint_check.setChecked(False)
        self._update()
        self.changed.emit()

    def browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Image to start from", "",
                                              "Images (*.png *.jpg *.jpeg *.webp *.bmp)")
        if path:
            self.set_image(path)

    def inpainting(self) -> bool:
        return bool(self.path) and self.inpaint_check.isChecked() and self.canvas.has_mask()

    def _on_inpaint(self, on: bool) -> None:
        self.canvas.painting = on
        self.canvas.setCursor(Qt.CursorShape.CrossCursor if on else Qt.CursorShape.ArrowCursor)
        self._update()
        self.changed.emit()

    def _update(self) -> None:
        has = bool(self.path)
        self.remove_button.setEnabled(has)
        self.strength_spin.setEnabled(has)
        self.inpaint_check.setEnabled(has)
        self.brush_row.setEnabled(has and self.inpaint_check.isChecked())
