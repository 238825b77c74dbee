"""Trust on first use for remote engines, as SSH does with known_hosts.

The first connection to HOST:PORT stores the SHA-256 fingerprint of the certificate the engine
presented; later connections must present the same one. A changed certificate is refused before
the token is sent, with a message that says how to re-trust it on purpose. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path


class UntrustedCertificate(ConnectionError):
    """The remote engine's certificate is not the one pinned for its address."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as `AB:CD:...`, the form `openssl x509 -fingerprint -sha256` prints."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


class KnownEngines:
    """The pin store: a JSON object {"host:port": {"sha256": "AB:..", "pinned": "2026-12-05 10:00:00"}}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Never treat a damaged pin file as "nothing pinned": that would trust any certificate.
            raise UntrustedCertificate(f"The list of trusted engines ({self.path}) is unreadable ({exc}). Fix or "
                                       "delete it, then connect again.") from None
        return data if isinstance(data, dict) else {}

    def check(self, address: str, seen: str) -> bool:
        """Raise UntrustedCertificate if `address` is pinned to another fingerprint; pin it if new.
        Returns True when the fingerprint was pinned just now (first use)."""
        pins = self.load()
        entry = pins.get(address)
        if isinstance(entry, dict) and entry.get("sha256"):
            if entry["sha256"] == seen:
                return False
            raise UntrustedCertificate(
                f"The remote engine at {address} presented a different certificate than the one trusted on "
                f"{entry.get('pinned', 'first use')}.\n  trusted:   {entry['sha256']}\n  presented: {seen}\n"
                "If the server's certificate was regenerated on purpose, compare the new fingerprint with the one "
                f"`studio engine serve` printed on the server, then run `studio engine forget {address}` and "
                "connect again. Otherwise someone may be intercepting the connection: do not connect.")
        pins[address] = {"sha256": seen, "pinned": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._save(pins)
        return True

    def forget(self, address: str) -> bool:
        pins = self.load()
        if address not in pins:
            return False
        del pins[address]
        self._save(pins)
        return True

    def _save(self, pins: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".known-engines-", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(pins, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def known_engines_path(data_dir: Path) -> Path:
    return data_dir / "known_engines.json"


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); a clear error for anything else."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not an engine address: write HOST:PORT, e.g. 192.168.1.20:7862")
    return host, int(port)
