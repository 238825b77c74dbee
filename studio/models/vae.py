"""AutoencoderKL (the KL-f8 VAE of SD1, SD2, SDXL; with 16 latent channels also SD3's and Flux's).

Module names follow the diffusers layout (`encoder.down_blocks.0.resnets.0.conv1.weight`);
`convert_ldm_vae` maps the original LDM layout (`encoder.down.0.block.0.conv1.weight`, also
under `first_stage_model.` inside a checkpoint) onto it. The config is read from tensor
shapes; the latent scaling comes from the family, because SD1 and SDXL VAEs have identical
shapes but different scales.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import UserError
from studio.models.loader import build_on_meta
from studio.nn.attention import attention

# (scaling_factor, shift_factor): latent = (mean - shift) * scale.
FAMILY_SCALING: dict[str, tuple[float, float]] = {
    "sd1": (0.18215, 0.0),
    "sd2": (0.18215, 0.0),
    "sdxl": (0.13025, 0.0),
    "sd3": (1.5305, 0.0609),
    "flux": (0.3611, 0.1159),
}


@dataclass
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    family: str = "sd1"
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_family(cls, family: str, **overrides) -> VAEConfig:
        """The published config of a family's VAE: SD1/SD2/SDXL 4 channels, SD3/Flux 16 without quant convs."""
        if family not in FAMILY_SCALING:
            raise ValueError(f"unknown VAE family {family!r}: pick one of {', '.join(FAMILY_SCALING)}")
        scale, shift = FAMILY_SCALING[family]
        sixteen = family in ("sd3", "flux")
        base = cls(latent_channels=16 if sixteen else 4, use_quant_conv=not sixteen, use_post_quant_conv=not sixteen,
                   scaling_factor=scale, shift_factor=shift, family=family)
        return replace(base, **overrides)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], family: str | None = None,
                        norm_num_groups: int = 32) -> VAEConfig:
        """Read the architecture from a diffusers-layout state dict's shapes.

        `family` picks the latent scaling; without it 4 latent channels mean SD1 and 16 mean Flux
        (SDXL and SD3 files are shape-identical to those, so pass the checkpoint's family).
        """
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        if not levels or "decoder.conv_in.weight" not in sd:
            raise UserError("bad_model", "This file holds no KL VAE weights (no encoder/decoder blocks): "
                            "pick a VAE file or a checkpoint that contains one.")
        channels = tuple(int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels)
        layers = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
        latent = int(sd["decoder.conv_in.weight"].shape[1])
        if family is None:
            family = "flux" if latent == 16 else "sd1"
        scale, shift = FAMILY_SCALING[family]
        return cls(
            block_out_channels=channels,
            layers_per_block=layers,
            latent_channels=latent,
            in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
            out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
            norm_num_groups=norm_num_groups,
            use_quant_conv="quant_conv.weight" in sd,
            use_post_quant_conv="post_quant_conv.weight" in sd,
            mid_attention="encoder.mid_block.attentions.0.to_q.weight" in sd,
            scaling_factor=scale,
            shift_factor=shift,
            family=family,
        )


# ---------------------------------------------------------------- blocks


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels (the VAE's mid block)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = attention(q, k, v).squeeze(1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the LDM VAE was trained


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.resnets, *self.downsamplers]:
            x = block(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.resnets, *self.upsamplers]:
            x = block(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """encode: image (B, 3, H, W) in [-1, 1] -> (mean, logvar) each (B, C, H/8, W/8); decode: the reverse.

    encode/decode work on raw VAE latents; `to_latent` / `from_latent` apply the family's
    scale and shift to go to and from the diffusion model's latent space.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw from the posterior (img2img uses the mean; training-style sampling when asked)."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                            device=generator.device if generator is not None else mean.device).to(mean.device)
        return mean + (0.5 * logvar).exp() * noise

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.cfg.scaling_factor + self.cfg.shift_factor


# ---------------------------------------------------------------- layouts and loading

VAE_PREFIXES = ("first_stage_model.", "model.first_stage_model.", "vae.")


def strip_vae_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the VAE's tensors of a full checkpoint (or a standalone VAE file) without their prefix."""
    for prefix in VAE_PREFIXES:
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if picked:
            return picked
    return {k: v for k, v in sd.items() if k.split(".", 1)[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")}


def is_ldm_layout(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in sd)


_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _ldm_key(key: str, up_levels: int) -> str:
    parts = key.split(".")
    side = parts[0]  # encoder / decoder / quant_conv / post_quant_conv
    rest = ".".join(parts[1:])
    if side not in ("encoder", "decoder"):
        return key
    rest = rest.replace("norm_out.", "conv_norm_out.")
    if m := re.match(r"down\.(\d+)\.block\.(\d+)\.(.*)", rest):
        rest = f"down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
    elif m := re.match(r"down\.(\d+)\.downsample\.(.*)", rest):
        rest = f"down_blocks.{m[1]}.downsamplers.0.{m[2]}"
    elif m := re.match(r"up\.(\d+)\.block\.(\d+)\.(.*)", rest):
        # LDM numbers decoder levels from the lowest resolution up; diffusers in execution order.
        rest = f"up_blocks.{up_levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
    elif m := re.match(r"up\.(\d+)\.upsample\.(.*)", rest):
        rest = f"up_blocks.{up_levels - 1 - int(m[1])}.upsamplers.0.{m[2]}"
    elif m := re.match(r"mid\.block_(\d)\.(.*)", rest):
        rest = f"mid_block.resnets.{int(m[1]) - 1}.{m[2]}"
    elif m := re.match(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
        rest = f"mid_block.attentions.0.{_LDM_ATTN[m[1]]}.{m[2]}"
    rest = rest.replace(".nin_shortcut.", ".conv_shortcut.")
    return f"{side}.{rest}"


def convert_ldm_vae(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LDM VAE keys (with or without `first_stage_model.`) -> diffusers layout.

    LDM's attention projections are 1x1 convs (C, C, 1, 1); ours are Linear (C, C).
    """
    sd = strip_vae_prefix(sd)
    up_levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    out = {}
    for key, tensor in sd.items():
        new = _ldm_key(key, up_levels)
        if ".attentions.0.to_" in new and new.endswith(".weight") and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        out[new] = tensor
    return out


def to_ldm_vae(sd: dict[str, torch.Tensor], up_levels: int) -> dict[str, torch.Tensor]:
    """Our (diffusers) names -> the original LDM names, for writing single-file checkpoints.

    The inverse of `convert_ldm_vae`; tests check it against diffusers' own LDM converter.
    """
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, t in sd.items():
        k = key
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up_levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up_levels - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if m := re.search(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", k):
            k = k.replace(m[0], f"mid.attn_1.{attn[m[1]]}.")
            if t.ndim == 2:
                t = t[:, :, None, None]  # LDM attention projections are 1x1 convs
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out[k] = t
    return out


def normalize_vae_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> ours: LDM (prefixed or not), diffusers, and old diffusers attention names."""
    sd = strip_vae_prefix(sd)
    if is_ldm_layout(sd):
        return convert_ldm_vae(sd)
    out = {}
    for key, tensor in sd.items():
        m = re.match(r"(.*\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            key = f"{m[1]}{_OLD_DIFFUSERS_ATTN[m[2]]}.{m[3]}"
        out[key] = tensor
    return out


def load_vae(sd: dict[str, torch.Tensor], family: str | None = None, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, norm_num_groups: int = 32) -> AutoencoderKL:
    """Build on the meta device and take the tensors as they are (no copy unless dtype/device change)."""
    sd = normalize_vae_state_dict(sd)
    cfg = VAEConfig.from_state_dict(sd, family=family, norm_num_groups=norm_num_groups)
    vae, missing, unexpected = build_on_meta(lambda: AutoencoderKL(cfg), sd, dtype=dtype, device=device)
    if missing or unexpected:
        raise UserError("bad_model", "The VAE weights do not fit a KL-f8 VAE (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}): the file is damaged or of another kind.")
    return vae
