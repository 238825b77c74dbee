"""CLIP text encoders and tokenizer: parity with transformers in the HF, LDM and OpenCLIP layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.models.clip import (
    CONFIGS,
    ClipConfig,
    ClipTextModel,
    build_clip,
    find_text_encoders,
    to_openclip,
    to_ours,
)
from studio.models.clip_tokenizer import ClipTokenizer, bundled_vocab

transformers = pytest.importorskip("transformers")
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

EOS = 99  # tiny vocabulary: the last id is the end token


def tiny(act: str, projection: bool) -> CLIPTextModel:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                         projection_dim=24, eos_token_id=EOS, bos_token_id=98, pad_token_id=EOS)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms start at 1/0: randomise so the norms are tested
            p.add_(torch.randn_like(p) * 0.05)
    return model


OVERRIDES = dict(heads=4, eos_token_id=EOS)


def tokens(pad: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (5, 30):
        body = torch.randint(1, 98, (n,), generator=g).tolist()
        row = [98, *body, EOS]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows)


def legacy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves CLIPTextModel without `text_model.`; released checkpoints have it."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}


def reference(model: CLIPTextModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    norm = getattr(model, "text_model", model).final_layer_norm
    return {"last": out.last_hidden_state, "penultimate_raw": out.hidden_states[-2],
            "penultimate_norm": norm(out.hidden_states[-2]), "pooled": pooled}


def check(ours: ClipTextModel, ref: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
    with torch.no_grad():
        last, pooled = ours(ids)
        pen_raw, pooled2 = ours(ids, clip_skip=2, final_norm=False)  # SDXL's choice
        pen_norm, _ = ours(ids, clip_skip=2, final_norm=True)  # A1111 clip skip 2 on SD1
    for got, want in [(last, ref["last"]), (pooled, ref["pooled"]), (pooled2, ref["pooled"]),
                      (pen_raw, ref["penultimate_raw"]), (pen_norm, ref["penultimate_norm"])]:
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------ encoders


@pytest.mark.parametrize("act,projection", [("quick_gelu", False), ("gelu", True)])
def test_clip_matches_transformers_from_hf_layout(act: str, projection: bool) -> None:
    ref_model = tiny(act, projection)
    ids = tokens(pad=EOS)
    ref = reference(ref_model, ids)
    for sd in (ref_model.state_dict(), legacy(ref_model.state_dict())):
        ours = build_clip(sd, **OVERRIDES, activation=act)
        assert (ours.text_projection is not None) == projection
        check(ours, ref, ids)


def test_clip_l_matches_from_ldm_single_file_prefixes() -> None:
    ref_model = tiny("quick_gelu", False)
    sd = legacy(ref_model.state_dict())
    ids = tokens(pad=EOS)
    ref = reference(ref_model, ids)
    for prefix in ["cond_stage_model.transformer.", "conditioner.embedders.0.transformer."]:
        ckpt = {prefix + k: v for k, v in sd.items()}
        ckpt[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old checkpoints
        ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # other parts are ignored
        check(build_clip(ckpt, **OVERRIDES, activation="quick_gelu"), ref, ids)


def test_openclip_layout_with_fused_in_proj_matches() -> None:
    ref_model = tiny("gelu", True)
    sd = legacy(ref_model.state_dict())
    ids = tokens(pad=0)  # OpenCLIP pads with 0
    ref = reference(ref_model, ids)
    oc = to_openclip(sd, prefix="conditioner.embedders.1.model.")
    # the real OpenCLIP names, written by hand so the layout is not only checked against itself
    p = "conditioner.embedders.1.model."
    for name in ["token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
                 "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.in_proj_bias",
                 "transformer.resblocks.2.attn.out_proj.weight", "transformer.resblocks.1.ln_1.bias",
                 "transformer.resblocks.1.ln_2.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                 "transformer.resblocks.0.mlp.c_proj.bias"]:
        assert p + name in oc, name
    assert oc[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    q = sd["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(oc[p + "transformer.resblocks.0.attn.in_proj_weight"][:32], q)
    assert torch.equal(oc[p + "text_projection"], sd["text_projection.weight"].t())  # used as x @ P
    oc[p + "logit_scale"] = torch.tensor(4.6)
    # SDXL holds both encoders: pick each by prefix
    both = dict(oc)
    both.update({"conditioner.embedders.0.transformer." + k: v for k, v in tiny("quick_gelu", False).state_dict().items()})
    assert sorted(find_text_encoders(both)) == ["conditioner.embedders.0.transformer.", p]
    ours = build_clip(both, prefix=p, **OVERRIDES)
    assert ours.config.activation == "gelu" and ours.config.projection_dim == 24
    check(ours, ref, ids)


def test_named_configs_match_released_shapes() -> None:
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in ClipTextModel(c).parameters()) for n, c in CONFIGS.items()}
    assert counts["clip_l"] == 123_060_480  # the published CLIP-L text tower
    # OpenCLIP towers as transformers builds them (diffusers SD2 text_encoder, SDXL text_encoder_2)
    for name, cls, kw in [
        ("openclip_h", CLIPTextModel, dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                           intermediate_size=4096)),
        ("openclip_g", CLIPTextModelWithProjection, dict(hidden_size=1280, num_hidden_layers=32,
                                                         num_attention_heads=20, intermediate_size=5120,
                                                         projection_dim=1280)),
    ]:
        with torch.device("meta"):
            ref = cls(CLIPTextConfig(hidden_act="gelu", **kw))
        assert counts[name] == sum(p.numel() for p in ref.parameters()), name
    for name, cfg in CONFIGS.items():
        with torch.device("meta"):
            sd = ClipTextModel(cfg).state_dict()
        assert ClipConfig.from_state_dict(sd) == cfg, name
        assert ClipConfig.from_state_dict(to_ours(to_openclip(sd, "cond_stage_model.model."))) == cfg, name


def test_clip_skip_out_of_range_is_refused() -> None:
    ours = build_clip(tiny("quick_gelu", False).state_dict(), **OVERRIDES)
    with pytest.raises(ValueError, match="clip_skip"):
        ours(tokens(EOS), clip_skip=4)


def test_ambiguous_checkpoint_asks_for_a_prefix() -> None:
    sd = tiny("quick_gelu", False).state_dict()
    both = {"a." + k: v for k, v in sd.items()} | {"b." + k: v for k, v in sd.items()}
    with pytest.raises(ValueError, match="pass a prefix"):
        to_ours(both)


# ----------------------------------------------------------------------------------------- tokenizer

PROMPTS = [
    "a photo of a cat",
    "A Photo Of  A   CAT\n\twith\u00a0spaces",
    "masterpiece, best quality, (red hair:1.2), [blue eyes], 1girl, solo!!!",
    "don't you'll we've it's I'm they're she'd",
    "naïve café résumé Zürich, 東京タワー, 🤖 emoji ✨, ñandú",
    "numbers 12345 and 3.14159, prices $9.99 & 100%",
    "<|startoftext|> literal specials <|endoftext|> inside",
    "html &amp; entities &lt;tag&gt; and \\(escaped\\)",
    " ".join(["long prompt with many words and commas,"] * 20),
    "",
]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab, merges = bundled_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


def test_bundled_vocabulary_has_clip_ids() -> None:
    vocab, merges = bundled_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125


def test_token_ids_equal_transformers(vocab_folder: Path) -> None:
    ref = CLIPTokenizer.from_pretrained(str(vocab_folder))
    ours = ClipTokenizer.bundled()
    for text in PROMPTS:
        want = ref(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == want, text
        padded = ref(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert ours(text) == padded, text


def test_folder_vocabulary_and_pad_token(vocab_folder: Path) -> None:
    assert ClipTokenizer.load(vocab_folder).pad_id == 49407  # CLIP-L default: pad with EOS
    (vocab_folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    try:
        tok = ClipTokenizer.load(vocab_folder)
        assert tok.pad_id == 0  # SD2 / SDXL tokenizer_2 pad with "!"
        row = tok("a cat")
        assert row[:4] == [49406, 320, 2368, 49407] and row[4:] == [0] * 73
    finally:
        (vocab_folder / "special_tokens_map.json").unlink()
    assert ClipTokenizer.load(None, pad_id=0).pad_id == 0


def test_long_prompt_is_truncated_to_77() -> None:
    tok = ClipTokenizer.bundled()
    row = tok(PROMPTS[8])
    assert len(row) == 77 and row[0] == 49406 and row[-1] == 49407
    assert len(tok.encode(PROMPTS[8])) > 75


def test_decode_round_trips_lowercased_text() -> None:
    tok = ClipTokenizer.bundled()
    assert tok.decode(tok("A photo of a CAT")) == "a photo of a cat"


def test_openclip_split_agrees_with_diffusers_single_file_converter() -> None:
    """Independent check of the OpenCLIP mapping: diffusers' converter reads our written layout the same."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    ref_model = tiny("gelu", True)
    p = "conditioner.embedders.1.model."
    oc = to_openclip(legacy(ref_model.state_dict()), prefix=p)
    theirs = convert_open_clip_checkpoint(ref_model, oc, prefix=p)
    ours = to_ours(oc, p)
    assert set(theirs) <= set(ours)
    assert set(ours) - set(theirs) <= {"text_model.embeddings.position_ids"}
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
