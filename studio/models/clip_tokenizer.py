"""The CLIP BPE tokenizer, built on the `tokenizers` library.

Text is NFC-normalised, whitespace-collapsed and lowercased, split with the CLIP word pattern,
mapped to byte-level symbols and merged by BPE with `</w>` marking word ends. This is what
Hugging Face's CLIPTokenizer does (and so what A1111 and ComfyUI feed their encoders); the tests
hold our ids equal to it.

The vocabulary comes from the model folder (diffusers `tokenizer/vocab.json` + `merges.txt`) when
present, else from the copy shipped in assets/clip (the OpenAI CLIP BPE file, MIT).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from studio.resources import asset_path

BUNDLED_BPE = ("clip", "bpe_simple_vocab_16e6.txt.gz")  # under the shipped assets (studio.resources)
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT_LENGTH = 77  # BOS + 75 tokens + EOS
_N_MERGES = 49152 - 256 - 2  # the CLIP vocabulary: 256 bytes x 2 (plain, word-final) + merges + 2 specials
_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in byte order 0..255.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved
    to code points 256 and up, so that no symbol is whitespace or a control character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, moved = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + moved)
            moved += 1
    return [symbols[b] for b in range(256)]


def _vocab_order() -> list[int]:
    """Byte order in which the CLIP vocabulary lists single symbols (kept bytes first, then moved ones)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return keep + [b for b in range(256) if b not in keep]


def bundled_vocab(path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) rebuilt from the gzipped CLIP BPE merges file, ids as in openai/clip vocab.json."""
    path = asset_path(*BUNDLED_BPE) if path is None else path
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]  # line 0 is a version header
    symbols = byte_symbols()
    single = [symbols[b] for b in _vocab_order()]
    tokens = single + [s + "</w>" for s in single] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return [tuple(line.split()) for line in lines if line and not line.startswith("#version")]  # type: ignore[misc]


class ClipTokenizer:
    """Text -> CLIP token ids. `pad_id` is the id that fills a 77-token row after EOS.

    CLIP-L (SD1, SDXL encoder 1) pads with EOS (49407); OpenCLIP-H/G (SD2, SDXL encoder 2) pad
    with 0 ("!"). Folders say which in their special-tokens file; `pad_id` overrides.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_id: int | None = None) -> None:
        bpe = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                  fuse_unk=False, unk_token=EOS)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.add_special_tokens([BOS, EOS])  # literal "<|endoftext|>" in a prompt is the token, as in HF
        self._tok = tok
        self.vocab = vocab
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.pad_id = self.eos_id if pad_id is None else pad_id

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def bundled(cls, pad_id: int | None = None) -> ClipTokenizer:
        vocab, merges = bundled_vocab()
        return cls(vocab, merges, pad_id)

    @classmethod
    def from_files(cls, vocab_json: Path, merges_txt: Path, pad_id: int | None = None) -> ClipTokenizer:
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        return cls(vocab, _read_merges(Path(merges_txt)), pad_id)

    @classmethod
    def from_folder(cls, folder: Path, pad_id: int | None = None) -> ClipTokenizer:
        """A diffusers `tokenizer/` folder; the pad token comes from its special-tokens files."""
        folder = Path(folder)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        if pad_id is None:
            pad = _pad_token(folder)
            pad_id = vocab.get(pad) if pad is not None else None
        return cls(vocab, _read_merges(folder / "merges.txt"), pad_id)

    @classmethod
    def load(cls, folder: Path | None = None, pad_id: int | None = None) -> ClipTokenizer:
        """From `folder` when it holds vocab.json and merges.txt, else the bundled vocabulary."""
        if folder is not None and (Path(folder) / "vocab.json").is_file() and (Path(folder) / "merges.txt").is_file():
            return cls.from_folder(Path(folder), pad_id)
        return cls.bundled(pad_id)

    # ------------------------------------------------------------------------------------ encode
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS and without truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, text: str, length: int = CONTEXT_LENGTH) -> list[int]:
        """One padded row: BOS, the first `length - 2` tokens, EOS, then `pad_id` up to `length`."""
        return self.row(self.encode(text), length)

    def row(self, ids: list[int], length: int = CONTEXT_LENGTH) -> list[int]:
        ids = [self.bos_id, *ids[: length - 2], self.eos_id]
        return ids + [self.pad_id] * (length - len(ids))

    def decode(self, ids: list[int]) -> str:
        """Ids back to text (lowercased, whitespace-normalised: the tokenizer does not keep case)."""
        byte_of = {s: b for b, s in enumerate(byte_symbols())}
        token_of = {i: t for t, i in self.vocab.items()}
        out = bytearray()
        for i in ids:
            token = token_of.get(i)
            if token is None or i in (self.bos_id, self.eos_id, self.pad_id):
                continue
            end = token.endswith("</w>")
            out += bytes(byte_of[c] for c in token.removesuffix("</w>"))
            if end:
                out += b" "
        return out.decode("utf-8", errors="replace").strip()


def _pad_token(folder: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return pad
    return None
