"""The sidebar: New chat, search across all chats, and the thread list (rename, pin, export, delete)."""

from __future__ import annotations

import html

from PySide6.QtCore import QEvent, QSize, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from studio.chatstore import SearchHit, Thread

ID = Qt.ItemDataRole.UserRole
MSG = Qt.ItemDataRole.UserRole + 1
PINNED = Qt.ItemDataRole.UserRole + 2
PIN = "★ "  # in every common font, unlike the pin emoji


class ThreadList(QWidget):
    thread_selected = Signal(int)
    new_requested = Signal()
    rename_requested = Signal(int, str)
    pin_requested = Signal(int, bool)
    delete_requested = Signal(int)
    export_requested = Signal(int, str)  # thread id, "md" | "json"
    import_requested = Signal()
    search_changed = Signal(str)
    hit_chosen = Signal(int, int)  # thread id, message id

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ThreadSidebar")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 10, 6, 10)
        layout.setSpacing(8)
        self.new_button = QPushButton("+  New chat")
        self.new_button.setObjectName("NewChat")
        self.new_button.setToolTip("Start a new conversation (Ctrl+N)")
        self.new_button.clicked.connect(self.new_requested)
        layout.addWidget(self.new_button)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search all chats (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self._on_search_text)
        layout.addWidget(self.search)

        self.stack = QStackedWidget()
        self.threads = QListWidget()
        self.threads.setObjectName("Threads")
        self.threads.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.threads.customContextMenuRequested.connect(self._menu)
        self.threads.currentItemChanged.connect(self._on_current)
        self.threads.itemChanged.connect(self._on_item_changed)
        self.threads.setEditTriggers(QListWidget.EditTrigger.EditKeyPressed)  # F2 renames
        self.threads.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.threads.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.results = QListWidget()
        self.results.setObjectName("SearchResults")
        self.results.setWordWrap(True)
        self.results.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.results.viewport().installEventFilter(self)
        self.results.itemActivated.connect(self._on_hit)
        self.results.itemClicked.connect(self._on_hit)
        self.no_results = QLabel("No messages match.")
        self.no_results.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.no_results.setEnabled(False)
        self.stack.addWidget(self.threads)
        self.stack.addWidget(self.results)
        self.stack.addWidget(self.no_results)
        layout.addWidget(self.stack, 1)
        self.import_button = QPushButton("Import chat…")
        self.import_button.setFlat(True)
        self.import_button.setToolTip("Add a chat exported as JSON (it becomes a new chat; nothing is replaced)")
        self.import_button.clicked.connect(self.import_requested)
        layout.addWidget(self.import_button)
        self._filling = False

    # -- threads --------------------------------------------------------------------------------
    def set_threads(self, threads: list[Thread], current: int | None) -> None:
        self._filling = True
        self.threads.clear()
        for t in threads:
            item = QListWidgetItem((PIN if t.pinned else "") + t.title)
            item.setData(ID, t.id)
            item.setData(MSG, t.title)
            item.setData(PINNED, t.pinned)
            item.setToolTip(t.title)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
            self.threads.addItem(item)
            if t.id == current:
                self.threads.setCurrentItem(item)
        self._filling = False

    def item_for(self, thread_id: int) -> QListWidgetItem | None:
        for i in range(self.threads.count()):
            if self.threads.item(i).data(ID) == thread_id:
                return self.threads.item(i)
        return None

    def start_rename(self, thread_id: int) -> None:
        item = self.item_for(thread_id)
        if item is not None:
            self._filling = True
            item.setText(item.data(MSG))  # edit the bare title, not the pin mark
            self._filling = False
            self.threads.editItem(item)

    def _on_current(self, item: QListWidgetItem | None, _prev: object) -> None:
        if item is not None and not self._filling:
            self.thread_selected.emit(item.data(ID))

    def _on_item_changed(self, item: QListWidgetItem) -> None:
        if self._filling:
            return
        title = item.text().strip()
        if item.data(PINNED):
            title = title.removeprefix(PIN.strip()).strip()
        tid, old = item.data(ID), item.data(MSG)
        # Emitted after the editor has closed: the receiver rebuilds this list, which must not happen under it.
        # An empty or unchanged title re-emits the old one, so the list shows it again (pin mark included).
        QTimer.singleShot(0, self, lambda: self.rename_requested.emit(tid, title if title else old))

    def _menu(self, pos) -> None:
        item = self.threads.itemAt(pos)
        if item is None:
            return
        tid = item.data(ID)
        pinned = bool(item.data(PINNED))
        menu = QMenu(self)
        menu.addAction("Rename", lambda: self.start_rename(tid))
        menu.addAction("Unpin" if pinned else "Pin to top", lambda: self.pin_requested.emit(tid, not pinned))
        menu.addSeparator()
        menu.addAction("Export as Markdown…", lambda: self.export_requested.emit(tid, "md"))
        menu.addAction("Export as JSON…", lambda: self.export_requested.emit(tid, "json"))
        menu.addSeparator()
        menu.addAction("Delete", lambda: self.delete_requested.emit(tid))
        menu.exec(self.threads.viewport().mapToGlobal(pos))

    # -- search -------------------------------------------------------------------------------------
    def _on_search_text(self, text: str) -> None:
        if not text.strip():
            self.stack.setCurrentWidget(self.threads)
        self.search_changed.emit(text)

    def set_hits(self, hits: list[SearchHit]) -> None:
        self.results.clear()
        for h in hits:
            who = "You" if h.role == "user" else "Assistant"
            # The store marks matches with ⟦ ⟧; show them bold. Everything else is escaped: it is the user's text.
            snippet = html.escape(h.snippet.replace("\n", " ")).replace("⟦", "<b>").replace("⟧", "</b>")
            label = QLabel(f"<b>{html.escape(h.thread_title)}</b><br><span>{who}: {snippet}</span>")
            label.setObjectName("SearchHit")
            label.setWordWrap(True)
            label.setTextFormat(Qt.TextFormat.RichText)
            label.setContentsMargins(6, 5, 6, 5)
            item = QListWidgetItem()
            item.setData(ID, h.thread_id)
            item.setData(MSG, h.message_id)
            item.setToolTip(h.thread_title)
            self.results.addItem(item)
            self.results.setItemWidget(item, label)
        self.stack.setCurrentWidget(self.results if hits else self.no_results)
        self._fit_hits()

    def _fit_hits(self) -> None:
        """Wrapped labels have no natural height: size each row for the list's current width."""
        width = max(100, self.results.viewport().width())
        for i in range(self.results.count()):
            item = self.results.item(i)
            label = self.results.itemWidget(item)
            if label is not None:
                item.setSizeHint(QSize(width, label.heightForWidth(width)))

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt name)
        if obj is self.results.viewport() and event.type() == QEvent.Type.Resize:
            self._fit_hits()
        return False

    def _on_hit(self, item: QListWidgetItem) -> None:
        self.hit_chosen.emit(item.data(ID), item.data(MSG))
