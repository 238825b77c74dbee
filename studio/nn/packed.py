"""The shared shape of packed weights: a QuantWeight (data), a PackedLinear (module), a QuantEmbedding.

A `QuantWeight` is the compact form of one Linear weight, logically (out_features, in_features),
as read from a file or made by quantizing; `.to_module(bias)` gives the layer that computes from
it. Every such layer is a `PackedLinear`: it holds its packed data as buffers (so .to(),
state_dict, byte counts and the block streamer see them), says what it stands for through
`dequantize()`, and multiplies by that unless it has a faster kernel. The formats:

    packed_int.py   int8 per channel, int4 group-wise (torch's int8pack / int4pack kernels)
    packed_fp8.py   float8 e4m3 with a per-channel (or per-tensor, or no) scale
    packed_gguf.py  GGUF blocks as stored, dequantized per call (gguf_dequant.py)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuantWeight(ABC):
    """Compact weight of one Linear, logically (out_features, in_features)."""

    shape: tuple[int, int]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) float weight this stands for."""

    @abstractmethod
    def to_module(self, bias: Tensor | None = None) -> nn.Module:
        """A Linear-like module (a PackedLinear, or nn.Linear for a float copy): forward(x) = x @ W.T + b."""

    def rows(self, ids: Tensor) -> Tensor:
        """Dequantized rows `ids` (an embedding lookup) without dequantizing the whole matrix."""
        return self.dequantize()[ids]

    def to_embedding(self) -> nn.Module:
        """An Embedding-like module that keeps this weight packed and dequantizes only the rows it looks up
        (SmolLM2's 49152 x 576 table: 28 MiB as Q8_0 instead of 113 MiB as float32)."""
        return QuantEmbedding(self)


class PackedLinear(nn.Module):
    """A Linear whose weight is stored packed and unpacked (wholly or inside a kernel) at every call.

    Subclasses set `in_features` / `out_features`, register their packed data and `bias` as
    buffers or parameters, and implement `dequantize`; `storage` names the format for repr. The
    default forward is the slow obvious path, F.linear with the weight dequantized to x's dtype.
    """

    in_features: int
    out_features: int
    bias: Tensor | None

    @property
    def storage(self) -> str:
        """The format, for repr: "int8 per channel", "GGUF Q4_K", ..."""
        return "packed"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight this layer multiplies by, on its data's device."""
        raise NotImplementedError(f"{type(self).__name__} does not implement dequantize()")

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds (packed data and bias)."""
        tensors = [*self.parameters(recurse=False), *self.buffers(recurse=False)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.storage}"


class QuantEmbedding(nn.Module):
    """forward(ids (...)) -> (..., dim) float32 rows of a QuantWeight."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.weight_q = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: Tensor) -> Tensor:
        # The packed table stays where it was loaded (usually CPU RAM); only the looked-up rows move.
        return self.weight_q.rows(ids.to(self.weight_q.device, torch.long)).to(ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, packed {type(self.weight_q).__name__}"
