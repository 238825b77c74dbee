"""GGUF-quantized weights as stored (raw blocks) and the Linear that dequantizes them per call.

GGUFWeight keeps a matrix's blocks, usually a view of the memory-mapped file, and converts to the
int4 / int8 kernels where an exact or per-row form exists (Q4_0, Q4_1, Q4_K -> int4 group 32). GGUFLinear
is the diffusion models' layer (city96 files): the blocks stay a buffer and are dequantized on the
module's device at every call. GGUFBlockLinear is the LLMs' layer on the CPU: the blocks multiply
x through the kernel of studio/nn/kernels/cpu_gguf.c without being unpacked.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from studio.nn.gguf_dequant import GGML_TYPES, dequantize, k_scale_min
from studio.nn.packed import PackedLinear, QuantWeight
from studio.nn.packed_int import Int4Weight, Int8Weight, _pack_int4, quantize_int8


class GGUFWeight(QuantWeight):
    """A GGUF-quantized matrix as stored: raw blocks (out, row_bytes), usually a view of the mapped file.
    Stacked experts are 3D: shape (E, out, in), raw (E * out, row_bytes); experts() splits them."""

    def __init__(self, raw: Tensor, type_id: int, shape: tuple[int, ...]) -> None:
        self.raw, self.type_id, self.shape = raw, type_id, shape
        self.type_name = GGML_TYPES[type_id].name

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.raw, self.type_id, self.shape, dtype)

    def experts(self) -> list[GGUFWeight]:
        """A stacked (E, out, in) tensor (llama.cpp's `ffn_*_exps`) as E matrices: row slices, no copy."""
        if len(self.shape) != 3:
            raise ValueError(f"experts() needs a 3D (experts, out, in) weight, not {self.shape}")
        e, n, k = self.shape
        per = self.raw.reshape(e, n, -1)  # GGUF rows are independent blocks
        return [GGUFWeight(per[i], self.type_id, (n, k)) for i in range(e)]

    def rows(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        out = dequantize(self.raw[flat], self.type_id, (flat.numel(), self.shape[1]))
        return out.reshape(*ids.shape, self.shape[1])

    def to_int4(self) -> Int4Weight:
        """Q4_0 / Q4_1 / Q4_K -> int4 group 32, exactly (same nibbles, same scales up to one rounding)."""
        if self.type_name == "Q4_K":
            return self._q4_k_to_int4()
        if self.type_name not in ("Q4_0", "Q4_1"):
            raise ValueError(f"{self.type_name} has no exact int4 form")
        n = self.shape[0]
        blocks = self.raw.reshape(n, -1, GGML_TYPES[self.type_id].type_size)  # (N, G, bytes)
        d = blocks[..., :2].contiguous().view(torch.float16).float().squeeze(-1)  # (N, G)
        if self.type_name == "Q4_1":
            m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
            qs = blocks[..., 4:]
            zero = m + 8 * d
        else:
            qs = blocks[..., 2:]
            zero = torch.zeros_like(d)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, -1)  # GGUF: low nibbles first, per block
        return Int4Weight(_pack_int4(q), d, zero, 32)

    def _q4_k_to_int4(self) -> Int4Weight:
        # A Q4_K super-block is 8 sub-blocks of 32 with w = (d * sc_j) q - dmin * m_j, q in 0..15:
        # int4 group 32 with scale = d * sc_j and zero = 8 scale - dmin * m_j.
        n = self.shape[0]
        blocks = self.raw.reshape(-1, GGML_TYPES[self.type_id].type_size)  # (N * K/256, 144)
        d = blocks[:, :2].contiguous().view(torch.float16).float()  # (B, 1)
        dmin = blocks[:, 2:4].contiguous().view(torch.float16).float()
        sc, mn = k_scale_min(blocks[:, 4:16])  # (B, 8) each
        shifts = torch.tensor([0, 4], dtype=torch.uint8, device=blocks.device).view(1, 1, 2, 1)
        q = ((blocks[:, 16:].reshape(-1, 4, 1, 32) >> shifts) & 0x0F).reshape(n, -1)  # (N, K), value order
        scale = (d * sc).reshape(n, -1)  # (N, K/32)
        zero = 8 * scale - (dmin * mn).reshape(n, -1)
        return Int4Weight(_pack_int4(q), scale, zero, 32)

    def to_cpu_module(self, bias: Tensor | None = None) -> nn.Module | None:
        """The CPU kernel's layer (GGUFBlockLinear) for these blocks; None where the kernel cannot be built
        or the rows are not whole blocks of 32, and the caller keeps to_module()."""
        from studio.nn.kernels import cpu_gguf

        if len(self.shape) != 2 or self.shape[1] % 32 or not cpu_gguf.available():
            return None
        n, k = self.shape
        blocks, type_id = cpu_gguf.kernel_blocks(self.raw, self.type_name, n, k)
        return GGUFBlockLinear(GGUFWeight(blocks, type_id, (n, k)), bias)

    def to_int8(self) -> Int8Weight:
        # Q8_0's per-32 scales, Q5's and the other K-quants' sub-block scales have no exact per-channel
        # int8 form: dequantize and requantize per output channel. Measured on SmolLM2-135M: the
        # extra error is small next to the format's own (see tests/test_quant.py).
        return quantize_int8(self.dequantize())

    def to_module(self, bias: Tensor | None = None, mode: str | None = None) -> nn.Module:
        """mode None picks per type: Q4_0/Q4_1/Q4_K -> exact int4 (fastest on CPU and CUDA), others -> int8.
        "gguf" keeps the blocks as they are and dequantizes per call (GGUFLinear)."""
        mode = mode or ("int4" if self.type_name in ("Q4_0", "Q4_1", "Q4_K") else "int8")
        if mode == "gguf":
            return GGUFLinear(self, bias)
        if mode == "int4":
            return self.to_int4().to_module(bias)
        if mode == "int8":
            return self.to_int8().to_module(bias)
        if mode == "float":
            lin = nn.Linear(self.shape[1], self.shape[0], bias=bias is not None)
            lin.weight = nn.Parameter(self.dequantize(), requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias.float(), requires_grad=False)
            return lin
        raise ValueError(f"unknown mode {mode!r}: use int4, int8, gguf or float")


class GGUFLinear(PackedLinear):
    """A Linear whose weight stays in its GGUF blocks, dequantized to the input's dtype at every call.

    For diffusion models (city96-style GGUF files): a step is compute-bound, so rebuilding one
    layer's weight per call costs little next to its matmul, and the model keeps the file's size
    in memory. The blocks are a buffer (`raw`, uint8), so .to(), byte counts and the block
    streamer move and count them; `weight_q` is the GGUFWeight they form.
    """

    def __init__(self, weight: GGUFWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.type_id = weight.type_id
        self.register_buffer("raw", weight.raw)  # the file's blocks, any shape of uint8
        self.register_buffer("bias", None if bias is None else bias.detach())

    @property
    def weight_q(self) -> GGUFWeight:
        return GGUFWeight(self.raw, self.type_id, (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight, on the blocks' device."""
        return dequantize(self.raw, self.type_id, (self.out_features, self.in_features), dtype)

    @property
    def storage(self) -> str:
        return f"GGUF {GGML_TYPES[self.type_id].name}"


class GGUFBlockLinear(PackedLinear):
    """A Linear whose weight is GGUF Q4_0 / Q4_1 / Q8_0 blocks, multiplied as they are on the CPU.

    The blocks (`raw`, (out, row bytes) uint8) are usually the mapped file itself, so building the layer
    copies nothing. Activations become two int8 planes per block of 32 inside the kernel (~15 bits):
    outputs differ from the float product of the dequantized weight by a few 1e-5 of their largest
    value. Elsewhere than the CPU, or without the kernel, forward dequantizes per call.
    """

    def __init__(self, weight: GGUFWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.type_name not in ("Q4_0", "Q4_1", "Q8_0"):
            raise ValueError(f"GGUFBlockLinear reads Q4_0, Q4_1 and Q8_0 blocks, not {weight.type_name}")
        self.out_features, self.in_features = weight.shape
        self.type_id = weight.type_id
        raw = weight.raw.reshape(self.out_features, -1)
        row_bytes = self.in_features // 32 * GGML_TYPES[self.type_id].type_size
        if self.in_features % 32 or raw.shape[1] != row_bytes:
            raise ValueError(f"{weight.type_name} rows of {self.in_features} values are not {raw.shape[1]} bytes of blocks")
        self.register_buffer("raw", raw if raw.stride() == (row_bytes, 1) else raw.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.raw, self.type_id, (self.out_features, self.in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        from studio.nn.kernels import cpu_gguf

        lib = cpu_gguf.library()
        if lib is not None and x.device.type == "cpu" and self.raw.device.type == "cpu":
            bias = self.bias
            if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
                bias = bias.float().contiguous()  # .to(dtype) on the module changed it
            y = cpu_gguf.matmul_checked(lib, x, self.raw, self.type_id, self.out_features, self.in_features, bias)
            return y if x.dtype is torch.float32 else y.to(x.dtype)
        return super().forward(x)

    @property
    def storage(self) -> str:
        return f"GGUF {GGML_TYPES[self.type_id].name}, CPU kernel"
