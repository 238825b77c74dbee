"""Flux.1 dev / schnell / Fill / Kontext: the Flux family module of the diffusion skeleton.

Text-to-image; img2img (init image, strength); inpainting (init image and mask: Fill models take the masked
image and mask as extra input channels, other models keep the original outside the mask); Kontext editing
(a diffusers Kontext folder: the init image becomes reference tokens); LoRAs (studio.models.flux_lora).

Flux ships as four parts: the transformer (studio.models.flux), the 16-channel VAE, CLIP-L (its
pooled feature modulates every block) and T5-XXL (its hidden states are the text tokens). `model`
is a diffusers Flux folder (transformer/, vae/, text_encoder/ = CLIP-L, text_encoder_2/ = T5,
tokenizer/, tokenizer_2/), an all-in-one file (ComfyUI's fp8 checkpoints carry the encoders and VAE
under `text_encoders.` and `vae.`), or a transformer file whose parts are found by their headers
next to it (its folder, ComfyUI's models/vae and models/text_encoders or models/clip), named in the
job, or in the library. Whatever is missing is named with the file to install.

Flow matching as in FluxPipeline: x = (1 - sigma) x0 + sigma noise; the transformer predicts the
velocity noise - x0 from the 2x2-packed latent tokens; sigmas run evenly from 1 to 1/steps and, for
dev, are shifted by mu from the image's token count (Flux's resolution-dependent shift). Dev is
guidance-distilled: the job's CFG value is fed to the guidance embedding, one pass per step, no
negative prompt. Schnell takes neither guidance nor shift and wants ~4 steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from studio.engine.context import JobContext, UserError
from studio.engine.flow_samplers import FLOW_SAMPLERS, get_flow_sampler
from studio.engine.pipelines.diffusion.files import find_companion, read_state_dict
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

FAMILY_ID = "flux"
MAX_SIDE = 4096
T5_HINT = ("t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (ComfyUI's Flux text encoder, in "
           "models/text_encoders) or the text_encoder_2/ folder of a diffusers Flux repository")
CLIP_HINT = "clip_l.safetensors (in ComfyUI's models/text_encoders or models/clip)"
VAE_HINT = "ae.safetensors (Black Forest Labs' Flux VAE, in models/vae)"
TOKENIZER_HINT = ("the T5 tokenizer.json (the tokenizer_2/ folder of a diffusers Flux repository, or "
                  "google/t5-v1_1-xxl)")
# detection's ids: CLIP-L by its width (768), then any CLIP text tower (its width is checked against the
# transformer's pooled input when it loads)
CLIP_FAMILIES = ("clip-l", "clip")
# FlowMatchEulerDiscreteScheduler's settings in the FLUX.1-dev repository (schnell: no dynamic shift)
SHIFT = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


@dataclass
class FluxModel:
    transformer: torch.nn.Module  # studio.models.flux.FluxTransformer
    vae: torch.nn.Module  # studio.models.vae.AutoencoderKL (16 channels)
    clip: torch.nn.Module  # studio.models.clip.ClipTextModel (CLIP-L)
    t5: torch.nn.Module  # studio.models.t5.T5Encoder
    clip_tokenizer: object
    t5_tokenizer: object
    files: dict[str, str]
    path: str
    scheduler: dict = field(default_factory=dict)  # use_dynamic_shifting, shift, and the SHIFT keys
    kontext: bool = False  # Flux.1 Kontext: the init image is a reference the model edits, not a start
    notes: list[str] = field(default_factory=list)
    key: str = ""
    family: str = FAMILY_ID
    encoded: dict = field(default_factory=dict)  # (prompt, T5 length) -> its conditioning, on the CPU
    loras: tuple = ()  # ((path, weight), ...) patched into the weights now
    original: dict = field(default_factory=dict)  # weights the LoRAs replaced, to restore them exactly

    @property
    def variant(self) -> str:
        return "dev" if self.transformer.cfg.guidance_embed else "schnell"


# ---------------------------------------------------------------------------------- schedule

def flux_mu(image_seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's shift exponent: a line through (base_seq, base_shift) and (max_seq, max_shift)."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return image_seq_len * m + (base_shift - m * base_seq)


def flux_sigmas(steps: int, image_seq_len: int, dynamic: bool, shift: float = 1.0, **shift_settings) -> torch.Tensor:
    """(steps + 1,) float32, descending from 1, ending in 0: linspace(1, 1/steps) shifted by
    exp(mu) / (exp(mu) + 1/s - 1) when dynamic (dev), by shift * s / (1 + (shift - 1) s) otherwise."""
    s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if dynamic:
        mu = flux_mu(image_seq_len, *(shift_settings.get(k, v) for k, v in SHIFT.items()))
        s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    else:
        s = shift * s / (1 + (shift - 1) * s)
    return torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))


def image_inputs(run: Run, lat_h: int, lat_w: int,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """-> (init, extra, keep, reference) as packed tokens: the init image's latent (img2img, inpainting); for
    Flux Fill the masked image's latent and the mask folded into patches (the transformer's extra input
    channels, as FluxFillPipeline builds them); for other models with a mask, where to repaint (1) at latent
    resolution; for Kontext the init image's latent as reference tokens (at the output size)."""
    from studio.models.flux import pack

    job, model, device = run.job, run.model, run.device
    cfg, vae = model.transformer.cfg, model.vae
    fill = cfg.in_channels > cfg.out_channels
    if fill and not (job.init_image and job.mask):
        raise UserError("bad_input", "This is a Flux Fill model (inpainting and outpainting): give it an init image "
                        "and a mask (white = repaint), or pick a Flux dev / schnell model for text-to-image.")
    if not job.init_image:
        return None, None, None, None
    dtype = next(vae.parameters()).dtype
    pixels = load_image(job.init_image, job.width, job.height, fit="stretch", value_range="-1..1").to(device, dtype)
    mask = None
    if job.mask:
        mask = load_image(job.mask, job.width, job.height, fit="stretch", value_range="0..1", mode="L")
        mask = (mask >= 0.5).to(device, dtype)  # (1, 1, H, W), binarized as diffusers' mask processor does
    with run.use("vae"):
        init = pack(encode_image(model, pixels))
        masked = pack(encode_image(model, pixels * (1 - mask))) if fill else None
    if fill:
        d = vae.downscale
        folded = mask[:, 0].view(1, lat_h, d, lat_w, d).permute(0, 2, 4, 1, 3).reshape(1, d * d, lat_h, lat_w)
        extra = torch.cat([masked, pack(folded.float())], dim=-1)
        if extra.shape[-1] + cfg.out_channels != cfg.in_channels:
            raise UserError("bad_model", f"This Flux Fill transformer takes {cfg.in_channels} input channels but its "
                            f"VAE gives {extra.shape[-1] + cfg.out_channels}: install {VAE_HINT}.")
        return init, extra, None, None
    if model.kontext:
        if mask is not None:
            raise UserError("unsupported", "Flux Kontext edits the whole image from the prompt: clear the mask.")
        return None, None, None, init
    if mask is None:
        return init, None, None, None
    small = torch.nn.functional.interpolate(mask.float(), size=(lat_h, lat_w), mode="nearest")
    return init, None, pack(small.expand(-1, vae.cfg.latent_channels, -1, -1).contiguous()), None


def img2img_sigmas(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The last `strength` of a `steps`-step schedule (at least one step), as diffusers' flow img2img
    pipelines cut it: the image is noised to the first sigma kept."""
    start = int(max(steps - min(steps * strength, steps), 0))
    return sigmas[min(start, steps - 1):]


# ---------------------------------------------------------------------------------- finding the parts

def _detect(path: Path):
    from studio.library.detect import detect
    from studio.library.headers import HeaderError

    try:
        return detect(path)
    except (HeaderError, OSError):
        return None


def find_part(model_file: Path, family: str, folders: tuple[str, ...]) -> Path | None:
    """A file detected as `family` next to the model (its folder, ComfyUI's sibling folders), else in the library."""
    return find_companion(model_file, folders, lambda p: getattr(_detect(p), "family", None) == family,
                          lambda e: e.effective_family == family)


def find_t5_tokenizer(*folders: Path):
    from studio.models.t5 import T5Tokenizer

    for folder in folders:
        for d in (folder, folder / "tokenizer_2", folder / "tokenizer", folder / "t5-v1_1-xxl",
                  folder / "google" / "t5-v1_1-xxl"):
            if (d / "tokenizer.json").is_file():
                return T5Tokenizer(d / "tokenizer.json")
    raise UserError("model_not_found", f"No T5 tokenizer found: put {TOKENIZER_HINT} at "
                    f"{folders[0] / 'tokenizer_2' / 'tokenizer.json'}.")


def locate(model: Path, job: ImageJob, inside: dict) -> dict[str, Path | None]:
    """-> where each part comes from: a path, or None when it is inside the model file (`inside`)."""
    if model.is_dir():
        if not (model / "transformer").is_dir():
            raise UserError("bad_model", f"{model.name} is a folder without transformer/: pick a diffusers Flux folder "
                            "(black-forest-labs/FLUX.1-dev and alike) or a Flux transformer file.")
        parts = {"transformer": model / "transformer", "vae": model / "vae", "clip": model / "text_encoder",
                 "t5": model / "text_encoder_2"}
        for name, folder, hint in (("vae", "vae", VAE_HINT), ("clip", "text_encoder", CLIP_HINT),
                                   ("t5", "text_encoder_2", T5_HINT)):
            if not parts[name].is_dir():
                raise UserError("model_not_found", f"{model.name} has no {folder}/ folder: put {hint} there.")
        return parts
    parts: dict[str, Path | None] = {"transformer": model, "vae": None, "clip": None, "t5": None}
    if job.vae:
        parts["vae"] = resolve_path(job.vae, "VAE")
    for spec in job.text_encoders:
        p = resolve_path(spec, "text encoder")
        det = _detect(p)
        family = getattr(det, "family", "")
        if family == "t5":
            parts["t5"] = p
        elif family in CLIP_FAMILIES:
            parts["clip"] = p
        else:
            raise UserError("bad_input", f"{p.name} is not a T5-XXL or CLIP-L text encoder"
                            f"{f' (it is {family})' if family else ''}: Flux takes {CLIP_HINT} and {T5_HINT}.")
    folders = {"vae": ("vae",), "clip": ("text_encoders", "clip", "text_encoder"),
               "t5": ("text_encoders", "clip", "text_encoder_2")}
    families = {"vae": "vae-16ch", "clip": "clip-l", "t5": "t5"}
    hints = {"vae": VAE_HINT, "clip": CLIP_HINT, "t5": T5_HINT}
    for name in ("vae", "clip", "t5"):
        if parts[name] is None and name not in inside:
            parts[name] = find_part(model, families[name], folders[name])
            if parts[name] is None and name == "clip":  # a CLIP text tower of another width: checked on load
                parts[name] = find_part(model, CLIP_FAMILIES[1], folders[name])
            if parts[name] is None:
                raise UserError("model_not_found", f"No {'VAE' if name == 'vae' else name.upper()} found for "
                                f"{model.name}: install {hints[name]} in the library or next to the model file.")
    return parts


def split_all_in_one(sd: dict) -> dict[str, dict]:
    """The encoders and VAE an all-in-one checkpoint carries (ComfyUI's `text_encoders.clip_l.`,
    `text_encoders.t5xxl.`, `vae.`; older ones `cond_stage_model.` / `first_stage_model.`)."""
    from studio.models.diffusion_quant import dequantized

    found: dict[str, dict] = {}
    for name, prefixes in (("clip", ("text_encoders.clip_l.",)), ("t5", ("text_encoders.t5xxl.",)),
                           ("vae", ("vae.", "first_stage_model."))):
        for prefix in prefixes:
            part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if part:
                # T5 stays compact (its Linear layers keep fp8 / GGUF blocks); CLIP and the VAE are small
                found[name] = part if name == "t5" else dequantized(part, torch.bfloat16)
                break
    return found


# ---------------------------------------------------------------------------------- loading

def load_model(job: ImageJob, ctx: JobContext, dtype: torch.dtype) -> FluxModel:
    from studio.models.clip import build_clip
    from studio.models.clip_tokenizer import ClipTokenizer
    from studio.models.diffusers_config import clip_settings, read_config, vae_settings
    from studio.models.flux import load_flux_transformer
    from studio.models.t5 import load_t5_encoder
    from studio.models.vae import load_vae

    path = resolve_generator(job.model, "image")
    spec = f"{job.vae}:{','.join(job.text_encoders)}"
    key = f"flux:{path}:{spec}:{dtype}"
    cached = ctx.models.get(key)
    if cached is not None:
        return cached
    keep_one(ctx, "flux:")  # a second 12B transformer would double the memory for no gain
    ctx.progress(0, 4, "loading")
    raw = read_state_dict(path / "transformer" if path.is_dir() else path, compact=True)
    inside = {} if path.is_dir() else split_all_in_one(raw)
    parts = locate(path, job, inside)
    transformer = load_flux_transformer(raw, dtype=dtype, config=read_config(parts["transformer"]))
    del raw
    ctx.progress(1, 4, "loading")

    if parts["vae"] is not None:
        vae_sd, vae_cfg = read_state_dict(parts["vae"]), read_config(parts["vae"])
    else:
        vae_sd, vae_cfg = inside["vae"], None
    groups = vae_settings(vae_cfg).get("norm_num_groups", 32) if vae_cfg else 32
    vae = load_vae(vae_sd, family=FAMILY_ID, dtype=dtype, norm_num_groups=groups)
    if vae_cfg:  # a diffusers folder states its latent scaling; the family's is the fallback
        scaling = vae_settings(vae_cfg)
        vae.cfg = replace(vae.cfg, **{k: v for k, v in scaling.items() if k != "norm_num_groups"})
    if vae.cfg.latent_channels * 4 != transformer.cfg.out_channels:
        raise UserError("bad_model", f"The VAE has {vae.cfg.latent_channels} latent channels but the transformer "
                        f"makes {transformer.cfg.out_channels // 4}: install {VAE_HINT}.")
    ctx.progress(2, 4, "loading")

    clip_path = parts["clip"]
    clip_sd = read_state_dict(clip_path) if clip_path is not None else inside["clip"]
    clip_cfg = read_config(clip_path) if clip_path is not None else None
    try:
        clip = build_clip(clip_sd, dtype=dtype, **(clip_settings(clip_cfg) if clip_cfg else {}))
    except ValueError as exc:
        raise UserError("bad_model", f"The CLIP-L text encoder cannot be read ({exc}): install {CLIP_HINT}.") from None
    if clip.config.width != transformer.cfg.vec_dim:
        raise UserError("bad_model", f"The CLIP text encoder is {clip.config.width} wide but this Flux model takes "
                        f"{transformer.cfg.vec_dim} (CLIP-L): install {CLIP_HINT}.")
    tok_folder = path / "tokenizer" if path.is_dir() else None
    clip_tokenizer = ClipTokenizer.load(tok_folder)
    ctx.progress(3, 4, "loading")

    t5_path = parts["t5"]
    t5_sd = read_state_dict(t5_path, compact=True) if t5_path is not None else inside["t5"]
    t5 = load_t5_encoder(t5_sd, dtype=dtype, config=read_config(t5_path) if t5_path is not None else None)
    near = [path] if path.is_dir() else []
    if t5_path is not None:
        near.append(t5_path if t5_path.is_dir() else t5_path.parent)
    near.append(path.parent)
    t5_tokenizer = find_t5_tokenizer(*near)
    ctx.progress(4, 4, "loading")

    scheduler = read_config(path / "scheduler", "scheduler_config.json") if path.is_dir() else None
    files = {k: str(v) if v is not None else f"{path} (inside)" for k, v in parts.items()}
    # Kontext's transformer has dev's shapes: only a diffusers folder's model_index.json tells them apart
    index = read_config(path, "model_index.json") if path.is_dir() else None
    model = FluxModel(transformer, vae, clip, t5, clip_tokenizer, t5_tokenizer, files, str(path),
                      scheduler=dict(scheduler or {}), key=key,
                      kontext=(index or {}).get("_class_name") == "FluxKontextPipeline")
    from studio.models.diffusion_quant import compact_summary

    if summary := compact_summary(transformer):
        model.notes.append(f"transformer kept compact: {summary}")
    ctx.models.put(key, model, sum(part_bytes(p.module) for p in FAMILY.parts(model).values()), path=str(path))
    return model


# ---------------------------------------------------------------------------------- conditioning

def encode_prompt(model: FluxModel, text: str, device: torch.device, t5_len: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (T5 hidden states (1, t5_len, 4096), pooled CLIP-L (1, 768)), as FluxPipeline: T5 sees the padded
    ids without a mask (Flux was trained that way); CLIP pools its final-norm state at the first EOS."""
    ids, _ = model.t5_tokenizer([text], max_length=t5_len, clean=False)
    t5_out = model.t5(ids.to(device))
    clip_ids = torch.tensor([model.clip_tokenizer(text)], device=device)
    hidden, _ = model.clip(clip_ids, clip_skip=1, final_norm=True, pooled=False)
    pooled = hidden[torch.arange(1, device=device), model.clip.eos_index(clip_ids)]  # no projection
    return t5_out, pooled


ENCODED_KEPT = 8  # prompts whose conditioning stays cached with the model (a few MB each at full size)


def cached_encode(model, text: str, t5_len: int, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_prompt, remembered per prompt: a new seed or size does not wake the encoders (T5-XXL is 9 GB)."""
    key = (text, t5_len)
    if key not in model.encoded:
        with run.use("text_encoder", "text_encoder_2"):
            txt, pooled = encode_prompt(model, text, run.device, t5_len)
        while len(model.encoded) >= ENCODED_KEPT:
            model.encoded.pop(next(iter(model.encoded)))
        model.encoded[key] = (txt.cpu(), pooled.cpu())
    return tuple(t.to(run.device) for t in model.encoded[key])


# ---------------------------------------------------------------------------------- the family

def validate(job: ImageJob) -> list[str]:
    if not job.model:
        raise UserError("bad_input", "No image model chosen: pick a Flux.1 model file or diffusers folder.")
    for name, value in (("width", job.width), ("height", job.height)):
        if value < 16 or value > MAX_SIDE:
            raise UserError("bad_input", f"{name} {value} is out of range: pick 16 to {MAX_SIDE}.")
        if value % 16:
            raise UserError("bad_input", f"{name} {value} is not a multiple of 16 (Flux packs 2x2 latent cells): "
                            f"use {value // 16 * 16 or 16} or {value // 16 * 16 + 16}.")
    if not 1 <= job.steps <= 1000:
        raise UserError("bad_input", f"steps {job.steps} is out of range: pick 1 to 1000.")
    if not 1 <= job.batch_size <= 64 or not 1 <= job.batch_count <= 1000:
        raise UserError("bad_input", "batch size must be 1 to 64 and batch count 1 to 1000.")
    if job.sampler not in FLOW_SAMPLERS:
        raise UserError("bad_input", f"Flux samples with {', '.join(FLOW_SAMPLERS)}, not {job.sampler!r}.")
    if not math.isfinite(job.cfg) or not 0 <= job.cfg <= 100:
        raise UserError("bad_input", f"guidance {job.cfg} must be between 0 and 100.")
    if not 0.0 < job.strength <= 1.0:
        raise UserError("bad_input", f"strength {job.strength} must be above 0 and at most 1.")
    if job.mask and not job.init_image:
        raise UserError("bad_input", "A mask needs an image to paint on: set an init image for inpainting.")
    if job.quant:
        raise UserError("unsupported", f"quantization {job.quant!r} cannot be used with Flux yet: clear it (an fp8 "
                        "or GGUF Flux file keeps the transformer compact).")
    for lora in job.loras:
        if not isinstance(lora, dict) or not isinstance(lora.get("path"), str):
            raise UserError("bad_input", 'Each LoRA must be {"path": FILE, "weight": NUMBER}.')
    notes = []
    if job.negative.strip():
        notes.append("Flux does not use a negative prompt (dev is guidance-distilled): it was ignored.")
    return notes


class Flux:
    """Flux.1 dev / schnell for the diffusion skeleton."""

    advice = ("try a smaller image, an fp8 or GGUF Flux file, or a lower --vram-budget so the transformer "
              "streams from RAM")

    def validate(self, job: ImageJob, ctx: JobContext) -> tuple[ImageJob, list[str]]:
        return job, validate(job)

    def load(self, job: ImageJob, ctx: JobContext, dtype: torch.dtype, notes: list[str]) -> FluxModel:
        from studio.models.flux_lora import apply_flux_loras

        model = load_model(job, ctx, dtype)
        notes += model.notes
        loras = tuple((str(resolve_path(lo["path"], "LoRA")), float(lo.get("weight", 1.0))) for lo in job.loras)
        if loras != model.loras and ctx.memory is not None:
            ctx.memory.unload(model.key)  # LoRAs patch the CPU copy: take the parts out of the manager's hands
        notes += apply_flux_loras(model, loras, read_state_dict)
        return model

    def parts(self, model: FluxModel) -> dict[str, Part]:
        return {"transformer": Part(model.transformer, model.transformer.stream_blocks()), "vae": Part(model.vae),
                "text_encoder": Part(model.clip), "text_encoder_2": Part(model.t5)}

    def activations(self, model: FluxModel, job: ImageJob, dtype: torch.dtype) -> dict[str, int]:
        """Rough peaks: one transformer pass over image + text tokens (the MLP's width dominates), the
        VAE's last level at full size, T5 over its sequence."""
        cfg = model.transformer.cfg
        elem = torch.finfo(dtype).bits // 8
        tokens = (job.width // 16) * (job.height // 16) + t5_length(model)
        transformer = job.batch_size * tokens * (cfg.mlp_hidden + 6 * cfg.hidden) * elem
        vae = job.batch_size * job.width * job.height * 128 * elem * 9
        clip = 77 * model.clip.config.intermediate * elem * 8  # a few MLP-wide tensors over 77 tokens
        return {"transformer": transformer, "vae": vae, "text_encoder": clip,
                "text_encoder_2": t5_length(model) * model.t5.cfg.ffn_dim * elem * 4}

    def force(self, job: ImageJob, ctx: JobContext) -> dict:
        return {}

    def generate(self, run: Run) -> ImageResult:
        return _generate(run)


FAMILY = Flux()


@torch.inference_mode()
def run_image(job: ImageJob, ctx: JobContext) -> ImageResult:
    return run_diffusion(job, ctx, FAMILY)


def t5_length(model: FluxModel) -> int:
    return 512 if model.variant == "dev" else 256  # as BFL's reference sampling code


def _generate(run: Run) -> ImageResult:
    from studio.models.flux import image_ids, pack, unpack

    job, ctx, model, device = run.job, run.ctx, run.model, run.device
    down = model.vae.downscale
    lat_h, lat_w = job.height // down, job.width // down
    if lat_h % 2 or lat_w % 2:
        raise UserError("bad_input", f"This VAE needs width and height in multiples of {down * 2}.")

    ctx.progress(0, 1, "encoding")
    txt, pooled = cached_encode(model, job.prompt, t5_length(model), run)
    run.timings.mark("encode", device)
    net = model.transformer
    guided = net.cfg.guidance_embed
    txt_ids = torch.zeros(txt.shape[1], 3, device=device)
    img_ids = image_ids(lat_h, lat_w, device=device)
    seq_len = img_ids.shape[0]
    sched = model.scheduler
    dynamic = bool(sched.get("use_dynamic_shifting", guided))
    sigmas = flux_sigmas(job.steps, seq_len, dynamic, float(sched.get("shift", 1.0) if not dynamic else 1.0),
                         **{k: sched[k] for k in SHIFT if k in sched}).to(device)
    init, extra, keep, ref = image_inputs(run, lat_h, lat_w)
    if ref is not None:  # Kontext: the reference's tokens follow the image's, at position index 1
        ids_in = torch.cat([img_ids, image_ids(lat_h, lat_w, index=1, device=device)])
    else:
        ids_in = img_ids
    if init is not None:
        sigmas = img2img_sigmas(sigmas, job.steps, job.strength)
    if job.sampler != "euler":
        # multistep solvers work in log((1 - sigma) / sigma): keep the first point just inside sigma < 1 (Wan's
        # schedule does the same); Euler starts at exactly 1, as FluxPipeline does
        sigmas[0] = min(float(sigmas[0]), 1.0 - 1e-6)
    sampler = get_flow_sampler(job.sampler)

    out_dir, stem = image_target(job, ctx)
    images = []
    for b in range(job.batch_count):
        seeds = [(job.seed + b * job.batch_size + i) % 2**32 for i in range(job.batch_size)]
        eps = torch.cat([noise((1, model.vae.cfg.latent_channels, lat_h, lat_w), s, device) for s in seeds])
        n = eps.shape[0]
        guidance = torch.full((n,), float(job.cfg), device=device) if guided else None

        def denoiser(x: torch.Tensor, sigma: torch.Tensor, n=n, guidance=guidance) -> torch.Tensor:
            s = float(sigma.flatten()[0])
            x_in = x if extra is None else torch.cat([x, extra.expand(n, -1, -1).to(x)], dim=-1)
            if ref is not None:
                x_in = torch.cat([x_in, ref.expand(n, -1, -1).to(x)], dim=1)
            v = net(x_in, ids_in, txt.expand(n, -1, -1), txt_ids, torch.full((n,), s, device=device),
                    pooled.expand(n, -1), guidance)[:, :x.shape[1]].float()
            x0 = x - s * v
            # inpainting with a regular model: outside the mask the estimate is the original, so every step
            # lands on the original noised to its sigma
            return x0 if keep is None else x0 * keep + init * (1 - keep)

        def callback(step: int, total: int, x_now: torch.Tensor, denoised: torch.Tensor, b=b) -> None:
            ctx.progress(b * total + step, total * job.batch_count, "sampling")
            if job.previews:
                ctx.preview(preview_jpeg(unpack(denoised[:1].float(), lat_h, lat_w), FAMILY_ID), "image/jpeg",
                            job.width, job.height)

        x = pack(eps) if init is None else (1 - sigmas[0]) * init + sigmas[0] * pack(eps)
        with run.use("transformer"):
            latent = sampler(denoiser, x, sigmas, callback=callback, cancel=ctx.cancel.check)
        if keep is not None:
            latent = latent * keep + init * (1 - keep)
        run.timings.mark("sampling", device)
        ctx.progress(b, job.batch_count, "decoding")
        with run.use("vae"):
            pixels = decode(model, unpack(latent, lat_h, lat_w), ctx,
                            tiled=run.plan.vae_tiles or vae_needs_tiles(run.plan, run.names, run.mem))
        for i, image in enumerate(pixels):
            meta = {**asdict(job), "kind": "image", "seed": seeds[i], "family": FAMILY_ID,
                    "variant": model.variant, "prediction": "flow", "guidance": job.cfg if guided else None,
                    "model_name": Path(model.path).name, "model_hash": model_hash(model.path)}
            saved = save_png(to_pil(image), meta, out_dir, stem)
            images.append({"path": str(saved), "seed": seeds[i], "width": image.shape[-1], "height": image.shape[-2]})
        ctx.progress(len(images), job.batch_size * job.batch_count, "saved")
    return ImageResult(images=images, seconds=run.timings.seconds(), model=model.path, family=FAMILY_ID,
                       prediction="flow", notes=run.notes, job={**asdict(job), "kind": "image"})
