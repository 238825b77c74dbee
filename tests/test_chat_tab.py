"""The Chat tab against the real engine and the bundled SmolLM2: streaming, stop, regenerate, persistence,
search, export/import, an engine killed mid-answer, and corrupt or locked databases."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import dataclasses  # noqa: E402
import json  # noqa: E402
import sqlite3  # noqa: E402

import pytest  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402

from studio.paths import Paths  # noqa: E402
from studio.settings import Settings  # noqa: E402

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture(scope="module")
def qt_engine(qapp):
    from studio.client import EngineOptions
    from studio.ui.engine_qt import QtEngine

    engine = QtEngine(Paths.default(), EngineOptions(device="cpu", hang_timeout_s=60))
    engine.start()
    yield engine
    engine.close()


@pytest.fixture
def paths(tmp_path):
    return dataclasses.replace(Paths.default(), data=tmp_path / "data").ensure()


def make_tab(qtbot, engine, paths):
    from studio.ui.chat.chat_tab import ChatTab

    tab = ChatTab(engine, paths, Settings())
    qtbot.addWidget(tab)
    tab.resize(1000, 700)
    tab.show()
    return tab


@pytest.fixture
def tab(qtbot, qt_engine, paths):
    t = make_tab(qtbot, qt_engine, paths)
    yield t
    t.shutdown()


def greedy(tab, max_tokens: int) -> None:
    """This chat's settings, set through the settings panel as a user would."""
    tab.new_chat()
    tab.settings_panel.fields["temperature"].setValue(0.0)
    tab.settings_panel.fields["max_tokens"].setValue(max_tokens)
    tab.settings_panel.flush()


def type_and_enter(qtbot, tab, text: str) -> None:
    qtbot.keyClicks(tab.input, text)
    qtbot.keyClick(tab.input, Qt.Key.Key_Return)


def wait_finished(qtbot, tab, timeout: int = 120000) -> tuple[int, str]:
    with qtbot.waitSignal(tab.answer_finished, timeout=timeout) as blocker:
        pass
    return tuple(blocker.args)


def wait_streaming(qtbot, tab, updates: int = 3) -> None:
    start = tab.ui_updates
    qtbot.waitUntil(lambda: tab.ui_updates >= start + updates, timeout=120000)


def test_enter_sends_and_the_answer_streams_in_then_survives_a_new_tab(qtbot, qt_engine, paths):
    tab = make_tab(qtbot, qt_engine, paths)
    greedy(tab, 64)
    qtbot.keyClicks(tab.input, "List five European countries and their capitals.")
    qtbot.keyClick(tab.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    assert tab.input.toPlainText().endswith("\n")  # Shift+Enter is a newline, not a send
    with qtbot.waitSignal(tab.answer_finished, timeout=120000) as blocker:
        qtbot.keyClick(tab.input, Qt.Key.Key_Return)
        assert tab.input.toPlainText() == "" and tab.busy and tab.send_button.text() == "Stop"
    msg_id, status = blocker.args
    assert status == "done"
    assert tab.ui_updates >= 3  # painted as it grew, not once at the end
    m = tab.store.message(msg_id)
    assert "Paris" in m.content and m.stats["completion_tokens"] > 0
    bubble = tab.view.bubbles[msg_id]
    assert "tok/s" in bubble.stats_label.text() and "first token" in bubble.stats_label.text()
    assert tab.context_label.text().startswith("Context: ") and "/ 8,192 tokens" in tab.context_label.text()
    assert tab.send_button.text() == "Send"
    title = tab.store.thread(tab.thread_id).title
    assert title == "List five European countries and their capitals."
    tab.shutdown()

    again = make_tab(qtbot, qt_engine, paths)
    try:
        assert again.sidebar.threads.item(0).text() == title and again.title_label.text() == title
        assert [b.msg.role for b in again.view.bubbles.values()] == ["user", "assistant"]
        assert "Paris" in again.view.bubbles[msg_id].body.toPlainText()
    finally:
        again.shutdown()


def test_stop_mid_answer_keeps_the_partial_text_and_regenerate_answers_again(qtbot, tab):
    greedy(tab, 400)
    type_and_enter(qtbot, tab, LONG_PROMPT)
    wait_streaming(qtbot, tab)
    with qtbot.waitSignal(tab.answer_finished, timeout=30000) as blocker:
        qtbot.keyClick(tab.input, Qt.Key.Key_Escape)
    msg_id, status = blocker.args
    m = tab.store.message(msg_id)
    assert status == "stopped" and m.status == "stopped" and len(m.content) > 10
    assert tab.view.bubbles[msg_id].status_label.text() == "stopped"
    assert tab.view.bubbles[msg_id].regen_button.isVisible()

    tab.settings_panel.fields["max_tokens"].setValue(24)
    tab.settings_panel.flush()
    with qtbot.waitSignal(tab.answer_finished, timeout=120000) as blocker:
        tab.view.bubbles[msg_id].regen_button.click()
    new_id, status = blocker.args
    msgs = tab.store.messages(tab.thread_id)
    assert status == "done" and new_id != msg_id
    assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].id == new_id
    assert msgs[1].stats["completion_tokens"] <= 24


def test_editing_a_user_message_drops_what_followed_and_continues(qtbot, tab):
    greedy(tab, 16)
    type_and_enter(qtbot, tab, "Name a fruit.")
    wait_finished(qtbot, tab)
    user_id = tab.store.messages(tab.thread_id)[0].id
    bubble = tab.view.bubbles[user_id]
    bubble.edit_button.click()
    bubble.editor.setPlainText("What is the capital of France?")
    with qtbot.waitSignal(tab.answer_finished, timeout=120000) as blocker:
        bubble._submit_edit()
    msgs = tab.store.messages(tab.thread_id)
    assert [(m.role, m.id == blocker.args[0]) for m in msgs] == [("user", False), ("assistant", True)]
    assert msgs[0].content == "What is the capital of France?" and "Paris" in msgs[1].content


def test_search_finds_a_word_and_jumps_to_the_message(qtbot, tab):
    store = tab.store
    t1 = store.create_thread("Volcanoes")
    target = store.add_message(t1.id, "user", "Tell me about the eruption of Krakatoa in 1883.")
    store.add_message(store.create_thread("Other").id, "user", "Something unrelated")
    tab._refresh_threads()
    qtbot.keyClick(tab, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    assert tab.sidebar.search.hasFocus()
    qtbot.keyClicks(tab.sidebar.search, "krakat")
    assert tab.sidebar.results.count() == 1
    item = tab.sidebar.results.item(0)
    shown = tab.sidebar.results.itemWidget(item).text()
    assert "<b>Volcanoes</b>" in shown and "<b>Krakatoa</b>" in shown
    tab.sidebar.results.itemClicked.emit(item)
    assert tab.thread_id == t1.id
    qtbot.waitUntil(lambda: tab.view.bubbles[target.id].property("highlight") is True, timeout=2000)
    tab.sidebar.search.clear()
    assert tab.sidebar.stack.currentWidget() is tab.sidebar.threads


def test_export_and_import_round_trip_as_a_new_thread(qtbot, tab, tmp_path):
    store = tab.store
    t = store.create_thread("Exported", system="Be brief.")
    store.add_message(t.id, "user", "Show me Python")
    store.add_message(t.id, "assistant", "Here:\n\n```python\nprint('hi')\n```")
    md = tab.export_thread(t.id, tmp_path / "chat.md", "md").read_text()
    assert "# Exported" in md and "```python\nprint('hi')\n```" in md
    path = tab.export_thread(t.id, tmp_path / "chat.json", "json")
    imported = tab.import_file(path)
    assert imported is not None and imported.id != t.id and tab.thread_id == imported.id
    assert [(m.role, m.content) for m in store.messages(imported.id)] == [
        (m.role, m.content) for m in store.messages(t.id)]
    assert len(store.threads()) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert tab.import_file(tmp_path / "bad.json") is None
    assert "Could not import bad.json" in tab.notice_label.text() and len(store.threads()) == 2


def test_code_blocks_render_as_boxes_whose_copy_link_copies_the_code(qtbot, tab):
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication

    store = tab.store
    t = store.create_thread("Code")
    store.add_message(t.id, "user", "code please")
    a = store.add_message(t.id, "assistant", "Sure, **bold** first:\n\n```py\nx = 1\nprint(x)\n```\nDone.")
    tab._refresh_threads()
    tab.open_thread(t.id)
    body = tab.view.bubbles[a.id].body
    text = body.toPlainText()
    assert "bold" in text and "**" not in text and "```" not in text and "Copy" in text
    body.anchorClicked.emit(QUrl("copy:0"))
    assert QGuiApplication.clipboard().text() == "x = 1\nprint(x)"


def test_delete_hides_the_thread_and_undo_brings_it_back(qtbot, tab):
    t = tab.store.create_thread("Keep me")
    tab.store.add_message(t.id, "user", "hello")
    tab._refresh_threads()
    tab.delete_thread(t.id)
    assert tab.sidebar.item_for(t.id) is None and tab.notice.isVisible() and tab.undo_button.isVisible()
    tab.undo_button.click()
    assert tab.sidebar.item_for(t.id) is not None and tab.thread_id == t.id


def test_killing_the_engine_mid_answer_keeps_the_partial_answer_marked_interrupted(qtbot, qt_engine, tab, paths):
    greedy(tab, 400)
    type_and_enter(qtbot, tab, LONG_PROMPT)
    wait_streaming(qtbot, tab)
    stream = next(iter(tab.streams.values()))
    raw = sqlite3.connect(str(paths.data / "chats.db"))

    def saved() -> str:
        return raw.execute("SELECT content FROM messages WHERE id=?", (stream.msg_id,)).fetchone()[0]

    qtbot.waitUntil(lambda: len(saved()) > 20, timeout=10000)  # saved while it streams, not only at the end
    with qtbot.waitSignal(tab.answer_finished, timeout=30000) as blocker:
        qt_engine.client.kill_engine()
    msg_id, status = blocker.args
    m = tab.store.message(msg_id)
    assert status == "interrupted" and m.status == "interrupted" and len(m.content) >= len(saved()) > 20
    assert m.error["kind"] == "engine_crashed"
    bubble = tab.view.bubbles[msg_id]
    assert bubble.status_label.text() == "interrupted"
    assert bubble.error_box.isVisible() and bubble.retry_button.text() == "Retry"
    assert "stopped unexpectedly" in bubble.error_label.text() and "text so far is kept" in bubble.error_label.text()
    raw.close()

    tab.settings_panel.fields["max_tokens"].setValue(24)
    tab.settings_panel.flush()
    type_and_enter(qtbot, tab, "What is the capital of France?")
    _, status = wait_finished(qtbot, tab, timeout=90000)  # the client restarts the engine
    assert status == "done" and "Paris" in tab.store.messages(tab.thread_id)[-1].content


def test_a_corrupt_database_is_explained_and_only_moved_aside_when_asked(qtbot, qt_engine, paths):
    db = paths.data / "chats.db"
    db.write_bytes(b"definitely not sqlite " * 500)
    before = db.read_bytes()
    tab = make_tab(qtbot, qt_engine, paths)
    try:
        assert tab.pages.currentWidget() is tab.problem
        assert "cannot be read" in tab.problem.title.text()
        assert "not a SQLite database" in tab.problem.body.text() and "has not changed it" in tab.problem.body.text()
        assert db.read_bytes() == before
        tab.problem.move_button.click()
        moved = list(paths.data.glob("chats.db.unreadable-*"))
        assert len(moved) == 1 and moved[0].read_bytes() == before
        assert tab.pages.currentIndex() == 1 and str(moved[0]) in tab.notice_label.text()
    finally:
        tab.shutdown()


def test_a_locked_database_is_explained_and_opens_on_retry_with_nothing_lost(qtbot, qt_engine, paths):
    from studio.chatstore import ChatStore

    store = ChatStore(paths.data / "chats.db")
    store.add_message(store.create_thread("Precious").id, "user", "do not lose me")
    store.close()
    other = sqlite3.connect(str(paths.data / "chats.db"), isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    tab = make_tab(qtbot, qt_engine, paths)
    try:
        assert tab.pages.currentWidget() is tab.problem and "in use" in tab.problem.title.text()
        assert "locked by another program" in tab.problem.body.text()
        assert not tab.problem.move_button.isVisible()
        other.execute("ROLLBACK")
        other.close()
        tab.problem.retry_button.click()
        assert tab.pages.currentIndex() == 1 and tab.title_label.text() == "Precious"
        assert [b.msg.content for b in tab.view.bubbles.values()] == ["do not lose me"]
    finally:
        tab.shutdown()


def test_export_json_is_valid_json_with_the_format_marker(tab, tmp_path):
    t = tab.store.create_thread("J")
    tab.store.add_message(t.id, "user", "hi")
    data = json.loads(tab.export_thread(t.id, tmp_path / "j.json", "json").read_text())
    assert data["format"] == "studio-chat" and data["messages"][0]["content"] == "hi"


def test_the_model_picker_lists_installed_llms_and_a_chosen_one_answers(qtbot, qt_engine, paths):
    from library_fixtures import smollm2_gguf

    from studio.library.library import Library
    from studio.ui.chat.chat_tab import BUNDLED_LABEL, ChatTab

    lib = Library(paths.data / "library.db", paths.models)
    entry = lib.add(smollm2_gguf(), mode="inplace", name="my-smollm2")
    tab = ChatTab(qt_engine, paths, Settings(), library=lib)
    qtbot.addWidget(tab)
    try:
        combo = tab.model_combo
        assert [combo.itemText(i) for i in range(combo.count())] == [BUNDLED_LABEL, "my-smollm2", "Add server…"]
        greedy(tab, 16)
        combo.setCurrentIndex(1)
        combo.activated.emit(1)
        assert tab.store.thread(tab.thread_id).model == str(entry.path)
        type_and_enter(qtbot, tab, "What is the capital of France?")
        msg_id, status = wait_finished(qtbot, tab)
        assert status == "done" and tab.store.message(msg_id).stats["model"]
    finally:
        tab.shutdown()
        lib.close()


def test_a_missing_model_shows_inline_with_retry_and_nothing_is_lost(qtbot, tab, tmp_path):
    gone = str(tmp_path / "deleted-model.gguf")
    t = tab.store.create_thread("Old model", model=gone)
    tab._refresh_threads()
    tab.open_thread(t.id)
    assert tab.model_combo.currentText() == "deleted-model.gguf (not installed)"
    type_and_enter(qtbot, tab, "Hello?")
    msg_id, status = wait_finished(qtbot, tab)
    bubble = tab.view.bubbles[msg_id]
    assert status == "error" and tab.store.message(msg_id).error["kind"] == "model_not_found"
    assert bubble.error_box.isVisible() and "No model at" in bubble.error_label.text()
    assert bubble.retry_button.isVisible() and bubble.retry_button.isEnabled()
    assert [m.content for m in tab.store.messages(t.id)] == ["Hello?", ""]


def test_ctrl_n_starts_a_new_chat_but_never_a_second_empty_one(qtbot, tab):
    tab.store.add_message(tab.store.create_thread("Busy").id, "user", "hi")
    tab._refresh_threads()
    tab.open_thread(tab.store.threads()[0].id)
    qtbot.keyClick(tab.input, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    first = tab.thread_id
    assert tab.store.messages(first) == [] and tab.title_label.text() == "New chat"
    qtbot.keyClick(tab.input, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    assert tab.thread_id == first and len(tab.store.threads()) == 2


def test_switching_to_the_dark_theme_restyles_code_boxes(qtbot, tab, qapp):
    from studio.ui.theme import apply_theme

    t = tab.store.create_thread("Code")
    a = tab.store.add_message(t.id, "assistant", "```py\nx = 1\n```")
    tab.open_thread(t.id)
    light_html = tab.view.bubbles[a.id].body.toHtml()
    try:
        apply_theme(qapp, "dark")
        qtbot.waitUntil(lambda: tab.view.bubbles.get(a.id) is not None
                        and tab.view.bubbles[a.id].body.toHtml() != light_html, timeout=3000)
        assert "#17181b" in tab.view.bubbles[a.id].body.toHtml()
    finally:
        apply_theme(qapp, "light")


def test_settings_chosen_before_the_first_chat_exists_are_kept_for_it(tab):
    assert tab.thread_id is None and tab.store.threads() == []
    tab.settings_panel.fields["temperature"].setValue(0.3)
    tab.settings_panel.system.setPlainText("Answer like a pirate.")
    t = tab.new_chat()
    assert t.settings["temperature"] == 0.3 and t.system == "Answer like a pirate."
    assert tab.store.thread(t.id).settings["temperature"] == 0.3


def test_rename_in_place_and_pin_to_top(qtbot, tab):
    a = tab.store.create_thread("First")
    b = tab.store.create_thread("Second")
    tab._refresh_threads()
    tab.sidebar.start_rename(a.id)
    tab.sidebar.item_for(a.id).setText("Renamed")  # what committing the in-place editor does
    qtbot.waitUntil(lambda: tab.store.thread(a.id).title == "Renamed", timeout=2000)
    assert tab.sidebar.threads.item(0).data(Qt.ItemDataRole.UserRole) == b.id  # most recent first
    tab.sidebar.pin_requested.emit(a.id, True)
    top = tab.sidebar.threads.item(0)
    assert top.data(Qt.ItemDataRole.UserRole) == a.id and top.text() == "★ Renamed"


def test_a_database_locked_mid_answer_keeps_the_answer_and_saves_it_once_free(qtbot, tab, paths):
    greedy(tab, 24)
    type_and_enter(qtbot, tab, "What is the capital of France?")
    other = sqlite3.connect(str(paths.data / "chats.db"), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        msg_id, status = wait_finished(qtbot, tab)
        assert status == "done" and "Paris" in tab.view.bubbles[msg_id].body.toPlainText()
        assert tab.notice.isVisible() and "Could not save the chat" in tab.notice_label.text()
        type_and_enter(qtbot, tab, "And of Spain?")  # cannot be stored now: says so and keeps the text
        assert "could not be changed" in tab.notice_label.text() and tab.input.toPlainText() == "And of Spain?"
        assert not tab.busy
    finally:
        other.execute("ROLLBACK")
        other.close()
    qtbot.waitUntil(lambda: tab.store.message(msg_id).status == "done", timeout=5000)
    assert "Paris" in tab.store.message(msg_id).content and not tab.notice.isVisible()


def test_the_weights_choice_is_saved_with_the_chat_and_sent_with_its_jobs(tab, monkeypatch):
    panel = tab.settings_panel
    panel.quant.setCurrentIndex(panel.quant.findData("int4"))
    t = tab.new_chat()
    assert tab.store.thread(t.id).settings["quant"] == "int4"
    sent = []
    monkeypatch.setattr(tab.engine, "submit", lambda job: sent.append(job) or "job-1")
    tab._generate(t.id)
    assert sent and sent[0].quant == "int4"
    tab.settings_panel.load("", {})  # a chat saved before the choice existed: as stored
    assert panel.quant.currentData() == "" and panel.values()["quant"] == ""


# -- against a scripted engine: what the tab shows while an answer streams ------------------------------------

def test_loading_clears_on_the_first_token_and_the_context_footer_counts_while_streaming(qtbot, paths):
    from test_job_runner import ScriptedEngine

    engine = ScriptedEngine()
    tab = make_tab(qtbot, engine, paths)
    tab.input.setPlainText("hi")
    first = tab.send()
    job_id = engine.submitted[-1][0]
    engine.send("started", job_id=job_id)
    engine.send("progress", job_id=job_id, step=0, total=4, stage="loading")
    bubble = tab.view.bubbles[first]
    assert bubble.status_label.text() == "loading…"
    engine.send("token", job_id=job_id, text="Hel")
    assert bubble.status_label.text() != "loading…"
    qtbot.waitUntil(lambda: tab.context_label.text() != "Context: nothing used yet", timeout=2000)
    assert "1 tokens so far" in tab.context_label.text()
    stats = {"prompt_tokens": 10, "completion_tokens": 5, "context_length": 8192}
    engine.send("result", job_id=job_id, result={"text": "Hello", **stats})
    assert tab.context_label.text() == "Context: 15 / 8,192 tokens"

    tab.input.setPlainText("more")
    tab.send()
    job_id = engine.submitted[-1][0]
    for piece in ("a", "b", "c"):
        engine.send("token", job_id=job_id, text=piece)
    qtbot.waitUntil(lambda: tab.context_label.text() == "Context: about 18 / 8,192 tokens", timeout=2000)
    tab.shutdown()


def test_a_long_chat_title_does_not_squeeze_the_thread_list(qtbot, paths):
    from test_job_runner import ScriptedEngine

    tab = make_tab(qtbot, ScriptedEngine(), paths)
    title = "A very long chat title about planning a three week trip through Portugal and Spain by train"
    t = tab.new_chat()
    tab.rename_thread(t.id, title)
    tab.resize(760, 600)  # the window's width with the Models panel open beside the tab
    qtbot.wait(50)
    assert tab.sidebar.width() >= 240
    assert tab.title_label.toolTip() == title and tab.title_label.text() == title
    tab.shutdown()
