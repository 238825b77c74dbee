"""The Wan causal 3D VAEs: video (B, 3, 1 + 4k, H, W) <-> latents (B, C, 1 + k, H/s, W/s).

Wan 2.1 (also used by Wan 2.2 14B): 16 latent channels, s = 8. Wan 2.2 (TI2V 5B): 48 channels,
s = 16: pixels are first folded 2x2 into channels, and every level adds a parameter-free
shortcut (channel-averaging down, channel-duplicating up) around its residual blocks.

Every temporal convolution is causal (padded with two zero frames in front), so an output frame
depends only on the frames up to it. That makes decoding in time chunks exact: each causal conv
keeps the last two frames it has seen in a `state` dict (keyed by the module) and prepends them
to the next chunk, and the temporal up/down samplers remember whether they have seen the first
frame (which stands for one image and is never resampled in time). Decoding one latent frame at a
time, as the reference does, or all at once gives the same video to float rounding; the chunk
size only trades memory for speed.

Module names follow diffusers' AutoencoderKLWan (`encoder.down_blocks.0.conv1.weight`,
`decoder.up_blocks.0.resnets.0.norm1.gamma`); `convert_original` maps the original Wan layout
(`encoder.downsamples.0.residual.0.gamma`, `decoder.upsamples.3.resample.1.weight`, `conv1`,
`conv2`; for 2.2 the nested `encoder.downsamples.0.downsamples.1...`) onto it. Latents are
normalised per channel with the published mean / std.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import UserError
from studio.models.loader import build_on_meta
from studio.nn.attention import attention
from studio.nn.tiling import tiled_decode_3d

State = dict  # module -> cached frames / flags, one per video being encoded or decoded

WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# Wan 2.2 VAE statistics, as published in Wan2.2's wan/modules/vae2_2.py (Wan2_2_VAE): measured data.
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
             0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
             0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
             0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
             0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3  # after patchifying: 12 for Wan 2.2
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_MEAN
    latents_std: tuple[float, ...] = WAN21_STD
    residual: bool = False  # Wan 2.2: parameter-free shortcuts around every level
    patch_size: int = 1  # Wan 2.2: 2x2 pixels folded into channels before the encoder
    decoder_base_dim: int | None = None  # Wan 2.2's decoder is wider (256) than its encoder (160)

    @property
    def time_scale(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def scale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @classmethod
    def named(cls, name: str) -> WanVAEConfig:
        if name == "wan2.1":
            return cls()
        if name == "wan2.2":
            return cls(base_dim=160, z_dim=48, in_channels=12, out_channels=12, latents_mean=WAN22_MEAN,
                       latents_std=WAN22_STD, residual=True, patch_size=2, decoder_base_dim=256)
        raise KeyError(f"unknown Wan VAE config {name!r}; known: wan2.1, wan2.2")

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **overrides) -> WanVAEConfig:
        """Shapes -> config for a state dict in our (diffusers) layout; run `normalize_state_dict` first."""
        if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
            raise UserError("bad_model", "This file holds no Wan video VAE (no encoder/decoder input convs): "
                            "pick the Wan 2.1 VAE file (wan_2.1_vae.safetensors or Wan2.1_VAE.pth).")
        z = int(sd["decoder.conv_in.weight"].shape[1])
        stats = {16: (WAN21_MEAN, WAN21_STD), 48: (WAN22_MEAN, WAN22_STD)}
        if z not in stats:
            raise UserError("unsupported", f"This video VAE has {z} latent channels; the Wan VAEs have 16 (Wan 2.1) "
                            "or 48 (Wan 2.2 TI2V 5B). Pick the VAE that belongs to your Wan model.")
        base = int(sd["encoder.conv_in.weight"].shape[0])
        residual = "encoder.down_blocks.0.resnets.0.conv1.weight" in sd
        dims, temporal, res = [], [], 0
        level: list[int] = []
        if residual:  # nested: down_blocks.{level}.resnets.{j} + downsampler
            for i in range(1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))):
                res = len({k.split(".")[4] for k in sd if k.startswith(f"encoder.down_blocks.{i}.resnets.")})
                dims.append(int(sd[f"encoder.down_blocks.{i}.resnets.{res - 1}.conv1.weight"].shape[0]))
                if f"encoder.down_blocks.{i}.downsampler.resample.1.weight" in sd:
                    temporal.append(f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in sd)
        else:  # flat: residual blocks, a resampler closing each level but the last
            for i in range(1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))):
                if f"encoder.down_blocks.{i}.conv1.weight" in sd:
                    level.append(int(sd[f"encoder.down_blocks.{i}.conv1.weight"].shape[0]))
                else:
                    temporal.append(f"encoder.down_blocks.{i}.time_conv.weight" in sd)
                    dims.append(level[-1])
                    res, level = len(level), []
            dims.append(level[-1])
            res = res or len(level)
        mult = tuple(d // base for d in dims)
        cin = int(sd["encoder.conv_in.weight"].shape[1])
        dec_base = int(sd["decoder.conv_out.weight"].shape[1]) // mult[0]
        cfg = cls(base_dim=base, z_dim=z, dim_mult=mult, num_res_blocks=res, temporal_downsample=tuple(temporal),
                  in_channels=cin, out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
                  latents_mean=stats[z][0], latents_std=stats[z][1], residual=residual,
                  patch_size=round((cin / 3) ** 0.5), decoder_base_dim=None if dec_base == base else dec_base)
        return replace(cfg, **overrides)


# ---------------------------------------------------------------- pieces


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (2 * pad frames in front, none behind), with a frame cache.

    With a `state`, the last two input frames are kept and put in front of the next call's input,
    so calling it chunk by chunk equals one call on the whole sequence.
    """

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        # the conv pads space itself (no copy); time is padded by hand, in front only
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        if not self.time_pad:
            return super().forward(x)
        prev = state.get(self) if state is not None else None
        front = [] if prev is None else [prev]
        missing = self.time_pad - (0 if prev is None else prev.shape[2])
        if missing > 0:
            front.insert(0, x.new_zeros(*x.shape[:2], missing, *x.shape[3:]))
        x = torch.cat([*front, x], dim=2)
        if state is not None:
            # the last two real frames (never the zero padding) are the next chunk's context
            real = x.shape[2] - max(missing, 0)
            state[self] = x[:, :, -min(2, real):].clone()
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / ||x|| over channels (axis 1) * sqrt(C) * gamma: an RMS norm in F.normalize's form."""

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(F.silu(self.norm1(x)), state)
        h = self.conv2(F.silu(self.norm2(h)), state)
        return skip + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (frames never see each other)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # (BT, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)
        y = attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        y = self.proj(y).reshape(b, t, c, h, w).transpose(1, 2)
        return x + y


def _per_frame(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of (B, C, T, H, W)."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Resample(nn.Module):
    """Spatial x2 down/up-sampling, plus a causal temporal x2 for the "3d" modes.

    The first frame of a video is never resampled in time: downsample3d keeps it and then takes
    stride-2 windows (f0 f1 f2), (f2 f3 f4), ...; upsample3d keeps it and turns every later frame
    into two through a conv with 2C outputs.
    """

    def __init__(self, dim: int, mode: str, up_out: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            # Wan 2.1 halves the channels while upsampling; Wan 2.2 keeps them (up_out=dim)
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, up_out or dim // 2, 3, padding=1))
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if mode == "upsample3d" else None
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if mode == "downsample3d" else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, state)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_down(x, state)
        return x

    def _time_up(self, x: torch.Tensor, state: State) -> torch.Tensor:
        head, rest = (x[:, :, :0], x) if state.get(self) else (x[:, :, :1], x[:, :, 1:])
        state[self] = True
        if rest.shape[2] == 0:
            return head
        b, c, t, h, w = rest.shape
        pairs = self.time_conv(rest, state).reshape(b, 2, c, t, h, w)  # channels [first | second] of each pair
        pairs = pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return torch.cat([head, pairs], dim=2)

    def _time_down(self, x: torch.Tensor, state: State) -> torch.Tensor:
        prev = state.get(self)
        state[self] = x[:, :, -1:].clone()
        if prev is None:  # first chunk: f0 as is, then windows over the chunk itself
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2) if x.shape[2] >= 3 else x[:, :, :1]
        return self.time_conv(torch.cat([prev, x], dim=2))


def avg_down(x: torch.Tensor, cout: int, ft: int, fs: int) -> torch.Tensor:
    """Wan 2.2 shortcut: fold ft x fs x fs neighbours into channels, then average channel groups to cout.

    A chunk with an odd frame count (the first) gets a zero frame in front, so f0 pairs with zeros.
    """
    x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, cout, c * ft * fs * fs // cout, t // ft, h // fs, w // fs)
    return x.mean(dim=2)


def dup_up(x: torch.Tensor, cout: int, ft: int, fs: int, first: bool) -> torch.Tensor:
    """Wan 2.2 shortcut: repeat channels, unfold them into ft frames and fs x fs pixels.
    The very first frame of a video stands alone, so its ft - 1 leading copies are dropped."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(cout * ft * fs * fs // c, dim=1).reshape(b, cout, ft, fs, fs, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, cout, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first else x


class ResidualDownBlock(nn.Module):
    """Wan 2.2 encoder level: residual blocks and a resampler, plus an averaging shortcut."""

    def __init__(self, cin: int, cout: int, layers: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.cout, self.ft, self.fs = cout, 2 if temporal else 1, 2 if down else 1
        self.resnets = nn.ModuleList(ResidualBlock(cin if i == 0 else cout, cout) for i in range(layers))
        self.downsampler = Resample(cout, "downsample3d" if temporal else "downsample2d") if down else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        skip = avg_down(x, self.cout, self.ft, self.fs)
        for r in self.resnets:
            x = r(x, state)
        if self.downsampler is not None:
            x = self.downsampler(x, state)
        return x + skip


class ResidualUpBlock(nn.Module):
    """Wan 2.2 decoder level: residual blocks and a resampler, plus a duplicating shortcut."""

    def __init__(self, cin: int, cout: int, layers: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.cout, self.ft = cout, 2 if temporal else 1
        self.resnets = nn.ModuleList(ResidualBlock(cin if i == 0 else cout, cout) for i in range(layers))
        self.upsampler = Resample(cout, "upsample3d" if temporal else "upsample2d", up_out=cout) if up else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        skip = None
        if self.upsampler is not None:
            skip = dup_up(x, self.cout, self.ft, 2, first=not state.get(self))
            state[self] = True
        for r in self.resnets:
            x = r(x, state)
        if self.upsampler is not None:
            x = self.upsampler(x, state) + skip
        return x


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        x = self.resnets[0](x, state)
        return self.resnets[1](self.attentions[0](x), state)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, mode: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(cin if i == 0 else cout, cout) for i in range(layers))
        self.upsamplers = nn.ModuleList([Resample(cout, mode)]) if mode else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, state)
        return x if self.upsamplers is None else self.upsamplers[0](x, state)


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if cfg.residual:
                temporal = i != last and cfg.temporal_downsample[i]
                blocks.append(ResidualDownBlock(cin, cout, cfg.num_res_blocks, temporal, down=i != last))
                continue
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin if j == 0 else cout, cout))
            if i != last:
                blocks.append(Resample(cout, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        x = self.conv_in(x, state)
        for block in self.down_blocks:
            x = block(x, state)
        x = self.mid_block(x, state)
        return self.conv_out(F.silu(self.norm_out(x)), state)


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [(cfg.decoder_base_dim or cfg.base_dim) * m for m in (mult[-1], *reversed(mult))]
        temporal_up = tuple(reversed(cfg.temporal_downsample))
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        last = len(mult) - 1
        if cfg.residual:
            self.up_blocks = nn.ModuleList(
                ResidualUpBlock(dims[i], dims[i + 1], cfg.num_res_blocks + 1, i != last and temporal_up[i], i != last)
                for i in range(len(mult)))
        else:
            self.up_blocks = nn.ModuleList(
                # every Wan 2.1 upsampler halves the channels, so later blocks take half of the level's width
                UpBlock(dims[i] // 2 if i > 0 else dims[i], dims[i + 1], cfg.num_res_blocks + 1,
                        None if i == last else ("upsample3d" if temporal_up[i] else "upsample2d"))
                for i in range(len(mult)))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, state: State) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, state), state)
        for block in self.up_blocks:
            x = block(x, state)
        return self.conv_out(F.silu(self.norm_out(x)), state)


# ---------------------------------------------------------------- the VAE


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p); channel order (c, column offset, row offset) as Wan 2.2."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    if h % p or w % p:
        raise UserError("bad_input", f"Video size {w}x{h} must be a multiple of {p * 8} for this VAE.")
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    if p == 1:
        return x
    b, cp, t, h, w = x.shape
    x = x.reshape(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cp // (p * p), t, h * p, w * p)


class WanVAE(nn.Module):
    """encode: video (B, 3, 1+4k, H, W) in [-1, 1] -> (mean, logvar) each (B, z, 1+k, H/s, W/s)
    (z, s = 16, 8 for Wan 2.1; 48, 16 for Wan 2.2); decode: raw latents -> video in [-1, 1]. `normalize` / `denormalize` go to and from the
    diffusion model's latent space (per-channel mean and std)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor, chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the first frame alone, then `chunk` frames (a multiple of 4) at a time."""
        frames, ts = x.shape[2], self.cfg.time_scale
        if chunk < ts or chunk % ts:
            raise ValueError(f"encode chunk {chunk} must be a positive multiple of {ts} frames")
        if (frames - 1) % ts:
            raise UserError("bad_input", f"A Wan video has 1 + {ts}k frames (got {frames}): use "
                            f"{1 + (frames - 1) // ts * ts} or {1 + ((frames - 1) // ts + 1) * ts} frames.")
        x = patchify(x, self.cfg.patch_size)
        state: State = {}
        outs = [self.encoder(x[:, :, :1], state)]
        for start in range(1, frames, chunk):
            outs.append(self.encoder(x[:, :, start:start + chunk], state))
        h = self.quant_conv(torch.cat(outs, dim=2))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, chunk: int | None = 1) -> torch.Tensor:
        """Decode `chunk` latent frames per step (None: all at once); same result, different peak memory."""
        z = self.post_quant_conv(z)
        state: State = {}
        step = z.shape[2] if chunk is None else chunk
        outs = [self.decoder(z[:, :, s:s + step], state) for s in range(0, z.shape[2], step)]
        return unpatchify(torch.cat(outs, dim=2), self.cfg.patch_size).clamp(-1.0, 1.0)

    def tiled_decode(self, z: torch.Tensor, tile_latent: int | None = 32, overlap: int = 8,
                     chunk: int | None = 1) -> torch.Tensor:
        """Decode in overlapping spatial tiles (each chunked in time exactly) blended linearly."""
        return tiled_decode_3d(lambda t: self.decode(t, chunk), z, tile_latent=tile_latent, overlap=overlap,
                               scale=self.cfg.scale, time_chunk=None, time_scale=self.cfg.time_scale)

    def decode_with_fallback(self, z: torch.Tensor, tiles: tuple[int | None, ...] = (None, 64, 32, 16),
                             on_fallback: Callable[[int | None, int | None], None] | None = None) -> torch.Tensor:
        """Decode whole (None) or in spatial tiles of that many latent pixels, trying each size in turn after
        an out-of-memory error; `on_fallback(failed, next)` lets the caller tell the user."""
        for i, tile in enumerate(tiles):
            try:
                return self.decode(z) if tile is None else self.tiled_decode(z, tile, max(tile // 4, 1))
            except torch.OutOfMemoryError:
                pass  # leave the except block first so the failed attempt's tensors are freed
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_fallback is not None:
                on_fallback(tile, tiles[i + 1] if i + 1 < len(tiles) else None)
        h, w = z.shape[-2] * self.cfg.scale, z.shape[-1] * self.cfg.scale
        raise UserError("out_of_memory", f"Decoding the {w}x{h} video ran out of memory even in tiles of "
                        f"{tiles[-1]} latent pixels. Make the video smaller or shorter, close other programs "
                        "using the GPU, or set a lower VRAM budget so models are offloaded first.")

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.cfg.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latent)
        return (latent.float() * std + mean).to(latent.dtype)


# ---------------------------------------------------------------- layouts and loading

PREFIXES = ("vae.", "first_stage_model.")
_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
             "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}


def is_original_layout(sd: dict[str, torch.Tensor]) -> bool:
    return "encoder.conv1.weight" in sd or any(k.startswith("decoder.upsamples.") for k in sd)


def _block_key(rest: str) -> str:
    return _RESIDUAL.get(rest, rest)


def convert_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan VAE keys -> diffusers layout. The decoder's flat `upsamples` list is regrouped:
    residual blocks go into the current up block, and a resampler closes it."""
    out: dict[str, torch.Tensor] = {}
    up_entries: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        side, _, rest = key.partition(".")
        if key.startswith(("conv1.", "conv2.")):
            out[("quant_conv." if side == "conv1" else "post_quant_conv.") + rest] = t
        elif m := re.match(r"(encoder|decoder)\.conv1\.(.*)", key):
            out[f"{m[1]}.conv_in.{m[2]}"] = t
        elif m := re.match(r"(encoder|decoder)\.head\.(0\.gamma|2\.weight|2\.bias)$", key):
            out[f"{m[1]}." + {"0.gamma": "norm_out.gamma", "2.weight": "conv_out.weight", "2.bias": "conv_out.bias"}[
                m[2]]] = t
        elif m := re.match(r"(encoder|decoder)\.middle\.(\d)\.(.*)", key):
            i = int(m[2])
            where = "attentions.0" if i == 1 else f"resnets.{i // 2}"
            out[f"{m[1]}.mid_block.{where}.{_block_key(m[3])}"] = t
        elif m := re.match(r"(encoder|decoder)\.(down|up)samples\.(\d+)\.(down|up)samples\.(\d+)\.(.*)", key):
            # Wan 2.2: one nested list per level; its resampler comes after the residual blocks
            blocks = "down_blocks" if m[1] == "encoder" else "up_blocks"
            sampler = "downsampler" if m[1] == "encoder" else "upsampler"
            if m[6].startswith(("resample.", "time_conv.")):
                out[f"{m[1]}.{blocks}.{m[3]}.{sampler}.{m[6]}"] = t
            else:
                out[f"{m[1]}.{blocks}.{m[3]}.resnets.{m[5]}.{_block_key(m[6])}"] = t
        elif m := re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key):
            out[f"encoder.down_blocks.{m[1]}.{_block_key(m[2])}"] = t
        elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key):
            up_entries.setdefault(int(m[1]), []).append((m[2], t))
        else:
            out[key] = t
    level, res = 0, 0
    for idx in sorted(up_entries):
        entries = up_entries[idx]
        if any(rest.startswith(("resample.", "time_conv.")) for rest, _ in entries):
            for rest, t in entries:
                out[f"decoder.up_blocks.{level}.upsamplers.0.{rest}"] = t
            level, res = level + 1, 0
        else:
            for rest, t in entries:
                out[f"decoder.up_blocks.{level}.resnets.{res}.{_block_key(rest)}"] = t
            res += 1
    return out


def normalize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> ours: diffusers, original Wan (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`, ComfyUI's
    wan_2.1_vae / wan2.2_vae)."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return convert_original(sd) if is_original_layout(sd) else sd


def load_wan_vae(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, config: dict | None = None) -> WanVAE:
    """Build on the meta device and take the tensors as they are (copies only for a dtype/device change).

    `config`: a diffusers vae/config.json (studio.models.diffusers_config.read_config); its latent
    statistics win over the released ones the latent width picks."""
    overrides: dict = {}
    if config:
        from studio.models.diffusers_config import wan_vae_settings

        overrides = wan_vae_settings(config)
    sd = normalize_state_dict(sd)
    cfg = WanVAEConfig.from_state_dict(sd, **overrides)
    if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
        raise UserError("bad_model", f"{(config or {}).get('_where', 'vae/config.json')}: latents_mean/latents_std "
                        f"do not have one value per latent channel ({cfg.z_dim} in the weights): the folder mixes "
                        "two models. Download it again.")
    try:
        vae, missing, unexpected = build_on_meta(lambda: WanVAE(cfg), sd, dtype=dtype, device=device)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise UserError("bad_model", "The VAE weights have shapes that do not fit a Wan VAE: the file is damaged "
                        "or mixes two models.", detail=str(e)[:500]) from e
    if missing or unexpected:
        raise UserError("bad_model", "The weights do not fit the Wan VAE (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}): the file is damaged or of another kind.")
    return vae
