"""The fused CUDA decode step (studio/models/llm_decode.py) on an 8B model, against the bound and transformers.

    python benchmarks/bench_fused_decode.py            # GPU: Llama-3-8B architecture, random bf16 weights
    python benchmarks/bench_fused_decode.py --tiny     # CPU smoke run (Triton's interpreter, tiny config)

Sections, each printed as one JSON line (a failing section prints its error and the rest go on):
  check     the fused step's logits against the eager model's for a few steps, and 32 greedy tokens
  sweep     each product's kernel over launch shapes, against F.linear (cuBLAS) on the same matrix,
            and the attention kernel over splits, key blocks and warps; the best are used in "swept"
  decode    tokens/s through generate_tokens as the chat pipeline decodes (CUDA graph; lookahead off/on)
  pipeline  run_chat itself, greedy and sampled, as a chat job runs it (CPU: eager, no fused step)
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

from studio.engine.pipelines.decoding import decode_step, generate_tokens
from studio.engine.sampling import greedy_on_device
from studio.models.llm import LLMConfig
from studio.models.llm_build import build_llm
from studio.models.llm_decode import FusedDecoder
from studio.nn.kernels.decode import MatvecConfig, default_config, matvec_kernel, qkv_rope_kernel, triton

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


def check(model, base, cfg, prompt: list[int], device: torch.device, out: list) -> None:
    """Logits of the eager bf16 model and of the fused step, each against the same weights in fp32."""
    ref = build_llm(cfg, {k: v.float() for k, v in base.state_dict().items()}, dtype=torch.float32, device=device,
                    fuse=True)
    T = len(prompt)
    ref.setup_caches(1, T + 16)
    dec = FusedDecoder(model, use_graph=False)
    errs: dict[str, list] = {"eager_bf16": [], "fused_bf16": []}
    agree = {"eager_bf16": 0, "fused_bf16": 0}
    steps = 6
    with torch.inference_mode():
        ids, at = torch.tensor([prompt], device=device), torch.arange(T, device=device)
        tok = ref(ids, at, kv_len=T, last_only=True)[0, -1].argmax().view(1, 1)
        model(ids, at, kv_len=T, last_only=True)
        for i in range(T, T + steps):
            pos = torch.tensor([i], device=device)
            want = decode_step(ref, tok, pos, i + 1)[0, -1]
            scale = want.abs().max().item()
            for name, got in (("eager_bf16", decode_step(model, tok, pos, i + 1)[0, -1].float()),
                              ("fused_bf16", dec(model, tok, pos, i + 1)[0, -1])):  # fused rewrites the slot
                errs[name].append((got - want).abs().max().item() / scale)
                agree[name] += int(got.argmax() == want.argmax())
            tok = want.argmax().view(1, 1)
    del ref
    emit({"section": "check", "vs": "fp32 eager, same weights, teacher-forced",
          **{f"{k}_max_rel_err": round(max(v), 5) for k, v in errs.items()},
          **{f"{k}_argmax_agree": f"{v}/{steps}" for k, v in agree.items()}}, out)


def graph_time(fn, device: torch.device, reps: int = 20) -> float:
    """Seconds of one call of fn (a sequence of launches) replayed inside a CUDA graph; wall time on CPU."""
    fn()
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    sync(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    stop.record()
    sync(device)
    return start.elapsed_time(stop) / 1e3 / reps


def sweep(dec: FusedDecoder, device: torch.device, out: list) -> dict:
    """Each product's kernel over CANDIDATES, run over every layer's matrix inside a CUDA graph (as the
    decode step runs them: no L2 reuse, no launch gaps), against F.linear (cuBLAS) the same way.
    Returns {(kind, n, k): best config}."""
    eps = float(dec.config.norm_eps)
    Ls = dec.layers
    head = dec.model.lm_head.weight
    products = {"qkv_rope": ("qkv", [L.qkv_w for L in Ls]), "o_proj": ("plain", [L.o_w for L in Ls]),
                "gate_up": ("gated", [L.gate_up_w for L in Ls]), "down": ("plain", [L.down_w for L in Ls]),
                "lm_head": ("plain", [head, head])}
    best: dict = {}
    cands = CANDIDATES if device.type == "cuda" else CANDIDATES[:2]
    for name, (kind, mats) in products.items():
        w0 = mats[0]
        n, k = (w0.shape[0] // 2 if kind == "gated" else w0.shape[0]), w0.shape[1]
        xin = torch.randn(k, device=device, dtype=dec.dtype)
        y = torch.zeros(n, device=device, dtype=torch.float32 if name == "lm_head" else dec.dtype)
        g = Ls[0].norm1
        nbytes = sum(w.numel() * w.element_size() for w in mats)
        ref_s = graph_time(lambda mats=mats, xin=xin: [F.linear(xin.view(1, -1), w) for w in mats], device)
        timings = {}
        for cfg in cands:
            if kind == "qkv":
                bh = min(cfg.rows, dec.d // 2)
                if (dec.d // 2) % bh:
                    continue

                def fn(cfg=cfg, bh=bh, mats=mats, k=k, xin=xin, g=g):
                    for w, L in zip(mats, Ls, strict=True):
                        qkv_rope_kernel[((dec.hq + 2 * dec.hkv) * (dec.d // 2 // bh),)](
                            w, xin, g, w, dec.cos, dec.sin, dec.pos, dec.q, L.k_cache, L.v_cache, dec.k_raw, k,
                            eps, dec.cache_len, HQ=dec.hq, HKV=dec.hkv, D=dec.d, BIAS=False, ROPE=True, BH=bh,
                            BK=cfg.chunk, num_warps=cfg.warps)
            else:
                norm = name in ("gate_up", "lm_head")

                def fn(cfg=cfg, mats=mats, xin=xin, y=y, n=n, k=k, norm=norm, gated=kind == "gated", g=g):
                    for w in mats:
                        matvec_kernel[(triton.cdiv(n, cfg.rows),)](
                            w, xin, g, w, y, n, k, eps, NORM=norm, BIAS=False, RESID=False, GATED=gated,
                            BN=cfg.rows, BK=cfg.chunk, num_warps=cfg.warps)
            try:
                timings[cfg] = graph_time(fn, device)
            except Exception as exc:  # noqa: BLE001 - a launch shape the compiler rejects is skipped
                print(f"# {name} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        cfg, s = min(timings.items(), key=lambda kv: kv[1])
        best[(kind, n, k)] = cfg
        per = len(mats)
        emit({"section": "sweep", "product": name, "n": n, "k": k, "mb": round(nbytes / per / 1e6, 1),
              "best": [cfg.rows, cfg.chunk, cfg.warps], "us": round(s / per * 1e6, 1), "gb_s": round(nbytes / s / 1e9),
              "cublas_us": round(ref_s / per * 1e6, 1), "cublas_gb_s": round(nbytes / ref_s / 1e9),
              "default": [default_config(kind, n, k).rows, default_config(kind, n, k).chunk,
                          default_config(kind, n, k).warps],
              "all_us": {f"{c.rows}x{c.chunk}w{c.warps}": round(t / per * 1e6, 1) for c, t in timings.items()}}, out)
    return best


def attention_sweep(model, device: torch.device, out: list) -> dict:
    """The 32 attention kernels of a token inside a CUDA graph, over splits x key block x warps, at three
    filled lengths. Returns the FusedDecoder keywords of the variant best summed over the lengths."""
    results = {}
    variants = [(s, b, w) for s in (8, 16, 32) for b in (32, 64) for w in (4, 8)]
    if device.type != "cuda":
        variants = variants[:1]
    at = (128, 2048, model.max_seq_len - 1) if device.type == "cuda" else (8,)
    for s, b, w in variants:
        dec = FusedDecoder(model, use_graph=False, attn_splits=s, attn_block=b, attn_warps=w)
        us = []
        for p in at:
            dec.pos.fill_(p)
            us.append(graph_time(lambda dec=dec: [dec.attention(L) for L in dec.layers], device) * 1e6)
        results[(s, b, w)] = us
    best = min(results, key=lambda v: sum(results[v]))
    emit({"section": "attention_sweep", "positions": list(at), "best": list(best),
          "default": [FusedDecoder.ATTN_SPLITS, FusedDecoder.ATTN_BLOCK, 4],
          "us_per_token": {f"s{s}b{b}w{w}": [round(u, 1) for u in v] for (s, b, w), v in results.items()}}, out)
    return dict(attn_splits=best[0], attn_block=best[1], attn_warps=best[2])


def decode(model, prompt: list[int], new: int, device: torch.device, bound: float, configs: dict | None,
           label: str, out: list, **attn) -> None:
    dec = FusedDecoder(model, configs=configs, use_graph=device.type == "cuda", **attn)
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
        tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        for at in (len(prompt) + new, 4096, model.max_seq_len - 1):
            dec(model, tok, torch.tensor([at], device=device), 0)
            sync(device)
            n = 100
            t = time.perf_counter()
            for _ in range(n):
                dec.graph.replay()
            sync(device)
            s = (time.perf_counter() - t) / n
            emit({"section": "decode", "configs": label, "pos": at, "graph_replay_ms": round(s * 1e3, 3),
                  "graph_tok_s": round(1 / s, 1), "graph_fraction_of_bound": round(1 / s / bound, 3)}, out)


def pipeline(model, prompt_len: int, new: int, device: torch.device, bound: float, out: list) -> None:
    """run_chat itself (Sampler, incremental detokenizer, the token callback, the step it picks, its
    lookahead) on the random model, with a word-per-id tokenizer; tok/s as run_chat reports it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from studio.engine.context import JobContext, ModelCache
    from studio.engine.device import probe
    from studio.engine.pipelines import chat
    from studio.protocol import ChatJob

    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    cm = chat.ChatModel(model=model, tokenizer=tok, chat_template="{% for m in messages %}{{ m.content }} {% endfor %}",
                        bos_token=None, eos_token=None, stop_ids=set(), add_bos=False,
                        context_length=model.max_seq_len, device=device, dtype=model.lm_head.weight.dtype,
                        name="random-8b", nbytes=bytes_per_token(model))
    cache = ModelCache()
    cache.get_or_load = lambda key, load, nbytes=None, **kw: cm  # the model built above
    streamed = []
    ctx = JobContext(job_id="bench", device=probe(device.type), models=cache, on_token=streamed.append)
    real_resolve = chat.resolve_model
    chat.resolve_model = lambda spec: (chat.Path("random-8b"), "hf")  # no file behind this model
    try:
        words = " ".join(f"w{(i * 7919) % model.config.vocab_size}" for i in range(prompt_len))
        for params in (dict(temperature=0.0), dict(temperature=0.7, top_p=0.95, top_k=40, seed=1)):
            for _ in range(2):  # the first builds the step (kernels, graph)
                streamed.clear()
                res = chat.run_chat(ChatJob(messages=[{"role": "user", "content": words}], max_tokens=new,
                                            **params), ctx)
            emit({"section": "pipeline", **params, "step": type(cm.compiled_step).__name__,
                  "completion_tokens": res["completion_tokens"], "tok_s": res["tokens_per_s"],
                  "fraction_of_bound": round(res["tokens_per_s"] / bound, 3), "ttft_s": res["ttft_s"],
                  "streamed_pieces": len(streamed)}, out)
    finally:
        chat.resolve_model = real_resolve


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
    ap.add_argument("--config", default="llama-3-8b", help="a named config of studio.models.llm (qwen3-8b: q/k norm)")
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
    cfg = LLMConfig.from_name("tiny-llama" if args.tiny else args.config)
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
    emit({"section": "setup", "config": "tiny-llama" if args.tiny else args.config, "cache": cache,
          "weight_gb_per_token": round(per_tok / 1e9, 3), "copy_gb_s": round(bw / 1e9, 1),
          "bound_tok_s": round(bound, 1), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "torch": torch.__version__, "triton": triton.__version__,
          "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}, out)
    if "check" not in skip:
        section("check", out, check, model, base, cfg, prompt, device, out)
    tuned = None
    if "sweep" not in skip:
        tuned = section("sweep", out, sweep, FusedDecoder(model, use_graph=False), device, out)
    attn = {}
    if "sweep" not in skip:
        attn = section("attention_sweep", out, attention_sweep, model, device, out) or {}
    if "decode" not in skip:
        section("decode", out, decode, model, prompt, new, device, bound, None, "default", out)
        if tuned or attn:
            section("decode", out, lambda: decode(model, prompt, new, device, bound, tuned, "swept", out, **attn))
    if "pipeline" not in skip:
        section("pipeline", out, pipeline, model, prompt_len, new, device, bound, out)
    if "profile" not in skip and device.type == "cuda":
        section("profile", out, profile, model, prompt, device, tuned, bw, out)
    if not args.no_hf and not args.tiny and cfg.model_type == "llama":  # the reference is LlamaForCausalLM
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
