"""The `studio` command itself: version, doctor, selftest and chat through a real engine."""

from __future__ import annotations

import json
import subprocess
import sys

from studio import __version__


def studio(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, timeout=timeout)


def test_version_prints_the_package_version():
    out = studio("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"studio {__version__}"


def test_doctor_reports_torch_devices_memory_disk_and_folders():
    out = studio("doctor", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["torch"]["version"] and report["ram"]["total_bytes"] > 0
    assert set(report["disk"]) == {"models", "outputs"} and report["disk"]["models"]["free_bytes"] > 0
    assert set(report["folders"]) >= {"config", "data", "models", "outputs", "logs"}
    assert report["selected_device"].startswith(("CPU", "CUDA", "MPS", "XPU", "ROCM"))
    assert "H.264" in report["video_encoder"] or "OpenCV" in report["video_encoder"]
    assert report["chat_decode"].startswith(("eager PyTorch", "fused Triton step", "torch.compile"))
    human = studio("doctor")
    assert "PyTorch" in human.stdout and "RAM:" in human.stdout and "Video files:" in human.stdout
    assert "Chat decode: " in human.stdout



def test_selftest_runs_a_matmul_on_the_engine_and_checks_the_answer():
    out = studio("selftest", "--size", "128", "--iterations", "2", "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] and result["device"] == "cpu" and result["tflops"] > 0


def test_selftest_with_bad_input_fails_with_the_engines_message():
    out = studio("selftest", "--size", "3", "--device", "cpu")
    assert out.returncode == 1 and "16 to 16384" in out.stderr


def test_chat_answers_the_capital_of_france_with_the_bundled_model():
    out = studio("chat", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24", "--json",
                 "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "Paris" in result["text"]
    assert result["completion_tokens"] > 0 and result["tokens_per_s"] > 0 and result["ttft_s"] > 0


def test_chat_with_a_missing_model_says_what_to_do():
    out = studio("chat", "hi", "--model", "/nowhere/model.gguf", "--device", "cpu")
    assert out.returncode == 1 and "bundled SmolLM2" in out.stderr


def test_default_paths_do_not_warn_without_xdg_runtime_dir(tmp_path, monkeypatch):
    # ssh sessions and containers often lack XDG_RUNTIME_DIR; platformdirs then warns on every command
    import warnings

    from studio.paths import Paths

    monkeypatch.delenv("STUDIO_HOME", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = Paths.default()
    assert str(paths.config).startswith(str(tmp_path))
