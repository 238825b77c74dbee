"""Live previews: latent -> small RGB image every step.

The cheap path is a per-family linear map from latent channels to RGB (one matmul per step,
always on). When the user has installed a TAESD decoder for the family, `TAESD` gives a
sharper preview for a few milliseconds on a GPU.

Both take the latent in the diffusion model's space (after the VAE scale/shift, and for Wan
after its per-channel normalisation), i.e. the sampler's `denoised`.
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image
from torch import nn

from studio import families as F

# Latent -> RGB factors, (C, 3) plus an RGB bias, applied as rgb = latent . factors + bias, giving
# roughly [-1, 1]. Values from ComfyUI's comfy/latent_formats.py (classes SD15, SDXL, SD3, Flux,
# Wan21), fitted by its authors on real VAE decodes; they are measured data, not code.
LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    F.SD1: ([[0.3512, 0.2297, 0.3227],
             [0.3250, 0.4974, 0.2350],
             [-0.2829, 0.1762, 0.2721],
             [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    F.SDXL: ([[0.3651, 0.4232, 0.4341],
              [-0.2533, -0.0042, 0.1068],
              [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
    F.SD3: ([[-0.0922, -0.0175, 0.0749],
             [0.0311, 0.0633, 0.0954],
             [0.1994, 0.0927, 0.0458],
             [0.0856, 0.0339, 0.0902],
             [0.0587, 0.0272, -0.0496],
             [-0.0006, 0.1104, 0.0309],
             [0.0978, 0.0306, 0.0427],
             [-0.0042, 0.1038, 0.1358],
             [-0.0194, 0.0020, 0.0669],
             [-0.0488, 0.0130, -0.0268],
             [0.0922, 0.0988, 0.0951],
             [-0.0278, 0.0524, -0.0542],
             [0.0332, 0.0456, 0.0895],
             [-0.0069, -0.0030, -0.0810],
             [-0.0596, -0.0465, -0.0293],
             [-0.1448, -0.1463, -0.1189]], [0.2394, 0.2135, 0.1925]),
    F.FLUX: ([[-0.0346, 0.0244, 0.0681],
              [0.0034, 0.0210, 0.0687],
              [0.0275, -0.0668, -0.0433],
              [-0.0174, 0.0160, 0.0617],
              [0.0859, 0.0721, 0.0329],
              [0.0004, 0.0383, 0.0115],
              [0.0405, 0.0861, 0.0915],
              [-0.0236, -0.0185, -0.0259],
              [-0.0245, 0.0250, 0.1180],
              [0.1008, 0.0755, -0.0421],
              [-0.0515, 0.0201, 0.0011],
              [0.0428, -0.0012, -0.0036],
              [0.0817, 0.0765, 0.0749],
              [-0.1264, -0.0522, -0.1103],
              [-0.0280, -0.0881, -0.0499],
              [-0.1262, -0.0982, -0.0778]], [-0.0329, -0.0718, -0.0851]),
    F.WAN: ([[-0.1299, -0.1692, 0.2932],
             [0.0671, 0.0406, 0.0442],
             [0.3568, 0.2548, 0.1747],
             [0.0372, 0.2344, 0.1420],
             [0.0313, 0.0189, -0.0328],
             [0.0296, -0.0956, -0.0665],
             [-0.3477, -0.4059, -0.2925],
             [0.0166, 0.1902, 0.1975],
             [-0.0412, 0.0267, -0.1364],
             [-0.1293, 0.0740, 0.1636],
             [0.0680, 0.3019, 0.1128],
             [0.0032, 0.0581, 0.0639],
             [-0.1251, 0.0927, 0.1699],
             [0.0060, -0.0633, 0.0005],
             [0.3477, 0.2275, 0.2950],
             [0.1984, 0.0913, 0.1861]], [-0.1835, -0.0868, -0.3360]),
}
LATENT_RGB[F.SD2] = LATENT_RGB[F.SD1]  # same VAE and scale
# Wan 2.2's 48-channel VAE (TI2V 5B): ComfyUI's Wan22 latent format, the same kind of fitted data.
LATENT_RGB["wan22"] = ([
              [ 0.0119,  0.0103,  0.0046],
              [-0.1062, -0.0504,  0.0165],
              [ 0.0140,  0.0409,  0.0491],
              [-0.0813, -0.0677,  0.0607],
              [ 0.0656,  0.0851,  0.0808],
              [ 0.0264,  0.0463,  0.0912],
              [ 0.0295,  0.0326,  0.0590],
              [-0.0244, -0.0270,  0.0025],
              [ 0.0443, -0.0102,  0.0288],
              [-0.0465, -0.0090, -0.0205],
              [ 0.0359,  0.0236,  0.0082],
              [-0.0776,  0.0854,  0.1048],
              [ 0.0564,  0.0264,  0.0561],
              [ 0.0006,  0.0594,  0.0418],
              [-0.0319, -0.0542, -0.0637],
              [-0.0268,  0.0024,  0.0260],
              [ 0.0539,  0.0265,  0.0358],
              [-0.0359, -0.0312, -0.0287],
              [-0.0285, -0.1032, -0.1237],
              [ 0.1041,  0.0537,  0.0622],
              [-0.0086, -0.0374, -0.0051],
              [ 0.0390,  0.0670,  0.2863],
              [ 0.0069,  0.0144,  0.0082],
              [ 0.0006, -0.0167,  0.0079],
              [ 0.0313, -0.0574, -0.0232],
              [-0.1454, -0.0902, -0.0481],
              [ 0.0714,  0.0827,  0.0447],
              [-0.0304, -0.0574, -0.0196],
              [ 0.0401,  0.0384,  0.0204],
              [-0.0758, -0.0297, -0.0014],
              [ 0.0568,  0.1307,  0.1372],
              [-0.0055, -0.0310, -0.0380],
              [ 0.0239, -0.0305,  0.0325],
              [-0.0663, -0.0673, -0.0140],
              [-0.0416, -0.0047, -0.0023],
              [ 0.0166,  0.0112, -0.0093],
              [-0.0211,  0.0011,  0.0331],
              [ 0.1833,  0.1466,  0.2250],
              [-0.0368,  0.0370,  0.0295],
              [-0.3441, -0.3543, -0.2008],
              [-0.0479, -0.0489, -0.0420],
              [-0.0660, -0.0153,  0.0800],
              [-0.0101,  0.0068,  0.0156],
              [-0.0690, -0.0452, -0.0927],
              [-0.0145,  0.0041,  0.0015],
              [ 0.0421,  0.0451,  0.0373],
              [ 0.0504, -0.0483, -0.0356],
              [-0.0837,  0.0168,  0.0055],
], [0.0317, -0.0878, -0.1388])
VIDEO_FAMILIES = {F.WAN, "wan22"}


def _frame(latent: torch.Tensor, family: str, frame: int) -> torch.Tensor:
    """Pick the first batch item (and one frame of a video latent): -> (C, h, w)."""
    video = family in VIDEO_FAMILIES
    if latent.ndim == (5 if video else 4):
        latent = latent[0]
    if video:
        if latent.ndim != 4:
            raise ValueError(f"a {family} latent is (B, C, T, h, w) or (C, T, h, w), got {tuple(latent.shape)}")
        latent = latent[:, frame]
    if latent.ndim != 3:
        raise ValueError(f"an image latent is (B, C, h, w) or (C, h, w), got {tuple(latent.shape)}")
    return latent


def latent_to_rgb(latent: torch.Tensor, family: str, frame: int = 0) -> np.ndarray:
    """(B, C, h, w) / (C, h, w) latent (video: (B, C, T, h, w), one frame) -> uint8 (h, w, 3)."""
    if family not in LATENT_RGB:
        raise ValueError(f"no preview factors for {family!r}: known are {', '.join(sorted(LATENT_RGB))}")
    factors, bias = LATENT_RGB[family]
    z = _frame(latent.detach(), family, frame).float()
    if z.shape[0] != len(factors):
        raise ValueError(f"{family} previews expect {len(factors)} latent channels, got {z.shape[0]}")
    weight = torch.tensor(factors, dtype=torch.float32, device=z.device)  # (C, 3)
    rgb = torch.einsum("chw,cr->hwr", z, weight) + torch.tensor(bias, device=z.device)  # (h, w, 3) in ~[-1, 1]
    return _to_uint8(rgb)


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(h, w, 3) in [-1, 1] -> uint8 numpy."""
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def rgb_to_jpeg(rgb: np.ndarray, max_side: int = 256, quality: int = 80) -> tuple[bytes, int, int]:
    """uint8 (H, W, 3) -> (JPEG bytes, width, height), shrunk so the longer side is at most max_side."""
    img = Image.fromarray(rgb, "RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.width, img.height


def preview_jpeg(latent: torch.Tensor, family: str, max_side: int = 256, taesd: TAESD | None = None) -> bytes:
    """The JPEG the engine sends as a `preview` event: TAESD when given, else the linear projection."""
    rgb = taesd.to_rgb(latent, family) if taesd is not None else latent_to_rgb(latent, family)
    return rgb_to_jpeg(rgb, max_side)[0]


# ---------------------------------------------------------------- TAESD (madebyollin/taesd decoder)


def _conv(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class TAESDBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESD(nn.Module):
    """Tiny AutoEncoder decoder: (B, C, h, w) model-space latent -> (B, 3, 8h, 8w) image in [0, 1].

    Module indices follow diffusers' `decoder.layers.N`; the original taesd files number the same
    layers from 1 (index 0 there is the input clamp, which we apply in forward).
    """

    def __init__(self, latent_channels: int = 4, channels: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(latent_channels, channels), nn.ReLU()]
        for level in range(4):
            final = level == 3
            layers += [TAESDBlock(channels) for _ in range(1 if final else 3)]
            if not final:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(channels, channels, bias=False)]
        layers.append(_conv(channels, 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(z / 3) * 3)

    @torch.no_grad()
    def to_rgb(self, latent: torch.Tensor, family: str = F.SD1, frame: int = 0) -> np.ndarray:
        """Same contract as latent_to_rgb: one image as uint8 (8h, 8w, 3)."""
        p = next(self.parameters())
        z = _frame(latent.detach(), family, frame)[None].to(p.device, p.dtype)
        img = self(z)[0].float()  # (3, H, W) in [0, 1]
        return _to_uint8(img.permute(1, 2, 0) * 2 - 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> TAESD:
        """Load a TAESD/TAESDXL/TAESD3/TAEF1 decoder from the diffusers layout (`decoder.layers.N.*`),
        a full taesd file (`decoder.N.*`) or a decoder-only taesd file (`N.*`)."""
        out = {}
        for key, tensor in sd.items():
            if m := re.match(r"decoder\.layers\.(\d+)\.(.*)", key):
                index, rest = int(m[1]), m[2]
            elif m := re.match(r"(?:decoder\.|taesd_decoder\.)?(\d+)\.(.*)", key):
                index, rest = int(m[1]) - 1, m[2]  # original numbering starts with the clamp at 0
            else:
                continue  # encoder weights or metadata of a full TAESD file
            out[f"layers.{index}.{rest}"] = tensor
        if "layers.0.weight" not in out:
            raise ValueError("not a TAESD decoder: no first conv (decoder.layers.0 / 1.weight) in the file")
        latent_channels, channels = int(out["layers.0.weight"].shape[1]), int(out["layers.0.weight"].shape[0])
        with torch.device("meta"):
            model = cls(latent_channels, channels)
        model.load_state_dict(out, strict=True, assign=True)
        return model.eval()
