"""Tiny Stable Diffusion checkpoints written in the real single-file (LDM) key layouts.

Random weights at toy sizes: the pipeline, loaders, LoRA and metadata paths run for real in
seconds on a CPU. Parity of each module with diffusers is pinned in test_unet/test_vae/test_clip.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.models.clip import ClipConfig, ClipTextModel, to_openclip
from studio.models.unet import UNet, UNetConfig
from studio.models.unet_convert import to_ldm
from studio.models.vae import AutoencoderKL, VAEConfig
from studio.models.vae import to_ldm_vae as vae_to_ldm

TINY_CLIP = ClipConfig(width=64, layers=2, heads=1, intermediate=128)


def _clip(seed: int, activation: str = "quick_gelu", projection: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = ClipTextModel(ClipConfig(width=64, layers=2, heads=1, intermediate=128, activation=activation,
                                     projection_dim=projection))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _vae(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    # 4 levels: a real KL-f8 downscale, so 64-pixel test images are 8x8 latents (fast on a CPU)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1))
    return {"first_stage_model." + k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), 4).items()}


def _unet(cfg: UNetConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    unet = UNet(cfg)
    with torch.no_grad():  # default init zeroes nothing out, but make the output layer matter
        unet.conv_out.weight.mul_(5)
    attention = [d > 0 for d in cfg.transformer_depth]
    return {k: v.contiguous() for k, v in to_ldm(unet.state_dict(), len(cfg.block_channels), cfg.layers_per_block,
                                                   attention).items()}


def tiny_sd1(path: Path, seed: int = 0, in_channels: int = 4) -> Path:
    """SD1-style: conv projections, 8 heads, CLIP-L layout under cond_stage_model.transformer."""
    cfg = UNetConfig(in_channels=in_channels, block_channels=(32, 64), layers_per_block=1, transformer_depth=(1, 0),
                     transformer_depth_mid=1, num_heads=8, context_dim=64)
    sd = {**_unet(cfg, seed), **_vae(seed + 1)}
    sd.update({"cond_stage_model.transformer." + k: v for k, v in _clip(seed + 2).items()})
    save_file(sd, str(path))
    return path


def tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """SDXL-style: CLIP-L (HF layout) + OpenCLIP-G (OpenCLIP layout, projection), text_time embedding."""
    pooled = 64
    cfg = UNetConfig(block_channels=(64, 128), layers_per_block=1, transformer_depth=(0, 1), transformer_depth_mid=1,
                     num_heads=None, head_dim=64, context_dim=128, use_linear_projection=True,
                     adm_in_channels=pooled + 6 * 256)
    sd = {**_unet(cfg, seed), **_vae(seed + 1)}
    sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in _clip(seed + 2).items()})
    sd.update(to_openclip(_clip(seed + 3, "gelu", projection=pooled), prefix="conditioner.embedders.1.model."))
    save_file(sd, str(path))
    return path


def tiny_lora(path: Path, rank: int = 4, seed: int = 5, kohya: bool = True) -> Path:
    """A LoRA on the SD1 tiny model's first attention's q projection and the CLIP's first q_proj."""
    torch.manual_seed(seed)
    if kohya:
        sd = {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(rank, 32),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, rank),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(float(rank)),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(rank, 64),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(64, rank),
        }
    else:
        sd = {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(rank, 32),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, rank),
        }
    save_file(sd, str(path))
    return path
