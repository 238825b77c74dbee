"""The Chat tab: threads on the left, the conversation in the middle, this chat's settings on the right.

State lives in ChatStore (SQLite); this class only wires the store, the engine and the widgets.
A streaming answer is appended to a buffer as tokens arrive; a 30 ms timer paints the buffer
(at most one repaint per tick whatever the token rate) and saves it every 250 ms, so a crash
loses at most a quarter of a second of text.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEvent, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from studio.chatstore import INTERRUPTED_ON_EXIT, ChatStore, ChatStoreError, Thread, move_aside
from studio.paths import Paths
from studio.protocol import ChatJob
from studio.settings import Settings
from studio.ui.chat.chat_pane import ChatPane
from studio.ui.chat.message_view import is_dark
from studio.ui.chat.model_list import BUNDLED_LABEL, fill_models, select_model  # noqa: F401 (BUNDLED_LABEL: tests)
from studio.ui.chat.problem_page import ProblemPage
from studio.ui.chat.servers import ADD_SERVER, ChatServers, RemoteRunner, split_server_model
from studio.ui.chat.settings_panel import SettingsPanel
from studio.ui.chat.state import Stream, db_action
from studio.ui.chat.style import stylesheet
from studio.ui.chat.thread_list import ThreadList
from studio.ui.chat.transfer import ChatTransfer
from studio.ui.job_runner import ENGINE_GONE, JobRunner, failure_text

PAINT_INTERVAL_MS = 30
SAVE_INTERVAL_S = 0.25
JOB_FIELDS = {f.name for f in dataclasses.fields(ChatJob)}


class ChatTab(ChatTransfer, QWidget):
    answer_finished = Signal(int, str)  # message id, final status (done / stopped / error / interrupted)

    def __init__(self, engine: Any, paths: Paths, settings: Settings, parent: QWidget | None = None,
                 library: Any = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.paths = paths
        self.settings = settings
        self.library = library
        self.db_path = paths.data / "chats.db"
        self.store: ChatStore | None = None
        self.thread_id: int | None = None
        self.streams: dict[str, Stream] = {}
        self.ui_updates = 0  # repaints of streaming text (tests check answers arrive incrementally)
        self.error: ChatStoreError | None = None
        self._runners: list[JobRunner] = []
        self._context_stats: dict | None = None  # the footer's last finished answer, counted on while streaming
        # servers: the window's current settings (its Settings dialog replaces the object)
        self.servers = ChatServers(lambda: getattr(self.window(), "settings", None) or self.settings, paths, self)
        self.servers.changed.connect(self.refresh_models)

        self.pages = QStackedWidget(self)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.pages)
        self.problem = ProblemPage()
        self.problem.retry_button.clicked.connect(self.open_store)
        self.problem.move_button.clicked.connect(self.move_database_aside)
        self.pages.addWidget(self.problem)
        self.pages.addWidget(self._build_main())

        self._paint_timer = QTimer(self)
        self._paint_timer.setInterval(PAINT_INTERVAL_MS)
        self._paint_timer.timeout.connect(self._paint)
        self._undo_timer = QTimer(self)
        self._undo_timer.setSingleShot(True)
        self._undo_timer.timeout.connect(self._hide_notice)
        self._undo_thread: int | None = None
        self._pending: dict[int, dict] = {}  # finished answers the database refused; written when it lets us
        self._retry_timer = QTimer(self)
        self._retry_timer.setInterval(1000)
        self._retry_timer.timeout.connect(self._retry_pending)
        self._shortcuts()
        self._dark = is_dark()
        self.setStyleSheet(stylesheet(self._dark))
        self.open_store()

    # -- layout -------------------------------------------------------------------------------------
    def _build_main(self) -> QWidget:
        self.sidebar = ThreadList()
        self.sidebar.new_requested.connect(self.new_chat)
        self.sidebar.thread_selected.connect(self.open_thread)
        self.sidebar.rename_requested.connect(self.rename_thread)
        self.sidebar.pin_requested.connect(self.pin_thread)
        self.sidebar.delete_requested.connect(self.delete_thread)
        self.sidebar.export_requested.connect(self._export_dialog)
        self.sidebar.import_requested.connect(self._import_dialog)
        self.sidebar.search_changed.connect(self.search)
        self.sidebar.hit_chosen.connect(self.open_message)

        self.pane = ChatPane()
        pane = self.pane
        # The pane's widgets by their short names: the controller and the tests reach them directly.
        for name in ("title_label", "model_combo", "settings_button", "view_stack", "empty_hint", "view", "notice",
                     "notice_label", "undo_button", "input", "send_button", "context_label", "context_bar"):
            setattr(self, name, getattr(pane, name))
        self.model_combo.activated.connect(self._on_model_chosen)
        self.view.edit_submitted.connect(self.edit_message)
        self.view.regenerate.connect(self.regenerate)
        self.undo_button.clicked.connect(self.undo_delete)
        pane.close_notice.clicked.connect(self._hide_notice)
        self.input.submitted.connect(self.send)
        self.send_button.clicked.connect(self._send_or_stop)
        center = pane

        self.settings_panel = SettingsPanel()
        self.settings_panel.changed.connect(self._on_settings_changed)
        self.settings_panel.hide()
        self.settings_button.toggled.connect(self.settings_panel.setVisible)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.setChildrenCollapsible(False)
        split.addWidget(self.sidebar)
        split.addWidget(center)
        split.addWidget(self.settings_panel)
        split.setStretchFactor(1, 1)
        split.setSizes([240, 800, 280])
        self.sidebar.setMinimumWidth(240)  # room for chat titles when the Models panel takes the side
        return split

    def _shortcuts(self) -> None:
        def add(seq: str, slot, context=Qt.ShortcutContext.WindowShortcut) -> None:
            sc = QShortcut(QKeySequence(seq), self)
            sc.setContext(context)
            sc.activated.connect(slot)

        add("Ctrl+N", self.new_chat)
        add("Ctrl+F", self.focus_search)
        add("Esc", self.stop, Qt.ShortcutContext.WidgetWithChildrenShortcut)

    def changeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        # Only a real theme switch restyles: setStyleSheet itself sends palette changes.
        if event.type() == QEvent.Type.PaletteChange and is_dark() != self._dark:
            self._dark = is_dark()
            self.setStyleSheet(stylesheet(self._dark))
            if self.store is not None and self.thread_id is not None:  # code boxes use the theme's shades
                self.open_thread(self.thread_id)
        super().changeEvent(event)

    # -- the database ---------------------------------------------------------------------------------
    def open_store(self) -> bool:
        if self.store is not None:
            return True
        try:
            self.store = ChatStore(self.db_path)
        except ChatStoreError as exc:
            self._show_problem(exc)
            return False
        self.error = None
        self.pages.setCurrentIndex(1)
        threads = self.store.threads()
        self.refresh_models()
        self._refresh_threads()
        if threads:
            self.open_thread(threads[0].id)
        else:
            self._show_thread(None)
        if self.store.backup_path is not None:
            self.show_notice(f"The chat history was upgraded; the old copy is kept at {self.store.backup_path}.")
        return True

    def _show_problem(self, exc: ChatStoreError) -> None:
        self.error = exc
        self.problem.show_store_error(exc.kind, exc.message)
        self.pages.setCurrentIndex(0)

    def move_database_aside(self) -> Path | None:
        """Only on the user's request: rename the unreadable file (never delete it), then start fresh."""
        try:
            moved = move_aside(self.db_path)
        except OSError as exc:
            self.problem.set_text(self.problem.title.text(),
                                  f"Could not rename {self.db_path}: {exc}. Move it yourself and try again.")
            return None
        if self.open_store():
            self.show_notice(f"The unreadable chat history was kept as {moved}.")
        return moved

    # -- threads ------------------------------------------------------------------------------------------
    def _refresh_threads(self) -> None:
        self.sidebar.set_threads(self.store.threads(), self.thread_id)

    @db_action
    def new_chat(self) -> Thread | None:
        if self.store is None:
            return None
        if self.thread_id is not None and not self.store.messages(self.thread_id):
            self.input.setFocus()  # already on an empty chat: reuse it rather than pile up blank ones
            return self.store.thread(self.thread_id)
        if self.thread_id is None:  # settings chosen before the first chat existed belong to it
            t = self.store.create_thread(system=self.settings_panel.system.toPlainText(),
                                         model=self.model_combo.currentData() or "",
                                         settings=self.settings_panel.values())
        else:
            self.settings_panel.flush()
            t = self.store.create_thread(model=self.store.thread(self.thread_id).model)
        self.thread_id = t.id
        self._refresh_threads()
        self._show_thread(t)
        self.input.setFocus()
        return t

    @db_action
    def open_thread(self, thread_id: int) -> None:
        if self.store is None:
            return
        if self.thread_id is not None and self.thread_id != thread_id:
            self.settings_panel.flush()
        try:
            t = self.store.thread(thread_id)
        except KeyError:
            return
        self.thread_id = thread_id
        self._show_thread(t)
        item = self.sidebar.item_for(thread_id)
        if item is not None and self.sidebar.threads.currentItem() is not item:
            self.sidebar._filling = True
            self.sidebar.threads.setCurrentItem(item)
            self.sidebar._filling = False

    def _show_thread(self, t: Thread | None) -> None:
        msgs = self.store.messages(t.id) if t is not None else []
        self.title_label.setText(t.title if t is not None else "New chat")
        self.view.set_messages(msgs, self.busy)
        for s in self.streams.values():  # an answer still streaming here shows its latest text, not the saved one
            if t is not None and s.thread_id == t.id and s.msg_id in self.view.bubbles:
                self.view.bubbles[s.msg_id].set_streaming_text(s.text)
        self.view_stack.setCurrentWidget(self.view if msgs else self.empty_hint)
        self.settings_panel.load(t.system if t else "", t.settings if t else {})
        self._select_model(t.model if t else "")
        self._update_busy()
        self._update_context()

    @db_action
    def rename_thread(self, thread_id: int, title: str) -> None:
        self.store.update_thread(thread_id, title=title)
        self._refresh_threads()
        if thread_id == self.thread_id:
            self.title_label.setText(title)

    @db_action
    def pin_thread(self, thread_id: int, pinned: bool) -> None:
        self.store.update_thread(thread_id, pinned=pinned)
        self._refresh_threads()

    @db_action
    def delete_thread(self, thread_id: int) -> None:
        for s in list(self.streams.values()):
            if s.thread_id == thread_id:
                s.runner.cancel()
        title = self.store.thread(thread_id).title
        self.store.delete_thread(thread_id)
        self._undo_thread = thread_id
        if thread_id == self.thread_id:
            rest = self.store.threads()
            self.thread_id = None
            if rest:
                self.open_thread(rest[0].id)
            else:
                self._show_thread(None)
        self._refresh_threads()
        self.show_notice(f"Deleted “{title}”.", undo=True)

    @db_action
    def undo_delete(self) -> None:
        if self._undo_thread is None:
            return
        self.store.undelete_thread(self._undo_thread)
        tid, self._undo_thread = self._undo_thread, None
        self._hide_notice()
        self._refresh_threads()
        self.open_thread(tid)

    def show_notice(self, text: str, undo: bool = False) -> None:
        self.notice_label.setText(text)
        self.undo_button.setVisible(undo)
        self.notice.show()
        self._undo_timer.start(10000 if undo else 15000)

    def _hide_notice(self) -> None:
        self.notice.hide()
        self._undo_thread = None

    # -- model and settings ----------------------------------------------------------------------------------
    def refresh_models(self) -> None:
        fill_models(self.model_combo, self.library, self.servers, self.model_combo.currentData() or "")

    def _select_model(self, model: str) -> None:
        select_model(self.model_combo, model)

    @db_action
    def _on_model_chosen(self, index: int) -> None:
        if self.model_combo.itemData(index) == ADD_SERVER:
            added = self.servers.ask_add(self)
            thread = self.store.thread(self.thread_id) if self.thread_id is not None else None
            self._select_model(added or (thread.model if thread else ""))
            index = self.model_combo.currentIndex()
        if self.thread_id is not None:
            self.store.update_thread(self.thread_id, model=self.model_combo.itemData(index))

    @db_action
    def _on_settings_changed(self, system: str, values: dict) -> None:
        if self.store is not None and self.thread_id is not None:
            self.store.update_thread(self.thread_id, system=system, settings=values)

    def showEvent(self, event) -> None:  # noqa: N802
        super().showEvent(event)
        if self.store is not None:
            self.refresh_models()  # models installed since the last visit appear
            self.servers.refresh()  # and the servers' lists, when they answer

    # -- sending and streaming --------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while the open thread has an answer streaming."""
        return self._stream_for(self.thread_id) is not None

    def _stream_for(self, thread_id: int | None) -> Stream | None:
        return next((s for s in self.streams.values() if s.thread_id == thread_id), None)

    def _send_or_stop(self) -> None:
        if self.busy:
            self.stop()
        else:
            self.send()

    @db_action
    def send(self) -> int | None:
        """Send the input as a user message and start the answer; returns the answer's message id."""
        text = self.input.toPlainText().strip()
        if not text or self.store is None or self.busy:
            return None
        if self.thread_id is None:
            self.new_chat()
        tid = self.thread_id
        self.settings_panel.flush()
        user = self.store.add_message(tid, "user", text)
        self.input.clear()
        if self.store.thread(tid).title == "New chat":
            first = text.splitlines()[0]
            self.rename_thread(tid, first[:48] + ("…" if len(first) > 48 else ""))
        else:
            self._refresh_threads()
        self.view_stack.setCurrentWidget(self.view)
        self.view.add(user)
        return self._generate(tid)

    def _generate(self, thread_id: int, overflow: str = "error") -> int:
        t = self.store.thread(thread_id)
        history = [{"role": m.role, "content": m.content} for m in self.store.messages(thread_id)
                   if m.content and m.status != "error"]
        answer = self.store.add_message(thread_id, "assistant", "", status="streaming")
        sampling = {k: v for k, v in t.settings.items() if k in JOB_FIELDS}
        job = ChatJob(messages=history, model=t.model, system=t.system, overflow=overflow, **sampling)
        runner = self._idle_runner(split_server_model(t.model) is not None)
        s = Stream("", thread_id, answer.id, saved_at=time.monotonic(), runner=runner)
        s.job_id = runner.submit(job)
        self.streams[s.job_id] = s
        if thread_id == self.thread_id:
            bubble = self.view.add(answer)
            bubble.status_label.setText("waiting for the engine…")
            self._update_busy()
        return answer.id

    def stop(self) -> None:
        s = self._stream_for(self.thread_id)
        if s is not None:
            s.runner.cancel()

    @db_action
    def regenerate(self, message_id: int) -> int | None:
        """Answer again from just before this assistant message (Regenerate and Retry)."""
        if self.store is None or self.busy:
            return None
        m = self.store.message(message_id)
        overflow = "truncate" if m.error.get("kind") == "context_full" else "error"
        self.store.delete_from(m.thread_id, m.position)
        self.view.remove_from(m.position)
        return self._generate(m.thread_id, overflow)

    def regenerate_last(self) -> int | None:
        msgs = self.store.messages(self.thread_id) if self.thread_id is not None else []
        if msgs and msgs[-1].role == "assistant":
            return self.regenerate(msgs[-1].id)
        return None

    @db_action
    def edit_message(self, message_id: int, text: str) -> int | None:
        """Replace a user message and continue the chat from it (later messages are dropped)."""
        if self.store is None or self.busy:
            return None
        m = self.store.message(message_id)
        self.store.update_message(message_id, content=text)
        self.store.delete_from(m.thread_id, m.position + 1)
        self.view.remove_from(m.position + 1)
        self.view.bubbles[message_id].update_message(self.store.message(message_id))
        return self._generate(m.thread_id)

    def _idle_runner(self, remote: bool = False) -> JobRunner | RemoteRunner:
        """A runner with no job: answers in different threads stream at once, each with its own runner.
        Runners are kept and reused rather than deleted, since one finishes inside its own signal."""
        busy = {s.runner for s in self.streams.values()}
        kind = RemoteRunner if remote else JobRunner
        runner = next((r for r in self._runners if r not in busy and not r.busy and type(r) is kind), None)
        if runner is None:
            runner = RemoteRunner(self.servers, self) if remote else JobRunner(self.engine, self)
            self._runners.append(runner)
            on = self._with_stream
            runner.token.connect(lambda text, r=runner: on(r, self._on_token, text))
            runner.started.connect(lambda r=runner: on(r, self._on_started))
            runner.progress.connect(lambda _step, _total, stage, r=runner: on(r, self._on_progress, stage))
            runner.finished.connect(lambda result, r=runner: on(r, self._on_result, result))
            runner.cancelled.connect(lambda r=runner: on(r, lambda st: self._finish(st, "stopped", st.text)))
            runner.failed.connect(lambda kind, message, restarted, r=runner:
                                  on(r, self._on_failed, kind, message, restarted))
        return runner

    def _with_stream(self, runner: JobRunner, handler: Any, *args: Any) -> None:
        s = next((s for s in self.streams.values() if s.runner is runner), None)
        if s is not None:
            handler(s, *args)

    def _on_token(self, s: Stream, text: str) -> None:
        if not s.parts:  # the first token: whatever the loading stages said is over
            self._set_bubble_status(s, "typing…")
        s.parts.append(text)
        s.dirty = s.unsaved = True
        if not self._paint_timer.isActive():
            self._paint_timer.start()

    def _on_started(self, s: Stream) -> None:
        s.started = True
        self._set_bubble_status(s, "typing…")

    def _on_progress(self, s: Stream, stage: str) -> None:
        if not s.parts:  # loading stages; once text streams the bubble says "typing…"
            self._set_bubble_status(s, f"{stage}…")

    def _on_result(self, s: Stream, result: dict) -> None:
        r = dict(result)
        text = r.pop("text", s.text)
        self._finish(s, "done", text, stats=r)

    def _on_failed(self, s: Stream, kind: str, message: str, engine_restarted: bool) -> None:
        status = "interrupted" if kind in ENGINE_GONE else "error"
        self._finish(s, status, s.text, error={"kind": kind, "message": failure_text(message, engine_restarted,
                                                                                      "Retry")})

    def _set_bubble_status(self, s: Stream, text: str) -> None:
        b = self.view.bubbles.get(s.msg_id) if s.thread_id == self.thread_id else None
        if b is not None:
            b.status_label.setText(text)
            b.status_label.show()

    def _paint(self) -> None:
        now = time.monotonic()
        for s in self.streams.values():
            if s.dirty and now >= s.paint_after:
                b = self.view.bubbles.get(s.msg_id) if s.thread_id == self.thread_id else None
                if b is not None:
                    t0 = time.monotonic()
                    b.set_streaming_text(s.text)
                    self._update_context(s)
                    self.ui_updates += 1
                    # Re-rendering grows with the answer; keep it under a quarter of the wall time.
                    s.paint_after = now + 3 * (time.monotonic() - t0)
                s.dirty = False
            if s.unsaved and now - s.saved_at >= SAVE_INTERVAL_S:
                s.unsaved = not self._save(s.msg_id, content=s.text)
                # A locked database makes each try wait for its busy timeout: back off rather than stall the UI.
                s.saved_at = now if not s.unsaved else now + 2.0
        if not any(s.dirty or s.unsaved for s in self.streams.values()):
            self._paint_timer.stop()

    def _finish(self, s: Stream, status: str, text: str, stats: dict | None = None,
                error: dict | None = None) -> None:
        self.streams.pop(s.job_id, None)
        fields = {"content": text, "status": status, "stats": stats or {}, "error": error or {}}
        if not self._save(s.msg_id, **fields):
            self._pending[s.msg_id] = fields
            self._retry_timer.start()
        if s.thread_id == self.thread_id and s.msg_id in self.view.bubbles:
            bubble = self.view.bubbles[s.msg_id]
            bubble.update_message(dataclasses.replace(bubble.msg, **fields))
            self._update_busy()
            self._update_context()
        self.answer_finished.emit(s.msg_id, status)

    def _save(self, message_id: int, **fields: Any) -> bool:
        """Write a message; if the database refuses (locked by another program, disk full) say so and go on."""
        try:
            self.store.update_message(message_id, **fields)
        except sqlite3.Error as exc:
            self.show_notice(f"Could not save the chat ({exc}); the answer stays on screen and saving is tried "
                             "again. Close other programs using chats.db or free some disk space.")
            return False
        return True

    def _retry_pending(self) -> None:
        for mid, fields in list(self._pending.items()):
            if self._save(mid, **fields):
                del self._pending[mid]
        if not self._pending:
            self._retry_timer.stop()
            self._hide_notice()

    def _update_busy(self) -> None:
        busy = self.busy
        self.send_button.setText("Stop" if busy else "Send")
        self.send_button.setToolTip("Stop the answer (Esc)" if busy else "Send (Enter)")
        self.send_button.setProperty("stop", busy)
        self.send_button.style().unpolish(self.send_button)
        self.send_button.style().polish(self.send_button)
        self.view.refresh_actions(busy)

    def _update_context(self, streaming: Stream | None = None) -> None:
        """The footer: context used by the last finished answer, and while one streams, that plus its tokens
        so far (the engine tells the exact prompt size only with the result, so the running count is "about")."""
        if streaming is not None:
            last = self._context_stats
        else:
            msgs = self.store.messages(self.thread_id) if self.store is not None and self.thread_id is not None else []
            last = next((m.stats for m in reversed(msgs) if m.stats.get("context_length")), None)
            self._context_stats = last
        # one token message is about one token
        self.pane.show_context(last, len(streaming.parts) if streaming is not None else None)

    # -- search ---------------------------------------------------------------------------------------------------
    def focus_search(self) -> None:
        self.sidebar.search.setFocus()
        self.sidebar.search.selectAll()

    def search(self, text: str) -> list:
        hits = self.store.search(text) if self.store is not None and text.strip() else []
        if text.strip():
            self.sidebar.set_hits(hits)
        return hits

    def open_message(self, thread_id: int, message_id: int) -> None:
        self.open_thread(thread_id)
        # Layouts settle on the next turn of the event loop; scroll once the bubbles have their heights.
        QTimer.singleShot(30, self.view, lambda: self.view.jump_to(message_id))

    # -- closing ------------------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Save what is streaming, mark it interrupted, forget deleted threads, close the database."""
        if self.store is None:
            return
        self._paint_timer.stop()
        self._retry_timer.stop()
        for s in list(self.streams.values()):
            s.runner.cancel()
            self._save(s.msg_id, content=s.text, status="interrupted", error=INTERRUPTED_ON_EXIT)
        self.streams.clear()
        for runner in self._runners:
            runner.close()  # stop listening: nothing may arrive after the store closes
        self._retry_pending()
        try:
            self.settings_panel.flush()
            self.store.purge_deleted()
        except sqlite3.Error:
            pass  # closing anyway: deleted threads are purged at the next open; only a last settings edit is lost
        self.store.close()
        self.store = None
