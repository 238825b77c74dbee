"""OpenAI request bodies -> engine jobs, engine results -> OpenAI response bodies.

Sampling follows OpenAI's defaults (temperature 1, top_p 1, no top-k or min-p) unless the request
sets the extras vLLM and llama.cpp also accept (top_k, min_p, repetition_penalty).
`frequency_penalty` has no exact twin in the engine (its counted penalty is multiplicative), so
f in [-2, 2] becomes repetition_penalty 2 ** (f / 2): 0 is off, 2 doubles the penalty, -2 halves it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from studio.protocol import ChatJob, CompletionJob, EmbedJob, ImageJob
from studio.server.catalog import ServedModel
from studio.server.errors import APIError, bad
from studio.server.tool_calls import ToolCall, parse_tool_calls

MAX_STOPS = 4
JSON_INSTRUCTION = ("Answer with one valid JSON object and nothing else: no prose, no code fences.")
PLAIN_ROLES = ("system", "user", "assistant")


@dataclass
class Plan:
    """What the response needs besides the engine's text."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    tool_names: set = field(default_factory=set)
    tool_choice: Any = "auto"
    json_mode: bool = False
    include_usage: bool = False
    echo_prompt: str = ""


def _num(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise bad(f"{name} must be a number between {lo} and {hi}, got {v!r}.", name)
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"{name} must be an integer between {lo} and {hi}, got {v!r}.", name)
    return v


def check_n(body: dict) -> None:
    n = body.get("n", 1)
    if n != 1:
        raise bad(f"n={n!r} is not supported: Studio returns one choice per request (n=1). Send several "
                  "requests instead.", "n", "unsupported_value")


def sampling(body: dict, max_tokens_limit: int, default_max: int) -> dict:
    """The sampling fields shared by ChatJob and CompletionJob."""
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if mt is None:
        mt = min(default_max, max_tokens_limit)
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise bad(f"{name} must be a positive integer, got {mt!r}.", name)
    if mt > max_tokens_limit:
        raise bad(f"{name}={mt} is above this server's limit of {max_tokens_limit} (studio serve "
                  "--max-tokens raises it).", name, "max_tokens_exceeded")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise bad(f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings.", "stop")
    freq = _num(body, "frequency_penalty", 0.0, -2.0, 2.0)
    rep = _num(body, "repetition_penalty", 2 ** (freq / 2), 0.01, 10.0)
    return {
        "temperature": _num(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _num(body, "top_p", 1.0, 1e-6, 1.0),
        "top_k": _int(body, "top_k", 0, 0, 1 << 20),
        "min_p": _num(body, "min_p", 0.0, 0.0, 0.999),
        "presence_penalty": _num(body, "presence_penalty", 0.0, -2.0, 2.0),
        "repetition_penalty": rep,
        "seed": _int(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        "max_tokens": mt,
        "stop": stops,
    }


def _text(content: Any, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is understood
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise bad(f"messages[{i}]: content part {kind!r} is not supported; Studio's chat models read "
                          "text only.", f"messages[{i}].content")
            parts.append(p["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be text or a list of text parts.", f"messages[{i}].content")


def _messages(body: dict) -> tuple[list[dict], bool]:
    """(messages with text content, whether they need the tool-aware path)."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list.", "messages", "missing_messages")
    out, tooly = [], False
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a role.", f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in (*PLAIN_ROLES, "tool"):
            raise bad(f"messages[{i}]: unknown role {role!r}.", f"messages[{i}].role")
        msg: dict = {"role": role, "content": _text(m.get("content"), i)}
        if role == "tool":
            tooly = True
            msg["tool_call_id"] = str(m.get("tool_call_id", ""))
            if m.get("name"):
                msg["name"] = str(m["name"])
        if role == "assistant" and m.get("tool_calls"):
            tooly = True
            msg["tool_calls"] = [_template_call(c, i) for c in m["tool_calls"]]
        if msg["content"] is None and not msg.get("tool_calls"):
            raise bad(f"messages[{i}] has no content.", f"messages[{i}].content")
        out.append(msg)
    return out, tooly


def _template_call(call: Any, i: int) -> dict:
    """An OpenAI tool call as chat templates expect it: arguments as an object, not a JSON string."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"messages[{i}].tool_calls: each call needs function.name.", f"messages[{i}].tool_calls")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except json.JSONDecodeError:
            raise bad(f"messages[{i}].tool_calls: arguments are not valid JSON.", f"messages[{i}].tool_calls") from None
    return {"id": call.get("id", ""), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _tools(body: dict) -> tuple[list[dict], Any]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise bad("tools must be a list.", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}.",
                      f"tools[{i}]")
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice == "none":
        return [], choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise bad(f"tool_choice names {name!r}, which is not in tools.", "tool_choice")
    elif choice not in ("auto", "required"):
        raise bad("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', ...}.", "tool_choice")
    return tools, choice


def _json_mode(body: dict) -> tuple[bool, str]:
    rf = body.get("response_format")
    if rf is None:
        return False, ""
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return False, ""
    if kind == "json_object":
        return True, JSON_INSTRUCTION
    if kind == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema", {})
        return True, JSON_INSTRUCTION + " It must follow this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    raise bad("response_format.type must be 'text', 'json_object' or 'json_schema'.", "response_format")


def chat_job(body: dict, model: ServedModel, max_tokens_limit: int, plan: Plan) -> ChatJob | CompletionJob:
    check_n(body)
    params = sampling(body, max_tokens_limit, 512)
    messages, tooly = _messages(body)
    tools, plan.tool_choice = _tools(body)
    plan.tool_names = {t["function"]["name"] for t in tools}
    plan.json_mode, instruction = _json_mode(body)
    so = body.get("stream_options")
    plan.include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
    if instruction:
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": (messages[0]["content"] or "") + "\n\n" + instruction}
        else:
            messages.insert(0, {"role": "system", "content": instruction})
    if plan.tool_choice == "required" and tools:
        messages.insert(0, {"role": "system", "content": "Answer by calling one of the tools."})
    if tools or tooly:
        return CompletionJob(messages=messages, tools=tools, model=model.spec, **params)
    return ChatJob(messages=messages, model=model.spec, **params)


def completion_job(body: dict, model: ServedModel, max_tokens_limit: int, plan: Plan) -> CompletionJob:
    check_n(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be one non-empty string (lists of prompts and token ids are not supported).",
                  "prompt")
    if body.get("echo"):
        plan.echo_prompt = prompt
    if body.get("suffix"):
        raise bad("suffix (fill-in-the-middle) is not supported.", "suffix", "unsupported_value")
    return CompletionJob(prompt=prompt, model=model.spec, **sampling(body, max_tokens_limit, 16))


def embed_job(body: dict, model: ServedModel) -> EmbedJob:
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise bad("input must be a non-empty string or a list of non-empty strings (token ids are not supported).",
                  "input")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise bad("encoding_format must be 'float' or 'base64'.", "encoding_format")
    return EmbedJob(texts=texts, model=model.spec)


_SIZE = re.compile(r"^(\d{2,4})x(\d{2,4})$")


def image_job(body: dict, model: ServedModel, max_images: int) -> tuple[ImageJob, str]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt must be a non-empty string.", "prompt")
    n = _int(body, "n", 1, 1, max_images)
    size = body.get("size") or "512x512"
    m = _SIZE.match(size) if isinstance(size, str) else None
    if m is None:
        raise bad(f"size must look like 512x512, got {size!r}.", "size")
    w, h = int(m.group(1)), int(m.group(2))
    if w % 8 or h % 8 or not (64 <= w <= 2048 and 64 <= h <= 2048):
        raise bad(f"size {size}: width and height must be multiples of 8 between 64 and 2048.", "size")
    fmt = body.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise bad("response_format must be 'b64_json' or 'url'.", "response_format")
    if fmt == "url":
        raise bad("response_format 'url' is not supported: Studio does not host images; use 'b64_json'.",
                  "response_format", "unsupported_value")
    extra: dict = {}
    if body.get("steps") is not None:
        extra["steps"] = _int(body, "steps", 25, 1, 200)
    if body.get("seed") is not None:
        extra["seed"] = _int(body, "seed", -1, -1, (1 << 32) - 1)
    if isinstance(body.get("negative_prompt"), str):
        extra["negative"] = body["negative_prompt"]
    return ImageJob(model=model.spec, prompt=prompt, width=w, height=h, batch_size=n, previews=False, **extra), fmt


# -- responses -----------------------------------------------------------------------------------

def usage(result: dict) -> dict:
    p, c = int(result.get("prompt_tokens", 0)), int(result.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def check_json(text: str) -> APIError | None:
    """None when `text` is one JSON object (code fences allowed around it); else the error to report."""
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text)
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return APIError(500, f"The model's answer is not valid JSON ({exc.msg} at character {exc.pos}); "
                        f"it began {text[:120]!r}. Try a larger model or a lower temperature.", "server_error",
                        "response_format", "invalid_json_output")
    if not isinstance(value, dict):
        return APIError(500, "The model answered JSON that is not an object.", "server_error",
                        "response_format", "invalid_json_output")
    return None


def split_tools(text: str, plan: Plan) -> tuple[str, list[ToolCall]]:
    if not plan.tool_names:
        return text, []
    return parse_tool_calls(text, plan.tool_names)


def chat_body(result: dict, plan: Plan) -> dict:
    text, calls = split_tools(result.get("text", ""), plan)
    message: dict = {"role": "assistant", "content": text if (text or not calls) else None}
    finish = result.get("finish_reason", "stop")
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
        finish = "tool_calls"
    return {"id": plan.id, "object": "chat.completion", "created": plan.created, "model": plan.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage(result), "system_fingerprint": f"studio-seed-{result.get('seed')}"}


def chat_chunk(plan: Plan, delta: dict, finish: str | None = None) -> dict:
    return {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created, "model": plan.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_body(result: dict, plan: Plan) -> dict:
    return {"id": plan.id, "object": "text_completion", "created": plan.created, "model": plan.model,
            "choices": [{"index": 0, "text": plan.echo_prompt + result.get("text", ""), "logprobs": None,
                         "finish_reason": result.get("finish_reason", "stop")}], "usage": usage(result)}


def completion_chunk(plan: Plan, text: str, finish: str | None = None) -> dict:
    return {"id": plan.id, "object": "text_completion", "created": plan.created, "model": plan.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
