"""GGUF metadata and tensor names of the mixture-of-experts and MLA families, as llama.cpp writes them.

Mixtral is GGUF architecture `llama` with `llama.expert_count`; Qwen3-MoE is `qwen3moe`; DeepSeek V2,
V2-Lite and V3 are all `deepseek2` (V3 told apart by its sigmoid gating / `exp_probs_b`). gguf_llm.py
asks here for the extra config.json fields and tensor names; everything stays in Hugging Face terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# GGUF block tensor stem -> our key ("{}" takes the suffix: weight/bias). Stacked experts are 3D and
# keyed without a suffix (canonical_experts in moe.py reads them).
MOE_BLOCK = {
    "ffn_gate_inp": "mlp.gate.{}",
    "exp_probs_b": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj.{}", "ffn_up_shexp": "mlp.shared_experts.up_proj.{}",
    "ffn_down_shexp": "mlp.shared_experts.down_proj.{}",
    "attn_q_a": "self_attn.q_a_proj.{}", "attn_q_a_norm": "self_attn.q_a_layernorm.{}",
    "attn_q_b": "self_attn.q_b_proj.{}",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa.{}", "attn_kv_a_norm": "self_attn.kv_a_layernorm.{}",
    "attn_kv_b": "self_attn.kv_b_proj.{}",
    # newer converters split kv_b per head for llama.cpp's absorbed MLA; deepseek.py joins them again
    "attn_k_b": "self_attn.k_b_proj.{}", "attn_v_b": "self_attn.v_b_proj.{}",
}


def n_experts_of(cfg: dict) -> int:
    return int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)


def moe_expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Per-layer key suffix -> shape, for the expert tensors (checked like the dense ones)."""
    e = n_experts_of(cfg)
    if not e:
        return {}
    h = cfg["hidden_size"]
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    shapes = {"mlp.gate.weight": (e, h), "mlp.experts.gate_proj": (e, inter, h), "mlp.experts.up_proj": (e, inter, h),
              "mlp.experts.down_proj": (e, h, inter)}
    if cfg.get("kv_lora_rank"):  # MLA: per-head query and value sizes differ from head_dim (the rotary part)
        heads = cfg["num_attention_heads"]
        shapes["self_attn.q_proj.weight"] = (heads * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]), h)
        shapes["self_attn.o_proj.weight"] = (h, heads * cfg["v_head_dim"])
    return shapes


def moe_gguf_config(arch: str, get: Callable[..., Any], tensors: dict, cfg: dict) -> dict:
    """The config.json fields an MoE / MLA GGUF file implies, on top of gguf_config's dense ones."""
    n_layers = cfg["num_hidden_layers"]
    routed = {int(name.split(".")[1]) for name in tensors if name.endswith(".ffn_gate_inp.weight")}
    n = int(get("expert_count") or 0)
    used = int(get("expert_used_count") or 0)
    if arch == "llama":
        return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": n,
                "num_experts_per_tok": used}
    if arch == "qwen3moe":
        return {"num_experts": n, "num_experts_per_tok": used,
                "moe_intermediate_size": int(get("expert_feed_forward_length") or cfg["intermediate_size"]),
                # llama.cpp renormalises Qwen3-MoE's top-k unless the file says otherwise
                "norm_topk_prob": bool(get("expert_weights_norm", True)),
                "mlp_only_layers": [i for i in range(n_layers) if i not in routed]}
    if arch == "deepseek2":
        return _deepseek2(get, tensors, cfg, n, used, n_layers, routed)
    return {}


def _deepseek2(get: Callable[..., Any], tensors: dict, cfg: dict, n: int, used: int, n_layers: int,
               routed: set[int]) -> dict:
    rope = int(get("rope.dimension_count"))
    norm = tensors.get("blk.0.attn_kv_a_norm.weight")
    kv_rank = int(get("attention.kv_lora_rank") or (norm.shape[0] if norm is not None else 0))
    q_norm = tensors.get("blk.0.attn_q_a_norm.weight")
    q_rank = int(get("attention.q_lora_rank") or (q_norm.shape[0] if q_norm is not None else 0))
    # Since llama.cpp's MLA rework key/value_length describe the compressed cache and the *_mla keys
    # the per-head sizes; older files have only the per-head ones.
    key = int(get("attention.key_length_mla") or get("attention.key_length"))
    value = int(get("attention.value_length_mla") or get("attention.value_length"))
    sigmoid = get("expert_gating_func") == 2 or f"blk.{min(routed or {0})}.exp_probs_b.bias" in tensors
    groups = int(get("expert_group_count") or 1)
    out: dict[str, Any] = {
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "architectures": ["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
        "n_routed_experts": n, "num_experts_per_tok": used,
        "moe_intermediate_size": int(get("expert_feed_forward_length") or cfg["intermediate_size"]),
        "n_shared_experts": int(get("expert_shared_count") or 0),
        "first_k_dense_replace": int(get("leading_dense_block_count") or 0),
        "routed_scaling_factor": float(get("expert_weights_scale") or 1.0),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if groups > 1 else "greedy"),
        "n_group": groups, "topk_group": int(get("expert_group_used_count") or groups),
        "kv_lora_rank": kv_rank, "q_lora_rank": q_rank or None, "qk_rope_head_dim": rope,
        "qk_nope_head_dim": key - rope, "v_head_dim": value, "head_dim": rope, "partial_rotary_factor": 1.0,
        "num_key_value_heads": cfg["num_attention_heads"],
    }
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "yarn":
        mult = get("rope.scaling.yarn_log_multiplier")
        if mult:  # llama.cpp stores 0.1 * mscale_all_dim; DeepSeek's configs set mscale to the same value
            scaling = {**scaling, "mscale": float(mult) / 0.1, "mscale_all_dim": float(mult) / 0.1}
        scaling.setdefault("beta_fast", 32)
        scaling.setdefault("beta_slow", 1)
        out["rope_scaling"] = scaling
    return out
