"""The wire to a remote engine: Studio frames over TLS, the client's handshake, outputs saved at the desk.

Torch-free: the client (window, CLI) and the server (studio.engine.remote) both use it.

A frame on the TLS stream is a u32 big-endian length and a `protocol` frame, the bytes that
`multiprocessing.connection` carries locally, so the engine's serve loop runs unchanged on either.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import select
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

from studio import __version__, protocol
from studio.protocol import Message, ProtocolError
from studio.remote_trust import KnownEngines, fingerprint, parse_address

_LEN = struct.Struct("!I")
CONNECT_TIMEOUT_S = 15.0
SEND_STALL_S = 30.0  # a send that makes no progress this long means the peer is gone


class FramedTLS:
    """A Connection-like object (send_bytes / recv_bytes / close) over a TLS socket.

    One thread may read while others write. OpenSSL forbids using one SSL object from two threads at
    once, so every SSL call is made under one lock on a non-blocking socket; waiting for the network
    (select) happens outside the lock. Only the engine sends big frames, and the client always reads,
    so a writer holding the lock while the peer drains its buffer cannot deadlock.
    """

    def __init__(self, sock: ssl.SSLSocket, idle_timeout_s: float | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.idle_timeout_s = idle_timeout_s  # no bytes at all for this long: the peer is gone
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._closed = False

    def peer_certificate(self) -> bytes:
        return self.sock.getpeercert(binary_form=True) or b""

    def send_bytes(self, data: bytes) -> None:
        if len(data) > protocol.MAX_FRAME_BYTES:
            raise ValueError(f"frame of {len(data)} bytes exceeds {protocol.MAX_FRAME_BYTES}")
        view = memoryview(_LEN.pack(len(data)) + bytes(data))
        stalled_since = time.monotonic()
        with self._lock:
            while view:
                if self._closed:
                    raise OSError("connection closed")
                try:
                    sent = self.sock.send(view)
                except ssl.SSLWantWriteError:
                    sent = 0
                except ssl.SSLWantReadError:
                    sent = 0
                if sent:
                    view = view[sent:]
                    stalled_since = time.monotonic()
                    continue
                if time.monotonic() - stalled_since > SEND_STALL_S:
                    raise OSError(f"the peer took nothing for {SEND_STALL_S:.0f} s")
                select.select([], [self.sock], [], 0.5)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        head = self._read_exact(_LEN.size)
        (size,) = _LEN.unpack(head)
        limit = protocol.MAX_FRAME_BYTES if maxlength is None else maxlength
        if size > limit:
            # Checked before reading a byte of it: a hostile length cannot make us allocate.
            self.close()
            raise OSError(f"frame of {size} bytes exceeds the limit of {limit}")
        return self._read_exact(size)

    def _read_exact(self, n: int) -> bytes:
        last_data = time.monotonic()
        while len(self._buf) < n:
            if self._closed:
                raise EOFError("connection closed")
            with self._lock:
                try:
                    chunk: bytes | None = self.sock.recv(max(65536, n - len(self._buf)))
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    chunk = None
                except (ssl.SSLError, ValueError) as exc:  # a broken record, or closed under us
                    raise OSError(str(exc)) from None
                pending = self.sock.pending() if chunk is None and not self._closed else 0
            if chunk == b"":
                raise EOFError("the peer closed the connection")
            if chunk:
                self._buf += chunk
                last_data = time.monotonic()
                continue
            if pending:
                continue
            if self.idle_timeout_s is not None and time.monotonic() - last_data > self.idle_timeout_s:
                raise OSError(f"nothing received for {self.idle_timeout_s:.0f} s")
            try:
                select.select([self.sock], [], [], 0.5)
            except (OSError, ValueError):
                raise EOFError("connection closed") from None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in select
        except OSError:
            pass
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self._closed


def client_context() -> ssl.SSLContext:
    """TLS without a CA: the engine's certificate is self-signed and trusted by its pinned fingerprint."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclasses.dataclass
class Connected:
    conn: FramedTLS
    welcome: Message
    fingerprint: str
    first_use: bool  # the certificate was pinned just now


def connect(address: str, token: str, known: KnownEngines, session: str, resume: list[str] | None = None,
            timeout: float = CONNECT_TIMEOUT_S) -> Connected:
    """TLS to HOST:PORT, check the pinned fingerprint, then present the token. Raises ConnectionError
    (UntrustedCertificate, PermissionError for a refused token) with a message for the user."""
    host, port = parse_address(address)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ConnectionError(f"Cannot reach the remote engine at {address}: {exc.strerror or exc}. Is "
                              "`studio engine serve` running there, and is the port open?") from None
    try:
        sock = client_context().wrap_socket(raw, server_hostname=None)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise ConnectionError(f"TLS with {address} failed ({exc}). Is it a Studio engine started with "
                              "`studio engine serve`?") from None
    conn = FramedTLS(sock)
    try:
        seen = fingerprint(conn.peer_certificate())
        first_use = known.check(address, seen)  # before the token leaves this machine
        hello = protocol.make("hello", client=f"studio {__version__}", token=token, session=session,
                              resume=list(resume or []))
        conn.send_bytes(protocol.encode(hello))
        reply = protocol.decode(conn.recv_bytes(protocol.MAX_FRAME_BYTES), protocol.ENGINE_MESSAGES)
    except (OSError, EOFError, ProtocolError) as exc:
        conn.close()
        if isinstance(exc, ConnectionError):
            raise
        raise ConnectionError(f"The remote engine at {address} closed the connection during the handshake "
                              f"({exc}).") from None
    if reply.type == "error":
        conn.close()
        if reply["kind"] == "unauthorized":
            raise PermissionError(reply["message"])
        raise ConnectionError(reply["message"])
    if reply.type != "welcome":
        conn.close()
        raise ConnectionError(f"The remote engine at {address} answered {reply.type!r} instead of welcome.")
    return Connected(conn, reply, seen, first_use)


def new_session() -> str:
    return secrets.token_hex(8)


# -- jobs and outputs ---------------------------------------------------------------------------------


def strip_local_out(job: Any) -> tuple[Any, str]:
    """A job's `out` names a place on this machine, not the server: send it empty, save here later."""
    out = getattr(job, "out", "")
    if out:
        return dataclasses.replace(job, out=""), out
    return job, ""


def save_outputs(msg: Message, out: str, outputs_dir: Path) -> Message:
    """Write the files a remote result carries (payloads named by its `files` field) on this machine,
    and point the result's paths at the local copies. All or nothing: on any failure no file of this
    result is left behind, and the error says where it failed."""
    files = msg.get("files") or []
    result = msg["result"]
    if not isinstance(files, list) or not files:
        return msg
    carried = [f for f in files if isinstance(f, dict) and "size" in f]
    if len(carried) != len(msg.payloads):
        raise ProtocolError(f"result names {len(carried)} files but carries {len(msg.payloads)}")
    folder, stem = _local_target(out, carried, outputs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    names = _names(carried, stem, 0)
    for number in range(1, 10000):
        if not any((folder / n).exists() for n in names):
            break
        names = _names(carried, stem, number)
    tmps: list[Path] = []
    written: list[Path] = []
    mapping: dict[str, str] = {}
    try:
        for data, name in zip(msg.payloads, names, strict=True):
            tmp = folder / f".{name}.{secrets.token_hex(4)}.part"
            with open(tmp, "xb") as fh:
                tmps.append(tmp)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, name, entry in zip(tmps, names, carried, strict=True):
            final = folder / name
            os.link(tmp, final)  # fails if the name was taken meanwhile: never overwrites
            written.append(final)
            mapping[entry["path"]] = str(final)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    new_result = _replace_strings(result, mapping)
    left = [f["path"] for f in files if isinstance(f, dict) and "skipped" in f]
    if left and isinstance(new_result.get("notes"), list):
        new_result["notes"] = new_result["notes"] + [
            f"{len(left)} file(s) stayed on the server (too large to send back): {', '.join(left)}"]
    fields = {k: v for k, v in msg.fields.items() if k != "files"}
    fields["result"] = new_result
    return Message("result", fields, [])


def _local_target(out: str, carried: list[dict], outputs_dir: Path) -> tuple[Path, str]:
    first = Path(carried[0]["path"])
    if out:
        path = Path(out).expanduser()
        if path.suffix.lower() == first.suffix.lower():
            return path.parent, path.stem
        return path, first.stem
    return outputs_dir / time.strftime("%Y-%m-%d"), first.stem


def _names(carried: list[dict], stem: str, number: int) -> list[str]:
    """Local names: the first file takes `stem`, the others keep their names with the first one's stem
    swapped for `stem` (a video's sidecar stays beside it); `number` > 0 adds -N to every name."""
    first_stem = Path(carried[0]["path"]).stem
    names = []
    for entry in carried:
        name = Path(entry["path"]).name
        base = stem + name[len(first_stem):] if name.startswith(first_stem) else name
        if number:
            p = Path(base)
            base = f"{p.stem}-{number}{p.suffix}" if p.suffix else f"{base}-{number}"
        names.append(base)
    return names


def _replace_strings(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, list):
        return [_replace_strings(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _replace_strings(v, mapping) for k, v in value.items()}
    return value
