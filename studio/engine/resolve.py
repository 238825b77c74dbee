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
                        "library (`studio models list` shows them). Add it with `studio models add FILE`, or drop the "
                        "file on the Studio window.")
    return found


def resolve_generator(spec: str, kind: str) -> Path:
    """An image or video job's model -> its path. A chat model given there is refused with the way to use it,
    rather than left to the loader, which can only say that it found no UNet or transformer in it."""
    from studio.library.detect import detect
    from studio.library.headers import HeaderError

    path = resolve_path(spec, f"{kind} model")
    try:
        det = detect(path)
    except HeaderError:
        return path  # the loader says what is wrong with it
    if det.role == "llm":
        name = " ".join(filter(None, (det.family, det.variant)))
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserError("bad_model", f"{path.name} is a chat model ({name}), not {article} {kind} model: use it in the "
                        f"Chat tab or with `studio chat --model {path}`. For {kind}s, choose a checkpoint "
                        "(`studio models list` shows what is installed).")
    return path
