"""Job `model` fields name a file, a folder, or a model the user installed in the library."""

from __future__ import annotations

from pathlib import Path

from studio.engine.context import UserError


def library_path(name: str) -> Path | None:
    """An installed model's name -> its file or folder; None when the library has no such name."""
    from studio.library.library import Library, LibraryError

    try:
        with Library() as lib:
            return lib.resolve(name)
    except LibraryError:
        return None


def resolve_path(spec: str, what: str) -> Path:
    """A path or a library name -> an existing path, or UserError('model_not_found') naming `what`."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    found = library_path(spec)
    if found is None:
        raise UserError("model_not_found", f"No {what} {spec!r}: no such file, and no model of that name in the "
                        "library (`studio models list` shows them). Install it by dropping the file on the window.")
    return found
