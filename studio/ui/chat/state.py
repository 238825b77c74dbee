"""Small pieces of the Chat tab's controller state: an answer being streamed, and database-writing actions."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def db_action(method: Callable) -> Callable:
    """A user action that writes the chat database: if SQLite refuses (locked, disk full), say so in the tab
    instead of raising out of a Qt slot; the input and the screen keep what the user had."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            self.show_notice(f"The chat history could not be changed ({exc}). If another program has chats.db "
                             "open, close it and try again.")
            return None

    return wrapper


@dataclass
class Stream:
    """One answer being generated."""

    job_id: str
    thread_id: int
    msg_id: int
    parts: list[str] = field(default_factory=list)
    dirty: bool = False  # text the screen has not shown yet
    unsaved: bool = False  # text the database has not got yet
    saved_at: float = 0.0
    paint_after: float = 0.0  # long answers repaint less often so a repaint never eats the frame budget
    started: bool = False
    runner: Any = None  # the JobRunner following this answer's job

    @property
    def text(self) -> str:
        return "".join(self.parts)

