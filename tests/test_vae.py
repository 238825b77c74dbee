"""Native AutoencoderKL against diffusers on tiny random configs, in the diffusers and LDM layouts."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKL as RefVAE
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from studio.engine.context import UserError
from studio.models.vae import FAMILY_SCALING, VAEConfig, convert_ldm_vae, load_vae
from studio.models.vae import to_ldm_vae as to_ldm


def tiny_reference(latent_channels: int = 4, quant: bool = True, seed: int = 0) -> RefVAE:
    torch.manual_seed(seed)
    ref = RefVAE(
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    ).eval()
    with torch.no_grad():  # make norms and biases non-trivial so a wrong mapping cannot hide
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return ref




def assert_parity(ours, ref, x: torch.Tensor) -> None:
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=0)
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("latent_channels,quant", [(4, True), (16, False)])
def test_matches_diffusers_in_the_diffusers_layout(latent_channels, quant):
    ref = tiny_reference(latent_channels, quant)
    ours = load_vae(ref.state_dict(), family="sd1" if latent_channels == 4 else "flux")
    assert ours.cfg.block_out_channels == (32, 64) and ours.cfg.layers_per_block == 1
    assert ours.cfg.latent_channels == latent_channels and ours.cfg.use_quant_conv == quant
    x = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert_parity(ours, ref, x)


def test_ldm_layout_converts_to_what_diffusers_converts_it_to():
    ref = tiny_reference()
    ldm = to_ldm(ref.state_dict(), up_levels=2)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    theirs = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    ours = convert_ldm_vae(ldm)
    assert set(ours) == set(theirs) == set(ref.state_dict())
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0)


@pytest.mark.parametrize("prefix", ["first_stage_model.", ""])
def test_ldm_checkpoint_and_standalone_vae_file_load_and_match_diffusers(prefix):
    ref = tiny_reference(seed=3)
    ldm = {prefix + k: v for k, v in to_ldm(ref.state_dict(), up_levels=2).items()}
    if prefix:  # a full checkpoint also holds the UNet and text encoder
        ldm["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4)
        ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(77)
    ours = load_vae(ldm, family="sdxl")
    assert ours.cfg.scaling_factor == 0.13025
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert_parity(ours, ref, x)


def test_old_diffusers_attention_names_load():
    ref = tiny_reference()
    old = {re.sub(r"\.to_q\.", ".query.", re.sub(r"\.to_out\.0\.", ".proj_attn.", k)): v
           for k, v in ref.state_dict().items()}
    assert any(".query." in k for k in old)
    ours = load_vae(old)
    assert_parity(ours, ref, torch.zeros(1, 3, 16, 16))


def test_weights_are_taken_without_copy():
    ref = tiny_reference()
    sd = ref.state_dict()
    ours = load_vae(sd)
    assert ours.encoder.conv_in.weight.data_ptr() == sd["encoder.conv_in.weight"].data_ptr()


def test_latent_scaling_per_family_round_trips():
    assert FAMILY_SCALING["sd1"] == (0.18215, 0.0) and FAMILY_SCALING["sdxl"] == (0.13025, 0.0)
    assert FAMILY_SCALING["sd3"] == (1.5305, 0.0609) and FAMILY_SCALING["flux"] == (0.3611, 0.1159)
    ours = load_vae(tiny_reference(16, False).state_dict(), family="sd3")
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(ours.to_latent(z), (z - 0.0609) * 1.5305)
    torch.testing.assert_close(ours.from_latent(ours.to_latent(z)), z)


def test_published_family_configs():
    sdxl = VAEConfig.for_family("sdxl")
    assert sdxl.block_out_channels == (128, 256, 512, 512) and sdxl.latent_channels == 4 and sdxl.use_quant_conv
    flux = VAEConfig.for_family("flux")
    assert flux.latent_channels == 16 and not flux.use_quant_conv and flux.shift_factor == 0.1159
    with pytest.raises(ValueError, match="sdxl"):
        VAEConfig.for_family("sd9")


def test_a_file_without_vae_weights_is_refused_with_a_clear_message():
    with pytest.raises(UserError, match="no KL VAE weights"):
        load_vae({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)})
    sd = tiny_reference().state_dict()
    del sd["decoder.conv_out.bias"]
    with pytest.raises(UserError, match="do not fit"):
        load_vae(sd)
