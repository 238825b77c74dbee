"""Reading weight files: one flat state dict from any single file, without doubling RAM or running code.

safetensors files are memory-mapped: the tensors returned are views of the file's pages, so
RAM holds one copy (in the page cache, shared and reclaimable), not a second anonymous one.
PyTorch pickles (.ckpt/.pt/.pth/.bin) are opened only with torch.load(weights_only=True), which
refuses any pickle that needs Python globals. The format is chosen from the file's first bytes,
never from its name. GGUF and fp8 diffusion files go through diffusion_quant.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from studio.errors import UserError

_PICKLE_FIX = ("Studio never runs code from model files. Get the .safetensors version of this model, "
               "or convert this file with a tool you trust")


def sniff_format(path: str | os.PathLike) -> str:
    """'safetensors', 'gguf', 'torch_zip', 'torch_legacy' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch_zip"
    if head[:1] == b"\x80":  # pickle protocol marker: torch.save's pre-1.6 format
        return "torch_legacy"
    return "unknown"


def load_safetensors_mmap(path: str | os.PathLike, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, memory-mapped on the CPU (or read straight to `device`).

    `dtype` converts floating-point tensors; that conversion makes a real copy, tensor by tensor.
    """
    from safetensors import SafetensorError, safe_open

    device = torch.device(device)
    name = Path(path).name
    try:
        # On the CPU safetensors maps the file; on a GPU it copies each tensor from the mapping.
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            out = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except SafetensorError as exc:
        raise UserError("bad_model", f"{name} is not a readable safetensors file ({exc}); "
                        "it may be truncated: download it again") from None
    except FileNotFoundError:
        raise UserError("model_not_found", f"{path} does not exist; was it moved or deleted?") from None
    if dtype is not None:
        out = {k: t.to(dtype) if t.is_floating_point() else t for k, t in out.items()}
    return out


def load_pickle_weights(path: str | os.PathLike, on_notice: Callable[[str], None] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Tensors of a PyTorch checkpoint, loaded with weights_only=True (memory-mapped when the format allows).

    A checkpoint whose pickle needs Python classes or functions is refused with UserError('bad_model').
    """
    name = Path(path).name
    fmt = sniff_format(path)
    if fmt not in ("torch_zip", "torch_legacy"):
        raise UserError("bad_model", f"{name} is not a PyTorch checkpoint (it looks like {fmt})")
    mmap = fmt == "torch_zip"  # the pre-1.6 format cannot be mapped and is read whole into RAM
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"Python code ({found.group(1)})" if found else "Python code"
        raise UserError("bad_model", f"{name} is a pickle that needs {what} to load; {_PICKLE_FIX}.",
                        detail=str(exc)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError("bad_model", f"{name} could not be read as a PyTorch checkpoint ({exc}); "
                        "it may be truncated: download it again") from None
    tensors = _tensors_of(obj)
    if not tensors:
        raise UserError("bad_model", f"{name} holds no weights (a training state or an empty checkpoint?)")
    how = "memory-mapped" if mmap else "read whole into RAM (old format, cannot be memory-mapped)"
    if on_notice is not None:
        on_notice(f"{name} is a PyTorch pickle: loaded with PyTorch's weights-only loader (no code run), {how}. "
                  "A .safetensors copy loads faster.")
    return tensors


def _tensors_of(obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: Lightning/LDM keep it under 'state_dict', some under 'model'."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return {}


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 on_notice: Callable[[str], None] | None = None, *, compact: bool = False) -> dict[str, Any]:
    """Any single weights file we read as a flat state dict, chosen by its content.

    Quantized files (GGUF diffusion models, fp8 and fp8-scaled safetensors) are read through
    studio.models.diffusion_quant. compact=True keeps their weights as stored (QuantWeight values,
    for `diffusion_quant.build_compact`; they stay on the CPU whatever `device` says);
    compact=False returns plain tensors: GGUF dequantized, scale_weight applied and its keys dropped.
    """
    from studio.models import diffusion_quant as dq  # it imports the model loader; not needed for plain files

    fmt = sniff_format(path)
    if fmt == "safetensors":
        sd = dq.unpack_fp8(load_safetensors_mmap(path, device), compact=compact, dtype=dtype)
        return _cast(sd, device, dtype) if dtype is not None else sd
    if fmt in ("torch_zip", "torch_legacy"):
        sd = dq.unpack_fp8(load_pickle_weights(path, on_notice), compact=compact, dtype=dtype)
        if dtype is not None or torch.device(device).type != "cpu":
            sd = _cast(sd, device, dtype)
        return sd
    if fmt == "gguf":
        sd = dq.read_gguf_diffusion(path)
        if not compact:
            sd = dq.dequantized(sd, dtype)
        return _cast(sd, device, dtype) if dtype is not None or torch.device(device).type != "cpu" else sd
    raise UserError("bad_model", f"{Path(path).name} is not a safetensors, GGUF or PyTorch file; "
                    "Studio reads .safetensors, .gguf, PyTorch checkpoints and model folders")


def _cast(sd: dict[str, Any], device: str | torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """Plain floating tensors to `dtype` and every plain tensor to `device`; compact weights stay as they are."""
    return {k: t if not isinstance(t, torch.Tensor) else
            t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
            for k, t in sd.items()}
