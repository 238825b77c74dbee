"""DeepSeek V2 / V2-Lite / V3 attention: multi-head latent attention (MLA) with its compressed KV cache.

Per token the cache keeps one latent vector c_kv (kv_lora_rank, 512 in the real models) and one
shared rotary key (qk_rope_head_dim, 64): 576 numbers per layer instead of 2 x 128 heads x 192.
Attention runs in the latent space ("absorbed"): the query's non-rotary part is multiplied by
kv_b_proj's key half once per step, scores are taken against c_kv directly, and the weighted sum
of c_kv goes through kv_b_proj's value half. It is exactly the per-head attention of the
reference (the same products, reassociated), and it never expands the cache. Seen from
`attention()` it is multi-query attention with one key/value head, so LLM.forward's GQA mask
folding (n_kv_heads = 1) applies unchanged.

The MoE feed-forward (shared + routed experts, group-limited routing) is moe.SparseMoE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from studio.models.llm import LLMConfig, RMSNorm, apply_rope
from studio.nn.attention import attention


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def mla_fields(cfg: dict) -> dict:
    """LLMConfig's MLA fields from a DeepSeek config.json dict."""
    nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
    scale = (nope + rope) ** -0.5
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else cfg.get("rope_scaling")
    params = params or {}
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        scale *= _mscale(float(params["factor"]), float(params["mscale_all_dim"])) ** 2  # as DeepSeek's reference
    return dict(kv_lora_rank=int(cfg["kv_lora_rank"]), q_lora_rank=int(cfg.get("q_lora_rank") or 0),
                qk_nope_head_dim=nope, v_head_dim=v, head_dim=rope, n_kv_heads=1, partial_rotary_factor=1.0,
                rope_interleave=cfg.get("model_type") == "deepseek_v2" or bool(cfg.get("rope_interleave", True)),
                mla_scale=scale)


def yarn_inv_freq(dim: int, theta: float, s: dict, max_position_embeddings: int) -> tuple[Tensor, float]:
    """YaRN inverse frequencies and cos/sin multiplier, as Hugging Face computes them."""
    factor = float(s.get("factor") or 1.0)
    orig = int(s.get("original_max_position_embeddings") or max_position_embeddings)
    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
    fast, slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def corr(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(fast), corr(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate, float(attn)


def canonical_mla(state: dict) -> dict:
    """llama.cpp's per-head split attn_k_b (H, rank, nope) / attn_v_b (H, v, rank) -> kv_b_proj (H*(nope+v), rank)."""
    out = dict(state)
    for key in [k for k in state if k.endswith("self_attn.k_b_proj.weight")]:
        base = key[: -len("k_b_proj.weight")]
        k_b, v_b = out.pop(key), out.pop(base + "v_b_proj.weight")
        k_b = k_b if isinstance(k_b, Tensor) else k_b.dequantize()
        v_b = v_b if isinstance(v_b, Tensor) else v_b.dequantize()
        heads, rank = k_b.shape[0], k_b.shape[1]
        kv_b = torch.cat([k_b.float().transpose(1, 2), v_b.float()], dim=1).reshape(-1, rank)
        out.setdefault(base + "kv_b_proj.weight", kv_b)  # a file that carries both keeps its kv_b
        assert out[base + "kv_b_proj.weight"].shape[0] == kv_b.shape[0] == heads * (kv_b.shape[0] // heads)
    return out


class LatentCache(nn.Module):
    """The compressed cache: (B, S, kv_lora_rank + rope) per layer, written in place at `input_pos`."""

    def __init__(self, batch: int, max_seq_len: int, width: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("kv", torch.zeros(batch, max_seq_len, width, dtype=dtype, device=device),
                             persistent=False)

    def update(self, input_pos: Tensor, entry: Tensor) -> Tensor:
        self.kv.index_copy_(1, input_pos, entry.to(self.kv.dtype))
        return self.kv


def _weight(mod: nn.Module, dtype: torch.dtype) -> Tensor:
    return mod.weight.to(dtype) if isinstance(mod, nn.Linear) else mod.dequantize(dtype)


def _deinterleave(x: Tensor) -> Tensor:
    """Rotary pairs (2i, 2i+1) -> (i, i + D/2), the layout apply_rope rotates."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class LatentAttention(nn.Module):
    def __init__(self, c: LLMConfig) -> None:
        super().__init__()
        h, nh = c.hidden_size, c.n_heads
        self.n_heads, self.nope, self.rope, self.v_dim = nh, c.qk_nope_head_dim, c.head_dim, c.v_head_dim
        self.rank = c.kv_lora_rank
        q_out = nh * (self.nope + self.rope)
        if c.q_lora_rank:
            self.q_a_proj = nn.Linear(h, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(h, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, c.norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, h, bias=c.attention_bias)
        self.q_lora = bool(c.q_lora_rank)
        self.interleave = c.rope_interleave
        self.scale = c.mla_scale or (self.nope + self.rope) ** -0.5
        self.kv_cache: LatentCache | None = None

    def make_cache(self, batch: int, max_seq_len: int, dtype: torch.dtype, device: torch.device | str) -> LatentCache:
        return LatentCache(batch, max_seq_len, self.rank + self.rope, dtype, device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None) -> Tensor:
        B, T, _ = x.shape
        nh = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, T, nh, self.nope + self.rope).transpose(1, 2)  # (B, nh, T, nope + rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)  # (B, T, rank), (B, T, rope)
        c_kv = self.kv_a_layernorm(c_kv)
        if self.interleave:
            q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)
        assert self.kv_cache is not None, "call setup_caches() before forward()"
        cache = self.kv_cache.update(input_pos, torch.cat([c_kv, k_pe], dim=-1))  # (B, S, rank + rope)
        if kv_len is not None:
            cache = cache[:, :kv_len]
        w = _weight(self.kv_b_proj, q.dtype).view(nh, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # (nh, nope, rank), (nh, v, rank)
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # the key projection absorbed into the query
        qg = torch.cat([q_lat, q_pe], dim=-1).reshape(B, 1, nh * T, self.rank + self.rope)
        kv = cache.unsqueeze(1)  # (B, 1, S, rank + rope): one shared "head"
        y = attention(qg, kv, kv[..., :self.rank], mask=mask, scale=self.scale)  # (B, 1, nh*T, rank)
        y = torch.einsum("bhtr,hvr->bthv", y.view(B, nh, T, self.rank), w_uv)  # (B, T, nh, v)
        return self.o_proj(y.reshape(B, T, nh * self.v_dim))
