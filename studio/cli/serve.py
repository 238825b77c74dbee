"""`studio serve`: the OpenAI-compatible HTTP API on this machine's engine.

Port 8420 by default: LM Studio's 1234, Ollama's 11434 and llama.cpp's 8080 stay free, so Studio can
run beside them.
"""

from __future__ import annotations

import argparse
import os
import sys

from studio.cli import common


def add_parser(sub) -> None:
    from studio.server.app import DEFAULT_PORT

    p = sub.add_parser("serve", help="serve the installed models over an OpenAI-compatible HTTP API")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--token", default=None,
                   help="API key clients must send as 'Authorization: Bearer ...' (default: $STUDIO_API_TOKEN; "
                        "optional on 127.0.0.1, required on any other address)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API, e.g. http://localhost:3000 (repeatable; "
                        "CORS is off by default)")
    p.add_argument("--max-tokens", type=int, default=4096, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="requests in flight at once (queued or running); more are refused with 429")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes")
    common.engine_args(p)
    p.set_defaults(func=cmd_serve)


def example(base: str, token: str, model: str) -> str:
    """What to paste into a shell or a script to talk to the server."""
    key = token or "none"
    auth = f' -H "Authorization: Bearer {token}"' if token else ""
    return (f"curl {base}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\\n"
            f"  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n\n"
            f"from openai import OpenAI\n"
            f"client = OpenAI(base_url=\"{base}/v1\", api_key=\"{key}\")\n"
            f"print(client.chat.completions.create(model=\"{model}\", "
            f"messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}]).choices[0].message.content)")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        if exc.name not in ("starlette", "uvicorn"):
            raise
        return common.fail(f"the server needs {exc.name}: pip install starlette uvicorn httpx")
    from studio.server import ServerConfig, create_app
    from studio.server.catalog import BUNDLED_ID

    token = args.token if args.token is not None else os.environ.get("STUDIO_API_TOKEN", "")
    config = ServerConfig(host=args.host, port=args.port, token=token, cors_origins=list(args.cors),
                          max_body_bytes=args.max_body, max_tokens=args.max_tokens,
                          max_concurrent=args.max_concurrent)
    try:
        app = create_app(config, common.make_client(args), own_client=True)
    except ValueError as exc:
        return common.fail(str(exc), 2)
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    print(f"Studio API on {base}/v1 (models: {base}/v1/models; Ctrl+C stops)", file=sys.stderr)
    print(example(base, token, BUNDLED_ID), file=sys.stderr)
    # The engine runs in its own process, so one worker here is enough; more would start more engines.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
