"""Dequantization of every GGML type we read, and the int8 / int4 weight-only Linear modules."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from studio.nn.gguf_dequant import GGML_TYPE_BY_NAME, dequantize
from studio.nn.packed_gguf import GGUFWeight
from studio.nn.packed_int import (
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
    quantize_linear,
)

QUANTIZABLE = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of the float16 scale fields in each K-quant block (the rest is any bit pattern).
K_HALF_FIELDS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _random_k_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    t = GGML_TYPE_BY_NAME[name]
    blocks = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    for off in K_HALF_FIELDS[name]:  # finite scales: random bytes there could be inf/nan
        blocks[:, off:off + 2] = rng.uniform(-0.05, 0.05, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_dequant_matches_gguf_reference_for_quantized_random_data(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[name]
    raw = x.astype(np.float16).view(np.uint8) if name == "F16" else gguf_quantize(x, qtype)
    ref = gguf_dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8)), qtype.value, (6, 256))
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)))


@pytest.mark.parametrize("name", K_QUANTS)
def test_dequant_matches_gguf_reference_for_random_k_quant_blocks(name):
    rng = np.random.default_rng(2)
    blocks = _random_k_blocks(name, 12, rng)
    qtype = gguf.GGMLQuantizationType[name]
    ref = gguf_dequantize(blocks, qtype).reshape(3, 1024)
    ours = dequantize(torch.from_numpy(blocks), qtype.value, (3, 1024))
    assert torch.equal(ours, torch.from_numpy(ref.astype(np.float32)))


def test_f32_dequant_is_a_view_of_the_bytes():
    x = torch.randn(4, 8)
    raw = x.view(torch.uint8)
    assert torch.equal(dequantize(raw, 0, (4, 8)), x)


# --- modules -------------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("backend,tol", [("dequant", 1e-6), ("int_mm", 2e-4), ("int8pack", 2e-2)])
def test_int8_linear_matches_float_matmul_of_its_dequantized_weight(backend, tol):
    torch.manual_seed(0)
    qw = quantize_int8(torch.randn(96, 64) * 0.05)
    bias = torch.randn(96)
    mod = Int8Linear(qw.q, qw.scale, bias, backend=backend)
    x = torch.randn(2, 3, 64)
    ref = x @ qw.dequantize().T + bias
    y = mod(x)
    assert y.shape == (2, 3, 96) and y.dtype == torch.float32
    # bf16 kernels (int8pack) round activations to 8 bits of mantissa: 2e-2 of the largest output
    assert _rel(y, ref) < tol


@pytest.mark.parametrize("backend,tol", [("dequant", 1e-6), ("int4pack", 2e-2)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_matches_float_matmul_of_its_dequantized_weight(backend, tol, group):
    torch.manual_seed(0)
    qw = quantize_int4(torch.randn(64, 256) * 0.05, group)
    mod = Int4Linear(qw.packed, qw.scale, qw.zero, group, bias=None, backend=backend)
    x = torch.randn(5, 256)
    assert _rel(mod(x), x @ qw.dequantize().T) < tol


def test_default_backends_run_and_agree_with_the_float_path():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(1, 128)
    for mode in ("int8", "int4-32"):
        qw = quantize_linear(w, mode)
        assert _rel(qw.to_module()(x), x @ qw.dequantize().T) < 2e-2


def test_int4_shapes_the_packed_kernel_cannot_tile_fall_back_to_dequant():
    torch.manual_seed(0)
    qw = quantize_int4(torch.randn(24, 96), 32)  # 24 rows: not a multiple of 16
    x = torch.randn(2, 96)
    assert _rel(qw.to_module()(x), x @ qw.dequantize().T) < 1e-6


def test_int8_quantization_error_is_within_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(128, 64) * torch.rand(128, 1)  # rows of very different scale
    qw = quantize_int8(w)
    bound = w.abs().amax(1, keepdim=True) / 254 * (1 + 1e-5)
    assert ((qw.dequantize() - w).abs() <= bound).all()
    assert qw.nbytes == 128 * 64 + 128 * 4


def test_int4_quantization_error_is_within_half_a_step_per_group():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    for group in (32, 64, 128):
        qw = quantize_int4(w, group)
        g = w.view(32, -1, group)
        bound = ((g.amax(-1) - g.amin(-1)) / 30 * (1 + 1e-4) + 1e-6).repeat_interleave(group, dim=1)
        assert ((qw.dequantize() - w).abs() <= bound).all()


def test_int4_rejects_rows_that_are_not_whole_groups():
    with pytest.raises(ValueError, match="divisible"):
        quantize_int4(torch.randn(4, 48), 32)


def test_all_zero_rows_quantize_to_zero():
    w = torch.zeros(4, 64)
    assert torch.equal(quantize_int8(w).dequantize(), w)
    assert torch.equal(quantize_int4(w, 32).dequantize(), w)


# --- GGUF blocks to modules ----------------------------------------------------------------------

def _gguf_weight(x: np.ndarray, name: str) -> tuple[GGUFWeight, torch.Tensor]:
    qtype = gguf.GGMLQuantizationType[name]
    raw = np.ascontiguousarray(gguf_quantize(x, qtype)).view(np.uint8)
    ref = torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32))
    return GGUFWeight(torch.from_numpy(raw), qtype.value, x.shape), ref


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_q4_blocks_map_exactly_to_int4_group_32(name):
    x = np.random.default_rng(3).standard_normal((48, 128)).astype(np.float32)
    gw, ref = _gguf_weight(x, name)
    q4 = gw.to_int4()
    assert q4.group_size == 32
    # w = (q - 8) d + (m + 8 d) equals d q + m up to one float rounding of (m + 8 d)
    assert (q4.dequantize() - ref).abs().max() < 1e-6 * ref.abs().max()
    mod = gw.to_module(torch.zeros(48))
    assert isinstance(mod, Int4Linear)


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q5_1"])
def test_other_blocks_requantize_to_int8_with_small_extra_error(name):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 256)).astype(np.float32) * 0.02
    gw, ref = _gguf_weight(x, name)
    mod = gw.to_module()
    assert isinstance(mod, Int8Linear)
    requant = mod.q.float() * mod.scale[:, None]
    # per-channel int8 error: at most half a step of the row's range; rms ~1% of the weights' rms
    assert ((requant - ref).abs() <= ref.abs().amax(1, keepdim=True) / 254 * 1.0001).all()
    assert float((requant - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) < 0.02


@pytest.mark.parametrize("name,module", [("Q4_K", Int4Linear), ("Q5_K", Int8Linear), ("Q6_K", Int8Linear),
                                         ("Q3_K", Int8Linear), ("Q2_K", Int8Linear)])
def test_k_quant_weight_to_module_computes_its_dequantized_matmul(name, module):
    rng = np.random.default_rng(5)
    blocks = _random_k_blocks(name, 32, rng)  # 16 rows of 512
    gw = GGUFWeight(torch.from_numpy(blocks).view(16, -1), GGML_TYPE_BY_NAME[name].id, (16, 512))
    x = torch.randn(3, 512)
    ref = x @ gw.dequantize().T
    assert _rel(gw.to_module(mode="float")(x), ref) < 1e-6
    mod = gw.to_module()
    assert isinstance(mod, module)
    assert _rel(mod(x), ref) < 3e-2  # int8 requant and/or the bf16 kernel
    assert torch.equal(gw.rows(torch.tensor([[2, 0]])), gw.dequantize()[[2, 0]].unsqueeze(0))


def test_q4_k_blocks_map_exactly_to_int4_group_32():
    rng = np.random.default_rng(6)
    blocks = _random_k_blocks("Q4_K", 32, rng)
    qtype = gguf.GGMLQuantizationType.Q4_K
    ref = torch.from_numpy(gguf_dequantize(blocks, qtype).reshape(16, 512).astype(np.float32))
    gw = GGUFWeight(torch.from_numpy(blocks).view(16, -1), qtype.value, (16, 512))
    q4 = gw.to_int4()
    assert q4.group_size == 32
    assert (q4.dequantize() - ref).abs().max() < 1e-6 * ref.abs().max()


def test_requantizing_real_smollm2_q4_1_weights_costs_little():
    """The bundled model's Q4_1 matrices: exact int4, and what int8 requantization would add."""
    from studio.models.bundled import default_chat_model
    from studio.models.gguf_llm import load_gguf_llm

    sd = load_gguf_llm(default_chat_model()).state_dict
    w = sd["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(w, GGUFWeight) and w.type_name == "Q4_1" and w.shape == (576, 1536)
    ref = w.dequantize()
    assert (w.to_int4().dequantize() - ref).abs().max() < 1e-6 * ref.abs().max()
    err = w.to_int8().dequantize() - ref
    assert float(err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) < 0.03


def test_quant_embedding_looks_up_the_same_rows_as_the_dequantized_table():
    x = np.random.default_rng(7).standard_normal((40, 64)).astype(np.float32)
    gw, ref = _gguf_weight(x, "Q8_0")
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    for weight in (gw, quantize_int8(torch.from_numpy(x)), quantize_int4(torch.from_numpy(x), 32)):
        emb = weight.to_embedding()
        assert torch.equal(emb(ids), weight.dequantize()[ids])
    assert torch.equal(gw.to_embedding()(ids), ref[ids])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_and_int8_linear_on_cuda_match_float_matmul(dtype):
    # Ran on an H200 (torch 2.11): int4 rel err 3e-3..6e-3 for 576x576 .. 14336x4096, group 32/64/128.
    torch.manual_seed(0)
    w = torch.randn(1536, 576) * 0.05
    x = torch.randn(3, 576, device="cuda", dtype=dtype)
    for qw in (quantize_int4(w, 32), quantize_int8(w)):
        mod = qw.to_module(torch.randn(1536)).cuda()
        ref = x.float() @ qw.dequantize().cuda().T + mod.bias
        y = mod(x)
        assert y.dtype == dtype and _rel(y.float(), ref) < 2e-2


@pytest.mark.parametrize("k", [8, 12, 24, 40, 100])
def test_int8_linear_with_k_not_a_multiple_of_16_is_correct_and_does_not_crash(k):
    """The CPU int8pack kernel segfaults on these shapes; the module must route around it."""
    import subprocess
    import sys

    code = ("import torch; from studio.nn.packed_int import quantize_linear;"
            f"w = torch.randn(32, {k}); qw = quantize_linear(w, 'int8'); m = qw.to_module(None);"
            f"x = torch.randn(3, {k}); ref = x @ qw.dequantize(torch.float32).T; y = m(x);"
            "print(tuple(y.shape), float((y - ref).abs().max() / ref.abs().max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    shape, err = out.stdout.strip().rsplit(" ", 1)
    assert shape == "(3, 32)" and float(err) < 1e-5


# --- int4: one packed copy per device ------------------------------------------------------------

def _old_two_copy_output(qw, x: torch.Tensor) -> torch.Tensor:
    """What the module computed before it dropped its canonical copy: the CPU kernel on a packing
    made from the canonical buffers, with a bf16 table made from the float32 scale and zero."""
    from studio.nn.packed_int import _unpack_int4

    k = qw.shape[1]
    tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_int4(qw.packed), tiles)
    sz = torch.stack([qw.scale.t(), qw.zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k).to(torch.bfloat16), w, qw.group_size, sz)
    return y.reshape(*x.shape[:-1], -1).float()


def _buffer_bytes(mod: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in mod.buffers())


def _held_bytes(obj: object, seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from obj's attributes (dicts, lists, tuples included)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(v, seen) for v in obj)
    if isinstance(obj, torch.nn.Module):
        return _held_bytes(vars(obj), seen)
    return 0


@pytest.mark.parametrize("n,k,group", [(64, 256, 32), (80, 576, 32), (48, 96, 32), (176, 128, 64), (32, 256, 128)])
def test_int4_kernel_module_holds_only_the_kernel_packing_and_computes_what_it_did(n, k, group):
    from studio.engine.memory import estimate_module_bytes

    torch.manual_seed(0)
    qw = quantize_int4(torch.randn(n, k) * 0.05, group)
    mod = qw.to_module(torch.randn(n))
    assert mod.layout == "cpu"
    assert {name for name, _ in mod.named_buffers()} == {"kernel_weight", "kernel_sz", "bias"}
    assert mod.kernel_sz.dtype == torch.bfloat16
    # half a byte per weight, 2 x 2 bytes per group, the float32 bias: nothing else, nothing hidden
    expected = n * k // 2 + n * (k // group) * 4 + n * 4
    assert _buffer_bytes(mod) == estimate_module_bytes(mod) == expected
    assert _held_bytes(mod) == expected  # no tensor kept in a plain attribute either
    x = torch.randn(2, 3, k)
    assert torch.equal(mod(x), _old_two_copy_output(qw, x) + mod.bias)


@pytest.mark.parametrize("n,k", [(64, 256), (16, 64), (48, 96), (80, 576), (176, 128), (240, 192)])
def test_cpu_packing_undone_by_reshapes_matches_the_kernel_reading_it_back(n, k):
    from studio.nn.packed_int import _cpu_layout_nibbles, _kernel_nibbles, _pack_for, _pack_int4

    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    w = _pack_for(_pack_int4(q), "cpu")
    assert torch.equal(_cpu_layout_nibbles(w, k), q)
    assert torch.equal(_kernel_nibbles(w, n, k, 32), q)  # identity rows through the kernel: exact


def test_int4_dequantize_is_exact_nibbles_with_the_bf16_scale_and_zero_the_kernel_uses():
    from studio.nn.packed_int import Int4Weight

    torch.manual_seed(1)
    qw = quantize_int4(torch.randn(64, 256) * 0.05, 32)
    mod = qw.to_module()
    rounded = Int4Weight(qw.packed, qw.scale.bfloat16().float(), qw.zero.bfloat16().float(), 32)
    assert torch.equal(mod.dequantize(), rounded.dequantize())
    # vs the float32 tables: |dw| <= 8 |d scale| + |d zero|, each at most half a bf16 step (2^-8 relative)
    bound = (8 * qw.scale.abs() + qw.zero.abs()).repeat_interleave(32, dim=1) * 2.0 ** -8 * (1 + 1e-5)
    assert ((mod.dequantize() - qw.dequantize()).abs() <= bound).all()
    assert (mod.dequantize() != qw.dequantize()).any()  # the rounding is real, so the bound above is the claim
    # tables that bfloat16 holds exactly come back exactly
    exact = Int4Weight(qw.packed, qw.scale.bfloat16().float(), qw.zero.bfloat16().float(), 32)
    assert torch.equal(exact.to_module().dequantize(), exact.dequantize())


def test_int4_moves_and_dtype_casts_keep_one_packing_and_the_same_outputs():
    torch.manual_seed(2)
    qw = quantize_int4(torch.randn(96, 128) * 0.05, 32)
    mod = qw.to_module()
    x = torch.randn(4, 128)
    ref = mod(x)
    w0 = mod.kernel_weight.clone()
    assert mod.to("cpu") is mod and torch.equal(mod(x), ref)
    mod.half()  # the model's dtype changes; the kernel's bf16 table must not
    assert mod.kernel_sz.dtype == torch.bfloat16 and torch.equal(mod.kernel_weight, w0)
    assert torch.equal(mod(x), ref) and mod(x.half()).dtype == torch.float16
    mod.float()
    assert torch.equal(mod(x), ref)
    mod.to("meta")  # no kernel on meta: canonical shapes only
    assert mod.layout == "canonical" and mod.packed.shape == (96, 64) and mod.scale.shape == (96, 4)
    mod.to_empty(device="cpu")
    assert mod.layout == "cpu" and mod.kernel_weight.shape == w0.shape and mod(x).shape == (4, 96)


def test_int4_backend_switch_repacks_and_dequant_computes_the_same_weight():
    torch.manual_seed(3)
    qw = quantize_int4(torch.randn(64, 256) * 0.05, 64)
    mod = qw.to_module()
    x = torch.randn(3, 256)
    ref, dense = mod(x), mod.dequantize()
    mod.backend = "dequant"
    assert mod.layout == "canonical" and {n for n, _ in mod.named_buffers()} == {"packed", "scale", "zero"}
    assert torch.equal(mod.dequantize(), dense) and torch.equal(mod(x), x @ dense.T)
    mod.backend = "auto"
    assert mod.layout == "cpu" and torch.equal(mod(x), ref)  # bf16 tables round to themselves


def test_int4_state_dict_round_trips_through_save_and_across_representations():
    import io

    torch.manual_seed(4)
    qw = quantize_int4(torch.randn(80, 192) * 0.05, 32)
    mod = qw.to_module(torch.randn(80))
    x = torch.randn(2, 192)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()))
    assert set(sd) == {"kernel_weight", "kernel_sz", "bias"}
    fresh = quantize_int4(torch.randn(80, 192), 32).to_module(torch.zeros(80))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), mod(x)) and fresh.layout == "cpu"
    # the kernel packing loads into a canonical module and back, converted, not refused
    canon = Int4Linear(*(getattr(quantize_int4(torch.randn(80, 192), 32), a) for a in ("packed", "scale", "zero")),
                       32, torch.zeros(80), backend="dequant")
    canon.load_state_dict(sd)
    assert canon.layout == "canonical" and torch.equal(canon.dequantize(), mod.dequantize())
    again = quantize_int4(torch.randn(80, 192), 32).to_module(torch.zeros(80))
    again.load_state_dict(canon.state_dict())
    assert torch.equal(again.kernel_weight, mod.kernel_weight) and torch.equal(again(x), mod(x))


def test_int4_pack_for_a_device_without_its_kernel_or_the_same_type_changes_nothing():
    mod = quantize_int4(torch.randn(64, 128), 32).to_module()
    w = mod.kernel_weight
    assert mod.pack_for("cpu") is mod and mod.kernel_weight is w
    assert mod.pack_for("meta").kernel_weight is w


def test_int4_weight_nbytes_are_its_buffers_bytes():
    qw = quantize_int4(torch.randn(48, 128), 32)
    assert qw.nbytes == sum(t.numel() * t.element_size() for t in (qw.packed, qw.scale, qw.zero)) == 48 * 64 + 48 * 4 * 8


@pytest.mark.gpu
def test_int4_cpu_to_cuda_and_back_repacks_exactly():
    torch.manual_seed(5)
    qw = quantize_int4(torch.randn(1536, 576) * 0.05, 32)
    mod = qw.to_module(torch.randn(1536))
    w_cpu, dense = mod.kernel_weight.clone(), mod.dequantize()
    x = torch.randn(3, 576)
    streamed = qw.to_module(torch.randn(1536))
    mod.cuda()
    assert mod.layout == "cuda" and mod.kernel_weight.is_cuda and mod.kernel_weight.dtype == torch.int32
    assert _buffer_bytes(mod) == 1536 * 576 // 2 + 1536 * 18 * 4 + 1536 * 4
    assert torch.equal(mod.dequantize().cpu(), dense)
    y = mod(x.cuda())
    assert _rel(y.float().cpu(), x @ dense.T + mod.bias.cpu()) < 2e-2
    # buffers moved one by one (the block streamer): the CPU packing on the GPU still computes the same
    streamed.load_state_dict(mod.state_dict())  # CUDA packing read back into the CPU one
    assert streamed.layout == "cpu" and torch.equal(streamed.kernel_weight, w_cpu)
    for name, b in list(streamed._buffers.items()):
        streamed._buffers[name] = b.cuda()
    assert torch.equal(streamed(x.cuda()), y)
    mod.cpu()
    assert mod.layout == "cpu" and torch.equal(mod.kernel_weight, w_cpu) and torch.equal(mod.dequantize(), dense)
    # pack_for: the CUDA packing kept in RAM, so buffer-by-buffer moves need no re-pack per call
    streamed.cpu().pack_for("cuda")
    assert streamed.layout == "cuda" and streamed.kernel_weight.device.type == "cpu"
    for name, b in list(streamed._buffers.items()):
        streamed._buffers[name] = b.cuda()
    assert torch.equal(streamed(x.cuda()), y)
