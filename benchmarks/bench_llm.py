"""LLM prefill/decode speed: ours (eager and CUDA-graph compiled) vs transformers, same run, same weights.

    python benchmarks/bench_llm.py                 # GPU: Llama-3-8B architecture, random bf16 weights
    python benchmarks/bench_llm.py --tiny          # CPU smoke run of the whole script on a tiny config
    python benchmarks/bench_llm.py --cpu-smollm2   # the bundled SmolLM2-135M Q4_1 chat model on CPU
    python benchmarks/bench_llm.py --tiny --cpu-compile   # CPU smoke run of the compiled-step section

The KV cache holds --cache positions (default: the chat pipeline's 8192-token context, which it
allocates whole on CUDA). The compiled step runs as run_chat runs it (attending to a power-of-two
bucket of the cache, one graph per bucket) and, for comparison, over the whole cache.

Decode is memory-bound: tokens/s <= copy bandwidth / weight bytes read per token. The script
measures the bandwidth with a large device copy and prints decode as a fraction of that bound.
Needs only torch, transformers, safetensors and studio. Prints one JSON line of results last.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch

from studio.engine.pipelines.chat import DEFAULT_CONTEXT
from studio.engine.pipelines.decoding import compile_decode_step, generate_tokens, kv_buckets
from studio.engine.sampling import greedy_on_device
from studio.models.llm import LLM, LLMConfig
from studio.models.llm_build import build_llm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t)


def random_model(cfg: LLMConfig, dtype: torch.dtype, device: torch.device) -> LLM:
    with torch.device("meta"):
        model = LLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(0.0 if cfg.gemma_norm else 1.0) if "norm" in name else p.zero_()
    return model.eval()


def bytes_per_token(model: LLM) -> int:
    """Weights read for one decoded token: everything but the embedding table (one row is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    if model.lm_head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


LOOKAHEAD = False  # --lookahead: decode with generate_tokens' one-token lookahead


def time_decode(model: LLM, prompt: list[int], new: int, device: torch.device, step=None) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) for greedy decoding of `new` tokens."""
    stamps = []
    sync(device)
    t0 = time.perf_counter()
    # as the chat pipeline decodes: the id chosen on the device, read one step behind on CUDA
    for _ in generate_tokens(model, prompt, new, greedy_on_device, step=step, lookahead=LOOKAHEAD):
        stamps.append(time.perf_counter())  # each token is read back before its stamp: it follows the GPU
    prefill = stamps[0] - t0
    return prefill, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_compiled(model: LLM, prompt: list[int], new: int, device: torch.device, bound: float) -> dict:
    """The compiled decode step: bucketed (as the chat pipeline runs it) and over the whole cache."""
    from torch._dynamo.utils import counters

    cache = model.max_seq_len
    compiled = compile_decode_step(cache, **({"mode": "reduce-overhead"} if device.type == "cuda" else {}))
    first_call_s: dict[int, float] = {}  # bucket -> seconds of its first call (compile + warm-up)

    def step(m: LLM, tok: torch.Tensor, pos: torch.Tensor, bucket: int) -> torch.Tensor:
        if bucket in first_call_s:
            return compiled(m, tok, pos, bucket)
        t = time.perf_counter()
        out = compiled(m, tok, pos, bucket)
        sync(device)
        first_call_s[bucket] = round(time.perf_counter() - t, 1)
        return out

    graphs = counters["stats"]["unique_graphs"]
    t = time.perf_counter()
    time_decode(model, prompt, new, device, step=step)  # compiles and captures every bucket the run reaches
    res: dict = {"cache": cache, "compile_s": round(time.perf_counter() - t, 1),
                 "compile_s_per_bucket": dict(sorted(first_call_s.items())),
                 "graphs": counters["stats"]["unique_graphs"] - graphs,
                 "buckets_of_this_cache": len(kv_buckets(cache))}
    _, tok_s = time_decode(model, prompt, new, device, step=step)
    res.update(ours_compiled_tok_s=round(tok_s, 2), ours_compiled_fraction_of_bound=round(tok_s / bound, 3))
    print(f"ours compiled, bucketed: decode {tok_s:.2f} tok/s ({tok_s / bound:.1%} of bound); "
          f"{res['graphs']} graphs, first calls {res['compile_s_per_bucket']} s", flush=True)

    def whole(m: LLM, tok: torch.Tensor, pos: torch.Tensor, bucket: int) -> torch.Tensor:
        return step(m, tok, pos, cache)  # the previous behaviour: every step attends to every slot

    if cache not in first_call_s:
        time_decode(model, prompt, 8, device, step=whole)  # compile and capture
    _, whole_s = time_decode(model, prompt, new, device, step=whole)
    res.update(ours_compiled_whole_cache_tok_s=round(whole_s, 2),
               ours_compiled_whole_cache_fraction_of_bound=round(whole_s / bound, 3))
    print(f"ours compiled, whole {cache}-slot cache: decode {whole_s:.2f} tok/s ({whole_s / bound:.1%} of bound)",
          flush=True)
    return res


def hf_reference(model: LLM, cfg: LLMConfig, dtype: torch.dtype, device: torch.device):
    """A transformers LlamaForCausalLM sharing our weight tensors (no copy)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(model.state_dict(), assign=True, strict=False)
    # inv_freq is a non-persistent buffer, still on meta: build the rotary module for real
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(device)
    return hf.eval()


def time_hf(hf, prompt: list[int], new: int, device: torch.device, **kw) -> float:
    ids = torch.tensor([prompt], device=device)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    # warm up; a static cache is sized by max_new_tokens, so its compiled graphs need the full length
    warm = gen if "cache_implementation" in kw else {**gen, "max_new_tokens": 4, "min_new_tokens": 4}
    hf.generate(ids, **warm)
    sync(device)
    t = time.perf_counter()
    out = hf.generate(ids, **gen)
    sync(device)
    return (out.shape[1] - len(prompt)) / (time.perf_counter() - t)


def bench_synthetic(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.tiny else args.device)
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    cfg = LLMConfig.from_name("tiny-llama" if args.tiny else args.config)
    prompt_len, new = (16, 16) if args.tiny else (args.prompt, args.new)
    base = random_model(cfg, dtype, device)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    bw = copy_bandwidth(device, (64 << 20) if args.tiny else (2 << 30))
    cache = max(args.cache or DEFAULT_CONTEXT, prompt_len + new)
    if args.tiny:
        cache = min(cache, cfg.max_position_embeddings)
    note = ""
    if args.quant:
        # as the chat pipeline loads with ChatJob.quant: every matrix quantized a block of rows at a time,
        # the embedding table kept packed on the device, the context fitted to the budget
        from studio.engine.pipelines.chat import fit_context
        from studio.models.llm_build import quantize_state, weight_bytes

        qcfg, state, _ = quantize_state(cfg, dict(base.state_dict()), args.quant, device)
        args.no_hf = True  # the reference would need the full-precision copy we are freeing
        del base
        budget = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            if args.budget_gib:
                budget = int(args.budget_gib * 2**30)
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(budget / total)
            torch.cuda.reset_peak_memory_stats()
        model = build_llm(qcfg, state, dtype=dtype, device=device, fuse=True)
        del state
        emb = model.model.embed_tokens
        per_tok = weight_bytes(model) - (emb.weight_q.nbytes if hasattr(emb, "weight_q") else
                                         emb.weight.numel() * emb.weight.element_size())
        cache, note = fit_context(model, dtype, cache, budget)
    else:
        # ours runs as the chat pipeline builds it: q/k/v and gate/up fused (weights shared otherwise)
        model = build_llm(cfg, dict(base.state_dict()), dtype=dtype, device=device, fuse=True)
        per_tok = bytes_per_token(model)
    model.setup_caches(1, cache)
    bound = bw / per_tok
    res: dict = {"mode": "tiny" if args.tiny else "synthetic", "config": "tiny-llama" if args.tiny else args.config,
                 "quant": args.quant or "none", "budget_gib": args.budget_gib,
                 "dtype": str(dtype).removeprefix("torch."), "prompt": prompt_len, "new": new, "cache": cache,
                 "weight_gb_per_token": round(per_tok / 1e9, 3), "copy_gb_s": round(bw / 1e9, 1),
                 "bound_tok_s": round(bound, 1), "note": note}
    time_decode(model, prompt, 4, device)  # warm up kernels
    prefill, eager = time_decode(model, prompt, new, device)
    res.update(prefill_tok_s=round(prompt_len / prefill, 1), ours_eager_tok_s=round(eager, 2),
               ours_eager_fraction_of_bound=round(eager / bound, 3))
    print(f"ours eager: prefill {prompt_len / prefill:.0f} tok/s, decode {eager:.2f} tok/s "
          f"({eager / bound:.1%} of the {bound:.0f} tok/s bound)", flush=True)
    if (device.type == "cuda" or args.cpu_compile) and not args.no_compile:
        res.update(bench_compiled(model, prompt, new, device, bound))
    if device.type == "cuda":
        res["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if not args.no_hf:
        del model
        hf = hf_reference(base, cfg, dtype, device)
        res["hf_eager_tok_s"] = round(time_hf(hf, prompt, new, device), 2)
        print(f"transformers eager: decode {res['hf_eager_tok_s']} tok/s", flush=True)
        if device.type == "cuda" and not args.no_compile:
            try:  # transformers compiles the forward itself (reduce-overhead) once the cache is static
                t = time.perf_counter()
                res["hf_static_compiled_tok_s"] = round(time_hf(hf, prompt, new, device,
                                                                cache_implementation="static"), 2)
                res["hf_compile_and_runs_s"] = round(time.perf_counter() - t, 1)
                print(f"transformers static cache + compile: {res['hf_static_compiled_tok_s']} tok/s", flush=True)
            except Exception as exc:  # noqa: BLE001 - a reference that fails is reported, not fatal
                res["hf_static_compiled_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return res


def bench_cpu_smollm2(args: argparse.Namespace) -> dict:
    from studio.engine.context import JobContext, ModelCache
    from studio.engine.device import probe
    from studio.engine.pipelines.chat import load_chat_model, resolve_model, run_chat
    from studio.protocol import ChatJob

    path, kind = resolve_model("")
    t = time.perf_counter()
    cm = load_chat_model(path, kind, torch.device("cpu"), torch.float32, False, 8192, lambda *a: None)
    load_s = time.perf_counter() - t
    cache = ModelCache()
    cache.put("bench", cm)
    dev = probe("cpu")
    ctx = JobContext(job_id="bench", device=dev, models=cache)
    ctx.models.get_or_load = lambda key, load, nbytes=None, **kw: cm  # reuse the model loaded above
    question = [{"role": "user", "content": "What is the capital of France?"}]
    run_chat(ChatJob(messages=question, temperature=0.0, max_tokens=8), ctx)  # warm up
    answer = run_chat(ChatJob(messages=question, temperature=0.0, max_tokens=32), ctx)
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    long = run_chat(ChatJob(messages=story, temperature=0.0, max_tokens=args.new), ctx)
    print(f"SmolLM2 on CPU: load {load_s:.2f} s, answer {answer['text']!r}", flush=True)
    return {"mode": "cpu-smollm2", "load_s": round(load_s, 2), "ttft_s": answer["ttft_s"],
            "answer": answer["text"], "decode_tok_s": long["tokens_per_s"],
            "decode_tokens": long["completion_tokens"], "threads": torch.get_num_threads(),
            "weight_mb": round(cm.nbytes / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU: checks the script end to end")
    ap.add_argument("--cpu-smollm2", action="store_true", help="the bundled SmolLM2 on CPU")
    ap.add_argument("--config", default="llama-3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--cpu-compile", action="store_true", help="run the compiled section on CPU (inductor)")
    ap.add_argument("--cache", type=int, default=0,
                    help=f"KV cache positions (default {DEFAULT_CONTEXT}, as the chat pipeline on CUDA)")
    ap.add_argument("--lookahead", action="store_true",
                    help="queue the next step before reading each token (the chat_lookahead setting)")
    ap.add_argument("--inductor-tuning", action="store_true",
                    help="inductor's coordinate-descent tuning of the generated kernels (as gpt-fast sets it)")
    ap.add_argument("--quant", choices=["int8", "int4"], default=None, help="weight-only quantized linears")
    ap.add_argument("--budget-gib", type=float, default=0, help="with --quant: cap the process's VRAM (GiB)")
    args = ap.parse_args()
    global LOOKAHEAD
    LOOKAHEAD = args.lookahead
    if args.inductor_tuning:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
        inductor_config.coordinate_descent_check_all_directions = True
    torch.manual_seed(0)
    res = bench_cpu_smollm2(args) if args.cpu_smollm2 else bench_synthetic(args)
    device_name = (torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny
                   and not args.cpu_smollm2 else platform.processor() or platform.machine())
    res.update(device=device_name, torch=torch.__version__,
               date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
