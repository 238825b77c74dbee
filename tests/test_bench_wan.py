"""benchmarks/bench_wan_generation.py keeps working: its --tiny mode runs the whole script on the CPU
(random diffusers-layout Wan folder, diffusers' WanPipeline, our run_video resident and under budgets)
and prints one JSON line per measurement."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# found, not imported: the script imports them in its own process
if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("diffusers and transformers are needed for the reference run", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_wan_generation.py"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--14b", "--folder", str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["run"]: r for r in lines}


def test_tiny_run_measures_every_generation_without_errors(records):
    assert list(records) == ["setup", "diffusers", "ours", "ours_8gib", "ours_14b_24gib", "summary"]
    assert records["summary"]["failed"] == []
    for name in ("diffusers", "ours", "ours_8gib", "ours_14b_24gib"):
        r = records[name]
        assert "error" not in r, r.get("traceback")
        for key in ("total_s", "encode_s", "sampling_s", "decode_s"):
            assert r[key] > 0, (name, key)
        assert r["per_step_ms"] > 0
    assert records["diffusers"]["frames_shape"] == [1, 5, 32, 32, 3]
    assert records["ours"]["frames"] == 5 and records["ours_14b_24gib"]["steps"] == 3


def test_budgeted_runs_take_the_streaming_path(records):
    assert not any("stream" in n for n in records["ours"]["notes"])
    for name in ("ours_8gib", "ours_14b_24gib"):
        notes = " ".join(records[name]["notes"])
        assert "memory: streaming transformer, text_encoder blocks" in notes  # the manager's BLOCK_STREAM


def test_folder_is_written_in_diffusers_layout_and_reused(records):
    folder = Path(records["setup"]["folder"])
    wan = folder / "Wan-tiny-random"
    for part in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json",
                 "model_index.json", ".complete"):
        assert (wan / part).is_file(), part
    assert (folder / "Wan-tiny-random-14b" / "text_encoder").is_symlink()  # the 14B folder shares the encoder
    before = (wan / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_wan_generation as bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    # a finished folder is reused as it is: the full-size one is 14 GB
    assert bench.build_folder(wan, bench.NET_TINY, bench.UMT5_TINY, bench.VAE_TINY, "cpu", None) == wan
    assert (wan / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
