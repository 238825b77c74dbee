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
        self.body.setFixedWidth(600)  # a wrapped label in a centred layout otherwise shrinks to a sliver and clips
        layout.addWidget(self.title)
        middle = QHBoxLayout()
        middle.addStretch()
        middle.addWidget(self.body)
        middle.addStretch()
        layout.addLayout(middle)
        layout.addSpacing(10)
        row = QHBoxLayout()
        row.addStretch()
        self.retry_button = QPushButton("Try again")
        self.move_button = QPushButton("Move the file aside and start a new history")
        row.addWidget(self.retry_button)
        row.addWidget(self.move_button)
        row.addStretch()
        layout.addLayout(row)
        layout.addStretch()

    def set_text(self, title: str, body: str) -> None:
        self.title.setText(title)
        self.body.setText(body)
        self.body.setFixedHeight(self.body.heightForWidth(self.body.width()))

    def show_store_error(self, kind: str, message: str) -> None:
        """A ChatStoreError's kind and message as a title, an explanation and the buttons that apply."""
        titles = {"corrupt": "The chat history cannot be read", "locked": "The chat history is in use",
                  "newer": "The chat history is from a newer Studio"}
        body = message
        if kind == "corrupt":
            body += ("\n\nYou can keep it for recovery: “Move the file aside” renames it with today's date "
                     "(nothing is deleted) and starts an empty history in its place.")
        self.set_text(titles.get(kind, "The chat history cannot be opened"), body)
        self.move_button.setVisible(kind == "corrupt")
