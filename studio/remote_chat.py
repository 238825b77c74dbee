"""Chat with any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, another `studio serve`).

Torch-free and Qt-free: the CLI uses it directly and the Chat tab can run it on a worker thread.
Keys live in the OS keychain (`keyring`) when it is installed, never in plain settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

KEYRING_SERVICE = "studio-remote-chat"
ENV_KEY = "STUDIO_API_KEY"


class RemoteChatError(RuntimeError):
    """A failure talking to the server; str() says what happened and what to do. `kind`:
    "bad_key", "refused", "timeout", "not_found", "bad_request", "server", "bad_response"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class RemoteAnswer:
    text: str
    finish_reason: str
    model: str
    usage: dict = field(default_factory=dict)


def normalise_base(url: str) -> str:
    """'http://host:8000', '.../v1' and '.../v1/' all -> 'http://host:8000/v1'."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RemoteChatError("bad_request", f"{url!r} is not an http(s) URL; give e.g. http://host:8000/v1.")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteChat:
    def __init__(self, base_url: str, api_key: str = "", timeout: float = 60.0, connect_timeout: float = 5.0) -> None:
        self.base = normalise_base(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=connect_timeout))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteChat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, exc: Exception) -> RemoteChatError:
        if isinstance(exc, httpx.ConnectError):
            return RemoteChatError("refused", f"Could not connect to {self.base}: {exc}. Is the server running, "
                                   "and are the address and port right?")
        if isinstance(exc, httpx.TimeoutException):
            return RemoteChatError("timeout", f"{self.base} did not answer in time ({type(exc).__name__}). The "
                                   "server may be busy or loading a model; try again or raise the timeout.")
        return RemoteChatError("server", f"Talking to {self.base} failed: {exc}")

    def _check(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            r.read()
            err = r.json().get("error", {})
            detail = err.get("message", "") if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError, httpx.HTTPError):
            detail = r.text[:200] if r.is_stream_consumed else ""
        if r.status_code in (401, 403):
            raise RemoteChatError("bad_key", f"{self.base} refused the API key ({r.status_code}): "
                                  f"{detail or 'no detail'}. Check the key (--api-key or ${ENV_KEY}).")
        if r.status_code == 404:
            raise RemoteChatError("not_found", f"{self.base}: {detail or 'not found'} (404). List the models with "
                                  "--list-models.")
        kind = "bad_request" if r.status_code < 500 else "server"
        raise RemoteChatError(kind, f"{self.base} answered {r.status_code}: {detail or r.reason_phrase}")

    def models(self) -> list[dict]:
        """The server's models as [{"id": ..., ...}] from GET /v1/models."""
        try:
            r = self._http.get(self.base + "/models")
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None
        self._check(r)
        try:
            data = r.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise RemoteChatError("bad_response", f"{self.base}/models did not answer an OpenAI model list; is "
                                  "this an OpenAI-compatible server?") from None
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def stream(self, model: str, messages: list[dict], **params: Any) -> Iterator[str]:
        """Yield the answer's text as it arrives. `params`: temperature, top_p, max_tokens, stop, seed...
        The last RemoteAnswer is left in `self.last` when the stream ends."""
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                **{k: v for k, v in params.items() if v is not None}}
        self.last = RemoteAnswer("", "", model)
        parts: list[str] = []
        try:
            with self._http.stream("POST", self.base + "/chat/completions", json=body) as r:
                self._check(r)
                for line in r.iter_lines():
                    chunk = _event(line)
                    if chunk is None:
                        continue
                    if chunk == "[DONE]":
                        break
                    if "error" in chunk:
                        err = chunk["error"]
                        raise RemoteChatError("server", f"{self.base} stopped the answer: "
                                              f"{err.get('message', err) if isinstance(err, dict) else err}")
                    if chunk.get("usage"):
                        self.last.usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            parts.append(text)
                            yield text
                        if choice.get("finish_reason"):
                            self.last.finish_reason = choice["finish_reason"]
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None
        self.last.text = "".join(parts)

    def complete(self, model: str, messages: list[dict], on_text: Callable[[str], None] | None = None,
                 **params: Any) -> RemoteAnswer:
        for piece in self.stream(model, messages, **params):
            if on_text is not None:
                on_text(piece)
        return self.last


def _event(line: str) -> dict | str | None:
    """One SSE line -> its JSON payload, "[DONE]", or None for comments, blank lines and other fields."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        raise RemoteChatError("bad_response", f"The server sent an event that is not JSON: {data[:80]!r}") from None
    return value if isinstance(value, dict) else None


# -- keys ------------------------------------------------------------------------------------------

def _keyring() -> Any | None:
    try:
        import keyring
        from keyring.errors import KeyringError  # noqa: F401
    except ImportError:
        return None
    return keyring


def save_key(base_url: str, key: str) -> bool:
    """Store the key for this server in the OS keychain. False when no keychain is available."""
    kr = _keyring()
    if kr is None:
        return False
    try:
        kr.set_password(KEYRING_SERVICE, normalise_base(base_url), key)
        return True
    except Exception:  # noqa: BLE001 - keyring backends raise their own types (no D-Bus, locked, ...)
        return False


def load_key(base_url: str) -> str:
    """The key for this server: $STUDIO_API_KEY, else the OS keychain, else ""."""
    env = os.environ.get(ENV_KEY, "")
    if env:
        return env
    kr = _keyring()
    if kr is None:
        return ""
    try:
        return kr.get_password(KEYRING_SERVICE, normalise_base(base_url)) or ""
    except Exception:  # noqa: BLE001 - see save_key
        return ""
