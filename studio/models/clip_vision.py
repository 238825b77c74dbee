"""CLIP ViT image encoder: the image half of CLIP, as Wan 2.1 I2V / FLF2V use it.

Wan 2.1 I2V conditions its transformer on the penultimate layer's hidden states of OpenCLIP ViT-H/14
(32 layers, width 1280, 16 heads, patch 14, 224 px: (B, 257, 1280), the class token first). Module names
follow Hugging Face's CLIPVisionModel (`embeddings.patch_embedding.weight`, `encoder.layers.N.self_attn.q_proj`,
`pre_layrnorm`, `post_layernorm`), so diffusers `image_encoder/` folders and ComfyUI's
`clip_vision_h.safetensors` (the same names under `vision_model.`) load directly. `to_ours` also converts
the OpenCLIP layout (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`, as ComfyUI
converts it) and the Wan repository's own `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`
(`visual.patch_embedding.weight`, `visual.transformer.N.attn.to_qkv.weight`).

Preprocessing is CLIPImageProcessor's: shortest side to 224 (PIL bicubic), centre crop, scale to [0, 1],
normalise with the OpenAI CLIP mean and std.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from studio.models.clip import Encoder
from studio.models.loader import build_on_meta

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Head counts by width: the state dict does not say. ViT-B/16 12, ViT-L/14 16, ViT-H/14 16 (80 wide),
# ViT-bigG/14 16 (104 wide).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}


@dataclass(frozen=True)
class ClipVisionConfig:
    width: int = 1280
    layers: int = 32
    heads: int = 16
    patch: int = 14
    image_size: int = 224
    intermediate: int = 5120
    activation: str = "gelu"  # the OpenCLIP towers (H, bigG); OpenAI's ViT-L/14 uses quick_gelu
    eps: float = 1e-5

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1  # patches plus the class token

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **overrides) -> ClipVisionConfig:
        """Shapes -> config, for a state dict in our layout (run `to_ours` first)."""
        patch_w = sd.get("embeddings.patch_embedding.weight")
        if patch_w is None:
            raise ValueError("not a CLIP vision state dict (no patch embedding)")
        width, patch = patch_w.shape[0], patch_w.shape[-1]
        tokens = sd["embeddings.position_embedding.weight"].shape[0]
        side = math.isqrt(tokens - 1)
        if side * side != tokens - 1:
            raise ValueError(f"CLIP vision position embedding has {tokens} rows: not a square grid plus a class token")
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
        cfg = cls(width=width, layers=layers, heads=HEADS_BY_WIDTH.get(width, max(1, width // 64)), patch=patch,
                  image_size=side * patch, intermediate=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                  activation="quick_gelu" if (width, layers) == (1024, 24) else "gelu")
        return replace(cfg, **overrides)

    @classmethod
    def from_hf_config(cls, config: dict) -> ClipVisionConfig:
        """From a transformers `image_encoder/config.json` (CLIPVisionConfig fields, or a CLIPConfig)."""
        c = config.get("vision_config", config)
        return cls(width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                   patch=c["patch_size"], image_size=c["image_size"], intermediate=c["intermediate_size"],
                   activation=c.get("hidden_act", "quick_gelu"), eps=c.get("layer_norm_eps", 1e-5))


VIT_H_14 = ClipVisionConfig()  # Wan 2.1 I2V's image encoder

# ------------------------------------------------------------------------------------------- preprocessing


def preprocess(images, size: int = 224) -> torch.Tensor:
    """PIL images (or one) -> (B, 3, size, size) float32 pixel values, as CLIPImageProcessor makes them.

    The shortest side goes to `size` (the long side scaled and truncated, as transformers does), PIL
    bicubic on 8-bit RGB, then a centre crop (top/left rounded down) and (x / 255 - mean) / std.
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy()))  # (3, S, S)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------- modules


class Embeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + N, C)


class ClipVisionModel(nn.Module):
    """forward(pixels (B, 3, S, S), layers) -> hidden states after that many layers (B, T, C).

    `layers=0` is the embeddings after pre_layrnorm, as transformers' hidden_states[0]; the default
    (None) runs every layer. `encode` is Wan's choice, the penultimate layer (hidden_states[-2]).
    """

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # sic: Hugging Face's spelling
        self.encoder = Encoder(cfg, causal=False)  # the same layers as CLIP's text tower, unmasked
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # pools the class token; Wan does not use it

    def forward(self, pixels: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        n = len(self.encoder.layers)
        layers = n if layers is None else layers
        if not 0 <= layers <= n:
            raise ValueError(f"layers must be between 0 and {n}, got {layers}")
        x = self.pre_layrnorm(self.embeddings(pixels))  # (B, T, C)
        for layer in self.encoder.layers[:layers]:
            x = layer(x)
        return x

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate hidden states (B, 257, 1280 for ViT-H/14): Wan's `image_context`."""
        return self.forward(pixels, len(self.encoder.layers) - 1)

    def encode_images(self, images) -> torch.Tensor:
        """PIL image(s) -> penultimate hidden states, preprocessed for this model's input size."""
        weight = self.embeddings.patch_embedding.weight
        pixels = preprocess(images, self.config.image_size).to(weight.device, weight.dtype)
        return self.encode(pixels)


# ------------------------------------------------------------------------------------------- loading

_OPENCLIP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
_WAN = {"norm1": "layer_norm1", "norm2": "layer_norm2", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
        "attn.proj": "self_attn.out_proj"}


def find_layout(keys) -> tuple[str, str] | None:
    """(layout, prefix) of the CLIP vision tower among these tensor names, or None.

    layout is "hf" (`...embeddings.patch_embedding.weight`), "openclip" (`...conv1.weight` beside
    `transformer.resblocks.0.attn.in_proj_weight`) or "wan" (`...patch_embedding.weight` beside
    `transformer.0.attn.to_qkv.weight`). Only the key names are read, so a file header is enough.
    """
    keys = set(keys)
    for k in sorted(keys):
        if k.endswith("embeddings.patch_embedding.weight"):
            p = k[: -len("embeddings.patch_embedding.weight")]
            if p + "encoder.layers.0.self_attn.q_proj.weight" in keys:
                return "hf", p
        elif k.endswith("conv1.weight"):
            p = k[: -len("conv1.weight")]
            if p + "transformer.resblocks.0.attn.in_proj_weight" in keys and p + "class_embedding" in keys:
                return "openclip", p
        elif k.endswith("patch_embedding.weight"):
            p = k[: -len("patch_embedding.weight")]
            if p + "transformer.0.attn.to_qkv.weight" in keys and p + "cls_embedding" in keys:
                return "wan", p
    return None


def to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP vision tower of `sd`, in our (transformers CLIPVisionModel) names; other towers and
    projection heads are left out."""
    found = find_layout(sd)
    if found is None:
        raise ValueError("no CLIP vision tower in these weights (no patch embedding with encoder layers)")
    layout, prefix = found
    part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if layout == "hf":
        keep = ("embeddings.class_embedding", "embeddings.patch_embedding.", "embeddings.position_embedding.",
                "pre_layrnorm.", "encoder.layers.", "post_layernorm.")
        return {k: v for k, v in part.items() if k.startswith(keep)}
    if layout == "openclip":
        out = {"embeddings.class_embedding": part["class_embedding"],
               "embeddings.patch_embedding.weight": part["conv1.weight"],
               "embeddings.position_embedding.weight": part["positional_embedding"]}
        norms = {"ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"}
        # nn.MultiheadAttention names its fused projection in_proj_weight / in_proj_bias
        part = {re.sub(r"\.in_proj_(weight|bias)$", r".in_proj.\1", k): v for k, v in part.items()}
        blocks, table, fused = r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", _OPENCLIP, "attn.in_proj"
    else:
        out = {"embeddings.class_embedding": part["cls_embedding"].reshape(-1),  # (1, 1, C) -> (C,)
               "embeddings.patch_embedding.weight": part["patch_embedding.weight"],
               "embeddings.position_embedding.weight": part["pos_embedding"].reshape(
                   part["pos_embedding"].shape[-2:])}  # (1, T, C) -> (T, C)
        norms = {"pre_norm": "pre_layrnorm", "post_norm": "post_layernorm"}
        blocks, table, fused = r"transformer\.(\d+)\.(.+)\.(weight|bias)$", _WAN, "attn.to_qkv"
    for src, dst in norms.items():
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in part:
                out[f"{dst}.{kind}"] = part[f"{src}.{kind}"]
    for k, v in part.items():
        m = re.match(blocks, k)
        if not m:
            continue  # heads, projections, logit scales: not part of the tower's hidden states
        layer, name, kind = m.groups()
        base = f"encoder.layers.{layer}."
        if name == fused:
            q, kk, vv = v.chunk(3, dim=0)  # q, k, v stacked along the output dim
            for proj, t in (("q_proj", q), ("k_proj", kk), ("v_proj", vv)):
                out[f"{base}self_attn.{proj}.{kind}"] = t
        elif name in table:
            out[f"{base}{table[name]}.{kind}"] = v
    return out


def build_clip_vision(sd: dict[str, torch.Tensor], cfg: ClipVisionConfig | None = None,
                      dtype: torch.dtype | None = None, **overrides) -> ClipVisionModel:
    """Build on the meta device and load with assign=True. `cfg` (from a config.json) wins over shapes."""
    ours = to_ours(sd)
    cfg = cfg or ClipVisionConfig.from_state_dict(ours, **overrides)
    model, missing, unexpected = build_on_meta(lambda: ClipVisionModel(cfg), ours, dtype=dtype)
    # post_layernorm only pools the class token, which Wan never reads: files without it still load
    needed = [k for k in missing if not k.startswith("post_layernorm.")]
    if needed or unexpected:
        raise ValueError(f"CLIP vision weights do not match the model shape: missing {needed[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if missing:
        model.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps, dtype=dtype)
    return model
