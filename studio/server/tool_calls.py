"""Tool calls read back from a model's text, in the two styles open models write them.

Hermes / Qwen:  <tool_call>{"name": "f", "arguments": {...}}</tool_call>  (one block per call)
Llama 3.x:      {"name": "f", "parameters": {...}}  as the whole answer, optionally after
                <|python_tag|>, several separated by ";"
A call is only accepted for a function the request declared; anything else stays text.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or "call_" + secrets.token_hex(12)

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


def _call_from(obj: object, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or (names and name not in names):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models already write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, names: set[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(the text without the calls, the calls). `names`: the declared functions (empty: any)."""
    names = names or set()
    calls: list[ToolCall] = []
    if "<tool_call>" in text:
        for m in _HERMES.finditer(text):
            try:
                call = _call_from(json.loads(m.group(1)), names)
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
        if calls:
            return _HERMES.sub("", text).strip(), calls
        return text, []
    body = text.strip().removeprefix("<|python_tag|>").strip()
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", body)
    if body.startswith("{"):
        decoder, pos = json.JSONDecoder(), 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _call_from(obj, names)
            if call is None:
                return text, []
            calls.append(call)
            while pos < len(body) and body[pos] in " \t\r\n;":  # Llama 3.2 separates calls with ";"
                pos += 1
        return "", calls
    return text, []
