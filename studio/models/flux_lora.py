"""LoRA for Flux: kohya / ComfyUI (BFL names), ai-toolkit and diffusers/peft (diffusers names) files.

Our transformer keeps BFL's fused projections, so a LoRA on diffusers' separate modules patches a row
range of the fused weight: `to_q` / `to_k` / `to_v` the thirds of `img_attn.qkv`, a single block's
`proj_mlp` the rows after q, k and v in `linear1`; `norm_out.linear` lands on the final modulation with
its (scale, shift) halves swapped back. Text-encoder LoRAs (`lora_te1_`, `text_encoder.`) patch CLIP-L.
Weights are patched in place with the originals kept, so a new LoRA set starts from the exact model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from studio.errors import UserError
from studio.models.lora import _delta, _flat, clip_aliases, parse_lora
from studio.nn.packed import PackedLinear

# a target: (our module name, first row, row count or None for all, swap halves)
Target = tuple[str, int, int | None, bool]

_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_PREFIXES = ("lora_unet_", "lora_transformer_", "transformer.", "diffusion_model.", "model.diffusion_model.",
             "base_model.model.", "unet.")
_TE_PREFIXES = ("lora_te1_", "lora_te_", "text_encoder.", "lora_clip_l_")


def targets(net: nn.Module) -> dict[str, Target]:
    """flattened LoRA module name (BFL or diffusers naming) -> where its delta goes in our transformer."""
    cfg = net.cfg
    h = cfg.hidden
    out: dict[str, Target] = {}
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, PackedLinear)):
            out[_flat(name)] = (name, 0, None, False)
    for old, new in _TOP.items():
        out[_flat(old)] = (new, 0, None, False)
    out["norm_out_linear"] = ("final_layer.adaLN_modulation.1", 0, None, True)
    for i in range(cfg.double_layers):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for old, new in _DOUBLE.items():
            out[_flat(p + old)] = (q + new, 0, None, False)
        for j, c in enumerate("qkv"):
            out[_flat(f"{p}attn.to_{c}")] = (q + "img_attn.qkv", j * h, h, False)
            out[_flat(f"{p}attn.add_{c}_proj")] = (q + "txt_attn.qkv", j * h, h, False)
    for i in range(cfg.single_layers):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for j, c in enumerate("qkv"):
            out[_flat(f"{p}attn.to_{c}")] = (q + "linear1", j * h, h, False)
        out[_flat(p + "proj_mlp")] = (q + "linear1", 3 * h, cfg.mlp_hidden, False)
        out[_flat(p + "proj_out")] = (q + "linear2", 0, None, False)
        out[_flat(p + "norm.linear")] = (q + "modulation.lin", 0, None, False)
    return out


def _route(base: str) -> tuple[str, str]:
    """LoRA key without its suffix -> ("transformer" | "clip", flattened module name)."""
    for prefix in _TE_PREFIXES:
        if base.startswith(prefix):
            return "clip", _flat(base[len(prefix):])
    for prefix in _PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix):]
            break
    return "transformer", _flat(base)


def packed_kind(net: nn.Module) -> str:
    """The kind of packed weights `net` holds ("fp8", "GGUF", ...), or "" when all are plain."""
    for m in net.modules():
        if isinstance(m, PackedLinear):
            return "fp8" if "Fp8" in type(m).__name__ else "GGUF" if "GGUF" in type(m).__name__ else "quantized"
    return ""


def apply_flux_loras(model, loras: Iterable[tuple[str, float]], read) -> list[str]:
    """Patch `model` (a pipeline FluxModel with .transformer, .clip, .loras, .original) with (path, weight)
    LoRAs after restoring any earlier ones. `read(path)` gives a file's tensors. -> notes for the user."""
    loras = tuple((str(p), float(w)) for p, w in loras)
    if loras == model.loras:
        return []
    restore_flux_loras(model)
    if not loras:
        return []
    if kind := packed_kind(model.transformer):
        raise UserError("unsupported", f"LoRAs cannot be applied to this Flux file yet: its transformer keeps {kind} "
                        "weights. Use the bf16 / fp16 version of the model with LoRAs, or drop the LoRAs.")
    where = {"transformer": targets(model.transformer), "clip": {k: (v, 0, None, False)
                                                                 for k, v in clip_aliases(model.clip).items()}}
    modules = {"transformer": dict(model.transformer.named_modules()), "clip": dict(model.clip.named_modules())}
    notes: list[str] = []
    for path, weight in loras:
        pairs = parse_lora(read(Path(path)))
        missed = 0
        for base, (down, up, alpha) in pairs.items():
            comp, flat = _route(base)
            target = where[comp].get(flat)
            module = modules[comp].get(target[0]) if target else None
            if module is None or not _fits(module, target, down, up):
                missed += 1
                continue
            name, start, rows, swap = target
            key = f"{comp}:{name}"
            if key not in model.original:
                model.original[key] = module.weight.data
            delta = _delta(down, up, module.weight.shape[:1] if rows is None else (rows, down.shape[1]))
            scale = weight * ((alpha / down.shape[0]) if alpha is not None else 1.0)
            if swap:
                a, b = delta.chunk(2)
                delta = torch.cat([b, a])
            new = module.weight.data.float().clone()
            new[start:start + (rows or new.shape[0])] += scale * delta.to(new.device)
            module.weight.data = new.to(module.weight.dtype)
        if missed == len(pairs):
            restore_flux_loras(model)
            raise UserError("bad_model", f"{Path(path).name} does not fit this Flux model: none of its modules exist "
                            "here. Pick a LoRA trained for Flux.1.")
        if missed:
            notes.append(f"{Path(path).name}: {missed} of {len(pairs)} LoRA modules match nothing in this Flux model")
    model.loras = loras
    model.encoded.clear()  # a text-encoder LoRA changes what prompts encode to
    return notes


def _fits(module: nn.Module, target: Target, down: torch.Tensor, up: torch.Tensor) -> bool:
    _, start, rows, _ = target
    out, cin = module.weight.shape[:2]
    want_rows = out if rows is None else rows
    return (down.ndim == 2 and up.ndim == 2 and down.shape[1] == cin and up.shape[0] == want_rows
            and start + want_rows <= out)


def restore_flux_loras(model) -> None:
    """Put back the weights LoRAs replaced."""
    modules = {"transformer": dict(model.transformer.named_modules()), "clip": dict(model.clip.named_modules())}
    for key, original in model.original.items():
        comp, name = key.split(":", 1)
        module = modules[comp][name]
        module.weight.data = original.to(module.weight.device)
    if model.original:
        model.encoded.clear()
    model.original.clear()
    model.loras = ()

