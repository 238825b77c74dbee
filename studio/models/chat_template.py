"""Render a model's Jinja chat template the way transformers' `apply_chat_template` does.

Chat templates come from downloaded files, so they are untrusted code: they run in Jinja's
immutable sandbox with only the helpers templates expect (raise_exception, tojson, strftime_now,
loop controls, namespace).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from studio.errors import UserError

# Used when a model ships no template. ChatML is what most small instruct models are tuned on;
# the UI says "no chat template in the model, using ChatML" when this is picked.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which changes prompts; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore attributes so templates can't reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (same signature trick as jinja's Namespace)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], *, bos_token: str | None = None,
                eos_token: str | None = None, add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]). None -> the ChatML fallback."""
    try:
        compiled = _compile(template or CHATML_TEMPLATE)
        return compiled.render(messages=messages, bos_token=bos_token or "", eos_token=eos_token or "",
                               add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.TemplateError as e:
        raise UserError("bad_model", f"The model's chat template failed: {e}. Pick another chat template "
                        "for this model in its settings, or use a different download of it.") from None
