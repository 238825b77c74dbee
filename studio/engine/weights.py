"""Weights: loading without doubling RAM or running code from model files, and quantizing them.

safetensors files are memory-mapped: the tensors returned are views of the file's pages, so
RAM holds one copy (in the page cache, shared and reclaimable), not a second anonymous one.
Build the model on the meta device and `load_into(model, state_dict)` with assign=True: the
parameters then *are* those mapped tensors, nothing is copied.

PyTorch pickles (.ckpt/.pt/.pth/.bin) are opened only with torch.load(weights_only=True), which
refuses any pickle that needs Python globals. The format is chosen from the file's first bytes,
never from its name.

`quantize_model` swaps a model's Linear layers for weight-only int8 / int4 / fp8 ones, and
`memory_report` says what that saved and what it cost in accuracy on a fixed input.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.engine.context import UserError
from studio.engine.offload import estimate_module_bytes

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
    from studio.models import diffusion_quant as dq

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


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, assign: bool = True,
              strict: bool = True, what: str = "model") -> LoadReport:
    """Load a state dict into a module (typically built on the meta device), without copying.

    With assign=True the module's parameters become the given tensors (memory-mapped ones stay
    mapped). Mismatches become UserError('bad_model') naming a few keys; with strict=False missing
    and unexpected keys are only reported, but a parameter left on the meta device is still an error.
    """
    try:
        result = module.load_state_dict(dict(state_dict), strict=False, assign=assign)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        first = str(exc).split("\n\t")[1:3]
        raise UserError("bad_model", f"the weights do not fit this {what}: {'; '.join(first) or exc}. "
                        "The file is probably another variant: check the family shown by `studio models info`",
                        detail=str(exc)) from None
    report = LoadReport(list(result.missing_keys), list(result.unexpected_keys))
    if strict and (report.missing or report.unexpected):
        raise UserError("bad_model", f"the weights do not match this {what}: {_some(report.missing)} missing, "
                        f"{_some(report.unexpected)} unexpected. The file is probably another model type or "
                        "variant: check the family shown by `studio models info`")
    never = [k for k, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    if never:
        raise UserError("bad_model", f"the file has no weights for {_some(never)} of this {what}; "
                        "it may be a partial checkpoint (a LoRA or one component of a model?)")
    return report


def _some(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"{len(keys)} ({', '.join(keys[:n])}{more})"


# ---------------------------------------------------------------------------
# Quantization as a per-model choice: swap Linear layers for weight-only quantized ones.

QUANT_MODES = ("int8", "int4", "fp8")


@dataclass
class QuantSummary:
    mode: str
    replaced: list[str]
    skipped: dict[str, str]  # layer name -> why it kept full precision
    bytes_before: int
    bytes_after: int


def quantize_model(module: nn.Module, mode: str,
                   skip: Callable[[str, nn.Linear], bool] | None = None) -> QuantSummary:
    """Replace every nn.Linear of `module` (in place) by a weight-only quantized module.

    int8 (per channel) and int4 (group-wise, default group 64) come from studio.engine.quant; fp8 is
    e4m3 storage with per-channel scales (Fp8Linear). `skip(name, linear)` keeps chosen layers in full
    precision; layers whose shape a format cannot take (in_features not a multiple of the int4 group,
    or of 16 for int8) are kept too, with the reason in the summary.
    """
    if mode not in QUANT_MODES and mode not in ("int4-32", "int4-64", "int4-128"):
        raise UserError("bad_input", f"unknown quantization {mode!r}: choose one of {', '.join(QUANT_MODES)} "
                        "(int4 takes a group size too: int4-32, int4-64, int4-128)")
    if mode == "fp8":
        from studio.engine.offload import Fp8Linear, fp8_supported

        if not fp8_supported():
            raise UserError("unsupported", "this PyTorch build cannot store float8 weights; choose int8 or int4")

        def convert(lin: nn.Linear) -> nn.Module:
            return Fp8Linear.from_linear(lin)
    else:
        try:
            from studio.engine import quant
        except ImportError as exc:
            raise UserError("unsupported", f"{mode} quantization is not available in this build ({exc})") from exc

        def convert(lin: nn.Linear) -> nn.Module:
            return quant.quantize_linear(lin.weight.detach(), mode).to_module(lin.bias)

    before = estimate_module_bytes(module)
    replaced: list[str] = []
    skipped: dict[str, str] = {}
    # Collect first: replacing children while iterating named_modules would revisit new ones.
    targets = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    parents = dict(module.named_modules())
    for name, lin in targets:
        if skip is not None and skip(name, lin):
            skipped[name] = "kept in full precision on request"
            continue
        if mode == "int8" and lin.in_features % 16:
            # torch 2.13's packed int8 CPU kernel crashes the process on such shapes; a tiny layer anyway.
            skipped[name] = f"in_features {lin.in_features} is not a multiple of 16"
            continue
        try:
            new = convert(lin)
        except ValueError as exc:  # a shape the format cannot take
            skipped[name] = str(exc)
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(parents[parent_name], attr, new)
        replaced.append(name)
    return QuantSummary(mode, replaced, skipped, before, estimate_module_bytes(module))


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"cannot compare outputs of type {type(out).__name__}")


@torch.no_grad()
def memory_report(original: nn.Module, quantized: nn.Module, sample_input: Any) -> dict[str, Any]:
    """Bytes saved by quantization and the error it costs, on a fixed input (for `studio models info`).

    `sample_input` is a tensor or a tuple of positional arguments.
    """
    args = sample_input if isinstance(sample_input, tuple) else (sample_input,)
    ref = _first_tensor(original(*args)).float()
    out = _first_tensor(quantized(*args)).float()
    err = (out - ref).abs()
    scale = ref.abs().max().clamp(min=1e-12)
    before, after = estimate_module_bytes(original), estimate_module_bytes(quantized)
    return {
        "bytes_original": before,
        "bytes_quantized": after,
        "bytes_saved": before - after,
        "ratio": after / before if before else 1.0,
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "relative_error": float(err.max() / scale),  # max error against the largest output magnitude
    }
