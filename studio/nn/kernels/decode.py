"""Triton kernels of the fused LLM decode step (studio/models/llm_decode.py launches them).

One token of a LLaMA-layout model is: a matrix-vector product with the RMSNorm folded in
(`matvec_kernel`, also gated SiLU and residual add), the q/k/v product with RoPE writing the KV
cache (`qkv_rope_kernel`), Qwen3's per-head q/k norm (`head_norm_rope_kernel`), and split
attention over the cache's filled prefix (`attention_kernel`). They round where the model's
torch code rounds, so the two agree to the model dtype's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # CUDA builds of torch ship Triton; CPU builds do not, and there the model's own step is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None


def gpu_unsupported(device: torch.device) -> str | None:
    """Why this CUDA device cannot run the fused step, or None when it can."""
    if triton is None:
        return "Triton is not installed"
    if torch.version.hip:
        return "not measured on ROCm yet"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the GPU predates Ampere (no bf16 tensor-core dots)"
    return None


if triton is not None:

    @triton.jit
    def matvec_kernel(w_ptr, x_ptr, g_ptr, b_ptr, y_ptr, N, K, eps,
                       NORM: tl.constexpr, BIAS: tl.constexpr, RESID: tl.constexpr, GATED: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr):
        """y = W x' (+ b) with x' = RMSNorm(x) * g when NORM; RESID: y += that (in place);
        GATED: W holds [gate; up] (2N rows) and y = silu(gate x') * (up x')."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        rmask = rows < N
        wrow = rows.to(tl.int64)[:, None] * K
        acc = tl.zeros((BN, BK), tl.float32)
        acc2 = tl.zeros((BN, BK), tl.float32)
        ss = tl.zeros((BK,), tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < K
            x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            if NORM:
                ss += x * x
                x = x * tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            m2 = rmask[:, None] & cmask[None, :]
            w = tl.load(w_ptr + wrow + cols[None, :], mask=m2, other=0.0)
            acc += w.to(tl.float32) * x[None, :]
            if GATED:
                w2 = tl.load(w_ptr + N * K + wrow + cols[None, :], mask=m2, other=0.0)
                acc2 += w2.to(tl.float32) * x[None, :]
        dt = y_ptr.dtype.element_ty
        y = tl.sum(acc, axis=1)
        if NORM:
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            y = y * rstd
        if BIAS:
            y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if GATED:
            up = tl.sum(acc2, axis=1)
            if NORM:
                up = up * rstd
            if BIAS:
                up += tl.load(b_ptr + N + rows, mask=rmask, other=0.0).to(tl.float32)
            # rounded where the model rounds: silu(gate) and up are each model-dtype tensors there
            gate = y.to(dt).to(tl.float32)
            act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
            y = act * up.to(dt).to(tl.float32)
        if RESID:
            y = y.to(dt).to(tl.float32) + tl.load(y_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(dt), mask=rmask)

    @triton.jit
    def qkv_rope_kernel(w_ptr, x_ptr, g_ptr, b_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, kraw_ptr,
                         K, eps, cache_len,
                         HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BIAS: tl.constexpr,
                         ROPE: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
        """RMSNorm(x) * g, then the fused q/k/v rows of one head's dims [d, d+BH) and [d+D/2, d+D/2+BH)
        (RoPE's rotate-half partners), rotated at `pos` for q and k; q -> q_ptr, k and v -> cache slot pos.
        ROPE=False (q/k norm models): q and k leave unrotated, q -> q_ptr, k -> kraw_ptr, for
        head_norm_rope_kernel."""
        HALF: tl.constexpr = D // 2
        PER_HEAD: tl.constexpr = HALF // BH
        pid = tl.program_id(0)
        head = pid // PER_HEAD
        d = (pid % PER_HEAD) * BH + tl.arange(0, BH)
        rows_a = head * D + d  # (BH,) first-half dims
        wa = rows_a.to(tl.int64)[:, None] * K
        wb = wa + HALF * K
        acc_a = tl.zeros((BH, BK), tl.float32)
        acc_b = tl.zeros((BH, BK), tl.float32)
        ss = tl.zeros((BK,), tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < K
            x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            ss += x * x
            x = x * tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            acc_a += tl.load(w_ptr + wa + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32) * x[None, :]
            acc_b += tl.load(w_ptr + wb + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32) * x[None, :]
        dt = q_ptr.dtype.element_ty
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        a = tl.sum(acc_a, axis=1) * rstd
        b = tl.sum(acc_b, axis=1) * rstd
        if BIAS:
            a += tl.load(b_ptr + rows_a).to(tl.float32)
            b += tl.load(b_ptr + rows_a + HALF).to(tl.float32)
        a = a.to(dt).to(tl.float32)
        b = b.to(dt).to(tl.float32)
        pos = tl.load(pos_ptr)
        ca = tl.load(cos_ptr + pos * D + d).to(dt).to(tl.float32)
        sa = tl.load(sin_ptr + pos * D + d).to(dt).to(tl.float32)
        cb = tl.load(cos_ptr + pos * D + HALF + d).to(dt).to(tl.float32)
        sb = tl.load(sin_ptr + pos * D + HALF + d).to(dt).to(tl.float32)
        if ROPE:
            ra = a * ca - b * sa  # rotate_half: (x1, x2) -> (-x2, x1)
            rb = b * cb + a * sb
        else:
            ra, rb = a, b
        if head < HQ:
            tl.store(q_ptr + head * D + d, ra.to(dt))
            tl.store(q_ptr + head * D + HALF + d, rb.to(dt))
        elif head < HQ + HKV:
            if ROPE:
                slot = ((head - HQ) * cache_len + pos).to(tl.int64) * D
                tl.store(kc_ptr + slot + d, ra.to(dt))
                tl.store(kc_ptr + slot + HALF + d, rb.to(dt))
            else:
                tl.store(kraw_ptr + (head - HQ) * D + d, ra.to(dt))
                tl.store(kraw_ptr + (head - HQ) * D + HALF + d, rb.to(dt))
        else:
            slot = ((head - HQ - HKV) * cache_len + pos).to(tl.int64) * D
            tl.store(vc_ptr + slot + d, a.to(dt))
            tl.store(vc_ptr + slot + HALF + d, b.to(dt))

    @triton.jit
    def head_norm_rope_kernel(q_ptr, kraw_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, cache_len, eps,
                               HQ: tl.constexpr, D: tl.constexpr):
        """Qwen3's q/k RMSNorm over each head's D dims, then RoPE: q in place, k into cache slot pos."""
        head = tl.program_id(0)
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, HALF)
        if head < HQ:
            src = q_ptr + head * D
            w_ptr = qw_ptr
        else:
            src = kraw_ptr + (head - HQ) * D
            w_ptr = kw_ptr
        dt = q_ptr.dtype.element_ty
        a = tl.load(src + d).to(tl.float32)
        b = tl.load(src + HALF + d).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + eps)
        # rounded as the model rounds: the normalised value to its dtype, then times the weight
        a = (tl.load(w_ptr + d).to(tl.float32) * (a * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        b = (tl.load(w_ptr + HALF + d).to(tl.float32) * (b * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        pos = tl.load(pos_ptr)
        ca = tl.load(cos_ptr + pos * D + d).to(dt).to(tl.float32)
        sa = tl.load(sin_ptr + pos * D + d).to(dt).to(tl.float32)
        cb = tl.load(cos_ptr + pos * D + HALF + d).to(dt).to(tl.float32)
        sb = tl.load(sin_ptr + pos * D + HALF + d).to(dt).to(tl.float32)
        ra = (a * ca - b * sa).to(dt)
        rb = (b * cb + a * sb).to(dt)
        if head < HQ:
            tl.store(src + d, ra)
            tl.store(src + HALF + d, rb)
        else:
            slot = ((head - HQ) * cache_len + pos).to(tl.int64) * D
            tl.store(kc_ptr + slot + d, ra)
            tl.store(kc_ptr + slot + HALF + d, rb)

    @triton.jit
    def attention_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr, cnt_ptr, cache_len,
                          scale, WINDOW: tl.constexpr, HQ: tl.constexpr, REP: tl.constexpr, RP: tl.constexpr,
                          RC: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BS: tl.constexpr,
                          F32_DOTS: tl.constexpr, PREC: tl.constexpr):
        """One key/value head's REP query heads (padded to RP >= 16 rows for the tensor cores) over its
        share of the keys [lo, pos] (lo from the sliding window, else 0). Each split leaves (acc, max,
        sum); the split that finishes last merges them (over RC = REP rounded up to a power of two
        rows), so no second kernel is launched. Dots take the cache's dtype (P rounded to it, as
        flash attention does), or fp32 (F32_DOTS: fp32 models, and Triton's interpreter)."""
        kh = tl.program_id(0)
        sp = tl.program_id(1)
        pos = tl.load(pos_ptr)
        lo = tl.maximum(pos - WINDOW + 1, 0) if WINDOW > 0 else pos * 0
        chunk = tl.cdiv(tl.cdiv(pos + 1 - lo, SPLITS), BS) * BS
        start = lo + sp * chunk
        end = tl.minimum(start + chunk, pos + 1)
        r = tl.arange(0, RP)
        rmask = r < REP
        heads = kh * REP + r
        dd = tl.arange(0, D)
        q = tl.load(q_ptr + heads[:, None] * D + dd[None, :], mask=rmask[:, None], other=0.0)  # (RP, D)
        if F32_DOTS:
            q = q.to(tl.float32)
        m = tl.full((RP,), float("-inf"), tl.float32)
        lsum = tl.zeros((RP,), tl.float32)
        acc = tl.zeros((RP, D), tl.float32)
        kbase = kc_ptr + kh.to(tl.int64) * cache_len * D
        vbase = vc_ptr + kh.to(tl.int64) * cache_len * D
        for s0 in range(start, end, BS):
            s = s0 + tl.arange(0, BS)
            smask = s < end
            k = tl.load(kbase + s[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)  # (BS, D)
            v = tl.load(vbase + s[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
            if F32_DOTS:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (RP, BS)
            sc = tl.where(smask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            lsum = lsum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
        dt = out_ptr.dtype.element_ty
        if SPLITS == 1:
            tl.store(out_ptr + heads[:, None] * D + dd[None, :], (acc / lsum[:, None]).to(dt), mask=rmask[:, None])
        else:
            at = sp * HQ + heads
            tl.store(po_ptr + at[:, None] * D + dd[None, :], acc, mask=rmask[:, None])
            tl.store(pm_ptr + at, m, mask=rmask)
            tl.store(pl_ptr + at, lsum, mask=rmask)
            tl.debug_barrier()  # every thread's partials are written before the count says so
            done = tl.atomic_add(cnt_ptr + kh, 1, sem="acq_rel")
            if done == SPLITS - 1:
                rc = tl.arange(0, RC)
                cmask = rc < REP
                hc = kh * REP + rc
                ats = tl.arange(0, SPLITS)[:, None] * HQ + hc[None, :]  # (SPLITS, RC)
                # .cg: read the other splits' partials from L2, never a stale L1 line
                pm = tl.load(pm_ptr + ats, mask=cmask[None, :], other=0.0, cache_modifier=".cg")
                pl = tl.load(pl_ptr + ats, mask=cmask[None, :], other=1.0, cache_modifier=".cg")
                w = tl.exp(pm - tl.max(pm, axis=0)[None, :])  # empty splits have max -inf: weight 0
                total = tl.sum(w * pl, axis=0)  # (RC,)
                po = tl.load(po_ptr + ats[:, :, None] * D + dd[None, None, :], mask=cmask[None, :, None],
                             other=0.0, cache_modifier=".cg")  # (SPLITS, RC, D)
                o = tl.sum(po * w[:, :, None], axis=0) / total[:, None]
                tl.store(out_ptr + hc[:, None] * D + dd[None, :], o.to(dt), mask=cmask[:, None])
                tl.atomic_xchg(cnt_ptr + kh, 0)  # ready for the next layer and token


@dataclass(frozen=True)
class MatvecConfig:
    """Rows per program and the K-chunk of one product's kernel, and its warps."""

    rows: int
    chunk: int
    warps: int


def default_config(kind: str, n: int, k: int) -> MatvecConfig:
    """A product's launch shape. kind: "qkv" (rows = dims per half-head), "gated" (gate/up) or "plain".

    From sweeps of each 8B product inside a CUDA graph on an H200 (benchmarks/bench_fused_decode.py):
    the small square products want many short programs, the big ones fewer, wider ones.
    """
    if kind == "qkv":
        return MatvecConfig(8, 512, 4)
    if kind == "gated":
        return MatvecConfig(8, 256, 4)
    if n <= 16384:
        return MatvecConfig(2, 1024, 4)
    return MatvecConfig(16, 256, 4)
