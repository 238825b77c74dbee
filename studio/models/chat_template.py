"""Render a model's Jinja chat template the way transformers' `apply_chat_template` does.

Chat templates come from downloaded files, so they are untrusted code: they run in Jinja's
immutable sandbox with only the helpers templates expect (raise_exception, tojson, strftime_now,
loop controls, namespace). The sandbox stops attribute tricks but not a template that loops
10^10 times or builds a 10 GB string, so rendering also runs under a budget: a deadline, a cap on
the size of every string or list the template builds and of the output, and the job's cancel check
at every loop step and output piece. Over budget is a clear bad-model error.
"""

from __future__ import annotations

import contextvars
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
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


TIME_LIMIT = 5.0            # seconds; real templates render in milliseconds
BASE_MAX_CHARS = 1_000_000  # any string, list or output; plus 4x the conversation's own size


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """The template went over its time or size budget."""


@dataclass
class _Budget:
    deadline: float
    max_chars: int
    cancel_check: Callable[[], None] | None

    def check(self) -> None:
        if self.cancel_check is not None:
            self.cancel_check()
        if time.monotonic() > self.deadline:
            raise TemplateLimitError("it ran longer than its time limit (a loop that does not end?)")

    def size(self, n: int, what: str = "a string") -> None:
        if n > self.max_chars:
            raise TemplateLimitError(f"it builds {what} of {n:,} items, over the limit of {self.max_chars:,}")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    # Rendering outside render_chat (tests, tools) still gets the default limits.
    return _BUDGET.get() or _Budget(time.monotonic() + TIME_LIMIT, BASE_MAX_CHARS, None)


def _size_of(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


def _checked_iter(value: Iterable[Any]) -> Iterator[Any]:
    budget = _budget()
    for item in value:
        budget.check()
        yield item


_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width or precision of a million or more


def _check_args(args: tuple, kwargs: dict) -> None:
    budget = _budget()
    for a in (*args, *kwargs.values()):
        if isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) > budget.max_chars:
            budget.size(int(abs(a)), "a width or count")


def _bounded_filter(f: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose numeric arguments (widths, counts) and result stay within the budget."""
    def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        out = f(value, *args, **kwargs)
        n = _size_of(out)
        if n is not None:
            _budget().size(n)
        return out
    for attr in ("jinja_pass_arg",):  # keep pass_context / pass_environment markers
        if hasattr(f, attr):
            setattr(bounded, attr, getattr(f, attr))
    return bounded


def _join_size(parts: list, sep: str) -> int:
    return sum(len(str(p)) for p in parts) + len(sep) * max(0, len(parts) - 1)


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


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` goes through the environment so its size is checked before the string is built."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["+", "*", "%", "**"])

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        # Every loop steps through a checker: the deadline and cancel hold even in a loop with no output.
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "studio_checked_iter", [], [], None, None, lineno=loop.lineno)
        return tree

    @staticmethod
    def bounded_concat(parts: tuple) -> str:
        strs = [str(p) for p in parts]
        _budget().size(sum(len(x) for x in strs))
        return "".join(strs)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size_of(seq) is not None and isinstance(n, int):
                    budget.size(_size_of(seq) * max(n, 0))
        elif operator == "+" and _size_of(left) is not None and _size_of(right) is not None:
            budget.size(_size_of(left) + _size_of(right))
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            budget.size(budget.max_chars + 1, "a formatted field")
        elif operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
            if abs(right) > 1000 and abs(left) > 1:
                budget.size(int(abs(right)), "a power")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any,  # noqa: N805
             **kwargs: Any) -> Any:
        # str methods that make long strings from small arguments
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
        if isinstance(owner, str):
            budget = _budget()
            if name in ("format", "format_map") and _WIDE_FORMAT.search(owner):
                budget.size(budget.max_chars + 1, "a formatted field")
            if name in ("center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map"):
                _check_args(args, kwargs)
            if name == "expandtabs" and args and isinstance(args[0], int):
                budget.size(owner.count("\t") * args[0] + len(owner))
            if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                budget.size(len(owner) + (owner.count(args[0]) if args[0] else len(owner) + 1) * len(args[1]))
            if name == "join" and args:
                parts = list(_checked_iter(args[0]))
                budget.size(_join_size(parts, owner))
                args = (parts, *args[1:])
        return super().call(__context, __obj, *args, **kwargs)


def _join(value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    parts = list(_checked_iter(value))
    if attribute is not None:
        raise TemplateLimitError("join(attribute=...) is not supported in chat templates")
    _budget().size(_join_size(parts, str(d)))
    return str(d).join(str(p) for p in parts)


def _indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    pad = width if isinstance(width, str) else " " * min(max(int(width), 0), _budget().max_chars + 1)
    _budget().size(len(s) + len(pad) * (s.count("\n") + 1))
    return jinja2.filters.do_indent(s, width, first, blank)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    for name in list(env.filters):
        env.filters[name] = _bounded_filter(env.filters[name])
    env.filters["join"] = _join
    env.filters["indent"] = _indent
    env.filters["tojson"] = _bounded_filter(_tojson)
    env.filters["studio_checked_iter"] = _checked_iter
    env.globals.pop("lipsum", None)  # placeholder text no chat template needs, with a size argument
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], *, bos_token: str | None = None,
                eos_token: str | None = None, add_generation_prompt: bool = True,
                cancel_check: Callable[[], None] | None = None, time_limit: float = TIME_LIMIT,
                **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]). None -> the ChatML fallback.

    `cancel_check` is called at every loop step and output piece; whatever it raises (the engine's
    Cancelled) ends rendering and propagates."""
    conversation = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    budget = _Budget(time.monotonic() + time_limit, BASE_MAX_CHARS + 4 * conversation, cancel_check)
    token = _BUDGET.set(budget)
    try:
        compiled = _compile(template or CHATML_TEMPLATE)
        out: list[str] = []
        total = 0
        for piece in compiled.generate(messages=messages, bos_token=bos_token or "", eos_token=eos_token or "",
                                       add_generation_prompt=add_generation_prompt, **extra):
            total += len(piece)
            budget.size(total, "a prompt")
            budget.check()
            out.append(piece)
        return "".join(out)
    except TemplateLimitError as e:
        raise UserError("bad_model", f"The model's chat template was stopped: {e}. The template is broken or "
                        "hostile; pick another chat template for this model in its settings, or use a "
                        "different download of it.") from None
    except (jinja2.exceptions.TemplateError, RecursionError, MemoryError, OverflowError) as e:
        raise UserError("bad_model", f"The model's chat template failed: {type(e).__name__ if not str(e) else e}. "
                        "Pick another chat template for this model in its settings, or use a different "
                        "download of it.") from None
    finally:
        _BUDGET.reset(token)
