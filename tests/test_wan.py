"""Wan transformer parity with diffusers' WanTransformer3DModel on tiny random models, in both key layouts."""

from __future__ import annotations

import pytest
import torch

from studio.engine.context import UserError
from studio.models.wan import (
    WanConfig,
    WanTransformer,
    load_wan_transformer,
    normalize_state_dict,
    rope_angles,
    rope_complex,
    rope_real,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

TOL = 1e-4


def _reference(image: bool, pos_len: int | None = None, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=96, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, image_dim=24 if image else None, added_kv_proj_dim=64 if image else None, rope_max_seq_len=64,
        pos_embed_seq_len=pos_len,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():  # move every weight off its init value, norms included
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys -> the original Wan layout, written out by hand (not by inverting our table)."""
    top = {
        "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
        "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
        "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
        "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
        "condition_embedder.time_proj.": "time_projection.1.",
        "condition_embedder.image_embedder.norm1.": "img_emb.proj.0.",
        "condition_embedder.image_embedder.ff.net.0.proj.": "img_emb.proj.1.",
        "condition_embedder.image_embedder.ff.net.2.": "img_emb.proj.3.",
        "condition_embedder.image_embedder.norm2.": "img_emb.proj.4.",
        "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
        "proj_out.": "head.head.",
        "scale_shift_table": "head.modulation",
    }
    inner = {
        "attn1.to_q.": "self_attn.q.", "attn1.to_k.": "self_attn.k.", "attn1.to_v.": "self_attn.v.",
        "attn1.to_out.0.": "self_attn.o.", "attn1.norm_q.": "self_attn.norm_q.", "attn1.norm_k.": "self_attn.norm_k.",
        "attn2.to_q.": "cross_attn.q.", "attn2.to_k.": "cross_attn.k.", "attn2.to_v.": "cross_attn.v.",
        "attn2.to_out.0.": "cross_attn.o.", "attn2.norm_q.": "cross_attn.norm_q.",
        "attn2.norm_k.": "cross_attn.norm_k.", "attn2.add_k_proj.": "cross_attn.k_img.",
        "attn2.add_v_proj.": "cross_attn.v_img.", "attn2.norm_added_k.": "cross_attn.norm_k_img.",
        "norm2.": "norm3.", "ffn.net.0.proj.": "ffn.0.", "ffn.net.2.": "ffn.2.", "scale_shift_table": "modulation",
    }
    out = {}
    for key, v in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            new = next(f"blocks.{i}.{rest.replace(a, b, 1)}" for a, b in inner.items() if rest.startswith(a))
        elif key.startswith("patch_embedding."):
            new = key
        else:
            new = next(key.replace(a, b, 1) for a, b in top.items() if key.startswith(a))
        out[new] = v
    return out


def _inputs(image: bool, b: int = 2, text_len: int = 512, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 3, 4, 6, generator=g)
    t = torch.tensor([999.0, 250.5][:b])
    ctx = torch.randn(b, text_len, 32, generator=g)
    img = torch.randn(b, 5, 24, generator=g) if image else None
    return x, t, ctx, img


@torch.no_grad()
def _check(ref: WanTransformer3DModel, ours: WanTransformer, image: bool, text_len: int = 512,
           image_frames: int = 1) -> None:
    x, t, ctx, img = _inputs(image, text_len=text_len)
    if image_frames > 1:  # FLF2V: features of the first and last frame, (2B, 5, 24)
        img = torch.cat([img, img.flip(1)], dim=0)
    want = ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
    got = ours(x, t, ctx, image_context=img)
    assert got.shape == want.shape == (2, 4, 3, 4, 6)
    assert (got - want).abs().max().item() <= TOL


def test_t2v_matches_diffusers_from_diffusers_layout():
    ref = _reference(image=False)
    ours = load_wan_transformer(dict(ref.state_dict()), head_dim=32)
    assert ours.cfg.layers == 2 and ours.cfg.heads == 2 and ours.cfg.image_dim is None
    _check(ref, ours, image=False, text_len=7)


def test_i2v_matches_diffusers_with_clip_image_tokens():
    # diffusers splits image from text tokens assuming 512 text tokens, so give it exactly that
    ref = _reference(image=True)
    ours = load_wan_transformer(dict(ref.state_dict()), head_dim=32)
    assert ours.cfg.image_dim == 24
    _check(ref, ours, image=True)


@pytest.mark.parametrize("image", [False, True])
def test_loads_original_and_comfyui_layout(image):
    ref = _reference(image=image)
    original = _to_original(dict(ref.state_dict()))
    # real names from the Wan 2.1 release files, pinned so the mapping is not checked against itself
    pinned = {"blocks.0.self_attn.q.weight", "blocks.1.cross_attn.o.bias", "blocks.0.ffn.0.weight",
              "blocks.0.ffn.2.bias", "blocks.0.modulation", "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.weight",
              "text_embedding.0.weight", "time_embedding.2.bias", "time_projection.1.weight", "head.head.weight",
              "head.modulation", "patch_embedding.weight"}
    if image:
        pinned |= {"blocks.0.cross_attn.k_img.weight", "blocks.1.cross_attn.v_img.bias",
                   "blocks.0.cross_attn.norm_k_img.weight", "img_emb.proj.0.weight", "img_emb.proj.1.weight",
                   "img_emb.proj.3.weight", "img_emb.proj.4.bias"}
    assert pinned <= set(original)
    # diffusers' own converter takes our hand-written original layout back to its keys
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(ref.state_dict())
    comfy = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    for sd in (original, comfy):
        ours = load_wan_transformer(sd, head_dim=32)
        _check(ref, ours, image=image, text_len=512 if image else 9)


def test_flf2v_image_positions_match_diffusers():
    ref = _reference(image=True, pos_len=10)
    ours = load_wan_transformer(_to_original(dict(ref.state_dict())), head_dim=32)
    assert ours.cfg.image_pos_len == 10
    _check(ref, ours, image=True, image_frames=2)  # 2 x 5 image tokens become one 10-token sequence


@torch.no_grad()
def test_per_token_timesteps_match_diffusers():
    # Wan 2.2 TI2V gives the conditioning first frame t=0 and the rest the sampler's t
    ref = _reference(image=False)
    ours = load_wan_transformer(dict(ref.state_dict()), head_dim=32)
    x, _, ctx, _ = _inputs(image=False, text_len=6)
    tokens = 3 * 2 * 3
    t = torch.full((2, tokens), 700.0)
    t[:, :6] = 0.0
    want = ref(x, t, ctx, return_dict=False)[0]
    got = ours(x, t, ctx)
    assert (got - want).abs().max().item() <= TOL


def test_named_configs_have_128_wide_heads_and_wan_shapes():
    for name, cfg in [(n, WanConfig.named(n)) for n in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b",
                                                         "wan2.2-ti2v-5b")]:
        assert cfg.head_dim == 128, name
        assert cfg.patch_size == (1, 2, 2) and cfg.text_dim == 4096 and cfg.freq_dim == 256
    assert WanConfig.named("wan2.1-i2v-14b").in_channels == 36
    assert WanConfig.named("wan2.2-ti2v-5b").out_channels == 48
    # parameter counts of the released checkpoints, in billions
    published = {"wan2.1-t2v-1.3b": 1.419, "wan2.1-t2v-14b": 14.288, "wan2.1-i2v-14b": 16.395,
                 "wan2.2-ti2v-5b": 5.000}
    for name, billions in published.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in WanTransformer(WanConfig.named(name)).parameters())
        assert abs(n / 1e9 - billions) < 0.001, name


def test_config_from_state_dict_reads_shapes():
    with torch.device("meta"):
        sd = WanTransformer(WanConfig.named("wan2.1-i2v-14b")).state_dict()
    cfg = WanConfig.from_state_dict(normalize_state_dict(sd))
    assert cfg == WanConfig.named("wan2.1-i2v-14b")
    with torch.device("meta"):
        sd = WanTransformer(WanConfig.named("wan2.2-ti2v-5b")).state_dict()
    assert WanConfig.from_state_dict(sd) == WanConfig.named("wan2.2-ti2v-5b")


def test_complex_and_real_rope_rotate_alike():
    # eager uses the complex form, torch.compile the real one
    cos, sin = rope_angles(3, 4, 5, 32, 10000.0, torch.device("cpu"))
    rope = (cos, sin, torch.complex(cos, sin))
    q = torch.randn(2, 60, 2, 32)
    real, cplx = rope_real(q, rope, q.dtype), rope_complex(q, rope, q.dtype)
    assert (real - cplx).abs().max().item() <= 1e-6
    assert (real.norm(dim=-1) - q.norm(dim=-1)).abs().max().item() <= 1e-5  # a rotation keeps lengths
    assert (real[:, 0] - q[:, 0]).abs().max().item() <= 1e-6  # position (0, 0, 0) is not turned


def test_bad_inputs_fail_clearly():
    ref = _reference(image=False)
    ours = load_wan_transformer(dict(ref.state_dict()), head_dim=32)
    x, t, ctx, _ = _inputs(image=False, text_len=4)
    with pytest.raises(UserError, match="patch size"):
        ours(x[..., :5], t, ctx)
    with pytest.raises(UserError, match="no CLIP image input"):
        ours(x, t, ctx, image_context=torch.randn(2, 5, 24))
    with pytest.raises(UserError, match="no Wan transformer"):
        load_wan_transformer({"foo.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="VACE"):
        load_wan_transformer({**ref.state_dict(), "vace_blocks.0.before_proj.weight": torch.zeros(64, 64)})
    sd = dict(ref.state_dict())
    sd.pop("blocks.1.ffn.net.2.weight")
    with pytest.raises(UserError, match="do not fit"):
        load_wan_transformer(sd, head_dim=32)


@torch.no_grad()
def test_bf16_weights_run_and_stay_close_to_fp32():
    ref = _reference(image=True)
    fp32 = load_wan_transformer(dict(ref.state_dict()), head_dim=32)
    bf16 = load_wan_transformer(dict(ref.state_dict()), head_dim=32, dtype=torch.bfloat16)
    x, t, ctx, img = _inputs(image=True)
    want = fp32(x, t, ctx, image_context=img)
    got = bf16(x.bfloat16(), t, ctx.bfloat16(), image_context=img.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().mean().item() < 0.02 * want.abs().mean().item()
