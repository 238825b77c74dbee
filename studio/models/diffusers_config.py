"""What a diffusers / transformers component's config.json says that its tensor shapes cannot (torch-free).

Our loaders read sizes (widths, depths, channels) from the weights. A folder's config.json also
fixes things no shape shows: GroupNorm group counts, the attention head count, norm epsilons,
activations, the VAE's latent scaling, the scheduler's prediction type. Each reader below takes
one component's config and returns the settings our config dataclasses take; a value our model
code cannot run raises a UserError naming the file, the key, its value and what is supported.

Every key a reader looks at is listed in its `*_KEYS` tuple (the applied ones and the ones that
must hold their usual value). Keys not listed do not change what we compute and are ignored:
sizes the shapes give (block_out_channels, layers_per_block, cross_attention_dim, ...),
training-only settings (dropout, initializer ranges), and sampler choices the job makes
(timestep_spacing, use_karras_sigmas, solver settings). A listed key that is absent changes nothing
either: what the shapes and the family imply stands (diffusers and transformers write every key,
so only hand-written configs lack some).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from studio.errors import UserError

Config = dict[str, Any]


def read_config(folder: str | Path, name: str = "config.json") -> Config | None:
    """A component folder's config (`unet/config.json`, `scheduler/scheduler_config.json`);
    None for a file or a folder without one (the shapes then decide alone)."""
    path = Path(folder) / name
    if not Path(folder).is_dir() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError("bad_model", f"{_where(path)} cannot be read ({exc}): the download is damaged. "
                        "Download that file again.") from None
    if not isinstance(data, dict):
        raise UserError("bad_model", f"{_where(path)} is not a JSON object: the download is damaged. "
                        "Download that file again.")
    data["_where"] = _where(path)
    return data


def _where(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


class _Reader:
    """One config's values, with the usual value of each key when it is absent (diffusers' defaults)."""

    def __init__(self, config: Config, default_where: str) -> None:
        self.config = config
        self.where = config.get("_where", default_where)

    def get(self, key: str, default: Any) -> Any:
        value = self.config.get(key, default)
        return default if value is None and default is not None else value

    def refuse(self, key: str, value: Any, supported: str, why: str = "") -> UserError:
        return UserError("unsupported", f"{self.where}: {key}={value!r} is not supported by Studio "
                         f"(supported: {supported}).{' ' + why if why else ''}")

    def expect(self, key: str, allowed: tuple, why: str = "") -> Any:
        """The value (or each entry of a per-block list) must be one of `allowed`; the first is the
        default when the key is absent."""
        value = self.config.get(key, allowed[0])
        entries = value if isinstance(value, list) and not any(isinstance(a, list) for a in allowed) else [value]
        if all(any(_same(v, a) for a in allowed) for v in entries):
            return value
        raise self.refuse(key, value, " or ".join(repr(a) for a in allowed), why)

    def has(self, key: str) -> bool:
        return self.config.get(key) is not None

    def positive_int(self, key: str, default: int) -> int:
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.refuse(key, value, "a positive integer", "The config file is damaged: download it again.")
        return value

    def positive_float(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
            raise self.refuse(key, value, "a positive number", "The config file is damaged: download it again.")
        return float(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _class(r: _Reader, allowed: tuple[str, ...], what: str) -> None:
    name = r.config.get("_class_name")
    if name is not None and name not in allowed:
        raise UserError("unsupported", f"{r.where}: _class_name={name!r} is not supported by Studio here "
                        f"(supported: {', '.join(allowed)}): this folder's {what} is of another kind.")


# ------------------------------------------------------------------------------------------------ UNet

UNET_KEYS = (
    # applied
    "norm_num_groups", "attention_head_dim", "num_attention_heads",
    # must hold the value our UNet computes with
    "_class_name", "act_fn", "norm_eps", "flip_sin_to_cos", "freq_shift", "time_embedding_type",
    "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim", "class_embed_type", "num_class_embeds",
    "class_embeddings_concat", "addition_embed_type", "addition_time_embed_dim", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_type", "resnet_time_scale_shift", "resnet_skip_time_act",
    "resnet_out_scale_factor", "conv_in_kernel", "conv_out_kernel", "dual_cross_attention",
    "only_cross_attention", "cross_attention_norm", "mid_block_type", "mid_block_only_cross_attention",
    "down_block_types", "up_block_types", "downsample_padding", "mid_block_scale_factor",
    "reverse_transformer_layers_per_block", "center_input_sample",
    # accepted without effect: fp16 attention upcasting (our attention kernels accumulate in fp32)
    "upcast_attention",
)


def unet_settings(config: Config) -> dict[str, Any]:
    """UNet2DConditionModel config -> UNetConfig overrides (norm_groups, num_heads or head_dim)."""
    r = _Reader(config, "unet/config.json")
    _class(r, ("UNet2DConditionModel",), "UNet")
    r.expect("act_fn", ("silu",))
    r.expect("norm_eps", (1e-5,))
    r.expect("flip_sin_to_cos", (True,))
    r.expect("freq_shift", (0,))
    r.expect("time_embedding_type", ("positional",))
    for key in ("time_embedding_act_fn", "timestep_post_act", "class_embed_type", "num_class_embeds",
                "encoder_hid_dim", "encoder_hid_dim_type", "cross_attention_norm",
                "reverse_transformer_layers_per_block"):
        r.expect(key, (None,))
    r.expect("time_cond_proj_dim", (None,), "This UNet embeds the guidance scale (an LCM-distilled UNet): use "
             "the base model with an LCM LoRA instead.")
    r.expect("class_embeddings_concat", (False,))
    addition = r.expect("addition_embed_type", (None, "text_time"), "Studio runs SD1/SD2 (none) and SDXL (text_time).")
    if addition == "text_time":
        r.expect("addition_time_embed_dim", (256,))
    r.expect("attention_type", ("default",))
    r.expect("resnet_time_scale_shift", ("default",))
    r.expect("resnet_skip_time_act", (False,))
    r.expect("resnet_out_scale_factor", (1.0,))
    r.expect("conv_in_kernel", (3,))
    r.expect("conv_out_kernel", (3,))
    r.expect("dual_cross_attention", (False,))
    r.expect("only_cross_attention", (False,))
    r.expect("mid_block_type", ("UNetMidBlock2DCrossAttn",))
    r.expect("mid_block_only_cross_attention", (None, False))
    down = r.expect("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D"))
    r.expect("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"))
    r.expect("downsample_padding", (1,))
    r.expect("mid_block_scale_factor", (1,))
    r.expect("center_input_sample", (False,))

    channels = r.get("block_out_channels", [320, 640, 1280, 1280])
    if not isinstance(down, list):
        down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    out: dict[str, Any] = {}
    if r.has("norm_num_groups"):
        out["norm_groups"] = _groups(r, channels)
    if r.has("num_attention_heads") or r.has("attention_head_dim"):
        out.update(_unet_heads(r, channels, down))
    return out


def _groups(r: _Reader, channels: list[int]) -> int:
    groups = r.positive_int("norm_num_groups", 32)
    if any(c % groups for c in channels):
        raise r.refuse("norm_num_groups", groups, f"a divisor of every block width {tuple(channels)}",
                       "The config does not fit the weights: download the folder again.")
    return groups


def _unet_heads(r: _Reader, channels: list[int], down: list[str]) -> dict[str, Any]:
    """diffusers' `attention_head_dim` is the head count per level (a historic misnomer); our UNet
    takes either one head count for every level (SD1) or one head width (SD2, SDXL: 64)."""
    key = "num_attention_heads" if r.has("num_attention_heads") else "attention_head_dim"
    value = r.get(key, 8)
    heads = list(value) if isinstance(value, list) else [value] * len(channels)
    if len(heads) != len(channels) or not all(isinstance(h, int) and h > 0 for h in heads):
        raise r.refuse(key, value, f"a positive head count or one per level ({len(channels)} levels)")
    # levels with attention, and the mid block (which uses the last level's heads and width)
    used = [i for i, kind in enumerate(down) if kind.startswith("CrossAttn")] + [len(channels) - 1]
    counts = {heads[i] for i in used}
    if len(counts) == 1 and all(channels[i] % heads[i] == 0 for i in used):
        return {"num_heads": counts.pop(), "head_dim": None}
    widths = {channels[i] // heads[i] for i in used}
    if len(widths) == 1 and all(channels[i] % heads[i] == 0 for i in used):
        return {"num_heads": None, "head_dim": widths.pop()}
    raise r.refuse(key, value, "the same head count on every level, or head counts that give every level the "
                   f"same head width (block widths {tuple(channels)})")


# ------------------------------------------------------------------------------------------------- VAE

VAE_KEYS = (
    # applied
    "norm_num_groups", "scaling_factor", "shift_factor",
    # must hold the value our VAE computes with
    "_class_name", "act_fn", "down_block_types", "up_block_types", "latents_mean", "latents_std",
    # accepted without effect: a hint that fp16 overflows, which the pipeline's dtype rules handle
    "force_upcast",
)


def vae_settings(config: Config) -> dict[str, Any]:
    """AutoencoderKL config -> VAEConfig fields (norm_num_groups, scaling_factor, shift_factor)."""
    r = _Reader(config, "vae/config.json")
    _class(r, ("AutoencoderKL",), "VAE")
    r.expect("act_fn", ("silu",))
    r.expect("down_block_types", ("DownEncoderBlock2D",))
    r.expect("up_block_types", ("UpDecoderBlock2D",))
    for key in ("latents_mean", "latents_std"):
        r.expect(key, (None,), "Per-channel latent statistics (Playground v2.5 style) are not applied by Studio.")
    out: dict[str, Any] = {}
    if r.has("norm_num_groups"):
        out["norm_num_groups"] = _groups(r, r.get("block_out_channels", [64]))
    if r.has("scaling_factor"):
        out["scaling_factor"] = r.positive_float("scaling_factor", 0.18215)
    if "shift_factor" in config:
        shift = r.get("shift_factor", 0.0)
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not math.isfinite(shift):
            raise r.refuse("shift_factor", shift, "a number or null")
        out["shift_factor"] = float(shift)
    return out


# ------------------------------------------------------------------------------------------- CLIP text

CLIP_KEYS = (
    # applied
    "num_attention_heads", "hidden_act", "layer_norm_eps", "eos_token_id",
    # must hold the value our encoder computes with
    "model_type",
)  # hidden_size, projection_dim and the other sizes are the weights' shapes (text_projection is P x C)
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")


def clip_settings(config: Config) -> dict[str, Any]:
    """CLIPTextConfig (or a CLIPConfig's text_config) -> ClipConfig overrides (heads, activation, eps, eos)."""
    r = _Reader(config, "text_encoder/config.json")
    if isinstance(config.get("text_config"), dict):
        r = _Reader({**config["text_config"], "_where": r.where}, r.where)
    r.expect("model_type", ("clip_text_model", "clip"))
    out: dict[str, Any] = {}
    if r.has("num_attention_heads"):
        heads = r.positive_int("num_attention_heads", 12)
        width = r.positive_int("hidden_size", heads)
        if width % heads:
            raise r.refuse("num_attention_heads", heads, f"a divisor of hidden_size={width}")
        out["heads"] = heads
    if r.has("hidden_act"):
        out["activation"] = r.expect("hidden_act", CLIP_ACTIVATIONS)
    if r.has("layer_norm_eps"):
        out["eps"] = r.positive_float("layer_norm_eps", 1e-5)
    if r.has("eos_token_id"):
        # transformers pools at the highest token id when eos_token_id is its old default 2; with the
        # CLIP vocabulary that is the end token 49407, which ours finds directly
        eos = r.positive_int("eos_token_id", 49407)
        out["eos_token_id"] = 49407 if eos == 2 else eos
    return out


# ------------------------------------------------------------------------------------------- scheduler

SCHEDULER_KEYS = (
    # applied
    "prediction_type", "beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
    # must hold the value our samplers compute with
    "_class_name", "trained_betas", "rescale_betas_zero_snr",
)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def scheduler_settings(config: Config) -> dict[str, Any]:
    """A discrete-time scheduler_config.json -> {"prediction": "eps" | "v" | None, "betas": {...}} (the
    arguments of DiscreteSchedule.from_betas). Which sampler runs is the job's choice, not the config's."""
    r = _Reader(config, "scheduler/scheduler_config.json")
    name = config.get("_class_name")
    if isinstance(name, str) and name.startswith("FlowMatch"):
        raise UserError("unsupported", f"{r.where}: _class_name={name!r} is a flow-matching scheduler, which no "
                        "Stable Diffusion 1/2/XL UNet uses (supported: the discrete DDPM-family schedulers).")
    # absent in folders converted before diffusers had the key: None lets the loader's own checks decide
    value = r.get("prediction_type", None)
    if value is not None and value not in PREDICTIONS:
        raise r.refuse("prediction_type", value, " or ".join(repr(p) for p in PREDICTIONS),
                       "Choose eps or v prediction by hand in the job if you know better.")
    r.expect("trained_betas", (None,), "Custom beta tables are not run by Studio.")
    r.expect("rescale_betas_zero_snr", (False,), "Zero-terminal-SNR schedules are not run by Studio.")
    betas: dict[str, Any] = {}  # absent keys keep SD's own (DiscreteSchedule.from_betas' defaults)
    if r.has("beta_schedule"):
        betas["schedule"] = r.expect("beta_schedule", ("scaled_linear", "linear"))
    for key, name in (("beta_start", "beta_start"), ("beta_end", "beta_end")):
        if r.has(key):
            betas[name] = r.positive_float(key, 0.0)
    if r.has("num_train_timesteps"):
        betas["steps"] = r.positive_int("num_train_timesteps", 1000)
    start, end = betas.get("beta_start", 0.00085), betas.get("beta_end", 0.012)
    if not start < end < 1:
        raise r.refuse("beta_end", end, f"a value above beta_start={start} and below 1")
    return {"prediction": PREDICTIONS.get(value), "betas": betas}


# ------------------------------------------------------------------------------------------------ Wan

WAN_TRANSFORMER_KEYS = (
    # applied
    "attention_head_dim", "num_attention_heads", "eps",
    # must hold the value our transformer computes with
    "_class_name", "qk_norm",
    # accepted without effect: diffusers precomputes RoPE up to this length, we compute it per shape
    "rope_max_seq_len",
)


def wan_transformer_settings(config: Config) -> dict[str, Any]:
    """WanTransformer3DModel config -> {"head_dim", "heads", "eps"}, each only when the config states it."""
    r = _Reader(config, "transformer/config.json")
    _class(r, ("WanTransformer3DModel",), "transformer")
    r.expect("qk_norm", ("rms_norm_across_heads", None))
    out: dict[str, Any] = {}
    if r.has("attention_head_dim"):
        out["head_dim"] = r.positive_int("attention_head_dim", 128)
        if r.has("num_attention_heads"):
            out["heads"] = r.positive_int("num_attention_heads", 40)
    if r.has("eps"):
        out["eps"] = r.positive_float("eps", 1e-6)
    return out


WAN_VAE_KEYS = ("latents_mean", "latents_std", "_class_name", "attn_scales")


def wan_vae_settings(config: Config) -> dict[str, Any]:
    """AutoencoderKLWan config -> WanVAEConfig overrides (latents_mean, latents_std, when given)."""
    r = _Reader(config, "vae/config.json")
    _class(r, ("AutoencoderKLWan",), "VAE")
    r.expect("attn_scales", ([],))
    out: dict[str, Any] = {}
    z = r.positive_int("z_dim", 16)
    for key in ("latents_mean", "latents_std"):
        value = config.get(key)
        if value is None:
            continue
        if not (isinstance(value, list) and len(value) == z and all(isinstance(v, (int, float)) for v in value)):
            raise r.refuse(key, value, f"a list of {z} numbers (one per latent channel)")
        if key == "latents_std" and not all(v > 0 for v in value):
            raise r.refuse(key, value, "positive numbers")
        out[key] = tuple(float(v) for v in value)
    return out


T5_KEYS = ("relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj", "dense_act_fn",
           "is_gated_act", "model_type")


def t5_settings(config: Config) -> dict[str, Any]:
    """UMT5Config / T5Config -> T5Config overrides (max_distance, eps)."""
    r = _Reader(config, "text_encoder/config.json")
    r.expect("model_type", ("umt5", "t5"))
    r.expect("feed_forward_proj", ("gated-gelu",), "Studio runs the gated-GELU T5 v1.1 / umT5 encoders.")
    if "dense_act_fn" in config:
        r.expect("dense_act_fn", ("gelu_new",))
    if "is_gated_act" in config:
        r.expect("is_gated_act", (True,))
    out: dict[str, Any] = {}
    if r.has("relative_attention_max_distance"):
        out["max_distance"] = r.positive_int("relative_attention_max_distance", 128)
    if r.has("layer_norm_epsilon"):
        out["eps"] = r.positive_float("layer_norm_epsilon", 1e-6)
    return out


# ------------------------------------------------------------------------------------------------ Flux

FLUX_TRANSFORMER_KEYS = (
    # applied
    "axes_dims_rope", "num_attention_heads",
    # must hold the value our transformer computes with
    "_class_name", "patch_size",
    # accepted without effect: the weights' shapes give them (checked against them where they could differ)
    "attention_head_dim",
)


def flux_transformer_settings(config: Config) -> dict[str, Any]:
    """FluxTransformer2DModel config -> {"axes_dim", "heads"}, each only when the config states it."""
    r = _Reader(config, "transformer/config.json")
    _class(r, ("FluxTransformer2DModel",), "transformer")
    r.expect("patch_size", (1,), "Flux packs 2x2 latent patches itself; patch_size must be 1.")
    out: dict[str, Any] = {}
    if r.has("axes_dims_rope"):
        axes = config["axes_dims_rope"]
        if not (isinstance(axes, (list, tuple)) and axes
                and all(isinstance(a, int) and a > 0 and a % 2 == 0 for a in axes)):
            raise r.refuse("axes_dims_rope", axes, "a list of positive even integers")
        out["axes_dim"] = tuple(axes)
    if r.has("num_attention_heads"):
        out["heads"] = r.positive_int("num_attention_heads", 24)
    return out


SD3_TRANSFORMER_KEYS = (
    # applied
    "num_attention_heads",
    # must hold the value our transformer computes with
    "_class_name", "patch_size",
    # accepted without effect: the weights' shapes give them
    "attention_head_dim", "num_layers", "dual_attention_layers", "qk_norm", "pos_embed_max_size", "sample_size",
)


def sd3_transformer_settings(config: Config) -> dict[str, Any]:
    """SD3Transformer2DModel config -> {"heads"} when the config states it."""
    r = _Reader(config, "transformer/config.json")
    _class(r, ("SD3Transformer2DModel",), "transformer")
    r.expect("qk_norm", (None, "rms_norm"), "Studio runs SD3 with no QK norm or RMS QK norm (SD3.5).")
    out: dict[str, Any] = {}
    if r.has("num_attention_heads"):
        out["heads"] = r.positive_int("num_attention_heads", 24)
    return out
