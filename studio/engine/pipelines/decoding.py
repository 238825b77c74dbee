"""Decoding, for any LLM of studio.models.llm: prefill, then one token at a time through a step.

decode_step is the model's own one-token step; compile_decode_step puts it under torch.compile with
static shapes, attending to a power-of-two "bucket" of the cache (one graph per bucket);
generate_tokens runs either (or the fused CUDA step of studio/models/llm_decode.py, which has the
same signature) with an optional one-token lookahead. StopFilter cuts the text at stop strings.
Split from chat.py, which loads models and answers chat jobs with these.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from studio.models.llm import LLM

log = logging.getLogger(__name__)

MIN_BUCKET = 256  # smallest attended length of the compiled decode step


def kv_bucket(filled: int, cache_len: int, smallest: int = MIN_BUCKET) -> int:
    """Attended length for a step that sees `filled` cache positions: the next power of two
    >= filled (at least `smallest`), capped at the cache length."""
    if not 0 < filled <= cache_len:
        raise ValueError(f"{filled} filled positions do not fit a cache of {cache_len}")
    return min(max(smallest, 1 << (filled - 1).bit_length()), cache_len)


def kv_buckets(cache_len: int, smallest: int = MIN_BUCKET) -> list[int]:
    """Every length kv_bucket can return for this cache (`smallest` a power of two): one graph each."""
    out, b = [], smallest
    while b < cache_len:
        out.append(b)
        b *= 2
    return [*out, cache_len]


def decode_step(model: LLM, token: torch.Tensor, pos: torch.Tensor, bucket: int) -> torch.Tensor:
    """One token (1, 1) at position pos (1,) attending to cache positions [0, bucket) -> logits (1, 1, V).

    Positions past `pos` inside the bucket are masked (causal mask; sliding-window layers keep
    their window mask), so any bucket >= pos + 1 gives the same logits. Eager decoding passes
    bucket = pos + 1; the compiled step passes kv_bucket(pos + 1, ...), a Python int that
    dynamo specialises on, so each bucket is one static-shape graph.
    """
    return model(token, pos, kv_len=bucket, last_only=True)


def compile_decode_step(cache_len: int, **compile_kw: Any) -> Callable:
    """decode_step under torch.compile with static shapes: one graph per bucket, no recompiles
    between steps of the same bucket. `compile_kw` goes to torch.compile (mode, backend)."""
    # Every bucket is a recompile of the same code object; dynamo's default limit (8) would
    # stop at a 64k context, and each model loaded into this process adds its own set.
    limit = max(64, 4 * len(kv_buckets(cache_len)))
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    # dynamic=False: the bucket int and all shapes stay static (no automatic dynamic shapes
    # after the second bucket, which would trade the per-bucket graphs for symbolic ones).
    return torch.compile(decode_step, fullgraph=True, dynamic=False, **compile_kw)


@torch.inference_mode()
def generate_tokens(model: LLM, prompt: list[int], max_new_tokens: int,
                    choose: Callable[[torch.Tensor], int | torch.Tensor], stop_ids: set | frozenset = frozenset(),
                    step: Callable | None = None, on_fallback: Callable[[Exception], None] | None = None,
                    lookahead: bool = False) -> Iterator[int]:
    """Prefill `prompt`, then yield up to `max_new_tokens` tokens (a stop token is yielded, then ends).

    The cache must hold len(prompt) + max_new_tokens positions. `choose(logits (V,))` returns the next
    id, as an int or as a 0-dim tensor on the device (Sampler.pick). `step(model, token, pos, bucket)`
    (decode_step's signature, e.g. compile_decode_step()) replaces the eager decode step and attends
    to kv_bucket(pos + 1) positions; if it fails to compile, decoding goes on eagerly (exact length)
    and `on_fallback` hears why.

    Lookahead (when asked for and `choose` returns tensors): the step that feeds token i, and the
    choice of token i + 1, are queued on the GPU before the host reads token i (copied out ahead of
    them), so the GPU does not wait for the host's detokenizing and streaming. An 8B model's fused
    step on an H200 decodes 4% faster with it (benchmarks/bench_fused_decode.py). When token i is a
    stop token that queued step is wasted; it only writes a cache slot past the answer. The ids,
    random draws and penalties are the same with and without it.
    A consumer that stops asking stops the model within one token.
    """
    device = getattr(model, "device", None) or model.key_index.device  # recurrent models say it
    T = len(prompt)
    if T + max_new_tokens > model.max_seq_len:
        raise ValueError(f"cache holds {model.max_seq_len} positions, need {T + max_new_tokens}")
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    logits = model(tokens, torch.arange(T, device=device), kv_len=T, last_only=True)  # (1, 1, V)
    tok_buf = torch.zeros((1, 1), dtype=torch.long, device=device)  # reused: no per-token allocation
    pos_buf = torch.zeros((1,), dtype=torch.long, device=device)
    compiled = [step]

    def advance(tok: int | torch.Tensor, pos: int) -> torch.Tensor:
        """Feed `tok` at `pos` -> logits (V,) of the position after it."""
        if isinstance(tok, torch.Tensor):
            tok_buf.copy_(tok.view(1, 1))
        else:
            tok_buf.fill_(tok)
        pos_buf.fill_(pos)
        if compiled[0] is not None:
            try:
                return compiled[0](model, tok_buf, pos_buf, kv_bucket(pos + 1, model.max_seq_len))[0, -1]
            except Exception as exc:  # noqa: BLE001 - only compiler failures are swallowed, below
                if not _is_compile_error(exc):
                    raise
                # The compiler could not handle this model (e.g. a packed-weight module):
                # redo this step eagerly; it rewrites the same cache slot.
                log.warning("compiled decode step failed (%s); decoding eagerly", exc)
                compiled[0] = None
                if on_fallback is not None:
                    on_fallback(exc)
        return decode_step(model, tok_buf, pos_buf, pos + 1)[0, -1]

    nxt = choose(logits[0, -1])
    ahead = lookahead and isinstance(nxt, torch.Tensor)
    cuda = ahead and device.type == "cuda"
    host = torch.empty(1, dtype=torch.long, pin_memory=True) if cuda else None
    for i in range(max_new_tokens):
        last = i == max_new_tokens - 1
        following = None
        if ahead:
            if cuda:  # the id leaves before the next step is queued, so reading it waits for nothing else
                host.copy_(nxt.view(1), non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            if not last:
                following = choose(advance(nxt, T + i))
            if cuda:
                ready.synchronize()
                tok = int(host[0])
            else:
                tok = int(nxt)
        else:
            tok = int(nxt)
        yield tok
        if tok in stop_ids or last:
            return
        nxt = following if ahead else choose(advance(tok, T + i))


class StopFilter:
    """Holds back text that may be the start of a stop string; cuts the text at the first stop."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New decoded text -> (text safe to show, stopped?)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:  # longest tail of pending that begins some stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _is_compile_error(exc: Exception) -> bool:
    """An error of building a fast step (torch.compile, or the fused step's FusedStepError)."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor", "studio.models.llm_decode"))


@dataclass
class Streamed:
    """What streaming one answer gave: its text, counts and timings."""

    text: str
    finish: str  # "stop", "length" or "repetition"
    completion: int  # tokens that became text (the stop token excluded)
    sampled: int  # tokens sampled, the stop token included
    ttft: float  # seconds from `t_start` to the first sampled token
    decode_time: float  # seconds over the `sampled - 1` decode steps, prefill excluded

    @property
    def tokens_per_s(self) -> float:
        return round((self.sampled - 1) / self.decode_time, 2) if self.decode_time > 0 else 0.0


def stream_text(tokens: Iterator[int], stop_ids: set[int] | frozenset[int], decoder: Any, stops: StopFilter,
                emit: Callable[[str], None], cancel: Any, t_start: float, guard: Any = None,
                on_sample: Callable[[], None] | None = None) -> Streamed:
    """Turn sampled tokens into streamed text: stop tokens and stop strings end it, `guard` (a
    RepetitionGuard) ends a loop of the same phrase, and a cancel lets the text so far reach the user
    before the job ends. `tokens` is closed whatever happens."""
    pieces: list[str] = []

    def out(text: str) -> None:
        if text:
            pieces.append(text)
            emit(text)

    finish, completion, sampled, ttft, t_first, t_last = "length", 0, 0, 0.0, 0.0, 0.0
    cut = False  # stopped by a stop string: the decoder's tail is past it and never shown
    try:
        for tok in tokens:
            t_last = time.perf_counter()
            sampled += 1
            if on_sample is not None:
                on_sample()
            if sampled == 1:
                t_first, ttft = t_last, t_last - t_start
            if tok in stop_ids:
                finish = "stop"
                break
            completion += 1
            text, cut = stops.feed(decoder.push(tok))
            out(text)
            if cut:
                finish = "stop"
                break
            if guard is not None and guard.push(tok):  # a loop of the same phrase would run to max_tokens
                finish = "repetition"
                break
            if cancel.cancelled:
                out(stops.flush())
                cancel.check()
        if not cut:
            text, cut = stops.feed(decoder.flush())
            out(text)
            finish = "stop" if cut else finish
            out("" if cut else stops.flush())
    finally:
        tokens.close()
    return Streamed("".join(pieces), finish, completion, sampled, ttft, t_last - t_first)
