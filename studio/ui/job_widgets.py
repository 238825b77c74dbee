"""Widgets the generating tabs share: the Generate / Cancel row, the seed field, the settings column."""

from __future__ import annotations

import random

from PySide6.QtCore import QRegularExpression, QSize, Signal
from PySide6.QtGui import QRegularExpressionValidator
from PySide6.QtWidgets import QHBoxLayout, QLineEdit, QPushButton, QToolButton, QWidget

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
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.generate_button, 1)
        row.addWidget(self.cancel_button)

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
