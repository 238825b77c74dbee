"""Results: a strip of thumbnails (loaded off the GUI thread), the chosen one's parameters and actions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, QRunnable, QSize, Qt, QThreadPool, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication, QIcon, QImage, QImageReader, QPainter, QPixmap
from PySide6.QtWidgets import (
    QGridLayout,
    QHBoxLayout,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from studio.library.pngmeta import a1111_parameters, read_png_parameters

THUMB = 112
GALLERY_LIMIT = 200


@dataclass
class GalleryItem:
    path: str
    seed: int = -1
    width: int = 0
    height: int = 0
    job: dict | None = None  # the job as run; read from the PNG when not known
    model: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def parameters(self) -> dict:
        """The job that made this image: from the result, else from the file's own metadata."""
        if self.job is None:
            try:
                self.job = read_png_parameters(self.path)
            except ValueError:
                self.job = {}
        params = dict(self.job)
        if self.seed >= 0:
            params["seed"] = self.seed  # a batch shares one job; each image has its own seed
        if self.width and self.height:
            params["width"], params["height"] = self.width, self.height
        return params

    def infotext(self) -> str:
        """A1111's text form, which A1111, Forge and image sites read back."""
        params = self.parameters()
        return a1111_parameters(params) if params else ""

    def to_json(self) -> dict:
        return {"path": self.path, "seed": self.seed, "width": self.width, "height": self.height,
                "model": self.model, "seconds": self.seconds}


class _Thumbs(QObject):
    loaded = Signal(str, QImage)


class _ThumbJob(QRunnable):
    """Decode at thumbnail size: QImageReader scales while decoding, so a 1536 PNG costs little."""

    def __init__(self, path: str, sink: _Thumbs) -> None:
        super().__init__()
        self.path, self.sink = path, sink

    def run(self) -> None:
        reader = QImageReader(self.path)
        size = reader.size()
        if size.isValid() and max(size.width(), size.height()) > THUMB * 2:
            reader.setScaledSize(size.scaled(QSize(THUMB * 2, THUMB * 2), Qt.AspectRatioMode.KeepAspectRatio))
        image = reader.read()
        if not image.isNull():
            self.sink.loaded.emit(self.path, image)


class _Strip(QListWidget):
    """The thumbnail list, saying what it is for while it is empty."""

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt override)
        super().paintEvent(event)
        if self.count() == 0:
            p = QPainter(self.viewport())
            p.setPen(self.palette().placeholderText().color())
            p.drawText(self.viewport().rect(), Qt.AlignmentFlag.AlignCenter,
                       "Finished images collect here.\nDrop a PNG from Studio, A1111 or ComfyUI\n"
                       "on this tab to load its settings.")


class Gallery(QWidget):
    selected = Signal(object)  # GalleryItem
    send_to_img2img = Signal(object)
    rerun = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.items: list[GalleryItem] = []
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)  # two cores for the whole machine: the engine needs the other
        self._thumbs = _Thumbs(self)
        self._thumbs.loaded.connect(self._set_thumb)

        self.list = _Strip()
        self.list.setViewMode(QListView.ViewMode.IconMode)
        self.list.setFlow(QListView.Flow.LeftToRight)
        self.list.setWrapping(True)
        self.list.setResizeMode(QListView.ResizeMode.Adjust)
        self.list.setMovement(QListView.Movement.Static)
        self.list.setIconSize(QSize(THUMB, THUMB))
        self.list.setGridSize(QSize(THUMB + 10, THUMB + 10))
        self.list.setUniformItemSizes(True)
        self.list.currentRowChanged.connect(self._on_row)

        self.params_text = QPlainTextEdit()
        self.params_text.setReadOnly(True)
        self.params_text.setPlaceholderText("Click an image to see how it was made")
        self.send_button = QPushButton("Send to img2img")
        self.rerun_button = QPushButton("Re-run with this seed")
        self.folder_button = QPushButton("Open folder")
        self.copy_button = QPushButton("Copy parameters")
        self.send_button.clicked.connect(lambda: self._emit(self.send_to_img2img))
        self.rerun_button.clicked.connect(lambda: self._emit(self.rerun))
        self.folder_button.clicked.connect(self.open_folder)
        self.copy_button.clicked.connect(self.copy_parameters)
        buttons = QGridLayout()
        for i, b in enumerate((self.send_button, self.rerun_button, self.folder_button, self.copy_button)):
            buttons.addWidget(b, i // 2, i % 2)
        details = QVBoxLayout()
        details.addWidget(self.params_text, 1)
        details.addLayout(buttons)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.list, 3)
        layout.addLayout(details, 2)
        self._update_buttons()

    def add(self, item: GalleryItem, select: bool = True) -> None:
        """Newest first; the oldest drop off the strip (their files stay on disk)."""
        self.items.insert(0, item)
        row = QListWidgetItem(Path(item.path).name)
        row.setData(Qt.ItemDataRole.UserRole, item.path)
        row.setToolTip(f"{item.path}\nseed {item.seed}" if item.seed >= 0 else item.path)
        row.setSizeHint(QSize(THUMB + 8, THUMB + 8))
        row.setText("")
        self.list.insertItem(0, row)
        while len(self.items) > GALLERY_LIMIT:
            self.items.pop()
            self.list.takeItem(self.list.count() - 1)
        self.pool.start(_ThumbJob(item.path, self._thumbs))
        if select:
            self.list.setCurrentRow(0)

    def current(self) -> GalleryItem | None:
        row = self.list.currentRow()
        return self.items[row] if 0 <= row < len(self.items) else None

    def select(self, row: int) -> None:
        self.list.setCurrentRow(row)

    def _set_thumb(self, path: str, image: QImage) -> None:
        icon = QIcon(QPixmap.fromImage(image))
        for i in range(self.list.count()):
            row = self.list.item(i)
            if row.data(Qt.ItemDataRole.UserRole) == path:
                row.setIcon(icon)

    def _on_row(self, row: int) -> None:
        item = self.current()
        self._update_buttons()
        if item is None:
            self.params_text.clear()
            return
        text = item.infotext() or "This image holds no parameters."
        notes = [f"File: {item.path}"]
        if item.model:
            notes.append(f"Model: {item.model}")
        if item.seconds:
            notes.append(f"Made in {item.seconds:.1f} s")
        self.params_text.setPlainText(text + "\n\n" + "\n".join(notes))
        self.selected.emit(item)

    def _update_buttons(self) -> None:
        has = self.current() is not None
        for b in (self.send_button, self.rerun_button, self.folder_button, self.copy_button):
            b.setEnabled(has)

    def _emit(self, signal) -> None:
        item = self.current()
        if item is not None:
            signal.emit(item)

    def open_folder(self) -> None:
        item = self.current()
        if item is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(Path(item.path).parent)))

    def copy_parameters(self) -> None:
        item = self.current()
        if item is not None:
            QGuiApplication.clipboard().setText(item.infotext())

    def shutdown(self) -> None:
        self.pool.clear()
        self.pool.waitForDone(2000)
