"""Wan 1.3B transformer pass (480x832, 81 frames) and Wan 2.1 VAE decode: ours vs diffusers, same weights.

Run from the repo root:  python benchmarks/bench_wan.py            (CUDA, full size)
                         python benchmarks/bench_wan.py --tiny     (CPU smoke test)
Random weights: timing and peak memory only (outputs are compared to each other, not judged).
"""

import argparse
import time

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from studio.models.wan import load_wan_transformer
from studio.models.wan_vae import load_wan_vae

p = argparse.ArgumentParser()
p.add_argument("--tiny", action="store_true")
p.add_argument("--compile", action="store_true", help="also time ours with every block torch.compile'd")
p.add_argument("--vae", action="store_true", help="also time the VAE decode of the 81-frame latent")
a = p.parse_args()
dev = "cpu" if a.tiny else "cuda"
dt = torch.float32 if a.tiny else torch.bfloat16
if a.tiny:
    cfg = dict(num_attention_heads=2, attention_head_dim=32, text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2)
    lat, text = (1, 16, 3, 8, 8), (1, 16, 64)
else:  # Wan 2.1 T2V 1.3B; 480x832x81 -> latent 21 x 60 x 104 -> 32760 tokens
    cfg = dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)
    lat, text = (1, 16, 21, 60, 104), (1, 512, 4096)
ref = WanTransformer3DModel(in_channels=16, out_channels=16, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                            eps=1e-6, **cfg).to(dev, dt).eval()
ours = load_wan_transformer(dict(ref.state_dict()), head_dim=cfg["attention_head_dim"])  # shares the tensors
g = torch.Generator(dev).manual_seed(0)
x = torch.randn(lat, device=dev, dtype=dt, generator=g)
t = torch.tensor([500.0], device=dev)
ctx = torch.randn(text, device=dev, dtype=dt, generator=g)


def timed(fn, n=5):
    with torch.no_grad():
        for _ in range(2):
            out = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / n * 1000
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    return out, ms, peak


want, ms_ref, peak_ref = timed(lambda: ref(x, t, ctx, return_dict=False)[0])
got, ms_ours, peak_ours = timed(lambda: ours(x, t, ctx))
print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} {time.strftime('%Y-%m-%d')}")
print(f"transformer pass: diffusers {ms_ref:.1f} ms peak {peak_ref:.2f} GiB | ours {ms_ours:.1f} ms peak "
      f"{peak_ours:.2f} GiB | mean |diff| {(got.float() - want.float()).abs().mean():.4f} "
      f"(output mean |x| {want.float().abs().mean():.3f})")
if a.compile:
    for b in ours.blocks:
        b.compile()
    got_c, ms_c, peak_c = timed(lambda: ours(x, t, ctx))
    print(f"ours, blocks compiled: {ms_c:.1f} ms peak {peak_c:.2f} GiB | mean |diff| to eager "
          f"{(got_c.float() - got.float()).abs().mean():.4f}")
if a.vae:
    del ref, ours
    vref = AutoencoderKLWan(base_dim=16 if a.tiny else 96).to(dev, dt).eval()
    vae = load_wan_vae(dict(vref.state_dict()))
    z = torch.randn(lat, device=dev, dtype=dt, generator=g)
    v_want, ms_vr, pk_vr = timed(lambda: vref.decode(z).sample, n=1)
    v_got, ms_v, pk_v = timed(lambda: vae.decode(z, chunk=1), n=1)
    print(f"VAE decode {tuple(v_got.shape)}: diffusers {ms_vr:.0f} ms peak {pk_vr:.2f} GiB | ours chunk=1 "
          f"{ms_v:.0f} ms peak {pk_v:.2f} GiB | mean |diff| {(v_got.float() - v_want.float()).abs().mean():.4f}")
