"""Building Mamba / Mamba-2 models from what a loader read, and reading llama.cpp's GGUF layout.

Hugging Face folders need nothing special (hf_loader reads them; the keys are already ours). GGUF
files as llama.cpp's converter writes them (arch `mamba` / `mamba2`) differ from HF in a few
tensors, undone here: `ssm_a` holds A = -exp(A_log); `ssm_conv1d` drops the conv's middle axis;
Mamba-2 stores A and D as (heads, 1), the gated norm as (groups, inner / groups) and dt's bias as
`ssm_dt.bias`; the converter leaves out `output` when it equals `token_embd`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from studio.errors import UserError
from studio.models.gguf_llm import GGUFFile, _bad, gguf_model_name, gguf_sampling
from studio.models.jamba import JambaConfig, JambaLM
from studio.models.llm_build import LoadedLLM, _on_device, _packed_head, _set_submodule, chat_config, is_quant
from studio.models.mamba import MODEL_TYPES, NO_POSITION_LIMIT, MambaConfig, MambaLM
from studio.models.tokenizer import special_tokens_from_gguf, tokenizer_from_gguf
from studio.nn.gguf_dequant import GGML_TYPES, dequantize
from studio.nn.packed_gguf import GGUFWeight

GGUF_ARCHS = (*MODEL_TYPES, "jamba")  # llama.cpp's general.architecture names are the HF model_types here


# ---------------------------------------------------------------------------
# Building

def assign_weights(model: nn.Module, state_dict: dict, dtype: torch.dtype, device: torch.device | str,
                   embed: str, tie: bool) -> nn.Module:
    """Put HF-named weights into `model` (built on the meta device): packed Linear weights become their
    packed modules, a packed embedding stays packed where it can, and a missing head ties to `embed`."""
    expected = set(model.state_dict())
    modules = dict(model.named_modules())
    plain: dict[str, Tensor] = {}
    packed: set[str] = set()
    for name, w in state_dict.items():
        if not is_quant(w):
            continue
        owner = name.rsplit(".", 1)[0]
        mod = modules.get(owner)
        if isinstance(mod, nn.Linear):
            bias = state_dict.get(owner + ".bias")
            qmod = _on_device(w, device).to_module(None if bias is None else bias.to(device=device, dtype=dtype))
            _set_submodule(model, owner, qmod.to(device))
            packed |= {name, owner + ".bias"}
        elif isinstance(mod, nn.Embedding) and hasattr(w, "to_embedding"):
            _set_submodule(model, owner, _on_device(w, device).to_embedding())
            packed.add(name)
            if tie:
                _set_submodule(model, "lm_head", _packed_head(w, None).to(device))
        else:  # norms, A, D, conv: small, and the scan wants them as plain floats
            plain[name] = w.dequantize(torch.float32)
    for name, w in state_dict.items():
        if name not in packed and name not in plain:
            plain[name] = w
    # the SSM's own parameters stay fp32 (A_log, D, dt_bias): exp() of bf16 A would drift
    plain = {k: v.to(device=device, dtype=torch.float32 if k.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")
                     else dtype) for k, v in plain.items()}
    head_packed = not isinstance(model.lm_head, nn.Linear)
    missing = sorted(k for k in expected - set(plain) - packed if not (k == "lm_head.weight" and (tie or head_packed)))
    unexpected = sorted(set(plain) - expected)
    if missing or unexpected:
        raise UserError("bad_model", f"The weights do not fit a {model.config.model_type} model of this config: "
                        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                        f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. The file may be damaged or "
                        "converted wrongly; download it again.")
    try:
        model.load_state_dict(plain, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches
        raise UserError("bad_model", f"The weights do not fit this {model.config.model_type} config: "
                        f"{str(exc).splitlines()[-1].strip()}. Download the model again.") from None
    if isinstance(model.lm_head, nn.Linear) and "lm_head.weight" not in plain:
        model.lm_head.weight = modules[embed].weight
    return model.eval()


def build_mamba(config: dict | MambaConfig, state_dict: dict, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> MambaLM:
    c = config if isinstance(config, MambaConfig) else MambaConfig.from_hf(config)
    with torch.device("meta"):
        model = MambaLM(c)
    tie = c.tie_word_embeddings or "lm_head.weight" not in state_dict
    return assign_weights(model, state_dict, dtype, device, "backbone.embeddings", tie)


def build_jamba(c: JambaConfig, state_dict: dict, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> JambaLM:
    from studio.models.moe import canonical_experts, prepare_packed_experts

    # moe.py reads every expert layout (per-expert keys, stacks, GGUF 3D) under `.mlp.`; Jamba says `.feed_forward.`
    sd = {k.replace(".feed_forward.", ".mlp."): v for k, v in state_dict.items()}
    try:
        sd = canonical_experts(sd)
    except ValueError as exc:
        raise UserError("bad_model", f"The expert weights of this Jamba model are incomplete ({exc}). "
                        "The file may be damaged or converted wrongly; download it again.") from None
    sd = {k.replace(".mlp.", ".feed_forward."): v for k, v in sd.items()}
    with torch.device("meta"):
        model = JambaLM(c)
    prepare_packed_experts(model, sd)
    tie = c.tie_word_embeddings or "lm_head.weight" not in sd
    return assign_weights(model, sd, dtype, device, "model.embed_tokens", tie)


# ---------------------------------------------------------------------------
# GGUF

_TOP = {"token_embd.weight": "backbone.embeddings.weight", "output_norm.weight": "backbone.norm_f.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm.weight": "norm.weight", "ssm_in.weight": "mixer.in_proj.weight",
          "ssm_in.bias": "mixer.in_proj.bias", "ssm_conv1d.weight": "mixer.conv1d.weight",
          "ssm_conv1d.bias": "mixer.conv1d.bias", "ssm_x.weight": "mixer.x_proj.weight",
          "ssm_dt.weight": "mixer.dt_proj.weight", "ssm_dt.bias": "mixer.dt_proj.bias", "ssm_a": "mixer.A_log",
          "ssm_d": "mixer.D", "ssm_norm.weight": "mixer.norm.weight", "ssm_out.weight": "mixer.out_proj.weight",
          "ssm_out.bias": "mixer.out_proj.bias"}
_BLOCK2 = {**_BLOCK, "ssm_dt.bias": "mixer.dt_bias"}  # Mamba-2 has no dt_proj, only its bias


_JAMBA_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.final_layernorm.weight",
              "output.weight": "lm_head.weight"}
_JAMBA_BLOCK = {**{k: v.replace("mixer.", "mamba.") for k, v in _BLOCK.items()},
                "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "pre_ff_layernorm.weight",
                "ssm_dt_norm.weight": "mamba.dt_layernorm.weight", "ssm_b_norm.weight": "mamba.b_layernorm.weight",
                "ssm_c_norm.weight": "mamba.c_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
                "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
                "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate_inp.weight": "feed_forward.router.weight",
                "ffn_gate.weight": "feed_forward.gate_proj.weight", "ffn_up.weight": "feed_forward.up_proj.weight",
                "ffn_down.weight": "feed_forward.down_proj.weight",
                "ffn_gate_exps.weight": "feed_forward.experts.gate_proj", "ffn_up_exps.weight": "feed_forward.experts.up_proj",
                "ffn_down_exps.weight": "feed_forward.experts.down_proj"}
# arch -> (top-level names, per-block names, the HF prefix of blocks)
_NAMES = {"mamba": (_TOP, _BLOCK, "backbone.layers"), "mamba2": (_TOP, _BLOCK2, "backbone.layers"),
          "jamba": (_JAMBA_TOP, _JAMBA_BLOCK, "model.layers")}


def hf_name(arch: str, name: str) -> str | None:
    top, block, prefix = _NAMES[arch]
    if name in top:
        return top[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
        return f"{prefix}.{parts[1]}.{block[parts[2]]}"
    return None


def gguf_mamba_config(g: GGUFFile) -> dict:
    """A config.json-style dict (HF MambaConfig / Mamba2Config names) from `{arch}.ssm.*` metadata."""
    meta = g.metadata
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        return v.tolist() if isinstance(v, np.ndarray) else v

    need = ("embedding_length", "block_count", "ssm.conv_kernel", "ssm.inner_size", "ssm.state_size",
            "ssm.time_step_rank")
    missing = [f"{arch}.{k}" for k in need if not isinstance(get(k), (int, np.integer))]
    if missing:
        raise _bad(g.path, f"it lacks {', '.join(missing)}")
    if get("ssm.dt_b_c_rms", False):
        raise UserError("unsupported", f"{g.path.name} is a Falcon-Mamba model (RMS norms on B, C and dt), which "
                        "Studio does not run yet. Pick a Mamba or Mamba-2 file.")
    hidden, inner = int(get("embedding_length")), int(get("ssm.inner_size"))
    if "token_embd.weight" not in g.tensors:
        raise _bad(g.path, "it has no token_embd.weight tensor")
    cfg: dict[str, Any] = {
        "model_type": arch, "architectures": ["MambaForCausalLM" if arch == "mamba" else "Mamba2ForCausalLM"],
        "hidden_size": hidden, "num_hidden_layers": int(get("block_count")), "intermediate_size": inner,
        "expand": max(1, inner // max(hidden, 1)), "conv_kernel": int(get("ssm.conv_kernel")),
        "state_size": int(get("ssm.state_size")), "layer_norm_epsilon": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(g.tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "use_bias": any(t.endswith(".ssm_in.bias") for t in g.tensors),
        "use_conv_bias": any(t.endswith(".ssm_conv1d.bias") for t in g.tensors),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "max_position_embeddings": NO_POSITION_LIMIT,
    }
    if arch == "jamba":
        return _jamba_config(g, cfg, get)
    if arch == "mamba":
        cfg["time_step_rank"] = int(get("ssm.time_step_rank"))
    else:  # llama.cpp stores Mamba-2's head count as the time-step rank
        heads = int(get("ssm.time_step_rank"))
        if heads <= 0 or inner % heads:
            raise _bad(g.path, f"its {heads} SSM heads do not divide the inner size {inner}")
        cfg.update(num_heads=heads, head_dim=inner // heads, n_groups=int(get("ssm.group_count", 1)))
    return cfg


def _jamba_config(g: GGUFFile, base: dict, get: Any) -> dict:
    """Jamba's header: which layers attend comes from the per-layer KV head counts (0 = a Mamba layer),
    which feed-forwards are MoE from the router tensors (the converter keeps no periods)."""
    n = base["num_hidden_layers"]
    kv = get("attention.head_count_kv")
    kv = kv if isinstance(kv, list) else [kv] * n
    if len(kv) != n or not any(kv):
        raise _bad(g.path, f"its jamba.attention.head_count_kv {kv!r} does not name the {n} layers' kinds")
    heads = int(get("attention.head_count"))
    return {**base, "architectures": ["JambaForCausalLM"], "num_attention_heads": heads,
            "num_key_value_heads": max(kv), "intermediate_size": int(get("feed_forward_length")),
            "rms_norm_eps": base["layer_norm_epsilon"], "mamba_d_state": base["state_size"],
            "mamba_d_conv": base["conv_kernel"], "mamba_expand": base["expand"],
            "mamba_dt_rank": int(get("ssm.time_step_rank")), "mamba_conv_bias": base["use_conv_bias"],
            "mamba_proj_bias": base["use_bias"], "num_experts": int(get("expert_count", 1) or 1),
            "num_experts_per_tok": int(get("expert_used_count", 1) or 1),
            "max_position_embeddings": int(get("context_length", 262144)),
            "layers_block_type": ["attention" if k else "mamba" for k in kv],
            "layers_num_experts": [int(get("expert_count", 1)) if f"blk.{i}.ffn_gate_inp.weight" in g.tensors else 1
                                   for i in range(n)]}


def _to_hf(arch: str, key: str, w: Tensor, cfg: dict) -> Tensor:
    """Undo the converter's changes to a float tensor."""
    if key.endswith("conv1d.weight"):
        return w.reshape(w.shape[0], 1, -1)  # (C, K) -> Conv1d's (C, 1, K)
    if key.endswith("A_log"):
        return torch.log(-w.float()).reshape(-1) if arch == "mamba2" else torch.log(-w.float())
    if arch == "mamba2" and (key.endswith(".D") or key.endswith("norm.weight") and ".mixer." in key):
        return w.reshape(-1)
    return w


_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_mamba_gguf(g: GGUFFile, keep_quantized: bool = True) -> LoadedLLM:
    """A parsed GGUF file of arch mamba / mamba2 / jamba -> LoadedLLM with HF key names."""
    try:
        config = gguf_mamba_config(g)
        kinds = chat_config(config)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise _bad(g.path, f"its metadata is inconsistent ({type(e).__name__}: {e})") from None
    arch = config["model_type"]
    n = config["num_hidden_layers"]
    mamba_layer = ("ssm_in.weight", "ssm_conv1d.weight", "ssm_a", "ssm_d", "ssm_out.weight", "attn_norm.weight")
    attention_layer = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_norm.weight")
    for i in range(n):
        kind = kinds.layer_types[i] if isinstance(kinds, JambaConfig) else "mamba"
        for t in attention_layer if kind == "attention" else mamba_layer:
            if f"blk.{i}.{t}" not in g.tensors:
                raise _bad(g.path, f"tensor blk.{i}.{t} is missing (block_count says {n} layers)")
    state: dict[str, Any] = {}
    unknown: list[str] = []
    for name, info in g.tensors.items():
        key = hf_name(arch, name)
        if key is None:
            unknown.append(name)
            continue
        if key.startswith("backbone.layers.") and int(key.split(".")[2]) >= n:
            raise _bad(g.path, f"tensor {name} is for a layer the header does not have ({n} layers)")
        raw = g.raw(name)
        if GGML_TYPES[info.type_id].name in _FLOAT_TYPES:
            w = _to_hf(arch, key, dequantize(raw, info.type_id, info.shape,
                                            dtype=_FLOAT_TYPES[GGML_TYPES[info.type_id].name]), config)
        elif keep_quantized and len(info.shape) == 2 and key.endswith(("_proj.weight", "embeddings.weight",
                                                                       "embed_tokens.weight", "lm_head.weight")):
            w = GGUFWeight(raw, info.type_id, (info.shape[0], info.shape[1]))
        elif keep_quantized and len(info.shape) == 3:  # stacked experts: one packed matrix per expert later
            w = GGUFWeight(raw, info.type_id, tuple(info.shape))
        else:
            w = _to_hf(arch, key, dequantize(raw, info.type_id, info.shape), config)
        state[key] = w
    if unknown:
        raise UserError("unsupported", f"{g.path.name} has tensors a plain {arch} model does not: "
                        f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}. It may be a variant "
                        "Studio does not run yet.")
    try:
        tok = tokenizer_from_gguf(g.metadata)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise UserError("bad_model", f"The tokenizer in {g.path.name} cannot be rebuilt: {e}. "
                        "Download the file again or pick another quantization of the model.") from None
    special = special_tokens_from_gguf(g.metadata)
    template = g.metadata.get("tokenizer.chat_template")
    return LoadedLLM(
        config=config, state_dict=state, tokenizer=tok, chat_template=template if isinstance(template, str) else None,
        bos_token=special["bos_token"], eos_token=special["eos_token"], stop_token_ids=special["stop_token_ids"],
        add_bos=special["add_bos"], source=str(g.path), generation_defaults=gguf_sampling(g.metadata),
        model_name=gguf_model_name(g.metadata),
    )
