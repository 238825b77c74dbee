"""The Video tab's player: frames decoded with OpenCV in a worker thread, shown on a timer.

PySide6-Essentials has no QtMultimedia, and a frame player also plays the 'mp4v' files OpenCV
writes where no H.264 encoder exists, which many system players refuse.
"""

from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import QObject, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout, QWidget

from studio.ui.image.preview import ImageView


class FrameLoader(QObject):
    """Decodes a video in a thread; `loaded(path, frames, fps)` arrives on the GUI thread."""

    loaded = Signal(str, list, float)
    failed = Signal(str, str)

    def load(self, path: str) -> None:
        threading.Thread(target=self._work, args=(path,), daemon=True).start()

    def _work(self, path: str) -> None:
        from studio.media.video import read_frames, video_info

        try:
            fps = video_info(path)["fps"] or 16.0
            frames = []
            for rgb in read_frames(path):
                h, w, _ = rgb.shape
                frames.append(QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy())
        except OSError as exc:
            self.failed.emit(path, str(exc))
            return
        self.loaded.emit(path, frames, float(fps))


class VideoPlayer(QWidget):
    """Frames on a timer: play / pause, a scrub slider, loop."""

    frame_changed = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path = ""
        self.frames: list[QImage] = []
        self.fps = 16.0
        self.index = 0
        self.view = ImageView()
        self.view.placeholder = "Your videos play here"
        self.timer = QTimer(self)
        self.timer.timeout.connect(self._tick)
        self.loader = FrameLoader(self)
        self.loader.loaded.connect(self._on_loaded)
        self.loader.failed.connect(lambda p, err: self._set_text(f"Cannot play {Path(p).name}: {err}"))
        self.play_button = QPushButton("Play")
        self.play_button.clicked.connect(self.toggle)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.valueChanged.connect(self.seek)
        self.loop = QCheckBox("Loop")
        self.loop.setChecked(True)
        self.position = QLabel("")
        row = QHBoxLayout()
        for w in (self.play_button, self.slider, self.position, self.loop):
            row.addWidget(w, 1 if w is self.slider else 0)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.view, 1)
        layout.addLayout(row)
        self._set_controls()

    @property
    def playing(self) -> bool:
        return self.timer.isActive()

    def load(self, path: str, autoplay: bool = True) -> None:
        self.stop()
        self.path, self.frames = path, []
        self._autoplay = autoplay
        self._set_text(f"Loading {Path(path).name}…")
        self.loader.load(path)

    def _on_loaded(self, path: str, frames: list, fps: float) -> None:
        if path != self.path:
            return  # a newer load replaced this one
        self.frames, self.fps = frames, fps
        self.slider.setRange(0, max(0, len(frames) - 1))
        self.seek(0)
        self._set_controls()
        if self._autoplay and len(frames) > 1:
            self.play()

    def _set_text(self, text: str) -> None:
        self.view.placeholder = text
        self.view.set_image(None)

    def _set_controls(self) -> None:
        for w in (self.play_button, self.slider, self.loop):
            w.setEnabled(bool(self.frames))

    def play(self) -> None:
        if not self.frames:
            return
        if self.index >= len(self.frames) - 1:
            self.seek(0)
        self.timer.start(max(1, round(1000 / self.fps)))
        self.play_button.setText("Pause")

    def stop(self) -> None:
        self.timer.stop()
        self.play_button.setText("Play")

    def toggle(self) -> None:
        self.stop() if self.playing else self.play()

    def seek(self, index: int) -> None:
        if not self.frames:
            return
        self.index = max(0, min(index, len(self.frames) - 1))
        self.view.set_image(self.frames[self.index])
        if self.slider.value() != self.index:
            self.slider.blockSignals(True)
            self.slider.setValue(self.index)
            self.slider.blockSignals(False)
        self.position.setText(f"{self.index + 1}/{len(self.frames)}")
        self.frame_changed.emit(self.index)

    def _tick(self) -> None:
        if self.index + 1 < len(self.frames):
            self.seek(self.index + 1)
        elif self.loop.isChecked():
            self.seek(0)
        else:
            self.stop()

def thumbnail(path: str) -> QIcon | None:
    """The first frame, small. One frame of an MP4 decodes in milliseconds."""
    from studio.media.video import read_frames

    try:
        rgb = next(read_frames(path), None)
    except OSError:
        return None
    if rgb is None:
        return None
    h, w, _ = rgb.shape
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QIcon(QPixmap.fromImage(image.scaled(QSize(128, 80), Qt.AspectRatioMode.KeepAspectRatio,
                                                Qt.TransformationMode.SmoothTransformation)))
