"""UNet key layouts: original LDM / single-file checkpoints <-> ours (the diffusers names).

The LDM UNet numbers its modules as flat sequences: `input_blocks.N.M` with N counting resnets
and downsamplers over all levels, `output_blocks.N.M` likewise, `middle_block.0..2`. Ours nests
them by level (`down_blocks.i.resnets.j`). `module_pairs()` builds the table of module-prefix
pairs from the layout (levels, layers per level, which levels have attention); renaming either
way is a prefix lookup in that table.
"""

from __future__ import annotations

import re

import torch

# Where single-file checkpoints keep their UNet: A1111/LDM and ComfyUI full checkpoints, ComfyUI
# UNet-only saves, bare UNet files. Found by looking for the first conv, not by guessing.
_LDM_MARKER = "input_blocks.0.0.weight"
_OURS_MARKER = "conv_in.weight"

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def module_pairs(levels: int, layers_per_block: int, attention: list[bool]) -> dict[str, str]:
    """LDM module prefix -> our module prefix, for a UNet of that layout."""
    pairs = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
        "middle_block.1": "mid_block.attentions.0",
    }

    def resnet(ldm: str, ours: str) -> None:
        for a, b in _RESNET.items():
            pairs[f"{ldm}.{a}"] = f"{ours}.{b}"

    resnet("middle_block.0", "mid_block.resnets.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    n = 1
    for i in range(levels):
        for j in range(layers_per_block):
            resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}")
            if attention[i]:
                pairs[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
            n += 1
        if i < levels - 1:
            pairs[f"input_blocks.{n}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            n += 1
    n = 0
    for i in range(levels):
        level = levels - 1 - i
        for j in range(layers_per_block + 1):
            resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}")
            if attention[level]:
                pairs[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
            if j == layers_per_block and i < levels - 1:
                up = 2 if attention[level] else 1
                pairs[f"output_blocks.{n}.{up}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            n += 1
    return pairs


def _rename(sd: dict[str, torch.Tensor], pairs: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
            prefix = ".".join(parts[:cut])
            if prefix in pairs:
                out[pairs[prefix] + "." + ".".join(parts[cut:])] = value
                break
        else:
            out[key] = value  # left as is: loading then reports it as unexpected
    return out


def _prefix_of(sd: dict[str, torch.Tensor], marker: str) -> str | None:
    for k in sd:
        if k.endswith(marker) and (k == marker or k[-len(marker) - 1] == "."):
            return k[: -len(marker)]
    return None


def ldm_layout(keys: list[str]) -> tuple[int, int, list[bool]]:
    """(levels, layers per level, attention per level) read from LDM-named, unprefixed keys."""
    downs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}
    outs = {int(m.group(1)) for k in keys if (m := re.match(r"output_blocks\.(\d+)\.", k))}
    if not outs:
        raise ValueError("LDM UNet state dict without output_blocks")
    levels = len(downs) + 1
    per = (max(outs) + 1) // levels  # output levels hold layers_per_block + 1 resnets
    layers = per - 1
    attention = []
    for i in range(levels):
        first = 1 + i * per
        attention.append(any(k.startswith(f"input_blocks.{first}.1.") for k in keys))
    return levels, layers, attention


def to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the UNet part of `sd` under our names, from any supported layout.

    Accepts LDM (`model.diffusion_model.input_blocks...`), ComfyUI (same names, or with
    `diffusion_model.` or no prefix) and diffusers (`conv_in.weight`, maybe under `unet.`).
    Keys outside the UNet (VAE, text encoders) are dropped.
    """
    prefix = _prefix_of(sd, _LDM_MARKER)
    if prefix is not None:
        unet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        pairs = module_pairs(*ldm_layout(list(unet)))
        return _rename(unet, pairs)
    prefix = _prefix_of(sd, _OURS_MARKER)
    if prefix is None:
        return dict(sd)  # nothing recognisable: the caller reports what is missing
    if prefix == "":
        return sd
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def to_ldm(sd: dict[str, torch.Tensor], levels: int, layers_per_block: int, attention: list[bool],
           prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Our names -> LDM names (for writing single-file checkpoints), under `prefix`."""
    inverse = {b: a for a, b in module_pairs(levels, layers_per_block, attention).items()}
    return {prefix + k: v for k, v in _rename(sd, inverse).items()}
