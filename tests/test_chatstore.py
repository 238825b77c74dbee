"""The chat store without Qt: persistence, interrupted answers, FTS5 search, export/import, migrations,
and databases that are corrupt or locked."""

from __future__ import annotations

import json
import sqlite3

import pytest

from studio.chatstore import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ChatStore,
    ChatStoreError,
    fts_query,
    move_aside,
)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "chats.db"


def test_threads_and_messages_survive_reopening(db):
    s = ChatStore(db)
    t = s.create_thread("Capitals", system="Be brief.", model="", settings={"temperature": 0.0})
    s.add_message(t.id, "user", "What is the capital of France?")
    a = s.add_message(t.id, "assistant", "", status="streaming")
    s.update_message(a.id, content="Paris.", status="done", stats={"tokens_per_s": 70.0, "ttft_s": 0.05})
    s.close()

    s = ChatStore(db)
    [t2] = s.threads()
    assert (t2.title, t2.system, t2.settings["temperature"], t2.settings["top_k"]) == ("Capitals", "Be brief.", 0.0, None)
    msgs = s.messages(t2.id)
    assert [(m.role, m.content, m.status) for m in msgs] == [
        ("user", "What is the capital of France?", "done"), ("assistant", "Paris.", "done")]
    assert msgs[1].stats["tokens_per_s"] == 70.0
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_an_answer_still_streaming_when_the_app_died_reopens_as_interrupted(db):
    s = ChatStore(db)
    t = s.create_thread()
    s.add_message(t.id, "user", "Tell me a story")
    a = s.add_message(t.id, "assistant", "", status="streaming")
    s.update_message(a.id, content="Once upon a")
    # No close: the process "dies" with the row still marked streaming.
    s2 = ChatStore(db)
    m = s2.message(a.id)
    assert (m.content, m.status, m.error["kind"]) == ("Once upon a", "interrupted", "app_closed")


def test_pinned_threads_come_first_then_most_recent(db):
    s = ChatStore(db)
    a = s.create_thread("a")
    s.create_thread("b")
    c = s.create_thread("c")
    s.add_message(a.id, "user", "newest activity")
    s.update_thread(c.id, pinned=True)
    assert [t.title for t in s.threads()] == ["c", "a", "b"]


def test_delete_can_be_undone_until_the_next_open(db):
    s = ChatStore(db)
    t = s.create_thread("keep me")
    s.add_message(t.id, "user", "hello")
    s.delete_thread(t.id)
    assert s.threads() == []
    s.undelete_thread(t.id)
    assert [x.title for x in s.threads()] == ["keep me"] and len(s.messages(t.id)) == 1
    s.delete_thread(t.id)
    s.close()
    s = ChatStore(db)
    assert s.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0  # cascade removed them


def test_delete_from_drops_the_message_and_everything_after(db):
    s = ChatStore(db)
    t = s.create_thread()
    for i in range(4):
        s.add_message(t.id, "user" if i % 2 == 0 else "assistant", f"m{i}")
    s.delete_from(t.id, 2)
    assert [m.content for m in s.messages(t.id)] == ["m0", "m1"]
    assert s.add_message(t.id, "user", "again").position == 2


def test_search_finds_words_across_threads_and_follows_edits(db):
    s = ChatStore(db)
    t1 = s.create_thread("Cooking")
    t2 = s.create_thread("Travel")
    m = s.add_message(t1.id, "user", "How long do I boil an egg?")
    s.add_message(t2.id, "assistant", "Lisbon has lovely trams.")
    [hit] = s.search("egg")
    assert (hit.thread_id, hit.message_id, hit.thread_title) == (t1.id, m.id, "Cooking")
    assert "⟦egg⟧" in hit.snippet
    assert [h.thread_title for h in s.search("tram")] == ["Travel"]  # prefix match while typing
    s.update_message(m.id, content="How long do I poach a fish?")
    assert s.search("egg") == [] and len(s.search("fish")) == 1
    s.delete_thread(t2.id)
    assert s.search("lisbon") == []


def test_search_treats_fts_syntax_as_plain_words(db):
    s = ChatStore(db)
    t = s.create_thread()
    s.add_message(t.id, "user", 'He said "NEAR" AND left')
    assert len(s.search('"NEAR" AND')) == 1
    assert s.search('"') == [] and s.search("   ") == []
    assert fts_query('a "b') == '"a" """b"*'


def test_export_json_import_round_trips_as_a_new_thread(db):
    s = ChatStore(db)
    t = s.create_thread("Round trip", system="You are terse.", model="/models/x.gguf",
                        settings={"temperature": 0.2, "max_tokens": 64})
    s.add_message(t.id, "user", "Hi **there**\n\n```py\nprint(1)\n```")
    a = s.add_message(t.id, "assistant", "Hello.")
    s.update_message(a.id, stats={"completion_tokens": 2})
    data = json.loads(json.dumps(s.export_json(t.id)))
    t2 = s.import_json(data)
    assert t2.id != t.id and len(s.threads()) == 2
    assert (t2.title, t2.system, t2.model, t2.settings) == (t.title, t.system, t.model, s.thread(t.id).settings)
    assert [(m.role, m.content, m.stats) for m in s.messages(t2.id)] == [
        (m.role, m.content, m.stats) for m in s.messages(t.id)]


def test_export_markdown_has_title_roles_and_code(db):
    s = ChatStore(db)
    t = s.create_thread("MD", system="Be kind.")
    s.add_message(t.id, "user", "Show code")
    s.add_message(t.id, "assistant", "```py\nprint(1)\n```", status="interrupted")
    md = s.export_markdown(t.id)
    assert md.startswith("# MD\n")
    assert "> **System:** Be kind." in md and "## You\n\nShow code" in md
    assert "## Assistant\n\n```py\nprint(1)\n```\n\n*(interrupted)*" in md


@pytest.mark.parametrize("data, words", [
    ({"format": "other"}, "not a Studio chat export"),
    ({"format": "studio-chat", "version": 9, "messages": []}, "version 9"),
    ({"format": "studio-chat", "version": 1, "messages": [{"role": "system", "content": "x"}]}, "Message 1"),
])
def test_import_refuses_bad_files_and_writes_nothing(db, data, words):
    s = ChatStore(db)
    with pytest.raises(ValueError, match=words):
        s.import_json(data)
    assert s.threads() == []


def test_a_file_that_is_not_sqlite_is_refused_and_left_untouched(db):
    db.write_bytes(b"these are my notes, not a database\n" * 100)
    before = db.read_bytes()
    with pytest.raises(ChatStoreError) as err:
        ChatStore(db)
    assert err.value.kind == "corrupt" and "not a SQLite database" in err.value.message
    assert db.read_bytes() == before
    moved = move_aside(db)
    assert not db.exists() and moved.read_bytes() == before and ".unreadable-" in moved.name
    ChatStore(db).close()  # a fresh history starts in its place


def test_a_damaged_sqlite_file_is_refused_and_left_untouched(db):
    s = ChatStore(db)
    t = s.create_thread()
    for i in range(200):
        s.add_message(t.id, "user", f"message number {i} " * 20)
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    raw = bytearray(db.read_bytes())
    raw[4096 * 2:4096 * 4] = b"\xff" * 8192  # smash two pages in the middle, keep the header
    db.write_bytes(bytes(raw))
    with pytest.raises(ChatStoreError) as err:
        ChatStore(db)
    assert err.value.kind == "corrupt" and "Studio has not changed it" in err.value.message
    assert db.read_bytes() == bytes(raw)


def test_a_locked_database_says_so_and_keeps_the_data(db):
    s = ChatStore(db)
    s.add_message(s.create_thread("mine").id, "user", "precious")
    s.close()
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ChatStoreError) as err:
            ChatStore(db, busy_timeout_s=0.2)
        assert err.value.kind == "locked" and "locked by another program" in err.value.message
    finally:
        other.execute("ROLLBACK")
        other.close()
    s = ChatStore(db)
    assert [m.content for m in s.messages(s.threads()[0].id)] == ["precious"]


def test_migration_from_an_older_schema_makes_a_backup_first_and_keeps_data(db):
    old = sqlite3.connect(str(db), isolation_level=None)
    old.executescript(MIGRATIONS[0])
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version VALUES (1)")
    old.execute("INSERT INTO threads (title, created, updated) VALUES ('old', 0, 0)")
    old.execute("INSERT INTO messages (thread_id, position, role, content, status, created) "
                "VALUES (1, 0, 'user', 'an ancient question about volcanoes', 'done', 0)")
    old.close()
    s = ChatStore(db)
    assert s.backup_path is not None and s.backup_path.exists()
    b = sqlite3.connect(str(s.backup_path))
    assert b.execute("SELECT version FROM schema_version").fetchone()[0] == 1
    assert b.execute("SELECT content FROM messages").fetchone()[0].startswith("an ancient")
    b.close()
    assert s.conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    assert [h.thread_title for h in s.search("volcanoes")] == ["old"]  # the new FTS index covers old rows


def test_a_new_database_needs_no_backup_and_a_newer_one_is_refused(db):
    s = ChatStore(db)
    assert s.backup_path is None
    s.conn.execute("UPDATE schema_version SET version=99")
    s.close()
    with pytest.raises(ChatStoreError) as err:
        ChatStore(db)
    assert err.value.kind == "newer"


def test_export_file_writes_whole_files_and_leaves_no_temporary_behind(db, tmp_path):
    s = ChatStore(db)
    t = s.create_thread("File")
    s.add_message(t.id, "user", "héllo")
    out = tmp_path / "out"
    out.mkdir()
    assert json.loads(s.export_file(t.id, out / "a.json", "json").read_text(encoding="utf-8"))["title"] == "File"
    assert s.export_file(t.id, out / "a.md", "md").read_text(encoding="utf-8").startswith("# File")
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.md"]
    with pytest.raises(OSError):
        s.export_file(t.id, tmp_path / "missing-folder" / "a.md", "md")
