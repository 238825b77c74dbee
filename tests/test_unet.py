"""UNet parity with diffusers on tiny random SD1 / SD2 / SDXL configs, in both key layouts."""

from __future__ import annotations

import functools

import pytest
import torch

from studio.models.unet import CONFIGS, UNet, UNetConfig, build_unet, sdxl_add_embeddings
from studio.models.unet_convert import ldm_layout, module_pairs, to_ldm, to_ours

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

CTX = 24  # tiny cross-attention width

TINY = {
    # SD1: conv projections, 8 heads everywhere, deepest level without attention
    "sd1": dict(
        kwargs=dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,  # diffusers' name; it is the head count for SD1
        ),
        overrides=dict(norm_groups=8),
    ),
    # SD2 inpainting: linear projections, heads from a fixed head size, 9 input channels
    "sd2_inpaint": dict(
        kwargs=dict(
            in_channels=9,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(4, 8),  # heads per level -> head size 8
            use_linear_projection=True,
        ),
        overrides=dict(head_dim=8, norm_groups=8),
    ),
    # SDXL: text_time addition embedding, first level plain, depth 2 in the deepest level and mid
    "sdxl": dict(
        kwargs=dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(4, 8, 8),
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=16 + 6 * 256,
        ),
        overrides=dict(head_dim=8, norm_groups=8),
    ),
}


@functools.cache  # read-only after construction: tests share it to stay fast on 2 cores
def make_reference(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    kwargs = dict(sample_size=16, layers_per_block=2, norm_num_groups=8, cross_attention_dim=CTX)
    kwargs.update(TINY[name]["kwargs"])
    ref = UNet2DConditionModel(**kwargs).eval()
    # diffusers zero-inits nothing here, but randomise every tensor so no path hides behind zeros
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    return ref


def run_both(name: str, ref: UNet2DConditionModel, ours: UNet) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cin = ref.config.in_channels
    x = torch.randn(2, cin, 16, 16, generator=g)
    t = torch.tensor([999.0, 17.0])
    ctx = torch.randn(2, 7, CTX, generator=g)
    kwargs, y = {}, None
    if name == "sdxl":
        pooled = torch.randn(2, 16, generator=g)
        sizes = [((1024, 768), (0, 0), (1024, 768)), ((512, 512), (32, 16), (1024, 1024))]
        time_ids = torch.tensor([[*a, *b, *c] for a, b, c in sizes], dtype=torch.float32)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        y = torch.cat([pooled, torch.stack([sdxl_add_embeddings(*s) for s in sizes])], dim=1)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, **kwargs).sample
        got = ours(x, t, ctx, y)
    return expected, got


def ldm_args(ours: UNet) -> tuple[int, int, list[bool]]:
    cfg = ours.config
    return len(cfg.block_channels), cfg.layers_per_block, [d > 0 for d in cfg.transformer_depth]


@pytest.mark.parametrize("name", list(TINY))
def test_unet_matches_diffusers_from_diffusers_layout(name: str) -> None:
    ref = make_reference(name)
    ours = build_unet(ref.state_dict(), **TINY[name]["overrides"])
    expected, got = run_both(name, ref, ours)
    assert (expected - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(TINY))
def test_unet_matches_diffusers_from_ldm_single_file_layout(name: str) -> None:
    ref = make_reference(name)
    diffusers_sd = ref.state_dict()
    cfg = UNetConfig.from_state_dict(diffusers_sd, **TINY[name]["overrides"])
    ldm = to_ldm(diffusers_sd, len(cfg.block_channels), cfg.layers_per_block, [d > 0 for d in cfg.transformer_depth])
    # a full checkpoint also holds the VAE and text encoder: they must be ignored
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    ours = build_unet(ldm, **TINY[name]["overrides"])
    expected, got = run_both(name, ref, ours)
    assert (expected - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(TINY))
def test_our_ldm_layout_is_what_diffusers_single_file_converter_reads(name: str) -> None:
    """Independent check of the mapping: diffusers' own LDM converter must undo our to_ldm."""
    ref = make_reference(name)
    sd = ref.state_dict()
    cfg = UNetConfig.from_state_dict(sd, **TINY[name]["overrides"])
    ldm = to_ldm(sd, len(cfg.block_channels), cfg.layers_per_block, [d > 0 for d in cfg.transformer_depth])
    back = convert_ldm_unet_checkpoint(ldm, dict(ref.config))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_ldm_key_names_match_the_released_checkpoints() -> None:
    """Names written by hand from SD1.5 / SDXL single files, so the mapping is not checked against itself."""
    sd1 = set(module_pairs(4, 2, [True, True, True, False]).items())
    for pair in [
        ("input_blocks.0.0", "conv_in"),
        ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
        ("input_blocks.1.0.emb_layers.1", "down_blocks.0.resnets.0.time_emb_proj"),
        ("input_blocks.1.1", "down_blocks.0.attentions.0"),
        ("input_blocks.2.1", "down_blocks.0.attentions.1"),
        ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        ("input_blocks.11.0.out_layers.3", "down_blocks.3.resnets.1.conv2"),
        ("middle_block.0.in_layers.0", "mid_block.resnets.0.norm1"),
        ("middle_block.1", "mid_block.attentions.0"),
        ("middle_block.2.out_layers.0", "mid_block.resnets.1.norm2"),
        ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks.3.1", "up_blocks.1.attentions.0"),
        ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
        ("output_blocks.11.1", "up_blocks.3.attentions.2"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
        ("time_embed.2", "time_embedding.linear_2"),
    ]:
        assert pair in sd1
    sdxl = module_pairs(3, 2, [False, True, True])
    assert sdxl["label_emb.0.0"] == "add_embedding.linear_1"
    assert sdxl["input_blocks.4.1"] == "down_blocks.1.attentions.0"
    assert sdxl["input_blocks.7.1"] == "down_blocks.2.attentions.0"
    assert sdxl["output_blocks.2.1"] == "up_blocks.0.attentions.2"
    assert sdxl["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert "input_blocks.1.1" not in sdxl and "output_blocks.8.1" not in sdxl


def test_ldm_layout_is_read_from_keys() -> None:
    with torch.device("meta"):
        model = UNet(CONFIGS["sdxl_refiner"])
    args = (4, 2, [False, True, True, False])
    ldm = to_ldm(model.state_dict(), *args, prefix="")
    assert ldm_layout(list(ldm)) == args


@pytest.mark.parametrize("name", list(CONFIGS))
def test_named_configs_round_trip_through_shape_inference(name: str) -> None:
    """Each released layout, built on meta: LDM-named and ComfyUI-prefixed keys infer the same config."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = UNet(cfg)
    sd = model.state_dict()
    assert UNetConfig.from_state_dict(sd) == cfg
    args = (len(cfg.block_channels), cfg.layers_per_block, [d > 0 for d in cfg.transformer_depth])
    for prefix in ["model.diffusion_model.", "diffusion_model.", ""]:
        ldm = to_ldm(sd, *args, prefix=prefix)
        assert UNetConfig.from_state_dict(ldm) == cfg
        assert set(to_ours(ldm)) == set(sd)


def test_released_parameter_counts() -> None:
    counts = {}
    for name, cfg in CONFIGS.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in UNet(cfg).parameters())
    # published sizes (SD1 859.52M, SD2 865.91M, SDXL 2567.46M); refiner as diffusers builds it
    assert counts["sd1"] == 859_520_964
    assert counts["sd2"] == 865_910_724
    assert counts["sdxl_base"] == 2_567_463_684
    assert counts["sdxl_refiner"] == 2_259_526_660


def test_inpaint_channels_are_inferred() -> None:
    ref = make_reference("sd2_inpaint")
    assert UNetConfig.from_state_dict(ref.state_dict()).in_channels == 9


def test_missing_keys_are_reported() -> None:
    sd = dict(make_reference("sd1").state_dict())
    del sd["mid_block.resnets.0.conv1.weight"]
    with pytest.raises(ValueError, match="missing"):
        build_unet(sd, **TINY["sd1"]["overrides"])


def test_sdxl_needs_y() -> None:
    ref = make_reference("sdxl")
    ours = build_unet(ref.state_dict(), **TINY["sdxl"]["overrides"])
    with pytest.raises(ValueError, match="needs `y`"):
        ours(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), torch.zeros(1, 3, CTX))


@pytest.mark.parametrize("score", [None, 6.0])
def test_sdxl_add_embeddings_match_diffusers_time_ids(score: float | None) -> None:
    from diffusers.models.embeddings import Timesteps

    numbers = [896.0, 1152.0, 64.0, 0.0] + ([1024.0, 1024.0] if score is None else [score])
    want = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.tensor(numbers)).flatten()
    got = sdxl_add_embeddings((896, 1152), (64, 0), (1024, 1024), aesthetic_score=score)
    assert got.shape == (len(numbers) * 256,)
    assert (got - want).abs().max().item() <= 1e-6
