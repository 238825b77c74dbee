"""Stable Diffusion 3 / 3.5 text-to-image: the SD3 family module of the diffusion skeleton.

SD3 has five parts: the MMDiT (studio.models.sd3), the 16-channel VAE, CLIP-L and CLIP-G (penultimate
hidden states side by side, 2048 wide, and their projected pooled features, also 2048) and T5-XXL
(optional: without it its tokens are zeros, as diffusers does). `model` is a diffusers SD3 folder
(transformer/, vae/, text_encoder/ = CLIP-L, text_encoder_2/ = CLIP-G, text_encoder_3/ = T5, tokenizers,
scheduler/), one of Stability's single files that carry the encoders and VAE inside
(`text_encoders.clip_l.transformer.`, `text_encoders.clip_g.transformer.`, `text_encoders.t5xxl.transformer.`,
`first_stage_model.`), or a transformer file whose parts are found by their headers next to it, named
in the job, or in the library.

Sampling as StableDiffusion3Pipeline: flow matching, Euler over FlowMatchEulerDiscreteScheduler's shifted
schedule (shift 3), the transformer sees t = 1000 sigma, real classifier-free guidance against the
negative prompt.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studio.engine.context import JobContext, UserError
from studio.engine.flow_samplers import FLOW_SAMPLERS, get_flow_sampler
from studio.engine.pipelines.diffusion.files import read_state_dict
from studio.engine.pipelines.diffusion.flux import (
    ENCODED_KEPT,
    _detect,
    find_part,
    find_t5_tokenizer,
    img2img_sigmas,
)
from studio.engine.pipelines.diffusion.images import (
    decode,
    encode_image,
    image_target,
    model_hash,
    save_png,
    to_pil,
    vae_needs_tiles,
)
from studio.engine.pipelines.diffusion.skeleton import (
    Part,
    Run,
    keep_one,
    load_image,
    noise,
    part_bytes,
    run_diffusion,
)
from studio.engine.previews import preview_jpeg
from studio.engine.resolve import resolve_generator, resolve_path
from studio.protocol import ImageJob, ImageResult

FAMILY_ID = "sd3"
MAX_SIDE = 4096
CLIP_LEN, T5_LEN = 77, 256
HINTS = {"clip_l": "clip_l.safetensors (in ComfyUI's models/text_encoders or models/clip)",
         "clip_g": "clip_g.safetensors (in ComfyUI's models/text_encoders or models/clip)",
         "t5": "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (in ComfyUI's models/text_encoders)",
         "vae": "the SD3 VAE (the vae/ folder of a diffusers SD3 repository, or a single file that holds it)"}
DETECTED = {"clip_l": "clip-l", "clip_g": "clip-g", "t5": "t5", "vae": "vae-16ch"}
INSIDE = {"clip_l": ("text_encoders.clip_l.transformer.", "text_encoders.clip_l."),
          "clip_g": ("text_encoders.clip_g.transformer.", "text_encoders.clip_g."),
          "t5": ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl."),
          "vae": ("first_stage_model.", "vae.")}
FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3", "vae": "vae"}


@dataclass
class SD3Model:
    transformer: torch.nn.Module  # studio.models.sd3.SD3Transformer
    vae: torch.nn.Module
    clip_l: torch.nn.Module
    clip_g: torch.nn.Module
    t5: torch.nn.Module | None
    tokenizers: dict[str, object]
    files: dict[str, str]
    path: str
    shift: float = 3.0
    notes: list[str] = field(default_factory=list)
    key: str = ""
    family: str = FAMILY_ID
    encoded: dict = field(default_factory=dict)  # prompt -> its conditioning, on the CPU


def sd3_sigmas(steps: int, shift: float = 3.0, train_steps: int = 1000) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's schedule for SD3: evenly from 1 to the shifted 1/train_steps, then
    shifted (again) by shift * s / (1 + (shift - 1) s); a final 0. (steps + 1,) float32."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sigma_min = float(np.float32(shifted(np.float32(1.0 / train_steps))))
    s = np.linspace(1.0, sigma_min, steps)
    return torch.from_numpy(np.concatenate([shifted(s), [0.0]]).astype(np.float32))


# ---------------------------------------------------------------------------------- loading

def _inside(sd: dict) -> dict[str, dict]:
    from studio.models.diffusion_quant import dequantized

    found = {}
    for name, prefixes in INSIDE.items():
        for prefix in prefixes:
            part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if part:
                # T5 stays compact (its Linear layers keep fp8 / GGUF blocks); CLIPs and the VAE are small
                found[name] = part if name == "t5" else dequantized(part, torch.bfloat16)
                break
    return found


def locate(model: Path, job: ImageJob, inside: dict) -> dict[str, Path | None]:
    if model.is_dir():
        if not (model / "transformer").is_dir():
            raise UserError("bad_model", f"{model.name} is a folder without transformer/: pick a diffusers SD3 folder "
                            "(stabilityai/stable-diffusion-3.5-large and alike) or an SD3 model file.")
        parts: dict[str, Path | None] = {"transformer": model / "transformer"}
        for name, folder in FOLDERS.items():
            parts[name] = model / folder if (model / folder).is_dir() else None
            if parts[name] is None and name != "t5":
                raise UserError("model_not_found", f"{model.name} has no {folder}/ folder: put {HINTS[name]} there.")
        return parts
    parts = {"transformer": model, **dict.fromkeys(FOLDERS)}
    if job.vae:
        parts["vae"] = resolve_path(job.vae, "VAE")
    by_family = {v: k for k, v in DETECTED.items()}
    for spec in job.text_encoders:
        p = resolve_path(spec, "text encoder")
        family = getattr(_detect(p), "family", "")
        if family not in by_family or family == DETECTED["vae"]:
            raise UserError("bad_input", f"{p.name} is not a CLIP-L, CLIP-G or T5-XXL text encoder"
                            f"{f' (it is {family})' if family else ''}: SD3 takes {HINTS['clip_l']}, "
                            f"{HINTS['clip_g']} and {HINTS['t5']}.")
        parts[by_family[family]] = p
    for name in FOLDERS:
        if parts[name] is None and name not in inside:
            parts[name] = find_part(model, DETECTED[name], ("vae",) if name == "vae" else ("text_encoders", "clip"))
            if parts[name] is None and name != "t5":
                raise UserError("model_not_found", f"No {name.replace('_', '-').upper()} found for {model.name}: "
                                f"install {HINTS[name]} in the library or next to the model file.")
    return parts


def _clip(parts, inside, name: str, dtype, tok_folder: Path | None, pad_id: int | None):
    from studio.models.clip import build_clip
    from studio.models.clip_tokenizer import ClipTokenizer
    from studio.models.diffusers_config import clip_settings, read_config

    path = parts[name]
    sd = read_state_dict(path) if path is not None else inside[name]
    cfg = read_config(path) if path is not None else None
    try:
        enc = build_clip(sd, dtype=dtype, **(clip_settings(cfg) if cfg else {}))
    except ValueError as exc:
        raise UserError("bad_model", f"The {name} text encoder cannot be read ({exc}): install {HINTS[name]}.") from None
    return enc, ClipTokenizer.load(tok_folder, pad_id=pad_id)


def load_model(job: ImageJob, ctx: JobContext, dtype: torch.dtype) -> SD3Model:
    from studio.models.diffusers_config import read_config, vae_settings
    from studio.models.sd3 import load_sd3_transformer
    from studio.models.t5 import load_t5_encoder
    from studio.models.vae import load_vae

    path = resolve_generator(job.model, "image")
    key = f"sd3:{path}:{job.vae}:{','.join(job.text_encoders)}:{dtype}"
    cached = ctx.models.get(key)
    if cached is not None:
        return cached
    keep_one(ctx, "sd3:")
    ctx.progress(0, 3, "loading")
    raw = read_state_dict(path / "transformer" if path.is_dir() else path, compact=True)
    inside = {} if path.is_dir() else _inside(raw)
    parts = locate(path, job, inside)
    transformer = load_sd3_transformer(raw, dtype=dtype, config=read_config(parts["transformer"]))
    del raw
    ctx.progress(1, 3, "loading")
    vae_cfg = read_config(parts["vae"]) if parts["vae"] is not None else None
    settings = vae_settings(vae_cfg) if vae_cfg else {}
    vae = load_vae(read_state_dict(parts["vae"]) if parts["vae"] is not None else inside["vae"], family=FAMILY_ID,
                   dtype=dtype, norm_num_groups=settings.pop("norm_num_groups", 32))
    vae.cfg = replace(vae.cfg, **settings)
    if vae.cfg.latent_channels != transformer.cfg.out_channels:
        raise UserError("bad_model", f"The VAE has {vae.cfg.latent_channels} latent channels but the transformer makes "
                        f"{transformer.cfg.out_channels}: install {HINTS['vae']}.")
    folder = path if path.is_dir() else None
    # CLIP-L pads with its end token, CLIP-G with "!" (id 0), as their tokenizers in SD3 repositories do
    clip_l, tok_l = _clip(parts, inside, "clip_l", dtype, folder / "tokenizer" if folder else None, None)
    clip_g, tok_g = _clip(parts, inside, "clip_g", dtype, folder / "tokenizer_2" if folder else None, 0)
    ctx.progress(2, 3, "loading")
    t5 = t5_tok = None
    notes = []
    if parts["t5"] is not None or "t5" in inside:
        t5_path = parts["t5"]
        t5 = load_t5_encoder(read_state_dict(t5_path, compact=True) if t5_path is not None else inside["t5"], dtype=dtype,
                             config=read_config(t5_path) if t5_path is not None else None)
        near = ([path, path / "tokenizer_3"] if folder else [])
        if t5_path is not None:
            near.append(t5_path if t5_path.is_dir() else t5_path.parent)
        t5_tok = find_t5_tokenizer(*near, path.parent)
    else:
        notes.append(f"No T5-XXL text encoder: running on CLIP only (lower prompt adherence). Install {HINTS['t5']} "
                     "for full quality.")
    sched = read_config(path / "scheduler", "scheduler_config.json") if folder else None
    files = {k: str(v) if v is not None else (f"{path} (inside)" if k in inside else "") for k, v in parts.items()}
    model = SD3Model(transformer, vae, clip_l, clip_g, t5, {"clip_l": tok_l, "clip_g": tok_g, "t5": t5_tok}, files,
                     str(path), shift=float((sched or {}).get("shift", 3.0)), notes=notes, key=key)
    ctx.models.put(key, model, sum(part_bytes(p.module) for p in FAMILY.parts(model).values()), path=str(path))
    ctx.progress(3, 3, "loading")
    return model


# ---------------------------------------------------------------------------------- conditioning

def encode_prompt(model: SD3Model, text: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (context (1, 77 + T5 tokens, 4096), pooled (1, 2048)) as StableDiffusion3Pipeline builds them."""
    hidden, pooled = [], []
    for enc, tok in ((model.clip_l, model.tokenizers["clip_l"]), (model.clip_g, model.tokenizers["clip_g"])):
        ids = torch.tensor([tok(text)], device=device)
        h, p = enc(ids, clip_skip=2, final_norm=False)  # penultimate layer; pooled projected
        hidden.append(h)
        pooled.append(p)
    width = model.transformer.cfg.context_dim
    clip = F.pad(torch.cat(hidden, dim=-1), (0, width - sum(h.shape[-1] for h in hidden)))
    if model.t5 is not None:
        ids, _ = model.tokenizers["t5"]([text], max_length=T5_LEN, clean=False)
        t5 = model.t5(ids.to(device)).to(clip.dtype)
    else:
        t5 = clip.new_zeros(1, CLIP_LEN, width)
    return torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)


def cached_encode(model: SD3Model, text: str, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_prompt, remembered per prompt: a new seed or size does not wake the three encoders."""
    if text not in model.encoded:
        with run.use("text_encoder", "text_encoder_2", "text_encoder_3"):
            cond, pooled = encode_prompt(model, text, run.device)
        while len(model.encoded) >= ENCODED_KEPT:
            model.encoded.pop(next(iter(model.encoded)))
        model.encoded[text] = (cond.cpu(), pooled.cpu())
    return tuple(t.to(run.device) for t in model.encoded[text])


# ---------------------------------------------------------------------------------- the family

def validate(job: ImageJob) -> list[str]:
    if not job.model:
        raise UserError("bad_input", "No image model chosen: pick an SD3 / SD3.5 model file or diffusers folder.")
    for name, value in (("width", job.width), ("height", job.height)):
        if value < 16 or value > MAX_SIDE or value % 16:
            raise UserError("bad_input", f"{name} {value} must be a multiple of 16 between 16 and {MAX_SIDE}.")
    if not 1 <= job.steps <= 1000:
        raise UserError("bad_input", f"steps {job.steps} is out of range: pick 1 to 1000.")
    if not 1 <= job.batch_size <= 64 or not 1 <= job.batch_count <= 1000:
        raise UserError("bad_input", "batch size must be 1 to 64 and batch count 1 to 1000.")
    if job.sampler not in FLOW_SAMPLERS:
        raise UserError("bad_input", f"SD3 samples with {', '.join(FLOW_SAMPLERS)}, not {job.sampler!r}.")
    if not math.isfinite(job.cfg) or not 0 <= job.cfg <= 100:
        raise UserError("bad_input", f"CFG {job.cfg} must be between 0 and 100.")
    if not 0.0 < job.strength <= 1.0:
        raise UserError("bad_input", f"strength {job.strength} must be above 0 and at most 1.")
    if job.mask and not job.init_image:
        raise UserError("bad_input", "A mask needs an image to paint on: set an init image for inpainting.")
    unsupported = [what for what, on in (("LoRAs", job.loras), (f"quantization {job.quant!r}", job.quant)) if on]
    if unsupported:
        raise UserError("unsupported", f"{' and '.join(unsupported)} cannot be used with SD3 yet: clear them (an "
                        "fp8 or GGUF SD3 file keeps the transformer compact).")
    return []


class SD3:
    """SD3 medium and SD3.5 large / large turbo / medium for the diffusion skeleton."""

    advice = "try a smaller image or batch, an fp8 or GGUF file, or a lower --vram-budget so the transformer streams"

    def validate(self, job: ImageJob, ctx: JobContext) -> tuple[ImageJob, list[str]]:
        return job, validate(job)

    def load(self, job: ImageJob, ctx: JobContext, dtype: torch.dtype, notes: list[str]) -> SD3Model:
        model = load_model(job, ctx, dtype)
        notes += model.notes
        return model

    def parts(self, model: SD3Model) -> dict[str, Part]:
        named = {"transformer": Part(model.transformer, model.transformer.stream_blocks()), "vae": Part(model.vae),
                 "text_encoder": Part(model.clip_l), "text_encoder_2": Part(model.clip_g)}
        if model.t5 is not None:
            named["text_encoder_3"] = Part(model.t5)
        return named

    def activations(self, model: SD3Model, job: ImageJob, dtype: torch.dtype) -> dict[str, int]:
        cfg = model.transformer.cfg
        elem = torch.finfo(dtype).bits // 8
        tokens = (job.width // 16) * (job.height // 16) + CLIP_LEN + T5_LEN
        batch = job.batch_size * (2 if job.cfg > 1 else 1)
        return {"transformer": batch * tokens * (cfg.mlp_hidden + 6 * cfg.hidden) * elem,
                "vae": job.batch_size * job.width * job.height * 128 * elem * 9,
                "text_encoder": 64 << 20, "text_encoder_2": 128 << 20, "text_encoder_3": T5_LEN * 10240 * elem * 4}

    def force(self, job: ImageJob, ctx: JobContext) -> dict:
        return {}

    def generate(self, run: Run) -> ImageResult:
        return _generate(run)


FAMILY = SD3()


@torch.inference_mode()
def run_image(job: ImageJob, ctx: JobContext) -> ImageResult:
    return run_diffusion(job, ctx, FAMILY)


def _generate(run: Run) -> ImageResult:
    job, ctx, model, device = run.job, run.ctx, run.model, run.device
    down, net = model.vae.downscale, model.transformer
    lat_h, lat_w = job.height // down, job.width // down
    if lat_h % net.cfg.patch or lat_w % net.cfg.patch:
        raise UserError("bad_input", f"This model needs width and height in multiples of {down * net.cfg.patch}.")
    guided = job.cfg > 1.0  # as StableDiffusion3Pipeline: CFG 1 (turbo) is one pass without the negative
    ctx.progress(0, 1, "encoding")
    cond, pooled = cached_encode(model, job.prompt, run)
    uncond, upooled = cached_encode(model, job.negative, run) if guided else (None, None)
    run.timings.mark("encode", device)
    sigmas = sd3_sigmas(job.steps, model.shift)
    init = keep = None
    if job.init_image:
        dtype = next(model.vae.parameters()).dtype
        pixels = load_image(job.init_image, job.width, job.height, fit="stretch", value_range="-1..1")
        with run.use("vae"):
            init = encode_image(model, pixels.to(device, dtype))
        sigmas = img2img_sigmas(sigmas, job.steps, job.strength)
        if job.mask:  # repaint where white: outside, every step lands on the original noised to its sigma
            m = load_image(job.mask, job.width, job.height, fit="stretch", value_range="0..1", mode="L")
            keep = F.interpolate((m >= 0.5).float(), size=(lat_h, lat_w), mode="nearest").to(device)
    if job.sampler != "euler":
        sigmas[0] = min(float(sigmas[0]), 1.0 - 1e-6)  # multistep solvers need log((1 - sigma) / sigma) finite
    sigmas = sigmas.to(device)
    sampler = get_flow_sampler(job.sampler)
    out_dir, stem = image_target(job, ctx)
    images = []
    for b in range(job.batch_count):
        seeds = [(job.seed + b * job.batch_size + i) % 2**32 for i in range(job.batch_size)]
        eps = torch.cat([noise((1, net.cfg.out_channels, lat_h, lat_w), s, device) for s in seeds])
        n = eps.shape[0]

        def denoiser(x: torch.Tensor, sigma: torch.Tensor, n=n) -> torch.Tensor:
            s = float(sigma.flatten()[0])
            t = torch.full((n,), s * 1000.0, device=device)
            if not guided:
                v = net(x, t, cond.expand(n, -1, -1), pooled.expand(n, -1)).float()
            else:
                both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond.expand(n, -1, -1),
                                                                          cond.expand(n, -1, -1)]),
                           torch.cat([upooled.expand(n, -1), pooled.expand(n, -1)])).float()
                v_u, v_c = both.chunk(2)
                v = v_u + job.cfg * (v_c - v_u)
            x0 = x - s * v
            return x0 if keep is None else x0 * keep + init * (1 - keep)

        def callback(step: int, total: int, x_now: torch.Tensor, denoised: torch.Tensor, b=b) -> None:
            ctx.progress(b * total + step, total * job.batch_count, "sampling")
            if job.previews:
                ctx.preview(preview_jpeg(denoised[:1].float(), FAMILY_ID), "image/jpeg", job.width, job.height)

        x = eps if init is None else (1 - sigmas[0]) * init + sigmas[0] * eps
        with run.use("transformer"):
            latent = sampler(denoiser, x, sigmas, callback=callback, cancel=ctx.cancel.check)
        if keep is not None:
            latent = latent * keep + init * (1 - keep)
        run.timings.mark("sampling", device)
        ctx.progress(b, job.batch_count, "decoding")
        with run.use("vae"):
            pixels = decode(model, latent, ctx, tiled=run.plan.vae_tiles or vae_needs_tiles(run.plan, run.names,
                                                                                              run.mem))
        for i, image in enumerate(pixels):
            meta = {**asdict(job), "kind": "image", "seed": seeds[i], "family": FAMILY_ID, "prediction": "flow",
                    "model_name": Path(model.path).name, "model_hash": model_hash(model.path)}
            saved = save_png(to_pil(image), meta, out_dir, stem)
            images.append({"path": str(saved), "seed": seeds[i], "width": image.shape[-1], "height": image.shape[-2]})
        ctx.progress(len(images), job.batch_size * job.batch_count, "saved")
    return ImageResult(images=images, seconds=run.timings.seconds(), model=model.path, family=FAMILY_ID,
                       prediction="flow", notes=run.notes, job={**asdict(job), "kind": "image"})
