"""Prompt weighting syntax, 75-token chunking and weighted encoding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from studio.engine.prompts import (
    BREAK,
    apply_weights,
    encode_prompt,
    pad_to_chunks,
    parse_weights,
    split_chunks,
)
from studio.models.clip import ClipConfig, ClipTextModel
from studio.models.clip_tokenizer import ClipTokenizer

W = 1.1


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer.bundled()


@pytest.fixture(scope="module")
def encoder() -> ClipTextModel:
    torch.manual_seed(0)
    cfg = ClipConfig(width=32, layers=2, heads=4, intermediate=64, projection_dim=16, activation="gelu")
    return ClipTextModel(cfg).eval()


# -------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("(cat)", [("cat", W)]),
        ("((cat))", [("cat", W * W)]),
        ("[cat]", [("cat", 1 / W)]),
        ("[[cat]]", [("cat", 1 / W / W)]),
        ("(cat:1.5)", [("cat", 1.5)]),
        ("( cat : 0.5 )", [(" cat ", 0.5)]),
        ("a (b (c:2)) d", [("a ", 1.0), ("b ", W), ("c", 2 * W), (" d", 1.0)]),
        ("(red hair:1.2), [blue eyes]", [("red hair", 1.2), (", ", 1.0), ("blue eyes", 1 / W)]),
        (r"\(literal\) \[x\] back\\slash", [("(literal) [x] back\\slash", 1.0)]),
        (r"(a \(b\))", [("a (b)", W)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", W), BREAK, ("b", W)]),
        ("BREAKFAST, not a break", [("BREAKFAST, not a break", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_weights(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a ((b", [("a ", 1.0), ("b", W * W)]),  # unclosed: weight the rest
        ("a ) ] b", [("a ) ] b", 1.0)]),  # stray closers are text
        ("(a:b)", [("a:b", W)]),  # not a number: a colon in the text
        ("(a:1.2.3) b", [("a:1.2.3) b", W)]),  # malformed number: text, bracket stays open
        ("x:1.5) y", [("x:1.5) y", 1.0)]),  # weight without an opener
        ("\\", [("", 1.0)]),
    ],
)
def test_malformed_brackets_do_not_crash(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab ():[]\\.,1.5BREAK ", max_size=40))
def test_any_text_parses_and_keeps_its_letters(text: str) -> None:
    got = parse_weights(text)
    assert all(isinstance(t, str) and isinstance(w, float) for t, w in got)
    letters = "".join(t for t, w in got if (t, w) != BREAK)
    assert letters.count("a") == text.count("a")  # brackets and weights never eat text


# ------------------------------------------------------------------------------------------ chunking


def test_short_prompt_is_one_77_token_chunk(tok: ClipTokenizer) -> None:
    (chunk,) = split_chunks(tok, "a photo of a cat")
    assert chunk.tokens == tok("a photo of a cat")
    assert chunk.weights == [1.0] * 77


def test_weights_follow_their_tokens(tok: ClipTokenizer) -> None:
    (chunk,) = split_chunks(tok, "a (red cat:1.5) sits")
    ids = tok.encode("red cat")
    i = chunk.tokens.index(ids[0])
    assert chunk.tokens[i:i + 2] == ids and chunk.weights[i:i + 2] == [1.5, 1.5]
    assert chunk.weights[:i] == [1.0] * i and set(chunk.weights[i + 2:]) == {1.0}


def test_long_prompt_splits_into_77_token_chunks(tok: ClipTokenizer) -> None:
    text = " ".join(f"word{i % 10}" for i in range(60))  # no commas: plain 75-token chunks
    n = len(tok.encode(text))
    chunks = split_chunks(tok, text)
    assert len(chunks) == -(-n // 75)
    for c in chunks:
        assert len(c.tokens) == 77 and len(c.weights) == 77
        assert c.tokens[0] == tok.bos_id
    assert chunks[0].tokens[1:76] == tok.encode(text)[:75] and chunks[0].tokens[76] == tok.eos_id


def test_chunk_ends_after_a_late_comma(tok: ClipTokenizer) -> None:
    # 70 single-token words, a comma, then a 10-word phrase: the phrase moves to chunk 2 whole
    head = " ".join(["cat"] * 70)
    tail = " ".join(["dog"] * 10)
    chunks = split_chunks(tok, f"{head}, {tail}")
    assert len(chunks) == 2
    comma, cat, dog = tok.encode(",")[0], tok.encode("cat")[0], tok.encode("dog")[0]
    assert chunks[0].tokens[1:72] == [cat] * 70 + [comma]
    assert chunks[0].tokens[72] == tok.eos_id  # padded after the comma
    assert chunks[1].tokens[1:11] == [dog] * 10


def test_break_starts_a_new_chunk(tok: ClipTokenizer) -> None:
    chunks = split_chunks(tok, "a cat BREAK a dog")
    assert len(chunks) == 2
    assert chunks[0].tokens == tok("a cat") and chunks[1].tokens == tok("a dog")


def test_padding_uses_the_tokenizer_pad_id() -> None:
    tok0 = ClipTokenizer.bundled(pad_id=0)  # OpenCLIP
    (chunk,) = split_chunks(tok0, "a cat")
    assert chunk.tokens[3] == tok0.eos_id and chunk.tokens[4:] == [0] * 73


# ------------------------------------------------------------------------------------------ encoding


def test_plain_prompt_encodes_like_the_encoder(tok: ClipTokenizer, encoder: ClipTextModel) -> None:
    cond, pooled = encode_prompt(tok, encoder, "a photo of a cat")
    with torch.no_grad():
        want, want_pooled = encoder(torch.tensor([tok("a photo of a cat")]))
    assert cond.shape == (1, 77, 32) and pooled.shape == (1, 16)
    assert torch.equal(cond, want) and torch.equal(pooled, want_pooled)


def test_weight_one_equals_plain_and_other_weights_change_it(tok: ClipTokenizer, encoder: ClipTextModel) -> None:
    plain, _ = encode_prompt(tok, encoder, "a red cat")
    one, _ = encode_prompt(tok, encoder, "a (red:1.0) cat")
    heavy, _ = encode_prompt(tok, encoder, "a (red:1.5) cat")
    assert torch.allclose(plain, one)
    assert (heavy - plain).abs().max() > 1e-3
    # A1111 "Original": the chunk mean is restored after scaling
    assert heavy.mean().item() == pytest.approx(plain.mean().item(), abs=1e-5)
    # the weighted token moved the most
    red = split_chunks(tok, "a (red:1.5) cat")[0].weights.index(1.5)
    diff = (heavy - plain).abs().amax(dim=-1)[0]
    assert int(diff.argmax()) == red


def test_apply_weights_is_identity_at_one() -> None:
    h = torch.randn(2, 77, 8)
    assert torch.allclose(apply_weights(h, torch.ones(2, 77)), h)


def test_long_prompt_concatenates_chunks(tok: ClipTokenizer, encoder: ClipTextModel) -> None:
    text = "a cat BREAK a dog BREAK a bird"
    cond, pooled = encode_prompt(tok, encoder, text, clip_skip=2, final_norm=False)
    assert cond.shape == (1, 3 * 77, 32)
    with torch.no_grad():
        first, first_pooled = encoder(torch.tensor([tok("a cat")]), clip_skip=2, final_norm=False)
        third, _ = encoder(torch.tensor([tok("a bird")]), clip_skip=2, final_norm=False)
    assert torch.allclose(cond[:, :77], first, atol=1e-6)
    assert torch.allclose(cond[:, 154:], third, atol=1e-6)
    assert torch.allclose(pooled, first_pooled, atol=1e-6)  # pooled from the first chunk


def test_pad_to_chunks_repeats_the_empty_prompt(tok: ClipTokenizer, encoder: ClipTextModel) -> None:
    empty, _ = encode_prompt(tok, encoder, "")
    neg, _ = encode_prompt(tok, encoder, "blurry")
    padded = pad_to_chunks(neg, 3, empty)
    assert padded.shape == (1, 231, 32)
    assert torch.equal(padded[:, 77:154], empty) and torch.equal(padded[:, 154:], empty)
    assert pad_to_chunks(padded, 2, empty) is padded
