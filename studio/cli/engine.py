"""`studio engine ...`: internal; the GUI and the CLI start the engine process with it."""

from __future__ import annotations


def run(rest: list[str]) -> int:
    # Imported here, not at the top: the engine brings torch, and `studio --help`, `studio models` and the
    # client commands must start without it (tests/test_layering.py holds studio.cli to that).
    from studio.engine.server import main as engine_main

    return engine_main(rest)
