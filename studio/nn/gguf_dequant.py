"""GGML tensor types and their dequantization, in torch, vectorized over all blocks at once.

A GGML row of `n` values is stored as `n / block_size` blocks of `type_size` bytes. Every
function here takes the raw bytes as a uint8 tensor `(n_blocks, type_size)` and returns
float32 `(n_blocks, block_size)`. The layouts follow ggml-quants.c (and the `gguf` package's
numpy reference, which the tests hold us equal to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

QK_K = 256  # super-block size of the K-quants


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_size: int  # values per block
    type_size: int  # bytes per block


# Only the types we can read; other ids are reported by name where we know it.
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in [
    GGMLType(0, "F32", 1, 4),
    GGMLType(1, "F16", 1, 2),
    GGMLType(2, "Q4_0", 32, 2 + 16),
    GGMLType(3, "Q4_1", 32, 2 + 2 + 16),
    GGMLType(6, "Q5_0", 32, 2 + 4 + 16),
    GGMLType(7, "Q5_1", 32, 2 + 2 + 4 + 16),
    GGMLType(8, "Q8_0", 32, 2 + 32),
    GGMLType(10, "Q2_K", 256, 256 // 16 + 256 // 4 + 2 + 2),
    GGMLType(11, "Q3_K", 256, 256 // 8 + 256 // 4 + 12 + 2),
    GGMLType(12, "Q4_K", 256, 2 + 2 + 12 + 256 // 2),
    GGMLType(13, "Q5_K", 256, 2 + 2 + 12 + 256 // 8 + 256 // 2),
    GGMLType(14, "Q6_K", 256, 256 // 2 + 256 // 4 + 256 // 16 + 2),
    GGMLType(30, "BF16", 1, 2),
]}
GGML_TYPE_BY_NAME = {t.name: t for t in GGML_TYPES.values()}

# Names of types we know exist but do not read, so an error can say what the file uses.
OTHER_TYPE_NAMES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
                    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
                    27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def type_name(type_id: int) -> str:
    t = GGML_TYPES.get(type_id)
    return t.name if t else OTHER_TYPE_NAMES.get(type_id, f"type {type_id}")


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian half -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes -> (n, 32): low nibbles are values 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) little-endian uint32 bit field -> (n, 32) of 0/1, bit i for value i."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int16) - 8
    return d * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)).to(torch.int16) - 16
    return d * q


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return d * q.float() + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return d * b[:, 2:].contiguous().view(torch.int8).float()


def _shifted(x: torch.Tensor, shifts: list[int], group: int) -> torch.Tensor:
    """(n, k) bytes -> (n, k/group, len(shifts), group): each group of bytes shifted by each amount."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).view(1, 1, -1, 1)
    return x.reshape(x.shape[0], -1, 1, group) >> s


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = (_shifted(qs, [0, 2, 4, 6], 32) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: low 4 bits in bytes 0..7 (two per byte), high 2 bits in bytes 8..11.
    low = _shifted(sc[:, :8], [0, 4], 8).reshape(n, 16) & 0x0F
    high = _shifted(sc[:, 8:], [0, 2, 4, 6], 4).reshape(n, 16) & 0x03
    scales = (low | (high << 4)).to(torch.int16) - 32
    dl = (d * scales).view(n, 16, 1)
    ql = (_shifted(qs, [0, 2, 4, 6], 32).reshape(n, 16, 16) & 3).to(torch.int16)
    qh = (_shifted(hmask, list(range(8)), 32).reshape(n, 16, 16) & 1).to(torch.int16)
    q = ql - ((qh ^ 1) << 2)  # a set high bit means "no offset"; a clear one subtracts 4
    return (dl * q).reshape(n, QK_K)


def k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) float32."""
    n = sc.shape[0]
    sc = sc.reshape(n, 3, 4)
    d, m, md = sc[:, 0], sc[:, 1], sc[:, 2]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale.float(), mins.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = k_scale_min(b[:, 4:16])
    q = (_shifted(b[:, 16:], [0, 4], 32) & 0x0F).reshape(n, 8, 32).float()
    return ((d * sc).view(n, 8, 1) * q - (dmin * mn).view(n, 8, 1)).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = (_shifted(qs, [0, 4], 32) & 0x0F).reshape(n, 8, 32)
    hi = (_shifted(qh, list(range(8)), 32) & 1).reshape(n, 8, 32)
    q = (ql | (hi << 4)).float()
    return ((d * sc).view(n, 8, 1) * q - (dmin * mn).view(n, 8, 1)).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    lo = (_shifted(ql, [0, 4], 64) & 0x0F).reshape(n, -1, 32)
    hi = (_shifted(qh, [0, 2, 4, 6], 32) & 0x03).reshape(n, -1, 32)
    q = (lo | (hi << 4)).to(torch.int16) - 32
    return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


_BLOCK_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}

# Rows dequantized per chunk: bounds the temporaries (several float32 copies of a chunk)
# so dequantizing a 250k-vocab embedding does not need gigabytes of scratch space.
_CHUNK_BLOCKS = 1 << 16


def dequantize(raw: torch.Tensor, type_id: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGML bytes (any shape of uint8, C-contiguous) -> a `shape` tensor of `dtype`.

    `shape` is torch order (outermost first); its last dim is the GGML row length.
    """
    t = GGML_TYPES.get(type_id)
    if t is None:
        raise ValueError(f"cannot dequantize GGML {type_name(type_id)}")
    flat = raw.reshape(-1)
    if t.name == "F32":
        return flat.view(torch.float32).reshape(shape).to(dtype)
    if t.name == "F16":
        return flat.view(torch.float16).reshape(shape).to(dtype)
    if t.name == "BF16":
        return flat.view(torch.bfloat16).reshape(shape).to(dtype)
    blocks = flat.view(-1, t.type_size)  # (n_blocks, type_size)
    fn = _BLOCK_DEQUANT[t.name]
    out = torch.empty(blocks.shape[0] * t.block_size, dtype=dtype, device=raw.device)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start:start + _CHUNK_BLOCKS]
        out[start * t.block_size:(start + chunk.shape[0]) * t.block_size] = fn(chunk).reshape(-1)
    return out.reshape(shape)


def row_bytes(type_id: int, row_len: int) -> int:
    """Bytes of one GGML row of `row_len` values; raises ValueError if the row is not whole blocks."""
    t = GGML_TYPES[type_id]
    if row_len % t.block_size:
        raise ValueError(f"a {t.name} row of {row_len} values is not a whole number of {t.block_size}-value blocks")
    return row_len // t.block_size * t.type_size
