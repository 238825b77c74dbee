"""studio.nn: the shared PackedLinear interface across formats, and the attention dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from studio.nn.attention import attention
from studio.nn.packed import PackedLinear
from studio.nn.packed_fp8 import Fp8Linear, Fp8Weight, fp8_supported
from studio.nn.packed_gguf import GGUFWeight
from studio.nn.packed_int import quantize_int4, quantize_int8

gguf = pytest.importorskip("gguf")


def _layers(w: torch.Tensor, bias: torch.Tensor) -> dict[str, PackedLinear]:
    from gguf.quants import quantize as gguf_quantize

    raw = torch.from_numpy(gguf_quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0))
    out = {"int8": quantize_int8(w).to_module(bias), "int4": quantize_int4(w, 32).to_module(bias),
           "gguf": GGUFWeight(raw, int(gguf.GGMLQuantizationType.Q8_0), tuple(w.shape)).to_module(bias, mode="gguf")}
    if fp8_supported():
        out["fp8"] = Fp8Linear.from_linear(torch.nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False))
        out["fp8_unscaled"] = Fp8Weight(w.to(torch.float8_e4m3fn)).to_module(bias)
    return out


def test_every_packed_layer_is_a_packed_linear_that_multiplies_by_its_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    w, bias, x = torch.randn(64, 128, generator=g), torch.randn(64, generator=g), torch.randn(3, 128, generator=g)
    for name, layer in _layers(w, bias).items():
        assert isinstance(layer, PackedLinear), name
        assert (layer.out_features, layer.in_features) == (64, 128), name
        wq = layer.dequantize(torch.float32)
        assert wq.shape == (64, 128) and wq.dtype == torch.float32, name
        ref = F.linear(x, wq, None if layer.bias is None else layer.bias.float())
        err = (layer(x) - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, (name, err)  # the int kernels compute with bf16 inputs
        assert 0 < layer.nbytes < w.numel() * 4, name
        assert "in_features=128, out_features=64" in repr(layer), name


def test_attention_without_softcap_is_sdpa_exactly():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g) for _ in range(3))
    assert torch.equal(attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    mask = torch.rand(5, 5, generator=g) > 0.3
    mask[:, 0] = True
    assert torch.equal(attention(q, k, v, mask=mask, scale=0.5),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5))


def test_softcapped_attention_caps_the_logits_and_refuses_float_masks():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) * 10 for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    s = torch.tanh((q @ k.transpose(-1, -2)) * 0.25 / 5.0) * 5.0
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, mask=mask, scale=0.25, softcap=5.0), ref)
    with pytest.raises(ValueError, match="boolean mask"):
        attention(q, k, v, mask=torch.zeros(4, 4), softcap=5.0)
