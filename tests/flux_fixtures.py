"""Tiny random Flux parts (diffusers / transformers references) written in the layouts people download.

The BFL names are written by hand here from diffusers' own (not with studio.models.flux's converter),
so loading them checks the converter against an independent mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.video_fixtures import WORDS, jiggle, write_tokenizer

HEADS, HEAD_DIM, AXES = 2, 16, (4, 6, 6)
T5_DIM, CLIP_DIM = 32, 64


def tiny_transformer(guidance: bool, seed: int = 0, in_channels: int = 64, layers: int = 2, head_dim: int = HEAD_DIM,
                     axes: tuple[int, ...] = AXES, out_channels: int = 64):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    net = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=layers, num_single_layers=layers,
                                 attention_head_dim=head_dim, num_attention_heads=HEADS, joint_attention_dim=T5_DIM,
                                 pooled_projection_dim=CLIP_DIM, guidance_embeds=guidance, axes_dims_rope=axes,
                                 out_channels=out_channels)
    jiggle(net, 0.1)
    return net.eval()


def tiny_vae(seed: int = 1, scaling: float = 0.3611, shift: float = 0.1159):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=scaling, shift_factor=shift)
    jiggle(vae, 0.02)
    return vae.eval()


def tiny_clip(seed: int = 2):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=CLIP_DIM, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                                      hidden_act="gelu", eos_token_id=2)
    enc = transformers.CLIPTextModel(cfg)
    jiggle(enc, 0.05)
    return enc.eval()


def tiny_t5(seed: int = 3):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=len(WORDS) + 3, d_model=T5_DIM, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    enc = transformers.T5EncoderModel(cfg)
    jiggle(enc, 0.1)
    return enc.eval()


def tiny_scheduler(guidance: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if guidance:  # FLUX.1-dev's scheduler_config.json
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


# ------------------------------------------------------------------------------------------ layouts

_PLAIN = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
          "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
          "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
          "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
          "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
          "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
          "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> Black Forest Labs' original names."""
    out: dict[str, torch.Tensor] = {}
    g = sd.get
    for old, new in _PLAIN.items():
        for leaf in ("weight", "bias"):
            if f"{old}.{leaf}" in sd:
                out[f"{new}.{leaf}"] = sd[f"{old}.{leaf}"]
    for leaf in ("weight", "bias"):
        shift_scale = sd[f"norm_out.linear.{leaf}"].chunk(2)  # diffusers (scale, shift) -> BFL (shift, scale)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift_scale[1], shift_scale[0]])
    doubles = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(doubles):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            for old, new in _DOUBLE.items():
                out[f"{q}{new}.{leaf}"] = sd[f"{p}{old}.{leaf}"]
            out[f"{q}img_attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn.to_{c}.{leaf}"] for c in "qkv"])
            out[f"{q}txt_attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn.add_{c}_proj.{leaf}"] for c in "qkv"])
        for old, new in _DOUBLE_NORMS.items():
            out[f"{q}{new}.scale"] = sd[f"{p}{old}.weight"]
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{q}linear1.{leaf}"] = torch.cat([g(f"{p}attn.to_q.{leaf}"), g(f"{p}attn.to_k.{leaf}"),
                                                   g(f"{p}attn.to_v.{leaf}"), g(f"{p}proj_mlp.{leaf}")])
            out[f"{q}linear2.{leaf}"] = sd[f"{p}proj_out.{leaf}"]
            out[f"{q}modulation.lin.{leaf}"] = sd[f"{p}norm.linear.{leaf}"]
        out[f"{q}norm.query_norm.scale"] = sd[f"{p}attn.norm_q.weight"]
        out[f"{q}norm.key_norm.scale"] = sd[f"{p}attn.norm_k.weight"]
    return out


def save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))  # no shared storage
    return path


def build_flux_folder(root: Path, guidance: bool = True, **transformer) -> Path:
    """A diffusers-layout Flux folder of tiny random parts (tokenizer/ is left to the bundled CLIP vocabulary)."""
    tiny_transformer(guidance, **transformer).save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    tiny_clip().save_pretrained(root / "text_encoder")
    tiny_t5().save_pretrained(root / "text_encoder_2")
    write_tokenizer(root / "tokenizer_2" / "tokenizer.json")
    tiny_scheduler(guidance).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


def build_comfy_tree(root: Path, guidance: bool = True, prefix: str = "model.diffusion_model.") -> Path:
    """ComfyUI's models/ folders: unet/flux.safetensors (BFL names under `prefix`), vae/ae.safetensors,
    text_encoders/clip_l.safetensors and t5xxl.safetensors (with the T5 tokenizer.json beside them).
    Returns the transformer file."""
    from studio.models.vae import to_ldm_vae

    net = tiny_transformer(guidance)
    model = save({prefix + k: v for k, v in to_bfl(net.state_dict()).items()}, root / "unet" / "flux.safetensors")
    save(to_ldm_vae(tiny_vae().state_dict(), up_levels=2), root / "vae" / "ae.safetensors")
    save(tiny_clip().state_dict(), root / "text_encoders" / "clip_l.safetensors")
    save(tiny_t5().state_dict(), root / "text_encoders" / "t5xxl.safetensors")
    write_tokenizer(root / "text_encoders" / "tokenizer.json")
    return model
