"""LoRA for Stable Diffusion UNets and CLIP text encoders: kohya and diffusers/peft formats.

A LoRA pair (down (r, in), up (out, r), optional alpha) adds `weight * alpha / r * up @ down` to a
Linear or Conv2d weight. We patch weights in place and keep the originals, so switching LoRAs
between jobs restores the model exactly instead of subtracting (which drifts in fp16).

Key formats:
  kohya    lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha
           (diffusers module names for SD1/SD2, LDM names `input_blocks_4_1_...` for SDXL);
           lora_te_ (SD1/SD2), lora_te1_ / lora_te2_ (SDXL) for the text encoders
  peft     unet.<module>.lora_A.weight / lora_B.weight, text_encoder(_2).<module>.lora_A.weight
  diffusers (old) unet.<module>.processor.to_q_lora.down.weight / .up.weight
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from studio.errors import UserError


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def unet_aliases(unet: nn.Module) -> dict[str, str]:
    """flattened kohya name (diffusers or LDM naming) -> our module name, for every Linear/Conv2d."""
    from studio.models.unet_convert import module_pairs

    cfg = unet.config
    aliases = {}
    for name in _targets(unet):
        aliases[_flat(name)] = name
    levels = len(cfg.block_channels)
    attention = [d > 0 for d in cfg.transformer_depth]
    for ldm, ours in module_pairs(levels, cfg.layers_per_block, attention).items():
        for name in _targets(unet):
            if name == ours or name.startswith(ours + "."):
                rest = name[len(ours):]
                ldm_rest = rest
                from studio.models.unet_convert import _RESNET

                for a, b in _RESNET.items():  # resnet internals are named differently in LDM
                    if rest == "." + b:
                        ldm_rest = "." + a
                aliases[_flat(ldm + ldm_rest)] = name
    return aliases


def clip_aliases(enc: nn.Module) -> dict[str, str]:
    return {_flat(name): name for name in _targets(enc)}


_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)


def parse_lora(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """-> {module key without suffix: (down, up, alpha or None)}; raises UserError if nothing is a LoRA."""
    pairs = {}
    for key, down in sd.items():
        for d_suf, u_suf in _SUFFIXES:
            if key.endswith(d_suf):
                base = key[: -len(d_suf)]
                up = sd.get(base + u_suf)
                if up is None:
                    continue
                alpha = sd.get(base + ".alpha")
                pairs[base] = (down, up, float(alpha) if alpha is not None else None)
    if not pairs:
        raise UserError("bad_model", "This file holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B "
                        "pairs). Is it a checkpoint? Pick it as the model instead.")
    return pairs


def _route(base: str, family: str) -> tuple[str, str]:
    """LoRA module key -> (component, flattened module name). component: unet, te0, te1, or "" for none.

    kohya names SDXL's encoders lora_te1_ / lora_te2_; a plain lora_te_ is an SD1/SD2 text encoder, and
    SDXL's CLIP-L has the same shapes, so routing it there would silently apply a foreign LoRA.
    """
    base = base.replace(".processor.", ".")
    te_plain = "" if family.startswith("sdxl") else "te0"
    for prefix, comp in (("lora_unet_", "unet"), ("lora_te1_", "te0"), ("lora_te2_", "te1"), ("lora_te_", te_plain)):
        if base.startswith(prefix):
            return comp, base[len(prefix):]
    for prefix, comp in (("unet.", "unet"), ("text_encoder_2.", "te1"), ("text_encoder.", "te0"),
                         ("lora_unet.", "unet")):
        if base.startswith(prefix):
            return comp, _flat(base[len(prefix):])
    return "unet", _flat(base)


def _attention_processor_name(name: str) -> str:
    # old diffusers attn-processor LoRAs name `to_out` without the `.0` index
    return re.sub(r"_to_out$", "_to_out_0", name)


def apply_loras(model, loras: Iterable[tuple[str, float]]) -> list[str]:
    """Patch `model` (an SDModel) with (path, weight) LoRAs, after restoring any previous ones.

    Returns notes for the user (modules not found). Unreadable or empty files raise UserError.
    """
    from studio.models.sd_checkpoint import read_state_dict

    loras = tuple((str(p), float(w)) for p, w in loras)
    if loras == model.loras:
        return []
    restore_loras(model)
    if not loras:
        return []
    components: dict[str, nn.Module] = {"unet": model.unet}
    aliases = {"unet": unet_aliases(model.unet)}
    # SD1/SD2 have one encoder (te0); SDXL's CLIP-L is te0 and CLIP-G te1; the refiner's only one is G
    enc_names = ["te1"] if model.family == "sdxl_refiner" else ["te0", "te1"]
    for name, enc in zip(enc_names, model.encoders, strict=False):
        components[name] = enc
        aliases[name] = clip_aliases(enc)
    notes: list[str] = []
    for path, weight in loras:
        pairs = parse_lora(read_state_dict(Path(path)))
        missing = unet_total = unet_hit = 0
        for base, (down, up, alpha) in pairs.items():
            comp, flat = _route(base, model.family)
            unet_total += comp == "unet"
            target_name = aliases.get(comp, {}).get(flat) or aliases.get(comp, {}).get(_attention_processor_name(flat))
            module = dict(components[comp].named_modules())[target_name] if target_name else None
            if module is None or tuple(_delta_shape(down, up, module.weight.shape)) != tuple(module.weight.shape):
                missing += 1
                continue
            unet_hit += comp == "unet"
            key = f"{comp}:{target_name}"
            if key not in model.original:
                model.original[key] = module.weight.data
            rank = down.shape[0]
            scale = weight * ((alpha / rank) if alpha is not None else 1.0)
            delta = _delta(down, up, module.weight.shape)  # (out, in, ...) in fp32
            module.weight.data = (module.weight.data.float() + scale * delta.to(module.weight.device)).to(
                module.weight.dtype)
        if missing:
            notes.append(f"{Path(path).name}: {missing} of {len(pairs)} LoRA modules match nothing in this "
                         f"{model.family} model (a LoRA for another model family?)")
        if missing == len(pairs) or (unet_total and not unet_hit):
            restore_loras(model)
            raise UserError("bad_model", f"{Path(path).name} does not fit this {model.family} model: none of its "
                            "modules exist here. Pick a LoRA trained for this model family.")
    model.loras = loras
    return notes


def _delta_shape(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> tuple:
    """The shape the LoRA's product has, to compare with the target weight before touching it."""
    out, rank_in = up.shape[0], down.shape[1] if down.ndim >= 2 else -1
    if len(shape) == 4:
        kh, kw = (down.shape[2], down.shape[3]) if down.ndim == 4 else (1, 1)
        kh, kw = (kh, kw) if (kh, kw) != (1, 1) else (shape[2], shape[3])
        return (out, rank_in, kh, kw)
    return (out, rank_in)


def _delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    down, up = down.float(), up.float()
    if len(shape) == 4:
        if down.ndim == 4 and down.shape[2:] != (1, 1):  # LoCon 3x3: conv(down) then 1x1 conv(up)
            return torch.einsum("or,rihw->oihw", up.flatten(1), down)
        return (up.flatten(1) @ down.flatten(1)).reshape(shape)
    return up.flatten(1) @ down.flatten(1)


def restore_loras(model) -> None:
    """Put back the weights LoRAs replaced."""
    if not model.original:
        model.loras = ()
        return
    comps = {"unet": model.unet}
    enc_names = ["te1"] if model.family == "sdxl_refiner" else ["te0", "te1"]
    comps.update(dict(zip(enc_names, model.encoders, strict=False)))
    for key, original in model.original.items():
        comp, name = key.split(":", 1)
        module = dict(comps[comp].named_modules())[name]
        module.weight.data = original.to(module.weight.device)
    model.original.clear()
    model.loras = ()
