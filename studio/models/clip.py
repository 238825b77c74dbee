"""CLIP text encoders: CLIP-L/14 (SD1, SDXL), OpenCLIP-H (SD2), OpenCLIP-G/14 (SDXL).

Module names follow Hugging Face's CLIPTextModel / CLIPTextModelWithProjection
(`text_model.encoder.layers.0.self_attn.q_proj.weight`, `text_projection.weight`), so diffusers
`text_encoder/` folders load directly. Single-file checkpoints hold either the same names under a
prefix (SD1 `cond_stage_model.transformer.`, SDXL `conditioner.embedders.0.transformer.`) or the
OpenCLIP layout (SD2 `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`), which
`to_ours` converts (fused in_proj split into q/k/v, text_projection transposed).

Layer selection uses the A1111 "clip skip" convention: 1 = last layer, 2 = penultimate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from studio.models.loader import build_on_meta
from studio.nn.attention import attention


@dataclass(frozen=True)
class ClipConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    projection_dim: int = 0  # 0: no text_projection (CLIPTextModel); SDXL's CLIP-G has 1280
    activation: str = "quick_gelu"  # OpenAI CLIP-L; the OpenCLIP models use "gelu"
    eos_token_id: int = 49407
    eps: float = 1e-5

    @classmethod
    def named(cls, name: str) -> ClipConfig:
        if name not in CONFIGS:
            raise KeyError(f"unknown CLIP config {name!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[name]

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **overrides) -> ClipConfig:
        """Shapes -> config, for a state dict in our layout (run `to_ours` first).

        Heads are 64 wide in every released CLIP text tower; the activation follows the width
        (768 is OpenAI's CLIP-L with quick_gelu, the OpenCLIP H/G towers use gelu).
        """
        emb = sd.get("text_model.embeddings.token_embedding.weight")
        if emb is None:
            raise ValueError("not a CLIP text encoder state dict (no token embedding)")
        width = emb.shape[1]
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
        proj = sd.get("text_projection.weight")
        cfg = cls(
            vocab_size=emb.shape[0],
            max_positions=sd["text_model.embeddings.position_embedding.weight"].shape[0],
            width=width,
            layers=layers,
            heads=width // 64,
            intermediate=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            projection_dim=0 if proj is None else proj.shape[0],
            activation="quick_gelu" if width == 768 else "gelu",
        )
        return replace(cfg, **overrides)

    @classmethod
    def from_hf_config(cls, config: dict) -> ClipConfig:
        """From a transformers `text_encoder/config.json` (CLIPTextConfig fields)."""
        c = config.get("text_config", config)
        return cls(
            vocab_size=c.get("vocab_size", 49408),
            max_positions=c.get("max_position_embeddings", 77),
            width=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"],
            intermediate=c["intermediate_size"],
            projection_dim=c.get("projection_dim", 0) if "CLIPTextModelWithProjection" in config.get(
                "architectures", []) else 0,
            activation=c.get("hidden_act", "quick_gelu"),
            eos_token_id=c.get("eos_token_id", 49407) if c.get("eos_token_id", 49407) != 2 else 49407,
            eps=c.get("layer_norm_eps", 1e-5),
        )


CONFIGS: dict[str, ClipConfig] = {
    "clip_l": ClipConfig(),
    "openclip_h": ClipConfig(width=1024, layers=24, heads=16, intermediate=4096, activation="gelu"),
    "openclip_g": ClipConfig(width=1280, layers=32, heads=20, intermediate=5120, projection_dim=1280,
                             activation="gelu"),
}

# Where the released single-file checkpoints keep their text encoders.
PREFIXES = {
    "sd1": "cond_stage_model.transformer.",
    "sd2": "cond_stage_model.model.",
    "sdxl_l": "conditioner.embedders.0.transformer.",
    "sdxl_g": "conditioner.embedders.1.model.",
    "sdxl_refiner_g": "conditioner.embedders.0.model.",
}

# ------------------------------------------------------------------------------------------- modules


class Embeddings(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class SelfAttention(nn.Module):
    """CLIP attention. The text tower is causal; the vision tower (clip_vision.py) attends both ways.

    `cfg` is any config with width, heads (ClipConfig or ClipVisionConfig)."""

    def __init__(self, cfg, causal: bool = True) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.causal = causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = attention(q, k, v, causal=self.causal)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.width)
        self.quick = cfg.activation == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg, causal: bool = True) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg, causal: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg, causal) for _ in range(cfg.layers)])


class TextTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class ClipTextModel(nn.Module):
    """forward(tokens (B, T)) -> (hidden (B, T, C) of the chosen layer, pooled (B, C or P))."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    def forward(
        self,
        tokens: torch.Tensor,
        clip_skip: int = 1,
        final_norm: bool = True,
        pooled: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states after layer `layers - clip_skip + 1` and the pooled EOS feature.

        clip_skip 1 = last layer, 2 = penultimate (A1111's setting). `final_norm` applies the
        final LayerNorm to the returned hidden states: SD1/SD2 do (A1111, the SD2 OpenCLIP
        embedder), SDXL does not (diffusers StableDiffusionXLPipeline takes hidden_states[-2]).
        pooled: final LayerNorm of the last layer at the first EOS, then text_projection if the
        model has one (SDXL's CLIP-G `text_embeds`); None when `pooled=False` (saves layers).
        """
        tm = self.text_model
        n = len(tm.encoder.layers)
        if not 1 <= clip_skip <= n:
            raise ValueError(f"clip_skip must be between 1 and {n}, got {clip_skip}")
        keep = n - clip_skip + 1  # layers to run for the returned hidden states
        x = tm.embeddings(tokens)  # (B, T, C)
        hidden = None
        for i, layer in enumerate(tm.encoder.layers):
            if i == keep:
                hidden = x
                if not pooled:
                    break
            x = layer(x)
        if hidden is None:
            hidden = x
        if final_norm:
            hidden = tm.final_layer_norm(hidden)
        if not pooled:
            return hidden, None
        last = tm.final_layer_norm(x) if (keep != n or not final_norm) else hidden
        pool = last[torch.arange(tokens.shape[0], device=tokens.device), self.eos_index(tokens)]  # (B, C)
        if self.text_projection is not None:
            pool = self.text_projection(pool)
        return hidden, pool

    def eos_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """First EOS per row; rows without one (truncated input) pool at the highest id, as CLIP did."""
        is_eos = tokens == self.config.eos_token_id
        first = is_eos.int().argmax(dim=-1)
        return torch.where(is_eos.any(dim=-1), first, tokens.argmax(dim=-1))


# ------------------------------------------------------------------------------------------- loading


def find_text_encoders(sd: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes of every CLIP text encoder in `sd` (HF or OpenCLIP layout), in key order."""
    found = []
    for k in sd:
        if k.endswith("embeddings.token_embedding.weight"):
            root = k[: -len("embeddings.token_embedding.weight")]
            found.append(root.removesuffix("text_model."))
        elif k.endswith("token_embedding.weight") and k[: -len("token_embedding.weight")] + (
                "transformer.resblocks.0.attn.in_proj_weight") in sd:
            found.append(k[: -len("token_embedding.weight")])
    return found


def to_ours(sd: dict[str, torch.Tensor], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The text encoder under `prefix` (default: the only one found) in our names.

    HF layouts: `text_model.embeddings...` (transformers 4 saves, every released diffusers folder
    and single file) and bare `embeddings...` (CLIPTextModel saved by transformers 5).
    """
    if prefix is None:
        found = find_text_encoders(sd)
        if len(found) != 1:
            raise ValueError(f"expected one CLIP text encoder, found {len(found)} ({found}): pass a prefix")
        prefix = found[0]
    part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "token_embedding.weight" in part:
        return _from_openclip(part)
    bare = "embeddings.token_embedding.weight" in part
    out = {}
    for k, v in part.items():
        if k.endswith("position_ids"):
            continue  # a buffer older transformers saved
        if bare and k.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            out["text_model." + k] = v
        elif k.startswith(("text_model.", "text_projection.")):
            out[k] = v
    return out


_OPENCLIP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}


def _from_openclip(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "text_model.embeddings.token_embedding.weight": part["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": part["positional_embedding"],
        "text_model.final_layer_norm.weight": part["ln_final.weight"],
        "text_model.final_layer_norm.bias": part["ln_final.bias"],
    }
    if "text_projection" in part:
        out["text_projection.weight"] = part["text_projection"].t().contiguous()  # OpenCLIP does x @ P
    for k, v in part.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            continue  # logit_scale, attn_mask and the like carry no text-tower weights
        layer, name, kind = m.groups()
        base = f"text_model.encoder.layers.{layer}."
        if name == "attn" and k.endswith(("in_proj_weight", "in_proj_bias")):
            continue
        out[base + _OPENCLIP.get(name, name) + "." + kind] = v
    for k, v in part.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k)
        if m:
            q, kk, vv = v.chunk(3, dim=0)  # in_proj stacks q, k, v along the output dim
            base = f"text_model.encoder.layers.{m.group(1)}.self_attn."
            out[base + "q_proj." + m.group(2)] = q
            out[base + "k_proj." + m.group(2)] = kk
            out[base + "v_proj." + m.group(2)] = vv
    return out


def to_openclip(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our names -> OpenCLIP names (q/k/v fused into in_proj), for writing single-file checkpoints."""
    inverse = {v: k for k, v in _OPENCLIP.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            fused.setdefault(f"transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}", {})[m.group(2)] = v
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k):
            out[f"transformer.resblocks.{m.group(1)}.{inverse.get(m.group(2), m.group(2))}.{m.group(3)}"] = v
    for k, parts in fused.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return {prefix + k: v for k, v in out.items()}


def build_clip(
    sd: dict[str, torch.Tensor],
    prefix: str | None = None,
    cfg: ClipConfig | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> ClipTextModel:
    """Build on the meta device and load the encoder under `prefix` with assign=True."""
    ours = to_ours(sd, prefix)
    cfg = cfg or ClipConfig.from_state_dict(ours, **overrides)
    model, missing, unexpected = build_on_meta(lambda: ClipTextModel(cfg), ours, dtype=dtype)
    if missing or unexpected:
        raise ValueError(f"CLIP weights do not match the model shape: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model
