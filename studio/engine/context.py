"""What a running job sees of the engine: cancel token, event callbacks, device, model cache.

Pipelines are plain functions `run(job, ctx) -> dict`; they never touch the socket.
The server builds a JobContext per job and turns its callbacks into protocol events.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from studio.errors import UserError  # noqa: F401 - re-exported: engine code raises it from here


class JobCancelled(Exception):
    """Raised inside a job when the user cancelled it; the server reports `cancelled`."""


class CancelToken:
    """Set by the server thread, polled by the worker at every step or token."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise JobCancelled()


class ModelCache:
    """Loaded models kept warm between jobs, keyed by a string the pipeline chooses.

    The memory manager decides eviction; this holds the objects and their byte sizes.
    """

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}
        self._info: dict[str, dict] = {}  # path and where ("VRAM" / "RAM") for the Models panel
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, obj: Any, nbytes: int = 0, path: str = "", where: str = "") -> None:
        with self._lock:
            self._items[key] = obj
            self._sizes[key] = nbytes
            self._info[key] = {"path": path, "where": where}

    def get_or_load(self, key: str, load: Callable[[], Any], nbytes: Callable[[Any], int] | None = None,
                    path: str = "", where: str = "") -> Any:
        obj = self.get(key)
        if obj is None:
            obj = load()
            self.put(key, obj, nbytes(obj) if nbytes else 0, path, where)
        return obj

    def unload(self, key: str | None = None) -> list[str]:
        """Drop one model (or all with None); returns the keys dropped."""
        with self._lock:
            keys = list(self._items) if key is None else [k for k in self._items if k == key]
            for k in keys:
                self._items.pop(k, None)
                self._sizes.pop(k, None)
                self._info.pop(k, None)
        return keys

    def summary(self) -> list[dict]:
        with self._lock:
            return [{"key": k, "bytes": self._sizes.get(k, 0), **self._info.get(k, {})} for k in self._items]


@dataclass
class JobContext:
    """Passed to every pipeline. Callbacks are thread-safe and cheap; call them freely."""

    job_id: str
    device: Any  # studio.engine.device.DeviceProfile
    cancel: CancelToken = field(default_factory=CancelToken)
    models: ModelCache = field(default_factory=ModelCache)
    on_progress: Callable[[int, int, str], None] = lambda step, total, stage: None
    on_token: Callable[[str], None] = lambda text: None
    on_preview: Callable[[bytes, str, int, int], None] = lambda data, mime, w, h: None
    settings: dict = field(default_factory=dict)
    memory: Any = None  # studio.engine.memory.MemoryManager: where weights live; None = a fresh one per job

    def progress(self, step: int, total: int, stage: str = "") -> None:
        self.on_progress(step, total, stage)

    def token(self, text: str) -> None:
        self.on_token(text)

    def preview(self, data: bytes, mime: str = "image/jpeg", width: int = 0, height: int = 0) -> None:
        self.on_preview(data, mime, width, height)
