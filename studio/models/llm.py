"""One config-driven decoder-only transformer for the LLM families we run natively.

gpt-fast style: `LLMConfig` (plus a small table of named configs), a few small modules,
a static KV cache that is a plain module with two buffers. Building from loaded weights (meta
device, `load_state_dict(assign=True)`) lives in llm_build.py.

Module names follow Hugging Face key names (model.layers.N.self_attn.q_proj, ...) so a
Hugging Face state dict loads without remapping. Families covered, all chosen by config
data: LLaMA 2/3.x (incl. llama3 rope scaling), Mistral (sliding window), Qwen2/2.5 (qkv
bias), Qwen3 (q/k RMSNorm), Gemma 1/2/3 (scaled embedding, (1+w) RMSNorm, GeLU-tanh,
soft-capping, sandwich norms, alternating sliding/global layers, local rope base), Phi-3
(fused qkv_proj / gate_up_proj kept fused, partial rotary, longrope).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.errors import UserError
from studio.models.moe import RouterSpec, SparseMoE, moe_fields
from studio.nn.attention import attention

# model_type -> family behaviour. Gemma variants differ in norms and attention extras.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3",
    "mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3",
)


@dataclass
class LLMConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear"|"longrope", ...}
    local_rope_theta: float | None = None  # Gemma3 sliding layers use their own base
    local_rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False  # Qwen2: q/k/v carry a bias (o_proj never does there)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma3: RMSNorm over head_dim on q and k before rope
    gemma_norm: bool = False  # RMSNorm scales by (1 + w), computed in fp32
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden)
    sandwich_norm: bool = False  # Gemma2/3: post-attention, pre- and post-feedforward norms
    activation: str = "silu"  # "silu", "gelu_tanh", "gelu"
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma)
    sliding_window: int | None = None
    layer_types: list = field(default_factory=list)  # per layer: "full_attention" | "sliding_attention"
    fused_qkv: bool = False  # Phi-3
    fused_gate_up: bool = False
    # Mixture of experts (moe.py): per layer "dense" | "moe"; the router's rules
    mlp_types: list = field(default_factory=list)
    n_experts: int = 0
    n_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0  # DeepSeek: one always-on MLP of n_shared * moe_intermediate_size
    router_score: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    # Multi-head latent attention (deepseek.py); kv_lora_rank 0 = ordinary attention. With MLA,
    # head_dim is the rotary part and n_kv_heads 1: the compressed cache is one shared "head".
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary pairs are (2i, 2i+1), not (i, i + D/2)
    mla_scale: float = 0.0  # the attention scale yarn's mscale implies

    def __post_init__(self) -> None:
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.n_layers
        if not self.mlp_types:
            self.mlp_types = ["moe" if self.n_experts else "dense"] * self.n_layers

    def kv_bytes_per_position(self, elem: int) -> int:
        """KV-cache bytes per token of context: K and V per layer, or MLA's latent + rotary key."""
        if self.kv_lora_rank:
            return self.n_layers * (self.kv_lora_rank + self.head_dim) * elem
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * elem

    def router_spec(self) -> RouterSpec:
        return RouterSpec(self.n_experts, self.n_experts_per_tok, self.router_score, self.norm_topk_prob,
                          self.n_group, self.topk_group, self.group_score, self.routed_scaling_factor,
                          self.router_bias)

    @classmethod
    def from_name(cls, name: str) -> LLMConfig:
        if name not in CONFIGS:
            raise KeyError(f"unknown LLM config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_hf(cls, cfg: dict) -> LLMConfig:
        """Read a Hugging Face config.json dict (old rope_theta/rope_scaling or new rope_parameters)."""
        mt = cfg.get("model_type", "")
        if mt == "gemma3" and isinstance(cfg.get("text_config"), dict):
            cfg, mt = {**cfg["text_config"], "model_type": "gemma3_text"}, "gemma3_text"
        if mt not in SUPPORTED_MODEL_TYPES:
            arch = ", ".join(cfg.get("architectures") or []) or "no architectures field"
            raise UserError(
                "unsupported",
                f"This model's architecture is {mt or 'missing'!r} ({arch}); Studio runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}. Pick a model of one of those families.",
            )
        # Multimodal Gemma3 configs on the Hub leave the text model's defaults out.
        cfg = {**_HF_DEFAULTS.get(mt, {}), **cfg}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if cfg.get(k) is None]
        if missing:
            raise UserError("bad_model", f"config.json lacks {', '.join(missing)}; download it again.")
        gemma = mt.startswith("gemma")
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        n_layers = int(cfg["num_hidden_layers"])
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        global_rope, local_rope = _rope_params(cfg, mt)
        act = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu")
        sliding = cfg.get("sliding_window")
        if mt in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            sliding = None
        layer_types = list(cfg.get("layer_types") or [])
        if not layer_types:
            if mt == "gemma2":
                layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
            elif mt == "gemma3_text":
                pattern = int(cfg.get("sliding_window_pattern", 6))
                layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                               for i in range(n_layers)]
            elif mt in ("qwen2", "qwen3") and sliding:
                first = int(cfg.get("max_window_layers", n_layers))
                layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
            else:
                layer_types = ["sliding_attention" if sliding else "full_attention"] * n_layers
        if not sliding:
            layer_types = ["full_attention"] * n_layers
        qpas = cfg.get("query_pre_attn_scalar") if mt in ("gemma2", "gemma3_text") else None
        extra = moe_fields(cfg, mt, n_layers)
        mla: dict = {}
        if mt.startswith("deepseek"):
            from studio.models.deepseek import mla_fields

            mla = mla_fields(cfg)  # head_dim, n_kv_heads: MLA's own meaning of them
        return replace(cls(
            model_type=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            rope_theta=float(global_rope.get("rope_theta", 10000.0)),
            rope_scaling=_scaling_only(global_rope),
            local_rope_theta=float(local_rope["rope_theta"]) if local_rope else None,
            local_rope_scaling=_scaling_only(local_rope) if local_rope else None,
            partial_rotary_factor=float(global_rope.get("partial_rotary_factor",
                                                        cfg.get("partial_rotary_factor", 1.0))),
            # Qwen2 hard-codes q/k/v biases and no o_proj bias; the others follow attention_bias.
            attention_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=mt != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text"),
            gemma_norm=gemma,
            embed_scale=gemma,
            sandwich_norm=mt in ("gemma2", "gemma3_text"),
            activation=_activation(act),
            attn_softcap=cfg.get("attn_logit_softcapping") if mt in ("gemma2", "gemma3_text") else None,
            final_softcap=cfg.get("final_logit_softcapping") if mt in ("gemma2", "gemma3_text") else None,
            query_pre_attn_scalar=float(qpas) if qpas else None,
            sliding_window=int(sliding) if sliding else None,
            layer_types=layer_types,
            fused_qkv=mt == "phi3",
            fused_gate_up=mt == "phi3",
            **extra,
        ), **mla)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
                        max_position_embeddings=131072, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh"),
}


def _rope_params(cfg: dict, mt: str) -> tuple[dict, dict | None]:
    """(global, local) rope dicts with rope_theta and scaling keys, from either config format."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        glob = dict(rp.get("full_attention") or {})
        local = dict(rp["sliding_attention"]) if rp.get("sliding_attention") else None
        glob.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        if local is not None:
            local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
        return glob, local if mt == "gemma3_text" else None
    glob = dict(rp) if isinstance(rp, dict) else dict(cfg.get("rope_scaling") or {})
    glob.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0 if mt == "gemma3_text" else 10000.0))
    if "type" in glob and "rope_type" not in glob:
        glob["rope_type"] = glob.pop("type")
    if glob.get("rope_type") in ("su", "yarn") and mt == "phi3":
        glob["rope_type"] = "longrope"
    if mt == "phi3" and "original_max_position_embeddings" in cfg:
        glob.setdefault("original_max_position_embeddings", cfg["original_max_position_embeddings"])
    local = None
    if mt == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    return glob, local


def _scaling_only(params: dict | None) -> dict | None:
    if not params or params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}


def _activation(name: str) -> str:
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"):
        return "gelu_tanh"
    if name == "gelu":
        return "gelu"
    raise UserError("unsupported", f"activation {name!r} is not supported (silu, gelu, gelu_pytorch_tanh are)")


# Named configs for benchmarks and tests (real models load from their config.json instead).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, n_layers=32, n_heads=32,
                       n_kv_heads=8, head_dim=128, intermediate_size=14336, norm_eps=1e-5,
                       max_position_embeddings=8192, rope_theta=500000.0),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, n_layers=36, n_heads=32, n_kv_heads=8,
                     head_dim=128, intermediate_size=12288, norm_eps=1e-6, max_position_embeddings=40960,
                     rope_theta=1000000.0, qk_norm=True),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, n_layers=32, n_heads=32,
                       n_kv_heads=32, head_dim=128, intermediate_size=11008, norm_eps=1e-5),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9,
                         n_kv_heads=3, head_dim=64, intermediate_size=1536, norm_eps=1e-5,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "tiny-llama": dict(model_type="llama", vocab_size=256, hidden_size=64, n_layers=2, n_heads=4,
                       n_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=512),
}


# ---------------------------------------------------------------------------
# Rotary embeddings: tables precomputed once per cache size.

def rope_inv_freq(dim: int, theta: float, scaling: dict | None, max_seq_len: int,
                  max_position_embeddings: int) -> tuple[Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin multiplier, as Hugging Face computes them."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        from studio.models.deepseek import yarn_inv_freq

        return yarn_inv_freq(dim, theta, scaling, max_position_embeddings)
    if kind == "longrope":
        original = int(scaling["original_max_position_embeddings"])
        factor = scaling.get("factor") or max_position_embeddings / original
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        # Hugging Face switches to the long factors once the sequence outgrows the original
        # context; with a static cache we decide once, from the cache length.
        ext = scaling["long_factor"] if max_seq_len > original else scaling["short_factor"]
        base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * base), float(attn)
    raise UserError("unsupported", f"rope scaling {kind!r} is not supported (default, linear, llama3, longrope are)")


def rope_tables(dim: int, theta: float, scaling: dict | None, max_seq_len: int,
                max_position_embeddings: int) -> tuple[Tensor, Tensor]:
    inv, mult = rope_inv_freq(dim, theta, scaling, max_seq_len, max_position_embeddings)
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv)  # (T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, dim): Hugging Face's rotate_half layout
    return emb.cos() * mult, emb.sin() * mult


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos/sin (T, R) with R <= D (partial rotary leaves the rest untouched)."""
    r = cos.shape[-1]
    rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + rotated * sin
    return out if rest is None else torch.cat([out, rest], dim=-1)


# ---------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        fp32 = x.dtype == torch.float32  # skip no-op casts: they cost dispatch time per token
        h = x if fp32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:  # Gemma multiplies in fp32 and stores w - 1
            h = h * (1.0 + self.weight.float())
            return h if fp32 else h.type_as(x)
        return self.weight * (h if fp32 else h.type_as(x))


class KVCache(nn.Module):
    """Static cache: two buffers (B, H_kv, T_max, D) written in place at `input_pos`."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, c: LLMConfig, sliding: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        if c.fused_qkv:
            self.qkv_proj = nn.Linear(c.hidden_size, q_dim + 2 * kv_dim, bias=c.attention_bias)
        else:
            self.q_proj = nn.Linear(c.hidden_size, q_dim, bias=c.attention_bias)
            self.k_proj = nn.Linear(c.hidden_size, kv_dim, bias=c.attention_bias)
            self.v_proj = nn.Linear(c.hidden_size, kv_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(q_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps, c.gemma_norm)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps, c.gemma_norm)
        self.fused = c.fused_qkv
        self.qk_norm = c.qk_norm
        self.sliding = sliding
        self.scale = (c.query_pre_attn_scalar ** -0.5) if c.query_pre_attn_scalar else c.head_dim ** -0.5
        self.softcap = c.attn_softcap
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if self.fused:
            q, k, v = self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        assert self.kv_cache is not None, "call setup_caches() before forward()"
        k_all, v_all = self.kv_cache.update(input_pos, k, v)  # (B, H_kv, S, D)
        if kv_len is not None:  # decode reads only a prefix of the cache (filled part or bucket)
            k_all, v_all = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
        # GQA without repeating K/V: fold the query heads of a group into the query axis;
        # `mask` comes folded the same way: (rep*T, S).
        rep = self.n_heads // self.n_kv
        qg = q.reshape(B, self.n_kv, rep * T, self.head_dim)  # (B, H_kv, rep*T, D)
        y = attention(qg, k_all, v_all, mask=mask, scale=self.scale, softcap=self.softcap)  # Gemma2 caps logits
        y = y.reshape(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, q_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, c: LLMConfig, inter: int | None = None) -> None:
        super().__init__()
        inter = inter or c.intermediate_size
        if c.fused_gate_up:
            self.gate_up_proj = nn.Linear(c.hidden_size, 2 * inter, bias=c.mlp_bias)
        else:
            self.gate_proj = nn.Linear(c.hidden_size, inter, bias=c.mlp_bias)
            self.up_proj = nn.Linear(c.hidden_size, inter, bias=c.mlp_bias)
        self.down_proj = nn.Linear(inter, c.hidden_size, bias=c.mlp_bias)
        self.fused = c.fused_gate_up
        self.activation = c.activation

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "silu":
            gate = F.silu(gate)
        else:
            gate = F.gelu(gate, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: LLMConfig, layer_type: str, mlp_type: str = "dense") -> None:
        super().__init__()
        self.sliding = layer_type == "sliding_attention"
        if c.kv_lora_rank:
            from studio.models.deepseek import LatentAttention

            self.self_attn: nn.Module = LatentAttention(c)
        else:
            self.self_attn = Attention(c, self.sliding)
        if mlp_type == "moe":
            shared = MLP(c, c.n_shared_experts * c.moe_intermediate_size) if c.n_shared_experts else None
            self.mlp: nn.Module = SparseMoE(c.hidden_size, c.moe_intermediate_size, c.router_spec(), c.activation,
                                            shared)
        else:
            self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps, c.gemma_norm)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps, c.gemma_norm)
        self.sandwich = c.sandwich_norm
        if c.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.norm_eps, c.gemma_norm)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.norm_eps, c.gemma_norm)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_len)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named `model` inside LLM so parameter names match Hugging Face keys."""

    def __init__(self, c: LLMConfig) -> None:
        super().__init__()
        # _weight skips the random init: on the meta device that init alone took ~2 s (torch refs)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, _weight=torch.empty(c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(c, t, m) for t, m in zip(c.layer_types, c.mlp_types, strict=True))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps, c.gemma_norm)


class LLM(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_batch = -1
        self.max_seq_len = -1

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate the KV caches and rope tables for sequences up to `max_seq_len` tokens."""
        c = self.config
        ref = self.model.norm.weight
        dtype = dtype or ref.dtype
        device = device or ref.device
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        for layer in self.model.layers:
            make = getattr(layer.self_attn, "make_cache", None)  # MLA keeps its own compressed cache
            layer.self_attn.kv_cache = (make(max_batch, max_seq_len, dtype, device) if make is not None else
                                        KVCache(max_batch, c.n_kv_heads, max_seq_len, c.head_dim, dtype, device))
        rot = int(c.head_dim * c.partial_rotary_factor)
        cos, sin = rope_tables(rot, c.rope_theta, c.rope_scaling, max_seq_len, c.max_position_embeddings)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        if c.local_rope_theta is not None:
            cos, sin = rope_tables(rot, c.local_rope_theta, c.local_rope_scaling, max_seq_len,
                                   c.max_position_embeddings)
        self.register_buffer("local_cos", cos.to(device), persistent=False)
        self.register_buffer("local_sin", sin.to(device), persistent=False)
        self.register_buffer("key_index", torch.arange(max_seq_len, device=device), persistent=False)
        scale = torch.tensor(c.hidden_size ** 0.5 if c.embed_scale else 1.0)
        self.register_buffer("embed_mult", scale.to(device=device, dtype=dtype), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, kv_len: int | None = None,
                last_only: bool = False) -> Tensor:
        """tokens (B, T) at positions input_pos (T,) -> logits (B, T, V) (or (B, 1, V) with last_only).

        `kv_len`: attend to cache entries [0, kv_len) instead of the whole cache. It must cover
        every position in input_pos; entries past a query's position are masked, so any larger
        kv_len gives the same result (the compiled decode step rounds it up to a static bucket).
        """
        c = self.config
        x = self.model.embed_tokens(tokens).to(self.embed_mult.dtype)  # (B, T, C); packed tables give fp32
        if c.embed_scale:
            x = x * self.embed_mult
        T = tokens.shape[1]
        pos = input_pos.unsqueeze(-1)  # (T, 1)
        keys = self.key_index if kv_len is None else self.key_index[:kv_len]
        keys = keys.unsqueeze(0)  # (1, S)
        rep = c.n_heads // c.n_kv_heads
        causal = keys <= pos  # (T, S)
        windowed = causal & (keys > pos - c.sliding_window) if c.sliding_window else causal
        # fold the query heads of a GQA group into the query axis, as Attention does with q
        causal = causal.unsqueeze(0).expand(rep, T, -1).reshape(rep * T, -1)  # (rep*T, S)
        windowed = windowed.unsqueeze(0).expand(rep, T, -1).reshape(rep * T, -1)
        dt = x.dtype
        cos, sin = self.rope_cos[input_pos].to(dt), self.rope_sin[input_pos].to(dt)  # (T, R)
        lcos, lsin = self.local_cos[input_pos].to(dt), self.local_sin[input_pos].to(dt)
        for layer in self.model.layers:
            if layer.sliding:
                x = layer(x, lcos, lsin, windowed, input_pos, kv_len)
            else:
                x = layer(x, cos, sin, causal, input_pos, kv_len)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.model.norm(x))
        if c.final_softcap:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits
