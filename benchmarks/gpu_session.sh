#!/usr/bin/env bash
# Everything still to be measured on a lent GPU, in the order that fits 10-minute device calls.
#   bash benchmarks/gpu_session.sh PART     (PART: fused | tests | llm | image | sdgen | wan)
# Each part prints JSON lines and writes them under $OUT (the device tool's output folder) when set.
# Needs the wheels in .whl (diffusers, importlib_metadata, platformdirs, gguf): carry ".whl".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/studio-gpu}"; mkdir -p "$OUT"
# Pure-Python wheels unpacked into a folder on the path (on 2026-12-05 a `pip install --target` there
# failed silently and every test that needs gguf or platformdirs failed to import).
mkdir -p /tmp/site && for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
case "${1:-}" in
  tests)  # every CUDA path the CPU suite skips (~2 min)
    python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$OUT/gpu-tests.txt" ;;
  llm)    # 8B decode: bf16 (bucketed CUDA graphs) vs transformers, then int4 under a 6 GiB budget (~6 min)
    timeout 330 python3 benchmarks/bench_llm.py 2>&1 | tee "$OUT/llm-bf16.txt"
    timeout 200 python3 benchmarks/bench_llm.py --quant int4 --budget-gib 6 --new 128 --no-hf 2>&1 | tee "$OUT/llm-int4.txt" ;;
  image)  # UNet step eager+compiled (SD1.5, SDXL) and VAE tiling, side by side with diffusers (~8 min)
    timeout 420 python3 benchmarks/bench_image.py unet --compile 2>&1 | tee "$OUT/unet.jsonl"
    timeout 120 python3 benchmarks/bench_image.py vae 2>&1 | tee "$OUT/vae.jsonl" ;;
  sdgen)  # full 30-step generations and SDXL under 24/8/6/4 GiB vs diffusers' offload modes (~8 min)
    timeout 560 python3 benchmarks/bench_sd_generation.py 2>&1 | tee "$OUT/sdgen.jsonl" ;;
  wan)    # Wan 1.3B 480p 81 frames 30 steps vs diffusers, and under an 8 GiB budget (~10 min)
    timeout 580 python3 benchmarks/bench_wan_generation.py 2>&1 | tee "$OUT/wan.jsonl" ;;
  first)  # the GPU tests, 8B int4 under 6 GiB, then 8B bf16 vs transformers (~9.5 min)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$OUT/gpu-tests.txt"
    timeout 150 python3 benchmarks/bench_llm.py --quant int4 --budget-gib 6 --new 128 --no-hf 2>&1 | tee "$OUT/llm-int4.txt"
    timeout 290 python3 benchmarks/bench_llm.py 2>&1 | tee "$OUT/llm-bf16.txt" ;;
  llm2)   # Wan 1.3B under 8 GiB, 8B int4 under 6 GiB, and bf16 with inductor's kernel tuning (~8 min)
    timeout 200 python3 benchmarks/bench_wan_generation.py --runs ours_8gib 2>&1 | grep -v Warning | tee "$OUT/wan-8gib.jsonl"
    timeout 150 python3 benchmarks/bench_llm.py --quant int4 --budget-gib 6 --new 128 --no-hf 2>&1 | tee "$OUT/llm-int4.txt"
    timeout 240 python3 benchmarks/bench_llm.py --no-hf --inductor-tuning 2>&1 | tee "$OUT/llm-bf16-tuned.txt" ;;
  fused)  # the GPU tests, then the fused decode step: checks, kernel sweep, tok/s, profile, transformers, torch.compile (~8 min)
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$OUT/gpu-tests.txt" | tail -30
    (cd benchmarks && timeout 340 python3 bench_fused_decode.py --compiled 2>&1 | grep -v -i warn) ;;
  *) echo "usage: bash benchmarks/gpu_session.sh fused|first|llm2|tests|llm|image|sdgen|wan" >&2; exit 2 ;;
esac
