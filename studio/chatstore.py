"""Chat history in SQLite: threads, messages, the model and sampling settings used, FTS5 search.

Imports neither torch nor Qt. One file, WAL mode, a schema version table and a
backup copy before any migration. The user's file is never deleted or
overwritten: a file that is not a readable chat database raises ChatStoreError
and stays as it is; `move_aside` renames it only when the caller (the user)
asks for it.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from studio.fsutil import atomic_write

SQLITE_MAGIC = b"SQLite format 3\x00"
EXPORT_FORMAT = "studio-chat"
EXPORT_VERSION = 1

# A message's life: streaming while tokens arrive, then done / stopped (user cancel) / error /
# interrupted (the engine or the app died while it streamed).
STATUSES = ("streaming", "done", "stopped", "error", "interrupted")

INTERRUPTED_ON_EXIT = {"kind": "app_closed", "message": "Studio stopped before this answer was finished; "
                       "the text so far is kept. Retry answers again."}

# Sampling left at None is the model's own recommendation (resolved in the engine, engine/sampling.py).
MODEL_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
DEFAULT_SETTINGS: dict[str, Any] = {
    **dict.fromkeys(MODEL_DEFAULT_KEYS), "presence_penalty": 0.0, "seed": None, "max_tokens": 1024,
    "quant": "",  # "", "int8", "int4": how a full-precision model's weights are kept (GGUF keeps its own)
}


# What an imported chat's settings may hold: (description, check). Anything else is refused
# before it reaches the engine (a seed of 2^63 used to come back as an "internal" engine error).
def _number(lo: float, hi: float, lo_open: bool = False) -> Any:
    return lambda v: (type(v) in (int, float) and math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi)


def _integer(lo: int, hi: int) -> Any:
    return lambda v: type(v) is int and lo <= v <= hi


_SETTING_RULES: dict[str, tuple[str, Any]] = {
    "temperature": ("a number from 0 to 100", _number(0, 100)),
    "top_p": ("a number above 0, at most 1", _number(0, 1, lo_open=True)),
    "top_k": ("a whole number from 0 to 1,000,000", _integer(0, 1_000_000)),
    "min_p": ("a number from 0 to 1", _number(0, 1)),
    "repetition_penalty": ("a number above 0, at most 100", _number(0, 100, lo_open=True)),
    "presence_penalty": ("a number from -2 to 2", _number(-2, 2)),
    "seed": ("a whole number from 0 to 2^63-1", _integer(0, (1 << 63) - 1)),
    "max_tokens": ("a whole number from 1 to 2^31", _integer(1, 1 << 31)),
    "quant": ('"", "int8" or "int4"', lambda v: v in ("", "int8", "int4")),
}
_NULLABLE = (*MODEL_DEFAULT_KEYS, "seed")


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The known chat settings, each checked; ValueError names the first bad one."""
    out = {}
    for key, value in settings.items():
        if key not in DEFAULT_SETTINGS:
            continue
        if value is None and key in _NULLABLE:
            out[key] = None
            continue
        rule, ok = _SETTING_RULES[key]
        if not ok(value):
            raise ValueError(f"Setting {key} in this chat export is {str(value)[:40]}; it must be {rule}. "
                             "Fix it in the file, or remove it to use the default.")
        out[key] = value
    return out


def load_export(path: Path) -> Any:
    """The JSON of a chat export file. ValueError (with why) for anything unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("This file's JSON is nested too deeply to be a chat export.") from None
    except UnicodeDecodeError:
        raise ValueError("This file is not UTF-8 text, so it is not a chat export.") from None


def _flat(stats: Any) -> dict[str, Any]:
    """Message stats (tokens, speed) are flat numbers and text; anything nested is dropped."""
    if not isinstance(stats, dict):
        return {}
    keep = {k: v for k, v in stats.items() if isinstance(k, str)
            and (v is None or type(v) in (str, bool, int) or type(v) is float and math.isfinite(v))}
    return keep if len(keep) == len(stats) else {}


class ChatStoreError(Exception):
    """The chat database cannot be used. `kind` is "corrupt", "locked", "newer" or "io"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class Thread:
    id: int
    title: str
    created: float
    updated: float
    pinned: bool
    system: str
    model: str  # "" = the bundled SmolLM2, else a model path
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatMessage:
    id: int
    thread_id: int
    position: int
    role: str  # user / assistant
    content: str
    status: str
    created: float
    stats: dict[str, Any] = field(default_factory=dict)  # the engine's result: tokens/s, ttft, model...
    error: dict[str, Any] = field(default_factory=dict)  # {"kind", "message"} when status is error/interrupted


@dataclass
class SearchHit:
    thread_id: int
    message_id: int
    thread_title: str
    role: str
    snippet: str  # matched words between ⟦ ⟧ (rare in chats, unlike [ ])


# ---------------------------------------------------------------------------
# Schema: each migration takes the database from version i to i + 1.

_V1 = """
CREATE TABLE threads (
    id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0, system TEXT NOT NULL DEFAULT '', model TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}', deleted REAL);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, thread_id INTEGER NOT NULL REFERENCES threads(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, stats TEXT NOT NULL DEFAULT '{}', error TEXT NOT NULL DEFAULT '{}');
CREATE INDEX messages_thread ON messages(thread_id, position);
"""

# v2: full-text search kept in step with messages by triggers (external-content FTS5 table).
_V2 = """
CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id',
                                             tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END;
CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); END;
CREATE TRIGGER messages_au AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END;
INSERT INTO messages_fts(messages_fts) VALUES ('rebuild');
"""

MIGRATIONS: list[str] = [_V1, _V2]
SCHEMA_VERSION = len(MIGRATIONS)


def check_file(path: Path) -> None:
    """Refuse a file that is not SQLite before sqlite3 touches it (it would happily write into it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ChatStoreError("io", f"Cannot read the chat history {path}: {exc}.") from None
    if head and head != SQLITE_MAGIC:
        raise ChatStoreError("corrupt", f"The chat history {path} is not a SQLite database (it may have been "
                             "overwritten or damaged). Studio has not changed it.")


class ChatStore:
    """All chat persistence. Methods are called from the GUI thread; each write is one short transaction."""

    def __init__(self, path: Path, busy_timeout_s: float = 2.0, migrate: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_file(self.path)
        self.backup_path: Path | None = None  # set when a migration made a backup
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc) from None
        self.conn.row_factory = sqlite3.Row
        try:
            self._open(migrate)
        except sqlite3.Error as exc:
            self.conn.close()
            raise _store_error(self.path, exc) from None
        except ChatStoreError:
            self.conn.close()
            raise

    def _open(self, migrate: bool) -> None:
        c = self.conn
        # Reading the schema is the first real access: a locked or damaged file fails here, before any write.
        c.execute("SELECT count(*) FROM sqlite_master").fetchone()
        ok = c.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise ChatStoreError("corrupt", f"The chat history {self.path} is damaged ({ok}). Studio has not "
                                 "changed it.")
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA foreign_keys=ON")
        c.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash of the app loses nothing committed
        # Opening waits up to busy_timeout_s for a passing lock; later writes run on the GUI thread, so they
        # give up after a quarter second and the caller retries instead of freezing the window.
        c.execute("PRAGMA busy_timeout=250")
        version = self._version()
        if version > SCHEMA_VERSION:
            raise ChatStoreError("newer", f"The chat history {self.path} was written by a newer Studio (schema "
                                 f"{version}, this one knows {SCHEMA_VERSION}). Update Studio to open it.")
        if version < SCHEMA_VERSION and migrate:
            self._migrate(version)
        # Anything still streaming was cut off when the app or the engine last stopped.
        with self._tx():
            c.execute("UPDATE messages SET status='interrupted', error=? WHERE status='streaming'",
                      (json.dumps(INTERRUPTED_ON_EXIT),))
            c.execute("DELETE FROM threads WHERE deleted IS NOT NULL")  # undo only lasts one session

    def _version(self) -> int:
        c = self.conn
        if not c.execute("SELECT 1 FROM sqlite_master WHERE name='schema_version'").fetchone():
            return 0
        row = c.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self, version: int) -> None:
        has_data = self.conn.execute("SELECT 1 FROM sqlite_master WHERE name='threads'").fetchone()
        if has_data:
            self.backup_path = self._backup(version)
        for i in range(version, SCHEMA_VERSION):
            with self._tx():
                for stmt in _statements(MIGRATIONS[i]):
                    self.conn.execute(stmt)
                self.conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                self.conn.execute("DELETE FROM schema_version")
                self.conn.execute("INSERT INTO schema_version VALUES (?)", (i + 1,))

    def _backup(self, version: int) -> Path:
        """A full copy (WAL included, via the backup API) next to the file, never over an existing one."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        dest = _free_name(self.path.with_name(f"{self.path.name}.v{version}-backup-{stamp}"))
        target = sqlite3.connect(str(dest))
        try:
            self.conn.backup(target)
        finally:
            target.close()
        return dest

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # -- threads ---------------------------------------------------------------------------------
    def create_thread(self, title: str = "New chat", system: str = "", model: str = "",
                      settings: dict[str, Any] | None = None) -> Thread:
        now = time.time()
        merged = {**DEFAULT_SETTINGS, **(settings or {})}
        with self._tx() as c:
            cur = c.execute("INSERT INTO threads (title, created, updated, system, model, settings) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (title, now, now, system, model, json.dumps(merged)))
        return self.thread(cur.lastrowid)

    def thread(self, thread_id: int) -> Thread:
        row = self.conn.execute("SELECT * FROM threads WHERE id=?", (thread_id,)).fetchone()
        if row is None:
            raise KeyError(f"no chat thread {thread_id}")
        return _thread(row)

    def threads(self) -> list[Thread]:
        """Pinned first, then the most recently active."""
        rows = self.conn.execute("SELECT * FROM threads WHERE deleted IS NULL "
                                 "ORDER BY pinned DESC, updated DESC, id DESC").fetchall()
        return [_thread(r) for r in rows]

    def update_thread(self, thread_id: int, *, title: str | None = None, pinned: bool | None = None,
                      system: str | None = None, model: str | None = None,
                      settings: dict[str, Any] | None = None) -> Thread:
        sets, args = [], []
        for name, value in (("title", title), ("pinned", None if pinned is None else int(pinned)),
                            ("system", system), ("model", model),
                            ("settings", None if settings is None else json.dumps(settings))):
            if value is not None:
                sets.append(f"{name}=?")
                args.append(value)
        if sets:
            with self._tx() as c:
                c.execute(f"UPDATE threads SET {', '.join(sets)} WHERE id=?", (*args, thread_id))
        return self.thread(thread_id)

    def delete_thread(self, thread_id: int) -> None:
        """Hidden at once; gone for good at the next open or `purge_deleted` (undo until then)."""
        with self._tx() as c:
            c.execute("UPDATE threads SET deleted=? WHERE id=?", (time.time(), thread_id))

    def undelete_thread(self, thread_id: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE threads SET deleted=NULL WHERE id=?", (thread_id,))

    def purge_deleted(self) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM threads WHERE deleted IS NOT NULL")

    # -- messages ----------------------------------------------------------------------------------
    def add_message(self, thread_id: int, role: str, content: str, status: str = "done") -> ChatMessage:
        if status not in STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        now = time.time()
        with self._tx() as c:
            pos = c.execute("SELECT coalesce(max(position), -1) + 1 FROM messages WHERE thread_id=?",
                            (thread_id,)).fetchone()[0]
            cur = c.execute("INSERT INTO messages (thread_id, position, role, content, status, created) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (thread_id, pos, role, content, status, now))
            c.execute("UPDATE threads SET updated=? WHERE id=?", (now, thread_id))
        return self.message(cur.lastrowid)

    def message(self, message_id: int) -> ChatMessage:
        row = self.conn.execute("SELECT * FROM messages WHERE id=?", (message_id,)).fetchone()
        if row is None:
            raise KeyError(f"no chat message {message_id}")
        return _message(row)

    def messages(self, thread_id: int) -> list[ChatMessage]:
        rows = self.conn.execute("SELECT * FROM messages WHERE thread_id=? ORDER BY position",
                                 (thread_id,)).fetchall()
        return [_message(r) for r in rows]

    def update_message(self, message_id: int, *, content: str | None = None, status: str | None = None,
                       stats: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
        """One short transaction: the streaming answer is saved through this a few times a second."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        sets, args = [], []
        for name, value in (("content", content), ("status", status),
                            ("stats", None if stats is None else json.dumps(stats)),
                            ("error", None if error is None else json.dumps(error))):
            if value is not None:
                sets.append(f"{name}=?")
                args.append(value)
        if sets:
            with self._tx() as c:
                c.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id=?", (*args, message_id))

    def delete_from(self, thread_id: int, position: int) -> None:
        """Drop the message at `position` and everything after it (regenerate, edit and continue)."""
        with self._tx() as c:
            c.execute("DELETE FROM messages WHERE thread_id=? AND position>=?", (thread_id, position))

    # -- search ------------------------------------------------------------------------------------------
    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Every word must match (prefix match on the last one, for search-as-you-type)."""
        fts = fts_query(query)
        if not fts:
            return []
        rows = self.conn.execute(
            "SELECT m.id, m.thread_id, m.role, t.title, snippet(messages_fts, 0, '⟦', '⟧', '…', 12) AS snip "
            "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid JOIN threads t ON t.id = m.thread_id "
            "WHERE messages_fts MATCH ? AND t.deleted IS NULL ORDER BY rank LIMIT ?", (fts, limit)).fetchall()
        return [SearchHit(r["thread_id"], r["id"], r["title"], r["role"], r["snip"]) for r in rows]

    # -- export / import -------------------------------------------------------------------------------
    def export_json(self, thread_id: int) -> dict[str, Any]:
        t = self.thread(thread_id)
        return {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "title": t.title, "created": t.created,
            "system": t.system, "model": t.model, "settings": t.settings,
            "messages": [{"role": m.role, "content": m.content, "status": m.status, "created": m.created,
                          "stats": m.stats} for m in self.messages(thread_id)],
        }

    def export_markdown(self, thread_id: int) -> str:
        t = self.thread(thread_id)
        out = [f"# {t.title}", ""]
        when = datetime.fromtimestamp(t.created).strftime("%Y-%m-%d %H:%M")
        out += [f"*{when} · model: {t.model or 'SmolLM2 (bundled)'}*", ""]
        if t.system:
            out += ["> **System:** " + t.system.replace("\n", "\n> "), ""]
        for m in self.messages(thread_id):
            out += [f"## {'You' if m.role == 'user' else 'Assistant'}", "", m.content.rstrip(), ""]
            if m.status in ("interrupted", "stopped"):
                out += [f"*({m.status})*", ""]
        return "\n".join(out).rstrip() + "\n"

    def export_file(self, thread_id: int, path: Path, fmt: str) -> Path:
        """Write the thread as "md" or "json"; written to a temporary file first, so a failure leaves no half file."""
        if fmt == "json":
            text = json.dumps(self.export_json(thread_id), indent=2, ensure_ascii=False) + "\n"
        else:
            text = self.export_markdown(thread_id)
        return atomic_write(Path(path), text)

    def import_json(self, data: Any) -> Thread:
        """Always a new thread, whatever the file says; checked fully before anything is written."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ValueError("This file is not a Studio chat export (its \"format\" is not \"studio-chat\").")
        if data.get("version") != EXPORT_VERSION:
            raise ValueError(f"This chat export has version {data.get('version')!r}; this Studio reads version "
                             f"{EXPORT_VERSION}.")
        msgs = data.get("messages")
        if not isinstance(msgs, list):
            raise ValueError("This chat export has no list of messages.")
        clean = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ("user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"Message {i + 1} of the export is not a user/assistant message with text.")
            status = m.get("status") if m.get("status") in STATUSES else "done"
            clean.append((m["role"], m["content"], "interrupted" if status == "streaming" else status,
                          _flat(m.get("stats"))))
        title = data.get("title") if isinstance(data.get("title"), str) else "Imported chat"
        settings = check_settings(data.get("settings") if isinstance(data.get("settings"), dict) else {})
        system = data.get("system") if isinstance(data.get("system"), str) else ""
        model = data.get("model") if isinstance(data.get("model"), str) else ""
        now = time.time()
        with self._tx() as c:
            cur = c.execute("INSERT INTO threads (title, created, updated, system, model, settings) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (title, now, now, system, model, json.dumps({**DEFAULT_SETTINGS, **settings})))
            tid = cur.lastrowid
            for pos, (role, content, status, stats) in enumerate(clean):
                c.execute("INSERT INTO messages (thread_id, position, role, content, status, created, stats) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)", (tid, pos, role, content, status, now, json.dumps(stats)))
        return self.thread(tid)


def move_aside(path: Path) -> Path:
    """Rename an unusable database (and its -wal/-shm) to a timestamped name; nothing is deleted."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    dest = _free_name(path.with_name(f"{path.name}.unreadable-{stamp}"))
    os.replace(path, dest)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, dest.with_name(dest.name + suffix))
    return dest


def fts_query(text: str) -> str:
    """User text -> an FTS5 query of quoted terms, so quotes, AND, NEAR or * typed by the user are plain words."""
    words = [w for w in text.split() if w.strip('"')]
    if not words:
        return ""
    terms = ['"' + w.replace('"', '""') + '"' for w in words]
    terms[-1] += "*"
    return " ".join(terms)


def _statements(script: str) -> list[str]:
    """Split a migration into statements; trigger bodies hold semicolons, so split on complete statements."""
    out, buf = [], ""
    for line in script.strip().splitlines():
        buf += line + "\n"
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out


def _store_error(path: Path, exc: sqlite3.Error) -> ChatStoreError:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return ChatStoreError("locked", f"The chat history {path} is locked by another program (another Studio "
                              "window?). Close it and try again; nothing was changed.")
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text
                                                   or "corrupt" in text):
        return ChatStoreError("corrupt", f"The chat history {path} is damaged ({exc}). Studio has not changed it.")
    return ChatStoreError("io", f"Cannot open the chat history {path}: {exc}.")


def _free_name(dest: Path) -> Path:
    n, candidate = 1, dest
    while candidate.exists():
        candidate = dest.with_name(f"{dest.name}-{n}")
        n += 1
    return candidate


# Every thread made before "model default" existed stored these; nobody chose them, so they mean
# what a new chat means (the bundled 135M model answers nonsense at 0.7).
_OLD_DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.0}


def _thread(r: sqlite3.Row) -> Thread:
    settings = {**DEFAULT_SETTINGS, **json.loads(r["settings"] or "{}")}
    if all(settings.get(k) == v for k, v in _OLD_DEFAULTS.items()):
        settings.update(dict.fromkeys(_OLD_DEFAULTS))
    return Thread(r["id"], r["title"], r["created"], r["updated"], bool(r["pinned"]), r["system"], r["model"],
                  settings)


def _message(r: sqlite3.Row) -> ChatMessage:
    return ChatMessage(r["id"], r["thread_id"], r["position"], r["role"], r["content"], r["status"], r["created"],
                       json.loads(r["stats"] or "{}"), json.loads(r["error"] or "{}"))
