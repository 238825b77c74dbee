"""Flux.1 (dev, schnell, and the Fill / Kontext variants' transformer): an MMDiT over packed latents.

The module names are Black Forest Labs' original ones (`double_blocks.0.img_attn.qkv.weight`,
`single_blocks.0.linear1.weight`, `final_layer.adaLN_modulation.1.weight`), the layout most files
people download use (BFL's own, ComfyUI's under `model.diffusion_model.`, city96's GGUFs).
`normalize_state_dict` maps diffusers' `FluxTransformer2DModel` names onto it: separate to_q/to_k/to_v
are fused into one qkv, a single block's q/k/v and proj_mlp into linear1, and the final norm's
(scale, shift) halves are swapped back to BFL's (shift, scale).

Data flow: the 16-channel latent (B, 16, H/8, W/8) is packed into 2x2 patches, (B, L, 64); text
tokens (T5-XXL, (B, S, 4096)) and image tokens run through `double` blocks (separate weights per
stream, one joint attention), then concatenated through `single` blocks (one stream, attention and
MLP in parallel). A vector from the timestep, the pooled CLIP-L feature and (dev) the guidance
value modulates every block. RoPE runs over 3 position axes (index, row, column).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import UserError
from studio.models.diffusion_quant import build_compact
from studio.nn.attention import attention
from studio.nn.packed import QuantWeight


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64  # 16 latent channels x 2x2 patch (Fill: + 320 for mask and masked image)
    out_channels: int = 64
    hidden: int = 3072
    heads: int = 24
    mlp_hidden: int = 12288
    context_dim: int = 4096  # T5-XXL width
    vec_dim: int = 768  # pooled CLIP-L width
    double_layers: int = 19
    single_layers: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0
    guidance_embed: bool = True  # dev: guidance is an input; schnell: no guidance_in
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def named(cls, name: str) -> FluxConfig:
        if name not in CONFIGS:
            raise KeyError(f"unknown Flux config {name!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[name]

    @classmethod
    def from_state_dict(cls, sd: dict, **overrides) -> FluxConfig:
        """Shapes -> config for a state dict in our (BFL) layout."""
        if "img_in.weight" not in sd or "double_blocks.0.img_attn.qkv.weight" not in sd:
            raise UserError("bad_model", "This file holds no Flux transformer (no img_in / double_blocks): pick a "
                            "Flux.1 model file.")
        hidden, in_ch = (int(n) for n in sd["img_in.weight"].shape)
        head_dim = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
        cfg = cls(
            in_channels=in_ch,
            out_channels=int(sd["final_layer.linear.weight"].shape[0]),
            hidden=hidden,
            heads=hidden // head_dim,
            mlp_hidden=int(sd["double_blocks.0.img_mlp.0.weight"].shape[0]),
            context_dim=int(sd["txt_in.weight"].shape[1]),
            vec_dim=int(sd["vector_in.in_layer.weight"].shape[1]),
            double_layers=_count(sd, "double_blocks"),
            single_layers=_count(sd, "single_blocks"),
            axes_dim=default_axes(head_dim),
            guidance_embed="guidance_in.in_layer.weight" in sd,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
        )
        return replace(cfg, **overrides)


def default_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE widths per axis (index, row, column): Flux's (16, 56, 56) for 128-wide heads, the same
    proportions (even widths) for others; a diffusers config's axes_dims_rope wins over this."""
    if head_dim == 128:
        return (16, 56, 56)
    side = int(head_dim * 56 / 128 / 2) * 2
    return (head_dim - 2 * side, side, side)


def _count(sd: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return 1 + max(found) if found else 0


CONFIGS: dict[str, FluxConfig] = {
    "dev": FluxConfig(),
    "schnell": FluxConfig(guidance_embed=False),
    "tiny": FluxConfig(hidden=32, heads=2, mlp_hidden=128, context_dim=32, vec_dim=16, double_layers=2,
                       single_layers=2, axes_dim=(4, 6, 6)),
}


# ---------------------------------------------------------------------------------- pieces

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """t (B,) already scaled by 1000 -> (B, dim) [cos | sin], float32."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(max_period)) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """ids (L, n_axes) positions -> (L, head_dim/2, 2, 2) rotation matrices, float32 (float64 angles
    as BFL computes them: positions reach thousands; on the CPU where the device has no float64, as MPS)."""
    device = ids.device
    work = torch.device("cpu") if device.type == "mps" else device
    out = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=work) / d)
        ang = ids[:, i].to(work, torch.float64)[:, None] * omega[None]  # (L, d/2)
        out.append(torch.stack([torch.cos(ang), -torch.sin(ang), torch.sin(ang), torch.cos(ang)], dim=-1))
    return torch.cat(out, dim=1).unflatten(-1, (2, 2)).float().to(device)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D): adjacent pairs (x[2i], x[2i+1]) rotated by pe (L, D/2, 2, 2)."""
    xf = x.float().unflatten(-1, (-1, 1, 2))  # (B, H, L, D/2, 1, 2)
    out = pe[..., 0] * xf[..., 0] + pe[..., 1] * xf[..., 1]  # (B, H, L, D/2, 2)
    return out.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class MLPEmbedder(nn.Module):
    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(cin, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(dim, chunks * dim)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return list(self.lin(F.silu(vec))[:, None].chunk(self.chunks, dim=-1))  # each (B, 1, D)


class SelfAttention(nn.Module):
    """The qkv projection, per-head QK RMS norm and output projection of one stream."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=cfg.qkv_bias)
        self.norm = QKNorm(cfg.head_dim)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return attention(q, k, v).transpose(1, 2).flatten(2)  # (B, L, H*Dh)


def _mlp(cfg: FluxConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.hidden, cfg.mlp_hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(cfg.mlp_hidden, cfg.hidden))


def _modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * norm(x) + shift


class DoubleBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text first)."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        for side in ("img", "txt"):
            self.add_module(f"{side}_mod", Modulation(cfg.hidden, 6))
            self.add_module(f"{side}_norm1", nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{side}_attn", SelfAttention(cfg))
            self.add_module(f"{side}_norm2", nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{side}_mlp", _mlp(cfg))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = self.img_mod(vec)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(_modulate(self.img_norm1, img, i_sh1, i_sc1))
        tq, tk, tv = self.txt_attn.qkv_heads(_modulate(self.txt_norm1, txt, t_sh1, t_sc1))
        out = joint_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        t_out, i_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        img = img + i_g1 * self.img_attn.proj(i_out)
        img = img + i_g2 * self.img_mlp(_modulate(self.img_norm2, img, i_sh2, i_sc2))
        txt = txt + t_g1 * self.txt_attn.proj(t_out)
        txt = txt + t_g2 * self.txt_mlp(_modulate(self.txt_norm2, txt, t_sh2, t_sc2))
        return img, txt


class SingleBlock(nn.Module):
    """One stream over text + image tokens: attention and MLP side by side from one projection."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        self.hidden, self.heads = cfg.hidden, cfg.heads
        self.linear1 = nn.Linear(cfg.hidden, 3 * cfg.hidden + cfg.mlp_hidden)
        self.linear2 = nn.Linear(cfg.hidden + cfg.mlp_hidden, cfg.hidden)
        self.norm = QKNorm(cfg.head_dim)
        self.pre_norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(cfg.hidden, 3)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(_modulate(self.pre_norm, x, shift, scale)).split(
            [3 * self.hidden, self.linear1.out_features - 3 * self.hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = joint_attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.hidden, cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final, x, shift, scale))


class FluxTransformer(nn.Module):
    """forward(img (B, L, in), img_ids (L, 3), txt (B, S, ctx), txt_ids (S, 3), t (B,) in [0, 1],
    y (B, vec) pooled CLIP, guidance (B,) | None) -> velocity (B, L, out)."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise ValueError(f"RoPE axes {cfg.axes_dim} must sum to the head width {cfg.head_dim}")
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels, cfg.hidden)
        self.time_in = MLPEmbedder(256, cfg.hidden)
        self.vector_in = MLPEmbedder(cfg.vec_dim, cfg.hidden)
        self.guidance_in = MLPEmbedder(256, cfg.hidden) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_dim, cfg.hidden)
        self.double_blocks = nn.ModuleList(DoubleBlock(cfg) for _ in range(cfg.double_layers))
        self.single_blocks = nn.ModuleList(SingleBlock(cfg) for _ in range(cfg.single_layers))
        self.final_layer = LastLayer(cfg)

    def stream_blocks(self) -> list[nn.Module]:
        return [*self.double_blocks, *self.single_blocks]

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                t: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.img_in.bias.dtype  # the compute dtype (a packed weight's storage type is not)
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(t * 1000).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux model (dev) needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance * 1000).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        pe = rope(torch.cat([txt_ids, img_ids]), self.cfg.axes_dim, self.cfg.theta)  # (S+L, Dh/2, 2, 2)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# ---------------------------------------------------------------------------------- latents

def pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, C*4): 2x2 patches as tokens, channel-major within a patch."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, C*4) -> (B, C, h, w); h, w are the latent's sides."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, index: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """(h/2 * w/2, 3) positions (index, row, column) of the packed tokens of an (h, w) latent."""
    rows = torch.arange(h // 2, device=device, dtype=torch.float32)
    cols = torch.arange(w // 2, device=device, dtype=torch.float32)
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.flatten(0, 1)


# ---------------------------------------------------------------------------------- layouts

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

_DIFFUSERS_PLAIN = {
    "x_embedder.": "img_in.", "context_embedder.": "txt_in.", "proj_out.": "final_layer.linear.",
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
}
_DIFFUSERS_DOUBLE = {
    "norm1.linear.": "img_mod.lin.", "norm1_context.linear.": "txt_mod.lin.",
    "attn.to_out.0.": "img_attn.proj.", "attn.to_add_out.": "txt_attn.proj.",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "ff.net.0.proj.": "img_mlp.0.", "ff.net.2.": "img_mlp.2.",
    "ff_context.net.0.proj.": "txt_mlp.0.", "ff_context.net.2.": "txt_mlp.2.",
}
_DIFFUSERS_SINGLE = {
    "norm.linear.": "modulation.lin.", "proj_out.": "linear2.",
    "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale",
}
# fused in our layout: (our name, diffusers parts in order)
_DOUBLE_FUSED = (("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
                 ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")))
_SINGLE_FUSED = (("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),)


def strip_prefix(sd: dict) -> dict:
    """The transformer's tensors without a ComfyUI / checkpoint prefix (other parts of an all-in-one
    file, such as `text_encoders.` and `vae.`, are left out)."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "img_in.") or k.startswith(prefix + "x_embedder.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def is_diffusers_layout(sd: dict) -> bool:
    return "x_embedder.weight" in sd or any(k.startswith("transformer_blocks.") for k in sd)


def _plain(t):
    """A fused weight is built by concatenation: compact (GGUF / fp8) parts are dequantized first."""
    return t.dequantize(torch.bfloat16) if isinstance(t, QuantWeight) else t


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def convert_diffusers(sd: dict) -> dict:
    """FluxTransformer2DModel names -> BFL names (fusing q/k/v and proj_mlp, swapping the final
    norm's halves: diffusers computes (scale, shift), BFL (shift, scale))."""
    out: dict = {}
    used: set[str] = set()
    for which, fused in (("transformer_blocks", _DOUBLE_FUSED), ("single_transformer_blocks", _SINGLE_FUSED)):
        target = "double_blocks" if which == "transformer_blocks" else "single_blocks"
        for i in range(_count(sd, which)):
            for ours, parts in fused:
                for leaf in ("weight", "bias"):
                    keys = [f"{which}.{i}.{p}.{leaf}" for p in parts]
                    if all(k in sd for k in keys):
                        out[f"{target}.{i}.{ours}.{leaf}"] = torch.cat([_plain(sd[k]) for k in keys], dim=0)
                        used.update(keys)
    for key, t in sd.items():
        if key in used:
            continue
        if key.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = swap_halves(_plain(t))
            continue
        new = None
        if m := re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)", key):
            table = _DIFFUSERS_DOUBLE if m[1] == "transformer_blocks" else _DIFFUSERS_SINGLE
            target = "double_blocks" if m[1] == "transformer_blocks" else "single_blocks"
            for old, rep in table.items():
                if m[3].startswith(old):
                    new = f"{target}.{m[2]}.{rep}{m[3][len(old):]}"
                    break
        else:
            for old, rep in _DIFFUSERS_PLAIN.items():
                if key.startswith(old):
                    new = rep + key[len(old):]
                    break
        out[new or key] = t  # an unknown name stays as it is: the loader reports it
    return out


def normalize_state_dict(sd: dict) -> dict:
    """Any supported layout (BFL, ComfyUI-prefixed, diffusers) -> ours (BFL names)."""
    sd = strip_prefix(sd)
    return convert_diffusers(sd) if is_diffusers_layout(sd) else sd


def load_flux_transformer(sd: dict, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                          config: dict | None = None, **overrides) -> FluxTransformer:
    """Build on the meta device and take the tensors as they are. Compact (GGUF / fp8) weights of the
    linear layers stay compact (studio.models.diffusion_quant). `config`: a diffusers
    transformer/config.json (read_config), checked against the weights and honoured for the RoPE axes."""
    if config:
        from studio.models.diffusers_config import flux_transformer_settings

        overrides = {**flux_transformer_settings(config), **overrides}
    sd = normalize_state_dict(sd)
    heads = overrides.pop("heads", None)
    cfg = FluxConfig.from_state_dict(sd, **overrides)
    if heads is not None and heads != cfg.heads:
        raise UserError("bad_model", f"transformer/config.json says {heads} attention heads but the weights have "
                        f"{cfg.heads} of width {cfg.head_dim}: the folder mixes two models. Download it again.")
    if sum(cfg.axes_dim) != cfg.head_dim:
        raise UserError("bad_model", f"RoPE axes {cfg.axes_dim} do not add up to the head width {cfg.head_dim}: "
                        "the transformer's config.json does not fit its weights.")
    model, missing, unexpected = build_compact(lambda: FluxTransformer(cfg), sd, dtype=dtype, device=device)
    if missing or unexpected:
        raise UserError("bad_model", "The weights do not fit a Flux transformer (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}): the file is damaged or of another kind.")
    return model
