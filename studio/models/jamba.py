"""Jamba: attention, Mamba and mixture-of-experts layers interleaved (AI21's hybrid).

Every `attn_layer_period`-th layer (from `attn_layer_offset`) is attention without positional
encoding (the Mamba layers carry position), the others are Mamba-1 mixers with RMSNorms on dt, B
and C; independently, every `expert_layer_period`-th feed-forward (from `expert_layer_offset`) is
a sparse MoE (softmax router, top-k weights not renormalised; moe.py's router and experts), the
others a SwiGLU MLP. So a conversation's memory is a small KV cache for the few attention layers
plus a fixed (conv, ssm) state per Mamba layer.

Module names follow Hugging Face keys (model.layers.N.mamba.*, .self_attn.*, .feed_forward.router,
.feed_forward.experts.gate_up_proj), and the model speaks LLM's calling convention, so the chat
pipeline runs it unchanged. GGUF (llama.cpp arch `jamba`) is read in mamba_load.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.errors import UserError
from studio.models.llm import KVCache, RMSNorm
from studio.models.mamba import LayerState, MambaConfig, MambaMixer, RecurrentLM
from studio.models.moe import Experts, Router, RouterSpec
from studio.nn.attention import attention


@dataclass
class JambaConfig:
    model_type: str = "jamba"
    vocab_size: int = 65536
    hidden_size: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    intermediate_size: int = 14336
    norm_eps: float = 1e-6
    layer_types: list = field(default_factory=list)  # per layer "attention" | "mamba"
    mlp_types: list = field(default_factory=list)  # per layer "moe" | "dense"
    n_experts: int = 16
    n_experts_per_tok: int = 2
    state_size: int = 16
    conv_kernel: int = 4
    expand: int = 2
    time_step_rank: int = 0  # 0: ceil(hidden / 16)
    conv_bias: bool = True
    proj_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144

    def __post_init__(self) -> None:
        if not self.time_step_rank:
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if not self.layer_types:
            self.layer_types = ["attention" if i % 8 == 4 else "mamba" for i in range(self.n_layers)]
        if not self.mlp_types:
            self.mlp_types = ["moe" if i % 2 == 1 else "dense" for i in range(self.n_layers)]
        if len(self.layer_types) != self.n_layers or len(self.mlp_types) != self.n_layers:
            raise UserError("bad_model", f"Jamba config lists {len(self.layer_types)} layer kinds and "
                            f"{len(self.mlp_types)} feed-forward kinds for {self.n_layers} layers; download it again.")
        if self.n_heads % self.n_kv_heads:
            raise UserError("bad_model", f"{self.n_heads} attention heads are not a multiple of {self.n_kv_heads} "
                            "key/value heads; the config is damaged, download it again.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def mamba_config(self) -> MambaConfig:
        """The Mamba-1 mixer's sizes (with Jamba's dt/B/C norms)."""
        return MambaConfig(model_type="mamba", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           n_layers=self.layer_types.count("mamba"), state_size=self.state_size,
                           conv_kernel=self.conv_kernel, expand=self.expand, time_step_rank=self.time_step_rank,
                           norm_eps=self.norm_eps, use_bias=self.proj_bias, use_conv_bias=self.conv_bias,
                           dt_bc_norm=True)

    def router_spec(self) -> RouterSpec:
        return RouterSpec(self.n_experts, self.n_experts_per_tok, "softmax", norm_topk=False)

    def kv_bytes_per_position(self, elem: int) -> int:
        """Only the attention layers cache keys and values."""
        return self.layer_types.count("attention") * 2 * self.n_kv_heads * self.head_dim * elem

    def state_bytes(self, conv_elem: int = 4) -> int:
        """The Mamba layers' fixed state of one sequence (the attention layers' cache is per position)."""
        return self.mamba_config().state_bytes(conv_elem)

    @classmethod
    def from_name(cls, name: str) -> JambaConfig:
        if name not in CONFIGS:
            raise KeyError(f"unknown Jamba config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_hf(cls, cfg: dict) -> JambaConfig:
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if cfg.get(k) is None]
        if missing:
            raise UserError("bad_model", f"config.json lacks {', '.join(missing)}; download it again.")
        n = int(cfg["num_hidden_layers"])
        ap, ao = int(cfg.get("attn_layer_period", 8)), int(cfg.get("attn_layer_offset", 4))
        ep, eo = int(cfg.get("expert_layer_period", 2)), int(cfg.get("expert_layer_offset", 1))
        n_experts = int(cfg.get("num_experts", 16))
        rank = cfg.get("mamba_dt_rank", "auto")
        # GGUF headers (mamba_load.py) list each layer's kinds instead of the periods
        layer_types = list(cfg.get("layers_block_type") or
                           ["attention" if i % ap == ao else "mamba" for i in range(n)])
        per_layer = cfg.get("layers_num_experts")
        mlp_types = (["moe" if int(e) > 1 else "dense" for e in per_layer] if isinstance(per_layer, list) else
                     ["moe" if n_experts > 1 and i % ep == eo else "dense" for i in range(n)])
        return cls(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]), n_layers=n,
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            layer_types=layer_types, mlp_types=mlp_types,
            n_experts=n_experts, n_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
            state_size=int(cfg.get("mamba_d_state", 16)), conv_kernel=int(cfg.get("mamba_d_conv", 4)),
            expand=int(cfg.get("mamba_expand", 2)), time_step_rank=0 if rank == "auto" else int(rank),
            conv_bias=bool(cfg.get("mamba_conv_bias", True)), proj_bias=bool(cfg.get("mamba_proj_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 262144),
        )

    def build(self, state_dict: dict, dtype: torch.dtype, device: torch.device | str) -> JambaLM:
        from studio.models.mamba_load import build_jamba  # it imports llm_build, which imports this file

        return build_jamba(self, state_dict, dtype, device)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Named configs for benchmarks and tests (real models load from their config.json / GGUF header).
CONFIGS: dict[str, dict[str, Any]] = {
    "jamba-v0.1": dict(vocab_size=65536, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       intermediate_size=14336, n_experts=16, n_experts_per_tok=2),
    "tiny-jamba": dict(vocab_size=256, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=96,
                       layer_types=["mamba", "attention", "mamba", "attention"],
                       mlp_types=["dense", "moe", "dense", "moe"], n_experts=4, n_experts_per_tok=2),
}


class MLP(nn.Module):
    def __init__(self, c: JambaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """moe.py's router and experts under Jamba's key names (router, not gate)."""

    def __init__(self, c: JambaConfig) -> None:
        super().__init__()
        self.router = Router(c.hidden_size, c.router_spec())
        self.experts = Experts(c.n_experts, c.hidden_size, c.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, H) -> (B, T, H)
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, idx = self.router(flat)
        return self.experts(flat, weights.to(x.dtype), idx).view(B, T, H)


class Attention(nn.Module):
    """Causal GQA over a static KV cache, no positional encoding."""

    def __init__(self, c: JambaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.d = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.n_heads * self.d, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.n_kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.n_kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(c.n_heads * self.d, c.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, mask: Tensor, input_pos: Tensor, kv_len: int | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.d).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        k_all, v_all = self.kv_cache.update(input_pos, k, v)  # (B, H_kv, S, D)
        if kv_len is not None:
            k_all, v_all = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
        rep = self.n_heads // self.n_kv  # GQA: a group's query heads folded into the query axis
        y = attention(q.reshape(B, self.n_kv, rep * T, self.d), k_all, v_all, mask=mask)
        return self.o_proj(y.reshape(B, self.n_heads, T, self.d).transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c: JambaConfig, kind: str, mlp: str) -> None:
        super().__init__()
        self.is_attention = kind == "attention"
        if self.is_attention:
            self.self_attn = Attention(c)
        else:
            self.mamba = MambaMixer(c.mamba_config())
        self.feed_forward = SparseMoE(c) if mlp == "moe" else MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.pre_ff_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class Backbone(nn.Module):
    def __init__(self, c: JambaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, _weight=torch.empty(c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(c, k, m) for k, m in zip(c.layer_types, c.mlp_types, strict=True))
        self.final_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class JambaLM(RecurrentLM):
    """The hybrid with LLM's calling convention; position 0 starts a new sequence, as in MambaLM."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__(config)
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.final_layernorm

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        c = self.config
        dtype = dtype or self.model.final_layernorm.weight.dtype
        device = torch.device(device) if device is not None else self.device
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        conv, ssm = c.mamba_config().state_shapes()
        self.states = []
        for layer in self.model.layers:
            if layer.is_attention:
                layer.self_attn.kv_cache = KVCache(max_batch, c.n_kv_heads, max_seq_len, c.head_dim, dtype, device)
            else:
                layer.state = LayerState(max_batch, conv, ssm, dtype, device)
                self.states.append(layer.state)
        self.register_buffer("key_index", torch.arange(max_seq_len, device=device), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, kv_len: int | None = None,
                last_only: bool = False) -> Tensor:
        """tokens (B, T) at positions input_pos (T,) -> logits (B, T, V) (or (B, 1, V) with last_only)."""
        assert self.max_seq_len > 0, "call setup_caches() before forward()"
        self.reset_at_sequence_start(input_pos)
        c = self.config
        x = self.model.embed_tokens(tokens).to(self.model.final_layernorm.weight.dtype)  # (B, T, C)
        T = tokens.shape[1]
        keys = (self.key_index if kv_len is None else self.key_index[:kv_len]).unsqueeze(0)  # (1, S)
        rep = c.n_heads // c.n_kv_heads
        mask = (keys <= input_pos.unsqueeze(-1)).unsqueeze(0).expand(rep, T, -1).reshape(rep * T, -1)
        for layer in self.model.layers:
            h = layer.input_layernorm(x)
            if layer.is_attention:
                x = x + layer.self_attn(h, mask, input_pos, kv_len)
            else:
                x = x + layer.mamba(h, layer.state)
            x = x + layer.feed_forward(layer.pre_ff_layernorm(x))
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.final_layernorm(x))
