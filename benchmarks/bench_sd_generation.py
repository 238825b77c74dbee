"""Full Stable Diffusion generations, ours vs diffusers in the same run on the same random weights.

    python benchmarks/bench_sd_generation.py               # everything below (about 6 min on an H100)
    python benchmarks/bench_sd_generation.py --only sd15    # SD1.5 512², 30 steps: ours vs StableDiffusionPipeline
    python benchmarks/bench_sd_generation.py --only sdxl    # SDXL 1024², 30 steps: ours vs StableDiffusionXLPipeline
    python benchmarks/bench_sd_generation.py --only budgets # SDXL 1024² under 24/8/6/4 GiB: ours vs diffusers offload
    python benchmarks/bench_sd_generation.py --tiny         # the same end to end on the CPU with toy models (~10 s)

A generation is text encoding + 30 Euler steps with CFG 7 + VAE decode, bf16, one image. The diffusers
components are built from configs with random weights (real sizes), then written as ONE single-file
checkpoint in the original LDM layout with Studio's converters; Studio's own pipeline
(`studio.engine.pipelines.diffusion.sd.run_image`) loads that file, so both sides run the same tensors.
Both get the same initial noise latent (Studio's seeded draw) and the same sigmas (Studio's "normal"
schedule, handed to diffusers' EulerDiscreteScheduler as custom sigmas), so the two images should
agree up to bf16 rounding: each `generation` row reports their mean abs pixel difference (0-255).
Each side is warmed up once (3 steps; for ours that first call also loads the file) before the timed
30-step call. `--tiny` runs fp32 on the CPU, where the two images agree to within 1/255.

Budgets: `torch.cuda.set_per_process_memory_fraction` caps the allocator at the budget; Studio gets
the same budget through `DeviceProfile.vram_budget` and places the model itself; diffusers runs with
`enable_model_cpu_offload()` at each budget and `enable_sequential_cpu_offload()` at
`--sequential-budgets` (its VRAM need does not depend on the budget; ~40 s a run, so two by default).
A run that fails (OOM included) is printed with its error and the script goes on.

Expected time on one H100 (estimated from bench_image.py's step times; not run on a GPU yet): ~1 min
building and writing the two checkpoints (~9 GB under --workdir, default $TMPDIR), ~1 min of resident
generations, ~1 min of Studio/diffusers model-offload budget runs, ~1.5 min of diffusers sequential
offload: 5-6 min in all. Prints one JSON line per measurement (see bench_image.py), with `t`, the
seconds since start, so a run cut short still shows where the time went.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"
NEGATIVE = "blurry, low quality"  # not empty: SDXL diffusers would zero an empty negative, Studio encodes it
SEED = 1234
CFG = 7.0
GiB = 1 << 30
T0 = time.perf_counter()


def emit(**row) -> None:
    row.setdefault("date", time.strftime("%Y-%m-%d"))
    row.setdefault("t", round(time.perf_counter() - T0, 1))  # seconds since start: where a long run spends it
    row.setdefault("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    print(json.dumps(row), flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device: str) -> float:
    return round(torch.cuda.max_memory_allocated() / GiB, 2) if device == "cuda" else 0.0


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cap_memory(device: str, gib: float | None) -> None:
    """Cap the caching allocator at `gib` (None: no cap) so an over-budget allocation raises OOM."""
    if device != "cuda":
        return
    free_memory(device)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GiB / total))


# ------------------------------------------------------------------------------------- configs


def configs(family: str, tiny: bool) -> dict:
    """diffusers constructor kwargs for each component, at real or toy sizes."""
    if family == "sd15":
        if tiny:
            unet = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
        else:
            unet = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # diffusers defaults = SD1.5
        clips = [clip_config(tiny, "l")]
        scaling = 0.18215
    else:
        if tiny:
            pooled = 64
            unet = dict(sample_size=8, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=128,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=1,
                        attention_head_dim=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=pooled + 6 * 256)
        else:
            from bench_image import unet_configs

            unet = unet_configs(tiny=False)["sdxl"][0]
        clips = [clip_config(tiny, "l"), clip_config(tiny, "g")]
        scaling = 0.13025
    blocks = (32, 32, 32, 32) if tiny else (128, 256, 512, 512)  # 4 levels: a real f8 VAE even when tiny
    vae = dict(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1 if tiny else 2, latent_channels=4,
               scaling_factor=scaling, sample_size=64 if tiny else (512 if family == "sd15" else 1024))
    return {"unet": unet, "clips": clips, "vae": vae}


def clip_config(tiny: bool, which: str) -> dict:
    """CLIP-L (OpenAI, quick_gelu) or OpenCLIP-G (gelu, 1280 projection). Toy towers are 64 wide: Studio's
    loader reads the activation from the width (768 -> quick_gelu, else gelu), so they use gelu."""
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407 if which == "l" else 0)
    if tiny:
        return dict(common, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                    hidden_act="gelu", projection_dim=64 if which == "g" else 512)
    if which == "l":
        return dict(common, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    hidden_act="quick_gelu", projection_dim=768)
    return dict(common, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280)


# ------------------------------------------------------------------------------------- weights


def build_components(family: str, tiny: bool, device: str, dtype: torch.dtype) -> dict:
    """Random-weight diffusers / transformers modules, built directly on `device` (fast init on a GPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = configs(family, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"]).to(dtype).eval()
        vae = AutoencoderKL(**cfg["vae"]).to(dtype).eval()
        encoders = []
        for i, ccfg in enumerate(cfg["clips"]):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**ccfg)).to(dtype).eval())
    return {"unet": unet, "vae": vae, "encoders": encoders, "unet_cfg": cfg["unet"]}


def hf_clip_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 drops `text_model.` from CLIPTextModel keys; released checkpoints have it."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}


def vae_to_ldm(sd: dict[str, torch.Tensor], up_levels: int) -> dict[str, torch.Tensor]:
    from studio.models.vae import to_ldm_vae

    return to_ldm_vae(sd, up_levels)

def write_checkpoint(parts: dict, family: str, path: Path) -> float:
    """One single-file LDM checkpoint from the diffusers modules' tensors; returns GiB written."""
    from safetensors.torch import save_file

    from studio.models.clip import PREFIXES, to_openclip
    from studio.models.unet_convert import to_ldm

    def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}

    levels = len(parts["unet"].config.block_out_channels)
    attention = ["CrossAttn" in t for t in parts["unet"].config.down_block_types]
    layers = parts["unet"].config.layers_per_block
    sd = to_ldm(cpu(parts["unet"].state_dict()), levels, layers, attention)
    sd.update({"first_stage_model." + k: v.contiguous() for k, v in
               vae_to_ldm(cpu(parts["vae"].state_dict()), len(parts["vae"].config.block_out_channels)).items()})
    clip_l = hf_clip_names(cpu(parts["encoders"][0].state_dict()))
    clip_l.pop("text_model.embeddings.position_ids", None)
    prefix_l = PREFIXES["sd1"] if family == "sd15" else PREFIXES["sdxl_l"]
    sd.update({prefix_l + k: v for k, v in clip_l.items()})
    if family == "sdxl":
        clip_g = hf_clip_names(cpu(parts["encoders"][1].state_dict()))
        sd.update(to_openclip(clip_g, prefix=PREFIXES["sdxl_g"]))
    save_file(sd, str(path))
    return round(sum(v.numel() * v.element_size() for v in sd.values()) / GiB, 2)


def tokenizers(folder: Path, count: int, tiny: bool) -> list:
    """transformers CLIPTokenizers from Studio's bundled CLIP vocabulary (no hub access): CLIP-L pads with
    the end token, OpenCLIP-G (SDXL's second) with "!" (id 0), as the released tokenizers do. Studio tells
    the two apart by width (768 = CLIP-L), so the 64-wide toy towers both pad with "!"."""
    from transformers import CLIPTokenizer

    from studio.models.clip_tokenizer import bundled_vocab

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bundled_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    files = (str(folder / "vocab.json"), str(folder / "merges.txt"))
    toks = [CLIPTokenizer(*files, model_max_length=77, **({"pad_token": "!"} if tiny else {}))]
    if count == 2:
        toks.append(CLIPTokenizer(*files, model_max_length=77, pad_token="!"))
    return toks


# ------------------------------------------------------------------------------------- the two pipelines


def make_pipe(family: str, parts: dict, toks: list):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    # SD/SDXL's scheduler config; "linspace" makes init_noise_sigma = sigma_max, as in Studio (x = noise * sigma_0)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="linspace", steps_offset=1)
    if family == "sd15":
        return StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["encoders"][0], tokenizer=toks[0],
                                       unet=parts["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["encoders"][0],
                                     text_encoder_2=parts["encoders"][1], tokenizer=toks[0], tokenizer_2=toks[1],
                                     unet=parts["unet"], scheduler=scheduler)


def studio_sigmas(steps: int) -> list[float]:
    from studio.engine import samplers as S

    return S.get_sigmas("normal", S.DiscreteSchedule.from_betas(), steps).tolist()  # (steps + 1,) ending in 0


def studio_noise(side: int) -> torch.Tensor:
    """The initial latent Studio draws for SEED (image.py: CPU generator, (1, 4, h, w))."""
    return torch.randn((1, 4, side // 8, side // 8), generator=torch.Generator().manual_seed(SEED))


def run_diffusers(pipe, side: int, steps: int, device: str, dtype: torch.dtype) -> dict:
    """One generation; -> seconds, per-step ms, peak GiB, the image (H, W, 3) uint8."""
    import numpy as np

    stamps: list[float] = []

    def on_step(pipe_, i, t, kwargs):
        sync(device)
        stamps.append(time.perf_counter())
        return {}

    reset_peak(device)
    start = time.perf_counter()
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=side, width=side, sigmas=studio_sigmas(steps),
               guidance_scale=CFG, latents=studio_noise(side).to(device, dtype), output_type="np",
               callback_on_step_end=on_step)
    sync(device)
    seconds = time.perf_counter() - start
    image = np.clip(np.round(out.images[0] * 255), 0, 255).astype(np.uint8)  # (H, W, 3)
    return {"seconds": round(seconds, 3), "per_step_ms": per_step_ms(stamps), "peak_gib": peak_gib(device),
            "image": image}


def run_ours(ckpt: Path, side: int, steps: int, device: str, cache, memory, out_dir: Path) -> dict:
    """One generation through Studio's pipeline, in-process, on the shared model cache."""
    import numpy as np
    from PIL import Image

    from studio.engine.context import JobContext
    from studio.engine.pipelines.diffusion.sd import run_image
    from studio.protocol import ImageJob

    stamps: list[float] = []

    def on_progress(step: int, total: int, stage: str) -> None:
        if stage == "sampling":
            sync(device)
            stamps.append(time.perf_counter())

    job = ImageJob(model=str(ckpt), prompt=PROMPT, negative=NEGATIVE, width=side, height=side, steps=steps, cfg=CFG,
                   sampler="euler", schedule="normal", seed=SEED, previews=False, out=str(out_dir / "ours.png"))
    ctx = JobContext(job_id="bench", device=memory.profile, models=cache, memory=memory, on_progress=on_progress)
    reset_peak(device)
    start = time.perf_counter()
    result = run_image(job, ctx)
    sync(device)
    seconds = time.perf_counter() - start
    path = Path(result["images"][0]["path"])
    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB")).copy()  # (H, W, 3) uint8
    path.unlink()
    policies = {e["key"].rsplit("|", 1)[-1]: e["policy"] for e in memory.status()["models"]}
    notes = [re.sub(r"sd:[^|]*\|", "", n) for n in result["notes"]]  # part names without the long cache key
    return {"seconds": round(seconds, 3), "per_step_ms": per_step_ms(stamps), "peak_gib": peak_gib(device),
            "image": image, "notes": notes, "policies": policies}


def per_step_ms(stamps: list[float]) -> float | None:
    """Mean time between step ends (the first step's start is not observable from a callback)."""
    if len(stamps) < 2:
        return None
    return round((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000, 2)


def pixel_diff(a, b) -> dict:
    """Mean and max |a - b| over (H, W, 3) uint8 images, and b's spread: a diff means little on a flat image."""
    d = abs(a.astype("float32") - b.astype("float32"))
    return {"mean_abs_pixel_diff": round(float(d.mean()), 3), "max_abs_pixel_diff": float(d.max()),
            "pixel_std": round(float(b.astype("float32").std()), 2)}


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "image"}


def measure(bench: str, fn, device: str, **labels) -> dict | None:
    """Run one measurement; a failure (an OOM above all) becomes a JSON row with the error, not an exit."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (any failure is a result to report)
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        emit(bench=bench, **labels, error=f"{type(exc).__name__}: {exc}"[:500], oom=oom,
             trace=traceback.format_exc(limit=3)[-800:])
        return None
    finally:
        free_memory(device)


# ------------------------------------------------------------------------------------- benchmarks


def memory_manager(device: str, budget_gib: float | None):
    from studio.engine.device import probe
    from studio.engine.memory import MemoryManager

    budget = None if budget_gib is None else int(budget_gib * GiB)
    profile = probe(device, vram_budget=budget or 0)  # the engine's way; on the CPU probe drops it, hence both
    return MemoryManager(profile, budget_bytes=budget)


def bench_generation(family: str, args, device: str, dtype: torch.dtype, work: Path) -> dict | None:
    """Resident, no budget: ours vs diffusers on one checkpoint. Returns what the budget runs reuse."""
    from studio.engine.context import ModelCache

    side = 64 if args.tiny else (512 if family == "sd15" else 1024)
    steps = args.steps
    start = time.perf_counter()
    parts = build_components(family, args.tiny, device, dtype)
    ckpt = work / f"{family}.safetensors"
    size = write_checkpoint(parts, family, ckpt)
    emit(bench="checkpoint", model=family, gib=size, build_and_write_s=round(time.perf_counter() - start, 1))
    pipe = make_pipe(family, parts, tokenizers(work / "tokenizer", len(parts["encoders"]), args.tiny))
    pipe.set_progress_bar_config(disable=True)
    labels = dict(model=family, pixels=side, steps=steps)

    def diffusers_run() -> dict:
        run_diffusers(pipe, side, min(3, steps), device, dtype)  # warm-up: kernels, cuBLAS handles
        return run_diffusers(pipe, side, steps, device, dtype)

    ref = measure("generation_diffusers", diffusers_run, device, **labels)
    pipe.to("cpu")  # off the device, so the peak measured for ours is ours alone
    free_memory(device)

    cache, mem = ModelCache(), memory_manager(device, None)

    def ours_run() -> dict:
        first = time.perf_counter()
        run_ours(ckpt, side, min(3, steps), device, cache, mem, work)  # loads the file: reported, then warm
        first_s = round(time.perf_counter() - first, 3)
        return {**run_ours(ckpt, side, steps, device, cache, mem, work), "load_and_warmup_s": first_s}

    ours = measure("generation_ours", ours_run, device, **labels)
    mem.unload()
    if ours is not None and ref is not None:
        emit(bench="generation", **labels, dtype=str(dtype).removeprefix("torch."), sampler="euler", cfg=CFG,
             s_per_image_ours=ours["seconds"], s_per_image_diffusers=ref["seconds"],
             ratio=round(ref["seconds"] / ours["seconds"], 3), step_ms_ours=ours["per_step_ms"],
             step_ms_diffusers=ref["per_step_ms"], peak_gib_ours=ours["peak_gib"], peak_gib_diffusers=ref["peak_gib"],
             load_and_warmup_s_ours=ours["load_and_warmup_s"], **pixel_diff(ours["image"], ref["image"]),
             note="ours keeps the latent in fp32 between steps, diffusers in the model dtype")
    elif ours is not None:
        emit(bench="generation_ours", **labels, **public(ours))
    elif ref is not None:
        emit(bench="generation_diffusers", **labels, **public(ref))
    return {"ckpt": ckpt, "pipe": pipe, "cache": cache, "side": side,
            "resident_image": ours["image"] if ours else None, "resident_s": ours["seconds"] if ours else None}


def bench_budgets(state: dict, args, device: str, dtype: torch.dtype, work: Path) -> None:
    """SDXL under VRAM budgets: Studio's automatic placement vs diffusers' two offload modes."""
    ckpt, pipe, cache, side, steps = state["ckpt"], state["pipe"], state["cache"], state["side"], args.steps
    budgets = args.budgets if not args.tiny else args.tiny_budgets_mib
    unit = "gib" if not args.tiny else "mib"
    scale = 1 if not args.tiny else 1 / 1024  # tiny budgets are MiB: the toy model is ~40 MB
    for b in budgets:
        gib = b * scale
        labels = {"model": "sdxl", "pixels": side, "steps": steps, f"budget_{unit}": b}
        cap_memory(device, gib)
        mem = memory_manager(device, gib)

        def ours_run(mem=mem) -> dict:
            run_ours(ckpt, side, min(3, steps), device, cache, mem, work)  # places the weights once
            return run_ours(ckpt, side, steps, device, cache, mem, work)

        ours = measure("budget_ours", ours_run, device, **labels)
        mem.unload()
        if ours is not None:
            row = public(ours)
            if state["resident_image"] is not None:
                row["vs_resident"] = pixel_diff(ours["image"], state["resident_image"])
                row["x_resident_time"] = round(ours["seconds"] / state["resident_s"], 3)
            emit(bench="budget_ours", **labels, **row)
    if device != "cuda" or args.tiny:
        emit(bench="budget_diffusers", skipped="diffusers' cpu offload needs a CUDA device")
        cap_memory(device, None)
        return
    for mode in ("model", "sequential"):
        cap_memory(device, None)

        def offload(mode=mode) -> bool:
            pipe.remove_all_hooks()
            pipe.to("cpu")
            free_memory(device)
            getattr(pipe, f"enable_{mode}_cpu_offload")(device=device)  # needs accelerate
            return True

        if not measure("budget_diffusers", offload, device, model="sdxl", offload=mode):
            continue
        for b in args.budgets if mode == "model" else args.sequential_budgets:
            labels = {"model": "sdxl", "pixels": side, "steps": steps, "budget_gib": b, "offload": mode}
            cap_memory(device, b)

            def diffusers_run() -> dict:
                run_diffusers(pipe, side, 2, device, dtype)
                return run_diffusers(pipe, side, steps, device, dtype)

            ref = measure("budget_diffusers", diffusers_run, device, **labels)
            if ref is not None:
                row = public(ref)
                if state["resident_image"] is not None:
                    row["vs_ours_resident"] = pixel_diff(ref["image"], state["resident_image"])
                emit(bench="budget_diffusers", **labels, **row)
    cap_memory(device, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["sd15", "sdxl", "budgets"], help="one part (budgets includes building SDXL)")
    ap.add_argument("--tiny", action="store_true", help="toy models on the CPU: checks the script end to end")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 30; 3 with --tiny)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[24, 8, 6, 4], help="GiB")
    ap.add_argument("--sequential-budgets", type=float, nargs="+", default=[24, 4],
                    help="GiB budgets for diffusers' sequential offload (~40 s a run)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (~9 GB; default $TMPDIR)")
    ap.add_argument("--tiny-budgets-mib", type=float, nargs="+", default=[512, 100, 24])
    args = ap.parse_args()
    args.steps = args.steps or (3 if args.tiny else 30)
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU check")
    torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(tempfile.mkdtemp(prefix="bench_sd_", dir=args.workdir))
    # Studio's library and settings live under STUDIO_HOME: keep the user's own untouched
    os.environ["STUDIO_HOME"] = str(work / "home")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_image, when imported from elsewhere
    try:
        families = {"sd15": ["sd15"], "sdxl": ["sdxl"], "budgets": ["sdxl"], None: ["sd15", "sdxl"]}[args.only]
        for family in families:
            state = measure("setup", lambda family=family: bench_generation(family, args, device, dtype, work),
                            device, model=family)
            if family == "sdxl" and args.only != "sdxl" and state is not None:
                measure("setup", lambda state=state: bench_budgets(state, args, device, dtype, work), device,
                        model=family, part="budgets")
                cap_memory(device, None)  # also after a failure half-way through the budgets
            if state is not None:
                state["ckpt"].unlink()  # several GB of disk
            del state
            free_memory(device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
