"""The Chat tab's export and import of threads (JSON / Markdown files), apart from its streaming and layout.

A mixin of ChatTab: it uses the tab's store, show_notice, open_thread and _refresh_threads, and nothing else.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from studio.chatstore import Thread, load_export
from studio.ui.chat.chat_pane import ask_export_path
from studio.ui.chat.state import db_action


class ChatTransfer:
    """Export a thread to a file, import a JSON export as a new thread, and the file dialogs for both."""

    @db_action
    def export_thread(self, thread_id: int, path: str | Path, fmt: str) -> Path:
        return self.store.export_file(thread_id, Path(path), fmt)

    @db_action
    def import_file(self, path: str | Path) -> Thread | None:
        """A JSON export becomes a new thread; a bad file leaves everything as it was and says why."""
        try:
            t = self.store.import_json(load_export(Path(path)))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.show_notice(f"Could not import {Path(path).name}: {exc}")
            return None
        self.thread_id = t.id
        self._refresh_threads()
        self.open_thread(t.id)
        self.show_notice(f"Imported “{t.title}” as a new chat.")
        return t

    def _export_dialog(self, thread_id: int, fmt: str) -> None:
        path = ask_export_path(self, self.store.thread(thread_id).title, fmt)
        if path:
            try:
                self.show_notice(f"Exported to {self.export_thread(thread_id, path, fmt)}.")
            except OSError as exc:
                self.show_notice(f"Could not export: {exc}. Choose another folder.")

    def _import_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import chat", str(Path.home()), "Studio chat (*.json)")
        if path:
            self.import_file(path)
