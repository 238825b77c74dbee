"""Widgets the generating tabs share: the Generate / Cancel row, the seed field, the settings column."""

from __future__ import annotations

import random

from PySide6.QtCore import QEvent, QObject, QPointF, QRegularExpression, QSize, Qt, Signal
from PySide6.QtGui import QRegularExpressionValidator, QWheelEvent
from PySide6.QtWidgets import (
    QAbstractScrollArea,
    QAbstractSpinBox,
    QApplication,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QToolButton,
    QWidget,
)

SEED_MAX = (1 << 64) - 1  # ComfyUI seeds go this high; the engine takes any of them
RANDOM_SEED = -1  # what a job carries when the engine should pick the seed


class NaturalHeight(QWidget):
    """A scroll area's content that scrolls at its natural height instead of being squeezed to its minimum
    (which cut the img2img drop box and the video init image row off at the default window size)."""

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt override)
        return QSize(super().minimumSizeHint().width(), self.sizeHint().height())


class GenerateBar(QWidget):
    """Generate (the tab's primary action) and Cancel; JobRunner.busy_changed drives which is live."""

    def __init__(self, cancel_tip: str = "Cancel (Esc)", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.generate_button = QPushButton("Generate")
        self.generate_button.setObjectName("GenerateButton")  # the accent style of the app's primary action
        self.generate_button.setToolTip("Generate (Ctrl+Enter)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(cancel_tip)
        self.note = QLabel()  # how long the job will take, where the tab knows ("about 40 s")
        self.note.setObjectName("GenerateNote")
        self.note.setWordWrap(True)  # "first run: timing will be measured" takes two short lines, not Generate's room
        self.note.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.note.hide()
        self.generate_button.setMinimumWidth(150)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.generate_button, 1)
        row.addWidget(self.note)
        row.addWidget(self.cancel_button)

    def set_note(self, text: str, tip: str = "") -> None:
        self.note.setText(text)
        self.note.setToolTip(tip)
        self.note.setVisible(bool(text))

    def set_busy(self, busy: bool, can_generate: bool = True, why_not: str = "") -> None:
        self.generate_button.setEnabled(not busy and can_generate)
        self.generate_button.setToolTip("Generate (Ctrl+Enter)" if can_generate or not why_not else why_not)
        self.cancel_button.setEnabled(busy)


class SeedField(QWidget):
    """A seed that is empty ("random") or a number, with a die to roll one. value() is -1 for random."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText("random")
        self.edit.setMinimumWidth(60)
        self.edit.setValidator(QRegularExpressionValidator(QRegularExpression(r"\d{1,20}")))
        self.edit.setToolTip("Empty: a new random seed for every job. The same seed and settings give the same "
                             "result on the same device.")
        self.edit.setClearButtonEnabled(True)
        self.edit.textChanged.connect(self.changed)
        self.dice_button = QToolButton()
        self.dice_button.setText("⚄")  # a die face: in DejaVu, Segoe UI Symbol and Apple Symbols, unlike 🎲
        font = self.dice_button.font()
        font.setPointSizeF(font.pointSizeF() * 1.4)
        self.dice_button.setFont(font)
        self.dice_button.setToolTip("Pick a random seed now (to see it, or keep it)")
        self.dice_button.clicked.connect(self.roll)
        self.row = QHBoxLayout(self)
        self.row.setContentsMargins(0, 0, 0, 0)
        self.row.addWidget(self.edit, 1)
        self.row.addWidget(self.dice_button)

    def value(self) -> int:
        text = self.edit.text().strip()
        return min(int(text), SEED_MAX) if text else RANDOM_SEED

    def setValue(self, seed: int) -> None:  # noqa: N802 (the QSpinBox name it replaces)
        self.edit.setText("" if seed < 0 else str(min(int(seed), SEED_MAX)))

    def roll(self) -> int:
        seed = random.randrange(1 << 32)  # A1111's range, so seeds stay short enough to read out
        self.setValue(seed)
        return seed


class WheelGuard(QObject):
    """In a scrolling settings column the wheel scrolls the column: over a combo or spin box that does not
    have the keyboard focus it is passed on to the scroll area instead of changing the value (a click or
    Tab gives the box focus, and then the wheel changes it as usual).

    The filter sits on every widget under the root, so boxes added later (another LoRA row) are covered:
    each new child is guarded when Qt polishes it."""

    def guard(self, root: QWidget) -> None:
        for widget in (root, *root.findChildren(QWidget)):
            self._watch(widget)

    def _watch(self, widget: QWidget) -> None:
        widget.installEventFilter(self)
        if isinstance(widget, (QComboBox, QAbstractSpinBox)):
            # the wheel must not give focus either, or the second notch would change the value
            widget.setFocusPolicy(Qt.FocusPolicy.StrongFocus)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt override)
        kind = event.type()
        if kind == QEvent.Type.Wheel:
            if isinstance(watched, (QComboBox, QAbstractSpinBox)) and not watched.hasFocus():
                self._pass_on(watched, event)
                return True
        elif kind == QEvent.Type.ChildPolished:
            child = event.child()
            if isinstance(child, QWidget):
                self.guard(child)
        return False

    @staticmethod
    def _pass_on(box: QWidget, event: QWheelEvent) -> None:
        """Give the turn to the scroll area around the box. Sent on explicitly: Qt passes an ignored wheel
        event to the parents only when it came from the system, not when a program (or a test) sent it."""
        area = box.parentWidget()
        while area is not None and not isinstance(area, QAbstractScrollArea):
            area = area.parentWidget()
        if area is None:
            event.ignore()
            return
        viewport = area.viewport()
        pos = QPointF(viewport.mapFromGlobal(event.globalPosition().toPoint()))
        QApplication.sendEvent(viewport, QWheelEvent(pos, event.globalPosition(), event.pixelDelta(),
                                                     event.angleDelta(), event.buttons(), event.modifiers(),
                                                     event.phase(), event.inverted(), event.source()))


def guard_wheel(root: QWidget) -> WheelGuard:
    """Guard every combo and spin box under `root` (a scroll area's content) against stray wheel turns."""
    guard = WheelGuard(root)
    guard.guard(root)
    return guard
