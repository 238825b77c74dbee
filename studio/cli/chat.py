"""`studio chat`: one answer, or an interactive session, from a language model through the engine."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from studio.cli import common
from studio.client import EngineError, JobCancelledError
from studio.protocol import ChatJob


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a language model (an interactive prompt without PROMPT)")
    p.add_argument("prompt", nargs="?", help="one message to answer; omit for an interactive session")
    p.add_argument("--model", default="", help="a .gguf file, a Hugging Face folder or a library name "
                                                "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--system", default="", help="system prompt")
    # Unset sampling options are the model's own recommendation (engine/sampling.py resolves them).
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    p.add_argument("--top-p", type=float, default=None, help="(default: the model's)")
    p.add_argument("--top-k", type=int, default=None, help="0 = no limit (default: the model's)")
    p.add_argument("--min-p", type=float, default=None, help="(default: the model's, else 0.05)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="1 = off (default: the model's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--truncate", action="store_true", help="drop the oldest turns when the context is full")
    p.add_argument("--quant", choices=["int8", "int4"], default="",
                   help="quantize a full-precision model's weights at load (GGUF files keep their own)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the answer and its timings")
    p.add_argument("--server", default="", metavar="URL",
                   help="chat with an OpenAI-compatible server (vLLM, llama.cpp, Ollama, studio serve) instead")
    p.add_argument("--api-key", default=None, help="the server's key (default: $STUDIO_API_KEY, else the keychain)")
    p.add_argument("--save-key", action="store_true", help="store --api-key in the OS keychain for this server")
    p.add_argument("--list-models", action="store_true", help="list the server's models and exit")
    common.engine_args(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    if args.server:
        from studio.cli.chat_remote import cmd_chat_remote

        return cmd_chat_remote(args)

    def job_for(messages: list[dict]) -> ChatJob:
        return ChatJob(messages=messages, model=args.model, system=args.system, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                       stop=list(args.stop), overflow="truncate" if args.truncate else "error", quant=args.quant)

    status = StatusLine(sys.stderr)
    on_event = answer_printer(status, sys.stdout, stream=not args.json)

    with common.make_client(args) as client:
        if args.prompt is not None:
            status.show("starting the engine…")
            try:
                result = common.run_job(client, job_for([{"role": "user", "content": args.prompt}]), on_event)
            except EngineError as exc:
                status.clear()
                return common.fail(str(exc))
            except JobCancelledError:
                status.clear()
                print()
                return 130
            status.clear()
            if args.json:
                keys = ("text", "prompt_tokens", "completion_tokens", "ttft_s", "tokens_per_s", "model",
                        "finish_reason", "context_length", "notes")
                print(json.dumps({k: result.get(k) for k in keys}, ensure_ascii=False))
            else:
                print()
                for note in result.get("notes") or []:
                    print(f"note: {note}", file=sys.stderr)
            return 0
        return _chat_repl(client, job_for, on_event, status)


class StatusLine:
    """One line of progress on a terminal ("loading model (2/3)…"), erased before anything else is printed.

    Written to stderr and only on a terminal, so piped or --json output never holds it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.showing = False

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K" + text)  # \x1b[2K: erase the line, a shorter text leaves no tail
            self.stream.flush()
            self.showing = True

    def clear(self) -> None:
        if self.showing:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.showing = False


def answer_printer(status: StatusLine, out: TextIO, stream: bool = True) -> Callable[[Any], None]:
    """The engine-event handler of `studio chat`: progress on the status line, tokens to `out` once it is gone."""

    def on_event(msg: Any) -> None:
        if msg.type == "token" and stream:
            status.clear()
            out.write(msg["text"])
            out.flush()
        elif msg.type == "progress" and stream:
            stage = "loading model" if msg["stage"] == "loading" else msg["stage"]
            total = msg["total"]
            status.show(f"{stage} ({msg['step']}/{total})…" if total and total > 1 else f"{stage}…")
        elif msg.type == "started" and stream:  # a warm model: the prompt is being read
            status.show("thinking…")

    return on_event


def _chat_repl(client, job_for: Callable[[list[dict]], ChatJob], on_event, status: StatusLine) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ModuleNotFoundError as exc:  # Windows has no readline: input() still works, without history
        if exc.name != "readline":
            raise
    print("Studio chat. /reset starts over, /exit or Ctrl+D quits, Ctrl+C stops an answer.", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        if client.state != "ready":
            status.show("starting the engine…")
        try:
            result = common.run_job(client, job_for(messages), on_event)
        except JobCancelledError:
            status.clear()
            print("\n(stopped)", file=sys.stderr)
            messages.pop()
            continue
        except EngineError as exc:
            status.clear()
            print(f"\nstudio: {exc}", file=sys.stderr)
            messages.pop()
            if exc.kind in ("engine_crashed", "engine_hung") and client.state == "stopped":
                # The CLI's client does not restart by itself: start the next engine now, while the user types.
                print("(starting a new engine)", file=sys.stderr)
                client.start(wait=False)
            continue
        status.clear()
        print(f"\n[{result.get('completion_tokens', 0)} tokens, {result.get('tokens_per_s', 0):.1f} tok/s]",
              file=sys.stderr)
        messages.append({"role": "assistant", "content": result.get("text", "")})
