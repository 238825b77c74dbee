"""Stable Diffusion 3 / 3.5 MMDiT (SD3 medium, SD3.5 large / large turbo / medium with MMDiT-X).

Module names are Stability's original ones (`joint_blocks.0.x_block.attn.qkv.weight`,
`joint_blocks.0.context_block.adaLN_modulation.1.weight`, `x_embedder.proj.weight`, `pos_embed`),
as in their single files and ComfyUI's (under `model.diffusion_model.`). `normalize_state_dict` maps
diffusers' `SD3Transformer2DModel` names onto them: to_q/to_k/to_v fused into qkv, and the (scale,
shift) halves of the final norm and of the last block's text norm swapped back to (shift, scale).

Data flow: the 16-channel latent is cut into 2x2 patches by a conv and gets a fixed 2-D sin-cos position
table (stored in the file, centre-cropped to the image); text tokens (CLIP-L + CLIP-G + T5, (B, S,
4096)) and image tokens attend jointly in every block (image first), each stream with its own weights;
the last block keeps only the image stream. SD3.5 adds RMS QK-norm, and 3.5 medium (MMDiT-X) a second,
image-only self-attention in its first blocks. The timestep (0..1000) and the pooled CLIP-L + CLIP-G
vector (2048) modulate every block.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import UserError
from studio.models.diffusion_quant import build_compact
from studio.models.flux import swap_halves, timestep_embedding
from studio.nn.attention import attention
from studio.nn.packed import QuantWeight


@dataclass(frozen=True)
class SD3Config:
    in_channels: int = 16
    out_channels: int = 16
    patch: int = 2
    hidden: int = 1536
    heads: int = 24
    mlp_hidden: int = 6144
    context_dim: int = 4096
    pooled_dim: int = 2048
    depth: int = 24
    pos_embed_max: int = 192
    qk_norm: bool = False
    dual_layers: tuple[int, ...] = ()  # MMDiT-X: blocks with a second, image-only attention

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def named(cls, name: str) -> SD3Config:
        if name not in CONFIGS:
            raise KeyError(f"unknown SD3 config {name!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[name]

    @classmethod
    def from_state_dict(cls, sd: dict, **overrides) -> SD3Config:
        """Shapes -> config for a state dict in our (Stability) layout; heads are 64 wide in every release."""
        if "x_embedder.proj.weight" not in sd or "joint_blocks.0.x_block.attn.qkv.weight" not in sd:
            raise UserError("bad_model", "This file holds no SD3 transformer (no x_embedder / joint_blocks): pick an "
                            "SD3 or SD3.5 model file.")
        hidden, in_ch, patch, _ = (int(n) for n in sd["x_embedder.proj.weight"].shape)
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k)))
        cfg = cls(
            in_channels=in_ch,
            out_channels=int(sd["final_layer.linear.weight"].shape[0]) // (patch * patch),
            patch=patch,
            hidden=hidden,
            heads=hidden // 64,
            mlp_hidden=int(sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0]),
            context_dim=int(sd["context_embedder.weight"].shape[1]),
            pooled_dim=int(sd["y_embedder.mlp.0.weight"].shape[1]),
            depth=depth,
            pos_embed_max=math.isqrt(int(sd["pos_embed"].shape[1])),
            qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in sd,
            dual_layers=tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd),
        )
        return replace(cfg, **overrides)


CONFIGS: dict[str, SD3Config] = {
    "3-medium": SD3Config(),
    "3.5-large": SD3Config(hidden=2432, heads=38, mlp_hidden=9728, depth=38, qk_norm=True),
    "3.5-medium": SD3Config(pos_embed_max=384, qk_norm=True, dual_layers=tuple(range(13))),
}


# ---------------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight.to(x.dtype)


class Attention(nn.Module):
    """qkv, optional per-head RMS norm (ln_q / ln_k), and the output projection (absent in the last
    block's text stream, whose result is not used)."""

    def __init__(self, cfg: SD3Config, proj: bool = True) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.ln_q = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.ln_k = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.proj = nn.Linear(cfg.hidden, cfg.hidden) if proj else None

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(*self.qkv_heads(x)).transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _mod(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _norm(x) * (1 + scale) + shift


class StreamBlock(nn.Module):
    """One stream's half of a joint block: adaLN modulation, attention projections, MLP.
    pre_only (the last block's text stream): only the modulation and qkv (2 chunks: shift, scale)."""

    def __init__(self, cfg: SD3Config, pre_only: bool = False, dual: bool = False) -> None:
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        chunks = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, chunks * cfg.hidden))
        self.attn = Attention(cfg, proj=not pre_only)
        self.attn2 = Attention(cfg) if dual else None
        self.mlp = None if pre_only else MLP(cfg)


class JointBlock(nn.Module):
    def __init__(self, cfg: SD3Config, last: bool, dual: bool) -> None:
        super().__init__()
        self.context_block = StreamBlock(cfg, pre_only=last)
        self.x_block = StreamBlock(cfg, dual=dual)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        xb, cb = self.x_block, self.context_block
        xm = xb.adaLN_modulation(c)[:, None].chunk(9 if xb.dual else 6, dim=-1)  # each (B, 1, D)
        cm = cb.adaLN_modulation(c)[:, None].chunk(2 if cb.pre_only else 6, dim=-1)
        x_norm = _norm(x)
        xq, xk, xv = xb.attn.qkv_heads(x_norm * (1 + xm[1]) + xm[0])
        cq, ck, cv = cb.attn.qkv_heads(_mod(ctx, cm[0], cm[1]))
        out = attention(torch.cat([xq, cq], 2), torch.cat([xk, ck], 2), torch.cat([xv, cv], 2))
        out = out.transpose(1, 2).flatten(2)  # (B, L + S, D), image tokens first
        x_out, c_out = out[:, :x.shape[1]], out[:, x.shape[1]:]
        x = x + xm[2] * xb.attn.proj(x_out)
        if xb.dual:  # MMDiT-X: image-only attention on the block input, modulated by its own 3 chunks
            x = x + xm[8] * xb.attn2(x_norm * (1 + xm[7]) + xm[6])
        x = x + xm[5] * xb.mlp(_mod(x, xm[3], xm[4]))
        if cb.pre_only:
            return x, None
        ctx = ctx + cm[2] * cb.attn.proj(c_out)
        ctx = ctx + cm[5] * cb.mlp(_mod(ctx, cm[3], cm[4]))
        return x, ctx


class Embedder(nn.Module):
    """Linear, SiLU, Linear (Stability's `mlp.0` / `mlp.2`)."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cin, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden, cfg.patch, stride=cfg.patch)


class FinalLayer(nn.Module):
    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.hidden, cfg.patch * cfg.patch * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(_mod(x, shift, scale))


class SD3Transformer(nn.Module):
    """forward(x (B, C, H, W) latent, t (B,) in 0..1000, context (B, S, 4096), y (B, 2048)) -> velocity like x."""

    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_max ** 2, cfg.hidden), requires_grad=False)
        self.t_embedder = Embedder(256, cfg.hidden)
        self.y_embedder = Embedder(cfg.pooled_dim, cfg.hidden)
        self.context_embedder = nn.Linear(cfg.context_dim, cfg.hidden)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.depth - 1, dual=i in cfg.dual_layers)
                                          for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def stream_blocks(self) -> list[nn.Module]:
        return list(self.joint_blocks)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre h x w of the stored max x max table -> (1, h*w, D)."""
        m = self.cfg.pos_embed_max
        if h > m or w > m:
            side = m * self.cfg.patch * 8
            raise UserError("bad_input", f"This SD3 model makes images up to {side}x{side} pixels: pick a smaller size.")
        top, left = (m - h) // 2, (m - w) // 2
        return self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch
        b, _, height, width = x.shape
        h, w = height // p, width // p
        dtype = self.context_embedder.bias.dtype  # the compute dtype (a packed weight's storage type is not)
        tokens = self.x_embedder.proj(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, h*w, D)
        tokens = tokens + self.cropped_pos_embed(h, w).to(dtype)
        c = self.t_embedder(timestep_embedding(t).to(dtype)) + self.y_embedder(y.to(dtype))  # (B, D)
        ctx = self.context_embedder(context.to(dtype))
        for block in self.joint_blocks:
            tokens, ctx = block(tokens, ctx, c)
        out = self.final_layer(tokens, c)  # (B, h*w, p*p*C)
        out = out.view(b, h, w, p, p, self.cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.cfg.out_channels, h * p, w * p)


# ---------------------------------------------------------------------------------- layouts

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

_PLAIN = {"pos_embed.proj.": "x_embedder.proj.", "proj_out.": "final_layer.linear.",
          "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
          "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
          "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
          "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
          "context_embedder.": "context_embedder."}
_BLOCK = {"norm1.linear.": "x_block.adaLN_modulation.1.", "norm1_context.linear.": "context_block.adaLN_modulation.1.",
          "attn.to_out.0.": "x_block.attn.proj.", "attn.to_add_out.": "context_block.attn.proj.",
          "attn.norm_q.": "x_block.attn.ln_q.", "attn.norm_k.": "x_block.attn.ln_k.",
          "attn.norm_added_q.": "context_block.attn.ln_q.", "attn.norm_added_k.": "context_block.attn.ln_k.",
          "attn2.to_out.0.": "x_block.attn2.proj.", "attn2.norm_q.": "x_block.attn2.ln_q.",
          "attn2.norm_k.": "x_block.attn2.ln_k.",
          "ff.net.0.proj.": "x_block.mlp.fc1.", "ff.net.2.": "x_block.mlp.fc2.",
          "ff_context.net.0.proj.": "context_block.mlp.fc1.", "ff_context.net.2.": "context_block.mlp.fc2."}
_FUSED = (("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
          ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
          ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")))


def strip_prefix(sd: dict) -> dict:
    """The transformer's tensors without a checkpoint prefix (encoders and VAE of a full file left out)."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "x_embedder.") or k.startswith(prefix + "pos_embed.proj.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _plain(t):
    return t.dequantize(torch.bfloat16) if isinstance(t, QuantWeight) else t


def convert_diffusers(sd: dict) -> dict:
    """SD3Transformer2DModel names -> Stability's (q/k/v fused; final and last-block text norms' halves swapped)."""
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    out: dict = {}
    used: set[str] = set()
    for i in range(depth):
        for ours, parts in _FUSED:
            for leaf in ("weight", "bias"):
                keys = [f"transformer_blocks.{i}.{p}.{leaf}" for p in parts]
                if all(k in sd for k in keys):
                    out[f"joint_blocks.{i}.{ours}.{leaf}"] = torch.cat([_plain(sd[k]) for k in keys], dim=0)
                    used.update(keys)
    last = f"transformer_blocks.{depth - 1}.norm1_context.linear."
    for key, t in sd.items():
        if key in used:
            continue
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = t
            continue
        if key.startswith(("norm_out.linear.", last)):
            t = swap_halves(_plain(t))  # diffusers' AdaLayerNormContinuous: (scale, shift)
            if key.startswith("norm_out.linear."):
                out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = t
                continue
        new = None
        if m := re.match(r"transformer_blocks\.(\d+)\.(.*)", key):
            for old, rep in _BLOCK.items():
                if m[2].startswith(old):
                    new = f"joint_blocks.{m[1]}.{rep}{m[2][len(old):]}"
                    break
        else:
            for old, rep in _PLAIN.items():
                if key.startswith(old):
                    new = rep + key[len(old):]
                    break
        out[new or key] = t
    return out


def normalize_state_dict(sd: dict) -> dict:
    """Any supported layout (Stability, ComfyUI-prefixed, diffusers) -> ours (Stability names)."""
    sd = strip_prefix(sd)
    return convert_diffusers(sd) if "pos_embed.proj.weight" in sd else sd


def load_sd3_transformer(sd: dict, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                         config: dict | None = None, **overrides) -> SD3Transformer:
    """Build on the meta device and take the tensors as they are (compact GGUF / fp8 linears stay compact).
    `config`: a diffusers transformer/config.json, for the head count (shapes assume 64-wide heads)."""
    if config:
        from studio.models.diffusers_config import sd3_transformer_settings

        overrides = {**sd3_transformer_settings(config), **overrides}
    sd = normalize_state_dict(sd)
    cfg = SD3Config.from_state_dict(sd, **overrides)
    if cfg.hidden % cfg.heads:
        raise UserError("bad_model", f"{cfg.heads} attention heads do not divide the width {cfg.hidden}: the "
                        "transformer's config.json does not fit its weights.")
    model, missing, unexpected = build_compact(lambda: SD3Transformer(cfg), sd, dtype=dtype, device=device)
    if missing or unexpected:
        raise UserError("bad_model", "The weights do not fit an SD3 transformer (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}): the file is damaged or of another kind.")
    return model
