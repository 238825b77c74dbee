"""Shown instead of the chat when its database cannot be opened: what happened and what the user can do."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget


class ProblemPage(QWidget):
    """What the tab shows when the chat database cannot be opened: what happened, what to do."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.addStretch()
        self.title = QLabel()
        self.title.setObjectName("EmptyTitle")
        self.title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.body = QLabel()
        self.body.setWordWrap(True)
        self.body.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.body.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.body.setMaximumWidth(640)
        layout.addWidget(self.title)
        layout.addWidget(self.body, 0, Qt.AlignmentFlag.AlignHCenter)
        row = QHBoxLayout()
        row.addStretch()
        self.retry_button = QPushButton("Try again")
        self.move_button = QPushButton("Move the file aside and start a new history")
        row.addWidget(self.retry_button)
        row.addWidget(self.move_button)
        row.addStretch()
        layout.addLayout(row)
        layout.addStretch()
