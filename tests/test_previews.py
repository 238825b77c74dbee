"""Latent previews: linear projection per family, JPEG encoding, TAESD decoder."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from studio.engine.previews import LATENT_RGB, TAESD, latent_to_rgb, preview_jpeg, rgb_to_jpeg


@pytest.mark.parametrize("family,channels", [("sd1", 4), ("sd2", 4), ("sdxl", 4), ("sd3", 16), ("flux", 16)])
def test_latent_to_rgb_gives_uint8_image_of_latent_size(family, channels):
    z = torch.randn(2, channels, 12, 20, generator=torch.Generator().manual_seed(0))
    rgb = latent_to_rgb(z, family)
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8
    assert rgb.min() >= 0 and rgb.max() <= 255 and rgb.std() > 1  # not a flat image


def test_latent_to_rgb_is_the_published_linear_map():
    factors, bias = LATENT_RGB["sdxl"]
    z = torch.zeros(1, 4, 1, 1)
    z[0, 0] = 1.0  # channel 0 alone -> its factor row plus the bias
    expected = (np.clip(np.array(factors[0]) + np.array(bias), -1, 1) + 1) * 127.5
    np.testing.assert_allclose(latent_to_rgb(z, "sdxl")[0, 0], np.round(expected), atol=0)
    assert len(LATENT_RGB["sd3"][0]) == len(LATENT_RGB["flux"][0]) == len(LATENT_RGB["wan"][0]) == 16


def test_wan_video_latent_previews_one_frame():
    z = torch.randn(1, 16, 5, 6, 8, generator=torch.Generator().manual_seed(1))
    first, last = latent_to_rgb(z, "wan", frame=0), latent_to_rgb(z, "wan", frame=-1)
    assert first.shape == (6, 8, 3) and not np.array_equal(first, last)


def test_wrong_channels_or_family_say_what_is_expected():
    with pytest.raises(ValueError, match="16 latent channels"):
        latent_to_rgb(torch.zeros(1, 4, 8, 8), "flux")
    with pytest.raises(ValueError, match="sdxl"):
        latent_to_rgb(torch.zeros(1, 4, 8, 8), "sd9")


def test_preview_jpeg_opens_in_pillow_and_respects_max_side():
    z = torch.randn(1, 4, 64, 96, generator=torch.Generator().manual_seed(2))
    data = preview_jpeg(z, "sd1", max_side=48)
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (48, 32)
    small, w, h = rgb_to_jpeg(latent_to_rgb(z[..., :16, :16], "sd1"), max_side=256)
    assert (w, h) == (16, 16) and Image.open(io.BytesIO(small)).size == (16, 16)


def tiny_taesd_reference(latent_channels: int = 4) -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(16, 16, 16, 16),
                           decoder_block_out_channels=(16, 16, 16, 16)).eval()


@pytest.mark.parametrize("layout", ["diffusers", "taesd_decoder_file", "taesd_full_file"])
def test_taesd_loads_its_real_key_layouts_and_matches_diffusers(layout):
    ref = tiny_taesd_reference()
    sd = {k: v for k, v in ref.state_dict().items()}
    if layout != "diffusers":  # the original files number the decoder's layers from 1 (0 is the clamp)
        prefix = "decoder." if layout == "taesd_full_file" else ""
        sd = {re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"{prefix}{int(m[1]) + 1}.", k): v
              for k, v in sd.items() if k.startswith("decoder.") or layout == "taesd_full_file"}
        assert "1.weight" in sd or "decoder.1.weight" in sd
    ours = TAESD.from_state_dict(sd)
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ours(z)
        theirs = ref.decode(z).sample
    assert out.shape == (1, 3, 48, 40)
    torch.testing.assert_close(out * 2 - 1, theirs, atol=1e-5, rtol=0)
    rgb = ours.to_rgb(z)
    assert rgb.shape == (48, 40, 3) and rgb.dtype == np.uint8
    assert Image.open(io.BytesIO(preview_jpeg(z, "sd1", taesd=ours))).size == (40, 48)


def test_taesd_for_16_channel_latents():
    ours = TAESD.from_state_dict(tiny_taesd_reference(16).state_dict())
    assert ours.to_rgb(torch.randn(1, 16, 4, 4), "flux").shape == (32, 32, 3)


def test_a_file_that_is_not_a_taesd_decoder_is_refused():
    with pytest.raises(ValueError, match="not a TAESD decoder"):
        TAESD.from_state_dict({"encoder.conv_in.weight": torch.zeros(1)})


def test_wan22_48_channel_latents_preview_with_their_own_factors():
    assert len(LATENT_RGB["wan22"][0]) == 48 and all(len(row) == 3 for row in LATENT_RGB["wan22"][0])
    z = torch.zeros(1, 48, 3, 4, 6)
    rgb = latent_to_rgb(z, "wan22", frame=1)  # a zero latent shows the bias colour
    assert rgb.shape == (4, 6, 3)
    bias = torch.tensor(LATENT_RGB["wan22"][1])
    expected = ((bias.clamp(-1, 1) + 1) * 127.5).round()
    assert abs(float(rgb[0, 0, 0]) - float(expected[0])) <= 1
