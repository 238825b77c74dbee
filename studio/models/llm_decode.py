"""The fused CUDA decode step for full-precision LLMs: one CUDA graph per model of the Triton kernels
in studio/nn/kernels/decode.py.

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

from studio.nn.kernels import decode as kernels
from studio.nn.kernels.decode import MatvecConfig, default_config, gpu_unsupported, triton


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
        kernels.matvec_kernel[(triton.cdiv(n, cfg.rows),)](
            w, x, norm if norm is not None else w, bias if bias is not None else w, y, n, k,
            float(self.config.norm_eps), NORM=norm is not None, BIAS=bias is not None, RESID=resid, GATED=gated,
            BN=cfg.rows, BK=cfg.chunk, num_warps=cfg.warps)

    def qkv_rope(self, L: _Layer, x: Tensor) -> None:
        k = L.qkv_w.shape[1]
        cfg = self.config_for("qkv", L.qkv_w.shape[0], k)
        bh = min(cfg.rows, self.d // 2)
        eps = float(self.config.norm_eps)
        kernels.qkv_rope_kernel[((self.hq + 2 * self.hkv) * (self.d // 2 // bh),)](
            L.qkv_w, x, L.norm1, L.qkv_b if L.qkv_b is not None else L.qkv_w, self.cos, self.sin, self.pos,
            self.q, L.k_cache, L.v_cache, self.k_raw, k, eps, self.cache_len,
            HQ=self.hq, HKV=self.hkv, D=self.d, BIAS=L.qkv_b is not None, ROPE=L.q_norm is None, BH=bh,
            BK=cfg.chunk, num_warps=cfg.warps)
        if L.q_norm is not None:  # one more small kernel: the norm needs the whole head
            kernels.head_norm_rope_kernel[(self.hq + self.hkv,)](
                self.q, self.k_raw, L.q_norm, L.k_norm, self.cos, self.sin, self.pos, L.k_cache, self.cache_len,
                eps, HQ=self.hq, D=self.d, num_warps=1)

    def attention(self, L: _Layer) -> None:
        kernels.attention_kernel[(self.hkv, self.attn_splits)](
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
