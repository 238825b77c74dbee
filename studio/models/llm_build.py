"""Building an LLM from what a loader read: the LoadedLLM hand-over, q/k/v fusion, packed weights.

Split from llm.py (the model itself) so each file does one thing. Builds on the meta device and
loads with `load_state_dict(assign=True)`; quantized Linear weights become their packed modules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from studio.errors import UserError
from studio.models.jamba import JambaConfig
from studio.models.llm import LLM, LLMConfig
from studio.models.mamba import MODEL_TYPES as MAMBA_TYPES
from studio.models.mamba import MambaConfig
from studio.models.moe import canonical_experts, expert_layer, offload_experts, prepare_packed_experts

# model_type -> config class of the chat families outside llm.py (each has .from_hf and .build)
RECURRENT_CONFIGS: dict[str, type] = {**{mt: MambaConfig for mt in MAMBA_TYPES}, "jamba": JambaConfig}

# ---------------------------------------------------------------------------
# What a loader hands over (HF folder or GGUF), and building the module from it.

@dataclass
class LoadedLLM:
    """A model read from disk, not yet built: config, weights, tokenizer and chat metadata."""

    config: dict  # Hugging Face style config.json dict
    state_dict: dict  # Hugging Face key names -> Tensor or QuantWeight
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    stop_token_ids: list = field(default_factory=list)
    add_bos: bool = False
    generation_defaults: dict = field(default_factory=dict)  # temperature, top_p, ... from the model
    model_name: str = ""  # what the file calls the model (GGUF general.basename, HF _name_or_path), for its defaults
    source: str = ""  # the path it came from


def is_quant(w: Any) -> bool:
    """A packed weight (studio.nn.packed.QuantWeight or alike), not a plain Tensor."""
    return not isinstance(w, Tensor) and hasattr(w, "dequantize") and hasattr(w, "to_module")


def _concat_rows(ws: list) -> Any:
    """Stack Linear weights along out_features, exactly, or None where no exact form exists."""
    if all(isinstance(w, Tensor) for w in ws):
        return torch.cat(ws, dim=0)
    from studio.nn.packed_gguf import GGUFWeight
    from studio.nn.packed_int import Int4Weight, Int8Weight, quantize_int8

    if all(isinstance(w, Int4Weight) for w in ws) and len({w.group_size for w in ws}) == 1:
        return Int4Weight(*(torch.cat([getattr(w, a) for w in ws]) for a in ("packed", "scale", "zero")),
                          ws[0].group_size)
    if all(isinstance(w, Int8Weight) for w in ws):
        return Int8Weight(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]))
    if not all(isinstance(w, GGUFWeight) for w in ws):
        return None

    k = ws[0].shape[1]
    if len({w.type_id for w in ws}) == 1:  # GGUF rows are independent blocks: concatenation is exact
        return GGUFWeight(torch.cat([w.raw for w in ws], dim=0), ws[0].type_id, (sum(w.shape[0] for w in ws), k))
    if any(w.type_name in ("Q4_0", "Q4_1") for w in ws):
        return None  # those stay exact int4; mixing them with others would requantize them
    # The others become per-channel int8 one way or the other; per-row scales make it identical.
    return quantize_int8(torch.cat([w.dequantize() for w in ws], dim=0))


def fuse_projections(c: LLMConfig, state_dict: dict) -> tuple[LLMConfig, dict]:
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj: two matmuls per layer instead of five.

    On CPU decode most of the time per token is spent per matmul call, so fewer, larger
    calls are faster. Returns the inputs unchanged if some layer cannot be fused exactly.
    """
    if c.fused_qkv and c.fused_gate_up:
        return c, state_dict
    out = dict(state_dict)
    for i in range(c.n_layers):
        groups = []
        if not c.fused_qkv:
            groups.append((f"model.layers.{i}.self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj"))
        if not c.fused_gate_up:
            groups.append((f"model.layers.{i}.mlp.", ("gate_proj", "up_proj"), "gate_up_proj"))
            groups.append((f"model.layers.{i}.mlp.shared_experts.", ("gate_proj", "up_proj"), "gate_up_proj"))
        for base, parts, fused in groups:
            if not all(f"{base}{p}.weight" in out for p in parts[1:]):
                continue  # an MoE layer's mlp, MLA's attention (a q_proj, no k/v): nothing to fuse
            w = _concat_rows([out[f"{base}{p}.weight"] for p in parts])
            biases = [out.get(f"{base}{p}.bias") for p in parts]
            if w is None or (any(b is None for b in biases) and any(b is not None for b in biases)):
                return c, state_dict
            for p in parts:
                out.pop(f"{base}{p}.weight")
                out.pop(f"{base}{p}.bias", None)
            out[f"{base}{fused}.weight"] = w
            if biases[0] is not None:
                out[f"{base}{fused}.bias"] = torch.cat(biases)
    return replace(c, fused_qkv=True, fused_gate_up=True), out


def chat_config(config: dict | Any) -> Any:
    """The config object of a chat model: LLMConfig for llm.py's transformers, or the config class of a
    family with its own model file (by model_type, from RECURRENT_CONFIGS). Config objects pass through."""
    if not isinstance(config, dict):
        return config
    cls = RECURRENT_CONFIGS.get(config.get("model_type", ""))
    return cls.from_hf(config) if cls is not None else LLMConfig.from_hf(config)


def build_llm(loaded_config: dict | LLMConfig, state_dict: dict, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", fuse: bool = False, experts_in_ram: list[bool] | None = None) -> LLM:
    """Build on the meta device, then assign the weights. Quantized Linear weights stay packed.

    fuse=True stacks q/k/v and gate/up into one Linear each (see fuse_projections). `experts_in_ram`
    (one flag per layer, moe.plan_placement) keeps those layers' routed experts in CPU RAM, computed
    there: they never touch the device.
    """
    ram_layers = {i for i, f in enumerate(experts_in_ram or []) if f}

    def where(name: str) -> torch.device | str:
        return "cpu" if ram_layers and expert_layer(name) in ram_layers else device

    c = chat_config(loaded_config)
    if not isinstance(c, LLMConfig):  # a family with its own model file builds itself
        return c.build(state_dict, dtype, device)
    if c.n_experts:
        try:
            state_dict = canonical_experts(state_dict)
        except ValueError as exc:
            raise UserError("bad_model", f"The expert weights of this {c.model_type} model are incomplete ({exc}). "
                            "The file may be damaged or converted wrongly; download it again.") from None
    if c.kv_lora_rank:
        from studio.models.deepseek import canonical_mla

        state_dict = canonical_mla(state_dict)
    if fuse:
        c, state_dict = fuse_projections(c, state_dict)
    with torch.device("meta"):
        model = LLM(c)
    prepare_packed_experts(model, state_dict)
    expected = set(model.state_dict())  # before packed modules replace any Linear
    modules = dict(model.named_modules())
    plain: dict[str, Tensor] = {}
    skip_bias: set[str] = set()
    tie = c.tie_word_embeddings or "lm_head.weight" not in state_dict
    for name, w in state_dict.items():
        if not is_quant(w):
            continue
        owner = name.rsplit(".", 1)[0]
        mod = modules.get(owner)
        if isinstance(mod, nn.Linear):
            bias = state_dict.get(owner + ".bias")
            # moved first, so the device-specific packing is made where it runs, one matrix at a time
            dev = where(name)
            qmod = _linear_module(_on_device(w, dev), None if bias is None else bias.to(device=dev, dtype=dtype))
            _set_submodule(model, owner, qmod.to(dev))
            skip_bias.add(owner + ".bias")
        elif isinstance(mod, nn.Embedding):
            table = None
            if hasattr(w, "to_embedding"):
                # keep the table packed where the model runs; only looked-up rows are unpacked
                # (an 8B model's 128256 x 4096 table: 0.27 GiB as int4 instead of 1 GiB as bf16)
                _set_submodule(model, owner, _on_device(w, device).to_embedding())
            else:
                table = w.dequantize(torch.float32)
                plain[name] = table
            if tie:  # a tied head reads the packed data: 4x fewer bytes per token than fp32
                _set_submodule(model, "lm_head", _packed_head(w, table, device).to(device))
        else:  # a packed weight of a module that is not a Linear (an MoE router): unpacked
            plain[name] = w.dequantize(torch.float32)
    for name, w in state_dict.items():
        if is_quant(w) or name in skip_bias or name.endswith("rotary_emb.inv_freq"):
            continue
        plain[name] = w
    plain = {k: v.to(device=where(k), dtype=dtype) for k, v in plain.items()}
    head_packed = not isinstance(model.lm_head, nn.Linear)
    quant_keys = {k for k, w in state_dict.items() if is_quant(w)} | skip_bias
    missing = sorted(k for k in expected - set(plain) - quant_keys
                     if not (k == "lm_head.weight" and (tie or head_packed)))
    unexpected = sorted(set(plain) - expected - quant_keys)
    if missing or unexpected:
        raise UserError("bad_model", f"The weights do not fit a {c.model_type} model of this config: "
                        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
                        "The file may be damaged or converted wrongly; download it again.")
    model.load_state_dict(plain, strict=False, assign=True)
    if isinstance(model.lm_head, nn.Linear) and "lm_head.weight" not in plain:
        model.lm_head.weight = model.model.embed_tokens.weight
    for i in sorted(ram_layers):
        offload_experts(model.model.layers[i].mlp.experts)  # already on the CPU: no copy through the device
    model.eval()
    return model


def _on_device(w: Any, device: torch.device | str) -> Any:
    """The same packed weight with its tensors on `device` (a shallow copy when it moves)."""
    device = torch.device(device)
    if w.device == device or (device.index is None and w.device.type == device.type):
        return w
    moved = copy.copy(w)
    for name, value in vars(w).items():
        if isinstance(value, Tensor):
            setattr(moved, name, value.to(device))
    return moved


LLM_QUANT_MODES = ("int8", "int4")


def quantize_state(config: dict | LLMConfig, state_dict: dict, mode: str, device: torch.device | str,
                   rows_per_chunk: int = 8192) -> tuple[LLMConfig, dict, int]:
    """Weight-only int8 (per channel) / int4 (group 64) for every full-precision matrix of an HF-layout
    state dict: the Linear weights and the embedding table. -> (config, new state dict, bytes saved).

    Each matrix is quantized on `device` a block of rows at a time and the packed result kept in RAM;
    q/k/v and gate/up are fused there (as build_llm(fuse=True) would). build_llm then moves one matrix
    at a time, so the GPU never holds the full-precision model or a second packed copy: an 8B model
    fits a 6 GiB budget. Packed
    weights (GGUF) and matrices whose width the format cannot take stay as they are.
    """
    if mode not in LLM_QUANT_MODES:
        raise UserError("bad_input", f"quantization {mode!r} is not one of {', '.join(LLM_QUANT_MODES)} (or none).")
    from studio.nn.packed_int import quantize_linear

    c = chat_config(config)
    multiple = 64 if mode == "int4" else 16

    def packable(name: str, w: Any) -> bool:
        return (isinstance(w, Tensor) and w.ndim == 2 and name.endswith(".weight") and w.is_floating_point()
                and w.shape[1] % multiple == 0 and not name.endswith(".mlp.gate.weight"))  # MoE routers stay exact

    def pack(w: Tensor) -> Any:
        # quantized on `device` (fast), kept in RAM: build_llm moves each matrix when it makes its module
        parts = [_on_device(quantize_linear(w[i:i + rows_per_chunk].to(device, torch.float32), mode), "cpu")
                 for i in range(0, w.shape[0], rows_per_chunk)]
        return parts[0] if len(parts) == 1 else _concat_rows(parts)

    groups = []  # (prefix, parts, fused name) of the layers to fuse while packing
    for i in range(c.n_layers if isinstance(c, LLMConfig) else 0):
        if not c.fused_qkv:
            groups.append((f"model.layers.{i}.self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj"))
        if not c.fused_gate_up:
            groups.append((f"model.layers.{i}.mlp.", ("gate_proj", "up_proj"), "gate_up_proj"))
            groups.append((f"model.layers.{i}.mlp.shared_experts.", ("gate_proj", "up_proj"), "gate_up_proj"))
    # MoE layers have no mlp.gate_proj, MLA layers no k_proj: only groups the model has
    groups = [g for g in groups if all(f"{g[0]}{p}.weight" in state_dict for p in g[1][1:])]
    names = [[f"{base}{p}.weight" for p in parts] for base, parts, _ in groups]
    fuse = bool(groups) and all(all(packable(n, state_dict.get(n)) for n in g) for g in names) and all(
        len({(base + p + ".bias") in state_dict for p in parts}) == 1 for base, parts, _ in groups)
    out: dict = {}
    saved = 0
    grouped = {n for g in names for n in g} | {n[:-len("weight")] + "bias" for g in names for n in g} if fuse else set()
    for name, w in state_dict.items():
        if name in grouped:
            continue
        if packable(name, w):
            out[name] = pack(w)
            saved += w.numel() * w.element_size() - out[name].nbytes
        else:
            out[name] = w
    if fuse:
        for base, parts, fused in groups:
            ws = [state_dict[f"{base}{p}.weight"] for p in parts]
            packed = [pack(w) for w in ws]
            out[f"{base}{fused}.weight"] = _concat_rows(packed)
            saved += sum(w.numel() * w.element_size() - q.nbytes for w, q in zip(ws, packed, strict=True))
            del packed  # the parts go as soon as the fused copy exists
            if f"{base}{parts[0]}.bias" in state_dict:
                out[f"{base}{fused}.bias"] = torch.cat([state_dict[f"{base}{p}.bias"] for p in parts])
        c = replace(c, fused_qkv=True, fused_gate_up=True)
    return c, out, saved


def _linear_module(w: Any, bias: Tensor | None) -> nn.Module:
    """The layer for a packed weight: on the CPU, GGUF blocks go to the CPU kernel (to_cpu_module) where
    it is built; elsewhere, or without it, to_module()."""
    fast = w.to_cpu_module(bias) if w.device.type == "cpu" and hasattr(w, "to_cpu_module") else None
    return fast if fast is not None else w.to_module(bias)


def _packed_head(w: Any, table: Tensor | None, device: torch.device | str = "cpu") -> nn.Module:
    """The tied output head from a quantized embedding. On the CPU GGUF blocks stay blocks (the CPU
    kernel); elsewhere types without an exact int4 form become per-channel int8 (as
    GGUFWeight.to_module does), reusing a dequantized table."""
    if torch.device(device).type == "cpu" and hasattr(w, "to_cpu_module"):
        fast = w.to_cpu_module(None)
        if fast is not None:
            return fast
    if getattr(w, "type_name", None) in (None, "Q4_0", "Q4_1"):
        return w.to_module(None)
    from studio.nn.packed_int import quantize_int8

    return quantize_int8(w.dequantize(torch.float32) if table is None else table).to_module(None)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights occupy (parameters and persistent buffers, packed or not)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "cache" not in n]:
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    # packed embeddings hold their data outside parameters and buffers
    return total + sum(m.weight_q.nbytes for m in model.modules() if hasattr(m, "weight_q"))
