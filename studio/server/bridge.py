"""From EngineClient's threads to asyncio: each HTTP request reads its own job's events from a queue.

The client delivers every engine message on its reader thread; one listener routes them by job id
to the asyncio queue of the request that submitted the job.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from studio import protocol
from studio.client import EngineClient
from studio.protocol import Message

TERMINAL = ("result", "error", "cancelled")


@dataclass
class JobStream:
    job_id: str
    queue: asyncio.Queue
    done: bool = False


class EngineBridge:
    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, JobStream]] = {}
        self._lock = threading.Lock()
        self.served = 0  # jobs that ended with a result
        self.last_error = ""
        client.add_listener(self._on_message)

    def _on_message(self, msg: Message) -> None:
        job_id = msg.get("job_id")
        if not job_id:
            return
        with self._lock:
            entry = self._streams.get(job_id)
        if entry is None:
            return
        loop, stream = entry
        if msg.type not in ("token", "progress", *TERMINAL):
            return
        if msg.type == "result":
            self.served += 1
        elif msg.type == "error":
            self.last_error = msg["message"]
        loop.call_soon_threadsafe(stream.queue.put_nowait, msg)

    async def submit(self, job: Any) -> JobStream:
        """Queue a job on the engine; its events arrive in the returned stream's queue."""
        stream = JobStream(protocol.new_job_id(), asyncio.Queue())
        with self._lock:  # registered before submitting: the first token can come at once
            self._streams[stream.job_id] = (asyncio.get_running_loop(), stream)
        # submit() may start the engine and wait for it: never on the event loop
        await asyncio.to_thread(self.client.submit, job, stream.job_id)
        return stream

    async def next(self, stream: JobStream, timeout: float | None = None) -> Message:
        msg = await asyncio.wait_for(stream.queue.get(), timeout)
        if msg.type in TERMINAL:
            stream.done = True
            self.release(stream)
        return msg

    def cancel(self, stream: JobStream) -> None:
        """The client went away: stop the engine job (queued or running) and forget the stream."""
        if not stream.done:
            self.client.cancel(stream.job_id)
        self.release(stream)

    def release(self, stream: JobStream) -> None:
        with self._lock:
            self._streams.pop(stream.job_id, None)

    def active(self) -> int:
        with self._lock:
            return len(self._streams)
