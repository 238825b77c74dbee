"""Writing user files completely or not at all. Imports neither torch nor Qt.

Every output (images, videos, sidecars, exports, settings) goes to a temporary file in the same
folder, is flushed to disk, and only then renamed to its final name. A full disk or a crash
mid-write therefore leaves the old file (or nothing) under the final name, never a truncated or
0-byte one; the temporary file is removed on failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

Writer = Callable[[BinaryIO], None]


def _temp_file(folder: Path, name: str, suffix: str = ".tmp") -> tuple[BinaryIO, Path]:
    """A new temporary file beside the final one (same file system, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    return os.fdopen(fd, "wb"), Path(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str | Writer, *, exclusive: bool = False,
                 encoding: str = "utf-8") -> Path:
    """Write `data` (bytes, text, or a function writing to a binary file) to `path` atomically.

    exclusive: fail with FileExistsError instead of replacing a non-empty file already at `path`
    (an empty one is a name reserved with O_EXCL, see pngmeta.unique_output_path, and is replaced).
    On failure an empty file left at `path` is removed too: it holds nothing, and a 0-byte image under
    its final name looks like a finished one. Disk-full errors say so.
    """
    path = Path(path)
    fh, tmp = _temp_file(path.parent, path.name)
    try:
        with fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode(encoding) if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        _finish(tmp, path, exclusive)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        discard_placeholder(path)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(exc.errno, f"the disk is full, {path.name} was not written (nothing was left "
                          "half-written); free some space and try again") from None
        raise
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """For writers that need a file name (ffmpeg, OpenCV): yields a temporary path with the same
    suffix in the same folder; renamed to `path` when the block ends without error, else removed."""
    path = Path(path)
    fh, tmp = _temp_file(path.parent, path.stem, ".tmp" + path.suffix)  # encoders go by the suffix
    fh.close()
    try:
        yield tmp
        if tmp.stat().st_size == 0:
            raise OSError(errno.ENOSPC, f"nothing was written to {path.name}; the disk may be full")
        _finish(tmp, path, exclusive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        discard_placeholder(path)
        raise


def discard_placeholder(path: str | os.PathLike) -> None:
    """Remove `path` if it is an empty regular file (a reserved name that never got its content)."""
    try:
        p = Path(path)
        if p.is_file() and not p.is_symlink() and p.stat().st_size == 0:
            p.unlink()
    except OSError:
        pass


def _finish(tmp: Path, path: Path, exclusive: bool) -> None:
    if exclusive and path.exists() and (path.is_symlink() or path.stat().st_size > 0):
        raise FileExistsError(errno.EEXIST, f"{path} exists; it was not overwritten")
    os.replace(tmp, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder is synced (POSIX); Windows has no such call.
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
