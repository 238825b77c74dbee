"""Tiled encode/decode: exact for per-pixel functions, close for a real VAE, OOM fallback, video."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as RefVAE

from studio.engine.context import UserError
from studio.models.vae import load_vae
from studio.nn.tiling import decode_with_fallback, plan, tiled_decode, tiled_decode_3d, tiled_encode

WEIGHT = torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(0))


def pixel_decoder(z: torch.Tensor) -> torch.Tensor:
    """A per-latent-pixel decoder: 1x1 conv then nearest x8. (B, 4, h, w) -> (B, 3, 8h, 8w)."""
    return F.interpolate(torch.tanh(F.conv2d(z, WEIGHT)), scale_factor=8, mode="nearest")


def pixel_encoder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 8x8 block: (B, 3, H, W) -> mean and logvar (B, 4, H/8, W/8)."""
    pooled = F.avg_pool2d(x, 8)
    return F.conv2d(pooled, WEIGHT.transpose(0, 1)), F.conv2d(pooled.square(), WEIGHT.transpose(0, 1))


@pytest.mark.parametrize("length,tile,overlap", [(64, 64, 16), (65, 64, 16), (113, 64, 16), (256, 96, 24),
                                                 (37, 8, 3), (1000, 128, 32)])
def test_plan_covers_everything_with_the_overlap_and_no_tile_too_big(length, tile, overlap):
    spans = plan(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(e - s <= tile for s, e in spans)
    for (s0, e0), (s1, _) in zip(spans, spans[1:], strict=False):
        assert s1 > s0 and e0 - s1 >= overlap
    if length > tile:  # the fewest tiles: one fewer could not keep the overlap
        n = len(spans)
        assert (n - 1) * tile - (n - 2) * overlap < length


@pytest.mark.parametrize("h,w,tile,overlap", [(20, 33, 8, 2), (16, 16, 8, 4), (9, 40, 16, 4), (12, 12, 64, 16)])
def test_tiled_decode_equals_untiled_for_a_per_pixel_decoder(h, w, tile, overlap):
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(1))
    calls = []
    out = tiled_decode(lambda t: calls.append(t.shape) or pixel_decoder(t), z, tile_latent=tile, overlap=overlap)
    assert out.shape == (2, 3, 8 * h, 8 * w)
    torch.testing.assert_close(out, pixel_decoder(z), atol=1e-6, rtol=0)
    assert all(s[-1] <= tile and s[-2] <= tile for s in calls)


def test_tiled_encode_equals_untiled_for_a_per_block_encoder_and_blends_both_moments():
    x = torch.rand(1, 3, 136, 200, generator=torch.Generator().manual_seed(2))
    mean, logvar = tiled_encode(pixel_encoder, x, tile=64, overlap=16)
    ref_mean, ref_logvar = pixel_encoder(x)
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(logvar, ref_logvar, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        tiled_encode(pixel_encoder, x[..., :100], tile=64, overlap=16)


def tiny_f4_vae(seed: int = 0) -> RefVAE:
    """A 3-level (4x) KL VAE, small enough for 2 CPU cores; the tiling logic is the same as at 8x."""
    torch.manual_seed(seed)
    return RefVAE(block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3).eval()


def test_tiled_decode_of_a_real_vae_is_close_to_untiled_and_to_diffusers_tiling():
    torch.manual_seed(0)
    ref = tiny_f4_vae()
    ours = load_vae(ref.state_dict())
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours.decode(z)
        tiled = tiled_decode(ours.decode, z, tile_latent=12, overlap=4, scale=4)
        ref.enable_tiling()
        ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = 12, 48, 1 / 3
        theirs = ref.decode(z).sample
    scale = full.abs().max().item()
    ours_err = (tiled - full).abs().max().item() / scale
    theirs_err = (theirs - full).abs().max().item() / scale
    print(f"relative max error vs untiled: ours {ours_err:.3f}, diffusers {theirs_err:.3f}; "
          f"mean {((tiled - full).abs().mean() / scale):.4f} vs {((theirs - full).abs().mean() / scale):.4f}")
    assert tiled.shape == full.shape == theirs.shape
    # Tiling a VAE is approximate (group norm statistics and receptive field differ per tile).
    # We hold ours to diffusers' own tiling error, and both close to the untiled decode.
    assert ours_err <= 1.25 * theirs_err + 1e-3
    assert (tiled - full).abs().mean() <= 1.25 * (theirs - full).abs().mean()
    assert ((tiled - theirs).abs().mean() / scale) < 0.1  # measured 0.066: the two tilings err independently


def oom_above(limit: int, calls: list):
    def decode(z):
        calls.append(tuple(z.shape[-2:]))
        if z.shape[-1] * z.shape[-2] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return pixel_decoder(z)

    return decode


def test_decode_with_fallback_retries_with_smaller_tiles_after_out_of_memory():
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(4))
    calls, fallbacks = [], []
    out = decode_with_fallback(oom_above(16 * 16, calls), z, tiles=(None, 32, 16),
                               on_fallback=lambda failed, nxt: fallbacks.append((failed, nxt)))
    torch.testing.assert_close(out, pixel_decoder(z), atol=1e-6, rtol=0)
    assert fallbacks == [(None, 32), (32, 16)]
    assert calls[0] == (40, 40) and max(a * b for a, b in calls[2:]) <= 16 * 16


def test_decode_with_fallback_reports_out_of_memory_when_every_size_fails():
    z = torch.randn(1, 4, 40, 40)
    with pytest.raises(UserError) as err:
        decode_with_fallback(oom_above(4, []), z, tiles=(None, 16, 8))
    assert err.value.kind == "out_of_memory" and "smaller" in err.value.message


def test_decode_with_fallback_lets_other_errors_through():
    def broken(z):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        decode_with_fallback(broken, torch.zeros(1, 4, 8, 8))


def causal_video_decoder(z: torch.Tensor, time_scale: int = 4) -> torch.Tensor:
    """Causal per-pixel video decoder: frame 0 -> 1 frame, every later latent frame -> time_scale frames
    (mixed with its predecessor, so the context frame matters). (B, 4, T, h, w) -> (B, 3, 1+(T-1)*4, 8h, 8w)."""
    img = torch.tanh(torch.einsum("oc,bcthw->bothw", WEIGHT[:, :, 0, 0], z))
    frames = [img[:, :, :1]]
    for t in range(1, z.shape[2]):
        mixed = 0.7 * img[:, :, t : t + 1] + 0.3 * img[:, :, t - 1 : t]
        frames += [mixed * (1 + 0.1 * k) for k in range(time_scale)]
    video = torch.cat(frames, dim=2)
    return video.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)


@pytest.mark.parametrize("chunk,overlap", [(None, 0), (3, 1), (4, 2), (2, 1)])
def test_tiled_decode_3d_equals_untiled_for_a_causal_per_pixel_video_decoder(chunk, overlap):
    z = torch.randn(1, 4, 7, 10, 12, generator=torch.Generator().manual_seed(5))
    full = causal_video_decoder(z)
    calls = []
    out = tiled_decode_3d(lambda t: calls.append(t.shape) or causal_video_decoder(t), z, tile_latent=6, overlap=2,
                          time_chunk=chunk, time_overlap=overlap)
    assert out.shape == full.shape == (1, 3, 25, 80, 96)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=0)
    if chunk:
        assert max(s[2] for s in calls) <= chunk + 1  # a chunk plus one context frame


def test_tiled_decode_3d_non_causal_time():
    z = torch.randn(1, 4, 6, 4, 4, generator=torch.Generator().manual_seed(6))

    def decoder(t):  # T -> 2T frames, per pixel
        return pixel_decoder(t.transpose(1, 2).flatten(0, 1)).unflatten(0, (1, -1)).transpose(1, 2).repeat_interleave(2, 2)

    out = tiled_decode_3d(decoder, z, tile_latent=None, time_chunk=3, time_overlap=1, time_scale=2, causal=False)
    torch.testing.assert_close(out, decoder(z), atol=1e-6, rtol=0)


def test_a_scale_that_does_not_match_the_decoder_is_reported():
    with pytest.raises(ValueError, match="scale"):
        tiled_decode(pixel_decoder, torch.zeros(1, 4, 16, 16), tile_latent=8, overlap=2, scale=4)


def test_tiled_encode_of_a_real_vae_is_as_close_to_untiled_as_diffusers_tiling():
    ref = tiny_f4_vae(seed=1)
    ours = load_vae(ref.state_dict())
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        tiled_mean, tiled_logvar = tiled_encode(ours.encode, x, tile=48, overlap=16, scale=4)
        ref.enable_tiling()
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = 48, 12, 1 / 3
        theirs = ref.encode(x).latent_dist.mean
    assert tiled_mean.shape == tiled_logvar.shape == mean.shape == (1, 4, 24, 24)
    ours_err, theirs_err = (tiled_mean - mean).abs().mean(), (theirs - mean).abs().mean()
    print(f"tiled encode mean abs error vs untiled: ours {ours_err:.4f}, diffusers {theirs_err:.4f}")
    assert ours_err <= 1.25 * theirs_err
