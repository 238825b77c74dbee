"""The fused decode step (studio/models/llm_decode.py) against the model's own decode step.

On the CPU the Triton kernels run in Triton's interpreter (the same kernel code, numpy underneath),
so CI checks their arithmetic; the `gpu` tests check the compiled kernels and the CUDA graph.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")

from studio.engine.pipelines.decoding import decode_step, generate_tokens  # noqa: E402
from studio.engine.sampling import greedy_on_device  # noqa: E402
from studio.models.llm import LLM, LLMConfig  # noqa: E402
from studio.models.llm_build import build_llm, quantize_state  # noqa: E402

llm_decode = pytest.importorskip("studio.models.llm_decode")
FusedDecoder, MatvecConfig = llm_decode.FusedDecoder, llm_decode.MatvecConfig

BASE = dict(model_type="llama", vocab_size=128, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            intermediate_size=96, max_position_embeddings=512)
LAYOUTS = {
    "llama_gqa": {},
    "llama_mha": dict(n_kv_heads=4),
    "qwen2_qkv_bias": dict(model_type="qwen2", attention_bias=True),
    "mistral_sliding_window": dict(model_type="mistral", sliding_window=20),
    "qwen3_qk_norm": dict(model_type="qwen3", qk_norm=True),
}
PROMPT = 40  # with 16-key blocks over 4 splits, three splits hold keys: the merge is exercised


def random_model(dtype: torch.dtype = torch.float32, device: str = "cpu", cache: int = 64, seed: int = 0,
                 **overrides) -> LLM:
    cfg = LLMConfig(**{**BASE, **overrides})
    with torch.device("meta"):
        shapes = LLM(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {k: (1 + 0.1 * torch.randn(v.shape, generator=g)) if "norm" in k else 0.2 * torch.randn(v.shape, generator=g)
          for k, v in shapes.items()}
    model = build_llm(cfg, sd, dtype=dtype, device=device, fuse=True)
    model.setup_caches(1, cache)
    return model


def small_launches(model: LLM, **kw) -> FusedDecoder:
    """Few, large programs: the interpreter's time goes per program."""
    configs = {}
    for L in model.model.layers:
        a, mlp = L.self_attn, L.mlp
        configs[("qkv", a.qkv_proj.weight.shape[0], a.qkv_proj.weight.shape[1])] = MatvecConfig(8, 64, 4)
        configs[("plain", a.o_proj.weight.shape[0], a.o_proj.weight.shape[1])] = MatvecConfig(32, 64, 4)
        configs[("gated", mlp.gate_up_proj.weight.shape[0] // 2, mlp.gate_up_proj.weight.shape[1])] = MatvecConfig(32, 64, 4)
        configs[("plain", mlp.down_proj.weight.shape[0], mlp.down_proj.weight.shape[1])] = MatvecConfig(32, 128, 4)
    head = model.lm_head.weight
    configs[("plain", head.shape[0], head.shape[1])] = MatvecConfig(64, 64, 4)
    return FusedDecoder(model, configs=configs, use_graph=False, attn_splits=4, attn_block=16, **kw)


def prefill(model: LLM, n: int = PROMPT, seed: int = 1) -> torch.Tensor:
    dev = model.key_index.device
    prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.inference_mode():
        return model(prompt, torch.arange(n, device=dev), kv_len=n, last_only=True)[0, -1]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_step_gives_the_models_logits_and_cache_entries(layout):
    model = random_model(**LAYOUTS[layout])
    dec = small_launches(model)
    tok = prefill(model).argmax().view(1, 1)
    with torch.inference_mode():
        for pos in range(PROMPT, PROMPT + 3):
            p = torch.tensor([pos])
            want = decode_step(model, tok, p, pos + 1)[0, -1]
            kv = model.model.layers[1].self_attn.kv_cache
            k_want, v_want = kv.k_cache[0, :, pos].clone(), kv.v_cache[0, :, pos].clone()
            kv.k_cache[0, :, pos] = 0  # the fused step must write the slot itself
            kv.v_cache[0, :, pos] = 0
            got = dec(model, tok, p, pos + 1)[0, -1]
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), layout
            assert torch.allclose(kv.k_cache[0, :, pos], k_want, atol=1e-5)
            assert torch.allclose(kv.v_cache[0, :, pos], v_want, atol=1e-5)
            tok = want.argmax().view(1, 1)


def test_fused_step_in_bf16_is_as_close_to_fp32_as_the_model_in_bf16():
    ref, model = random_model(torch.float32, seed=3), random_model(torch.bfloat16, seed=3)
    dec = small_launches(model)
    tok = prefill(ref, seed=4).argmax().view(1, 1)
    prefill(model, seed=4)
    with torch.inference_mode():
        for pos in range(PROMPT, PROMPT + 2):
            p = torch.tensor([pos])
            want = decode_step(ref, tok, p, pos + 1)[0, -1]
            eager = decode_step(model, tok, p, pos + 1)[0, -1].float()
            fused = dec(model, tok, p, pos + 1)[0, -1]
            scale = want.abs().max().item()
            eager_err, fused_err = (eager - want).abs().max().item(), (fused - want).abs().max().item()
            assert fused_err <= max(2 * eager_err, 0.01 * scale), (fused_err, eager_err, scale)
            tok = want.argmax().view(1, 1)


def test_generate_tokens_through_the_fused_step_with_lookahead_gives_the_eager_tokens():
    model = random_model(seed=5)
    prompt = torch.randint(0, 128, (PROMPT,), generator=torch.Generator().manual_seed(6)).tolist()
    eager = list(generate_tokens(model, prompt, 4, greedy_on_device))
    fused = list(generate_tokens(model, prompt, 4, greedy_on_device, step=small_launches(model), lookahead=True))
    assert fused == eager


def test_a_fused_step_that_cannot_be_built_falls_back_to_eager_and_says_why(monkeypatch):
    model = random_model(seed=7)
    dec = small_launches(model)

    def broken() -> None:
        raise RuntimeError("no kernel image is available for this GPU")

    monkeypatch.setattr(dec, "run", broken)
    heard = []
    prompt = list(range(10))
    got = list(generate_tokens(model, prompt, 3, greedy_on_device, step=dec, on_fallback=heard.append))
    assert got == list(generate_tokens(model, prompt, 3, greedy_on_device))
    assert len(heard) == 1 and isinstance(heard[0], llm_decode.FusedStepError)
    assert "no kernel image" in str(heard[0])


def test_the_chat_pipeline_moves_on_to_torch_compile_when_the_fused_step_failed():
    from studio.engine.pipelines.chat import ChatModel, step_failed

    model = random_model(seed=8)
    cm = ChatModel(model=model, tokenizer=None, chat_template=None, bos_token=None, eos_token=None, stop_ids=set(),
                   add_bos=False, context_length=64, device=torch.device("cpu"), dtype=torch.float32, name="m",
                   nbytes=0)
    cm.compiled_step = small_launches(model)
    step_failed(cm, llm_decode.FusedStepError("x"))
    assert cm.fused_failed and not cm.compile_failed and cm.compiled_step is None
    cm.compiled_step = object()  # a torch.compile step failing next: eager from then on
    step_failed(cm, RuntimeError("inductor"))
    assert cm.compile_failed and cm.compiled_step is None


def test_models_the_fused_step_cannot_run_keep_the_compiled_step_and_say_why():
    assert llm_decode.unsupported(random_model()) is None
    gemma = random_model(model_type="gemma", gemma_norm=True, embed_scale=True, activation="gelu_tanh")
    assert "gemma" in llm_decode.unsupported(gemma)
    assert "extra norms" in llm_decode.unsupported(random_model(sandwich_norm=True))
    phi = random_model(partial_rotary_factor=0.5)
    assert "rotary" in llm_decode.unsupported(phi)
    plain = random_model()
    qcfg, qstate, _ = quantize_state(plain.config, dict(plain.state_dict()), "int8", "cpu")
    packed = build_llm(qcfg, qstate, dtype=torch.float32, device="cpu", fuse=True)
    packed.setup_caches(1, 64)
    assert "packed" in llm_decode.unsupported(packed)
    with pytest.raises(ValueError, match="cannot run this model"):
        FusedDecoder(gemma)


def test_a_fused_step_refuses_another_models_cache():
    model = random_model(seed=9)
    dec = small_launches(model)
    model.setup_caches(1, 32)  # new cache buffers: the kernels' pointers would be stale
    with pytest.raises(RuntimeError, match="another model or KV cache"):
        dec(model, torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), 1)


# --- on a GPU: the compiled kernels and the CUDA graph ------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cuda_graph_of_the_fused_step_matches_eager_fp32_over_many_positions(layout):
    model = random_model(torch.float32, "cuda", cache=1024, **LAYOUTS[layout])
    dec = FusedDecoder(model)  # default launch shapes, 16 splits, one graph for every position
    tok = prefill(model, n=300).argmax().view(1, 1)
    with torch.inference_mode():
        for pos in list(range(300, 310)) + [700, 1023]:
            p = torch.tensor([pos], device="cuda")
            want = decode_step(model, tok, p, pos + 1)[0, -1]
            got = dec(model, tok, p, 0)[0, -1]
            assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), (layout, pos)
            tok = want.argmax().view(1, 1)
    assert dec.graph is not None and dec.build_s > 0


@pytest.mark.gpu
def test_cuda_fused_step_in_bf16_answers_as_eager_bf16_does_against_fp32():
    ref = random_model(torch.float32, "cuda", cache=256, seed=11, hidden_size=512, head_dim=128,
                       intermediate_size=1024, n_heads=4, n_kv_heads=2)
    model = random_model(torch.bfloat16, "cuda", cache=256, seed=11, hidden_size=512, head_dim=128,
                         intermediate_size=1024, n_heads=4, n_kv_heads=2)
    dec = FusedDecoder(model)
    tok = prefill(ref, n=100).argmax().view(1, 1)
    prefill(model, n=100)
    with torch.inference_mode():
        for pos in range(100, 110):
            p = torch.tensor([pos], device="cuda")
            want = decode_step(ref, tok, p, pos + 1)[0, -1]
            eager = decode_step(model, tok, p, pos + 1)[0, -1].float()
            fused = dec(model, tok, p, 0)[0, -1]
            scale = want.abs().max().item()
            assert (fused - want).abs().max().item() <= max(2 * (eager - want).abs().max().item(), 0.01 * scale)
            tok = want.argmax().view(1, 1)
