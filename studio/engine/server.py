"""The engine process: accept one authenticated client, queue its jobs, run them on one worker.

Threads:
  main    reads frames from the client and answers control messages at once
          (status, ping, cancel), so they work while a job runs;
  worker  takes jobs from the queue in order and runs the pipeline for each;
  stdin   watches the parent: when the GUI or CLI that started us dies, its end of
          our stdin closes and we exit instead of lingering as an orphan.
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Any

from studio import __version__, protocol
from studio.engine.context import CancelToken, JobCancelled, JobContext, ModelCache, UserError
from studio.protocol import Message, ProtocolError

log = logging.getLogger("studio.engine")

# Previews are for eyes: more than this many per second only costs bandwidth.
PREVIEW_MIN_INTERVAL_S = 0.1


@dataclass
class QueuedJob:
    job_id: str
    job: Any
    cancel: CancelToken = field(default_factory=CancelToken)


def _pipelines() -> dict[str, Callable[[Any, JobContext], Any]]:
    """Job kind -> pipeline function returning its typed result (protocol.*Result). Imported lazily: a
    pipeline's imports cost seconds."""

    def selftest(job, ctx):
        from studio.engine.pipelines.selftest import run_selftest

        return run_selftest(job, ctx)

    def chat(job, ctx):
        from studio.engine.pipelines.chat import run_chat

        return run_chat(job, ctx)

    def image(job, ctx):
        from studio.engine.pipelines.diffusion import run_generation
        from studio.families import Kind

        return run_generation(job, ctx, Kind.IMAGE)

    def video(job, ctx):
        from studio.engine.pipelines.diffusion import run_generation
        from studio.families import Kind

        return run_generation(job, ctx, Kind.VIDEO)

    def completion(job, ctx):
        from studio.engine.pipelines.complete import run_completion

        return run_completion(job, ctx)

    def embed(job, ctx):
        from studio.engine.pipelines.embed import run_embed

        return run_embed(job, ctx)

    return {"selftest": selftest, "chat": chat, "image": image, "video": video, "completion": completion,
            "embed": embed}


class Engine:
    def __init__(self, conn: Connection, device_override: str = "auto", vram_budget: int = 0,
                 reserve: int = 0, settings: dict | None = None) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()
        self._queue: collections.deque[QueuedJob] = collections.deque()
        self._cond = threading.Condition()
        self._running: QueuedJob | None = None
        self._stop = False
        self.models = ModelCache()
        self.settings = settings or {}
        self.pipelines = _pipelines()
        from studio.engine.device import probe

        try:
            self.device = probe(device_override, vram_budget=vram_budget, reserve=reserve)
        except ValueError as exc:
            # A stale device override (a removed GPU) must not leave the user without an engine.
            self.device = probe("auto", vram_budget=vram_budget, reserve=reserve)
            self.device.extra["warning"] = f"{exc}; using {self.device.label()} instead"
        from studio.engine.memory import MemoryManager

        self.memory = MemoryManager(self.device)

    # -- sending ---------------------------------------------------------------
    def send(self, type_: str, payloads: list[bytes] | None = None, **fields: Any) -> None:
        frame = protocol.encode(protocol.make(type_, payloads, **fields))
        with self._send_lock:
            try:
                self.conn.send_bytes(frame)
            except (OSError, EOFError, ValueError):
                # The client is gone; the main loop notices and shuts down.
                self._stop = True

    def error(self, job_id: str | None, kind: str, message: str, detail: str = "") -> None:
        self.send("error", job_id=job_id, kind=kind, message=message, detail=detail)

    # -- main loop -------------------------------------------------------------
    def serve(self) -> None:
        import torch

        # Only the worker computes. OpenMP gives each thread that runs a parallel region a team of its
        # own; a second two-thread team beside the worker's halved SmolLM2's decode in a test on two
        # cores (50 against 96 tok/s). This thread's rare ops (status) therefore run single-threaded.
        torch.set_num_threads(1)
        worker = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        worker.start()
        self.send("welcome", engine_version=__version__, pid=os.getpid())
        while not self._stop:
            try:
                frame = self.conn.recv_bytes(protocol.MAX_FRAME_BYTES)
            except (EOFError, OSError):
                break
            try:
                msg = protocol.decode(frame, protocol.CLIENT_MESSAGES)
            except ProtocolError as exc:
                self.error(None, "protocol", f"Rejected a malformed message: {exc}")
                continue
            try:
                self._handle(msg)
            except Exception as exc:  # a bug in a handler must not kill the engine
                log.exception("handler failed")
                self.error(msg.get("job_id"), "internal", f"The engine could not handle {msg.type}: {exc}",
                           traceback.format_exc())
        self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            self._stop = True
            if self._running:
                self._running.cancel.set()
            self._cond.notify_all()

    def _handle(self, msg: Message) -> None:
        match msg.type:
            case "hello" | "ping":
                if msg.type == "ping":
                    self.send("pong", seq=msg["seq"])
            case "submit":
                self._submit(msg["job_id"], msg["job"])
            case "cancel":
                self._cancel(msg["job_id"])
            case "status":
                self.send_status()
            case "unload":
                dropped = self.models.unload(msg["model"])
                try:
                    dropped += [n for n in self.memory.unload(None if msg["model"] is None else msg["model"])
                                if n not in dropped]
                except UserError as exc:  # a component the running job holds
                    self.error(None, exc.kind, exc.message)
                self._free_memory()
                self.send("unloaded", models=dropped)
                self.send_status()
            case "shutdown":
                self._stop = True

    def _submit(self, job_id: str, data: dict) -> None:
        try:
            job = protocol.job_from_dict(data)
        except ProtocolError as exc:
            self.error(job_id, "bad_input", str(exc))
            return
        if job.kind not in self.pipelines:
            self.error(job_id, "unsupported", f"This engine cannot run {job.kind} jobs.")
            return
        with self._cond:
            if any(q.job_id == job_id for q in self._queue) or (self._running and self._running.job_id == job_id):
                self.error(job_id, "bad_input", f"job id {job_id} is already queued")
                return
            self._queue.append(QueuedJob(job_id, job))
            position = len(self._queue) - 1 + (1 if self._running else 0)
            self._cond.notify_all()
        self.send("accepted", job_id=job_id, position=position)

    def _cancel(self, job_id: str) -> None:
        with self._cond:
            if self._running and self._running.job_id == job_id:
                self._running.cancel.set()  # the worker reports `cancelled` at its next check
                return
            for queued in list(self._queue):
                if queued.job_id == job_id:
                    self._queue.remove(queued)
                    break
            else:
                return  # already finished: nothing to do
        self.send("cancelled", job_id=job_id)

    def send_status(self) -> None:
        with self._cond:
            queue = [q.job_id for q in self._queue]
            running = self._running.job_id if self._running else None
        placed = self.memory.status()
        cached = self.models.summary()
        paths = {m["key"]: m.get("path", "") for m in cached}
        for m in placed["models"]:  # manager names are "<model cache key>|<part>"
            m["path"] = paths.get(m["key"].split("|")[0], "")
        models = placed["models"] + [m for m in cached if m["key"] not in {p["key"].split("|")[0]
                                                                             for p in placed["models"]}]
        self.send("engine_status", device=self.device.to_dict(), memory={**self._memory(), **placed["memory"]},
                  models=models, queue=queue, running=running)

    def _memory(self) -> dict:
        from studio.units import ram_info

        total_ram, free_ram = ram_info()
        info: dict[str, Any] = {"ram_total": total_ram, "ram_free": free_ram, "rss": _rss_bytes(),
                                "budget": self.device.vram_budget}
        if self.device.kind in ("cuda", "rocm"):
            import torch

            index = torch.device(self.device.torch_device).index or 0
            free, total = torch.cuda.mem_get_info(index)
            info.update(vram_total=total, vram_free=free, vram_used=torch.cuda.memory_allocated(index))
        return info

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.kind in ("cuda", "rocm"):
            import torch

            torch.cuda.empty_cache()

    # -- worker ----------------------------------------------------------------
    def _work(self) -> None:
        import torch

        self._init_threads()
        torch.set_num_threads(self.device.threads)
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                item = self._queue.popleft()
                self._running = item
            try:
                self._run(item)
            finally:
                with self._cond:
                    self._running = None

    def _init_threads(self) -> None:
        """Chat's thread count (worker_threads' rule) in device.threads; torch's default, every core, for
        image and video jobs (reported as extra["all_threads"])."""
        from studio.engine.device import worker_threads

        self.all_threads = max(1, int(self.device.threads))
        self.device.extra["all_threads"] = self.all_threads
        self.device.threads = worker_threads(self.all_threads, os.cpu_count() or 1)

    def _run(self, item: QueuedJob) -> None:
        import torch

        from studio.engine.device import job_threads

        job_id = item.job_id
        torch.set_num_threads(job_threads(item.job.kind, self.device.threads,
                                          getattr(self, "all_threads", self.device.threads)))
        last_preview = [0.0]

        def on_preview(data: bytes, mime: str, width: int, height: int) -> None:
            now = time.monotonic()
            if now - last_preview[0] >= PREVIEW_MIN_INTERVAL_S:
                last_preview[0] = now
                self.send("preview", [data], job_id=job_id, mime=mime, width=width, height=height)

        ctx = JobContext(
            job_id=job_id,
            device=self.device,
            cancel=item.cancel,
            models=self.models,
            on_progress=lambda step, total, stage: self.send("progress", job_id=job_id, step=int(step),
                                                             total=int(total), stage=stage),
            on_token=lambda text: self.send("token", job_id=job_id, text=text),
            on_preview=on_preview,
            settings=self.settings,
            memory=self.memory,
        )
        self.send("started", job_id=job_id)
        try:
            item.cancel.check()
            result = self.pipelines[item.job.kind](item.job, ctx)
        except JobCancelled:
            self.send("cancelled", job_id=job_id)
        except UserError as exc:
            self.error(job_id, exc.kind, exc.message, exc.detail)
        except MemoryError:
            self._free_memory()
            self.error(job_id, "out_of_memory", "The engine ran out of RAM. Close other programs, pick a smaller "
                       "model or a quantized one, and try again.", traceback.format_exc())
        except Exception as exc:
            from studio.engine.memory import is_oom

            if is_oom(exc):
                # Pipelines turn a device OOM into the manager's UserError (retried once, with numbers); one
                # that escapes a plan (while loading) is freed and worded by the manager too.
                err = self.memory.out_of_memory()
                self.error(job_id, err.kind, err.message, traceback.format_exc())
            else:
                log.exception("job %s failed", job_id)
                self.error(job_id, "internal", f"The job failed: {type(exc).__name__}: {exc}", traceback.format_exc())
        else:
            # Pipelines return typed results; the wire carries their dict form (same keys as ever).
            self.send("result", job_id=job_id, result=result.to_dict())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


HANDSHAKE_TIMEOUT_S = 5.0  # the real client answers in milliseconds


def accept_client(listener: Listener, authkey: bytes, timeout: float = HANDSHAKE_TIMEOUT_S) -> Connection:
    """The first connection that proves it holds `authkey` within `timeout` seconds (a Unix-socket
    listener made without an authkey). A local process that connected first and stayed silent, or
    answered a byte at a time, used to hold the engine until the client gave up after 120 s."""
    while True:
        conn = listener.accept()
        try:
            _handshake(conn, authkey, timeout)
            return conn
        except (OSError, EOFError, ValueError, AuthenticationError) as exc:
            log.warning("refused a connection: %s", exc or type(exc).__name__)
            conn.close()


def _handshake(conn: Connection, authkey: bytes, timeout: float) -> None:
    # A timer shuts the socket down at the deadline, which wakes the blocked read however slowly the
    # peer trickles bytes; the lock keeps it from cutting a connection that has just succeeded.
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    lock, state = threading.Lock(), {"done": False, "expired": False}

    def expire() -> None:
        with lock:
            if not state["done"]:
                state["expired"] = True
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        deliver_challenge(conn, authkey)
        answer_challenge(conn, authkey)
    finally:
        timer.cancel()
        with lock:
            state["done"] = True
        sock.close()
    if state["expired"]:
        raise TimeoutError(f"no handshake within {timeout:g} s")


def _watch_parent() -> None:
    """Exit when our stdin closes: the process that started us is gone."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio engine", description="Studio engine process (started by the app)")
    parser.add_argument("--address", required=True, help="socket path (Unix) or pipe name (Windows)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vram-budget", default="")
    parser.add_argument("--reserve", default="")
    parser.add_argument("--settings-json", default="{}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="engine %(levelname)s %(message)s", stream=sys.stderr)

    import json

    from studio.units import parse_size

    # The authkey arrives as the first line on stdin, never on the command line or in the environment.
    key_line = sys.stdin.buffer.readline().strip()
    if len(key_line) < 32:
        print("engine: no authkey on stdin", file=sys.stderr)
        return 2
    authkey = bytes.fromhex(key_line.decode())
    family = "AF_PIPE" if sys.platform == "win32" else "AF_UNIX"
    # On Unix the challenge runs in accept_client, under a deadline; a named pipe keeps Listener's own.
    listener = Listener(args.address, family=family, authkey=authkey if family == "AF_PIPE" else None)
    if family == "AF_UNIX":
        os.chmod(args.address, 0o600)
    threading.Thread(target=_watch_parent, name="studio-parent-watch", daemon=True).start()
    if family == "AF_UNIX":
        conn = accept_client(listener, authkey)
    else:
        while True:
            try:
                conn = listener.accept()
                break
            except Exception as exc:  # wrong authkey or a stray connection: refuse it, keep listening
                log.warning("refused a connection: %s", exc)
    listener.close()
    engine = Engine(conn, args.device, parse_size(args.vram_budget) if args.vram_budget else 0,
                    parse_size(args.reserve) if args.reserve else 0, json.loads(args.settings_json))
    engine.serve()
    conn.close()
    os._exit(0)  # worker threads may be inside torch; don't wait for them


if __name__ == "__main__":
    sys.exit(main())
