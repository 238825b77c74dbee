"""Stable Diffusion speed and memory: ours vs diffusers in the same run, same random weights.

    python benchmarks/bench_image.py unet            # SD1.5 512² and SDXL 1024² UNet step, CFG batch 2
    python benchmarks/bench_image.py unet --compile  # ... and both torch.compile'd
    python benchmarks/bench_image.py vae             # SDXL VAE decode at 2048²: untiled vs tiled
    python benchmarks/bench_image.py budgets         # SDXL UNet steps under VRAM budgets of 24/8/6/4 GiB
    python benchmarks/bench_image.py unet --tiny     # CPU smoke run of the script

Needs torch, diffusers and studio. Random weights: time and memory only; outputs are compared to each
other so a fast wrong kernel cannot pass. Prints one JSON line per measurement.
"""

# ruff: noqa: B023  (each lambda is timed inside the iteration that made it)
from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, device: str, n: int = 10, warmup: int = 3) -> tuple[float, float, object]:
    """(ms per call, peak GiB above the start, last output)."""
    with torch.inference_mode():
        for _ in range(warmup):
            out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(n):
            out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / n * 1000
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else 0.0
    return ms, peak, out


def emit(**row) -> None:
    row.setdefault("date", time.strftime("%Y-%m-%d"))
    row.setdefault("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    print(json.dumps(row), flush=True)


def unet_configs(tiny: bool) -> dict:
    if tiny:
        return {"sd15": (dict(sample_size=8, block_out_channels=(32, 64), down_block_types=(
            "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, layers_per_block=1), 8, 32, None)}
    sdxl = dict(sample_size=128, block_out_channels=(320, 640, 1280), down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
        "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    return {"sd15": (dict(sample_size=64, cross_attention_dim=768), 64, 768, None), "sdxl": (sdxl, 128, 2048, 2816)}


def make_unet_pair(cfg: dict, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    from studio.models.unet import build_unet

    with torch.device(device):
        ref = UNet2DConditionModel(**cfg).to(dtype).eval()
    ours = build_unet(dict(ref.state_dict()), **({"num_heads": 8} if "use_linear_projection" not in cfg else {}))
    return ref, ours


def bench_unet(args, device: str, dtype: torch.dtype) -> None:
    from studio.models.unet import sdxl_add_embeddings

    for name, (cfg, hw, ctx_dim, adm) in unet_configs(args.tiny).items():
        if args.models and name not in args.models:
            continue
        ref, ours = make_unet_pair(cfg, device, dtype)
        x = torch.randn(2, 4, hw, hw, device=device, dtype=dtype)
        t = torch.tensor([500.0, 500.0], device=device)
        ctx = torch.randn(2, 77, ctx_dim, device=device, dtype=dtype)
        kw, y = {}, None
        if adm:
            pooled = torch.randn(2, 1280, device=device, dtype=dtype)
            ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device)
            kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
            extra = sdxl_add_embeddings((1024, 1024), (0, 0), (1024, 1024)).to(device, dtype)
            y = torch.cat([pooled, extra[None].expand(2, -1)], dim=1)
        runs = {"diffusers": lambda: ref(x, t, encoder_hidden_states=ctx, **kw).sample,
                "ours": lambda: ours(x, t, ctx, y)}
        ms_ref, peak_ref, want = timed(runs["diffusers"], device)
        ms, peak, got = timed(runs["ours"], device)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        emit(bench="unet_step", model=name, eager_ms_diffusers=round(ms_ref, 2), eager_ms_ours=round(ms, 2),
             ratio=round(ms_ref / ms, 3), peak_gib_diffusers=round(peak_ref, 2), peak_gib_ours=round(peak, 2),
             rel_err=err)
        if args.compile:
            cref, cours = torch.compile(ref), torch.compile(ours)
            ms_ref_c, _, _ = timed(lambda: cref(x, t, encoder_hidden_states=ctx, **kw).sample, device)
            ms_c, _, _ = timed(lambda: cours(x, t, ctx, y), device)
            emit(bench="unet_step_compiled", model=name, ms_diffusers=round(ms_ref_c, 2), ms_ours=round(ms_c, 2),
                 ratio=round(ms_ref_c / ms_c, 3))


def bench_vae(args, device: str, dtype: torch.dtype) -> None:
    from diffusers import AutoencoderKL as RefVAE

    from studio.models.vae import load_vae
    from studio.nn.tiling import tiled_decode

    side = 32 if args.tiny else 256  # latent side: 2048² pixels
    blocks = (32, 32) if args.tiny else (128, 256, 512, 512)
    with torch.device(device):
        ref = RefVAE(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                     up_block_types=("UpDecoderBlock2D",) * len(blocks), layers_per_block=2,
                     latent_channels=4).to(dtype).eval()
    ours = load_vae(dict(ref.state_dict()), family="sdxl")
    z = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    ms_ref, peak_ref, want = timed(lambda: ref.decode(z).sample, device, n=3, warmup=1)
    ms, peak, got = timed(lambda: ours.decode(z), device, n=3, warmup=1)
    emit(bench="vae_decode_untiled", pixels=side * 8, ms_diffusers=round(ms_ref, 1), ms_ours=round(ms, 1),
         peak_gib_diffusers=round(peak_ref, 2), peak_gib_ours=round(peak, 2),
         max_abs_diff=(got.float() - want.float()).abs().max().item())
    ref.enable_tiling()
    ms_ref_t, peak_ref_t, _ = timed(lambda: ref.decode(z).sample, device, n=3, warmup=1)
    tile = 8 if args.tiny else 96
    ms_t, peak_t, _ = timed(lambda: tiled_decode(ours.decode, z, tile_latent=tile, overlap=max(tile // 8, 4),
                                                 scale=ours.downscale),
                            device, n=3, warmup=1)
    emit(bench="vae_decode_tiled", pixels=side * 8, ms_diffusers=round(ms_ref_t, 1), ms_ours=round(ms_t, 1),
         peak_gib_diffusers=round(peak_ref_t, 2), peak_gib_ours=round(peak_t, 2),
         ours_tiled_over_untiled=round(ms_t / ms, 3), ours_peak_fraction=round(peak_t / max(peak, 1e-9), 3))


def bench_budgets(args, device: str, dtype: torch.dtype) -> None:
    """The SDXL UNet under VRAM budgets, placed by our MemoryManager, vs diffusers' offload hooks."""
    from studio.engine.device import probe
    from studio.engine.memory import MemoryManager

    cfg, hw, ctx_dim, adm = unet_configs(args.tiny)["sd15" if args.tiny else "sdxl"]
    ref, ours = make_unet_pair(cfg, "cpu", dtype)
    x = torch.randn(2, 4, hw, hw, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.randn(2, 77, ctx_dim, device=device, dtype=dtype)
    y = torch.randn(2, adm, device=device, dtype=dtype) if adm else None
    budgets = [1] if args.tiny else args.budgets
    for gib in budgets:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / torch.cuda.get_device_properties(0)
                                                           .total_memory))
        mem = MemoryManager(probe(device), budget_bytes=int(gib * 2**30))
        size = sum(p.numel() * p.element_size() for p in ours.parameters())
        act = 2 * hw * hw * 320 * 2 * 24
        plan = mem.estimate_job({"unet": size}, {"unet": act})
        mem.register("unet", ours, blocks=ours.stream_blocks())
        mem.apply_plan(plan)
        with mem.use("unet") as unet:
            ms, peak, _ = timed(lambda: unet(x, t, ctx, y), device, n=5, warmup=2)
        mem.unload("unet")
        emit(bench="unet_budget", budget_gib=gib, policy=plan.policy.value, ms=round(ms, 1), peak_gib=round(peak, 2),
             reason=plan.reason)
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
    if args.reference:
        # diffusers' enable_sequential_cpu_offload is accelerate's cpu_offload on each model: the same here
        from accelerate import cpu_offload

        cpu_offload(ref, execution_device=torch.device(device))
        kw = {}
        if adm:
            kw = {"added_cond_kwargs": {"text_embeds": y[:, :1280],
                                        "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device)}}
        ms, peak, _ = timed(lambda: ref(x, t, encoder_hidden_states=ctx, **kw).sample, device, n=3, warmup=1)
        emit(bench="unet_budget_reference", policy="diffusers sequential cpu offload", ms=round(ms, 1),
             peak_gib=round(peak, 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["unet", "vae", "budgets"])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: checks the script end to end")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--models", nargs="+", choices=["sd15", "sdxl"], default=None, help="unet: only these")
    ap.add_argument("--budgets", type=float, nargs="+", default=[24, 8, 6, 4])
    ap.add_argument("--reference", action="store_true", help="budgets: also time diffusers' sequential offload")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    {"unet": bench_unet, "vae": bench_vae, "budgets": bench_budgets}[args.what](args, device, dtype)


if __name__ == "__main__":
    main()
