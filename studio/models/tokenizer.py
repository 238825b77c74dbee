"""Rebuild a `tokenizers.Tokenizer` from GGUF metadata, and decode token streams incrementally.

Two GGUF tokenizer models matter for the families we run:
- "gpt2": byte-level BPE (tokens + merges); the text is split before BPE by a regex that depends
  on `tokenizer.ggml.pre` (the split the merges were learned with; llama.cpp's llama-vocab.cpp).
- "llama": SentencePiece-style BPE: tokens with scores, `▁` for spaces, `<0xNN>` byte fallback.
  Merges are not stored; they follow from the scores (a merge's rank = the score of its result).

The tokenizer adds no BOS/EOS by itself: whether to prepend BOS is `add_bos` on the loaded model,
because chat templates often write the BOS text themselves.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

CONTROL, USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_BY_PRE = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
# llama.cpp splits every digit on its own before the GPT-2 regex for these (as SmolLM's and
# StarCoder's tokenizer.json do with a Digits pre-tokenizer).
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _list(meta: dict, key: str) -> list:
    v = meta.get(key)
    return [] if v is None else list(v)


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """A Tokenizer equal to the one llama.cpp builds from this metadata. Raises ValueError if it can't."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = _list(meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("the file has no tokenizer.ggml.tokens")
    types = [int(t) for t in _list(meta, "tokenizer.ggml.token_type")] or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    arch = meta.get("general.architecture", "")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    try:
        tok = _byte_level(meta, tokens) if kind == "gpt2" else _sentencepiece(meta, tokens, types, arch)
        _add_specials(tok, tokens, types, byte_level=kind == "gpt2")
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exception for bad vocabularies
        raise ValueError(f"its vocabulary is inconsistent ({e})") from None
    return tok


def _byte_level(meta: dict, tokens: list[str]) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in _list(meta, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    # Llama 3 looks a whole pre-token up in the vocabulary before merging (llama.cpp: ignore_merges).
    ignore_merges = pre in ("llama-bpe", "llama3", "llama-v3")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    if pre in _REGEX_BY_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_BY_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGITS_FIRST:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:  # "default", "gpt-2" and unknown names: GPT-2's own split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict, tokens: list[str], types: list[int], arch: str) -> Tokenizer:
    scores = [float(s) for s in _list(meta, "tokenizer.ggml.scores")] or [0.0] * len(tokens)
    gemma = arch.startswith("gemma")
    if gemma:
        # Gemma files spell runs of spaces as real spaces; the BPE sees them as ▁.
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # Merge priority: the score of the merged token (Gemma's scores don't follow merge order; its
    # token order does). Within one result, by the ids of the parts, as SentencePiece does.
    priority = {t: (-i if gemma else scores[i]) for t, i in vocab.items() if types[i] in (1, USER_DEFINED)}
    ranked = []
    for merged, score in priority.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(r[3], r[4]) for r in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
    steps = [normalizers.Prepend("\u2581")] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _add_specials(tok: Tokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """Control tokens become special (never split, skipped by skip_special_tokens); user-defined
    ones become plain added tokens, so `<think>` stays whole as llama.cpp keeps it."""
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types, strict=False)
               if ty == CONTROL and t and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types, strict=False)
            if ty == USER_DEFINED and t]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


# Text of end-of-turn tokens llama.cpp also stops on when the file marks them as control tokens.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<EOT>", "<|end_of_text|>", "</s>")


def special_tokens_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """bos_token, eos_token (texts), stop_token_ids and add_bos, as llama.cpp reads them."""
    tokens = _list(meta, "tokenizer.ggml.tokens")
    types = [int(t) for t in _list(meta, "tokenizer.ggml.token_type")] or [1] * len(tokens)

    def text(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    stops: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        i = meta.get(key)
        if i is not None and 0 <= int(i) < len(tokens) and int(i) not in stops:
            stops.append(int(i))
    for i, (t, ty) in enumerate(zip(tokens, types, strict=False)):
        if ty == CONTROL and t in _EOG_TEXTS and i not in stops:
            stops.append(i)
    # llama.cpp's defaults: SentencePiece vocabularies add BOS unless told otherwise, byte-level ones don't.
    default_bos = meta.get("tokenizer.ggml.model") == "llama"
    return {"bos_token": text("tokenizer.ggml.bos_token_id"), "eos_token": text("tokenizer.ggml.eos_token_id"),
            "stop_token_ids": stops, "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))}


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces, each returned once it is complete.

    Decodes a small window of recent tokens and returns what grew past the already-emitted part,
    so SentencePiece's leading-space stripping and byte-fallback pieces come out exactly as a full
    decode would; text ending in an incomplete UTF-8 sequence (U+FFFD) is held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):] if text.startswith(done) else text

