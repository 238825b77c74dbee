"""float8 e4m3 weights: the Fp8Weight a file stores and the Fp8Linear that upcasts it per call.

Fp8Linear halves the bytes of a bf16 weight (quarters fp32) and upcasts the weight for this layer
only, just before its matmul (the same idea as block streaming: keep weights small until the
moment they are needed), so it runs wherever torch can cast to fp8. ComfyUI's fp8 files come
unscaled (`*_fp8_e4m3fn`) or with one scale per tensor (`*_fp8_scaled`); quantizing a float
Linear here gives one scale per output channel. All three are an Fp8Linear with a per-channel
scale (ones, or the tensor's scale repeated).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from studio.errors import UserError
from studio.nn.packed import PackedLinear, QuantWeight

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def fp8_supported() -> bool:
    """Whether this torch build can cast to float8_e4m3fn (needed for Fp8Linear's storage)."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    try:
        torch.zeros(1).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError):
        return False
    return True


class Fp8Linear(PackedLinear):
    """A Linear whose weight is stored as float8 e4m3 with one scale per output channel.

    The matmul runs in the input's dtype after upcasting the weight for this layer only.
    """

    def __init__(self, weight_fp8: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = weight_fp8.shape[1]
        self.out_features = weight_fp8.shape[0]
        self.register_buffer("weight", weight_fp8)  # (out, in) float8_e4m3fn
        self.register_buffer("scale", scale)  # (out,) float32
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        w = linear.weight.detach().float()  # (out, in)
        amax = w.abs().amax(dim=1).clamp(min=1e-12)  # (out,)
        scale = amax / FP8_MAX
        q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(q, scale, linear.bias)

    @property
    def storage(self) -> str:
        return "storage=float8_e4m3fn"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)


class Fp8Weight(QuantWeight):
    """A float8 tensor as stored, with its scale: one number per tensor (ComfyUI's scale_weight) or
    one per output channel. w = q * scale. Any number of dims; only matrices become modules."""

    def __init__(self, q: Tensor, scale: Tensor | None = None) -> None:
        self.q = q
        self.scale = torch.ones((), device=q.device) if scale is None else scale.detach().float()
        self.shape = tuple(q.shape)  # type: ignore[assignment]
        if self.scale.numel() not in (1, self.shape[0] if self.shape else 1):
            raise UserError("bad_model", f"an fp8 scale has {self.scale.numel()} values for a weight of shape "
                            f"{self.shape}; the file is damaged or of a newer format Studio cannot read yet")

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * 4

    @property
    def device(self) -> torch.device:
        return self.q.device

    def _scale_for(self, ndim: int) -> Tensor:
        if self.scale.numel() == 1:
            return self.scale.reshape(())
        return self.scale.reshape(-1, *([1] * (ndim - 1)))  # (out, 1, ...)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.q.float() * self._scale_for(self.q.ndim).to(self.q.device)).to(dtype)

    def to_module(self, bias: Tensor | None = None) -> Fp8Linear:
        per_channel = self.scale.reshape(-1).expand(self.shape[0]).contiguous().to(self.q.device)  # (out,)
        return Fp8Linear(self.q, per_channel, bias)
