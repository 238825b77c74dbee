"""Prompt weighting and long prompts, as A1111 users write them.

Syntax (A1111 / ComfyUI):
  (word)        weight x1.1 per pair of round brackets, nests: ((word)) = x1.21
  (word:1.5)    explicit weight for the bracketed text
  [word]        weight /1.1 per pair of square brackets
  \\( \\) \\[ \\]  literal brackets
  BREAK         ends the current 75-token chunk here (upper case, a whole word)
Brackets left open weight the rest of the prompt; stray closing brackets are plain text.

Long prompts: tokens go into chunks of 75 (+ BOS and EOS = 77). Like A1111, when a chunk fills
up and a comma lies within its last 20 tokens, the chunk ends after that comma and the rest of the
phrase moves on to the next one. Each chunk is encoded on its own and the results are
concatenated along the token axis: cond is (1, 77*k, D). Pooled output (SDXL) is the first chunk's.

Weights use A1111's default ("Original") convention: multiply each token's hidden state by its
weight, then rescale the whole chunk so its mean equals the unweighted mean. ComfyUI's default
(interpolating towards the empty prompt) gives different numbers for weights != 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

CHUNK = 75  # tokens per chunk between BOS and EOS
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack`
BREAK = ("BREAK", -1.0)  # marker segment, as A1111 represents it
_UP, _DOWN = 1.1, 1 / 1.1

_TOKENS = re.compile(
    r"""
    \\[()\[\]\\]          # escaped bracket or backslash
    | \\                  # a lone backslash
    | \( | \[             # openers
    | :\s*([+-]?[.\d]+)\s*\)  # ':1.2)' closes a round bracket with an explicit weight
    | \) | \]             # closers
    | [^\\()\[\]:]+       # plain text
    | :                   # a colon that is not a weight
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Text -> [(fragment, weight)], with BREAK as ("BREAK", -1.0); never raises on odd brackets.

    "a (b:1.5) [c]" -> [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for seg in res[start:]:
            if tuple(seg) != BREAK:  # A1111 scales the marker too, and then encodes the word "BREAK"
                seg[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open and _is_number(weight):
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), _UP)
        elif tok == "]" and square_open:
            scale(square_open.pop(), _DOWN)
        else:  # text, or a bracket/weight with nothing to close: keep it as text
            for i, part in enumerate(_BREAK.split(tok)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for start in round_open:  # unclosed brackets weight the rest, as in A1111
        scale(start, _UP)
    for start in square_open:
        scale(start, _DOWN)

    merged: list[list] = []
    for seg in res:
        if seg[0] == "" and tuple(seg) != BREAK:
            continue
        if merged and merged[-1][1] == seg[1] and tuple(seg) != BREAK and tuple(merged[-1]) != BREAK:
            merged[-1][0] += seg[0]
        else:
            merged.append(seg)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)  # 77 ids once closed
    weights: list[float] = field(default_factory=list)  # one per token


def split_chunks(tokenizer, text: str) -> list[Chunk]:
    """Weighted prompt -> 77-token chunks (BOS, 75 tokens, EOS, padding with tokenizer.pad_id).

    `tokenizer` is a studio.models.clip_tokenizer.ClipTokenizer (encode, bos_id, eos_id, pad_id).
    """
    parsed = parse_weights(text)
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        pad = CHUNK - len(chunk.tokens)
        chunk.tokens = [tokenizer.bos_id, *chunk.tokens, tokenizer.eos_id] + [tokenizer.pad_id] * pad
        chunk.weights = [1.0, *chunk.weights, 1.0] + [1.0] * pad
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    pieces = tokenizer.encode_batch([t for t, _ in parsed])
    for ids, (text_part, weight) in zip(pieces, parsed, strict=True):
        if (text_part, weight) == BREAK:
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                # full chunk: end it after the last comma, carry the unfinished phrase over
                cut = last_comma + 1
                carry_t, carry_w = chunk.tokens[cut:], chunk.weights[cut:]
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk.tokens, chunk.weights = carry_t, carry_w
            if len(chunk.tokens) == CHUNK:
                close()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close()
    return chunks


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis: scale tokens, then restore each chunk's mean. (K, T, D), (K, T)."""
    mean = hidden.mean(dim=(1, 2), keepdim=True)
    out = hidden * weights[..., None].to(hidden.dtype)
    return out * (mean / out.mean(dim=(1, 2), keepdim=True))


@torch.no_grad()
def encode_prompt(
    tokenizer,
    encoder: torch.nn.Module,
    text: str,
    clip_skip: int = 1,
    final_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text -> (cond (1, 77*k, D), pooled (1, P) of the first chunk or None).

    `encoder` is a studio.models.clip.ClipTextModel; clip_skip is A1111's (1 = last layer,
    2 = penultimate); SDXL passes clip_skip=2, final_norm=False for both encoders. All chunks
    go through the encoder as one batch. For SDXL, CLIP-L and CLIP-G share the vocabulary, so the
    same text gives the same chunk count and the two conds concatenate along D.
    """
    chunks = split_chunks(tokenizer, text)
    param = next(encoder.parameters())
    tokens = torch.tensor([c.tokens for c in chunks], device=param.device)  # (K, 77)
    weights = torch.tensor([c.weights for c in chunks], device=param.device)  # (K, 77)
    hidden, pooled = encoder(tokens, clip_skip=clip_skip, final_norm=final_norm)  # (K, 77, D)
    if not bool((weights == 1.0).all()):
        hidden = apply_weights(hidden, weights)
    cond = hidden.reshape(1, -1, hidden.shape[-1])  # chunks side by side: (1, 77*K, D)
    return cond, None if pooled is None else pooled[:1]


def pad_to_chunks(cond: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """Extend cond (B, 77*k, D) to `chunks` chunks with the empty prompt's (1, 77, D), as A1111
    does when prompt and negative prompt have different lengths (CFG needs equal shapes)."""
    have = cond.shape[1] // empty.shape[1]
    if have >= chunks:
        return cond
    fill = empty.expand(cond.shape[0], -1, -1).repeat(1, chunks - have, 1)
    return torch.cat([cond, fill], dim=1)
