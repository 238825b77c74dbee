"""Stable Diffusion 1.x / 2.x / SDXL: txt2img, img2img and inpainting, with live previews.

The family module for the diffusion skeleton (skeleton.py runs the steps; this supplies them):
  load      the checkpoint (or the cached one), LoRAs applied on the CPU copy;
  parts     UNet (streamed by its down/mid/up blocks), VAE, text encoders;
  generate  encode prompt and negative prompt (weights, long prompts in 77-token chunks); per batch:
            seeded noise -> sampler over the model's sigmas (CFG in one UNet batch), a preview JPEG and
            a progress event every step, cancel checked every step; VAE decode (tiles on OOM, fp32 retry
            on NaN); PNG with A1111 + JSON metadata.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from studio.engine import samplers as S
from studio.engine.context import JobContext, UserError
from studio.engine.pipelines.diffusion.files import read_state_dict
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
from studio.engine.prompts import encode_prompt, pad_to_chunks
from studio.engine.resolve import resolve_generator, resolve_path
from studio.models.sd_checkpoint import SDModel, load_sd
from studio.nn.packed_fp8 import Fp8Linear
from studio.nn.packed_gguf import GGUFLinear
from studio.protocol import ImageJob, ImageResult

log = logging.getLogger(__name__)

MAX_SIDE = 4096
DEFAULT_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024, "sdxl_refiner": 1024}


# ---------------------------------------------------------------------------------- validation

def validate(job: ImageJob) -> None:
    if not job.model:
        raise UserError("bad_input", "No image model chosen. Drop a Stable Diffusion checkpoint on the window, "
                        "then pick it in the model list.")
    for name, value in (("width", job.width), ("height", job.height)):
        if value < 64 or value > MAX_SIDE:
            raise UserError("bad_input", f"{name} {value} is out of range: pick 64 to {MAX_SIDE}.")
        if value % 8:
            lo, hi = value // 8 * 8, value // 8 * 8 + 8
            raise UserError("bad_input", f"{name} {value} is not a multiple of 8: use {lo} or {hi}.")
    if not 1 <= job.steps <= 1000:
        raise UserError("bad_input", f"steps {job.steps} is out of range: pick 1 to 1000.")
    if not 1 <= job.batch_size <= 64 or not 1 <= job.batch_count <= 1000:
        raise UserError("bad_input", "batch size must be 1 to 64 and batch count 1 to 1000.")
    if job.sampler not in S.SAMPLERS:
        raise UserError("bad_input", f"unknown sampler {job.sampler!r}: pick one of {', '.join(S.SAMPLERS)}.")
    if job.schedule not in S.SCHEDULES:
        raise UserError("bad_input", f"unknown schedule {job.schedule!r}: pick one of {', '.join(S.SCHEDULES)}.")
    if not 0.0 < job.strength <= 1.0:
        raise UserError("bad_input", f"strength {job.strength} must be above 0 and at most 1.")
    if not math.isfinite(job.cfg) or not 0 <= job.cfg <= 100:
        raise UserError("bad_input", f"CFG {job.cfg} must be between 0 and 100.")
    if not 1 <= job.clip_skip <= 12:
        raise UserError("bad_input", f"clip skip {job.clip_skip} must be between 1 and 12.")
    if job.quant not in ("", "int8", "int4", "fp8"):
        raise UserError("bad_input", f"quantization {job.quant!r} is not one of int8, int4, fp8 (or none).")
    if job.quant and job.loras:
        raise UserError("unsupported", "LoRAs cannot be applied to a quantized UNet yet: turn quantization off to "
                        "use LoRAs, or drop the LoRAs.")
    if job.mask and not job.init_image:
        raise UserError("bad_input", "A mask needs an image to paint on: set an init image for inpainting.")
    for lora in job.loras:
        if not isinstance(lora, dict) or not isinstance(lora.get("path"), str):
            raise UserError("bad_input", 'Each LoRA must be {"path": FILE, "weight": NUMBER}.')


# ---------------------------------------------------------------------------------- loading

def get_model(job: ImageJob, ctx: JobContext, dtype: torch.dtype) -> SDModel:
    path = resolve_generator(job.model, "image")
    vae = resolve_path(job.vae, "VAE") if job.vae else None
    encoders = [resolve_path(p, "text encoder") for p in job.text_encoders]
    key = f"sd:{path}:{vae}:{','.join(map(str, encoders))}:{dtype}:{job.prediction}:{job.quant or 'full'}"
    model = ctx.models.get(key)
    if model is None:
        keep_one(ctx, "sd:")  # a second SD model would double the memory for no gain in speed
        ctx.progress(0, 2, "loading")
        model = load_sd(path, vae, dtype, job.prediction, text_encoders=encoders)
        model.key = key  # type: ignore[attr-defined]
        if job.quant:
            from studio.engine.weights import quantize_model

            summary = quantize_model(model.unet, job.quant)
            model.notes.append(f"UNet weights {job.quant}: {summary.bytes_before / 2**30:.2f} -> "
                               f"{summary.bytes_after / 2**30:.2f} GiB ({len(summary.replaced)} layers; "
                               f"{len(summary.skipped)} kept in full precision)")
        nbytes = sum(part_bytes(part.module) for part in parts(model).values())
        ctx.models.put(key, model, nbytes, path=str(path))
        ctx.progress(1, 2, "loading")
    return model


def parts(model: SDModel) -> dict[str, Part]:
    named = {"unet": Part(model.unet, model.unet.stream_blocks()), "vae": Part(model.vae)}
    named.update({f"text_encoder_{i}": Part(enc) for i, enc in enumerate(model.encoders)})
    return named


def activation_bytes(model: SDModel, job: ImageJob, dtype: torch.dtype) -> dict[str, int]:
    """Rough peaks of working memory per part (measured shapes of SD-style nets, with SDPA)."""
    size = torch.finfo(dtype).bits // 8
    pixels = job.width * job.height
    cfg_batch = job.batch_size * (1 if job.cfg == 1.0 else 2)
    unet = cfg_batch * (pixels // 64) * model.unet.config.block_channels[0] * size * 24
    vae = job.batch_size * pixels * 128 * size * 9  # the last up level at full resolution dominates
    return {"unet": unet, "vae": vae, "text_encoder_0": 64 << 20, "text_encoder_1": 64 << 20}


# ---------------------------------------------------------------------------------- conditioning

def encode_text(model: SDModel, text: str, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond (1, 77k, D), pooled or None) for the model family."""
    if model.family in ("sd1", "sd2"):
        enc, tok = model.encoders[0], model.tokenizers[0]
        skip = clip_skip
        if model.family == "sd2" and len(enc.text_model.encoder.layers) == 24:
            skip += 1  # SD2 conditions on OpenCLIP's penultimate layer (diffusers folders drop the last one)
        return encode_prompt(tok, enc, text, clip_skip=min(skip, len(enc.text_model.encoder.layers)))
    # SDXL: penultimate hidden states without the final norm from each encoder, side by side in D
    conds, pooled = [], None
    for enc, tok in zip(model.encoders, model.tokenizers, strict=True):
        cond, pool = encode_prompt(tok, enc, text, clip_skip=max(2, clip_skip), final_norm=False)
        conds.append(cond)
        pooled = pool
    return torch.cat(conds, dim=-1), pooled


def sdxl_y(model: SDModel, pooled: torch.Tensor, width: int, height: int, negative: bool) -> torch.Tensor:
    from studio.models.unet import sdxl_add_embeddings

    if model.family == "sdxl_refiner":
        extra = sdxl_add_embeddings((height, width), (0, 0), (height, width), aesthetic_score=2.5 if negative else 6.0)
    else:
        extra = sdxl_add_embeddings((height, width), (0, 0), (height, width))
    return torch.cat([pooled, extra.to(pooled)[None]], dim=1)


# ---------------------------------------------------------------------------------- the job

def packed_layer_kind(module: torch.nn.Module) -> str:
    """"fp8" / "GGUF" when `module` holds layers whose weights are stored packed, else ""."""
    layers = list(module.modules())
    if any(isinstance(m, Fp8Linear) for m in layers):
        return "fp8"
    return "GGUF" if any(isinstance(m, GGUFLinear) for m in layers) else ""


class StableDiffusion:
    """SD 1.x / 2.x / SDXL for the diffusion skeleton."""

    advice = "try a smaller image size or batch, a quantized model (int8/int4), or a larger --vram-budget"

    def validate(self, job: ImageJob, ctx: JobContext) -> tuple[ImageJob, list[str]]:
        validate(job)
        return job, []

    def load(self, job: ImageJob, ctx: JobContext, dtype: torch.dtype, notes: list[str]) -> SDModel:
        model = get_model(job, ctx, dtype)
        notes += model.notes
        if job.loras and (packed := packed_layer_kind(model.unet)):
            raise UserError("unsupported", f"LoRAs cannot be applied to this checkpoint yet: its UNet keeps {packed} "
                            "weights (an fp8 or GGUF file). Use the fp16/bf16 version of the model with LoRAs, "
                            "or drop the LoRAs.")
        from studio.models.lora import apply_loras

        loras = [(resolve_path(lo["path"], "LoRA"), float(lo.get("weight", 1.0))) for lo in job.loras]
        if tuple((str(p), w) for p, w in loras) != model.loras:
            # LoRAs patch weights in place: on the CPU copy, with the parts out of the manager's hands
            if ctx.memory is not None:
                ctx.memory.unload(model.key)  # type: ignore[attr-defined]
        notes += apply_loras(model, loras)
        return model

    def parts(self, model: SDModel) -> dict[str, Part]:
        return parts(model)

    def activations(self, model: SDModel, job: ImageJob, dtype: torch.dtype) -> dict[str, int]:
        return activation_bytes(model, job, dtype)

    def force(self, job: ImageJob, ctx: JobContext) -> dict:
        return {}

    def generate(self, run: Run) -> ImageResult:
        return _generate(run)


FAMILY = StableDiffusion()


@torch.inference_mode()
def run_image(job: ImageJob, ctx: JobContext) -> ImageResult:
    return run_diffusion(job, ctx, FAMILY)


def _generate(run: Run) -> ImageResult:
    job, ctx, model, names, plan, mem = run.job, run.ctx, run.model, run.names, run.plan, run.mem
    device = run.device
    dtype = next(model.unet.parameters()).dtype
    seed = job.seed
    down = model.vae.downscale
    lat_h, lat_w = job.height // down, job.width // down
    multiple = 2 ** (len(model.unet.config.block_channels) - 1)
    if lat_h % multiple or lat_w % multiple:
        step = down * multiple
        raise UserError("bad_input", f"This model needs width and height in multiples of {step}: try "
                        f"{job.width // step * step}x{job.height // step * step}.")

    # -- text ------------------------------------------------------------------------------
    ctx.progress(0, 1, "encoding")
    with run.use(*(part for part in names if part.startswith("text_encoder"))):
        cond, pooled = encode_text(model, job.prompt, job.clip_skip)
        uncond, upooled = encode_text(model, job.negative, job.clip_skip)
        if cond.shape[1] != uncond.shape[1]:  # CFG needs equal lengths: pad the shorter with empty chunks
            empty, _ = encode_text(model, "", job.clip_skip)
            chunks = max(cond.shape[1], uncond.shape[1]) // 77
            cond, uncond = pad_to_chunks(cond, chunks, empty), pad_to_chunks(uncond, chunks, empty)
    y_cond = y_uncond = None
    if model.family.startswith("sdxl"):
        y_cond = sdxl_y(model, pooled, job.width, job.height, negative=False)
        y_uncond = sdxl_y(model, upooled, job.width, job.height, negative=True)

    # -- init image and mask ------------------------------------------------------------------
    init_latent = mask = masked_latent = None
    if job.init_image:
        pixels = load_image(job.init_image, job.width, job.height, fit="stretch", value_range="-1..1")
        pixels = pixels.to(device, dtype)
        with run.use("vae"):
            init_latent = encode_image(model, pixels)
        if job.mask:
            m = load_image(job.mask, job.width, job.height, fit="stretch", value_range="0..1", mode="L")
            m = m.to(device, dtype)  # (1, 1, H, W); 1 = repaint
            m = (m > 0.5).to(dtype)
            mask = F.interpolate(m, size=(lat_h, lat_w), mode="nearest")
            if model.inpaint:
                with run.use("vae"):
                    masked_latent = encode_image(model, pixels * (1 - m))
    elif model.inpaint:
        raise UserError("bad_input", "This is an inpainting model: give it an init image and a mask, or pick a "
                        "regular checkpoint for text-to-image.")

    # -- schedule ---------------------------------------------------------------------------
    schedule = S.DiscreteSchedule.from_betas(**model.betas)  # a diffusers folder's scheduler config, else SD's
    sigmas = S.get_sigmas(job.schedule, schedule, job.steps)
    if init_latent is not None and job.strength < 1.0:
        # img2img: run the last `strength` part of the full schedule, as A1111 and ComfyUI do
        keep = max(1, int(round(job.steps * job.strength)))
        sigmas = S.get_sigmas(job.schedule, schedule, max(job.steps, int(job.steps / job.strength)))[-(keep + 1):]
    sigmas = sigmas.to(device)

    net = make_net(model, cond, uncond, y_cond, y_uncond, job.cfg, mask, masked_latent)
    denoiser = S.v_denoiser(net, schedule) if model.prediction == "v" else S.eps_denoiser(net, schedule)
    if job.sampler == "lcm":
        denoiser = S.lcm_denoiser(denoiser, schedule)
    if mask is not None and not model.inpaint:
        denoiser = _keep_unmasked(denoiser, init_latent, mask)
    sampler = S.get_sampler(job.sampler)

    taesd = preview_decoder(model, ctx, device) if job.previews else None
    out_dir, stem = image_target(job, ctx)
    images = []
    total_images = job.batch_size * job.batch_count
    for b in range(job.batch_count):
        seeds = [(seed + b * job.batch_size + i) % 2**32 for i in range(job.batch_size)]
        eps = torch.cat([noise((1, model.unet.config.out_channels, lat_h, lat_w), s, device, dtype) for s in seeds])
        gen = torch.Generator().manual_seed(seeds[0] ^ 0x5EED)  # the sampler's own noise (ancestral / SDE)
        if init_latent is not None:
            x = init_latent.expand(job.batch_size, -1, -1, -1) + eps * sigmas[0]
        else:
            x = eps * sigmas[0]

        def callback(step: int, total: int, x_now: torch.Tensor, denoised: torch.Tensor, b=b) -> None:
            done = b * total + step
            ctx.progress(done, total * job.batch_count, "sampling")
            if job.previews:
                ctx.preview(preview_jpeg(denoised[:1].float(), model.latent_family, taesd=taesd), "image/jpeg",
                            job.width, job.height)

        with run.use("unet"):
            latent = sampler(denoiser, x, sigmas, callback=callback, generator=gen, cancel=ctx.cancel.check)
        if mask is not None and not model.inpaint:
            latent = init_latent * (1 - mask) + latent * mask
        ctx.progress(b, job.batch_count, "decoding")
        with run.use("vae"):
            pixels = decode(model, latent, ctx, tiled=plan.vae_tiles or vae_needs_tiles(plan, names, mem))
        for i, image in enumerate(pixels):
            meta = {**asdict(job), "kind": "image", "seed": seeds[i], "batch_size": job.batch_size,
                    "family": model.family, "prediction": model.prediction,
                    "model_name": Path(model.path).name, "model_hash": model_hash(model.path)}
            path = save_png(to_pil(image), meta, out_dir, stem)
            images.append({"path": str(path), "seed": seeds[i], "width": image.shape[-1], "height": image.shape[-2]})
        ctx.progress(len(images), total_images, "saved")
    return ImageResult(images=images, seconds=run.timings.seconds(), model=str(model.path),
                       family=model.family, prediction=model.prediction, notes=run.notes,
                       job={**asdict(job), "kind": "image"})


def preview_decoder(model: SDModel, ctx: JobContext, device: torch.device):
    """TAESD / TAESDXL for sharper live previews when the user has installed one, else None (the
    linear latent projection is used). TAESD and TAESDXL have the same shapes: a family override
    or a tag of "sdxl" on the library entry marks the XL one."""
    want_xl = model.latent_family == "sdxl"
    key = f"taesd:{'xl' if want_xl else 'sd'}"
    cached = ctx.models.get(key)
    if cached is not None:
        return cached
    found = None
    try:
        from studio.library.library import Library, LibraryError

        with Library() as lib:
            for e in lib.list(role="vae"):
                if not e.family.startswith("taesd") or not e.variant.startswith("4ch") or e.missing:
                    continue
                is_xl = "xl" in (e.family_override or "") or any(t.lower() in ("sdxl", "xl") for t in e.tags)
                if is_xl == want_xl:
                    found = e.path
                    break
    except (LibraryError, OSError):
        found = None
    if found is None:
        return None
    decoder = None
    if found is not None:
        from studio.engine.previews import TAESD

        try:
            decoder = TAESD.from_state_dict(read_state_dict(found)).to(device, torch.float32).eval()
        except (UserError, KeyError, ValueError, RuntimeError) as exc:
            log.warning("TAESD at %s unusable (%s); using the linear preview", found, exc)
            return None
        ctx.models.put(key, decoder, sum(p.numel() * 4 for p in decoder.parameters()))
    return decoder


def make_net(model: SDModel, cond, uncond, y_cond, y_uncond, cfg: float, mask, masked_latent):
    """UNet with classifier-free guidance: cond and uncond in one batch of 2B."""
    unet = model.unet

    def net(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x_in.shape[0]
        x_in = x_in.to(cond.dtype)
        if model.inpaint:
            m = mask if mask is not None else torch.ones_like(x_in[:, :1])
            ml = masked_latent if masked_latent is not None else torch.zeros_like(x_in)
            x_in = torch.cat([x_in, m.expand(b, -1, -1, -1), ml.expand(b, -1, -1, -1)], dim=1)
        if cfg == 1.0:  # no guidance: half the work
            y = y_cond.expand(b, -1) if y_cond is not None else None
            return unet(x_in, t.to(x_in.dtype), cond.expand(b, -1, -1), y).float()
        xx = torch.cat([x_in, x_in])
        tt = torch.cat([t, t]).to(x_in.dtype)
        ctx = torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1)])
        y = torch.cat([y_cond.expand(b, -1), y_uncond.expand(b, -1)]) if y_cond is not None else None
        out_c, out_u = unet(xx, tt, ctx, y).float().chunk(2)
        return out_u + cfg * (out_c - out_u)

    return net


def _keep_unmasked(denoiser, init_latent: torch.Tensor, mask: torch.Tensor):
    """Inpainting with a regular model: the denoised estimate keeps the original outside the mask."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x, sigma) * mask + init_latent.float() * (1 - mask)

    return model
