"""Quantized single-file diffusion models: city96-style GGUF and ComfyUI fp8 / fp8-scaled safetensors.

GGUF (ComfyUI-GGUF's converter): tensor names are the safetensors file's own
(`blocks.0.self_attn.q.weight`, `input_blocks.1.1.proj_in.weight`, maybe under
`model.diffusion_model.`); dims are stored innermost first (we read them reversed, torch order).
The converter flattens some tensors to rows of 256 so they quantize, and writes their real shape
in `comfy.gguf.orig_shape.<name>` (torch order); 5-D tensors (Wan's patch embedding) are F32.

fp8: `*_fp8_e4m3fn.safetensors` stores weights as float8_e4m3fn; `*_fp8_scaled.safetensors` adds
one `<layer>.scale_weight` per fp8 layer (real weight = fp8 value * scale), `<layer>.scale_input`
(activation scales for fp8 matmuls, unused for weight-only use) and a `scaled_fp8` marker.

Reading gives a state dict whose compact entries are QuantWeights (studio.nn): GGUFWeight for
quantized matrices, Fp8Weight for fp8 tensors. `build_compact` then builds the model on the meta device:
a compact weight of an nn.Linear becomes a GGUFLinear / Fp8Linear that keeps it as stored and
dequantizes per call on its own device; every other compact tensor (convs, norms, modulation
tables) is dequantized to the compute dtype. `dequantized` turns a compact state dict back into
plain tensors, for the parts (VAE, text encoders) that are small or run rarely.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from studio.errors import UserError
from studio.models.loader import build_on_meta
from studio.nn.gguf_dequant import GGML_TYPE_BY_NAME, dequantize, row_bytes
from studio.nn.packed import QuantWeight
from studio.nn.packed_fp8 import FP8_DTYPES, Fp8Linear, Fp8Weight
from studio.nn.packed_gguf import GGUFLinear, GGUFWeight

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# --- fp8 ------------------------------------------------------------------------------------------

def unpack_fp8(sd: dict[str, Tensor], *, compact: bool, dtype: torch.dtype | None = None) -> dict:
    """A safetensors state dict with fp8 weights -> one a model loads: scale keys folded in, markers dropped.

    compact=True: fp8 tensors become Fp8Weight (stored bytes kept). compact=False: scaled fp8 tensors
    are dequantized to `dtype` (bfloat16 if None, the dtype they are made for); unscaled ones stay fp8
    for the caller's dtype cast. A `scale_weight` on a non-fp8 weight is applied too.
    """
    scales = {k[: -len("scale_weight")] + "weight": v for k, v in sd.items() if k.endswith(".scale_weight")}
    if not scales and not any(v.dtype in FP8_DTYPES for v in sd.values()):
        return sd
    out: dict = {}
    for key, t in sd.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = scales.pop(key, None)
        if t.dtype in FP8_DTYPES and compact:
            out[key] = Fp8Weight(t, scale)
        elif scale is not None:
            out[key] = Fp8Weight(t, scale).dequantize(dtype or (torch.bfloat16 if t.dtype in FP8_DTYPES else t.dtype))
        else:
            out[key] = t
    if scales:
        some = ", ".join(sorted(scales)[:3])
        raise UserError("bad_model", f"the file has scale_weight entries for weights it does not hold ({some}); "
                        "it is damaged or incomplete: download it again")
    return out


# --- GGUF -----------------------------------------------------------------------------------------

def _orig_shape(meta: dict, name: str) -> tuple[int, ...] | None:
    value = meta.get(ORIG_SHAPE_KEY + name)
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return ()  # reported by the caller as a shape that does not fit


def read_gguf_diffusion(path: str | os.PathLike) -> dict[str, Tensor | GGUFWeight]:
    """Tensors of a GGUF diffusion model under their own names, none copied: F32/F16/BF16 as views of
    the mapped file, quantized matrices as GGUFWeight, other quantized tensors dequantized (float32)."""
    from studio.library.headers import HeaderError, read_gguf

    path = Path(path)
    try:
        header = read_gguf(path)
    except FileNotFoundError:
        raise UserError("model_not_found", f"{path} does not exist; was it moved or deleted?") from None
    except HeaderError as exc:
        raise UserError("bad_model", f"{path.name} is a GGUF file that cannot be read ({exc}); it is probably "
                        "damaged or incomplete: download it again.") from None
    with open(path, "rb") as fh:
        # ACCESS_COPY: private pages, so tensors on views can be written without touching the file
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    data = torch.frombuffer(buf, dtype=torch.uint8)
    out: dict[str, Tensor | GGUFWeight] = {}
    for name, info in header.tensors.items():
        t = GGML_TYPE_BY_NAME.get(info.dtype)
        if t is None:
            raise UserError("unsupported", f"{path.name}: tensor {name} is stored as GGML {info.dtype}, which Studio "
                            "cannot read yet. Use a Q8_0, Q6_K, Q5_K_M, Q5_0, Q4_K_M, Q4_0 or F16 file of the model.")
        shape = _orig_shape(header.metadata, name) or info.shape
        if math.prod(shape) != math.prod(info.shape):
            raise UserError("bad_model", f"{path.name}: tensor {name} holds {math.prod(info.shape)} values but its "
                            f"original shape {shape} needs {math.prod(shape)}; the file is damaged")
        raw = data[info.offset:info.offset + info.nbytes]
        if t.name in _FLOATS:
            out[name] = raw.view(_FLOATS[t.name]).reshape(shape)
        elif info.shape[-1] % t.block_size:
            raise UserError("bad_model", f"{path.name}: tensor {name} has rows of {info.shape[-1]} values, not whole "
                            f"{t.name} blocks; the file is damaged")
        elif len(shape) == 2:
            out[name] = GGUFWeight(raw.view(-1, row_bytes(t.id, info.shape[-1])), t.id, (shape[0], shape[1]))
        else:
            out[name] = dequantize(raw, t.id, shape)
    return out


# --- building a model from compact weights --------------------------------------------------------

def is_compact(sd: dict) -> bool:
    return any(isinstance(v, QuantWeight) for v in sd.values())


def dequantized(sd: dict, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every compact entry as a plain tensor of `dtype` (float32 if None); plain tensors as they are."""
    return {k: v.dequantize(dtype or torch.float32) if isinstance(v, QuantWeight) else v for k, v in sd.items()}


def build_compact(make: Callable[[], nn.Module], sd: dict, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[nn.Module, list[str], list[str]]:
    """build_on_meta for a state dict that may hold compact weights: (model, missing, unexpected).

    An nn.Linear whose weight is compact is replaced by the QuantWeight's module (GGUFLinear,
    Fp8Linear), its bias loaded as usual (cast to `dtype`); other compact tensors are dequantized
    to `dtype` (float32 if None).
    """
    if not is_compact(sd):
        return build_on_meta(make, sd, dtype=dtype, device=device)
    with torch.device("meta"):
        skeleton = make()
    modules = dict(skeleton.named_modules())
    swaps: dict[str, QuantWeight] = {}
    plain: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, QuantWeight):
            plain[key] = value
            continue
        name, _, leaf = key.rpartition(".")
        mod = modules.get(name)
        if leaf == "weight" and type(mod) is nn.Linear and tuple(value.shape) == (mod.out_features, mod.in_features):
            swaps[name] = value
        else:
            plain[key] = value.dequantize(dtype or torch.float32)
    del skeleton
    model, missing, unexpected = build_on_meta(make, plain, dtype=dtype, device=device)
    modules = dict(model.named_modules())
    for name, weight in swaps.items():
        lin = modules[name]
        bias = lin.bias if lin.bias is not None and not lin.bias.is_meta else None
        new = weight.to_module(bias) if not isinstance(weight, GGUFWeight) else weight.to_module(bias, mode="gguf")
        if device is not None:
            new = new.to(device)
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
    swapped = {f"{n}.weight" for n in swaps}
    # a bias the file lacks stays reported as missing (the Linear had one and got none)
    missing = [k for k in missing if k not in swapped]
    return model.eval(), missing, unexpected


def compact_summary(model: nn.Module) -> str:
    """What a loaded model keeps compact, for notes: "312 GGUF Q8_0 / 4 fp8 layers"."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, GGUFLinear):
            what = f"GGUF {m.weight_q.type_name}"
        elif isinstance(m, Fp8Linear):
            what = "fp8"
        else:
            continue
        counts[what] = counts.get(what, 0) + 1
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) + " layers" if counts else ""
