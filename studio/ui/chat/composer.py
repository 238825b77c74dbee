"""The message input: Enter sends, Shift+Enter starts a new line; grows with its text up to a limit."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QFrame, QPlainTextEdit, QWidget


class Composer(QPlainTextEdit):
    submitted = Signal()

    MIN_LINES, MAX_LINES = 2, 10

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("Composer")
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setPlaceholderText("Message the assistant — Enter sends, Shift+Enter adds a line")
        self.setTabChangesFocus(True)
        self.document().contentsChanged.connect(self._fit)
        self._fit()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 (Qt name)
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            mods = event.modifiers()
            if mods & Qt.KeyboardModifier.ShiftModifier:
                self.insertPlainText("\n")
                return
            if not mods & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier):
                self.submitted.emit()
                return
        super().keyPressEvent(event)

    def _fit(self) -> None:
        line = self.fontMetrics().lineSpacing()
        lines = max(self.MIN_LINES, min(self.MAX_LINES, int(self.document().size().height())))
        margins = self.contentsMargins().top() + self.contentsMargins().bottom()
        self.setFixedHeight(lines * line + 2 * int(self.document().documentMargin()) + margins + 4)
