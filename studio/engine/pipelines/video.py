"""Wan 2.1 / 2.2 text- and image-to-video: `run_video(job, ctx) -> dict`.

Wan ships as three parts: the transformer, the causal 3D VAE and the umT5 text encoder (with
its tokenizer.json); Wan 2.1 I2V adds a CLIP ViT-H/14 image encoder. `model` is either a diffusers
Wan folder holding all of them (`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`,
`image_encoder/`; Wan 2.2 A14B adds `transformer_2/`, the low-noise expert) or a transformer file,
whose other parts are found by their headers next to it (the same folder, or ComfyUI's
`models/vae`, `models/text_encoders`, `models/clip_vision`) or in the library. Whatever is missing
is named with the file to install.

Flow matching: x = (1 - sigma) x0 + sigma noise, the transformer predicts the velocity
noise - x0, sampled with UniPC (or Euler) on Wan's shifted schedule, with classifier-free
guidance against the negative prompt. The timestep the transformer sees is floor(1000 sigma),
as in the reference and diffusers pipelines (both cast their timesteps to integers).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from studio.engine.context import JobCancelled, JobContext, UserError
from studio.engine.flow_samplers import get_flow_sampler, wan_flow_sigmas
from studio.engine.previews import latent_to_rgb, rgb_to_jpeg
from studio.protocol import VideoJob

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
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
    streamers: list = field(default_factory=list)  # BlockStreamers keeping big transformers in RAM
    image_encoder: torch.nn.Module | None = None  # Wan 2.1 I2V: studio.models.clip_vision.ClipVisionModel


# ---------------------------------------------------------------------------------- validation

def nearest_4n1(frames: int) -> int:
    """The frame count the Wan VAE can make (1 + 4n) nearest to `frames` (halfway rounds up)."""
    return 1 + 4 * max(0, int((frames - 1) / 4 + 0.5))


def nearest_multiples(value: int, multiple: int) -> list[int]:
    below = value // multiple * multiple
    return [v for v in (below, below + multiple) if v > 0]


def check_size(width: int, height: int, multiple: int) -> None:
    bad = [(name, v) for name, v in (("width", width), ("height", height)) if v <= 0 or v % multiple]
    if bad:
        parts = []
        for name, v in bad:
            parts.append(f"{name} {v} is not a multiple of {multiple}: use "
                         + " or ".join(str(n) for n in nearest_multiples(v, multiple)))
        text = "; ".join(parts)
        raise UserError("bad_input", text[0].upper() + text[1:] + ".")


def validate(job: VideoJob) -> list[str]:
    """Refuse what cannot run; returns notices for what was adjusted."""
    if not job.model:
        raise UserError("bad_input", "Pick a Wan model: a diffusers Wan folder or a Wan transformer file.")
    if job.steps < 1 or job.steps > 200:
        raise UserError("bad_input", f"steps {job.steps} must be between 1 and 200.")
    if job.frames < 1 or job.frames > 1001:
        raise UserError("bad_input", f"frames {job.frames} must be between 1 and 1001.")
    if not (0 < job.fps <= 240):
        raise UserError("bad_input", f"fps {job.fps} must be between 0 and 240.")
    if job.shift <= 0:
        raise UserError("bad_input", f"shift {job.shift} must be positive (Wan uses 3 for 480p, 5 for 720p).")
    check_size(job.width, job.height, PIXEL_MULTIPLE)
    get_sampler(job.sampler)
    if job.image and not Path(job.image).expanduser().is_file():
        raise UserError("bad_input", f"The init image {job.image} does not exist.")
    return []


def get_sampler(name: str):
    try:
        return get_flow_sampler(name)
    except ValueError as exc:
        raise UserError("bad_input", f"{exc}.") from None


# ---------------------------------------------------------------------------------- finding the parts

def resolve_path(spec: str, what: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    try:
        from studio.library.library import Library, LibraryError

        with Library() as lib:
            return lib.resolve(spec)
    except LibraryError as exc:
        raise UserError("model_not_found", f"No {what} {spec!r}: {exc}") from None


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
    return _find_file(model_file, folders, lambda p: _matches(_detect(p), family, variant),
                      lambda e: e.effective_family == family and (variant is None or e.variant == variant))


def _find_file(model_file: Path, folders: tuple[str, ...], accept, accept_entry) -> Path | None:
    base = model_file.parent
    dirs = [base, *(base.parent / f for f in folders), *(base / f for f in folders)]
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir())[:200]:
            if p != model_file and p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES and accept(p):
                return p
    try:
        from studio.library.library import Library, LibraryError

        with Library() as lib:
            for e in lib.list(include_missing=False):
                if accept_entry(e) and e.path.exists():
                    return e.path
    except (LibraryError, OSError):
        pass
    return None


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
    return _find_file(model_file, ("clip_vision", "image_encoder"), _is_clip_vision,
                      lambda e: e.role not in other and e.path.is_file() and _is_clip_vision(e.path))


def find_tokenizer(*folders: Path):
    from studio.models.t5 import T5Tokenizer

    for folder in folders:
        for d in (folder, folder / "tokenizer", folder / "umt5-xxl", folder / "google" / "umt5-xxl"):
            if (d / "tokenizer.json").is_file():
                return T5Tokenizer(d / "tokenizer.json")
    where = folders[0] / "tokenizer" / "tokenizer.json"
    raise UserError("model_not_found", f"No umT5 tokenizer found: put {TOKENIZER_HINT} at {where}.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file, or every weights file of a (sharded) diffusers component folder, merged."""
    from studio.engine.weights import load_weights, sniff_format

    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and not p.name.startswith("."))
    if not files:
        raise UserError("model_not_found", f"No weights in {path}: the download looks incomplete.")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if sniff_format(f) == "gguf":
            raise UserError("unsupported", f"{f.name} is a GGUF file; the video pipeline reads safetensors "
                            "(fp16, bf16 or fp8) Wan files for now. Use the safetensors version.")
        sd.update(load_weights(f))
    return sd


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


ACTIVATION_RESERVE = 3 << 30  # activations of one pass at 720p x 81 frames, plus the VAE, stay below this


def device_budget(ctx: JobContext) -> int:
    """Bytes the engine may use on the device (0: no limit known, e.g. the CPU)."""
    return int(getattr(ctx.device, "vram_budget", 0) or getattr(ctx.device, "total_vram", 0) or 0)


def should_stream(module: torch.nn.Module, ctx: JobContext, extra: int = 0) -> bool:
    """Stream blocks when the weights and a reserve for activations do not fit the budget, or when
    the `video_offload` setting says "stream" (tests and users on tight cards force it)."""
    from studio.engine.offload import estimate_module_bytes

    mode = ctx.settings.get("video_offload", "auto")
    if mode == "stream":
        return True
    if mode == "none" or ctx.device.kind == "cpu":
        return False
    budget = device_budget(ctx)
    return bool(budget) and estimate_module_bytes(module) + extra + ACTIVATION_RESERVE > budget


def forced_on_cpu(ctx: JobContext) -> bool:
    """Streaming forced on the CPU makes real copies, so the whole path runs (and is tested) without a GPU."""
    return ctx.device.kind == "cpu" and ctx.settings.get("video_offload") == "stream"


def place(module: torch.nn.Module, ctx: JobContext, notes: list[str], name: str, extra: int = 0):
    """Put a model on the device whole, or leave its blocks in RAM and stream them per pass.
    Returns the attached BlockStreamer, or None when the model is resident."""
    from studio.engine.offload import BlockStreamer, estimate_module_bytes, find_blocks

    device = torch.device(ctx.device.torch_device)
    if not should_stream(module, ctx, extra):
        module.to(device)
        return None
    streamer = BlockStreamer(module, find_blocks(module), device, copy_on_cpu=forced_on_cpu(ctx)).attach()
    gib = estimate_module_bytes(module) / (1 << 30)
    notes.append(f"The {name} ({gib:.1f} GiB) does not fit the device budget with room to work: its blocks "
                 "stay in RAM and visit the device one at a time (slower, but it runs).")
    return streamer


def load_parts(job: VideoJob, ctx: JobContext, dtype: torch.dtype) -> WanParts:
    from studio.models.t5 import load_t5_encoder
    from studio.models.wan import load_wan_transformer
    from studio.models.wan_vae import load_wan_vae

    model_path = resolve_path(job.model, "model")
    parts = locate(model_path, job)
    mode = ctx.settings.get("video_offload", "auto")
    key = f"wan:{model_path}:{parts.get('vae')}:{parts.get('text_encoder')}:{dtype}:{mode}"
    cached = ctx.models.get(key)
    if cached is not None:
        return cached
    for other in [m["key"] for m in ctx.models.summary() if m["key"].startswith("wan:")]:
        ctx.models.unload(other)  # one Wan model at a time: two 14B models do not fit anywhere

    device = torch.device(ctx.device.torch_device)
    total = 4 + ("transformer_2" in parts)
    ctx.progress(0, total, "loading")
    notes: list[str] = []
    streamers = []
    transformer = load_wan_transformer(read_state_dict(parts["transformer"]), dtype=dtype,
                                       head_dim=_head_dim(parts["transformer"]))
    ctx.progress(1, total, "loading")
    transformer_2 = None
    boundary = 0.0
    if "transformer_2" in parts:
        transformer_2 = load_wan_transformer(read_state_dict(parts["transformer_2"]), dtype=dtype,
                                             head_dim=_head_dim(parts["transformer_2"]))
        boundary = 1000.0 * _boundary_ratio(model_path)
        ctx.progress(2, total, "loading")
    from studio.engine.offload import estimate_module_bytes

    # Wan 2.2 A14B: both experts resident if they fit together, else each streams
    both = estimate_module_bytes(transformer_2) if transformer_2 is not None else 0
    for net, name in ((transformer, "transformer"), (transformer_2, "low-noise transformer")):
        if net is not None:
            streamer = place(net, ctx, notes, name, extra=both if net is transformer else 0)
            if streamer is not None:
                streamers.append(streamer)
    vae_variant = "2.2" if transformer.cfg.vae == "wan2.2" else "2.1"
    if parts["vae"] is None:
        parts["vae"] = find_part(model_path, "wan-vae", vae_variant, ("vae",))
        if parts["vae"] is None:
            raise UserError("model_not_found", f"No Wan VAE found for {model_path.name}: install "
                            f"{VAE_HINT[transformer.cfg.vae]} in the library or next to the model file.")
    vae = load_wan_vae(read_state_dict(parts["vae"]), dtype=dtype).to(device)
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
    # The encoder (5.7B for umT5-XXL) waits on the CPU and visits the device only to encode.
    encoder = load_t5_encoder(read_state_dict(te_path), dtype=dtype)
    image_encoder = load_image_encoder(transformer.cfg, parts, model_path, dtype)
    ctx.progress(total, total, "loading")
    files = {k: str(v) for k, v in parts.items() if v is not None}
    loaded = WanParts(transformer, vae, encoder, tokenizer, files, transformer_2, boundary, notes, streamers,
                      image_encoder)
    nbytes = sum(p.numel() * p.element_size() for m in (transformer, transformer_2, vae, encoder, image_encoder)
                 if m is not None for p in m.parameters())
    ctx.models.put(key, loaded, nbytes)
    return loaded


def load_image_encoder(net_cfg, parts: dict, model_path: Path, dtype: torch.dtype) -> torch.nn.Module | None:
    """Wan 2.1 I2V's CLIP image encoder (None for models without CLIP image input). It waits in RAM
    and visits the device only to encode the init image, as the text encoder does."""
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


# ---------------------------------------------------------------------------------- conditioning

def encode_prompts(parts: WanParts, texts: list[str], ctx: JobContext, dtype: torch.dtype,
                   notes: list[str]) -> torch.Tensor:
    """-> (len(texts), 512, text_dim), zero past each prompt's end.

    The encoder lives in RAM between jobs and visits the device only for this: whole when it fits
    next to the transformer, else block by block (umT5-XXL is 11 GiB in bf16, more than a small card).
    """
    from studio.engine.offload import BlockStreamer, estimate_module_bytes, find_blocks

    device = torch.device(ctx.device.torch_device)
    ids, mask = parts.tokenizer(texts, max_length=TEXT_LEN)
    encoder = parts.encoder
    if device.type == "cpu" and not forced_on_cpu(ctx):
        return encoder.encode(ids, mask).to(dtype)
    streamed = {id(st.model) for st in parts.streamers}
    resident = sum(estimate_module_bytes(m) for m in (parts.transformer, parts.transformer_2, parts.vae)
                   if m is not None and id(m) not in streamed)
    if should_stream(encoder, ctx, extra=resident):
        notes.append("The text encoder streams its blocks through the device (it does not fit whole).")
        with BlockStreamer(encoder, find_blocks(encoder), device, copy_on_cpu=forced_on_cpu(ctx)):
            return encoder.encode(ids.to(device), mask.to(device)).to(dtype)
    encoder.to(device)
    try:
        return encoder.encode(ids.to(device), mask.to(device)).to(dtype)
    finally:
        encoder.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def read_rgb(path: str):
    """The init image as an RGB PIL image, or a UserError saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError("bad_input", f"Cannot read the image {Path(path).name}: {exc}") from None


def load_image(path: str, width: int, height: int) -> torch.Tensor:
    """-> (1, 3, H, W) in [-1, 1], resized to cover and centre-cropped (no stretching)."""
    from PIL import Image

    im = read_rgb(path)
    scale = max(width / im.width, height / im.height)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))),
                   Image.Resampling.LANCZOS)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    arr = np.asarray(im.crop((left, top, left + width, top + height)), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]


def encode_image_context(parts: WanParts, path: str, ctx: JobContext, dtype: torch.dtype) -> torch.Tensor:
    """Wan 2.1 I2V: the whole init image (not the crop the VAE sees) through CLIP -> (1, 257, 1280), as
    diffusers' pipeline hands the original image to its CLIPImageProcessor."""
    device = torch.device(ctx.device.torch_device)
    encoder = parts.image_encoder
    image = read_rgb(path)
    if device.type == "cpu":
        return encoder.encode_images(image).to(dtype)
    encoder.to(device)  # ViT-H is 1.3 GiB in 16 bits: it visits whole and leaves
    try:
        return encoder.encode_images(image).to(dtype)
    finally:
        encoder.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def image_condition(parts: WanParts, job: VideoJob, lat_frames: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """Wan I2V (36-channel input): (1, 4 + 16, F', h, w) = [mask of known frames | latents of the image
    followed by grey frames], as the reference builds it."""
    vae = parts.vae
    image = load_image(job.image, job.width, job.height).to(device, dtype)
    video = torch.cat([image[:, :, None], image.new_zeros(1, 3, job.frames - 1, job.height, job.width)], dim=2)
    latent = vae.normalize(vae.encode(video)[0])  # (1, 16, F', h, w)
    h, w = latent.shape[-2:]
    ts = vae.cfg.time_scale
    mask = torch.zeros(1, job.frames, h, w, device=device, dtype=dtype)
    mask[:, 0] = 1
    # the first frame stands alone in the latent; repeat it so every latent frame covers `ts` pixel frames
    mask = torch.cat([mask[:, :1].expand(-1, ts, -1, -1), mask[:, 1:]], dim=1)
    mask = mask.view(1, lat_frames, ts, h, w).transpose(1, 2)  # (1, ts, F', h, w)
    return torch.cat([mask, latent], dim=1)


# ---------------------------------------------------------------------------------- the job

def compute_dtype(ctx: JobContext) -> torch.dtype:
    if ctx.device.kind == "cpu":
        return torch.float32
    return torch.bfloat16 if getattr(ctx.device, "bf16", True) else torch.float16


@torch.inference_mode()
def run_video(job: VideoJob, ctx: JobContext) -> dict:
    notes = validate(job)
    wanted = nearest_4n1(job.frames)
    if wanted != job.frames:
        notes.append(f"Wan makes 1 + 4n frames: {job.frames} frames became {wanted}.")
        job = replace(job, frames=wanted)
    started = time.perf_counter()
    dtype = compute_dtype(ctx)
    parts = load_parts(job, ctx, dtype)
    marks = {"load": time.perf_counter()}  # stage end times, reported as seconds per stage
    notes += parts.notes
    net_cfg = parts.transformer.cfg
    device = torch.device(ctx.device.torch_device)
    scale, ts = parts.vae.cfg.scale, parts.vae.cfg.time_scale
    check_size(job.width, job.height, scale * net_cfg.patch_size[1])

    seed = job.seed if job.seed >= 0 else random.randrange(2**32)
    job = replace(job, seed=seed)
    lat_frames = (job.frames - 1) // ts + 1
    shape = (1, net_cfg.out_channels, lat_frames, job.height // scale, job.width // scale)

    ctx.cancel.check()
    ctx.progress(0, 1, "encoding")
    use_cfg = job.cfg != 1.0
    text = encode_prompts(parts, [job.prompt, job.negative] if use_cfg else [job.prompt], ctx, dtype, notes)
    cond, uncond = text[:1], (text[1:] if use_cfg else None)

    # -- image conditioning ----------------------------------------------------------------
    extra = None  # channels appended to the input (I2V)
    first = None  # TI2V: the first latent frame, kept fixed
    image_context = None  # Wan 2.1 I2V: CLIP features of the init image, attended beside the prompt
    if job.image:
        if net_cfg.image_dim is not None:
            image_context = encode_image_context(parts, job.image, ctx, dtype)
        if net_cfg.in_channels == net_cfg.out_channels + parts.vae.cfg.z_dim + ts:
            extra = image_condition(parts, job, lat_frames, device, dtype)
        elif net_cfg.in_channels == net_cfg.out_channels and net_cfg.vae == "wan2.2":
            image = load_image(job.image, job.width, job.height).to(device, dtype)[:, :, None]
            first = parts.vae.normalize(parts.vae.encode(image)[0]).float()  # (1, C, 1, h, w)
        else:
            raise UserError("unsupported", "This is a text-to-video Wan model: it cannot start from an image. Clear "
                            "the init image, or pick an image-to-video model (Wan 2.1 I2V 14B, Wan 2.2 I2V "
                            "A14B or TI2V 5B).")
    elif net_cfg.in_channels != net_cfg.out_channels:
        raise UserError("bad_input", "This is an image-to-video Wan model: give it an init image, or pick a "
                        "text-to-video model.")

    # -- sampling ---------------------------------------------------------------------------
    _sync(device)
    marks["encode"] = time.perf_counter()  # prompt and init image
    sigmas = wan_flow_sigmas(job.steps, job.shift)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(device)
    tokens_per_frame = (shape[3] // net_cfg.patch_size[1]) * (shape[4] // net_cfg.patch_size[2])

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t_int = math.floor(sigma * 1000.0)
        net = parts.transformer_2 if parts.transformer_2 is not None and t_int < parts.boundary else parts.transformer
        if first is not None:
            # TI2V: the first frame's tokens are clean (t = 0), the rest at t
            t = torch.full((1, lat_frames * tokens_per_frame), float(t_int), device=device)
            t[:, :tokens_per_frame] = 0
        else:
            t = torch.full((1,), float(t_int), device=device)
        x_in = x.to(dtype) if extra is None else torch.cat([x.to(dtype), extra], dim=1)
        v = net(x_in, t, cond, image_context).float()
        if uncond is not None:
            # two passes rather than one batch of 2: half the activation memory at video sizes
            v_u = net(x_in, t, uncond, image_context).float()
            v = v_u + job.cfg * (v - v_u)
        return v

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma.flatten()[0])
        if first is not None:
            x = torch.cat([first, x[:, :, 1:]], dim=2)
        x0 = x - s * velocity(x, s)
        if first is not None:
            x0 = torch.cat([first, x0[:, :, 1:]], dim=2)
        return x0

    last: dict[str, torch.Tensor | int] = {}
    preview_channels = shape[1] == 16  # the latent->RGB factors are fitted for the 16-channel Wan 2.1 VAE

    def callback(step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        last["denoised"], last["step"] = denoised, step
        ctx.progress(step, total, "sampling")
        if preview_channels:
            jpeg, w, h = rgb_to_jpeg(latent_to_rgb(denoised, "wan", frame=lat_frames // 2), max_side=512)
            ctx.preview(jpeg, "image/jpeg", w, h)

    sampler = get_sampler(job.sampler)
    x = noise if first is None else torch.cat([first, noise[:, :, 1:]], dim=2)
    partial = False
    try:
        latent = sampler(denoiser, x, sigmas.to(device), callback=callback, cancel=ctx.cancel.check)
    except torch.OutOfMemoryError:
        raise UserError("out_of_memory", f"Sampling {job.width}x{job.height}x{job.frames} ran out of device memory. "
                        "Make the video smaller or shorter, close other programs using the GPU, or set a lower "
                        "VRAM budget in Settings so the transformer streams its blocks from RAM.") from None
    except JobCancelled:
        if not (job.keep_partial or ctx.settings.get("keep_partial_video")) or "denoised" not in last:
            raise
        latent = last["denoised"]
        partial = True
        notes.append(f"Cancelled after step {last['step']} of {job.steps}: this is the model's estimate at that "
                     "point, not a finished video.")
    if first is not None:
        latent = torch.cat([first, latent[:, :, 1:]], dim=2)

    # -- decode and save ---------------------------------------------------------------------
    _sync(device)
    marks["sampling"] = time.perf_counter()
    ctx.progress(0, 1, "decoding")
    frames = decode(parts, latent, ctx)  # (F, H, W, 3) uint8
    marks["decode"] = time.perf_counter()
    path, sidecar, codec = save_video(job, ctx, parts, frames, notes, partial)
    marks["save"] = time.perf_counter()
    timings, last_mark = {}, started
    for stage, at in marks.items():
        timings[stage] = round(at - last_mark, 3)
        last_mark = at
    timings["per_step"] = round(timings["sampling"] / max(1, int(last.get("step", job.steps))), 4)
    ctx.progress(1, 1, "saved")
    return {"videos": [{"path": str(path), "sidecar": str(sidecar), "frames": int(frames.shape[0]),
                        "width": int(frames.shape[2]), "height": int(frames.shape[1]), "fps": job.fps,
                        "seed": seed, "codec": codec}],
            "path": str(path), "seconds": round(time.perf_counter() - started, 3), "timings": timings,
            "model": parts.files["transformer"],
            "files": parts.files, "notes": notes, "partial": partial, "job": {**asdict(job), "kind": "video"}}


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so the stage timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(parts: WanParts, latent: torch.Tensor, ctx: JobContext) -> np.ndarray:
    """Normalised latent (1, C, F', h, w) -> uint8 frames (F, H, W, 3); smaller tiles after an out-of-memory."""
    vae = parts.vae
    z = vae.denormalize(latent.to(next(vae.parameters()).dtype))
    video = vae.decode_with_fallback(
        z, on_fallback=lambda failed, nxt: ctx.progress(0, 1, f"decoding in tiles of {nxt}" if nxt else "decoding"))
    if not torch.isfinite(video).all():
        raise UserError("nan", "The video came out as NaN. The model or VAE file may be damaged, or fp16 overflowed: "
                        "try again on a device with bf16, or re-download the model.")
    video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, F, H, W)
    return video.permute(1, 2, 3, 0).cpu().numpy()


def output_target(job: VideoJob, ctx: JobContext) -> tuple[Path, str]:
    """(folder, stem). `job.out` is an .mp4 path (its stem, numbered if taken) or a folder."""
    if job.out:
        out = Path(job.out).expanduser()
        if out.suffix.lower() == ".mp4":
            return out.parent, out.stem
        return out, time.strftime("%Y%m%d-%H%M%S")
    folder = ctx.settings.get("outputs") or str(Path.home() / "Videos" / "Studio")
    return Path(folder) / time.strftime("%Y-%m-%d"), time.strftime("%H%M%S")


def save_video(job: VideoJob, ctx: JobContext, parts: WanParts, frames: np.ndarray, notes: list[str],
               partial: bool) -> tuple[Path, Path, str]:
    from studio.engine.video_io import unique_video_path, write_mp4, write_sidecar

    folder, stem = output_target(job, ctx)
    meta = {**asdict(job), "kind": "video", "model_name": Path(parts.files["transformer"]).name,
            "files": parts.files, "partial": partial, "notes": notes}
    try:
        path = unique_video_path(folder, stem)
        codec = write_mp4(path, frames, job.fps, metadata=meta)
        sidecar = write_sidecar(path, meta)
    except OSError as exc:
        raise UserError("bad_input", f"Cannot save the video in {folder}: {exc}. Pick another outputs folder in "
                        "Settings.") from None
    return path, sidecar, codec

