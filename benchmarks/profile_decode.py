"""Where a decode step's GPU time goes: per-kernel time of one compiled 8B decode step.

    python benchmarks/profile_decode.py            # Llama-3-8B shape, random bf16 weights, CUDA
    python benchmarks/profile_decode.py --tiny     # CPU smoke run of the script

Runs the compiled decode step without CUDA graphs (the kernels are the same; only launch gaps
differ) under torch.profiler and prints one JSON line per kernel family, sorted by time, with the
microseconds it costs per token, and a summary: kernel time per token against the weight bytes
over the measured copy bandwidth. The gap between the two is what stands between a step and the
bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_llm import copy_bandwidth, random_model

from studio.engine.pipelines.decoding import compile_decode_step
from studio.models.llm import LLMConfig
from studio.models.llm_build import build_llm, weight_bytes


def replay(model, T: int, device: torch.device, bucket: int, n: int = 200) -> None:
    """tok/s of the reduce-overhead step (one graph) with and without a host round trip per token."""
    step = compile_decode_step(model.max_seq_len, **({"mode": "reduce-overhead"} if device.type == "cuda" else {}))
    n = min(n, bucket - T - 1)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor([T], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    res = {"replay": True, "bucket": bucket, "tokens": n}
    with torch.inference_mode():
        for _ in range(3):
            step(model, tok, pos, bucket)
        for mode in ("host_sync_per_token", "token_stays_on_device"):
            pos.fill_(T)
            sync()
            t = time.perf_counter()
            for _ in range(n):
                logits = step(model, tok, pos, bucket)
                if mode == "host_sync_per_token":
                    tok.fill_(int(logits[0, -1].argmax().item()))  # what streaming does today
                    pos.add_(1)
                else:
                    tok.copy_(logits[0, -1].argmax().view(1, 1))
                    pos.add_(1)
            sync()
            res[mode + "_tok_s"] = round(n / (time.perf_counter() - t), 2)
    print(json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--bucket", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--replay", action="store_true",
                    help="also time the CUDA-graph step with a host sync per token (as streaming does) "
                         "against a loop that keeps the next token on the device")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = LLMConfig.from_name("tiny-llama" if args.tiny else "llama-3-8b")
    base = random_model(cfg, dtype, device)
    model = build_llm(cfg, dict(base.state_dict()), dtype=dtype, device=device, fuse=True)
    del base
    model.setup_caches(1, min(8192, cfg.max_position_embeddings))
    T = 128 if not args.tiny else 16
    bucket = min(args.bucket, model.max_seq_len)
    with torch.inference_mode():
        model(torch.zeros(1, T, dtype=torch.long, device=device), torch.arange(T, device=device), kv_len=T)
        step = compile_decode_step(model.max_seq_len)  # default mode: no CUDA graphs, same kernels
        tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        pos = torch.tensor([T], device=device)
        for _ in range(3):
            step(model, tok, pos, bucket)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                step(model, tok, pos, bucket)
            if device.type == "cuda":
                torch.cuda.synchronize()
    if args.replay:
        replay(model, T, device, min(2 * bucket, model.max_seq_len))
    rows = []
    for e in prof.key_averages():
        t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t > 0 and (device.type != "cuda" or e.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((t / args.steps, e.count / args.steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    for us, calls, name in rows[:25]:
        print(json.dumps({"kernel": name[:120], "us_per_token": round(us, 1), "calls_per_token": calls,
                          "share": round(us / total, 3)}))
    bw = copy_bandwidth(device, (64 << 20) if args.tiny else (2 << 30))
    floor_us = weight_bytes(model) / bw * 1e6
    print(json.dumps({"summary": True, "bucket": bucket, "kernel_us_per_token": round(total, 1),
                      "bandwidth_floor_us": round(floor_us, 1), "kernels_per_token": sum(r[1] for r in rows),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
