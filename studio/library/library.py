"""The installed-model library: an SQLite table of files and folders Studio knows about.

Models are registered in place by default (no duplicate multi-GB copies); copying into the
models folder is atomic (temp name, then a no-overwrite rename) and checks free space first.
sha256 is computed in the background because hashing 20 GB takes minutes; it spots duplicates
and records exactly which model made an output. One connection guarded by a lock, WAL mode,
every write in a transaction: a crash loses nothing that was committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.library.detect import Detection, detect
from studio.library.headers import WEIGHT_SUFFIXES, HeaderError, open_regular
from studio.paths import Paths

SCHEMA_VERSION = 1
FREE_SPACE_MARGIN = 256 << 20  # leave room for the OS and the database after a copy
_HASH_CHUNK = 8 << 20
Progress = Callable[[float, str], None]  # (fraction 0..1, stage)

# mode: inplace | copy | link. source: the scanned folder that registered it, '' when added by hand.
# detection: the full Detection as JSON. No SQL comments: the script is split on ';'.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    sha256 TEXT,
    family TEXT NOT NULL,
    variant TEXT NOT NULL,
    role TEXT NOT NULL,
    format TEXT NOT NULL,
    family_override TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    added REAL NOT NULL,
    mode TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    missing INTEGER NOT NULL DEFAULT 0,
    detection TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS models_sha256 ON models(sha256);
CREATE INDEX IF NOT EXISTS models_source ON models(source);
"""


class LibraryError(ValueError):
    """A library operation that cannot be done; the message says why and what to do."""


@dataclass
class ModelEntry:
    id: int
    name: str
    path: Path
    size: int
    mtime: float
    sha256: str | None
    family: str  # as detected
    variant: str
    role: str
    format: str
    family_override: str | None
    tags: list[str]
    added: float
    mode: str
    source: str
    missing: bool
    detection: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_family(self) -> str:
        return self.family_override or self.family

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("id", "name", "size", "mtime", "sha256", "family", "variant", "role",
                                           "format", "family_override", "tags", "added", "mode", "source",
                                           "missing", "detection")}
        d["path"] = str(self.path)
        d["effective_family"] = self.effective_family
        return d


def _row_entry(r: sqlite3.Row) -> ModelEntry:
    return ModelEntry(r["id"], r["name"], Path(r["path"]), r["size"], r["mtime"], r["sha256"], r["family"],
                      r["variant"], r["role"], r["format"], r["family_override"], json.loads(r["tags"]),
                      r["added"], r["mode"], r["source"], bool(r["missing"]), json.loads(r["detection"]))


def weight_files(path: Path) -> list[Path]:
    """The files that make up a model: the file itself, or a folder's weight files."""
    if path.is_file():
        return [path]
    if not path.is_dir():  # gone, or a FIFO / device put in its place: nothing to hash or size
        raise OSError(f"{path}: not a regular file or folder")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + (".json",))


def path_stat(path: Path) -> tuple[int, float]:
    files = weight_files(path)
    return sum(f.stat().st_size for f in files), max((f.stat().st_mtime for f in files), default=0.0)


def sha256_of(path: Path, progress: Progress | None = None, stop: threading.Event | None = None) -> str:
    """sha256 of a file; of a folder, over its files' relative names and contents."""
    files = weight_files(path)
    total = max(1, sum(f.stat().st_size for f in files))
    done = 0
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        try:
            fh = open_regular(f)  # a FIFO put in a model's place would block this thread for good
        except HeaderError as e:
            raise OSError(str(e)) from None
        with fh:
            while chunk := fh.read(_HASH_CHUNK):
                if stop is not None and stop.is_set():
                    raise LibraryError("hashing stopped")
                h.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done / total, "hashing")
    return h.hexdigest()


class Library:
    """Installed models. Thread-safe; one per process is enough."""

    def __init__(self, db_path: Path | None = None, models_dir: Path | None = None) -> None:
        paths = Paths.default()
        self.db_path = Path(db_path) if db_path else paths.data / "library.db"
        if models_dir is None:  # the folder chosen in Settings (first-run card), so the CLI installs there too
            from studio.settings import Settings

            models_dir = Settings.load(paths).models_path(paths)
        self.models_dir = Path(models_dir)
        self._lock = threading.RLock()
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._tx() as db:
                for statement in _SCHEMA.split(";"):  # executescript would commit mid-transaction
                    if statement.strip():
                        db.execute(statement)
                row = db.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise LibraryError(f"{self.db_path} was written by a newer Studio (schema {row[0]}); "
                                       "update Studio")
        except (OSError, sqlite3.Error) as e:
            raise LibraryError(f"cannot open the model library at {self.db_path}: {e}. Check that the folder "
                               "is writable (or set STUDIO_HOME to a writable folder)") from None

    # -- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise LibraryError(f"model library read failed ({e}); {self.db_path} may be damaged") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ------------------------------------------------------------------------------

    def list(self, role: str | None = None, family: str | None = None,
             include_missing: bool = True) -> list[ModelEntry]:
        rows = self._query("SELECT * FROM models ORDER BY role, name")
        out = [_row_entry(r) for r in rows]
        return [e for e in out if (role is None or e.role == role) and (include_missing or not e.missing)
                and (family is None or e.effective_family == family)]

    def get(self, name_or_id: str | int) -> ModelEntry | None:
        """An entry by id (an int, or the string "#<id>"), else by exact name, else by path.

        A string of digits is a name, never an id: a file called `1.safetensors` is the model "1",
        and confusing the two once deleted the wrong user's file."""
        entry_id = parse_id(name_or_id)
        if entry_id is not None:
            rows = self._query("SELECT * FROM models WHERE id = ?", (entry_id,))
            return _row_entry(rows[0]) if rows else None
        rows = self._query("SELECT * FROM models WHERE name = ?", (str(name_or_id),))
        if not rows:
            rows = self._query("SELECT * FROM models WHERE path = ?", (_canonical(str(name_or_id)),))
        return _row_entry(rows[0]) if rows else None

    def _need(self, name_or_id: str | int) -> ModelEntry:
        e = self.get(name_or_id)
        if e is None:
            what = f"with id {parse_id(name_or_id)}" if parse_id(name_or_id) is not None else f"named {name_or_id!r}"
            raise LibraryError(f"no model {what} in the library; `studio models list` shows them "
                               "(give a name, or #ID for an id)")
        return e

    def resolve(self, name_or_path: str | Path) -> Path:
        """A library name (or id, or a path) -> the file or folder to load."""
        e = self.get(str(name_or_path))
        if e is not None:
            if not e.path.exists():
                raise LibraryError(f"model {e.name!r} is registered at {e.path} but it is gone; "
                                   "put it back, rescan its folder, or remove it from the library")
            return e.path
        p = Path(name_or_path).expanduser()
        if p.exists():
            return p
        raise LibraryError(f"no model named {str(name_or_path)!r} and no such file; "
                           "`studio models list` shows installed models")

    def find_duplicates(self) -> list[list[ModelEntry]]:
        rows = self._query("SELECT sha256 FROM models WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING COUNT(*) > 1")
        return [[_row_entry(r) for r in self._query("SELECT * FROM models WHERE sha256 = ? ORDER BY id", (row[0],))]
                for row in rows]

    # -- changes ------------------------------------------------------------------------------

    def add(self, path: str | Path, mode: str = "inplace", family: str | None = None,
            tags: list[str] | tuple[str, ...] = (), name: str | None = None, detection: Detection | None = None,
            progress: Progress | None = None, source: str = "", exist_ok: bool = False) -> ModelEntry:
        """Register a model file or folder. Detection failures raise HeaderError; nothing changes then."""
        if mode not in ("inplace", "copy", "link"):
            raise LibraryError(f"unknown mode {mode!r}: use inplace, copy or link")
        if name is not None and (not name.strip() or name.startswith("#")):
            raise LibraryError(f"{name!r} cannot be a model name: names are not empty and do not start "
                               "with '#' (that form means an id)")
        given = Path(path).expanduser()
        if not given.exists():
            raise LibraryError(f"{given}: no such file or folder")
        src = Path(_canonical(str(given)))
        existing = self.get(str(src))
        if existing is not None:
            if exist_ok:
                return existing
            raise LibraryError(f"{src} is already in the library as {existing.name!r}")
        det = detection or detect(src)
        if progress:
            progress(0.0, "detected")
        target = src if mode == "inplace" else self._install(src, det, mode, progress)
        try:
            size, mtime = path_stat(target)
            with self._tx() as db:
                entry_name = self._unique_name(name or _default_name(given))
                db.execute(
                    "INSERT INTO models (name, path, size, mtime, family, variant, role, format, family_override,"
                    " tags, added, mode, source, detection) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (entry_name, str(target), size, mtime, det.family, det.variant, det.role, det.format, family,
                     json.dumps(list(tags)), time.time(), mode, source, json.dumps(det.to_dict())))
        except (sqlite3.Error, UnicodeEncodeError) as e:
            if mode != "inplace":  # do not leave a copy the library does not know about
                _remove_path(target)
            raise LibraryError(f"could not record {src} in the library ({e}); check that {self.db_path.parent} "
                               "is writable and the name is valid UTF-8") from None
        if progress:
            progress(1.0, "added")
        return self._need(entry_name)

    def ensure_bundled(self) -> ModelEntry | None:
        """Register the bundled chat model (tag and source "bundled") so it is listed like any other, and
        forget an entry left from where it was before (a moved venv). None when it is not installed."""
        from studio.library.bundled import BUNDLED_NAME, BUNDLED_SOURCE, find_bundled

        path, _ = find_bundled()
        current = _canonical(str(path)) if path is not None else None
        for e in self.list():
            if e.source == BUNDLED_SOURCE and str(e.path) != current:
                self.remove(e.id)  # never deletes the file: the entry is in place
        if path is None:
            return None
        return self.add(path, name=BUNDLED_NAME, tags=["bundled"], source=BUNDLED_SOURCE, exist_ok=True)

    def remove(self, name_or_id: str | int, delete_file: bool = False) -> ModelEntry:
        """Forget a model. Its file is deleted only when asked; a link Studio made is always removed.

        Deleting needs the exact entry: an id, or a name that is exactly the entry's name (a path
        or anything else that merely resolves to some entry is refused)."""
        e = self._need(name_or_id)
        if delete_file and parse_id(name_or_id) is None and str(name_or_id) != e.name:
            raise LibraryError(f"{name_or_id!r} is not the exact name of a model; to delete its file give "
                               f"the name {e.name!r} or the id #{e.id}")
        with self._tx() as db:
            db.execute("DELETE FROM models WHERE id = ?", (e.id,))
        if e.mode == "link" and e.path.is_symlink():
            e.path.unlink()  # only the link: the file it points to stays
        elif delete_file:
            _remove_path(e.path)
        return e

    def override_family(self, name_or_id: str | int, family: str | None) -> ModelEntry:
        e = self._need(name_or_id)
        with self._tx() as db:
            db.execute("UPDATE models SET family_override = ? WHERE id = ?", (family or None, e.id))
        return self._need(e.id)

    def set_tags(self, name_or_id: str | int, tags: list[str]) -> ModelEntry:
        e = self._need(name_or_id)
        with self._tx() as db:
            db.execute("UPDATE models SET tags = ? WHERE id = ?", (json.dumps(sorted(set(tags))), e.id))
        return self._need(e.id)

    def set_missing(self, ids: list[int], missing: bool) -> None:
        with self._tx() as db:
            db.executemany("UPDATE models SET missing = ? WHERE id = ?", [(int(missing), i) for i in ids])

    def update_detection(self, entry_id: int, det: Detection) -> None:
        """A file changed on disk: new detection, size and mtime; the old hash no longer holds."""
        e = self._need(entry_id)
        size, mtime = path_stat(e.path)
        with self._tx() as db:
            db.execute("UPDATE models SET family=?, variant=?, role=?, format=?, detection=?, size=?, mtime=?,"
                       " sha256=NULL, missing=0 WHERE id=?",
                       (det.family, det.variant, det.role, det.format, json.dumps(det.to_dict()), size, mtime,
                        entry_id))

    def hash_entry(self, name_or_id: str | int, progress: Progress | None = None,
                   stop: threading.Event | None = None) -> str:
        e = self._need(name_or_id)
        digest = sha256_of(e.path, progress, stop)
        with self._tx() as db:
            db.execute("UPDATE models SET sha256 = ? WHERE id = ?", (digest, e.id))
        return digest

    def hash_pending(self, progress: Callable[[str, float], None] | None = None,
                     stop: threading.Event | None = None) -> int:
        """Hash every present model without a sha256. Returns how many were hashed."""
        todo = [e for e in self.list() if e.sha256 is None and not e.missing]
        for e in todo:
            if stop is not None and stop.is_set():
                break
            cb = (lambda f, _s, n=e.name: progress(n, f)) if progress else None
            try:
                self.hash_entry(e.id, cb, stop)
            except OSError:
                continue  # unreadable now (unplugged drive); tried again next time
        return len(todo)

    def start_hashing(self, progress: Callable[[str, float], None] | None = None) -> tuple[threading.Thread,
                                                                                          threading.Event]:
        """hash_pending in a background thread; set the returned event to stop it."""
        stop = threading.Event()
        t = threading.Thread(target=self.hash_pending, args=(progress, stop), name="library-hash", daemon=True)
        t.start()
        return t, stop

    # -- install ------------------------------------------------------------------------------

    def _unique_name(self, base: str) -> str:
        name, i = base, 2
        while self._db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone():
            name, i = f"{base}-{i}", i + 1
        return name

    def _install(self, src: Path, det: Detection, mode: str, progress: Progress | None) -> Path:
        folder = self.models_dir / _ROLE_FOLDERS.get(det.role, "other")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LibraryError(f"cannot create {folder} ({e.strerror}); check permissions or register the "
                               "model in place instead") from None
        dest = _free_name(folder / src.name)
        if mode == "link":
            try:
                os.symlink(src, dest, target_is_directory=src.is_dir())
            except OSError as e:
                raise LibraryError(f"cannot link {src} into {folder} ({e.strerror}); register it in place "
                                   "instead (the default)") from None
            return dest
        size, _ = path_stat(src)
        free = shutil.disk_usage(folder).free
        if free < size + FREE_SPACE_MARGIN:
            raise LibraryError(f"not enough free space to copy {src.name}: it needs {_gib(size)} and {folder} has "
                               f"{_gib(free)} free; free some space or register the model in place (no copy)")
        tmp = folder / f".{dest.name}.partial-{os.getpid()}"
        try:
            _copy(src, tmp, size, progress)
            _rename_no_overwrite(tmp, dest)
        except OSError as e:
            _remove_path(tmp)
            raise LibraryError(f"copying {src} to {folder} failed ({e.strerror or e}); nothing was changed") from None
        return dest


_ROLE_FOLDERS = {"checkpoint": "checkpoints", "diffusion_model": "diffusion_models", "vae": "vae",
                 "text_encoder": "text_encoders", "image_encoder": "clip_vision", "lora": "loras",
                 "controlnet": "controlnet", "llm": "llm"}


def _canonical(p: str) -> str:
    try:
        return str(Path(p).expanduser().resolve())
    except (OSError, RuntimeError):  # RuntimeError: symlink loop on older Pythons
        return p


def _default_name(src: Path) -> str:
    # A folder's name is its repo name; a Hugging Face snapshot folder is a hash, so use the repo folder.
    if src.is_dir() and src.parent.name == "snapshots" and src.parent.parent.name.startswith("models--"):
        return src.parent.parent.name.split("--", 2)[-1]
    name = src.stem if src.is_file() else (src.name or src.resolve().name)
    return name.lstrip("#") or "model"  # "#<digits>" means an id


def parse_id(name_or_id: str | int) -> int | None:
    """The id in an int or a "#<id>" string; None for anything else (a name)."""
    if isinstance(name_or_id, bool):
        return None
    if isinstance(name_or_id, int):
        return name_or_id
    s = str(name_or_id)
    if s.startswith("#") and s[1:].isascii() and s[1:].isdigit():
        return int(s[1:])
    return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _free_name(dest: Path) -> Path:
    """Never overwrite: model.safetensors, model-2.safetensors, ..."""
    i = 2
    out = dest
    while out.exists() or out.is_symlink():
        out = dest.with_name(f"{dest.stem}-{i}{dest.suffix}")
        i += 1
    return out


def _copy(src: Path, tmp: Path, total: int, progress: Progress | None) -> None:
    done = 0
    files = [src] if src.is_file() else weight_files(src)
    for f in files:
        out = tmp if src.is_file() else tmp / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb") as fi, open(out, "xb") as fo:
            while chunk := fi.read(_HASH_CHUNK):
                fo.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done / max(total, 1), "copying")
            fo.flush()
            os.fsync(fo.fileno())


def _rename_no_overwrite(tmp: Path, dest: Path) -> None:
    if tmp.is_file():
        try:
            os.link(tmp, dest)  # fails if dest exists: atomic and never overwrites
            os.unlink(tmp)
            return
        except (AttributeError, NotImplementedError, PermissionError):
            pass  # file systems without hard links
    if dest.exists():
        raise FileExistsError(f"{dest} appeared while copying")
    os.rename(tmp, dest)


def _remove_path(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
