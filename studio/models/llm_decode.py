"""The fused CUDA decode step for full-precision LLMs: Triton kernels, one CUDA graph per model.

Why it exists: the torch.compile step ran 459 kernels a token for an 8B model (H100) with about
0.8 ms of gaps between them, cuBLAS split-K reduces on the one-row products, two KV-cache writes a
layer, and one graph per attended-length bucket that took ~40 s each to compile. Here one token is:

    embedding row
    per layer: 1. RMSNorm + q/k/v product (+ bias) + RoPE; q to a buffer, k and v into the cache slot
               2. attention over the filled prefix, split along the cache (the length is read on the
                  device, so one graph serves every position); the last split to finish merges them
               3. o_proj + residual add     4. RMSNorm + gate/up product + SiLU(gate) * up
               5. down_proj + residual add
    RMSNorm + lm_head -> fp32 logits

Each product reads its weight matrix once, row blocks per program, with the norm folded in (the
program also sums x^2 along the way and scales its dot products once at the end).

Covers the LLaMA layout (LLaMA 2/3, Mistral incl. sliding window, Qwen2/2.5 with q/k/v bias,
Qwen3 with q/k RMSNorm, SmolLM2) in bf16/fp16/fp32 with plain weights, as build_llm(fuse=True) lays
them out. Qwen3's norm needs a whole head, so there step 1 leaves q and k unrotated and one more
small kernel normalises, rotates and writes k. `unsupported(model)` says why any other model keeps
the torch.compile step. The slow obvious path is the model itself (`decode_step`); tests hold the
two equal.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

try:  # CUDA builds of torch ship Triton; CPU builds do not, and there the model's own step is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None


class FusedStepError(RuntimeError):
    """The fused step could not be built on this GPU (its kernels failed to compile or capture)."""


def unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot use the fused step, or None when it can."""
    if triton is None:
        return "Triton is not installed"
    c = model.config
    if c.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        return f"{c.model_type} models need norms or attention extras the fused step lacks"
    if not (c.fused_qkv and c.fused_gate_up):
        return "q/k/v and gate/up are not fused"
    if c.activation != "silu" or c.partial_rotary_factor != 1.0 or c.local_rope_theta is not None:
        return "activation or rotary layout differs from LLaMA's"
    if c.attn_softcap or c.final_softcap or c.sandwich_norm or c.gemma_norm or c.embed_scale:
        return "the model uses soft-capping or extra norms"
    d = c.head_dim
    if d & (d - 1) or d < 16:
        return f"head size {d} is not a power of two of at least 16"
    if c.n_heads % c.n_kv_heads:
        return "query heads are not a multiple of key/value heads"
    linears = [m for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))]
    if not all(type(m) is nn.Linear for m in linears) or type(model.model.embed_tokens) is not nn.Embedding:
        return "some weights are packed (quantized)"
    w = model.model.embed_tokens.weight
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"weights are {w.dtype}, not bf16/fp16/fp32"
    if any(p.dtype != w.dtype or p.device != w.device for p in model.parameters()):
        return "weights are not all of one dtype on one device"
    if model.max_seq_len <= 0:
        return "the KV cache is not set up"
    return gpu_unsupported(w.device) if w.device.type == "cuda" else None


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
    def _matvec_kernel(w_ptr, x_ptr, g_ptr, b_ptr, y_ptr, N, K, eps,
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
    def _qkv_rope_kernel(w_ptr, x_ptr, g_ptr, b_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, kraw_ptr,
                         K, eps, cache_len,
                         HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BIAS: tl.constexpr,
                         ROPE: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
        """RMSNorm(x) * g, then the fused q/k/v rows of one head's dims [d, d+BH) and [d+D/2, d+D/2+BH)
        (RoPE's rotate-half partners), rotated at `pos` for q and k; q -> q_ptr, k and v -> cache slot pos.
        ROPE=False (q/k norm models): q and k leave unrotated, q -> q_ptr, k -> kraw_ptr, for
        _head_norm_rope_kernel."""
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
    def _head_norm_rope_kernel(q_ptr, kraw_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, cache_len, eps,
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
    def _attention_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr, cnt_ptr, cache_len,
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


@dataclass
class _Layer:
    qkv_w: Tensor
    qkv_b: Tensor | None
    norm1: Tensor
    o_w: Tensor
    o_b: Tensor | None
    norm2: Tensor
    gate_up_w: Tensor
    gate_up_b: Tensor | None
    down_w: Tensor
    down_b: Tensor | None
    k_cache: Tensor
    v_cache: Tensor
    window: int
    q_norm: Tensor | None = None  # Qwen3: RMSNorm weights over each head's dims
    k_norm: Tensor | None = None


class FusedDecoder:
    """decode_step's drop-in for one model on CUDA: call it as step(model, token, pos, bucket).

    The first call captures the whole token into one CUDA graph (after a warm-up launch that
    compiles the kernels); later calls copy the token and position in and replay it. `bucket`
    is accepted for decode_step's signature and ignored: attention reads the filled prefix.
    """

    # 32 splits of 32-key steps: the fastest of 12 variants summed over 128, 2048 and 8191 filled
    # positions (8B, H200: 211 / 319 / 485 us a token for its 32 attention kernels)
    ATTN_SPLITS = 32
    ATTN_BLOCK = 32

    def __init__(self, model: nn.Module, configs: dict[tuple[str, int, int], MatvecConfig] | None = None,
                 use_graph: bool = True, attn_splits: int | None = None, attn_block: int | None = None,
                 attn_warps: int = 4) -> None:
        why = unsupported(model)
        if why:
            raise ValueError(f"the fused decode step cannot run this model: {why}")
        c = model.config
        self.model = model
        self.config = c
        self.use_graph = use_graph
        self.attn_splits = attn_splits or self.ATTN_SPLITS
        self.attn_block = attn_block or self.ATTN_BLOCK
        self.attn_warps = attn_warps
        self.configs = dict(configs or {})
        emb = model.model.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        self.cache_len = model.max_seq_len
        self.hq, self.hkv, self.d = c.n_heads, c.n_kv_heads, c.head_dim
        self.rep = c.n_heads // c.n_kv_heads
        self.scale = float(c.head_dim ** -0.5)
        self.layers = []
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                qkv_w=a.qkv_proj.weight, qkv_b=a.qkv_proj.bias, norm1=layer.input_layernorm.weight,
                o_w=a.o_proj.weight, o_b=a.o_proj.bias, norm2=layer.post_attention_layernorm.weight,
                gate_up_w=mlp.gate_up_proj.weight, gate_up_b=mlp.gate_up_proj.bias,
                down_w=mlp.down_proj.weight, down_b=mlp.down_proj.bias,
                k_cache=a.kv_cache.k_cache, v_cache=a.kv_cache.v_cache,
                window=int(c.sliding_window or 0) if layer.sliding else 0,
                q_norm=a.q_norm.weight if c.qk_norm else None, k_norm=a.k_norm.weight if c.qk_norm else None))
        self.cos, self.sin = model.rope_cos, model.rope_sin  # (T, D) fp32
        kw = dict(device=self.device)
        self.tok = torch.zeros(1, dtype=torch.long, **kw)
        self.pos = torch.zeros(1, dtype=torch.long, **kw)
        self.x = torch.zeros(1, c.hidden_size, dtype=self.dtype, **kw)  # the residual stream
        self.q = torch.zeros(self.hq * self.d, dtype=self.dtype, **kw)
        self.k_raw = torch.zeros(self.hkv * self.d, dtype=self.dtype, **kw)  # k before q/k norm (Qwen3)
        self.attn = torch.zeros(self.hq * self.d, dtype=self.dtype, **kw)
        self.h = torch.zeros(c.intermediate_size, dtype=self.dtype, **kw)
        self.logits = torch.zeros(c.vocab_size, dtype=torch.float32, **kw)
        s = self.attn_splits
        self.part_o = torch.zeros(s, self.hq, self.d, dtype=torch.float32, **kw)
        self.part_m = torch.zeros(s, self.hq, dtype=torch.float32, **kw)
        self.part_l = torch.zeros(s, self.hq, dtype=torch.float32, **kw)
        # Triton's interpreter gets bf16 dots wrong: there (CPU tests) the dots run in fp32
        self.f32_dots = self.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
        self.counts = torch.zeros(self.hkv, dtype=torch.int32, **kw)  # splits done, per key/value head
        self.graph: torch.cuda.CUDAGraph | None = None
        self.built = False
        self.build_s = 0.0  # seconds the first call took (kernel compiles, graph capture)

    # -- the kernels of one token, launched in order --------------------------------------------

    def config_for(self, kind: str, n: int, k: int) -> MatvecConfig:
        key = (kind, n, k)
        if key not in self.configs:
            self.configs[key] = default_config(kind, n, k)
        return self.configs[key]

    def _matvec(self, w: Tensor, x: Tensor, y: Tensor, *, norm: Tensor | None = None, bias: Tensor | None = None,
                resid: bool = False, gated: bool = False) -> None:
        n, k = (w.shape[0] // 2 if gated else w.shape[0]), w.shape[1]
        cfg = self.config_for("gated" if gated else "plain", n, k)
        _matvec_kernel[(triton.cdiv(n, cfg.rows),)](
            w, x, norm if norm is not None else w, bias if bias is not None else w, y, n, k,
            float(self.config.norm_eps), NORM=norm is not None, BIAS=bias is not None, RESID=resid, GATED=gated,
            BN=cfg.rows, BK=cfg.chunk, num_warps=cfg.warps)

    def qkv_rope(self, L: _Layer, x: Tensor) -> None:
        k = L.qkv_w.shape[1]
        cfg = self.config_for("qkv", L.qkv_w.shape[0], k)
        bh = min(cfg.rows, self.d // 2)
        eps = float(self.config.norm_eps)
        _qkv_rope_kernel[((self.hq + 2 * self.hkv) * (self.d // 2 // bh),)](
            L.qkv_w, x, L.norm1, L.qkv_b if L.qkv_b is not None else L.qkv_w, self.cos, self.sin, self.pos,
            self.q, L.k_cache, L.v_cache, self.k_raw, k, eps, self.cache_len,
            HQ=self.hq, HKV=self.hkv, D=self.d, BIAS=L.qkv_b is not None, ROPE=L.q_norm is None, BH=bh,
            BK=cfg.chunk, num_warps=cfg.warps)
        if L.q_norm is not None:  # one more small kernel: the norm needs the whole head
            _head_norm_rope_kernel[(self.hq + self.hkv,)](
                self.q, self.k_raw, L.q_norm, L.k_norm, self.cos, self.sin, self.pos, L.k_cache, self.cache_len,
                eps, HQ=self.hq, D=self.d, num_warps=1)

    def attention(self, L: _Layer) -> None:
        _attention_kernel[(self.hkv, self.attn_splits)](
            self.q, L.k_cache, L.v_cache, self.pos, self.attn, self.part_o, self.part_m, self.part_l,
            self.counts, self.cache_len, self.scale, WINDOW=L.window, HQ=self.hq, REP=self.rep,
            RP=max(16, triton.next_power_of_2(self.rep)),  # tl.dot needs 16 rows
            RC=triton.next_power_of_2(self.rep), D=self.d, SPLITS=self.attn_splits, BS=self.attn_block,
            F32_DOTS=self.f32_dots, PREC="ieee" if self.dtype == torch.float32 else "tf32",
            num_warps=self.attn_warps)

    def run(self) -> Tensor:
        """One token: self.tok at self.pos -> self.logits (V,) fp32, writing cache slot pos."""
        torch.index_select(self.model.model.embed_tokens.weight, 0, self.tok, out=self.x)
        x = self.x.view(-1)
        for L in self.layers:
            self.qkv_rope(L, x)
            self.attention(L)
            self._matvec(L.o_w, self.attn, x, bias=L.o_b, resid=True)
            self._matvec(L.gate_up_w, x, self.h, norm=L.norm2, bias=L.gate_up_b, gated=True)
            self._matvec(L.down_w, self.h, x, bias=L.down_b, resid=True)
        self._matvec(self.model.lm_head.weight, x, self.logits, norm=self.model.model.norm.weight)
        return self.logits

    # -- decode_step's interface --------------------------------------------------------------

    def __call__(self, model: nn.Module, token: Tensor, pos: Tensor, bucket: int) -> Tensor:
        """token (1, 1) at pos (1,) -> logits (1, 1, V) fp32, as decode_step returns them."""
        if model is not self.model or model.model.layers[0].self_attn.kv_cache.k_cache is not self.layers[0].k_cache:
            raise RuntimeError("this fused decode step was built for another model or KV cache")
        self.tok.copy_(token.view(1))
        self.pos.copy_(pos.view(1))
        if not self.built:
            t = time.perf_counter()
            try:  # compiling the kernels (first use on this machine) or capturing may fail on an odd GPU
                self._capture() if self.use_graph else self.run()
            except Exception as exc:  # noqa: BLE001 - reported as a FusedStepError; the caller falls back
                self.graph = None
                raise FusedStepError(f"the fused decode step could not be built: {type(exc).__name__}: {exc}") from exc
            self.built, self.build_s = True, time.perf_counter() - t
            if not self.use_graph:
                return self.logits.view(1, 1, -1)
        if not self.use_graph:
            return self.run().view(1, 1, -1)
        self.graph.replay()
        return self.logits.view(1, 1, -1)

    def _capture(self) -> None:
        # The warm-up compiles every kernel and writes the same cache slot the first replay writes.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run()
        self.graph = graph
