"""SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel in each layout (diffusers, Stability's
original names, ComfyUI's prefix), with and without QK norm and MMDiT-X dual attention."""

from __future__ import annotations

import pytest
import torch

from studio.errors import UserError
from studio.models.sd3 import SD3Config, SD3Transformer, load_sd3_transformer, normalize_state_dict
from tests.video_fixtures import jiggle

HEADS = 2


def tiny_sd3(dual: tuple[int, ...] = (), qk_norm: str | None = None, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=32,
                                num_attention_heads=HEADS, joint_attention_dim=24, caption_projection_dim=64,
                                pooled_projection_dim=20, out_channels=16, pos_embed_max_size=12,
                                dual_attention_layers=dual, qk_norm=qk_norm)
    jiggle(net, 0.1)
    return net.eval()


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def to_sai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel names -> Stability's original ones, written out by hand."""
    plain = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
             "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for leaf in ("weight", "bias"):
        for old, new in plain.items():
            out[f"{new}.{leaf}"] = sd[f"{old}.{leaf}"]
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(sd[f"norm_out.linear.{leaf}"])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(depth):
        p, q = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == depth - 1
        for leaf in ("weight", "bias"):
            out[f"{q}x_block.attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn.to_{c}.{leaf}"] for c in "qkv"])
            out[f"{q}context_block.attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn.add_{c}_proj.{leaf}"] for c in "qkv"])
            out[f"{q}x_block.attn.proj.{leaf}"] = sd[f"{p}attn.to_out.0.{leaf}"]
            out[f"{q}x_block.adaLN_modulation.1.{leaf}"] = sd[f"{p}norm1.linear.{leaf}"]
            ctx_mod = sd[f"{p}norm1_context.linear.{leaf}"]
            out[f"{q}context_block.adaLN_modulation.1.{leaf}"] = _swap(ctx_mod) if last else ctx_mod
            out[f"{q}x_block.mlp.fc1.{leaf}"] = sd[f"{p}ff.net.0.proj.{leaf}"]
            out[f"{q}x_block.mlp.fc2.{leaf}"] = sd[f"{p}ff.net.2.{leaf}"]
            if not last:
                out[f"{q}context_block.attn.proj.{leaf}"] = sd[f"{p}attn.to_add_out.{leaf}"]
                out[f"{q}context_block.mlp.fc1.{leaf}"] = sd[f"{p}ff_context.net.0.proj.{leaf}"]
                out[f"{q}context_block.mlp.fc2.{leaf}"] = sd[f"{p}ff_context.net.2.{leaf}"]
            if f"{p}attn2.to_q.{leaf}" in sd:
                out[f"{q}x_block.attn2.qkv.{leaf}"] = torch.cat([sd[f"{p}attn2.to_{c}.{leaf}"] for c in "qkv"])
                out[f"{q}x_block.attn2.proj.{leaf}"] = sd[f"{p}attn2.to_out.0.{leaf}"]
        for old, new in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                         ("attn.norm_added_q", "context_block.attn.ln_q"),
                         ("attn.norm_added_k", "context_block.attn.ln_k"),
                         ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
            if f"{p}{old}.weight" in sd:
                out[f"{q}{new}.weight"] = sd[f"{p}{old}.weight"]
    return out


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 8, 6, generator=g), torch.tensor([700.0, 250.0]), torch.randn(2, 5, 24, generator=g),
            torch.randn(2, 20, generator=g))


def _reference(net, x, t, ctx, y):
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample


VARIANTS = {"3-medium": ((), None), "3.5-large": ((), "rms_norm"), "3.5-medium": ((0, 1), "rms_norm")}


def test_hand_written_stability_layout_is_what_diffusers_converts_from():
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = dict(tiny_sd3((0, 1), "rms_norm").state_dict())
    back = convert_sd3_transformer_checkpoint_to_diffusers(to_sai(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", ["diffusers", "stability", "comfyui"])
def test_transformer_matches_diffusers_in_each_layout(variant, layout):
    net = tiny_sd3(*VARIANTS[variant])
    sd = dict(net.state_dict())
    if layout == "stability":
        sd = to_sai(sd)
    elif layout == "comfyui":
        sd = {"model.diffusion_model." + k: v for k, v in to_sai(sd).items()}
    ours = load_sd3_transformer(sd, heads=HEADS)
    assert ours.cfg.dual_layers == VARIANTS[variant][0] and ours.cfg.qk_norm == bool(VARIANTS[variant][1])
    x, t, ctx, y = _inputs()
    want = _reference(net, x, t, ctx, y)
    with torch.no_grad():
        got = ours(x, t, ctx, y)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_diffusers_folder_config_gives_the_head_count(tmp_path):
    from studio.models.diffusers_config import read_config

    net = tiny_sd3()
    net.save_pretrained(tmp_path / "transformer")
    ours = load_sd3_transformer(dict(net.state_dict()), config=read_config(tmp_path / "transformer"))
    assert ours.cfg.heads == HEADS


def test_both_layouts_convert_to_the_same_tensors():
    sd = dict(tiny_sd3((0,), "rms_norm").state_dict())
    a, b = normalize_state_dict(sd), normalize_state_dict(to_sai(sd))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_named_configs_have_published_sizes():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in SD3Transformer(SD3Config.named(name)).parameters())
                 for name in ("3-medium", "3.5-large", "3.5-medium")}
    assert 2.0e9 < sizes["3-medium"] < 2.1e9  # 2B
    assert 8.0e9 < sizes["3.5-large"] < 8.2e9  # 8.1B
    assert 2.2e9 < sizes["3.5-medium"] < 2.6e9  # 2.5B


def test_too_large_an_image_for_the_position_table_says_so():
    ours = load_sd3_transformer(dict(tiny_sd3().state_dict()), heads=HEADS)
    x, t, ctx, y = _inputs()
    with pytest.raises(UserError, match="up to"):
        ours(torch.randn(1, 16, 32, 32), t[:1], ctx[:1], y[:1])


def test_not_an_sd3_file_says_so():
    with pytest.raises(UserError, match="no SD3 transformer"):
        load_sd3_transformer({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)})
