"""The Stable Diffusion UNet (SD 1.x, SD 2.x, SDXL base and refiner), config-driven.

Module names follow the diffusers layout (`down_blocks.0.resnets.0.conv1.weight`), so a diffusers
`unet/diffusion_pytorch_model.safetensors` loads directly; single-file checkpoints in the original
LDM layout (`model.diffusion_model.input_blocks...`) are renamed by `unet_convert.py`.

Reading order: config and the table of named configs, then the small modules (timestep embedding,
resnet, attention, transformer), then the UNet, then loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from studio.models.loader import build_on_meta
from studio.nn.attention import attention

# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting models (latent + mask + masked-image latent)
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # transformer blocks per level (0 = a level without attention); up levels mirror these
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_mid: int = 1
    # Attention width: either a fixed head count (SD1: 8) or a fixed head size (SD2/SDXL: 64).
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    use_linear_projection: bool = False  # SD2/SDXL project in/out with Linear, SD1 with 1x1 conv
    adm_in_channels: int = 0  # SDXL `y` width: pooled text (1280) + 256 per size/crop/score number
    norm_groups: int = 32
    time_embed_dim_mult: int = 4

    def heads_at(self, channels: int) -> int:
        if self.head_dim is not None:
            return channels // self.head_dim
        assert self.num_heads is not None
        return self.num_heads

    @property
    def time_embed_dim(self) -> int:
        return self.block_channels[0] * self.time_embed_dim_mult

    @classmethod
    def named(cls, name: str) -> UNetConfig:
        if name not in CONFIGS:
            raise KeyError(f"unknown UNet config {name!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[name]

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **overrides) -> UNetConfig:
        """Infer the config from tensor shapes of a state dict in *our* (diffusers) layout.

        What shapes cannot tell (head count vs head size, norm groups) follows the released
        models: SD1 (conv projection) has 8 heads, SD2 and SDXL (linear projection) 64-wide heads.
        Pass `overrides` for anything else (tiny test models).
        """
        from studio.models.unet_convert import to_ours  # local: unet_convert imports this module

        sd = to_ours(sd)
        if "conv_in.weight" not in sd:
            raise ValueError("not a Stable Diffusion UNet state dict (no conv_in / input_blocks.0.0 weight)")
        in_channels = sd["conv_in.weight"].shape[1]
        out_channels = sd["conv_out.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
        channels = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
        layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets."))

        def depth(prefix: str) -> int:
            idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
            return max(idx) + 1 if idx else 0

        tdepth = tuple(depth(f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(levels))
        tmid = depth("mid_block.attentions.0.transformer_blocks.")
        attn2 = [k for k in sd if k.endswith("attn2.to_k.weight")]
        context_dim = sd[attn2[0]].shape[1] if attn2 else 768
        proj = [k for k in sd if k.endswith("proj_in.weight")]
        linear = bool(proj) and sd[proj[0]].ndim == 2
        adm = sd["add_embedding.linear_1.weight"].shape[1] if "add_embedding.linear_1.weight" in sd else 0
        cfg = cls(
            in_channels=in_channels,
            out_channels=out_channels,
            block_channels=channels,
            layers_per_block=layers,
            transformer_depth=tdepth,
            transformer_depth_mid=tmid,
            num_heads=None if linear else 8,
            head_dim=64 if linear else None,
            context_dim=context_dim,
            use_linear_projection=linear,
            adm_in_channels=adm,
            time_embed_dim_mult=sd["time_embedding.linear_1.weight"].shape[0] // channels[0],
        )
        return replace(cfg, **overrides)


CONFIGS: dict[str, UNetConfig] = {
    "sd1": UNetConfig(),
    "sd2": UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True),
    "sdxl_base": UNetConfig(
        block_channels=(320, 640, 1280),
        transformer_depth=(0, 2, 10),
        transformer_depth_mid=10,
        num_heads=None,
        head_dim=64,
        context_dim=2048,
        use_linear_projection=True,
        adm_in_channels=2816,
    ),
    "sdxl_refiner": UNetConfig(
        block_channels=(384, 768, 1536, 1536),
        transformer_depth=(0, 4, 4, 0),
        transformer_depth_mid=4,
        num_heads=None,
        head_dim=64,
        context_dim=1280,
        use_linear_projection=True,
        adm_in_channels=2560,
    ),
}

# ------------------------------------------------------------------------------------------- modules


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos | sin] halves (LDM order, = diffusers flip_sin_to_cos=True). (N,) -> (N, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sdxl_add_embeddings(
    original_size: tuple[int, int],
    crop: tuple[int, int],
    target_size: tuple[int, int],
    aesthetic_score: float | None = None,
) -> torch.Tensor:
    """The size/crop conditioning part of SDXL's `y`, (6*256,) for the base or (5*256,) for the refiner.

    Sizes are (height, width) and crop is (top, left), in pixels, as in the SDXL paper and diffusers'
    `time_ids`. The base uses (original, crop, target); the refiner replaces target by the
    aesthetic score. Concatenate after the pooled CLIP-G output: y = cat([pooled (1280), this]).
    """
    if aesthetic_score is None:
        numbers = [*original_size, *crop, *target_size]
    else:
        numbers = [*original_size, *crop, aesthetic_score]
    emb = timestep_embedding(torch.tensor(numbers, dtype=torch.float32), 256)  # (N, 256)
    return emb.flatten()


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), emb (B, E) already passed through SiLU by the UNet (shared by all blocks)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0 matches `to_out.0` in checkpoints

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, T, C), context (B, S, D) or None for self-attention
        ctx = x if context is None else context
        b, t, c = x.shape
        q = self.to_q(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, h, T, d)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, S, d)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        o = attention(q, k, v)
        return self.to_out[0](o.transpose(1, 2).reshape(b, t, c))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # `net.0` / `net.2` as in checkpoints; index 1 is a dropout there and an identity here
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image <-> token sequence around a stack of transformer blocks (diffusers' Transformer2DModel)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear: bool, groups: int) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(b, hh, ww, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """One resolution level: resnets, optional attentions after each, optional resampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module], sampler: nn.Module | None,
                 sampler_name: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.sampler_name = sampler_name
        if sampler is not None:
            setattr(self, sampler_name, nn.ModuleList([sampler]))  # `downsamplers.0` / `upsamplers.0`
        else:
            setattr(self, sampler_name, None)

    def layer(self, i: int, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[i](x, emb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
        return x

    def resample(self, x: torch.Tensor) -> torch.Tensor | None:
        sampler = getattr(self, self.sampler_name)
        return None if sampler is None else sampler[0](x)


class MidBlock(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig, temb: int) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb, g), ResnetBlock(ch, ch, temb, g)])
        self.attentions = None
        if cfg.transformer_depth_mid > 0:
            self.attentions = nn.ModuleList([SpatialTransformer(
                ch, cfg.heads_at(ch), cfg.transformer_depth_mid, cfg.context_dim, cfg.use_linear_projection, g)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        if self.attentions is not None:
            x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


# ---------------------------------------------------------------------------------------------- UNet


class UNet(nn.Module):
    """UNet2DConditionModel equivalent. forward(x, timesteps, context, y) -> noise/v prediction."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        ch0, temb, g = cfg.block_channels[0], cfg.time_embed_dim, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch0, temb)
        self.add_embedding = TimestepEmbedding(cfg.adm_in_channels, temb) if cfg.adm_in_channels else None

        def attn(ch: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.heads_at(ch), depth, cfg.context_dim, cfg.use_linear_projection, g)

        n = len(cfg.block_channels)
        skips = [ch0]  # channels of every skip connection, in push order
        down, cout = [], ch0
        for i, ch in enumerate(cfg.block_channels):
            resnets, attns = [], []
            for j in range(cfg.layers_per_block):
                resnets.append(ResnetBlock(cout if j == 0 else ch, ch, temb, g))
                if cfg.transformer_depth[i]:
                    attns.append(attn(ch, cfg.transformer_depth[i]))
                skips.append(ch)
            cout = ch
            last = i == n - 1
            if not last:
                skips.append(ch)
            down.append(Block(resnets, attns, None if last else Downsample(ch), "downsamplers"))
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = MidBlock(cout, cfg, temb)

        up = []
        for i, ch in enumerate(reversed(cfg.block_channels)):
            level = n - 1 - i
            resnets, attns = [], []
            for _ in range(cfg.layers_per_block + 1):
                resnets.append(ResnetBlock(cout + skips.pop(), ch, temb, g))
                if cfg.transformer_depth[level]:
                    attns.append(attn(ch, cfg.transformer_depth[level]))
                cout = ch
            last = i == n - 1
            up.append(Block(resnets, attns, None if last else Upsample(ch), "upsamplers"))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(g, ch0, eps=1e-5)
        self.conv_out = nn.Conv2d(ch0, cfg.out_channels, 3, padding=1)

    def stream_blocks(self) -> list[nn.Module]:
        """Units for block streaming, in run order: every resnet, every transformer block, every resampler.

        Finer than whole levels (SDXL's deepest level alone is a third of the weights), so a small
        card holds two units at a time. What is left over (conv_in/out, embeddings, the projections
        around each transformer stack) is small and stays on the device.
        """
        units: list[nn.Module] = []

        def level(block: nn.Module) -> None:
            for i, resnet in enumerate(block.resnets):
                units.append(resnet)
                if block.attentions is not None:
                    units.extend(block.attentions[i].transformer_blocks)
            sampler = getattr(block, getattr(block, "sampler_name", ""), None)
            if sampler is not None:
                units.extend(sampler)

        for block in self.down_blocks:
            level(block)
        mid = self.mid_block
        units.append(mid.resnets[0])
        if mid.attentions is not None:
            units.extend(mid.attentions[0].transformer_blocks)
        units.append(mid.resnets[1])
        for block in self.up_blocks:
            level(block)
        return units

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, C, H, W) latents (H, W multiples of 2**(levels-1)); inpainting models (C=9) take
        # cat([latent (4), mask (1), masked-image latent (4)], dim=1), the LDM and diffusers order.
        # timesteps (B,) or scalar, in the model's 0..999 scale (fractional is fine),
        # context (B, T, D) text hidden states, y (B, adm) SDXL pooled text + size embeddings
        cfg = self.config
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embedding(timestep_embedding(timesteps, cfg.block_channels[0]).to(x.dtype))  # (B, E)
        if self.add_embedding is not None:
            if y is None:
                raise ValueError("this UNet (SDXL) needs `y`: pooled text embedding + size embeddings")
            emb = emb + self.add_embedding(y.to(x.dtype))
        emb = F.silu(emb)  # every resnet applies SiLU first: do it once

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for j in range(len(block.resnets)):
                h = block.layer(j, h, emb, context)
                skips.append(h)
            down = block.resample(h)
            if down is not None:
                h = down
                skips.append(h)
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            for j in range(len(block.resnets)):
                h = block.layer(j, torch.cat([h, skips.pop()], dim=1), emb, context)
            up = block.resample(h)
            if up is not None:
                h = up
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def build_unet(
    sd: dict[str, torch.Tensor],
    cfg: UNetConfig | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> UNet:
    """Build on the meta device and load `sd` (diffusers, LDM or ComfyUI layout) with assign=True.

    The config is inferred from shapes unless given. Raises ValueError naming missing or
    unexpected keys when the file is not a UNet of that shape.
    """
    from studio.models.unet_convert import to_ours

    sd = to_ours(sd)
    cfg = cfg or UNetConfig.from_state_dict(sd, **overrides)
    model, missing, unexpected = build_on_meta(lambda: UNet(cfg), sd, dtype=dtype)
    if missing or unexpected:
        raise ValueError(f"UNet weights do not match the model shape: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)})")
    return model
