"""EngineClient: start the engine process, talk to it, notice when it dies, start a new one.

Plain Python (threads and callbacks); `studio.ui.engine_qt` wraps it for Qt and the CLI
uses it directly. Imports neither torch nor Qt.

Events reach listeners as `protocol.Message`s on the client's reader thread; listeners
must be quick (the Qt wrapper only re-emits a signal). Besides the engine's own messages
the client synthesises:
  state   {"state": "starting" | "ready" | "busy" | "restarting" | "stopped", "detail": str}
  error   kind "engine_crashed" / "engine_hung" for the job that was running when the engine died
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from studio import protocol
from studio.paths import Paths
from studio.protocol import Message, ProtocolError
from studio.remote_link import new_session, save_outputs, strip_local_out

log = logging.getLogger("studio.client")

Listener = Callable[[Message], None]
LOG_ROTATE_BYTES = 5 << 20


class EngineError(RuntimeError):
    """A job ended in an error; `kind` is the engine's tag, str() the user-facing message."""

    def __init__(self, kind: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = detail


class JobCancelledError(RuntimeError):
    pass


@dataclass
class JobHandle:
    """One submitted job. `wait()` returns the result dict or raises EngineError / JobCancelledError."""

    job_id: str
    job: Any
    events: list[Message] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: EngineError | None = None
    cancelled: bool = False

    def wait(self, timeout: float | None = None) -> dict:
        if not self.done.wait(timeout):
            raise TimeoutError(f"job {self.job_id} did not finish within {timeout} s")
        if self.cancelled:
            raise JobCancelledError(f"job {self.job_id} was cancelled")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass
class EngineOptions:
    device: str = "auto"
    vram_budget: str = ""
    reserve: str = ""
    python: str = sys.executable
    start_timeout_s: float = 120.0
    heartbeat_s: float = 1.0
    hang_timeout_s: float = 30.0
    auto_restart: bool = True
    settings: dict = field(default_factory=dict)
    remote: str = ""  # HOST:PORT of `studio engine serve` on another machine; "" spawns a local engine
    token: str = ""  # the remote engine's token
    reconnect_s: float = 60.0  # how long to keep trying after the link to a remote engine drops


def engine_boot() -> str:
    """Python code that runs `studio engine` from this very Studio, wherever the engine's working directory is.

    `python -m studio` would put the working directory first on sys.path, and a user's own folder named
    "studio" there shadows the package ("cannot import name '__version__' from 'studio'"). `-c` puts ""
    there instead; the code drops it and puts the folder holding this package first. The working
    directory itself stays, so relative model paths given on the command line still resolve.
    """
    root = str(Path(__file__).resolve().parent.parent)
    return (f"import runpy, sys; sys.path[:] = [{root!r}] + [p for p in sys.path if p not in ('', {root!r})]; "
            "runpy.run_module('studio', run_name='__main__', alter_sys=True)")


def engine_command(python: str = sys.executable) -> list[str]:
    """The command that starts a local engine, without its arguments.

    A frozen app (PyInstaller) has no Python to run `-c` with: it starts its own executable again
    with `engine` as the first argument, which studio.cli.main sends to the engine.
    """
    if getattr(sys, "frozen", False) and python == sys.executable:
        return [sys.executable, "engine"]
    return [python, "-c", engine_boot(), "engine"]


class EngineClient:
    def __init__(self, paths: Paths | None = None, options: EngineOptions | None = None) -> None:
        self.paths = paths or Paths.default()
        self.options = options or EngineOptions()
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._start_cond = threading.Condition(self._lock)
        self._starting = False
        self._send_lock = threading.Lock()
        self._conn: Connection | None = None
        self._proc: subprocess.Popen | None = None
        self._jobs: dict[str, JobHandle] = {}
        self._state = "stopped"
        self._closing = False
        self._generation = 0  # bumps with every engine start, so stale threads retire
        self._last_pong = 0.0
        self._ping_seq = 0
        self._runtime_tmp: tempfile.TemporaryDirectory | None = None
        self.engine_pid: int | None = None
        self.last_status: dict | None = None
        # remote engine: who we are to the server (it keeps our jobs across reconnects), what was sent,
        # and where each job's files go on this machine
        self._session = new_session()
        self._sent_jobs: set[str] = set()
        self._local_out: dict[str, str] = {}

    # -- listeners ---------------------------------------------------------------
    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def _emit(self, msg: Message) -> None:
        for fn in list(self._listeners):
            try:
                fn(msg)
            except Exception:  # a broken listener must not stop event delivery
                log.exception("listener failed on %s", msg.type)

    def _set_state(self, state: str, detail: str = "") -> None:
        self._state = state
        self._emit(Message("state", {"state": state, "detail": detail}))

    @property
    def state(self) -> str:
        return self._state

    # -- lifecycle -----------------------------------------------------------------
    def start(self, wait: bool = True) -> None:
        """Start the engine (in the background with wait=False). Safe to call when running
        or starting: with wait=True it then waits for the start under way."""
        with self._start_cond:
            if self._conn is not None:
                return
            if self._starting:
                if wait:
                    self._start_cond.wait_for(lambda: not self._starting, timeout=self.options.start_timeout_s + 5)
                return
            self._starting = True
            self._closing = False
            self._generation += 1
            generation = self._generation
        self._set_state("restarting" if self._state == "restarting" else "starting")
        if wait:
            self._start_engine_once(generation)
        else:
            threading.Thread(target=self._start_engine_once, args=(generation,), daemon=True).start()

    def _start_engine_once(self, generation: int) -> None:
        try:
            self._start_engine(generation)
        finally:
            with self._start_cond:
                self._starting = False
                self._start_cond.notify_all()

    def _runtime_dir(self) -> Path:
        try:
            return self.paths.runtime_dir()
        except OSError:
            # No usable XDG runtime dir (containers, odd setups): a private temp dir works as well.
            if self._runtime_tmp is None:
                self._runtime_tmp = tempfile.TemporaryDirectory(prefix="studio-run-")
                os.chmod(self._runtime_tmp.name, 0o700)
            return Path(self._runtime_tmp.name)

    def _start_engine(self, generation: int) -> None:
        if self.options.remote:
            self._start_remote(generation)
            return
        authkey = secrets.token_bytes(32)
        if sys.platform == "win32":
            address = rf"\\.\pipe\studio-{os.getpid()}-{secrets.token_hex(8)}"
        else:
            address = str(self._runtime_dir() / f"engine-{os.getpid()}-{secrets.token_hex(4)}.sock")
        cmd = [*engine_command(self.options.python), "--address", address, "--device", self.options.device,
               "--settings-json", json.dumps(self.options.settings)]
        if self.options.vram_budget:
            cmd += ["--vram-budget", self.options.vram_budget]
        if self.options.reserve:
            cmd += ["--reserve", self.options.reserve]
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.paths.logs / "engine.log"
        try:  # keep one previous log for bug reports; never let the log grow without bound
            if log_path.stat().st_size > LOG_ROTATE_BYTES:
                log_path.replace(log_path.with_suffix(".log.1"))
        except OSError:
            pass
        log_file = open(log_path, "ab")
        try:
            # PASSIVE: torch's OpenMP threads sleep instead of spinning between ops. On a busy desktop
            # spinning threads fight the GUI and each other (decode fell to 2.6 tok/s under load).
            env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log_file, stderr=log_file, env=env)
        except OSError as exc:
            self._fail_start(f"Could not start the engine process: {exc}")
            return
        finally:
            log_file.close()
        assert proc.stdin is not None
        proc.stdin.write(authkey.hex().encode() + b"\n")
        proc.stdin.flush()
        conn = self._connect(proc, address, authkey)
        if conn is None:
            code = proc.poll()
            proc.kill()
            why = (f"exited while starting (exit code {code})" if code is not None
                   else f"did not start within {self.options.start_timeout_s:.0f} s")
            self._fail_start(f"The engine {why}. See {self.paths.logs / 'engine.log'}.")
            return
        try:
            welcome = protocol.decode(conn.recv_bytes(protocol.MAX_FRAME_BYTES), protocol.ENGINE_MESSAGES)
        except (EOFError, OSError, ProtocolError) as exc:
            proc.kill()
            self._fail_start(f"The engine failed while starting: {exc}. See {self.paths.logs / 'engine.log'}.")
            return
        with self._lock:
            if generation != self._generation or self._closing:
                conn.close()
                proc.kill()
                return
            self._proc, self._conn = proc, conn
            self.engine_pid = welcome.get("pid")
            self._last_pong = time.monotonic()
        threading.Thread(target=self._read_loop, args=(conn, generation), daemon=True, name="studio-reader").start()
        threading.Thread(target=self._heartbeat, args=(generation,), daemon=True, name="studio-heartbeat").start()
        self._set_state("ready")
        self.request_status()

    def _connect(self, proc: subprocess.Popen, address: str, authkey: bytes) -> Connection | None:
        family = "AF_PIPE" if sys.platform == "win32" else "AF_UNIX"
        deadline = time.monotonic() + self.options.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None
            if family == "AF_PIPE" or os.path.exists(address):
                try:
                    return Client(address, family=family, authkey=authkey)
                except (OSError, EOFError):
                    pass
            time.sleep(0.05)
        return None

    def _start_remote(self, generation: int) -> None:
        """Connect to a remote engine; after a lost link, keep trying for reconnect_s and name the jobs
        we still wait for, so the server sends their results (or keeps routing their progress to us)."""
        from studio.remote_link import connect
        from studio.remote_trust import KnownEngines, UntrustedCertificate, known_engines_path

        reconnecting = self._state == "restarting"
        deadline = time.monotonic() + (self.options.reconnect_s if reconnecting else 0)
        known = KnownEngines(known_engines_path(self.paths.data))
        while True:
            with self._lock:
                resume = [j for j, h in self._jobs.items() if not h.done.is_set() and j in self._sent_jobs]
            try:
                link = connect(self.options.remote, self.options.token, known, self._session, resume)
                break
            except (UntrustedCertificate, PermissionError) as exc:  # retrying cannot help
                self._fail_start(str(exc), "engine_refused")
                return
            except (ConnectionError, OSError, ValueError) as exc:
                if time.monotonic() >= deadline or generation != self._generation or self._closing:
                    if reconnecting:
                        self._fail_start(f"The connection to the remote engine at {self.options.remote} was lost and "
                                         f"could not be restored ({exc}). A job that finishes there is kept for 10 "
                                         "minutes: reconnect and call resume(job_id) to fetch it.", "connection_lost")
                    else:
                        self._fail_start(str(exc))
                    return
                time.sleep(1.0)
        with self._lock:
            if generation != self._generation or self._closing:
                link.conn.close()
                return
            self._conn = link.conn  # type: ignore[assignment]  (Connection-like)
            self.engine_pid = link.welcome.get("pid")
            self._last_pong = time.monotonic()
        threading.Thread(target=self._read_loop, args=(link.conn, generation), daemon=True,
                         name="studio-reader").start()
        threading.Thread(target=self._heartbeat, args=(generation,), daemon=True, name="studio-heartbeat").start()
        if link.first_use:
            self._set_state("starting", f"Trusted the remote engine at {self.options.remote} on first use; its "
                                        f"certificate's SHA-256 fingerprint is {link.fingerprint}")
        self._set_state("ready")
        self.request_status()

    def resume(self, job_id: str) -> JobHandle:
        """A handle for a job submitted to the remote engine before the link dropped: the server sends its
        result if it finished (kept for a while) or its progress if it still runs."""
        handle = JobHandle(job_id, None)
        with self._lock:
            self._jobs[job_id] = handle
            self._sent_jobs.add(job_id)
        if self._conn is None:
            self.start(wait=True)  # the handshake names the job
        else:
            self._send(protocol.make("hello", client="studio", resume=[job_id]))
        return handle

    def _fail_start(self, message: str, kind: str = "engine_failed") -> None:
        log.info(message)
        self._set_state("stopped", message)
        self._fail_jobs(kind, message)

    def close(self) -> None:
        """Ask the engine to exit and wait briefly; kill it if it doesn't."""
        with self._lock:
            self._closing = True
            self._generation += 1
            conn, proc = self._conn, self._proc
            self._conn = self._proc = None
        if conn is not None:
            try:
                self._send_on(conn, protocol.make("shutdown"))
            except (OSError, ValueError):
                pass
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stdin:
                proc.stdin.close()
        if conn is not None:
            conn.close()
        self._fail_jobs("engine_stopped", "The engine was shut down before the job finished.")
        self._set_state("stopped")

    # -- engine death ----------------------------------------------------------------
    def _engine_lost(self, generation: int, kind: str, message: str) -> None:
        with self._lock:
            if generation != self._generation or self._closing:
                return
            self._generation += 1
            conn, proc = self._conn, self._proc
            self._conn = self._proc = None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
            if proc.stdin:
                proc.stdin.close()
        if conn is not None:
            conn.close()
        if self.options.remote:
            # Only the link went: the jobs run on at the server, which keeps their results for us.
            if kind != "connection_lost":
                message = f"The connection to the remote engine at {self.options.remote} was lost ({message})"
            self._set_state("restarting", f"{message} Reconnecting...")
            self.start(wait=False)
            return
        self._fail_jobs(kind, message)
        if self.options.auto_restart:
            self._set_state("restarting", message)
            self.start(wait=False)
        else:
            self._set_state("stopped", message)

    def _fail_jobs(self, kind: str, message: str) -> None:
        with self._lock:
            pending = [h for h in self._jobs.values() if not h.done.is_set()]
            self._jobs = {k: h for k, h in self._jobs.items() if h.done.is_set()}
        for handle in pending:
            msg = Message("error", {"job_id": handle.job_id, "kind": kind, "message": message, "detail": ""})
            self._finish(handle, msg)

    # -- I/O ---------------------------------------------------------------------------
    def _send_on(self, conn: Connection, msg: Message) -> None:
        frame = protocol.encode(msg)
        with self._send_lock:
            conn.send_bytes(frame)

    def _send(self, msg: Message) -> bool:
        try:
            return self._send_frame(protocol.encode(msg))
        except ProtocolError as exc:  # our own message: a bug, not a dead engine
            log.error("cannot encode %s: %s", msg.type, exc)
            return False

    def _send_frame(self, frame: bytes) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            with self._send_lock:
                conn.send_bytes(frame)
            return True
        except (OSError, ValueError, EOFError):
            return False

    def _read_loop(self, conn: Connection, generation: int) -> None:
        while True:
            try:
                frame = conn.recv_bytes(protocol.MAX_FRAME_BYTES)
            except (EOFError, OSError) as exc:
                if self.options.remote:
                    self._engine_lost(generation, "connection_lost",
                                      f"The connection to the remote engine at {self.options.remote} was lost ({exc}).")
                    return
                proc = self._proc
                code = proc.poll() if proc else None
                if proc is not None and code is None:
                    try:
                        code = proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        code = None
                why = f" (exit code {code})" if code is not None else ""
                # only say an engine is starting when one is (the CLI starts one itself, for its next job)
                next_engine = "a new engine is starting" if self.options.auto_restart else "the next job starts a new engine"
                self._engine_lost(generation, "engine_crashed",
                                  f"The engine stopped unexpectedly{why}. The job was not finished; "
                                  f"{next_engine}. See {self.paths.logs / 'engine.log'}.")
                return
            try:
                msg = protocol.decode(frame, protocol.ENGINE_MESSAGES)
            except ProtocolError as exc:
                log.error("bad frame from engine: %s", exc)
                continue
            self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        if msg.type == "pong":
            self._last_pong = time.monotonic()
            return
        if msg.type == "engine_status":
            self.last_status = dict(msg.fields)
        handle = self._jobs.get(msg.get("job_id") or "")
        if msg.type == "result" and "files" in msg.fields:
            if handle is None or handle.done.is_set():
                return  # a result sent again after a reconnect: its files are saved already
            msg = self._save_remote_files(msg)
        if handle is not None:
            handle.events.append(msg)
            if msg.type == "started":
                self._set_state("busy")
            if msg.type in ("result", "error", "cancelled"):
                self._finish(handle, msg)
                return
        self._emit(msg)

    def _finish(self, handle: JobHandle, msg: Message) -> None:
        if handle.done.is_set():
            return
        if msg.type == "result":
            handle.result = msg["result"]
        elif msg.type == "cancelled":
            handle.cancelled = True
        else:
            handle.error = EngineError(msg["kind"], msg["message"], msg.get("detail", ""))
        with self._lock:
            self._jobs.pop(handle.job_id, None)
            self._sent_jobs.discard(handle.job_id)
            idle = not any(not h.done.is_set() for h in self._jobs.values())
        handle.done.set()
        self._emit(msg)
        if idle and self._conn is not None and self._state == "busy":
            self._set_state("ready")

    def _save_remote_files(self, msg: Message) -> Message:
        job_id = msg["job_id"]
        outputs = Path(self.options.settings.get("outputs") or self.paths.outputs)
        try:
            return save_outputs(msg, self._local_out.pop(job_id, ""), outputs)
        except (OSError, ProtocolError) as exc:
            return Message("error", {"job_id": job_id, "kind": "save_failed", "detail": "",
                                     "message": f"The remote engine finished the job, but its files could not be "
                                                f"saved in {outputs}: {exc}. Pick another outputs folder in Settings."})

    def _heartbeat(self, generation: int) -> None:
        while generation == self._generation and not self._closing:
            time.sleep(self.options.heartbeat_s)
            if generation != self._generation:
                return
            self._ping_seq += 1
            self._send(protocol.make("ping", seq=self._ping_seq))
            silent = time.monotonic() - self._last_pong
            if silent > self.options.hang_timeout_s:
                self._engine_lost(generation, "engine_hung",
                                  f"The engine stopped responding for {silent:.0f} s and was restarted. "
                                  "The job was not finished.")
                return

    # -- requests ---------------------------------------------------------------------
    def submit(self, job: Any, job_id: str | None = None) -> JobHandle:
        """Queue a job; starts the engine first if needed. Never raises for engine trouble:
        the handle ends with an error instead, so the GUI has one path for failures."""
        job_id = job_id or protocol.new_job_id()
        handle = JobHandle(job_id, job)
        with self._lock:
            self._jobs[job_id] = handle
        if self.options.remote:  # `out` names a place on this machine: the files come back here
            job, self._local_out[job_id] = strip_local_out(job)
        try:  # checked before anything else, so a bad value is named instead of "engine not running"
            job_dict = protocol.job_to_dict(job)
            protocol.check_values(job_dict)
            frame = protocol.encode(protocol.make("submit", job_id=job_id, job=job_dict))
        except (ProtocolError, RecursionError) as exc:
            why = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            self._finish(handle, Message("error", {"job_id": job_id, "kind": "bad_input", "detail": "",
                                                   "message": f"This job cannot be sent to the engine: {why}. "
                                                   "Fix that setting (an imported chat can carry such values)."}))
            return handle
        if self._conn is None:
            self.start(wait=True)
        if self._send_frame(frame):
            self._sent_jobs.add(job_id)
        else:
            self._finish(handle, Message("error", {"job_id": job_id, "kind": "engine_failed",
                                                   "message": "The engine is not running; it could not take the job.",
                                                   "detail": ""}))
        return handle

    def cancel(self, job_id: str) -> None:
        self._send(protocol.make("cancel", job_id=job_id))

    def unload(self, model: str | None = None) -> None:
        self._send(protocol.make("unload", model=model))

    def request_status(self) -> None:
        self._send(protocol.make("status"))

    def send_raw(self, frame: bytes) -> None:
        """Send bytes as they are (tests use it to check the engine survives garbage)."""
        conn = self._conn
        if conn is not None:
            with self._send_lock:
                conn.send_bytes(frame)

    def kill_engine(self) -> None:
        """SIGKILL the engine (tests and the GUI's 'restart engine' use it)."""
        proc = self._proc
        if proc is not None:
            proc.kill()

    def __enter__(self) -> EngineClient:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
