"""The CPU kernel of cpu_gguf.c: GGUF Q4_0 / Q4_1 / Q8_0 blocks times float32 activations, no unpacking.

Other GGUF types become one of those three at load (`kernel_blocks`): Q4_K exactly but for its
scales rounded to float16 (d * sc_j and dmin * m_j of each 32-value sub-block), the rest
(Q5_*, Q6_K, Q3_K, Q2_K, F16, ...) requantized to Q8_0, which keeps more than the per-channel int8
they became before.

The C file is compiled once per machine (the compiler named by $CC, else cc / gcc / clang, with
-O3 -march=native -fopenmp) into Studio's cache folder, keyed by the source, the compiler and the
CPU, and loaded with ctypes: no torch headers, so the build takes about a second. Where no
compiler works, `available()` is False and the callers keep torch's int4pack / int8pack kernels.
Set STUDIO_CPU_KERNEL=0 to turn it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gguf.c")
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # GGML type ids the kernel reads
BLOCK_BYTES = {2: 18, 3: 20, 8: 34}
ISA_NAMES = {0: "scalar", 1: "AVX2", 2: "AVX-VNNI", 3: "AVX512-VNNI"}

_lock = threading.Lock()
_lib: list = []  # [ctypes.CDLL or None] once tried


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    try:  # -march=native code is only valid on this CPU model
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("model name", "flags"))), platform.processor())
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    from studio.paths import Paths

    return Paths.default().cache / "kernels"


def build(cc: str, out: Path, native: bool = True) -> None:
    """Compile cpu_gguf.c into the shared library `out`; native=False leaves the vector paths out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11"]
    march = ["-march=native"] if native and platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64") \
        else []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        for extra in (march, []):  # some compilers (Apple clang on arm64) refuse -march=native
            cmd = [cc, *flags, *extra, str(SOURCE), "-o", str(part), "-lm"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                os.replace(part, out)  # atomic: another process may be building the same file
                return
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")


def _load() -> ctypes.CDLL | None:
    if os.environ.get("STUDIO_CPU_KERNEL", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: GGUF matrices on the CPU use torch's int4pack/int8pack kernels")
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + cc.encode() + _cpu_key().encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_gguf-{key}.so"
    try:
        if not path.exists():
            build(cc, path)
        return open_library(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("the CPU GGUF kernel could not be built (%s); using torch's kernels", exc)
        return None


def open_library(path: Path) -> ctypes.CDLL:
    """Load a built kernel. torch has loaded its libgomp already: the kernel's OpenMP regions share its pool."""
    lib = ctypes.CDLL(str(path))
    lib.studio_gemm.restype = ctypes.c_int
    lib.studio_gemm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_void_p, ctypes.c_int]
    lib.studio_gguf_isa.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernel (None where it cannot be built); builds it on first call."""
    if _lib:  # every matmul asks: no lock once it is known
        return _lib[0]
    with _lock:
        if not _lib:
            _lib.append(_load())
        return _lib[0]


def available() -> bool:
    return library() is not None


def isa() -> str:
    """The vector path the build took: "AVX512-VNNI", "AVX-VNNI", "AVX2" or "scalar" ("" if not built)."""
    lib = library()
    return ISA_NAMES.get(lib.studio_gguf_isa(), "?") if lib is not None else ""


def _q4_1_blocks(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Values q (N, K) 0..15, w = d q + m per block of 32 (d, m (N, K/32)) -> (N, K/32 * 20) Q4_1 bytes."""
    n, k = q.shape
    q = q.to(torch.uint8).view(n, k // 32, 32)
    nib = q[..., :16] | (q[..., 16:] << 4)  # byte i: value i low, value i + 16 high (GGUF's order)
    dm = torch.stack([d.to(torch.float16), m.to(torch.float16)], dim=-1).view(torch.uint8)  # (N, K/32, 4)
    return torch.cat([dm, nib], dim=-1).reshape(n, -1)


def q8_0_blocks(w: Tensor) -> Tensor:
    """A float (N, K) matrix -> Q8_0 bytes (N, K/32 * 34), as ggml quantizes: d = max|w| / 127 per block."""
    n, k = w.shape
    g = w.float().view(n, k // 32, 32)
    d = (g.abs().amax(-1) / 127).to(torch.float16)  # (N, K/32)
    inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round(g * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.unsqueeze(-1).view(torch.uint8), q.view(torch.uint8)], dim=-1).reshape(n, -1)


def kernel_blocks(raw: Tensor, type_name: str, n: int, k: int) -> tuple[Tensor, int]:
    """GGUF blocks of any type (N rows of bytes) -> (blocks the kernel reads, their type id), no copy for
    Q4_0, Q4_1 and Q8_0."""
    from studio.nn.gguf_dequant import GGML_TYPE_BY_NAME, dequantize, k_scale_min

    if type_name in TYPES:
        return raw.reshape(n, -1), TYPES[type_name]
    if k % 32:
        raise ValueError(f"rows of {k} values are not whole blocks of 32")
    if type_name == "Q4_K":  # 8 sub-blocks of 32 with w = (d sc_j) q - (dmin m_j), q 0..15
        blocks = raw.reshape(-1, GGML_TYPE_BY_NAME["Q4_K"].type_size)  # (N K/256, 144)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        dmin = blocks[:, 2:4].contiguous().view(torch.float16).float()
        sc, mn = k_scale_min(blocks[:, 4:16])  # (B, 8)
        shifts = torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
        q = ((blocks[:, 16:].reshape(-1, 4, 1, 32) >> shifts) & 0x0F).reshape(n, k)
        return _q4_1_blocks(q, (d * sc).reshape(n, -1), (-dmin * mn).reshape(n, -1)), TYPES["Q4_1"]
    type_id = GGML_TYPE_BY_NAME[type_name].id
    return q8_0_blocks(dequantize(raw, type_id, (n, k))), TYPES["Q8_0"]


def gguf_matmul(x: Tensor, raw: Tensor, type_id: int, n: int, k: int, bias: Tensor | None = None,
                lib: ctypes.CDLL | None = None) -> Tensor:
    """x (..., K) float32 @ W.T -> (..., N) float32, W = N rows of GGUF blocks `raw` (N, row bytes) uint8 on the CPU.

    x is split into two int8 planes per block of 32 inside (about 15 bits), so results differ from a float
    matmul of the dequantized W by a few 1e-5 of the output's scale (torch's bf16 int4pack path: ~1e-2)."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("the CPU GGUF kernel is not available; check available() first")
    if type_id not in BLOCK_BYTES or k % 32:
        raise ValueError(f"the CPU GGUF kernel reads Q4_0, Q4_1 and Q8_0 rows of whole blocks, not type {type_id}, K={k}")
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    row_bytes = k // 32 * BLOCK_BYTES[type_id]
    if raw.shape != (n, row_bytes) or raw.stride(-1) != 1 or raw.stride(0) != row_bytes:
        raise ValueError(f"GGUF rows must be dense ({n}, {row_bytes}) bytes, got {tuple(raw.shape)} with strides {raw.stride()}")
    b = None if bias is None else bias.float().contiguous()
    return matmul_checked(lib, x, raw, type_id, n, k, b)


def matmul_checked(lib: ctypes.CDLL, x: Tensor, raw: Tensor, type_id: int, n: int, k: int,
                   bias: Tensor | None) -> Tensor:
    """gguf_matmul for arguments checked already (GGUFBlockLinear checks its blocks once): a decode step
    makes ~120 of these calls, so each skips what it can."""
    x2 = x.reshape(-1, k)
    if x2.dtype is not torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.studio_gemm(type_id, raw.data_ptr(), raw.stride(0), n, k, x2.data_ptr(), m, y.data_ptr(), n,
                         None if bias is None else bias.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"the CPU GGUF kernel refused its arguments (type {type_id}, {n} x {k}, {m} rows)")
    return y.view(*x.shape[:-1], n)
