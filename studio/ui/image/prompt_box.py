"""Multi-line prompt editors with a history the arrow keys walk through, like a shell."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QMimeData, Qt
from PySide6.QtGui import QKeyEvent, QTextCursor
from PySide6.QtWidgets import QPlainTextEdit, QWidget

from studio.ui.image.options import read_json, write_json

HISTORY_LIMIT = 200


class PromptHistory:
    """Past prompts and negative prompts, newest last, persisted in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = read_json(path, {})
        data = data if isinstance(data, dict) else {}
        self.lists: dict[str, list[str]] = {
            key: [s for s in data.get(key, []) if isinstance(s, str)][-HISTORY_LIMIT:] for key in ("prompt", "negative")}

    def entries(self, key: str) -> list[str]:
        return self.lists.setdefault(key, [])

    def add(self, key: str, text: str) -> None:
        text = text.strip()
        if not text:
            return
        items = self.entries(key)
        if text in items:  # a re-used prompt moves to the newest place instead of repeating
            items.remove(text)
        items.append(text)
        del items[:-HISTORY_LIMIT]

    def save(self) -> None:
        write_json(self.path, self.lists)


class PromptEdit(QPlainTextEdit):
    """Up on the first line shows the previous prompt, Down on the last line the next one.

    What was being typed is kept as the newest entry, so walking back down returns to it.
    File drops are refused here so they reach the tab (parameters) or the window (installs).
    """

    def __init__(self, history: PromptHistory, key: str, placeholder: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.history = history
        self.key = key
        self._index: int | None = None  # position in history while walking; None = editing the draft
        self._draft = ""
        self.setPlaceholderText(placeholder)
        self.setTabChangesFocus(True)

    def text(self) -> str:
        return self.toPlainText()

    def set_text(self, text: str) -> None:
        self.setPlainText(text)
        self.moveCursor(QTextCursor.MoveOperation.End)
        self._index = None

    def history_back(self) -> bool:
        items = self.history.entries(self.key)
        if not items or self._index == 0:
            return False
        if self._index is None:
            self._draft = self.toPlainText()
            self._index = len(items)
        self._index -= 1
        self._show(items[self._index])
        return True

    def history_forward(self) -> bool:
        items = self.history.entries(self.key)
        if self._index is None:
            return False
        self._index += 1
        if self._index >= len(items):
            self._index = None
            self._show(self._draft)
        else:
            self._show(items[self._index])
        return True

    def _show(self, text: str) -> None:
        index = self._index
        self.setPlainText(text)
        self.moveCursor(QTextCursor.MoveOperation.End)
        self._index = index

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 (Qt override)
        plain = event.modifiers() in (Qt.KeyboardModifier.NoModifier, Qt.KeyboardModifier.KeypadModifier)
        cursor = self.textCursor()
        if plain and event.key() == Qt.Key.Key_Up and cursor.blockNumber() == 0 and self.history_back():
            return
        if plain and event.key() == Qt.Key.Key_Down and \
                cursor.blockNumber() == self.document().blockCount() - 1 and self.history_forward():
            return
        if event.text():
            self._index = None  # typing into a recalled prompt makes it the new draft
        super().keyPressEvent(event)

    def canInsertFromMimeData(self, source: QMimeData) -> bool:  # noqa: N802 (Qt override)
        return not source.hasUrls() and super().canInsertFromMimeData(source)
