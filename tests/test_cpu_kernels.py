"""The CPU GGUF kernel (studio/nn/kernels/cpu_gguf.c) and its layer: products, conversions, threads, fallback."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize

from studio.nn.gguf_dequant import GGML_TYPE_BY_NAME, dequantize
from studio.nn.kernels import cpu_gguf
from studio.nn.packed_gguf import GGUFBlockLinear, GGUFWeight

pytestmark = pytest.mark.skipif(not cpu_gguf.available(), reason="no C compiler: the kernel cannot be built here")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _blocks(name: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05 + rng.uniform(-0.02, 0.02, (n, 1))).astype(np.float32)
    qt = gguf.GGMLQuantizationType[name]
    return torch.from_numpy(np.ascontiguousarray(gguf_quantize(w, qt)).view(np.uint8)).reshape(n, -1), qt.value


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("m", [1, 3, 9])  # decode, and the prefill path (4 rows at a time plus a remainder)
def test_kernel_matches_float_product_of_dequantized_blocks(name, m):
    raw, t = _blocks(name, 80, 576)
    x = torch.randn(m, 576)
    bias = torch.randn(80)
    ref = x @ dequantize(raw, t, (80, 576)).T + bias
    y = cpu_gguf.gguf_matmul(x, raw, t, 80, 576, bias)
    # x in two int8 planes per block of 32 (~15 bits): a few 1e-5 of the largest output
    assert y.shape == (m, 80) and _rel(y, ref) < 2e-4


def test_q4_1_offsets_use_the_exact_sum_of_x():
    """Inputs with a large common offset: the m-term against x's float sum keeps the error small."""
    raw, t = _blocks("Q4_1", 64, 256, seed=1)
    x = torch.randn(1, 256) * 0.1 + 3.0
    ref = x @ dequantize(raw, t, (64, 256)).T
    assert _rel(cpu_gguf.gguf_matmul(x, raw, t, 64, 256), ref) < 2e-4


def test_vector_build_matches_the_scalar_reference_build(tmp_path):
    cc = cpu_gguf._compiler()
    scalar = tmp_path / "scalar.so"
    cpu_gguf.build(cc, scalar, native=False)
    ref_lib = cpu_gguf.open_library(scalar)
    torch.manual_seed(0)
    for name in ("Q4_0", "Q4_1", "Q8_0"):
        raw, t = _blocks(name, 48, 1024, seed=2)
        x = torch.randn(5, 1024)
        ours = cpu_gguf.gguf_matmul(x, raw, t, 48, 1024)
        ref = cpu_gguf.gguf_matmul(x, raw, t, 48, 1024, lib=ref_lib)
        # the same integer sums; float accumulation orders differ (each is ~2e-5 from the float product)
        assert _rel(ours, ref) < 5e-5, name


def test_two_threads_give_the_same_result_as_one():
    raw, t = _blocks("Q4_1", 1024, 576, seed=3)
    x = torch.randn(2, 576)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gguf.gguf_matmul(x, raw, t, 1024, 576)
        torch.set_num_threads(2)
        two = cpu_gguf.gguf_matmul(x, raw, t, 1024, 576)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)  # rows are split between threads, each row summed the same way


def test_q4_k_converts_to_q4_1_blocks_up_to_float16_scales():
    from tests.test_quant import _random_k_blocks

    rng = np.random.default_rng(4)
    raw = torch.from_numpy(_random_k_blocks("Q4_K", 32, rng)).view(16, -1)  # 16 rows of 512
    blocks, t = cpu_gguf.kernel_blocks(raw, "Q4_K", 16, 512)
    assert t == GGML_TYPE_BY_NAME["Q4_1"].id and blocks.shape == (16, 512 // 32 * 20)
    ref = dequantize(raw, GGML_TYPE_BY_NAME["Q4_K"].id, (16, 512))
    ours = dequantize(blocks, t, (16, 512))
    assert _rel(ours, ref) < 2e-3  # d * sc and dmin * m rounded to float16: 2^-11 relative each


@pytest.mark.parametrize("name", ["Q6_K", "Q5_0"])
def test_other_types_requantize_to_q8_0_within_half_a_step_per_block(name):
    from tests.test_quant import _random_k_blocks

    rng = np.random.default_rng(5)
    if name == "Q6_K":
        raw = torch.from_numpy(_random_k_blocks("Q6_K", 8, rng)).view(4, -1)  # 4 rows of 512
    else:
        raw, _ = _blocks("Q5_0", 4, 512)
    tid = GGML_TYPE_BY_NAME[name].id
    blocks, t = cpu_gguf.kernel_blocks(raw, name, 4, 512)
    assert t == GGML_TYPE_BY_NAME["Q8_0"].id
    ref = dequantize(raw, tid, (4, 512)).view(4, 16, 32)
    ours = dequantize(blocks, t, (4, 512)).view(4, 16, 32)
    step = ref.abs().amax(-1, keepdim=True) / 127
    assert ((ours - ref).abs() <= step * 0.5 + step * 2e-3 + 1e-7).all()  # + float16 rounding of d


def test_q4_0_q4_1_q8_0_blocks_are_used_without_a_copy():
    raw, t = _blocks("Q4_1", 32, 256)
    mod = GGUFWeight(raw, t, (32, 256)).to_cpu_module()
    assert isinstance(mod, GGUFBlockLinear) and mod.raw.data_ptr() == raw.data_ptr()


def test_layer_without_the_kernel_dequantizes_and_matches(monkeypatch):
    raw, t = _blocks("Q8_0", 32, 256)
    mod = GGUFWeight(raw, t, (32, 256)).to_cpu_module(torch.ones(32))
    x = torch.randn(2, 3, 256)
    fast = mod(x)
    monkeypatch.setattr(cpu_gguf, "_lib", [None])
    slow = mod(x)
    assert fast.shape == slow.shape == (2, 3, 32)
    assert torch.allclose(slow, x @ dequantize(raw, t, (32, 256)).T + 1, atol=1e-5)
    assert _rel(fast, slow) < 2e-4


def test_bad_arguments_are_refused_not_crashed():
    raw, t = _blocks("Q4_0", 16, 256)
    with pytest.raises(ValueError, match="whole blocks"):
        cpu_gguf.gguf_matmul(torch.randn(1, 250), raw, t, 16, 250)
    with pytest.raises(ValueError, match="dense"):
        cpu_gguf.gguf_matmul(torch.randn(1, 256), raw[:, :72], t, 16, 256)
    with pytest.raises(ValueError):
        GGUFBlockLinear(GGUFWeight(raw, GGML_TYPE_BY_NAME["Q4_K"].id, (16, 256)))


def test_bundled_model_runs_its_layers_and_head_on_the_kernel():
    from studio.engine.pipelines.chat import load_chat_model, resolve_model

    path, kind = resolve_model("")
    cm = load_chat_model(path, kind, torch.device("cpu"), torch.float32, False, 512, lambda *a: None)
    layer = cm.model.model.layers[0]
    assert isinstance(cm.model.lm_head, GGUFBlockLinear)  # the tied Q8_0 table, not an int8 copy
    assert isinstance(layer.self_attn.qkv_proj, GGUFBlockLinear) and isinstance(layer.mlp.down_proj, GGUFBlockLinear)


def test_bench_cpu_chat_check_mode_runs_studio_on_a_tiny_file(tmp_path):
    """benchmarks/bench_cpu_chat.py --check: writes a tiny random Q4_K_M file and times Studio's side on it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu_chat.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "STUDIO_BENCH_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])["check"]
    assert res["decode_tok_s"] > 0 and res["prompt_tok_s"] > 0 and res["load_s"] > 0
    assert res["kernel"] == cpu_gguf.isa()
