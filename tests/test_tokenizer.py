"""Tokenizers rebuilt from GGUF metadata: SmolLM2's byte-level BPE and a SentencePiece-style vocabulary."""

from __future__ import annotations

import gguf
import pytest

from studio.models.bundled import default_chat_model
from studio.models.gguf_llm import read_gguf
from studio.models.tokenizer import IncrementalDecoder, special_tokens_from_gguf, tokenizer_from_gguf

TEXTS = {
    "hello": "Hello world!",
    "multi": "Héllo wörld, 你好, こんにちは, 🙂👍🏽",
    "code": "def f(x):\n\treturn x  # ok\n\n    y = 3.14\n",
    "chat": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
}
# Ids from transformers 5.23 `AutoTokenizer.from_pretrained(folder, gguf_file=...)` on the same file.
SMOLLM2_IDS = {
    "hello": [19556, 905, 17],
    "multi": [56, 2756, 31394, 267, 29989, 400, 28, 216, 18645, 250, 48392, 138, 28, 46673, 237, 10391, 237,
              41152, 7365, 111, 7365, 124, 28, 47526, 10813, 235, 231, 10813, 233, 138],
    "code": [1604, 275, 24, 104, 727, 198, 197, 5406, 1792, 216, 907, 10907, 1004, 329, 446, 216, 35, 30, 33, 36, 198],
    "chat": [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198],
}


@pytest.fixture(scope="module")
def smollm2():
    meta = read_gguf(default_chat_model()).metadata
    return tokenizer_from_gguf(meta), meta


@pytest.mark.parametrize("name", list(TEXTS))
def test_smollm2_encodes_like_transformers_gguf_tokenizer(smollm2, name):
    tok, _ = smollm2
    assert tok.encode(TEXTS[name]).ids == SMOLLM2_IDS[name]


@pytest.mark.parametrize("name", list(TEXTS))
def test_smollm2_round_trips_text_exactly(smollm2, name):
    tok, _ = smollm2
    ids = tok.encode(TEXTS[name]).ids
    assert tok.decode(ids, skip_special_tokens=False) == TEXTS[name]


def test_smollm2_splits_digits_one_by_one_like_llama_cpp(smollm2):
    tok, _ = smollm2
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]


def test_control_tokens_stay_whole_and_are_skipped_on_decode(smollm2):
    tok, _ = smollm2
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHi"


def test_special_tokens_and_stops_of_smollm2(smollm2):
    _, meta = smollm2
    s = special_tokens_from_gguf(meta)
    assert s == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "stop_token_ids": [2, 0], "add_bos": False}


@pytest.mark.parametrize("name", list(TEXTS))
def test_incremental_decoder_reproduces_full_decode_token_by_token(smollm2, name):
    tok, _ = smollm2
    ids = tok.encode(TEXTS[name]).ids
    dec = IncrementalDecoder(tok, skip_special=True)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoder_holds_back_a_split_emoji_until_complete(smollm2):
    tok, _ = smollm2
    ids = tok.encode("🙂").ids
    assert len(ids) > 1  # byte pieces of one character
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "🙂"


def test_incremental_decoder_flush_returns_an_incomplete_tail(smollm2):
    tok, _ = smollm2
    ids = tok.encode("a🙂").ids
    dec = IncrementalDecoder(tok)
    assert dec.push(ids[0]) == "a"
    dec.push(ids[1])
    assert dec.flush() == "\ufffd"


# --- SentencePiece-style ("llama") vocabularies -------------------------------------------------

def spm_metadata() -> dict:
    pieces = {"▁": -1.0, "h": -2.0, "e": -2.0, "l": -2.0, "o": -2.0, "w": -2.0, "r": -2.0, "d": -2.0,
              "he": -3.0, "ll": -3.5, "▁h": -4.0, "llo": -4.5, "▁he": -5.0, "▁hello": -5.5, "or": -6.0,
              "▁w": -6.5, "▁wor": -7.0, "ld": -7.5, "▁world": -8.0, "!": -9.0}
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0] * 259 + list(pieces.values())
    return {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_vocab_merges_by_score_with_prefix_space():
    tok = tokenizer_from_gguf(spm_metadata())
    assert tok.encode("hello world!").tokens == ["▁hello", "▁world", "!"]
    assert tok.decode(tok.encode("hello world!").ids) == "hello world!"


def test_sentencepiece_unknown_characters_fall_back_to_bytes_and_decode_back():
    tok = tokenizer_from_gguf(spm_metadata())
    enc = tok.encode("hé🙂")
    assert enc.tokens[:2] == ["▁h", "<0xC3>"] and len(enc.ids) == 7
    assert tok.decode(enc.ids) == "hé🙂"
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in enc.ids) + dec.flush() == "hé🙂"


def test_sentencepiece_incremental_decode_keeps_word_spaces():
    tok = tokenizer_from_gguf(spm_metadata())
    ids = tok.encode("hello world hello").ids
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids] == ["hello", " world", " hello"]


def test_sentencepiece_specials_are_whole_and_bos_is_added_by_default():
    meta = spm_metadata()
    tok = tokenizer_from_gguf(meta)
    assert tok.encode("<s>hello</s>").tokens == ["<s>", "▁hello", "</s>"]  # llama.cpp: a space after a special
    assert special_tokens_from_gguf(meta)["add_bos"] is True


def test_sentencepiece_matches_transformers_gguf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    meta = spm_metadata()
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    ours = tokenizer_from_gguf(read_gguf(tmp_path / "spm.gguf").metadata)
    for text in ["hello world!", "hello  world", "held low", "wörld 🙂 hi", "hello\nworld"]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids), text
    # Text that already starts with a space: llama.cpp and SentencePiece add the prefix space anyway
    # ("▁▁hello"); transformers' Metaspace does not. We follow llama.cpp, the format's owner.
    assert ours.encode(" hello").tokens == ["▁", "▁hello"]


def test_unsupported_tokenizer_model_is_a_clear_error():
    with pytest.raises(ValueError, match="not supported"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})


def _byte_level_meta(pre: str) -> dict:
    from studio.models.tokenizer import _bytes_to_unicode

    tokens = [*_bytes_to_unicode().values(), "12", "123", "Ġhello"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * len(tokens), "tokenizer.ggml.merges": ["1 2", "12 3"]}


@pytest.mark.parametrize("pre,digits,word", [
    ("default", ["123", "4", "5"], ["Ġ", "h", "e", "l", "l", "o"]),
    ("smollm", ["1", "2", "3", "4", "5"], ["Ġ", "h", "e", "l", "l", "o"]),
    ("qwen2", ["1", "2", "3", "4", "5"], ["Ġ", "h", "e", "l", "l", "o"]),
    # Llama 3: numbers in groups of three, and a pre-token found whole in the vocabulary is taken whole
    ("llama-bpe", ["123", "4", "5"], ["Ġhello"]),
])
def test_byte_level_split_follows_the_pre_tokenizer_name(pre, digits, word):
    tok = tokenizer_from_gguf(_byte_level_meta(pre))
    assert tok.encode("12345").tokens == digits
    assert tok.encode(" hello").tokens == word
