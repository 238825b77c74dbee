"""The middle of the Chat tab: header (title, model, settings), the conversation, notices and the composer.

Widgets only; ChatTab wires them to the store and the engine.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QResizeEvent
from PySide6.QtWidgets import (
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from studio.ui.chat.composer import Composer
from studio.ui.chat.message_view import MessageView


class ElidedLabel(QLabel):
    """A one-line label that shortens its text with "…" (full text in the tooltip) instead of claiming the
    width of the whole text: a long chat title must not squeeze the thread list beside it."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._full = ""
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802 (Qt name)
        self._full = text
        self.setToolTip(text)
        self._elide()

    def text(self) -> str:
        return self._full

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        super().setText(self.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideRight, max(0, self.width())))


def ask_export_path(parent: QWidget, title: str, fmt: str) -> str:
    """The file a chat is exported to ("" when the user cancels), named after the chat."""
    from pathlib import Path

    from PySide6.QtWidgets import QFileDialog

    safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in title).strip() or "chat"
    ext = "md" if fmt == "md" else "json"
    path, _ = QFileDialog.getSaveFileName(parent, "Export chat", str(Path.home() / f"{safe}.{ext}"),
                                          "Markdown (*.md)" if fmt == "md" else "JSON (*.json)")
    return path


class ChatPane(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ChatCenter")
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(0)
        header = QFrame()
        header.setObjectName("ChatHeader")
        hl = QHBoxLayout(header)
        hl.setContentsMargins(16, 8, 12, 8)
        self.title_label = ElidedLabel("New chat")
        self.title_label.setObjectName("ChatTitle")
        hl.addWidget(self.title_label, 1)
        hl.addWidget(QLabel("Model"))
        self.model_combo = QComboBox()
        self.model_combo.setMinimumContentsLength(22)
        self.model_combo.setToolTip("The model that answers in this chat. Add models from the Models panel.")
        hl.addWidget(self.model_combo)
        self.settings_button = QPushButton("Settings")
        self.settings_button.setCheckable(True)
        self.settings_button.setToolTip("System prompt and sampling for this chat")
        hl.addWidget(self.settings_button)
        col.addWidget(header)

        self.view_stack = QStackedWidget()
        self.empty_hint = QLabel("Ask anything.\n\nThe model runs on this computer; nothing you type leaves it.")
        self.empty_hint.setObjectName("EmptyBody")
        self.empty_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_hint.setEnabled(False)
        self.view = MessageView()
        self.view_stack.addWidget(self.empty_hint)
        self.view_stack.addWidget(self.view)
        col.addWidget(self.view_stack, 1)

        self.notice = QFrame()
        self.notice.setObjectName("Notice")
        nl = QHBoxLayout(self.notice)
        nl.setContentsMargins(14, 6, 8, 6)
        self.notice_label = QLabel()
        self.notice_label.setWordWrap(True)
        nl.addWidget(self.notice_label, 1)
        self.undo_button = QPushButton("Undo")
        nl.addWidget(self.undo_button)
        self.close_notice = QPushButton("✕")
        self.close_notice.setFlat(True)
        self.close_notice.setFixedWidth(28)
        nl.addWidget(self.close_notice)
        self.notice.hide()
        col.addWidget(self.notice)

        box = QFrame()
        box.setObjectName("ComposerBox")
        bl = QVBoxLayout(box)
        bl.setContentsMargins(16, 8, 16, 10)
        bl.setSpacing(6)
        row = QHBoxLayout()
        self.input = Composer()
        row.addWidget(self.input, 1)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("SendButton")
        self.send_button.setToolTip("Send (Enter)")
        row.addWidget(self.send_button, 0, Qt.AlignmentFlag.AlignBottom)
        bl.addLayout(row)
        foot = QHBoxLayout()
        self.context_label = QLabel("Context: nothing used yet")
        self.context_label.setObjectName("ContextLabel")
        self.context_bar = QProgressBar()
        self.context_bar.setObjectName("ContextBar")
        self.context_bar.setTextVisible(False)
        self.context_bar.setFixedSize(120, 6)
        self.context_bar.setRange(0, 1)
        self.context_bar.setValue(0)
        foot.addWidget(self.context_label)
        foot.addWidget(self.context_bar)
        foot.addStretch()
        hint = QLabel("Shift+Enter new line · Esc stops · Ctrl+N new chat")
        hint.setObjectName("ContextLabel")
        foot.addWidget(hint)
        bl.addLayout(foot)
        col.addWidget(box)

    def show_context(self, stats: dict | None, streamed: int | None = None) -> None:
        """The footer: the context the last finished answer used (`stats`), plus `streamed` tokens while an
        answer streams (the engine tells the exact prompt size only with the result, so that count is "about")."""
        if stats is None:
            self.context_label.setText(f"Context: answering, {streamed:,} tokens so far" if streamed is not None
                                       else "Context: nothing used yet")
            self.context_bar.setRange(0, 1)
            self.context_bar.setValue(0)
            return
        used, total = stats["prompt_tokens"] + stats["completion_tokens"] + (streamed or 0), stats["context_length"]
        about = "about " if streamed is not None else ""
        self.context_label.setText(f"Context: {about}{used:,} / {total:,} tokens")
        self.context_bar.setRange(0, total)
        self.context_bar.setValue(min(used, total))
        self.context_bar.setToolTip(f"{used / total:.0%} of this model's context is used by this chat")
