"""`studio engine serve`: the engine behind a TLS listener, for a window or CLI on another machine.

The engine's serve loop runs unchanged: it talks to an EngineHub, a Connection-like object
(send_bytes / recv_bytes) that merges the frames of every connected desk into one inbox and routes
the engine's frames back to the desk that submitted the job. Between the two sit TLS (a self-signed
certificate, pinned by clients on first use) and a token.

A desk that loses its network keeps its jobs: they run on, their final frames are kept for
RESULT_TTL_S, and a reconnecting client names the jobs it still waits for (`hello.resume`) to get
them. Results that name files (images, videos) carry the files' bytes, so they are saved at the desk.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path

from studio import __version__, protocol
from studio.protocol import Message, ProtocolError
from studio.remote_link import FramedTLS
from studio.remote_trust import fingerprint, parse_address

log = logging.getLogger("studio.engine.remote")

RESULT_TTL_S = 600.0
RESULT_CACHE_BYTES = 512 << 20
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0  # clients ping every second; a minute of silence means the desk is gone
MAX_HANDSHAKES = 16
FINAL = ("result", "error", "cancelled")
_PREFIX = struct.Struct("<4sI")
PLAIN_REFUSAL = (b"Studio engine: this port speaks TLS only. Connect with `studio --engine HOST:PORT` "
                 b"or the window's Settings > Remote engine.\n")


# -- certificate ----------------------------------------------------------------------------------------

def ensure_certificate(folder: Path) -> tuple[Path, Path, str, bool]:
    """(cert, key, SHA-256 fingerprint, created now). A self-signed EC P-256 certificate, made once."""
    cert_path, key_path = folder / "engine-cert.pem", folder / "engine-key.pem"
    created = False
    if not (cert_path.exists() and key_path.exists()):
        _make_certificate(folder, cert_path, key_path)
        created = True
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert_path, key_path, fingerprint(cert.public_bytes(Encoding.DER)), created


def _make_certificate(folder: Path, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Studio engine on {socket.gethostname()}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.DNSName(socket.gethostname())]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    for path, data in ((key_path, key_pem), (cert_path, cert.public_bytes(serialization.Encoding.PEM))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o600)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the hub: many desks, one engine ---------------------------------------------------------------------

def _peek(frame: bytes) -> dict:
    """The header of a frame, or {} for garbage (the engine itself reports malformed frames)."""
    try:
        magic, size = _PREFIX.unpack_from(frame)
        if magic != protocol.MAGIC or size > protocol.MAX_HEADER_BYTES:
            return {}
        header = json.loads(frame[_PREFIX.size:_PREFIX.size + size])
        return header if isinstance(header, dict) else {}
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, struct.error):
        return {}


class EngineHub:
    """Connection-like for `Engine`: recv_bytes yields the desks' frames, send_bytes routes the engine's."""

    def __init__(self, result_ttl_s: float = RESULT_TTL_S, cache_bytes: int = RESULT_CACHE_BYTES) -> None:
        self._inbox: queue.Queue[bytes | None] = queue.Queue()
        self._lock = threading.Lock()
        self._desks: dict[str, FramedTLS] = {}  # session -> its live connection
        self._owner: dict[str, str] = {}  # job id -> session, until the job's final frame
        self._finished: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._finished_bytes = 0
        self.result_ttl_s = result_ttl_s
        self.cache_bytes = cache_bytes

    # engine side
    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        frame = self._inbox.get()
        if frame is None:
            raise EOFError("the remote engine is shutting down")
        return frame

    def send_bytes(self, frame: bytes) -> None:
        header = _peek(frame)
        kind, job_id = header.get("type"), header.get("job_id")
        if kind == "welcome":
            return  # each desk gets its own on connecting
        if kind in FINAL and isinstance(job_id, str):
            if kind == "result":
                frame = attach_outputs(frame)
            with self._lock:
                self._keep(job_id, frame)
                session = self._owner.pop(job_id, None)
        else:
            with self._lock:
                session = self._owner.get(job_id) if isinstance(job_id, str) else None
        with self._lock:
            if session is not None:
                targets = [(session, self._desks[session])] if session in self._desks else []
            else:
                targets = list(self._desks.items())
        for sess, conn in targets:
            try:
                conn.send_bytes(frame)
            except (OSError, ValueError, EOFError):
                self._detach(sess, conn)  # never raise: the engine would take that as its end

    def close(self) -> None:
        self._inbox.put(None)
        with self._lock:
            desks = list(self._desks.values())
            self._desks.clear()
        for conn in desks:
            conn.close()

    def _keep(self, job_id: str, frame: bytes) -> None:
        now = time.monotonic()
        self._finished[job_id] = (now, frame)
        self._finished_bytes += len(frame)
        while self._finished and (self._finished_bytes > self.cache_bytes
                                  or now - next(iter(self._finished.values()))[0] > self.result_ttl_s):
            _, (_, old) = self._finished.popitem(last=False)
            self._finished_bytes -= len(old)

    # network side
    def attach(self, session: str, conn: FramedTLS, resume: list[str]) -> None:
        """A desk connected (or came back): it replaces the session's old connection."""
        with self._lock:
            old = self._desks.get(session)
            self._desks[session] = conn
        if old is not None:
            old.close()
        try:
            conn.send_bytes(protocol.encode(protocol.make("welcome", engine_version=__version__, pid=os.getpid(),
                                                          remote=True)))
            self._resume(session, conn, resume)
        except (OSError, ValueError, EOFError):
            self._detach(session, conn)
            return
        threading.Thread(target=self._read, args=(session, conn), daemon=True, name="studio-desk").start()

    def _resume(self, session: str, conn: FramedTLS, job_ids: list) -> None:
        for job_id in job_ids:
            if not isinstance(job_id, str):
                continue
            with self._lock:
                kept = self._finished.get(job_id)
                running = job_id in self._owner
                if running:
                    self._owner[job_id] = session
            if kept is not None:
                conn.send_bytes(kept[1])
            elif not running:
                conn.send_bytes(protocol.encode(protocol.make(
                    "error", job_id=job_id, kind="connection_lost",
                    message=f"The remote engine has no record of job {job_id}: it never arrived, or it finished more "
                            f"than {self.result_ttl_s / 60:.0f} minutes ago. Run it again.", detail="")))

    def _read(self, session: str, conn: FramedTLS) -> None:
        while True:
            try:
                frame = conn.recv_bytes(protocol.MAX_FRAME_BYTES)
            except (EOFError, OSError):
                break
            header = _peek(frame)
            kind = header.get("type")
            if kind == "shutdown":
                break  # a desk saying goodbye; the server keeps serving the others
            if kind == "hello":
                try:
                    self._resume(session, conn, list(header.get("resume") or []))
                except (OSError, ValueError, EOFError, TypeError):
                    break
                continue
            if kind == "submit" and isinstance(header.get("job_id"), str):
                job = header.get("job")
                if isinstance(job, dict) and job.get("out"):
                    # A desk must not pick where files land on the server: they go to its outputs folder
                    # and travel back; the desk's own client applies `out` on its side.
                    self._refuse(conn, header["job_id"], "A remote engine saves into its own outputs folder and "
                                 "sends the files back; send the job with an empty `out`.")
                    continue
                with self._lock:
                    self._owner[header["job_id"]] = session
            self._inbox.put(frame)
        self._detach(session, conn)

    def _refuse(self, conn: FramedTLS, job_id: str, message: str) -> None:
        try:
            conn.send_bytes(protocol.encode(protocol.make("error", job_id=job_id, kind="bad_input", message=message,
                                                          detail="")))
        except (OSError, ValueError, EOFError):
            pass

    def _detach(self, session: str, conn: FramedTLS) -> None:
        with self._lock:
            if self._desks.get(session) is conn:
                del self._desks[session]
        conn.close()


def attach_outputs(frame: bytes) -> bytes:
    """A result frame with the files it names carried as payloads (as many as a frame holds)."""
    try:
        msg = protocol.decode(frame, protocol.ENGINE_MESSAGES)
    except ProtocolError:
        return frame
    result = msg["result"]
    paths: list[str] = []
    for item in (result.get("images") or []) + (result.get("videos") or []):
        if isinstance(item, dict):
            paths += [item.get("path") or "", item.get("sidecar") or ""]
    paths.append(result.get("path") or "" if isinstance(result.get("path"), str) else "")
    paths = list(dict.fromkeys(p for p in paths if p))
    budget = protocol.MAX_FRAME_BYTES - len(frame) - (1 << 20)
    files, payloads = [], []
    for path in paths:
        try:
            size = os.path.getsize(path)
            if size > budget or len(payloads) >= protocol.MAX_PAYLOADS:
                files.append({"path": path, "skipped": "too large for one frame"})
                continue
            data = Path(path).read_bytes()
        except OSError as exc:
            files.append({"path": path, "skipped": f"unreadable: {exc}"})
            continue
        budget -= len(data)
        files.append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        payloads.append(data)
    if not files:
        return frame
    return protocol.encode(Message("result", {**msg.fields, "files": files}, payloads))


# -- the listener ----------------------------------------------------------------------------------------

class RemoteListener:
    """Accepts TLS connections, checks each desk's token, hands good ones to the hub."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, token: str, hub: EngineHub) -> None:
        self.ctx, self.hub = ctx, hub
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else b""
        self._failures: collections.Counter[str] = collections.Counter()
        self._slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.address = self.sock.getsockname()[:2]

    def serve_forever(self) -> None:
        while True:
            try:
                raw, peer = self.sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                raw.close()  # a flood of half-open connections must not starve real desks
                continue
            threading.Thread(target=self._handshake, args=(raw, peer[0]), daemon=True,
                             name="studio-handshake").start()

    def _handshake(self, raw: socket.socket, peer: str) -> None:
        try:
            conn = self._authenticate(raw, peer)
        finally:
            self._slots.release()
        if conn is not None:
            self.hub.attach(*conn)

    def _authenticate(self, raw: socket.socket, peer: str) -> tuple[str, FramedTLS, list] | None:
        raw.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            first = raw.recv(1, socket.MSG_PEEK)
            if first and first[0] != 0x16:  # not a TLS handshake record: say so in plain words
                raw.sendall(PLAIN_REFUSAL)
                log.warning("refused a plain (non-TLS) connection from %s", peer)
                _close_gently(raw)
                return None
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc)
            raw.close()
            return None
        conn = FramedTLS(tls, idle_timeout_s=HANDSHAKE_TIMEOUT_S)
        try:
            hello = protocol.decode(conn.recv_bytes(1 << 16), protocol.CLIENT_MESSAGES)
            if hello.type != "hello":
                raise ProtocolError(f"expected hello, got {hello.type}")
        except (OSError, EOFError, ProtocolError) as exc:
            log.warning("bad handshake from %s: %s", peer, exc)
            conn.close()
            return None
        given = hello.get("token")
        given_digest = hashlib.sha256(given.encode() if isinstance(given, str) else b"").digest()
        if self._token_digest and not hmac.compare_digest(given_digest, self._token_digest):
            self._failures[peer] += 1
            # Slower with every failure from the same address: guessing a token costs seconds per try.
            time.sleep(min(0.5 * 2 ** (self._failures[peer] - 1), 8.0))
            log.warning("refused a wrong token from %s (%d failures)", peer, self._failures[peer])
            try:
                conn.send_bytes(protocol.encode(protocol.make(
                    "error", job_id=None, kind="unauthorized",
                    message="The remote engine refused the token. Use the token given to `studio engine serve "
                            "--token` (set STUDIO_ENGINE_TOKEN, `--engine-token`, or Settings > Remote engine).",
                    detail="")))
            except (OSError, ValueError):
                pass
            conn.close()
            return None
        self._failures.pop(peer, None)
        session = hello.get("session")
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            session = os.urandom(8).hex()
        resume = hello.get("resume")
        conn.idle_timeout_s = IDLE_TIMEOUT_S
        log.info("desk %s connected from %s", session, peer)
        return session, conn, resume if isinstance(resume, list) else []

    def close(self) -> None:
        self.sock.close()


def _close_gently(raw: socket.socket) -> None:
    """Close after the peer has read our words: closing with its bytes unread would send a reset,
    which can discard what we sent before it arrives."""
    try:
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(1.0)
        for _ in range(64):  # at most 4 MiB of whatever it sent
            if not raw.recv(65536):
                break
    except OSError:
        pass
    raw.close()


# -- entry point -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio engine serve",
                                     description="Run the engine for windows and CLIs on other machines (TLS + token).")
    parser.add_argument("--listen", default="127.0.0.1:7862", metavar="HOST:PORT",
                        help="address to listen on (default 127.0.0.1:7862; 0.0.0.0:7862 for every interface)")
    parser.add_argument("--token", default=os.environ.get("STUDIO_ENGINE_TOKEN", ""),
                        help="the secret desks must present (default: $STUDIO_ENGINE_TOKEN); required beyond localhost")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: from Settings)")
    parser.add_argument("--vram-budget", default=None)
    parser.add_argument("--result-ttl", type=float, default=RESULT_TTL_S,
                        help="seconds a finished job's result waits for a desk that lost its connection")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="engine %(levelname)s %(message)s", stream=sys.stderr)
    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        print(f"studio: {exc}", file=sys.stderr)
        return 2
    if not args.token and not is_loopback(host):
        print(f"studio: listening on {host} without a token would let anyone who reaches this port use the GPU "
              "and read what it writes. Pass --token SECRET (e.g. --token $(python -c \"import secrets; "
              "print(secrets.token_urlsafe(24))\")) or set STUDIO_ENGINE_TOKEN.", file=sys.stderr)
        return 2

    from studio.paths import Paths
    from studio.settings import Settings
    from studio.units import parse_size

    paths = Paths.default()
    settings = Settings.load(paths)
    cert, key, fp, created = ensure_certificate(paths.data / "engine-tls")
    hub = EngineHub(result_ttl_s=args.result_ttl)
    try:
        listener = RemoteListener(host, port, server_context(cert, key), args.token, hub)
    except OSError as exc:
        print(f"studio: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if created:
        print(f"New engine certificate {cert}\nSHA-256 fingerprint: {fp}\nDesks pin it on first connection; "
              "compare it with what they show.", flush=True)
    bound = f"[{listener.address[0]}]:{listener.address[1]}" if ":" in listener.address[0] else \
        f"{listener.address[0]}:{listener.address[1]}"
    print(f"Studio engine listening on {bound} (TLS{', token required' if args.token else ''})", flush=True)

    from studio.engine.server import Engine

    budget = args.vram_budget or settings.vram_budget
    engine = Engine(hub, args.device or settings.device, parse_size(budget) if budget else 0,
                    parse_size(settings.vram_reserve) if settings.vram_reserve else 0,
                    {"outputs": str(settings.outputs_path(paths))})
    threading.Thread(target=listener.serve_forever, daemon=True, name="studio-listener").start()
    try:
        engine.serve()
    except KeyboardInterrupt:
        pass
    listener.close()
    hub.close()
    os._exit(0)  # the worker may be inside torch; don't wait for it


def print_fingerprint() -> int:
    from studio.paths import Paths

    cert, _, fp, created = ensure_certificate(Paths.default().data / "engine-tls")
    print(f"{fp}  {cert}{'  (new)' if created else ''}")
    return 0
