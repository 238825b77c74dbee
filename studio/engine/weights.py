"""Weights: loading without doubling RAM or running code from model files, and quantizing them.

Files are read by studio.models.weights_io (memory-mapped safetensors, weights-only pickles, GGUF).
Build the model on the meta device and `load_into(model, state_dict)` with assign=True: the
parameters then *are* those mapped tensors, nothing is copied.

`quantize_model` swaps a model's Linear layers for weight-only int8 / int4 / fp8 ones, and
`memory_report` says what that saved and what it cost in accuracy on a fixed input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from studio.engine.context import UserError
from studio.engine.offload import estimate_module_bytes


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

    int8 (per channel) and int4 (group-wise, default group 64) come from studio.nn.packed_int; fp8 is
    e4m3 storage with per-channel scales (Fp8Linear). `skip(name, linear)` keeps chosen layers in full
    precision; layers whose shape a format cannot take (in_features not a multiple of the int4 group,
    or of 16 for int8) are kept too, with the reason in the summary.
    """
    if mode not in QUANT_MODES and mode not in ("int4-32", "int4-64", "int4-128"):
        raise UserError("bad_input", f"unknown quantization {mode!r}: choose one of {', '.join(QUANT_MODES)} "
                        "(int4 takes a group size too: int4-32, int4-64, int4-128)")
    if mode == "fp8":
        from studio.nn.packed_fp8 import Fp8Linear, fp8_supported

        if not fp8_supported():
            raise UserError("unsupported", "this PyTorch build cannot store float8 weights; choose int8 or int4")

        def convert(lin: nn.Linear) -> nn.Module:
            return Fp8Linear.from_linear(lin)
    else:
        from studio.nn.packed_int import quantize_linear

        def convert(lin: nn.Linear) -> nn.Module:
            return quantize_linear(lin.weight.detach(), mode).to_module(lin.bias)

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
