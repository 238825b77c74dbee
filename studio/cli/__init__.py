"""`studio` command line. With no sub-command it opens the window.

Every job goes through the engine process (EngineClient), exactly as the GUI's do. One module per
sub-command; this one only assembles the parser and dispatches.
"""

from __future__ import annotations

import argparse
import sys

from studio import __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engine"]:  # internal: the engine process parses its own arguments
        from studio.cli import engine

        return engine.run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        return _gui()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    # The sub-command modules are imported here rather than at the top so that
    # `python -m studio.cli.models` does not find its own module already imported by the package.
    from studio.cli import chat, doctor, generate, models, selftest, serve, update

    parser = argparse.ArgumentParser(prog="studio", description="Studio: local image, video and chat generation.")
    parser.add_argument("--version", action="version", version=f"studio {__version__}")
    parser.add_argument("--engine", default=None, metavar="HOST:PORT",
                        help="run jobs on a remote engine (`studio engine serve` there); default: Settings, else local")
    parser.add_argument("--engine-token", default=None, metavar="TOKEN",
                        help="the remote engine's token (default: $STUDIO_ENGINE_TOKEN, else Settings)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("gui", help="open the window (the default)")
    p.set_defaults(func=lambda a: _gui())

    doctor.add_parser(sub)
    selftest.add_parser(sub)
    chat.add_parser(sub)
    models.add_parser(sub)
    generate.add_parser(sub)
    serve.add_parser(sub)
    update.add_parser(sub)
    return parser


def _gui() -> int:
    from studio.ui.app import run_gui

    return run_gui()
