"""A whole Wan 2.1 T2V 1.3B generation, ours (`run_video`) vs diffusers' WanPipeline, same random weights,
then ours under VRAM budgets.

Run from the repo root:  python benchmarks/bench_wan_generation.py           (CUDA, bf16, full size)
                         python benchmarks/bench_wan_generation.py --tiny    (CPU, toy configs: a smoke test)
                         python benchmarks/bench_wan_generation.py --14b     (adds Wan 14B under 24 GiB)

Full size: 832x480, 81 frames, 30 UniPC steps, CFG 5 (two passes per step in both), flow shift 3.0 (the
value diffusers documents and our pipeline suggests for 480p; Wan's own default is 5.0: it changes the
sigma schedule, not the work per step). Every measurement prints one JSON line (errors recorded in it);
each run is preceded by a 2-step warm-up generation of the same size, and only the second is timed.

Expected time on one H100 (estimated from bench_wan.py's ~0.6 s per pass on an H200; not yet run):
writing the random-weights folder ~1-2 min once (~14 GB: umT5-XXL is 11 GB in bf16; reused on later runs
from --folder), then ~1.5 min per measurement (load, warm-up, 60 transformer passes, the VAE decode of 81
frames): ~6-7 min for the default three (diffusers, ours, ours under 8 GiB). --14b writes a further 28 GB
and runs --steps-14b steps (default 3) of ours under 24 GiB with the transformer streamed: a few more
minutes; per-step time is reported so 30 steps can be extrapolated. Under a 10-minute limit per command,
split it: `--runs diffusers` (writes the folder), then `--runs ours,ours_8gib`, then `--runs '' --14b`; the
folder (default /tmp/studio-wan-bench) is reused while the machine stays up.

Both sides run every part in bf16, the VAE included (diffusers' own example keeps its VAE in fp32). Ours
moves the 11 GB encoder to the device and back for each job (it lives in RAM between jobs): that is in
its encode_s. Peak VRAM is torch's max_memory_allocated (the CUDA context, ~0.5 GiB, is not in it).

Random weights: timing and memory only. Weights are drawn directly in bf16 (uniform +-1/sqrt(fan_in),
norms at 1, biases at 0) rather than through the models' constructors, so the 5.7B-parameter encoder
costs seconds, not minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

GiB = 1 << 30
WORDS = ["a", "red", "fox", "runs", "in", "snow", "through", "the", "forest", "at", "dawn", "blurry", "bad",
         "quality", "static", "worst", "low"]
PROMPT = "a red fox runs through the snow in the forest at dawn"
NEGATIVE = "blurry bad quality static worst low quality"

# Wan 2.1 T2V: the released configs (diffusers layout); head width 128 in every released Wan
NET_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                freq_dim=256)
NET_14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
               freq_dim=256)
NET_TINY = dict(num_attention_heads=1, attention_head_dim=128, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=16,
                rope_max_seq_len=64)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                relative_attention_num_buckets=32, relative_attention_max_distance=128)
UMT5_TINY = dict(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                 relative_attention_num_buckets=8)
VAE_TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GiB, 3) if device.type == "cuda" else None


# ---------------------------------------------------------------------------------- the random folder

def random_state_dict(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int,
                      skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Random CPU tensors for every parameter of a model built on the meta device: norm scales 1, biases 0,
    embeddings N(0, 1), everything else uniform +-1/sqrt(fan_in) (PyTorch's Linear scale, so activations
    stay finite through 24-40 layers in bf16)."""
    g = torch.Generator(device).manual_seed(seed)
    sd = {}
    for name, p in model.named_parameters():
        if name in skip:
            continue
        shape = tuple(p.shape)
        if len(shape) == 1:
            t = torch.ones(shape) if "norm" in name and name.endswith("weight") else torch.zeros(shape)
        elif "shared" in name or "embed_tokens" in name:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype).cpu()
        else:
            fan_in = max(1, p[0].numel())
            bound = fan_in ** -0.5
            t = (torch.rand(shape, generator=g, device=device, dtype=torch.float32).mul_(2 * bound).sub_(bound)
                 .to(dtype).cpu())
        sd[name] = t.to(dtype).contiguous()
    return sd


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json (ids far below umT5's 256384): its content does not matter for timing,
    only that both pipelines pad to the same 512 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))


def write_transformer(folder: Path, net: dict, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
                                      qk_norm="rms_norm_across_heads", eps=1e-6, **net)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save_file(random_state_dict(model, device, dtype, seed), str(folder / "diffusion_pytorch_model.safetensors"))


def write_text_encoder(folder: Path, t5: dict, device: torch.device, dtype: torch.dtype) -> None:
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.UMT5Config(feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
                                  **t5)
    cfg.architectures = ["UMT5EncoderModel"]
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    # embed_tokens is the shared table (tied): written once, as save_pretrained does
    sd = random_state_dict(model, device, dtype, 1, skip=("encoder.embed_tokens.weight",))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_vae(folder: Path, kwargs: dict, device: torch.device, dtype: torch.dtype) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    with torch.device(device):  # 127M parameters: its own init is quick on the device
        vae = AutoencoderKLWan(**kwargs)
    vae.to(dtype).save_pretrained(folder)


def build_folder(root: Path, net: dict, t5: dict, vae: dict, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, share_from: Path | None = None) -> Path:
    """A diffusers-layout Wan folder (transformer/, vae/, text_encoder/, tokenizer/, model_index.json) of
    random weights; reused when a finished one is already there. `share_from` links the VAE, encoder and
    tokenizer of another such folder instead of writing them again."""
    done = root / ".complete"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    write_transformer(root / "transformer", net, device, dtype, seed)
    for name in ("vae", "text_encoder", "tokenizer"):
        if share_from is not None and not (root / name).exists():
            (root / name).symlink_to((share_from / name).resolve(), target_is_directory=True)
    if share_from is None:
        write_vae(root / "vae", vae, device, dtype)
        write_text_encoder(root / "text_encoder", t5, device, dtype)
        write_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    done.write_text("ok")
    return root


# ---------------------------------------------------------------------------------- the measurements

def run_diffusers(folder: Path, a, device: torch.device, dtype: torch.dtype) -> dict:
    """WanPipeline, everything resident on the device (its default), timed per stage by wrapping its
    encode_prompt and vae.decode."""
    import transformers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer" / "tokenizer.json"),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=transformers.UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype),
        transformer=WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=dtype),
        vae=AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=dtype),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=a.shift, solver_order=2, final_sigmas_type="zero"))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sync(device)
    load_s = time.perf_counter() - t0

    marks: dict[str, float] = {}
    encode, vae_decode = pipe.encode_prompt, pipe.vae.decode

    def timed_encode(*args, **kw):
        sync(device)
        start = time.perf_counter()
        out = encode(*args, **kw)
        sync(device)
        marks["encode"] = marks.get("encode", 0.0) + time.perf_counter() - start
        marks["encode_end"] = time.perf_counter()
        return out

    def timed_decode(*args, **kw):
        sync(device)
        marks["decode_start"] = start = time.perf_counter()
        out = vae_decode(*args, **kw)
        sync(device)
        marks["decode"] = time.perf_counter() - start
        return out

    pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode

    def generate(steps: int):
        marks.clear()
        sync(device)
        start = time.perf_counter()
        frames = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=a.height, width=a.width, num_frames=a.frames,
                      num_inference_steps=steps, guidance_scale=a.cfg, output_type="np",
                      generator=torch.Generator().manual_seed(a.seed)).frames
        sync(device)
        return frames, time.perf_counter() - start

    with torch.inference_mode():
        if not a.no_warmup:
            generate(2)
        free_stats(device)
        frames, total = generate(a.steps)
    sampling = marks["decode_start"] - marks["encode_end"]
    result = {"load_s": round(load_s, 2), "total_s": round(total, 2), "encode_s": round(marks["encode"], 3),
              "sampling_s": round(sampling, 2), "per_step_ms": round(sampling / a.steps * 1000, 1),
              "decode_s": round(marks["decode"], 2), "peak_vram_gib": peak_gib(device),
              "frames_shape": list(frames.shape)}
    return result  # the pipeline goes with this frame; measure() then collects and empties the cache


def free_stats(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def run_ours(folder: Path, a, device: torch.device, budget_gib: float = 0.0, steps: int | None = None) -> dict:
    """`run_video` as the engine runs it: the budget goes in through the DeviceProfile (probe's vram_budget,
    what `studio-engine --vram-budget` does), and on CUDA it is also enforced on the allocator so the peak
    cannot quietly exceed it. On the CPU (--tiny) a budget forces block streaming, the path it selects."""
    from studio.engine.context import JobContext, ModelCache
    from studio.engine.device import probe
    from studio.engine.pipelines.diffusion.wan import run_video
    from studio.protocol import VideoJob

    steps = steps or a.steps
    budget = int(budget_gib * GiB)
    profile = probe("cpu" if device.type == "cpu" else str(device), vram_budget=budget)
    settings = {"outputs": a.out}
    if device.type == "cpu" and budget:
        settings["video_offload"] = "stream"
    stages: list[str] = []
    ctx = JobContext("bench", profile, settings=settings, models=ModelCache(),
                     on_progress=lambda s, t, st: stages.append(st))
    if device.type == "cuda" and budget:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(device)
                                                       .total_memory))

    def job(n: int) -> VideoJob:
        return VideoJob(model=str(folder), prompt=PROMPT, negative=NEGATIVE, width=a.width, height=a.height,
                        frames=a.frames, fps=16.0, steps=n, cfg=a.cfg, shift=a.shift, sampler="unipc", seed=a.seed,
                        out=str(Path(a.out) / "bench.mp4"))

    try:
        load_s = None
        if not a.no_warmup:
            load_s = run_video(job(2), ctx)["timings"]["load"]  # loads into ctx.models, kept for the timed run
        free_stats(device)
        r = run_video(job(steps), ctx)
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    t = r["timings"]
    return {"load_s": t["load"] if load_s is None else load_s,
            "total_s": round(r["seconds"] - t["load"], 2),  # the load is 0 after the warm-up (cached models)
            "encode_s": t["encode"], "sampling_s": t["sampling"], "per_step_ms": round(t["per_step"] * 1000, 1),
            "decode_s": t["decode"], "save_s": t["save"], "peak_vram_gib": peak_gib(device),
            "frames": r["videos"][0]["frames"], "notes": r["notes"]}


def measure(name: str, fn, device: torch.device, **info) -> dict:
    free(device)
    record = {"bench": "wan_generation", "run": name, **info}
    try:
        record.update(fn())
    except Exception as exc:  # a failed run is a result too: record it and go on to the next
        record["error"] = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        record["traceback"] = traceback.format_exc(limit=6)
    free(device)
    emit(record)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, toy configs, 32x32, 5 frames, 3 steps")
    p.add_argument("--14b", dest="big", action="store_true", help="also Wan 14B, ours under 24 GiB (writes 28 GB)")
    p.add_argument("--folder", default="", help="where the random Wan folders go (reused when complete)")
    p.add_argument("--runs", default="diffusers,ours,ours_8gib", help="comma list of diffusers, ours, ours_8gib")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--steps-14b", type=int, default=3)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-warmup", action="store_true", help="time the first generation (includes warm-up costs)")
    a = p.parse_args(argv)
    if a.tiny:
        a.width, a.height, a.frames, a.steps = 32, 32, 5, a.steps or 3
    else:
        a.width, a.height, a.frames, a.steps = 832, 480, 81, a.steps or 30
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("No CUDA device: run with --tiny for the CPU smoke test.")
    device = torch.device("cpu" if a.tiny else "cuda")
    dtype = torch.float32 if a.tiny else torch.bfloat16
    work = Path(a.folder or (tempfile.mkdtemp(prefix="wan-bench-") if a.tiny else
                             Path(tempfile.gettempdir()) / "studio-wan-bench"))
    a.out = str(work / "outputs")
    net = NET_TINY if a.tiny else NET_1_3B
    t5, vae = (UMT5_TINY, VAE_TINY) if a.tiny else (UMT5_XXL, {})

    start = time.perf_counter()
    setup = {"bench": "wan_generation", "run": "setup", "device": torch.cuda.get_device_name(device)
             if device.type == "cuda" else "cpu", "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
             "date": time.strftime("%Y-%m-%d"), "width": a.width, "height": a.height, "frames": a.frames,
             "steps": a.steps, "cfg": a.cfg, "shift": a.shift, "sampler": "unipc", "folder": str(work)}
    try:
        folder = build_folder(work / ("Wan-tiny-random" if a.tiny else "Wan2.1-T2V-1.3B-random"), net, t5, vae,
                              device, dtype)
        setup["write_s"] = round(time.perf_counter() - start, 1)
        setup["folder_gb"] = round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9, 3)
    except Exception as exc:
        setup["error"] = f"{type(exc).__name__}: {exc}"
        setup["traceback"] = traceback.format_exc(limit=6)
        emit(setup)
        sys.exit(1)
    emit(setup)

    info = dict(model="tiny" if a.tiny else "wan2.1-t2v-1.3b")
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    done: dict[str, dict] = {}
    if "diffusers" in runs:
        done["diffusers"] = measure("diffusers", lambda: run_diffusers(folder, a, device, dtype), device,
                                    impl="diffusers", **info)
    if "ours" in runs:
        done["ours"] = measure("ours", lambda: run_ours(folder, a, device), device, impl="ours", budget_gib=None,
                               **info)
    if "ours_8gib" in runs:
        done["ours_8gib"] = measure("ours_8gib", lambda: run_ours(folder, a, device, budget_gib=8.0), device,
                                    impl="ours", budget_gib=8.0, **info)
    if a.big:
        big_root = work / ("Wan-tiny-random-14b" if a.tiny else "Wan2.1-T2V-14B-random")
        big_net = NET_TINY if a.tiny else NET_14B
        done["ours_14b_24gib"] = measure("ours_14b_24gib", lambda: run_ours(
            build_folder(big_root, big_net, t5, vae, device, dtype, seed=3, share_from=folder), a, device,
            budget_gib=24.0, steps=a.steps_14b), device, impl="ours", budget_gib=24.0,
            model="tiny" if a.tiny else "wan2.1-t2v-14b", steps=a.steps_14b)
    emit(summary(done, time.perf_counter() - start))
    if a.tiny and not a.folder:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if any("error" in r for r in done.values()):
        sys.exit(1)


def summary(done: dict[str, dict], wall: float) -> dict:
    """Ours against diffusers (ratios above 1: ours faster or smaller), and which runs failed."""
    record = {"bench": "wan_generation", "run": "summary", "wall_s": round(wall, 1),
              "failed": sorted(name for name, r in done.items() if "error" in r)}
    ref, ours = done.get("diffusers", {}), done.get("ours", {})
    for key in ("total_s", "per_step_ms", "encode_s", "decode_s", "peak_vram_gib"):
        if ref.get(key) and ours.get(key):
            record[f"diffusers_over_ours_{key}"] = round(ref[key] / ours[key], 3)
    for name, limit in (("ours_8gib", 8.0), ("ours_14b_24gib", 24.0)):
        peak = done.get(name, {}).get("peak_vram_gib")
        if peak is not None:
            record[f"{name}_within_budget"] = peak <= limit
    return record


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
