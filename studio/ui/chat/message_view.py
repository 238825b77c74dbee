"""The conversation: one bubble per message in a scroll area, with Copy, Edit, Regenerate and inline errors."""

from __future__ import annotations

import math
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (
    QApplication,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.chatstore import ChatMessage
from studio.ui.chat import markdown

ERROR_HINTS = {
    "engine_crashed": "The engine stopped in the middle of this answer; it restarts by itself.",
    "engine_hung": "The engine stopped responding during this answer and was restarted.",
    "engine_stopped": "The engine was shut down during this answer.",
}


def is_dark() -> bool:
    app = QApplication.instance()
    return bool(app is not None and app.property("studio_dark"))


def describe_stats(stats: dict) -> str:
    """The line under an answer: tokens, speed, time to first token, model."""
    if not stats:
        return ""
    parts = []
    if "completion_tokens" in stats:
        parts.append(f"{stats['completion_tokens']} tokens")
    if stats.get("tokens_per_s"):
        parts.append(f"{stats['tokens_per_s']:.1f} tok/s")
    if "ttft_s" in stats:
        parts.append(f"first token {stats['ttft_s'] * 1000:.0f} ms")
    if stats.get("model"):
        parts.append(Path(str(stats["model"])).stem)  # the engine reports a path; the file name says enough
    if stats.get("dropped_turns"):
        parts.append(f"{stats['dropped_turns']} oldest turns left out to fit")
    line = " · ".join(parts)
    notes = [n for n in stats.get("notes") or [] if isinstance(n, str)]  # what loading decided (quantization, context)
    return "\n".join([line, *notes]) if notes else line


class MarkdownView(QTextBrowser):
    """A borderless browser as tall as its content, so the outer scroll area does all the scrolling."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setOpenLinks(False)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        self.viewport().setAutoFillBackground(False)
        self.setStyleSheet("background: transparent")
        self.document().setDocumentMargin(0)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self.anchorClicked.connect(self._on_anchor)
        self.text = ""
        self._rendering = False

    def set_markdown(self, text: str) -> None:
        self.text = text
        # Fitting the height after every inserted block would re-lay out the whole document each time
        # (quadratic: 0.75 s for 23k characters); fit once at the end instead (30 ms).
        self._rendering = True
        try:
            markdown.render(self.document(), text, is_dark())
        finally:
            self._rendering = False
        self._fit()

    def _on_anchor(self, url: QUrl) -> None:
        if url.scheme() == "copy":
            blocks = markdown.code_blocks(self.text)
            i = int(url.path() or 0)
            if 0 <= i < len(blocks):
                QGuiApplication.clipboard().setText(blocks[i])
        elif url.scheme() in ("http", "https"):
            QDesktopServices.openUrl(url)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().resizeEvent(event)
        if event.size().width() != event.oldSize().width():  # a height change (our own fit) needs no relayout
            self.document().setTextWidth(self.viewport().width())
            self._fit()

    def _fit(self, *_: object) -> None:
        if self._rendering:
            return
        h = math.ceil(self.document().size().height()) + 2
        if h != self.height():
            self.setFixedHeight(h)

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(200, self.height())


class MessageBubble(QFrame):
    edit_submitted = Signal(int, str)  # message id, new text
    regenerate = Signal(int)  # message id (an assistant message: answer again from just before it)

    def __init__(self, msg: ChatMessage, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.msg = msg
        self.setObjectName("Bubble")
        self.setProperty("role", msg.role)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(14, 8, 14, 10)
        layout.setSpacing(4)

        head = QHBoxLayout()
        head.setSpacing(2)
        self.who = QLabel("You" if msg.role == "user" else "Assistant")
        self.who.setObjectName("BubbleRole")
        head.addWidget(self.who)
        self.status_label = QLabel()
        self.status_label.setObjectName("BubbleStatus")
        head.addWidget(self.status_label)
        head.addStretch()
        self.copy_button = self._tool("Copy", "Copy the whole message", self.copy_text)
        head.addWidget(self.copy_button)
        self.edit_button = self._tool("Edit", "Edit this message and continue the chat from here", self.start_edit)
        self.regen_button = self._tool("Regenerate", "Answer again (replaces this answer)",
                                       lambda: self.regenerate.emit(self.msg.id))
        head.addWidget(self.edit_button)
        head.addWidget(self.regen_button)
        self.edit_button.setVisible(msg.role == "user")
        self.regen_button.setVisible(False)
        layout.addLayout(head)

        self.body = MarkdownView(self)
        layout.addWidget(self.body)
        self.editor: QPlainTextEdit | None = None
        self.edit_row: QWidget | None = None

        self.error_box = QFrame(self)
        self.error_box.setObjectName("ErrorBox")
        eb = QHBoxLayout(self.error_box)
        eb.setContentsMargins(10, 6, 6, 6)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        eb.addWidget(self.error_label, 1)
        self.retry_button = QPushButton("Retry")
        self.retry_button.clicked.connect(lambda: self.regenerate.emit(self.msg.id))
        eb.addWidget(self.retry_button, 0, Qt.AlignmentFlag.AlignTop)
        layout.addWidget(self.error_box)

        self.stats_label = QLabel()
        self.stats_label.setObjectName("BubbleStats")
        self.stats_label.setWordWrap(True)  # never let a long line widen the bubble past the view
        layout.addWidget(self.stats_label)
        self.update_message(msg)

    def _tool(self, text: str, tip: str, slot) -> QToolButton:
        b = QToolButton(self)
        b.setText(text)
        b.setToolTip(tip)
        b.setAutoRaise(True)
        b.setObjectName("BubbleAction")
        b.clicked.connect(slot)
        return b

    # -- content -----------------------------------------------------------------------------
    def update_message(self, msg: ChatMessage) -> None:
        self.msg = msg
        if msg.content != self.body.text or not msg.content:
            self.body.set_markdown(msg.content)
        self.body.setVisible(bool(msg.content) or msg.status == "streaming")
        self.set_status(msg.status, msg.error)
        self.stats_label.setText(describe_stats(msg.stats) if msg.status == "done" else "")
        self.stats_label.setVisible(bool(self.stats_label.text()))

    def set_streaming_text(self, text: str) -> None:
        self.body.set_markdown(text)
        self.body.setVisible(True)

    def set_status(self, status: str, error: dict) -> None:
        label = {"streaming": "typing…", "stopped": "stopped", "interrupted": "interrupted", "error": ""}.get(status, "")
        self.status_label.setText(label)
        self.status_label.setProperty("status", status)
        self.status_label.setVisible(bool(label))
        show_error = status in ("error", "interrupted") and bool(error)
        if show_error:
            kind = error.get("kind", "")
            text = error.get("message", "")
            # The engine's message already says what happened and what to do; a hint only fills a blank one.
            text = text or ERROR_HINTS.get(kind, "This answer failed.")
            if status == "interrupted" and self.msg.content:
                text += " The text so far is kept."
            self.error_label.setText(text)
            if kind == "context_full":
                self.retry_button.setText("Retry without the oldest turns")
            else:
                self.retry_button.setText("Retry")
        self.error_box.setVisible(show_error)
        self.copy_button.setVisible(bool(self.msg.content))
        self.style().unpolish(self.status_label)
        self.style().polish(self.status_label)

    def set_last_answer(self, last: bool, busy: bool) -> None:
        has_retry = self.msg.status in ("error", "interrupted") and bool(self.msg.error)  # Retry does the same
        self.regen_button.setVisible(self.msg.role == "assistant" and last and not busy and not has_retry
                                     and self.msg.status != "streaming")
        self.edit_button.setEnabled(not busy)
        self.retry_button.setEnabled(not busy)

    def copy_text(self) -> None:
        QGuiApplication.clipboard().setText(self.msg.content)

    # -- editing a user message ------------------------------------------------------------------
    def start_edit(self) -> None:
        if self.editor is not None:
            return
        self.editor = QPlainTextEdit(self.msg.content, self)
        self.editor.setMinimumHeight(80)
        self.edit_row = QWidget(self)
        row = QHBoxLayout(self.edit_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addStretch()
        cancel = QPushButton("Cancel")
        cancel.clicked.connect(self.finish_edit)
        send = QPushButton("Save && send")
        send.setDefault(True)
        send.clicked.connect(self._submit_edit)
        row.addWidget(cancel)
        row.addWidget(send)
        lay = self.layout()
        lay.insertWidget(lay.indexOf(self.body), self.editor)
        lay.insertWidget(lay.indexOf(self.body) + 1, self.edit_row)
        self.body.hide()
        self.editor.setFocus()

    def _submit_edit(self) -> None:
        text = self.editor.toPlainText().strip() if self.editor is not None else ""
        if text:
            self.finish_edit()
            self.edit_submitted.emit(self.msg.id, text)

    def finish_edit(self) -> None:
        for w in (self.editor, self.edit_row):
            if w is not None:
                w.deleteLater()
        self.editor = self.edit_row = None
        self.body.show()


class MessageView(QScrollArea):
    """Bubbles top to bottom; follows the end while an answer streams unless the user scrolled up."""

    edit_submitted = Signal(int, str)
    regenerate = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        inner = QWidget()
        inner.setObjectName("MessageColumn")
        self.column = QVBoxLayout(inner)
        self.column.setContentsMargins(24, 16, 24, 16)
        self.column.setSpacing(10)
        self.column.addStretch()
        self.setWidget(inner)
        self.bubbles: dict[int, MessageBubble] = {}
        self.verticalScrollBar().rangeChanged.connect(self._on_range)
        # Dragging or clicking the scroll bar decides too: scrolled up stops following, back at the end resumes.
        self.verticalScrollBar().actionTriggered.connect(lambda _a: QTimer.singleShot(0, self, self.note_user_scroll))
        self._follow = True

    def set_messages(self, msgs: list[ChatMessage], busy: bool) -> None:
        for b in self.bubbles.values():
            self._drop(b)
        self.bubbles.clear()
        for m in msgs:
            self.add(m)
        self.refresh_actions(busy)
        self._follow = True
        QTimer.singleShot(0, self, self.scroll_to_end)

    def add(self, msg: ChatMessage) -> MessageBubble:
        b = MessageBubble(msg, self.widget())
        b.edit_submitted.connect(self.edit_submitted)
        b.regenerate.connect(self.regenerate)
        self.column.insertWidget(self.column.count() - 1, b)
        self.bubbles[msg.id] = b
        self._follow = True
        return b

    def remove_from(self, position: int) -> None:
        for mid, b in list(self.bubbles.items()):
            if b.msg.position >= position:
                self._drop(b)
                del self.bubbles[mid]

    def _drop(self, b: MessageBubble) -> None:
        # Out of the layout now: deleteLater alone leaves it on screen until the event loop gets round to it.
        self.column.removeWidget(b)
        b.hide()
        b.deleteLater()

    def refresh_actions(self, busy: bool) -> None:
        last_id = max(self.bubbles, key=lambda i: self.bubbles[i].msg.position, default=None)
        for mid, b in self.bubbles.items():
            b.set_last_answer(mid == last_id, busy)

    def at_end(self) -> bool:
        bar = self.verticalScrollBar()
        return bar.value() >= bar.maximum() - 40

    def note_user_scroll(self) -> None:
        self._follow = self.at_end()

    def scroll_to_end(self) -> None:
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    def _on_range(self, _lo: int, _hi: int) -> None:
        if self._follow:
            self.scroll_to_end()

    def wheelEvent(self, event) -> None:  # noqa: N802
        super().wheelEvent(event)
        self._follow = self.at_end()

    def jump_to(self, message_id: int) -> bool:
        b = self.bubbles.get(message_id)
        if b is None:
            return False
        self._follow = False
        self.ensureWidgetVisible(b, 0, 40)
        b.setProperty("highlight", True)
        b.style().unpolish(b)
        b.style().polish(b)

        def clear() -> None:
            if message_id in self.bubbles:
                b.setProperty("highlight", False)
                b.style().unpolish(b)
                b.style().polish(b)

        QTimer.singleShot(2500, self, clear)
        return True
