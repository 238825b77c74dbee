"""The fused CUDA decode step (studio/models/llm_decode.py) on an 8B model, against the bound and transformers.

    python benchmarks/bench_fused_decode.py            # GPU: Llama-3-8B architecture, random bf16 weights
    python benchmarks/bench_fused_decode.py --tiny     # CPU smoke run (Triton's interpreter, tiny config)

Sections, each printed as one JSON line (a failing section prints its error and the rest go on):
  check     the fused step's logits against the eager model's for a few steps, and 32 greedy tokens
  sweep     each product's kernel over launch shapes, against F.linear (cuBLAS) on the same matrix;
            the best shapes are used by the sections after it
  decode    tokens/s through generate_tokens as the chat pipeline decodes (CUDA graph; lookahead off/on)
  profile   per-kernel GPU time of one token without the graph (the gap to the graph's step is launch gaps)
  compiled  (--compiled) the torch.compile step the pipeline used before, bucketed
  hf        transformers eager and static-cache compiled generate, same weights
Bound: copy bandwidth measured here / weight bytes read per token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: kernels run on the CPU

import torch
import torch.nn.functional as F
from bench_llm import bench_compiled, bytes_per_token, copy_bandwidth, hf_reference, random_model, time_hf

from studio.engine.pipelines.chat import decode_step, generate_tokens
from studio.engine.sampling import greedy_on_device
from studio.models.llm import LLMConfig
from studio.models.llm_build import build_llm
from studio.models.llm_decode import FusedDecoder, MatvecConfig, _matvec_kernel, _qkv_rope_kernel, triton

CANDIDATES = [MatvecConfig(r, c, w) for r, c, w in
              [(2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (8, 512, 8), (16, 256, 4),
               (16, 512, 8), (32, 256, 8)]]


def emit(row: dict, out: list) -> None:
    out.append(row)
    print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):  # appended as it comes: a run cut short keeps what it measured
        with open(os.path.join(os.environ["OUT"], "fused-decode.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def section(name: str, out: list, fn, *a) -> object:
    t = time.perf_counter()
    try:
        return fn(*a)
    except Exception as exc:  # noqa: BLE001 - one broken section must not cost the run's other figures
        emit({"section": name, "error": f"{type(exc).__name__}: {exc}"[:400],
              "trace": traceback.format_exc()[-1500:]}, out)
    finally:
        print(f"# {name}: {time.perf_counter() - t:.1f} s", flush=True)
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(model, prompt: list[int], device: torch.device, out: list) -> None:
    dec = FusedDecoder(model, use_graph=False)
    T = len(prompt)
    diffs, agree = [], 0
    with torch.inference_mode():
        lg = model(torch.tensor([prompt], device=device), torch.arange(T, device=device), kv_len=T, last_only=True)
        tok = lg[0, -1].argmax().view(1, 1)
        for i in range(T, T + 6):
            pos = torch.tensor([i], device=device)
            ref = decode_step(model, tok, pos, i + 1)[0, -1].float()
            got = dec(model, tok, pos, i + 1)[0, -1]
            diffs.append((ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-6))
            agree += int(ref.argmax() == got.argmax())
            tok = ref.argmax().view(1, 1)
    n = 32 if device.type == "cuda" else 6
    eager = list(generate_tokens(model, prompt, n, greedy_on_device))
    fused = list(generate_tokens(model, prompt, n, greedy_on_device, step=FusedDecoder(model)
                                 if device.type == "cuda" else dec))
    same = next((i for i, (a, b) in enumerate(zip(eager, fused, strict=True)) if a != b), n)
    emit({"section": "check", "max_rel_logit_diff": round(max(diffs), 5), "argmax_agree": f"{agree}/6",
          "greedy_tokens_equal_prefix": f"{same}/{n}"}, out)


def time_fn(fn, device: torch.device, reps: int = 50) -> float:
    """Seconds per call (median of CUDA-event timings on the GPU)."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return triton.testing.do_bench(fn, warmup=5, rep=reps, return_mode="median") / 1e3


def sweep(dec: FusedDecoder, device: torch.device, out: list) -> dict:
    """Time each product's kernel over CANDIDATES; returns {(n, k, paired): best config}."""
    L = dec.layers[0]
    eps = float(dec.config.norm_eps)
    x = torch.randn(L.qkv_w.shape[1], device=device, dtype=dec.dtype)
    shapes = {"qkv_rope": (L.qkv_w, True), "o_proj": (L.o_w, False), "gate_up": (L.gate_up_w, True),
              "down": (L.down_w, False), "lm_head": (dec.model.lm_head.weight, False)}
    best: dict = {}
    cands = CANDIDATES if device.type == "cuda" else CANDIDATES[:2]
    for name, (w, paired) in shapes.items():
        n, k = (w.shape[0] // 2 if name == "gate_up" else w.shape[0]), w.shape[1]
        xin = torch.randn(k, device=device, dtype=dec.dtype)
        y = torch.zeros(n, device=device, dtype=torch.float32 if name == "lm_head" else dec.dtype)
        nbytes = w.numel() * w.element_size()
        ref_s = time_fn(lambda w=w, xin=xin: F.linear(xin.view(1, -1), w), device)
        timings = {}
        for cfg in cands:
            if name == "qkv_rope":
                bh = min(cfg.rows, dec.d // 2)
                if (dec.d // 2) % bh:
                    continue
                grid = ((dec.hq + 2 * dec.hkv) * (dec.d // 2 // bh),)

                def fn(cfg=cfg, grid=grid, bh=bh, w=w, k=k):
                    _qkv_rope_kernel[grid](w, x, L.norm1, w, dec.cos, dec.sin, dec.pos, dec.q, L.k_cache,
                                           L.v_cache, k, eps, dec.cache_len, HQ=dec.hq, HKV=dec.hkv, D=dec.d,
                                           BIAS=False, BH=bh, BK=cfg.chunk, num_warps=cfg.warps)
            else:
                gated = name == "gate_up"
                norm = name in ("gate_up", "lm_head")

                def fn(cfg=cfg, w=w, xin=xin, y=y, n=n, k=k, gated=gated, norm=norm):
                    _matvec_kernel[(triton.cdiv(n, cfg.rows),)](
                        w, xin, L.norm2 if norm else w, w, y, n, k, eps, NORM=norm, BIAS=False, RESID=False,
                        GATED=gated, BN=cfg.rows, BK=cfg.chunk, num_warps=cfg.warps)
            try:
                timings[cfg] = time_fn(fn, device)
            except Exception as exc:  # noqa: BLE001 - a launch shape the compiler rejects is skipped
                print(f"# {name} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        cfg, s = min(timings.items(), key=lambda kv: kv[1])
        best[(n, k, paired)] = cfg
        emit({"section": "sweep", "product": name, "n": n, "k": k, "mb": round(nbytes / 1e6, 1),
              "best": [cfg.rows, cfg.chunk, cfg.warps], "us": round(s * 1e6, 1), "gb_s": round(nbytes / s / 1e9),
              "cublas_us": round(ref_s * 1e6, 1), "cublas_gb_s": round(nbytes / ref_s / 1e9),
              "all_us": {f"{c.rows}x{c.chunk}w{c.warps}": round(t * 1e6, 1) for c, t in timings.items()}}, out)
    return best


def decode(model, prompt: list[int], new: int, device: torch.device, bound: float, configs: dict | None,
           label: str, out: list) -> None:
    dec = FusedDecoder(model, configs=configs, use_graph=device.type == "cuda")
    for lookahead in (False, True):
        stamps = []
        for rep in range(2):  # the first run captures the graph
            stamps = []
            sync(device)
            t0 = time.perf_counter()
            for _ in generate_tokens(model, prompt, new, greedy_on_device, step=dec, lookahead=lookahead):
                stamps.append(time.perf_counter())
            if rep == 0:
                capture_s = stamps[1] - stamps[0] if len(stamps) > 1 else 0.0
        tok_s = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        emit({"section": "decode", "configs": label, "lookahead": lookahead, "tok_s": round(tok_s, 2),
              "fraction_of_bound": round(tok_s / bound, 3), "prefill_s": round(stamps[0] - t0, 4),
              "first_call_s": round(capture_s, 2)}, out)
    if device.type == "cuda":  # the graph alone, no host work between tokens: what the GPU can do
        pos = torch.tensor([len(prompt)], device=device)
        tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        dec(model, tok, pos, 0)
        sync(device)
        n = 200
        t = time.perf_counter()
        for _ in range(n):
            dec.graph.replay()
        sync(device)
        s = (time.perf_counter() - t) / n
        emit({"section": "decode", "configs": label, "graph_replay_ms": round(s * 1e3, 3),
              "graph_tok_s": round(1 / s, 1), "graph_fraction_of_bound": round(1 / s / bound, 3)}, out)


def profile(model, prompt: list[int], device: torch.device, configs: dict | None, bw: float, out: list) -> None:
    dec = FusedDecoder(model, configs=configs, use_graph=False)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    steps = 10
    rows = {}
    for pos_at in (len(prompt), 2048, model.max_seq_len - 1):
        pos = torch.tensor([pos_at], device=device)
        with torch.inference_mode():
            for _ in range(2):
                dec(model, tok, pos, 0)
            sync(device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    dec(model, tok, pos, 0)
                sync(device)
        kernels = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
                kernels[e.key[:60]] = (round(e.self_device_time_total / steps, 1), e.count / steps)
        total = sum(v[0] for v in kernels.values())
        rows[pos_at] = total
        emit({"section": "profile", "pos": pos_at, "kernel_us_per_token": round(total, 1),
              "kernels_per_token": sum(v[1] for v in kernels.values()),
              "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1][0])[:10])}, out)
    emit({"section": "profile", "weight_floor_us": round(bytes_per_token(model) / bw * 1e6, 1)}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--cache", type=int, default=8192)
    ap.add_argument("--compiled", action="store_true", help="also the torch.compile step, bucketed")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.bfloat16
    cfg = LLMConfig.from_name("tiny-llama" if args.tiny else "llama-3-8b")
    prompt_len, new, cache = (8, 4, 64) if args.tiny else (args.prompt, args.new, args.cache)
    out: list = []
    torch.manual_seed(0)
    base = random_model(cfg, dtype, device)
    model = build_llm(cfg, dict(base.state_dict()), dtype=dtype, device=device, fuse=True)
    model.setup_caches(1, cache)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    bw = copy_bandwidth(device, (64 << 20) if args.tiny else (2 << 30))
    per_tok = bytes_per_token(model)
    bound = bw / per_tok
    emit({"section": "setup", "config": "tiny-llama" if args.tiny else "llama-3-8b", "cache": cache,
          "weight_gb_per_token": round(per_tok / 1e9, 3), "copy_gb_s": round(bw / 1e9, 1),
          "bound_tok_s": round(bound, 1), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "torch": torch.__version__, "triton": triton.__version__,
          "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}, out)
    if "check" not in skip:
        section("check", out, check, model, prompt, device, out)
    tuned = None
    if "sweep" not in skip:
        tuned = section("sweep", out, sweep, FusedDecoder(model, use_graph=False), device, out)
    if "decode" not in skip:
        section("decode", out, decode, model, prompt, new, device, bound, None, "default", out)
        if tuned:
            section("decode", out, decode, model, prompt, new, device, bound, tuned, "swept", out)
    if "profile" not in skip and device.type == "cuda":
        section("profile", out, profile, model, prompt, device, tuned, bw, out)
    if not args.no_hf and not args.tiny:
        hf = hf_reference(base, cfg, dtype, device)
        r = section("hf", out, time_hf, hf, prompt, new, device)
        if r:
            emit({"section": "hf", "hf_eager_tok_s": round(r, 2)}, out)
        r = section("hf", out, lambda: time_hf(hf, prompt, new, device, cache_implementation="static"))
        if r:
            emit({"section": "hf", "hf_static_compiled_tok_s": round(r, 2),
                  "fraction_of_bound": round(r / bound, 3)}, out)
        del hf
    if args.compiled and device.type == "cuda":
        res = section("compiled", out, bench_compiled, model, prompt, new, device, bound)
        if res:
            emit({"section": "compiled", **res}, out)


if __name__ == "__main__":
    main()
