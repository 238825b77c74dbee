"""Wan causal 3D VAE parity with diffusers' AutoencoderKLWan on a tiny random model; chunked and tiled decode."""

from __future__ import annotations

import re

import pytest
import torch

from studio.engine.context import UserError
from studio.models.wan_vae import WanVAE, WanVAEConfig, load_wan_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> AutoencoderKLWan:
    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             temperal_downsample=[False, True, True]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # gammas off 1, biases off 0
            p.add_(torch.randn_like(p) * (0.1 if name.endswith("gamma") else 0.02))
    return model


@pytest.fixture(scope="module")
def ours(ref):
    return load_wan_vae(dict(ref.state_dict()))


def _latents(frames: int = 3, h: int = 4, w: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _video(frames: int = 9, seed: int = 2) -> torch.Tensor:
    return torch.rand(1, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys -> the original Wan VAE layout, by hand (4 levels, 2 residual blocks per level)."""
    res = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
           "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
           "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
    out = {}
    for key, v in sd.items():
        if m := re.match(r"(quant_conv|post_quant_conv)\.(.*)", key):
            new = ("conv1." if m[1] == "quant_conv" else "conv2.") + m[2]
        elif m := re.match(r"(encoder|decoder)\.conv_in\.(.*)", key):
            new = f"{m[1]}.conv1.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.gamma", key):
            new = f"{m[1]}.head.0.gamma"
        elif m := re.match(r"(encoder|decoder)\.conv_out\.(.*)", key):
            new = f"{m[1]}.head.2.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
            new = f"{m[1]}.middle.{2 * int(m[2])}.{res[m[3]]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            new = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
            new = f"encoder.downsamples.{m[1]}.{res.get(m[2], m[2])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
            new = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{res[m[3]]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        else:
            raise AssertionError(f"unmapped key {key}")
        out[new] = v
    return out


def test_config_is_read_from_shapes(ours):
    assert ours.cfg == WanVAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                                    temporal_downsample=(False, True, True))
    assert ours.cfg.time_scale == 4 and ours.cfg.scale == 8


@torch.no_grad()
def test_decode_matches_diffusers_frame_by_frame(ref, ours):
    z = _latents()
    want = ref.decode(z).sample
    got = ours.decode(z, chunk=1)
    assert got.shape == want.shape == (1, 3, 9, 32, 32)
    assert (got - want).abs().max().item() <= TOL
    assert want.std() > 0.05  # the reference output is not flat, so the comparison means something


@torch.no_grad()
def test_encode_matches_diffusers(ref, ours):
    x = _video()
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == dist.mean.shape == (1, 16, 3, 4, 4)
    assert (mean - dist.mean).abs().max().item() <= TOL
    assert (logvar - dist.logvar).abs().max().item() <= TOL
    # bigger chunks of 8 frames (after the first) give the same latents
    mean8, _ = ours.encode(x, chunk=8)
    assert (mean8 - mean).abs().max().item() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 2])
def test_chunked_decode_equals_the_whole_decode(ours, chunk):
    z = _latents(frames=4, h=2, w=2)
    one = ours.decode(z, chunk=1)
    other = ours.decode(z, chunk=chunk)
    assert one.shape == (1, 3, 13, 16, 16)
    assert (one - other).abs().max().item() <= TOL


@torch.no_grad()
def test_original_layout_loads_and_matches_diffusers(ref):
    original = _to_original(dict(ref.state_dict()))
    pinned = {"encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.0.residual.2.weight",
              "encoder.downsamples.2.resample.1.weight", "encoder.downsamples.5.time_conv.weight",
              "encoder.downsamples.3.shortcut.weight", "encoder.middle.1.to_qkv.weight", "encoder.head.0.gamma",
              "conv1.weight", "conv2.bias", "decoder.conv1.weight", "decoder.middle.2.residual.6.bias",
              "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.3.resample.1.weight",
              "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.bias",
              "decoder.upsamples.14.residual.3.gamma", "decoder.head.2.weight"}
    assert pinned <= set(original)
    back = convert_wan_vae_to_diffusers(dict(original))  # diffusers' own converter agrees with our hand mapping
    assert set(back) == set(ref.state_dict())
    z = _latents(frames=2, h=2, w=2)
    want = ref.decode(z).sample
    for sd in (original, {f"vae.{k}": v for k, v in original.items()}):
        assert (load_wan_vae(sd).decode(z) - want).abs().max().item() <= TOL


@torch.no_grad()
def test_tiled_decode_is_as_close_to_the_full_decode_as_diffusers_tiling(ref, ours):
    z = _latents(frames=1, h=8, w=8, seed=5)  # one frame: the time axis is tested above
    full = ours.decode(z)
    tiled = ours.tiled_decode(z, tile_latent=5, overlap=2)
    ref.enable_tiling(tile_sample_min_height=40, tile_sample_min_width=40, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)
    try:
        theirs = ref.decode(z).sample
    finally:
        ref.disable_tiling()
    assert tiled.shape == full.shape == theirs.shape == (1, 3, 1, 64, 64)
    # spatial tiles see less context (the mid-block attention spans the whole frame), so tiling is
    # approximate; hold ours to diffusers' own tiling error
    ours_err = (tiled - full).abs().mean().item()
    theirs_err = (theirs - full).abs().mean().item()
    assert ours_err <= 1.25 * theirs_err + 1e-4
    # the tiles cover every pixel: untiled where one tile is the whole frame
    assert (ours.tiled_decode(z, tile_latent=8, overlap=2) - full).abs().max().item() <= TOL


def test_decode_falls_back_to_smaller_tiles_after_out_of_memory(ours, monkeypatch):
    z = _latents(frames=1, h=4, w=4)
    real = type(ours).decode
    calls = []

    def decode(self, t, chunk=1):
        calls.append(tuple(t.shape[-2:]))
        if t.shape[-1] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, t, chunk)

    monkeypatch.setattr(type(ours), "decode", decode)
    told = []
    with torch.no_grad():
        out = ours.decode_with_fallback(z, tiles=(None, 4, 3), on_fallback=lambda a, b: told.append((a, b)))
    assert out.shape == (1, 3, 1, 32, 32)
    assert told == [(None, 4), (4, 3)] and calls[0] == (4, 4)
    with pytest.raises(UserError, match="ran out of memory"):
        ours.decode_with_fallback(z, tiles=(None, 4))


def test_latent_normalisation_uses_the_published_statistics(ref, ours):
    assert list(ours.cfg.latents_mean) == ref.config.latents_mean
    assert list(ours.cfg.latents_std) == ref.config.latents_std
    z = _latents()
    latent = ours.normalize(z)
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(latent, (z - mean) / std, atol=1e-6)
    assert torch.allclose(ours.denormalize(latent), z, atol=1e-5)


def test_bad_inputs_and_files_fail_clearly(ref, ours):
    with pytest.raises(UserError, match="1 \\+ 4k frames"):
        ours.encode(_video(frames=8))
    with pytest.raises(UserError, match="no Wan video VAE"):
        load_wan_vae({"foo.weight": torch.zeros(1)})
    sd = dict(ref.state_dict())
    sd["decoder.conv_in.weight"] = torch.zeros(64, 20, 3, 3, 3)
    with pytest.raises(UserError, match="20 latent channels"):
        load_wan_vae(sd)
    sd = dict(ref.state_dict())
    sd["decoder.conv_out.bias"] = torch.zeros(4)
    with pytest.raises(UserError, match="shapes that do not fit"):
        load_wan_vae(sd)
    sd = dict(ref.state_dict())
    sd.pop("decoder.up_blocks.1.resnets.2.conv2.bias")
    with pytest.raises(UserError, match="do not fit"):
        load_wan_vae(sd)


# ---------------------------------------------------------------- Wan 2.2 (48 channels, 2x2 patches, residual levels)


@pytest.fixture(scope="module")
def ref22() -> AutoencoderKLWan:
    torch.manual_seed(1)
    model = AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                             temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                             out_channels=12, patch_size=2, scale_factor_spatial=16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if name.endswith("gamma") else 0.02))
    return model


@pytest.fixture(scope="module")
def ours22(ref22):
    return load_wan_vae(dict(ref22.state_dict()))


def _to_original22(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Wan 2.2 keys -> the nested original layout of Wan2.2_VAE.pth (by hand)."""
    res = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
           "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
           "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
    out = {}
    for key, v in sd.items():
        if m := re.match(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
            new = f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{res[m[3]]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d)\.downsampler\.(.*)", key):
            new = f"encoder.downsamples.{m[1]}.downsamples.1.{m[2]}"  # after the one residual block
        elif m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
            new = f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{res[m[3]]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d)\.upsampler\.(.*)", key):
            new = f"decoder.upsamples.{m[1]}.upsamples.2.{m[2]}"  # after the two residual blocks
        else:
            new = next(iter(_to_original({key: v})))
        out[new] = v
    return out


def test_wan22_config_is_read_from_shapes(ours22):
    cfg = ours22.cfg
    assert (cfg.z_dim, cfg.patch_size, cfg.residual, cfg.decoder_base_dim, cfg.in_channels) == (48, 2, True, 12, 12)
    assert cfg.dim_mult == (1, 2, 4, 4) and cfg.num_res_blocks == 1 and cfg.temporal_downsample == (False, True, True)
    assert cfg.scale == 16 and cfg.time_scale == 4 and len(cfg.latents_mean) == 48
    full = WanVAEConfig.named("wan2.2")
    assert (full.base_dim, full.decoder_base_dim, full.z_dim) == (160, 256, 48)
    for name, millions in (("wan2.1", 126.9), ("wan2.2", 704.7)):  # the released VAE files
        with torch.device("meta"):
            n = sum(p.numel() for p in WanVAE(WanVAEConfig.named(name)).parameters())
        assert abs(n / 1e6 - millions) < 0.1, name


@torch.no_grad()
def test_wan22_decode_and_encode_match_diffusers(ref22, ours22):
    z = torch.randn(1, 48, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    want = ref22.decode(z).sample
    got = ours22.decode(z)
    assert got.shape == want.shape == (1, 3, 9, 32, 32)
    assert want.std() > 0.05
    assert (got - want).abs().max().item() <= TOL
    assert (ours22.decode(z, chunk=None) - got).abs().max().item() <= TOL
    x = _video()
    dist = ref22.encode(x).latent_dist
    mean, logvar = ours22.encode(x)
    assert mean.shape == dist.mean.shape == (1, 48, 3, 2, 2)
    assert (mean - dist.mean).abs().max().item() <= TOL
    assert (logvar - dist.logvar).abs().max().item() <= TOL


@torch.no_grad()
def test_bf16_weights_decode_close_to_fp32(ref, ours):
    z = _latents(frames=2, h=2, w=2)
    half = load_wan_vae(dict(ref.state_dict()), dtype=torch.bfloat16)
    got = half.decode(z.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - ours.decode(z)).abs().mean().item() < 0.02


@torch.no_grad()
def test_wan22_original_layout_loads(ref22):
    original = _to_original22(dict(ref22.state_dict()))
    pinned = {"encoder.conv1.weight", "encoder.downsamples.0.downsamples.0.residual.0.gamma",
              "encoder.downsamples.0.downsamples.1.resample.1.weight",
              "encoder.downsamples.1.downsamples.1.time_conv.weight",
              "encoder.downsamples.1.downsamples.0.shortcut.weight", "encoder.middle.1.to_qkv.weight",
              "decoder.upsamples.0.upsamples.2.time_conv.weight", "decoder.upsamples.2.upsamples.2.resample.1.bias",
              "decoder.upsamples.3.upsamples.1.residual.6.weight", "decoder.head.2.weight", "conv1.weight", "conv2.weight"}
    assert pinned <= set(original)
    z = torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    assert (load_wan_vae(original).decode(z) - ref22.decode(z).sample).abs().max().item() <= TOL
