"""Wan 2.1 / 2.2 video diffusion transformer (text-to-video, image-to-video, TI2V).

A latent video (B, C, F, H, W) is cut into (1, 2, 2) patches, one token each; every block is
self-attention with 3D RoPE (head dim split over frame / height / width), cross-attention to the
umT5 text tokens (plus, for Wan 2.1 I2V, a second attention over CLIP image tokens whose outputs
are summed), and a GELU MLP. The timestep modulates each block through adaLN: a learned
`scale_shift_table` (1, 6, D) plus a projection of the time embedding.

Module names follow the diffusers layout (`blocks.0.attn1.to_q.weight`,
`condition_embedder.text_embedder.linear_1.weight`), so diffusers folders load as they are.
`convert_original` maps the original Wan / ComfyUI layout (`blocks.0.self_attn.q.weight`,
`blocks.0.modulation`, `head.head.weight`, optionally under `model.diffusion_model.`) onto it.
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
from studio.nn.attention import attention

TEXT_LEN = 512  # umT5 tokens the models were trained with; prompts are zero-padded to this


@dataclass(frozen=True)
class WanConfig:
    dim: int = 1536
    heads: int = 12
    layers: int = 30
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    cross_attn_norm: bool = True
    qk_norm: bool = True
    image_dim: int | None = None  # CLIP image features (1280) of Wan 2.1 I2V / FLF2V
    image_pos_len: int | None = None  # FLF2V: learned positions over 2 x 257 image tokens
    rope_theta: float = 10000.0
    vae: str = "wan2.1"  # which VAE's latents: "wan2.1" (16 ch) or "wan2.2" (48 ch)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @classmethod
    def named(cls, name: str) -> WanConfig:
        if name not in CONFIGS:
            raise KeyError(f"unknown Wan config {name!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[name]

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], head_dim: int = 128, **overrides) -> WanConfig:
        """Shapes -> config for a state dict in our (diffusers) layout; run `normalize_state_dict` first.

        The head count is not in any shape: every released Wan model uses 128-wide heads.
        """
        patch = sd.get("patch_embedding.weight")
        if patch is None or "proj_out.weight" not in sd:
            raise UserError("bad_model", "This file holds no Wan transformer (no patch embedding or output "
                            "projection): pick a Wan 2.1 / 2.2 diffusion model file.")
        dim, cin = int(patch.shape[0]), int(patch.shape[1])
        ps = tuple(int(s) for s in patch.shape[2:])
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        img = sd.get("condition_embedder.image_embedder.norm1.weight")
        pos = sd.get("condition_embedder.image_embedder.pos_embed")
        cfg = cls(
            dim=dim,
            heads=dim // head_dim,
            layers=layers,
            ffn_dim=int(sd["blocks.0.ffn.net.0.proj.weight"].shape[0]),
            in_channels=cin,
            out_channels=int(sd["proj_out.weight"].shape[0]) // math.prod(ps),
            patch_size=ps,
            text_dim=int(sd["condition_embedder.text_embedder.linear_1.weight"].shape[1]),
            freq_dim=int(sd["condition_embedder.time_embedder.linear_1.weight"].shape[1]),
            cross_attn_norm="blocks.0.norm2.weight" in sd,
            qk_norm="blocks.0.attn1.norm_q.weight" in sd,
            image_dim=None if img is None else int(img.shape[0]),
            image_pos_len=None if pos is None else int(pos.shape[1]),
            vae="wan2.2" if cin == 48 or int(sd["proj_out.weight"].shape[0]) == 48 * math.prod(ps) else "wan2.1",
        )
        return replace(cfg, **overrides)


CONFIGS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(),
    "wan2.1-t2v-14b": WanConfig(dim=5120, heads=40, layers=40, ffn_dim=13824),
    "wan2.1-i2v-14b": WanConfig(dim=5120, heads=40, layers=40, ffn_dim=13824, in_channels=36, image_dim=1280),
    "wan2.1-flf2v-14b": WanConfig(dim=5120, heads=40, layers=40, ffn_dim=13824, in_channels=36, image_dim=1280,
                                  image_pos_len=514),
    # Wan 2.2 A14B: two experts (high-noise, low-noise) of this shape; I2V takes the image as latents only.
    "wan2.2-t2v-a14b": WanConfig(dim=5120, heads=40, layers=40, ffn_dim=13824),
    "wan2.2-i2v-a14b": WanConfig(dim=5120, heads=40, layers=40, ffn_dim=13824, in_channels=36),
    "wan2.2-ti2v-5b": WanConfig(dim=3072, heads=24, layers=30, ffn_dim=14336, in_channels=48, out_channels=48,
                                vae="wan2.2"),
}


# ---------------------------------------------------------------- pieces


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: non-affine LayerNorm in float32, then * (1 + scale) + shift in one fused op; back to x's dtype."""
    return torch.addcmul(shift, F.layer_norm(x.float(), (x.shape[-1],), eps=eps), 1 + scale).type_as(x)


def _gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate with the arithmetic in float32 (gate is float32, so addcmul promotes) in one op."""
    return torch.addcmul(x, y, gate).type_as(x)


class RMSNorm(nn.Module):
    """RMS norm over the last axis, computed in float32, then scaled by the learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.float32(x).type_as(x)

    def float32(self, x: torch.Tensor) -> torch.Tensor:
        """The normed and scaled x in float32, for callers that go on in float32 (RoPE)."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps: (...,) -> (..., dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(frames: int, height: int, width: int, head_dim: int, theta: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (F*H*W, 1, head_dim/2) for 3D RoPE over token positions (f, h, w).

    The rotated pairs are split: the first head_dim - 4*(head_dim//6) channels turn with the
    frame index, the next 2*(head_dim//6) with the row, the last 2*(head_dim//6) with the column.
    Angles are computed in float64 (as the reference does) before the cast.
    """
    hw_dim = 2 * (head_dim // 6)
    t_dim = head_dim - 2 * hw_dim
    parts = []
    for n, d in ((frames, t_dim), (height, hw_dim), (width, hw_dim)):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        parts.append(torch.outer(torch.arange(n, dtype=torch.float64), inv))  # (n, d/2)
    f, h, w = parts
    ang = torch.cat([
        f[:, None, None].expand(frames, height, width, -1),
        h[None, :, None].expand(frames, height, width, -1),
        w[None, None, :].expand(frames, height, width, -1),
    ], dim=-1).reshape(frames * height * width, 1, head_dim // 2)
    return ang.cos().float().to(device), ang.sin().float().to(device)


Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # cos, sin (S, 1, Dh/2) float32; cis = cos + i sin


def rope_real(x: torch.Tensor, rope: Rope, dtype: torch.dtype) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x (B, S, H, Dh) by the angles, in real arithmetic."""
    cos, sin, _ = rope
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, Dh/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(dtype)


def rope_complex(x: torch.Tensor, rope: Rope, dtype: torch.dtype) -> torch.Tensor:
    """The same rotation as one complex multiply: a third of the memory passes of `rope_real` in eager mode."""
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rope[2]).flatten(-2).to(dtype)


def apply_rope(x: torch.Tensor, rope: Rope, dtype: torch.dtype) -> torch.Tensor:
    # inductor cannot generate code for complex ops but fuses the real form into one kernel
    return rope_real(x, rope, dtype) if torch.compiler.is_compiling() else rope_complex(x, rope, dtype)


class Attention(nn.Module):
    """Multi-head attention with RMS-normed q/k (normalised across all heads together, as Wan does).

    Self-attention passes rope; cross-attention passes the text tokens as `context`, and for
    I2V the image tokens as `image_context`, attended separately and summed.
    """

    def __init__(self, dim: int, heads: int, eps: float, qk_norm: bool, image: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        if image:
            self.add_k_proj = nn.Linear(dim, dim)
            self.add_v_proj = nn.Linear(dim, dim)
            self.norm_added_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, S, H, Dh) in, SDPA wants (B, H, S, Dh); returns (B, S, H*Dh)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: Rope | None = None, image_context: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(kv), self.to_v(kv)
        if rope is not None and isinstance(self.norm_q, RMSNorm):
            # norm and rotation both in float32, one cast back at the end
            q, k = self.norm_q.float32(q), self.norm_k.float32(k)
        else:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in (q, k, v))  # (B, S, H, Dh)
        if rope is not None:
            q, k = apply_rope(q, rope, v.dtype), apply_rope(k, rope, v.dtype)
        out = self._sdpa(q, k, v)
        if image_context is not None:
            ki = self.norm_added_k(self.add_k_proj(image_context)).unflatten(-1, (self.heads, -1))
            vi = self.add_v_proj(image_context).unflatten(-1, (self.heads, -1))
            out = out + self._sdpa(q, ki, vi)
        return self.to_out[0](out)


class _Proj(nn.Module):
    """Holds the first MLP linear under the name diffusers gives it (`ffn.net.0.proj`)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cin, cout)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, cout: int | None = None, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate
        self.net = nn.ModuleList([_Proj(dim, hidden), nn.Identity(), nn.Linear(hidden, cout or dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.attn1 = Attention(d, cfg.heads, cfg.eps, cfg.qk_norm)
        self.attn2 = Attention(d, cfg.heads, cfg.eps, cfg.qk_norm, image=cfg.image_dim is not None)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(d, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, d))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mod: torch.Tensor,
                rope: Rope, image_context: torch.Tensor | None) -> torch.Tensor:
        # x (B, S, D); mod (B, 1 or S, 6, D) float32; modulation arithmetic stays in float32.
        e = (self.scale_shift_table.float().unsqueeze(0) + mod).unbind(2)  # 6 x (B, 1|S, D)
        shift, scale, gate, c_shift, c_scale, c_gate = e
        x = _gated_add(x, self.attn1(_modulate(x, shift, scale, self.eps), rope=rope), gate)
        h = x if self.norm2 is None else F.layer_norm(
            x.float(), (x.shape[-1],), self.norm2.weight.float(), self.norm2.bias.float(), self.eps).type_as(x)
        x = x + self.attn2(h, context=context, image_context=image_context)
        return _gated_add(x, self.ffn(_modulate(x, c_shift, c_scale, self.eps)), c_gate)


class TimeEmbedder(nn.Module):
    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextEmbedder(nn.Module):
    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ImageEmbedder(nn.Module):
    """CLIP penultimate-layer features (B, 257, 1280) -> (B, 257, D) image tokens."""

    def __init__(self, cin: int, dim: int, pos_len: int | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cin)
        self.ff = FeedForward(cin, cin, dim, approximate="none")
        self.norm2 = nn.LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, cin)) if pos_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            # FLF2V: first- and last-frame features side by side, one position table over both
            x = x.reshape(-1, self.pos_embed.shape[1], x.shape[-1]) + self.pos_embed
        x = F.layer_norm(x.float(), (x.shape[-1],), self.norm1.weight.float(), self.norm1.bias.float()).type_as(x)
        x = self.ff(x)
        return F.layer_norm(x.float(), (x.shape[-1],), self.norm2.weight.float(), self.norm2.bias.float()).type_as(x)


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimeEmbedder(cfg.freq_dim, cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = TextEmbedder(cfg.text_dim, cfg.dim)
        self.image_embedder = (ImageEmbedder(cfg.image_dim, cfg.dim, cfg.image_pos_len)
                               if cfg.image_dim is not None else None)


# ---------------------------------------------------------------- the model


class WanTransformer(nn.Module):
    """forward(x (B, C, F, H, W), t (B,) or (B, tokens), context (B, L, text_dim),
    image_context (B, 257, 1280) | None) -> velocity (B, C_out, F, H, W).

    `t` is the flow-matching timestep in [0, 1000]. A (B, tokens) `t` gives every token its own
    timestep (Wan 2.2 TI2V keeps the conditioning first frame at t=0).
    """

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.proj_out = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        self._rope_cache: dict[tuple, Rope] = {}

    def rope(self, f: int, h: int, w: int, device: torch.device) -> Rope:
        """Angles for an f x h x w token grid, kept for the next call (every sampling step asks the same)."""
        key = (f, h, w, str(device))
        if key not in self._rope_cache:
            cos, sin = rope_angles(f, h, w, self.cfg.head_dim, self.cfg.rope_theta, device)
            self._rope_cache = {key: (cos, sin, torch.complex(cos, sin))}
        return self._rope_cache[key]

    def embed_conditions(self, t: torch.Tensor, context: torch.Tensor, image_context: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> temb (B, 1|S, D), block modulation (B, 1|S, 6, D) float32, text tokens, image tokens.

        Split out so a sampler can embed the prompt once per step for both CFG halves.
        """
        ce = self.condition_embedder
        t = t if t.ndim == 2 else t[:, None]  # (B, 1|S)
        # the bias says the compute dtype: a quantized linear_1 (fp8, GGUF) keeps its weight in another
        w = ce.time_embedder.linear_1.bias
        temb = ce.time_embedder(timestep_embedding(t, ce.freq_dim).to(w.dtype)).type_as(context)  # (B, 1|S, D)
        mod = ce.time_proj(F.silu(temb)).float().unflatten(-1, (6, -1))  # (B, 1|S, 6, D)
        text = ce.text_embedder(context)
        img = None
        if image_context is not None:
            if ce.image_embedder is None:
                raise UserError("bad_input", "This Wan model takes no CLIP image input: use an I2V model for "
                                "image conditioning, or leave the image out.")
            img = ce.image_embedder(image_context.to(text.dtype))
        return temb, mod, text, img

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise UserError("bad_input", f"Latent size {f}x{h}x{w} is not divisible by the patch size "
                            f"{pt}x{ph}x{pw}: pick a width and height that are multiples of {8 * pw} pixels.")
        fp, hp, wp = f // pt, h // ph, w // pw
        rope = self.rope(fp, hp, wp, x.device)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, S, D)
        temb, mod, text, img = self.embed_conditions(t, context, image_context)
        for block in self.blocks:
            tokens = block(tokens, text, mod, rope, img)
        shift, scale = (self.scale_shift_table.float().unsqueeze(0) + temb.float().unsqueeze(2)).unbind(2)
        tokens = _modulate(tokens, shift, scale, self.cfg.eps)
        out = self.proj_out(tokens)  # (B, S, C*pt*ph*pw)
        out = out.reshape(b, fp, hp, wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, f, h, w)


# ---------------------------------------------------------------- layouts and loading

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

# Original Wan / ComfyUI name pieces -> diffusers, applied in order to each key.
_ORIGINAL_RENAMES = (
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    (".self_attn.", ".attn1."),
    (".cross_attn.", ".attn2."),
    (".q.", ".to_q."), (".k.", ".to_k."), (".v.", ".to_v."), (".o.", ".to_out.0."),
    (".k_img.", ".add_k_proj."), (".v_img.", ".add_v_proj."), (".norm_k_img.", ".norm_added_k."),
    (".ffn.0.", ".ffn.net.0.proj."), (".ffn.2.", ".ffn.net.2."),
    (".modulation", ".scale_shift_table"),
    # the original calls the cross-attention norm norm3 (its norm1/norm2 have no weights)
    (".norm3.", ".norm2."),
)


def strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def is_original_layout(sd: dict[str, torch.Tensor]) -> bool:
    return "head.head.weight" in sd or any(".self_attn." in k for k in sd)


def convert_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan / ComfyUI keys (prefix already stripped) -> diffusers layout. Tensors are shared."""
    out = {}
    for key, tensor in sd.items():
        for old, new in _ORIGINAL_RENAMES:
            key = key.replace(old, new)
        out[key] = tensor
    return out


def normalize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> ours: diffusers, original Wan, ComfyUI (`model.diffusion_model.` prefix)."""
    sd = strip_prefix(sd)
    if is_original_layout(sd):
        sd = convert_original(sd)
    # diffusers ignores this key of some I2V exports; it has no module in either implementation
    return {k: v for k, v in sd.items() if ".norm_added_q." not in k}


def load_wan_transformer(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None, head_dim: int = 128,
                         config: dict | None = None) -> WanTransformer:
    """Build on the meta device and take the tensors as they are (copies only for a dtype/device change).

    `sd` may hold compact weights (GGUF blocks, fp8 with scales: studio.models.diffusion_quant); their
    Linear layers keep them as stored and dequantize per call, the rest is dequantized to `dtype`.
    `config`: a diffusers transformer/config.json (studio.models.diffusers_config.read_config); its head
    width and eps win over `head_dim` and the released models' 1e-6.
    """
    overrides: dict = {}
    heads = None
    if config:
        from studio.models.diffusers_config import wan_transformer_settings

        settings = wan_transformer_settings(config)
        head_dim, heads = settings.pop("head_dim", head_dim), settings.pop("heads", None)
        overrides.update(settings)
    sd = normalize_state_dict(sd)
    for marker, what in (("vace_blocks.", "a Wan VACE model"), ("motion_encoder.", "a Wan Animate model"),
                         ("casual_audio_encoder.", "a Wan S2V (speech-to-video) model")):
        if any(k.startswith(marker) for k in sd):
            raise UserError("unsupported", f"This file is {what}, which is not supported yet: use a Wan 2.1 / 2.2 "
                            "text-to-video, image-to-video or TI2V model.")
    cfg = WanConfig.from_state_dict(sd, head_dim=head_dim, **overrides)
    if heads is not None and (heads * head_dim != cfg.dim):
        raise UserError("bad_model", f"{config.get('_where', 'transformer/config.json')}: num_attention_heads={heads} "
                        f"x attention_head_dim={head_dim} does not match the weights' width {cfg.dim}: the folder "
                        "mixes two models. Download it again.")
    model, missing, unexpected = build_compact(lambda: WanTransformer(cfg), sd, dtype=dtype, device=device)
    if missing or unexpected:
        raise UserError("bad_model", "The weights do not fit a Wan transformer (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}): the file is damaged or of another kind.")
    return model
