"""Weight-only int8 (per channel) and int4 (group-wise) weights and their PackedLinear layers.

The shared interface is in packed.py; GGUF blocks convert to these in packed_gguf.py.

Kernels, measured on the 2-core AMD EPYC CPU of CI (batch 1, SmolLM2 shapes, cold cache,
microseconds per matmul; torch 2.13):

    shape (out x in)    fp32 F.linear   int8 int8pack(bf16 x)   int8 two-pass _int_mm   int4 int4pack(bf16 x)   int4pack(fp32 x)
    576 x 576                 88              44                       50                      21                  ~300
    1536 x 576               227              38                       83                      37                  ~690
    576 x 1536               190              46                       81                      32                  ~760
    49152 x 576             7212            1187                     1830                    1007                ~22400

So on CPU both packed kernels win only with bfloat16 activations (their fp32 paths are slower
than plain fp32 matmul), and dequantize-then-matmul per call is slowest of all (~65 ms for the
49152 x 576 head). Defaults follow: CPU int4 -> int4pack in bf16, CPU int8 -> int8pack in bf16;
on CUDA int4 -> `_weight_int4pack_mm` (bf16), int8 -> dequantize then matmul. The two-pass int8
path ("int_mm": activations split into two int8 halves, ~15-bit precise, exact int32 sums) is
kept for when fp32-grade accuracy matters more than the last 1.5x.

End to end on the same CPU (bundled SmolLM2-135M Q4_1, greedy, short answer, quiet machine):
int4 modules 87-90 tok/s, first token 45 ms; int8 requantized 69 tok/s; float32 dequantized
25 tok/s (transformers: ~25; llama.cpp: ~130). The machine is shared, so rerun before quoting.

An int4 module holds only its kernel's packing and bf16 table: 0.5 + 4/group bytes per weight
(0.625 for GGUF's group 32). Keeping the canonical copy beside it cost 1.375 (SmolLM2-135M:
139 MiB of int4 modules instead of 63; an 8B Llama on an H200 peaked at 9.4 GiB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.errors import UserError
from studio.nn.packed import PackedLinear, QuantWeight

# --- int8, per output channel --------------------------------------------------------------------

class Int8Weight(QuantWeight):
    """w[n, k] = q[n, k] * scale[n], q in [-127, 127]."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        self.q, self.scale = q, scale  # (N, K) int8, (N,) float32
        self.shape = (q.shape[0], q.shape[1])

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)

    def rows(self, ids: Tensor) -> Tensor:
        return self.q[ids].float() * self.scale[ids].unsqueeze(-1)

    def to_module(self, bias: Tensor | None = None) -> nn.Module:
        return Int8Linear(self.q, self.scale, bias)


def _int8_two_pass(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x @ (q * scale).T with x split into two int8 halves: x ~ s * (a1 + a2 / 254) per row.

    The int32 sums are exact; the only error is representing x with ~15 bits (|err| <= max|x| / 64516),
    so this matches a float matmul to ~1e-4 relative while reading 1 byte per weight.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()  # (M, K)
    s = x2.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127  # (M, 1)
    xs = x2 / s
    a1 = torch.round(xs)
    a2 = torch.round((xs - a1) * 254)
    acc = torch._int_mm(torch.cat([a1, a2]).to(torch.int8), q.t()).float()  # (2M, N)
    m = x2.shape[0]
    y = (acc[:m] + acc[m:] * (1 / 254)) * (s * scale)
    return y.reshape(*lead, -1).to(x.dtype)


class Int8Linear(PackedLinear):
    """Weight-only int8 Linear. backend: "auto", "int8pack", "int_mm" or "dequant"."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.contiguous())  # (N, K) int8
        self.register_buffer("scale", scale.float().contiguous())  # (N,)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.backend = backend

    def _backend(self, x: Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        # int32 sums stay exact while 2 * 127 * 127 * K < 2**31.
        # The CPU int8pack kernel crashes the process (SIGSEGV, torch 2.13) when K is not a multiple of
        # 16: such layers take the dequantize path instead of ever reaching it.
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            return "int8pack"
        return "dequant"

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        backend = self._backend(x)
        if backend == "int8pack" and self.in_features % 16:
            backend = "dequant"  # an explicit int8pack request on a shape that would crash the kernel
        if backend == "int8pack":
            # the kernel wants dense rows (.to keeps a permuted input's strides); bf16 is its fast CPU path
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale.to(torch.bfloat16))
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        elif backend == "int_mm" and self.in_features < 66000:
            y = _int8_two_pass(x, self.q, self.scale)
        else:
            y = F.linear(x, self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def storage(self) -> str:
        return f"int8 per channel, backend={self.backend}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight: q * scale per row."""
        return (self.q.float() * self.scale[:, None]).to(dtype)


# --- int4, group-wise asymmetric -----------------------------------------------------------------

class Int4Weight(QuantWeight):
    """w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g], g = k // group_size, q in [0, 15].

    This is PyTorch's int4pack convention; GGUF Q4_1 (w = d * q + m) maps exactly with
    scale = d, zero = m + 8 d, and Q4_0 (w = d * (q - 8)) with zero = 0.
    """

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> None:
        # packed: (N, K/2) uint8, value 2i in the high nibble, 2i+1 in the low (torch's CUDA layout)
        self.packed, self.scale, self.zero, self.group_size = packed, scale, zero, group_size
        self.shape = (packed.shape[0], packed.shape[1] * 2)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + (self.scale.numel() + self.zero.numel()) * self.scale.element_size()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return _int4_dequant(self.packed, self.scale, self.zero, self.group_size).to(dtype)

    def rows(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        out = _int4_dequant(self.packed[flat], self.scale[flat], self.zero[flat], self.group_size)
        return out.reshape(*ids.shape, -1)

    def to_module(self, bias: Tensor | None = None) -> nn.Module:
        return Int4Linear(self.packed, self.scale, self.zero, self.group_size, bias)


def _unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) int32 values 0..15."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def _pack_int4(q: Tensor) -> Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def _int4_dequant(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    n = packed.shape[0]
    q = _unpack_int4(packed).float().view(n, -1, group_size)  # (N, G, group)
    return ((q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(n, -1)


# The int4 kernels' own packings. Both hold the same nibbles in a device-specific order:
#   CPU  (_convert_weight_to_int4pack_for_cpu): (N, K/2) uint8
#   CUDA (_convert_weight_to_int4pack): (N/8, K/(16 tiles), 32, tiles/2) int32
# plus one (K/group, N, 2) bfloat16 scale-and-zero table that both kernels read.
_KERNEL_DEVICES = ("cpu", "cuda")
_QUANT_BUFFERS = ("packed", "scale", "zero", "kernel_weight", "kernel_sz")


def _inner_k_tiles(k: int) -> int:
    return 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2  # K must be a multiple of 16 x this


def _layout_of(w: Tensor) -> str:
    """Which kernel's packing `w` holds, wherever it lies now."""
    return "cpu" if w.dim() == 2 else "cuda"


def _pack_for(packed: Tensor, device_type: str) -> Tensor:
    """Canonical (N, K/2) uint8 -> the `device_type` kernel's packing (made on packed's device)."""
    tiles = _inner_k_tiles(packed.shape[1] * 2)
    if device_type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_int4(packed), tiles)
    return torch.ops.aten._convert_weight_to_int4pack(packed, tiles)


def _int4pack_mm(x2: Tensor, w: Tensor, group_size: int, sz: Tensor) -> Tensor:
    """(M, K) bf16 @ packed (N, K).T -> (M, N) bf16, with the kernel of w's device."""
    if w.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm(x2, w, group_size, sz)


def _cpu_layout_nibbles(w: Tensor, k: int) -> Tensor:
    """Undo the CPU packing by reshapes alone (so it runs on any device): (N, K/2) uint8 -> (N, K) int32.

    torch packs rows in blocks of 64 and a last block of the N % 64 rows left. For each input
    index k a block stores one byte per row pair: rows j (low nibble) and j + 32 (high) in a block
    of 64, rows 2j and 2j + 1 in the last block. tests/test_quant.py checks this against the kernel.
    """
    n = w.shape[0]
    full = n // 64 * 64
    parts = []
    if full:
        b = w[:full].reshape(full // 64, k, 32)  # (blocks, K, 32)
        q = torch.cat([b & 0x0F, b >> 4], dim=-1)  # (blocks, K, 64): rows 0..31, then 32..63
        parts.append(q.transpose(1, 2).reshape(full, k))
    if n > full:
        r = n - full
        b = w[full:].reshape(k, r // 2)  # (K, r/2)
        parts.append(torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(k, r).t())  # rows 2j, 2j + 1
    return torch.cat(parts).to(torch.int32)


def _kernel_nibbles(w: Tensor, n: int, k: int, group_size: int) -> Tensor:
    """The (N, K) int32 nibbles of any kernel packing, read back through the kernel itself.

    With scale 1 and zero 8 every weight is (q - 8) * 1 + 8 = q, an integer 0..15 that bfloat16
    holds exactly, so rows of the identity matrix as input give W.T exactly. Costs N K^2 multiply-adds
    (chunks of 512 identity rows); used only to re-pack or dequantize, never per token.
    """
    unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=w.device).expand(k // group_size, n, 2).contiguous()
    out = torch.empty(n, k, dtype=torch.int32, device=w.device)
    for i in range(0, k, 512):
        c = min(512, k - i)
        eye = torch.zeros(c, k, dtype=torch.bfloat16, device=w.device)
        rows = torch.arange(c, device=w.device)
        eye[rows, rows + i] = 1
        out[:, i:i + c] = _int4pack_mm(eye, w, group_size, unit).t().to(torch.int32)  # (N, c)
    return out


def _nibbles(w: Tensor, n: int, k: int, group_size: int) -> Tensor:
    """(N, K) int32 nibbles of a kernel packing, on w's device."""
    if _layout_of(w) == "cpu":
        return _cpu_layout_nibbles(w, k)
    if w.device.type == "cuda":
        return _kernel_nibbles(w, n, k, group_size)
    # A CUDA packing parked in RAM (e.g. a host copy of a streamed block) is read back on the GPU.
    if not torch.cuda.is_available():
        raise UserError("unsupported", "these int4 weights are packed for a CUDA GPU and no GPU is available; "
                                       "load the model again on this machine instead of reusing the GPU copy")
    return _kernel_nibbles(w.cuda(), n, k, group_size).to(w.device)


def _canonical_from(bufs: dict, n: int, k: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(packed (N, K/2) uint8, scale, zero (N, K/group) float32) from either representation.

    From a kernel packing the nibbles are exact and scale / zero are the bfloat16 values the
    kernel computes with (the float32 ones are not kept alongside it)."""
    w = bufs.get("kernel_weight")
    if w is None:
        return bufs["packed"], bufs["scale"].float(), bufs["zero"].float()
    sz = bufs["kernel_sz"].float()  # (G, N, 2)
    return _pack_int4(_nibbles(w, n, k, group_size)), sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()


class Int4Linear(PackedLinear):
    """Weight-only int4 Linear. backend: "auto", "int4pack" or "dequant".

    It holds one representation of its weight at a time, as buffers, so .to(), state_dict, byte
    counts and the block streamer all see it:
    - where the packed kernel runs (backend auto / int4pack, on CPU or CUDA, N % 16 == 0 and
      K % 32 == 0): `kernel_weight` in that device's kernel packing and `kernel_sz`, the
      (K/group, N, 2) bfloat16 scale-and-zero table. 0.5 + 4/group bytes per weight.
    - elsewhere: the canonical `packed` (N, K/2) uint8, `scale` and `zero` (N, K/group) float32.
    Moving the module (.to / .cuda / .cpu go through _apply) re-packs for the new device type; the
    packing stays exact, but scale and zero keep the bfloat16 rounding the kernel uses.
    """

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                 bias: Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = group_size
        # The packed kernels tile N by 16 (CPU) / 8 (CUDA) and K by 32; other shapes use dequant.
        self._kernel_shape_ok = self.out_features % 16 == 0 and self.in_features % 32 == 0
        self._backend = backend
        self.register_buffer("bias", None if bias is None else bias.float())
        # packed now, so the first token doesn't pay for it
        self._store(packed.contiguous(), scale.float().contiguous(), zero.float().contiguous(), packed.device)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value
        self._store(*self._canonical(), self._quant_device())

    @property
    def layout(self) -> str:
        """"canonical", or the kernel packing held: "cpu" or "cuda"."""
        w = self._buffers.get("kernel_weight")
        return "canonical" if w is None else _layout_of(w)

    def _wants_kernel(self, device: torch.device) -> bool:
        return self._backend in ("auto", "int4pack") and self._kernel_shape_ok and device.type in _KERNEL_DEVICES

    def _quant_device(self) -> torch.device:
        w = self._buffers.get("kernel_weight")
        return (w if w is not None else self._buffers["packed"]).device

    def _canonical(self) -> tuple[Tensor, Tensor, Tensor]:
        return _canonical_from(self._buffers, self.out_features, self.in_features, self.group_size)

    def _store(self, packed: Tensor, scale: Tensor, zero: Tensor, device: torch.device) -> None:
        """Keep one representation on `device`: the kernel packing where the kernel will run, else canonical."""
        for name in _QUANT_BUFFERS:
            self._buffers.pop(name, None)
        packed, scale, zero = packed.to(device), scale.to(device), zero.to(device)
        if self._wants_kernel(device):
            self.register_buffer("kernel_weight", _pack_for(packed, device.type))
            self.register_buffer("kernel_sz", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        else:
            self.register_buffer("packed", packed)  # (N, K/2) uint8
            self.register_buffer("scale", scale.float())  # (N, K/group)
            self.register_buffer("zero", zero.float())  # (N, K/group)

    def pack_for(self, device: torch.device | str) -> Int4Linear:
        """Hold the packing of `device`'s kernel but stay where it is.

        For code that moves buffers itself instead of calling .to() (offload.BlockStreamer and
        WholeModule): with the target's packing in the host copy, each move is a plain copy, where
        otherwise forward has to re-pack on every call. A CUDA packing is made on the GPU.
        """
        device = torch.device(device)
        if not self._wants_kernel(device) or self.layout == device.type:
            return self
        here = self._quant_device()
        self._store(*self._canonical(), device)
        for name in _QUANT_BUFFERS:
            if name in self._buffers:
                self._buffers[name] = self._buffers[name].to(here)
        return self

    def _apply(self, fn, recurse: bool = True) -> Int4Linear:
        # .to(), .cuda(), .cpu(), .half(), to_empty() all land here. Learn where fn sends tensors,
        # re-pack for that device type if the representation changes, then let fn move the buffers.
        # The int4 tables keep their dtypes: the kernel wants bfloat16 scales whatever the model's dtype.
        src = self._quant_device()
        dst = fn(torch.empty(0, device=src)).device
        want = dst.type if self._wants_kernel(dst) else "canonical"
        if want != self.layout:
            n, k, g = self.out_features, self.in_features, self.in_features // self.group_size
            if src.type == "meta":  # fn decides: to_empty() gives fresh memory, to() refuses to copy meta
                canon = [fn(torch.empty(s, dtype=d, device=src)) for s, d in
                         (((n, k // 2), torch.uint8), ((n, g), torch.float32), ((n, g), torch.float32))]
            elif dst.type == "meta":
                canon = [torch.empty(s, dtype=d, device=dst) for s, d in
                         (((n, k // 2), torch.uint8), ((n, g), torch.float32), ((n, g), torch.float32))]
            else:
                canon = self._canonical()
            self._store(*canon, dst)
        for name in (*_QUANT_BUFFERS, "bias"):
            t = self._buffers.get(name)
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype or name == "bias" else t.to(moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A state_dict saved from the other representation (canonical, or another device's packing)
        # is converted to the one this module holds. load_state_dict passes its own copy of the dict.
        theirs = {n: state_dict[prefix + n] for n in _QUANT_BUFFERS if prefix + n in state_dict}
        w = theirs.get("kernel_weight")
        their_layout = "canonical" if w is None else _layout_of(w)
        if theirs and their_layout != self.layout:
            canon = _canonical_from(theirs, self.out_features, self.in_features, self.group_size)
            for n in theirs:
                del state_dict[prefix + n]
            self._store(*canon, self._quant_device())
            state_dict.update({prefix + n: self._buffers[n] for n in _QUANT_BUFFERS if n in self._buffers})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight this module multiplies by (from the kernel packing: bfloat16 scale and zero)."""
        return _int4_dequant(*self._canonical(), self.group_size).to(dtype)

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        w = self._buffers.get("kernel_weight")
        if w is not None and x.device.type == w.device.type:
            if _layout_of(w) != w.device.type:
                # Another device's packing moved here tensor by tensor (the block streamer moves
                # buffers, not modules): re-pack for this call only, so this device holds one copy.
                w = _pack_for(_pack_int4(_nibbles(w, self.out_features, self.in_features, self.group_size)),
                              w.device.type)
            # the kernel wants dense bf16 rows (.to keeps a permuted input's strides)
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = _int4pack_mm(x2, w, self.group_size, self.kernel_sz)
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def storage(self) -> str:
        return f"int4 group {self.group_size}, backend={self.backend}, layout={self.layout}"


# --- quantizing a float weight -------------------------------------------------------------------

def quantize_int8(weight: Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8; |error| <= max|w_row| / 254 per element."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def quantize_int4(weight: Tensor, group_size: int = 64) -> Int4Weight:
    """Asymmetric (min/max) int4 per group of `group_size` inputs; |error| <= (max - min) / 30 per group."""
    n, k = weight.shape
    if group_size not in (32, 64, 128) or k % group_size:
        raise ValueError(f"int4 needs in_features ({k}) divisible by a group size of 32, 64 or 128 (got {group_size})")
    w = weight.float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((w - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).view(n, k)
    return Int4Weight(_pack_int4(q), scale, lo + 8 * scale, group_size)


def quantize_linear(weight: Tensor, mode: str = "int8") -> QuantWeight:
    """mode: "int8" (per channel) or "int4" / "int4-32" / "int4-64" / "int4-128" (group size, default 64)."""
    if mode == "int8":
        return quantize_int8(weight)
    if mode.startswith("int4"):
        group = int(mode.split("-")[1]) if "-" in mode else 64
        return quantize_int4(weight, group)
    raise ValueError(f"unknown quantization mode {mode!r}: use int8, int4, int4-32, int4-64 or int4-128")
