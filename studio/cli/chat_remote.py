"""`studio chat --server URL`: the same chat, answered by an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import json
import sys

from studio.cli import common
from studio.remote_chat import RemoteChat, RemoteChatError, load_key, save_key


def cmd_chat_remote(args: argparse.Namespace) -> int:
    try:
        key = args.api_key if args.api_key is not None else load_key(args.server)
        if args.save_key and args.api_key:
            if not save_key(args.server, args.api_key):
                print("studio: no OS keychain available (pip install keyring); the key was not stored",
                      file=sys.stderr)
        with RemoteChat(args.server, key) as remote:
            if args.list_models:
                for m in remote.models():
                    print(m["id"] + (f"  ({m['kind']})" if m.get("kind") else ""))
                return 0
            model = args.model or _only_model(remote)
            params = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                      "seed": args.seed, "stop": list(args.stop) or None}
            system = [{"role": "system", "content": args.system}] if args.system else []
            if args.prompt is not None:
                return _one(remote, model, system + [{"role": "user", "content": args.prompt}], params, args.json)
            return _repl(remote, model, system, params)
    except RemoteChatError as exc:
        return common.fail(str(exc))


def _only_model(remote: RemoteChat) -> str:
    chat = [m["id"] for m in remote.models() if m.get("kind", "chat") == "chat"]
    if len(chat) == 1:
        return chat[0]
    raise RemoteChatError("bad_request", "Choose a model with --model; the server has: "
                          + (", ".join(chat) or "none"))


def _one(remote: RemoteChat, model: str, messages: list[dict], params: dict, as_json: bool) -> int:
    echo = None if as_json else _print
    answer = remote.complete(model, messages, on_text=echo, **params)
    if as_json:
        print(json.dumps({"text": answer.text, "finish_reason": answer.finish_reason, "model": answer.model,
                          "usage": answer.usage, "server": remote.base}, ensure_ascii=False))
    else:
        print()
    return 0


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _repl(remote: RemoteChat, model: str, system: list[dict], params: dict) -> int:
    print(f"Chat with {model} on {remote.base}. /reset starts over, /exit or Ctrl+D quits.", file=sys.stderr)
    messages: list[dict] = list(system)
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = remote.complete(model, messages, on_text=_print, **params)
        except KeyboardInterrupt:  # closing the stream cancels the job on the server
            print("\n(stopped)", file=sys.stderr)
            messages.pop()
            continue
        except RemoteChatError as exc:
            print(f"\nstudio: {exc}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": answer.text})
