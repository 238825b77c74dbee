"""Wan 2.1 / 2.2 text- and image-to-video: `run_video(job, ctx) -> VideoResult`, the Wan family module
of the diffusion skeleton (skeleton.py runs the steps; the MemoryManager places every part).

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
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from studio.engine.context import JobCancelled, JobContext, UserError
from studio.engine.flow_samplers import get_flow_sampler, wan_flow_sigmas
from studio.engine.memory import Policy
from studio.engine.pipelines.diffusion.skeleton import (
    Part,
    Run,
    load_image,
    noise,
    output_target,
    read_rgb,
    run_diffusion,
)
from studio.engine.pipelines.diffusion.wan_parts import (  # noqa: F401  (tests reach them through this module)
    PIXEL_MULTIPLE,
    TEXT_LEN,
    WanParts,
    find_image_encoder,
    load_image_encoder,
    load_parts,
)
from studio.engine.previews import latent_to_rgb, rgb_to_jpeg
from studio.protocol import VideoJob, VideoResult

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


# ---------------------------------------------------------------------------------- conditioning

def encode_prompts(run: Run, texts: list[str]) -> torch.Tensor:
    """-> (len(texts), 512, text_dim), zero past each prompt's end. The encoder (umT5-XXL is 11 GiB in
    bf16) is placed by the manager: whole when it fits, streamed block by block when it does not."""
    parts: WanParts = run.model
    ids, mask = parts.tokenizer(texts, max_length=TEXT_LEN)
    with run.use("text_encoder"):
        return parts.encoder.encode(ids.to(run.device), mask.to(run.device)).to(run.dtype)


def init_frame(path: str, width: int, height: int) -> torch.Tensor:
    """-> (1, 3, H, W) in [-1, 1], resized to cover and centre-cropped (a video frame is never stretched)."""
    return load_image(path, width, height, fit="cover", value_range="-1..1")


def encode_image_context(run: Run, path: str) -> torch.Tensor:
    """Wan 2.1 I2V: the whole init image (not the crop the VAE sees) through CLIP -> (1, 257, 1280), as
    diffusers' pipeline hands the original image to its CLIPImageProcessor."""
    image = read_rgb(path)
    with run.use("image_encoder"):
        return run.model.image_encoder.encode_images(image).to(run.dtype)


def image_condition(parts: WanParts, job: VideoJob, lat_frames: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """Wan I2V (36-channel input): (1, 4 + 16, F', h, w) = [mask of known frames | latents of the image
    followed by grey frames], as the reference builds it."""
    vae = parts.vae
    image = init_frame(job.image, job.width, job.height).to(device, dtype)
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

class Wan:
    """Wan 2.1 / 2.2 (T2V, I2V, TI2V; the A14B pair of experts) for the diffusion skeleton."""

    advice = ("try a smaller or shorter video, a quantized model (fp8 or GGUF), or a lower --vram-budget so "
              "more of the model streams from RAM")

    def validate(self, job: VideoJob, ctx: JobContext) -> tuple[VideoJob, list[str]]:
        notes = validate(job)
        wanted = nearest_4n1(job.frames)
        if wanted != job.frames:
            notes.append(f"Wan makes 1 + 4n frames: {job.frames} frames became {wanted}.")
            job = replace(job, frames=wanted)
        return job, notes

    def load(self, job: VideoJob, ctx: JobContext, dtype: torch.dtype, notes: list[str]) -> WanParts:
        parts = load_parts(job, ctx, dtype)
        notes += parts.notes
        return parts

    def parts(self, model: WanParts) -> dict[str, Part]:
        named = {"transformer": model.transformer, "transformer_2": model.transformer_2, "vae": model.vae,
                 "text_encoder": model.encoder, "image_encoder": model.image_encoder}
        return {name: Part(m) for name, m in named.items() if m is not None}

    def activations(self, model: WanParts, job: VideoJob, dtype: torch.dtype) -> dict[str, int]:
        """Rough peaks of working memory per part: one transformer pass over every latent token (CFG runs
        as two passes); the VAE decode, which goes frame by frame, so its peak follows the frame size alone
        (measured in bf16 on an H200: 4.7 GiB over the weights at 480x832, 10.7 GiB at 720x1280, for 11 or
        21 latent frames alike; ~20% more here for the allocator's other live tensors); the encoders small."""
        cfg, vcfg = model.transformer.cfg, model.vae.cfg
        elem = torch.finfo(dtype).bits // 8
        lat_frames = (job.frames - 1) // vcfg.time_scale + 1
        tokens = lat_frames * (job.height // vcfg.scale // cfg.patch_size[1]) * (job.width // vcfg.scale // cfg.patch_size[2])
        transformer = tokens * (cfg.ffn_dim + 6 * cfg.dim) * elem
        vae = job.width * job.height * (vcfg.decoder_base_dim or vcfg.base_dim) * elem * 80
        text = 2 * TEXT_LEN * cfg.text_dim * elem * 8  # prompt and negative through umT5's widest layer
        image = 257 * (cfg.image_dim or 0) * elem * 16  # CLIP ViT-H over 257 tokens
        return {"transformer": transformer, "transformer_2": transformer, "vae": vae, "text_encoder": text,
                "image_encoder": image}

    def force(self, job: VideoJob, ctx: JobContext) -> dict[str, Policy]:
        """The `video_offload` setting: "stream" makes the big parts stream whatever the budget (tests and
        users on tight cards); anything else leaves the choice to the manager's plan."""
        if ctx.settings.get("video_offload", "auto") != "stream":
            return {}
        return dict.fromkeys(("transformer", "transformer_2", "text_encoder"), Policy.BLOCK_STREAM)

    def generate(self, run: Run) -> VideoResult:
        return _generate(run)


FAMILY = Wan()


@torch.inference_mode()
def run_video(job: VideoJob, ctx: JobContext) -> VideoResult:
    return run_diffusion(job, ctx, FAMILY)


def _generate(run: Run) -> VideoResult:
    job, ctx, parts, dtype, device, notes = run.job, run.ctx, run.model, run.dtype, run.device, run.notes
    net_cfg = parts.transformer.cfg
    scale, ts = parts.vae.cfg.scale, parts.vae.cfg.time_scale
    check_size(job.width, job.height, scale * net_cfg.patch_size[1])

    seed = job.seed
    lat_frames = (job.frames - 1) // ts + 1
    shape = (1, net_cfg.out_channels, lat_frames, job.height // scale, job.width // scale)

    ctx.cancel.check()
    ctx.progress(0, 1, "encoding")
    use_cfg = job.cfg != 1.0
    text = encode_prompts(run, [job.prompt, job.negative] if use_cfg else [job.prompt])
    cond, uncond = text[:1], (text[1:] if use_cfg else None)

    # -- image conditioning ----------------------------------------------------------------
    extra = None  # channels appended to the input (I2V)
    first = None  # TI2V: the first latent frame, kept fixed
    image_context = None  # Wan 2.1 I2V: CLIP features of the init image, attended beside the prompt
    if job.image:
        if net_cfg.image_dim is not None:
            image_context = encode_image_context(run, job.image)
        if net_cfg.in_channels == net_cfg.out_channels + parts.vae.cfg.z_dim + ts:
            with run.use("vae"):
                extra = image_condition(parts, job, lat_frames, device, dtype)
        elif net_cfg.in_channels == net_cfg.out_channels and net_cfg.vae == "wan2.2":
            image = init_frame(job.image, job.width, job.height).to(device, dtype)[:, :, None]
            with run.use("vae"):
                first = parts.vae.normalize(parts.vae.encode(image)[0]).float()  # (1, C, 1, h, w)
        else:
            raise UserError("unsupported", "This is a text-to-video Wan model: it cannot start from an image. Clear "
                            "the init image, or pick an image-to-video model (Wan 2.1 I2V 14B, Wan 2.2 I2V "
                            "A14B or TI2V 5B).")
    elif net_cfg.in_channels != net_cfg.out_channels:
        raise UserError("bad_input", "This is an image-to-video Wan model: give it an init image, or pick a "
                        "text-to-video model.")

    # -- sampling ---------------------------------------------------------------------------
    run.timings.mark("encode", device)  # prompt and init image
    sigmas = wan_flow_sigmas(job.steps, job.shift)
    eps = noise(shape, seed, device)
    tokens_per_frame = (shape[3] // net_cfg.patch_size[1]) * (shape[4] // net_cfg.patch_size[2])

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t_int = math.floor(sigma * 1000.0)
        low = parts.transformer_2 is not None and t_int < parts.boundary
        net, name = (parts.transformer_2, "transformer_2") if low else (parts.transformer, "transformer")
        if first is not None:
            # TI2V: the first frame's tokens are clean (t = 0), the rest at t
            t = torch.full((1, lat_frames * tokens_per_frame), float(t_int), device=device)
            t[:, :tokens_per_frame] = 0
        else:
            t = torch.full((1,), float(t_int), device=device)
        x_in = x.to(dtype) if extra is None else torch.cat([x.to(dtype), extra], dim=1)
        with run.use(name):  # the expert about to run; the manager evicts the other one if both do not fit
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
    # latent->RGB factors exist for the 16-channel Wan 2.1 VAE and the 48-channel Wan 2.2 one
    preview_family = {16: "wan", 48: "wan22"}.get(shape[1])

    def callback(step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        last["denoised"], last["step"] = denoised, step
        ctx.progress(step, total, "sampling")
        if preview_family is not None:
            jpeg, w, h = rgb_to_jpeg(latent_to_rgb(denoised, preview_family, frame=lat_frames // 2), max_side=512)
            ctx.preview(jpeg, "image/jpeg", w, h)

    sampler = get_sampler(job.sampler)
    x = eps if first is None else torch.cat([first, eps[:, :, 1:]], dim=2)
    partial = False
    try:
        latent = sampler(denoiser, x, sigmas.to(device), callback=callback, cancel=ctx.cancel.check)
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
    run.timings.mark("sampling", device)
    ctx.progress(0, 1, "decoding")
    with run.use("vae"):
        frames = decode(parts, latent, ctx)  # (F, H, W, 3) uint8
    run.timings.mark("decode")
    path, sidecar, codec = save_video(job, ctx, parts, frames, notes, partial)
    run.timings.mark("save")
    timings = run.timings.stages()
    timings["per_step"] = round(timings["sampling"] / max(1, int(last.get("step", job.steps))), 4)
    ctx.progress(1, 1, "saved")
    return VideoResult(videos=[{"path": str(path), "sidecar": str(sidecar), "frames": int(frames.shape[0]),
                                "width": int(frames.shape[2]), "height": int(frames.shape[1]), "fps": job.fps,
                                "seed": seed, "codec": codec}],
                       path=str(path), seconds=run.timings.seconds(), timings=timings,
                       model=parts.files["transformer"], files=parts.files, notes=notes, partial=partial,
                       job={**asdict(job), "kind": "video"})


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


def video_target(job: VideoJob, ctx: JobContext) -> tuple[Path, str]:
    return output_target(job.out, ".mp4", ctx, Path.home() / "Videos" / "Studio")


def save_video(job: VideoJob, ctx: JobContext, parts: WanParts, frames: np.ndarray, notes: list[str],
               partial: bool) -> tuple[Path, Path, str]:
    from studio.media.video import unique_video_path, write_mp4, write_sidecar

    folder, stem = video_target(job, ctx)
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

