"""The GPU benchmark scripts run end to end: each one's --tiny mode on the CPU, JSON rows checked.

The GPU runs happen in one go on a lent machine; a script broken by a refactor would waste that
run, so CI runs the same code path here at toy sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_tiny(script: str, *args: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stdout[-2000:] + proc.stderr[-2000:]
    return rows


def test_sd_generation_bench_matches_diffusers_and_reports_budgets():
    rows = run_tiny("bench_sd_generation.py")
    gens = {r["model"]: r for r in rows if r["bench"] == "generation"}
    assert set(gens) == {"sd15", "sdxl"}, [r for r in rows if "error" in r]
    for name, row in gens.items():
        # fp32 on the CPU, same weights, noise and sigmas: the images differ only by rounding to 8 bits
        assert row["mean_abs_pixel_diff"] < 0.05 and row["max_abs_pixel_diff"] <= 1.0, (name, row)
        assert row["s_per_image_ours"] > 0 and row["step_ms_ours"] > 0 and row["step_ms_diffusers"] > 0
    budgets = {r["budget_mib"]: r for r in rows if r["bench"] == "budget_ours"}
    assert set(budgets) == {512, 100, 24}
    assert set(budgets[512]["policies"].values()) == {"resident"}
    assert "model_offload" in budgets[100]["policies"].values()
    for mib in (512, 100):  # placement changes where weights live, never the image
        assert budgets[mib]["vs_resident"]["max_abs_pixel_diff"] == 0.0, budgets[mib]
    # a budget nothing fits in is a reported result, not a crash of the whole run
    assert "24.0 MiB VRAM budget" in budgets[24]["error"] and budgets[24]["oom"] is False
    assert any(r["bench"] == "budget_diffusers" and "skipped" in r for r in rows)


def test_fused_decode_bench_checks_sweeps_and_runs_the_chat_pipeline():
    rows = run_tiny("bench_fused_decode.py", "--skip", "decode")
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    sections = {r["section"] for r in rows}
    assert {"setup", "check", "sweep", "attention_sweep", "pipeline"} <= sections
    check = next(r for r in rows if r["section"] == "check")
    # bf16 against fp32: the fused step is about as far off as the model's own bf16 step
    assert check["fused_bf16_max_rel_err"] <= max(2 * check["eager_bf16_max_rel_err"], 0.02), check
    assert {r["product"] for r in rows if r["section"] == "sweep"} == {"qkv_rope", "o_proj", "gate_up", "down",
                                                                      "lm_head"}
    for r in (r for r in rows if r["section"] == "pipeline"):
        assert r["completion_tokens"] == 4 and r["tok_s"] > 0 and r["streamed_pieces"] >= 1
