"""`studio engine ...`: the engine process (internal: the GUI and the CLI start it with `--address`), and

  studio engine serve --listen HOST:PORT [--token T]   the engine for desks on other machines
  studio engine fingerprint                            this machine's engine certificate fingerprint
  studio engine forget HOST:PORT                       drop a remote engine's pinned certificate
"""

from __future__ import annotations


def run(rest: list[str]) -> int:
    if rest[:1] == ["serve"]:  # the engine for desks on other machines (TLS + token)
        from studio.engine.remote import main as serve_main

        return serve_main(rest[1:])
    if rest[:1] == ["fingerprint"]:
        from studio.engine.remote import print_fingerprint

        return print_fingerprint()
    if rest[:1] == ["forget"]:
        return _forget(rest[1:])
    # Imported here, not at the top: the engine brings torch, and `studio --help`, `studio models` and the
    # client commands must start without it (tests/test_layering.py holds studio.cli to that).
    from studio.engine.server import main as engine_main

    return engine_main(rest)


def _forget(rest: list[str]) -> int:
    import sys

    from studio.paths import Paths
    from studio.remote_trust import KnownEngines, UntrustedCertificate, known_engines_path, parse_address

    if len(rest) != 1:
        print("usage: studio engine forget HOST:PORT", file=sys.stderr)
        return 2
    try:
        parse_address(rest[0])
        store = KnownEngines(known_engines_path(Paths.default().data))
        removed = store.forget(rest[0])
    except (ValueError, UntrustedCertificate) as exc:
        print(f"studio: {exc}", file=sys.stderr)
        return 2
    print(f"forgot the certificate of {rest[0]}; the next connection pins the one it presents" if removed
          else f"no certificate was pinned for {rest[0]}")
    return 0
