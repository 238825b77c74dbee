"""Finding and loading Wan's parts: transformer(s), VAE, umT5 encoder and tokenizer, CLIP image encoder.

Split from wan.py (the job itself). A part comes from a diffusers Wan folder, from a file next to
the transformer (or ComfyUI's models/ subfolders) recognised by its headers, or from the library;
whatever is missing is named with the file to install. Parts are built on the CPU: where they live
during a job is the MemoryManager's decision (skeleton.py registers them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.engine.context import JobContext, UserError
from studio.engine.pipelines.diffusion.files import find_companion, read_state_dict
from studio.engine.pipelines.diffusion.skeleton import keep_one, part_bytes
from studio.engine.resolve import resolve_generator, resolve_path
from studio.protocol import VideoJob

PIXEL_MULTIPLE = 16  # VAE 8x times patch 2 (Wan 2.2's 16x VAE needs 32; checked once it is loaded)
TEXT_LEN = 512
UMT5_HINT = ("umt5_xxl_fp16.safetensors (ComfyUI's Wan text encoder) or the text_encoder/ folder of a "
             "diffusers Wan repository")
VAE_HINT = {"wan2.1": "wan_2.1_vae.safetensors (Wan 2.1 and 2.2 14B)",
            "wan2.2": "wan2.2_vae.safetensors (Wan 2.2 TI2V 5B)"}
IMAGE_ENCODER_HINT = ("clip_vision_h.safetensors (ComfyUI's Wan 2.1 image encoder, in models/clip_vision) or the "
                      "image_encoder/ folder of a diffusers Wan 2.1 I2V repository")
TOKENIZER_HINT = ("the umT5 tokenizer.json (from google/umt5-xxl or the tokenizer/ folder of a diffusers Wan "
                  "repository)")


@dataclass
class WanParts:
    transformer: torch.nn.Module  # studio.models.wan.WanTransformer
    vae: torch.nn.Module  # studio.models.wan_vae.WanVAE
    encoder: torch.nn.Module  # studio.models.t5.T5Encoder
    tokenizer: object  # studio.models.t5.T5Tokenizer
    files: dict[str, str]
    transformer_2: torch.nn.Module | None = None  # Wan 2.2 A14B low-noise expert
    boundary: float = 0.0  # sigma*1000 below which transformer_2 runs
    notes: list[str] = field(default_factory=list)
    image_encoder: torch.nn.Module | None = None  # Wan 2.1 I2V: studio.models.clip_vision.ClipVisionModel
    key: str = ""  # the model cache key; the manager names the parts "<key>|<part>"


# ---------------------------------------------------------------------------------- finding the parts


def _detect(path: Path):
    from studio.library.detect import detect
    from studio.library.headers import HeaderError

    try:
        return detect(path)
    except (HeaderError, OSError):
        return None


def _matches(det, family: str, variant: str | None) -> bool:
    return det is not None and det.family == family and (variant is None or det.variant == variant)


def find_part(model_file: Path, family: str, variant: str | None, folders: tuple[str, ...]) -> Path | None:
    """A file of this detected family next to the model (its folder, ComfyUI's sibling folders), else
    in the library."""
    return find_companion(model_file, folders, lambda p: _matches(_detect(p), family, variant),
                          lambda e: e.effective_family == family and (variant is None or e.variant == variant))


def _is_clip_vision(path: Path) -> bool:
    from studio.library.headers import HeaderError, read_header
    from studio.models.clip_vision import find_layout

    try:
        return find_layout(read_header(path).tensors) is not None
    except (HeaderError, OSError):
        return False


def find_image_encoder(model_file: Path) -> Path | None:
    """A CLIP vision file next to the model (ComfyUI keeps it in models/clip_vision), else in the library.
    The library's detection has no CLIP-vision kind (such files list as unrecognised), so headers decide."""
    other = ("checkpoint", "diffusion_model", "vae", "lora", "controlnet", "llm")
    return find_companion(model_file, ("clip_vision", "image_encoder"), _is_clip_vision,
                          lambda e: e.role not in other and e.path.is_file() and _is_clip_vision(e.path))


def find_tokenizer(*folders: Path):
    from studio.models.t5 import T5Tokenizer

    for folder in folders:
        for d in (folder, folder / "tokenizer", folder / "umt5-xxl", folder / "google" / "umt5-xxl"):
            if (d / "tokenizer.json").is_file():
                return T5Tokenizer(d / "tokenizer.json")
    where = folders[0] / "tokenizer" / "tokenizer.json"
    raise UserError("model_not_found", f"No umT5 tokenizer found: put {TOKENIZER_HINT} at {where}.")


def locate(model: Path, job: VideoJob) -> dict[str, Path]:
    """-> paths of transformer (and transformer_2), vae, text_encoder, tokenizer folder."""
    if model.is_dir():
        if not (model / "transformer").is_dir():
            raise UserError("bad_model", f"{model.name} is a folder without transformer/: pick a diffusers Wan "
                            "folder (Wan-AI/Wan2.1-T2V-1.3B-Diffusers and alike) or a Wan transformer file.")
        parts = {"transformer": model / "transformer", "vae": model / "vae", "text_encoder": model / "text_encoder",
                 "tokenizer": model}
        if (model / "transformer_2").is_dir():
            parts["transformer_2"] = model / "transformer_2"
        if (model / "image_encoder").is_dir():
            parts["image_encoder"] = model / "image_encoder"
        for name, hint in (("vae", VAE_HINT["wan2.1"]), ("text_encoder", UMT5_HINT)):
            if not parts[name].is_dir():
                raise UserError("model_not_found", f"{model.name} has no {name}/ folder: put {hint} there.")
        return parts
    parts = {"transformer": model}
    vae_spec, te_spec = job.vae, job.text_encoder
    parts["vae"] = resolve_path(vae_spec, "VAE") if vae_spec else None
    parts["text_encoder"] = resolve_path(te_spec, "text encoder") if te_spec else None
    return parts


def load_parts(job: VideoJob, ctx: JobContext, dtype: torch.dtype) -> WanParts:
    from studio.models.diffusers_config import read_config
    from studio.models.t5 import load_t5_encoder
    from studio.models.wan import load_wan_transformer
    from studio.models.wan_vae import load_wan_vae

    model_path = resolve_generator(job.model, "video")
    parts = locate(model_path, job)
    key = f"wan:{model_path}:{parts.get('vae')}:{parts.get('text_encoder')}:{dtype}"
    cached = ctx.models.get(key)
    if cached is not None:
        return cached
    keep_one(ctx, "wan:")  # one Wan model at a time: two 14B models do not fit anywhere

    total = 4 + ("transformer_2" in parts)
    ctx.progress(0, total, "loading")
    notes: list[str] = []
    transformer = load_wan_transformer(read_state_dict(parts["transformer"], compact=True), dtype=dtype,
                                       config=read_config(parts["transformer"]))
    ctx.progress(1, total, "loading")
    transformer_2 = None
    boundary = 0.0
    if "transformer_2" in parts:
        transformer_2 = load_wan_transformer(read_state_dict(parts["transformer_2"], compact=True), dtype=dtype,
                                             config=read_config(parts["transformer_2"]))
        boundary = 1000.0 * _boundary_ratio(model_path)
        ctx.progress(2, total, "loading")
    vae_variant = "2.2" if transformer.cfg.vae == "wan2.2" else "2.1"
    if parts["vae"] is None:
        parts["vae"] = find_part(model_path, "wan-vae", vae_variant, ("vae",))
        if parts["vae"] is None:
            raise UserError("model_not_found", f"No Wan VAE found for {model_path.name}: install "
                            f"{VAE_HINT[transformer.cfg.vae]} in the library or next to the model file.")
    vae = load_wan_vae(read_state_dict(parts["vae"]), dtype=dtype, config=read_config(parts["vae"]))
    if vae.cfg.z_dim != transformer.cfg.out_channels:
        raise UserError("bad_model", f"The VAE {Path(parts['vae']).name} has {vae.cfg.z_dim} latent channels but "
                        f"the transformer makes {transformer.cfg.out_channels}: install "
                        f"{VAE_HINT[transformer.cfg.vae]}.")
    ctx.progress(total - 2, total, "loading")
    if parts["text_encoder"] is None:
        parts["text_encoder"] = find_part(model_path, "umt5", None, ("text_encoders", "clip", "text_encoder"))
        if parts["text_encoder"] is None:
            raise UserError("model_not_found", f"No umT5 text encoder found for {model_path.name}: install "
                            f"{UMT5_HINT} in the library or next to the model file.")
    te_path = Path(parts["text_encoder"])
    tokenizer = find_tokenizer(*([parts["tokenizer"]] if "tokenizer" in parts else []),
                               te_path if te_path.is_dir() else te_path.parent, model_path.parent)
    encoder = load_t5_encoder(read_state_dict(te_path), dtype=dtype, config=read_config(te_path))
    image_encoder = load_image_encoder(transformer.cfg, parts, model_path, dtype)
    ctx.progress(total, total, "loading")
    files = {k: str(v) for k, v in parts.items() if v is not None}
    loaded = WanParts(transformer, vae, encoder, tokenizer, files, transformer_2, boundary, notes, image_encoder, key)
    nbytes = sum(part_bytes(m) for m in (transformer, transformer_2, vae, encoder, image_encoder) if m is not None)
    ctx.models.put(key, loaded, nbytes)
    return loaded


def load_image_encoder(net_cfg, parts: dict, model_path: Path, dtype: torch.dtype) -> torch.nn.Module | None:
    """Wan 2.1 I2V's CLIP image encoder (None for models without CLIP image input)."""
    import json

    from studio.models.clip_vision import ClipVisionConfig, build_clip_vision

    if net_cfg.image_dim is None:
        return None
    if net_cfg.image_pos_len:
        raise UserError("unsupported", "This is Wan 2.1 FLF2V (first and last frame to video): Studio's video "
                        "job takes one init image for now. Pick Wan 2.1 I2V 14B or Wan 2.2 I2V A14B.")
    if parts.get("image_encoder") is None:
        parts["image_encoder"] = find_image_encoder(model_path)
        if parts["image_encoder"] is None:
            raise UserError("model_not_found", f"No CLIP image encoder found for {model_path.name} (Wan 2.1 I2V "
                            f"needs one): install {IMAGE_ENCODER_HINT} in the library or next to the model file.")
    path = Path(parts["image_encoder"])
    cfg = None
    if path.is_dir() and (path / "config.json").is_file():
        try:
            cfg = ClipVisionConfig.from_hf_config(json.loads((path / "config.json").read_text()))
        except (OSError, ValueError, KeyError):
            cfg = None  # fall back to what the shapes say
    try:
        model = build_clip_vision(read_state_dict(path), cfg=cfg, dtype=dtype)
    except ValueError as exc:
        raise UserError("bad_model", f"{path.name} is not a usable CLIP image encoder ({exc}): install "
                        f"{IMAGE_ENCODER_HINT}.") from None
    if model.config.width != net_cfg.image_dim:
        raise UserError("bad_model", f"The image encoder {path.name} makes {model.config.width}-wide features but "
                        f"the transformer takes {net_cfg.image_dim}: install {IMAGE_ENCODER_HINT}.")
    return model


def _head_dim(path: Path) -> int:
    """A diffusers folder states its head width; single files do not (every released Wan uses 128)."""
    import json

    try:
        value = json.loads((path / "config.json").read_text()).get("attention_head_dim") if path.is_dir() else None
    except (OSError, ValueError):
        value = None
    return value if isinstance(value, int) and value > 0 else 128


def _boundary_ratio(folder: Path) -> float:
    import json

    try:
        ratio = json.loads((folder / "model_index.json").read_text()).get("boundary_ratio")
    except (OSError, ValueError):
        ratio = None
    return float(ratio) if isinstance(ratio, (int, float)) else 0.875  # Wan 2.2 A14B T2V's published value
