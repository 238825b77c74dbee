"""Chat-time quantization of full-precision models and fitting the context into a VRAM budget."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_chat_pipeline import Recorder, job, make_folder  # noqa: E402

from studio.engine.context import ModelCache, UserError  # noqa: E402
from studio.engine.device import probe  # noqa: E402
from studio.engine.pipelines.chat import (  # noqa: E402
    ACTIVATION_BASE,
    MIN_CONTEXT,
    cache_bytes_per_position,
    fit_context,
    load_chat_model,
    run_chat,
)
from studio.models.llm import LLM, LLMConfig  # noqa: E402
from studio.models.llm_build import quantize_state, weight_bytes  # noqa: E402
from studio.nn.packed import QuantEmbedding  # noqa: E402
from studio.nn.packed_int import Int4Weight, Int8Weight  # noqa: E402
from studio.protocol import ChatJob  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("tiny_quant_chat"))


def load(folder, quant=""):
    return load_chat_model(folder, "hf", torch.device("cpu"), torch.float32, False, 256, lambda *a: None, quant)


def logits(cm, ids=(5, 9, 12, 40, 77)):
    cm.model.setup_caches(1, 16)
    t = torch.tensor([list(ids)])
    with torch.inference_mode():
        return cm.model(t, torch.arange(t.shape[1])).float()


@pytest.mark.parametrize("mode, tol, kind", [("int8", 0.05, Int8Weight), ("int4", 0.5, Int4Weight)])
def test_quantized_chat_model_is_packed_smaller_and_close(folder, mode, tol, kind):
    # A random tiny model compounds each matrix's error (~9% for int4 group 64 on Gaussian weights,
    # checked below per matrix) through every layer; real models are far smoother.
    full, packed = load(folder), load(folder, mode)
    want, got = logits(full), logits(packed)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < tol, rel
    assert rel > 0  # it really is quantized, not the same weights
    assert isinstance(packed.model.model.embed_tokens, QuantEmbedding)
    assert isinstance(packed.model.model.embed_tokens.weight_q, kind)
    assert packed.nbytes < full.nbytes * (0.45 if mode == "int8" else 0.4)
    assert packed.notes and mode in packed.notes[0] and "smaller" in packed.notes[0]


def test_quantize_state_keeps_what_the_format_cannot_take():
    sd = {"a.weight": torch.randn(32, 64), "b.weight": torch.randn(32, 48), "norm.weight": torch.ones(64),
          "c.weight": torch.randint(0, 5, (32, 64))}
    cfg = LLMConfig(model_type="llama", vocab_size=32, hidden_size=64, n_layers=0, n_heads=4, n_kv_heads=2,
                    head_dim=16, intermediate_size=128)
    _, out, saved = quantize_state(cfg, sd, "int4", "cpu", rows_per_chunk=10)  # chunks of 10 rows, put back together
    assert isinstance(out["a.weight"], Int4Weight) and out["a.weight"].shape == (32, 64)
    assert torch.allclose(out["a.weight"].dequantize(), sd["a.weight"], atol=(sd["a.weight"].abs().max() / 7).item())
    w = sd["a.weight"]
    assert ((out["a.weight"].dequantize() - w).norm() / w.norm()).item() < 0.1
    assert out["b.weight"] is sd["b.weight"]  # 48 is not a multiple of the int4 group
    assert out["norm.weight"] is sd["norm.weight"] and out["c.weight"] is sd["c.weight"]
    assert saved == 32 * 64 * 4 - out["a.weight"].nbytes
    with pytest.raises(UserError, match="int8, int4"):
        quantize_state(cfg, sd, "int3", "cpu")


def test_a_bad_quant_choice_is_a_clear_error(folder):
    rec = Recorder(ModelCache(), probe("cpu"))
    with pytest.raises(UserError, match="not one of int8, int4") as info:
        run_chat(job(folder, quant="q4"), rec.ctx)
    assert info.value.kind == "bad_input"


def test_chat_job_with_int8_answers_and_reports_the_note(folder):
    rec = Recorder(ModelCache(), probe("cpu"))
    out = run_chat(job(folder, quant="int8", max_tokens=6), rec.ctx)
    assert out["completion_tokens"] == 6 and any("int8" in n for n in out["notes"])
    assert run_chat(job(folder, quant="int8", max_tokens=6), rec.ctx)["notes"] == []  # told once, at load


def test_the_answer_line_shows_loading_notes_under_the_stats():
    pytest.importorskip("PySide6")
    from studio.ui.chat.message_view import describe_stats

    line = describe_stats({"completion_tokens": 5, "tokens_per_s": 10.0, "notes": ["Context shortened to 2816."]})
    assert line.splitlines() == ["5 tokens · 10.0 tok/s", "Context shortened to 2816."]
    assert "\n" not in describe_stats({"completion_tokens": 5, "notes": []})


def small_model(max_pos=32768) -> LLM:
    cfg = LLMConfig(model_type="llama", vocab_size=64, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=16, intermediate_size=128, max_position_embeddings=max_pos)
    return LLM(cfg)


def test_context_is_shortened_to_fit_the_budget_and_says_so():
    model = small_model()
    per_pos = cache_bytes_per_position(model, torch.bfloat16) + (2 * 128 + 6 * 64) * 2
    assert cache_bytes_per_position(model, torch.bfloat16) == 2 * 2 * 2 * 16 * 2
    budget = weight_bytes(model) + ACTIVATION_BASE + 3000 * per_pos
    ctx_len, note = fit_context(model, torch.bfloat16, 8192, budget)
    assert ctx_len == 2816  # 3000 positions fit, rounded down to 256
    assert "2816" in note and "8192" in note and "budget" in note
    assert fit_context(model, torch.bfloat16, 8192, None) == (8192, "")
    assert fit_context(model, torch.bfloat16, 2048, budget) == (2048, "")


def test_a_model_that_cannot_fit_the_budget_fails_with_numbers():
    model = small_model()
    with pytest.raises(UserError, match=r"needs .* of VRAM .*budget is .*int4") as info:
        fit_context(model, torch.bfloat16, 8192, weight_bytes(model) + ACTIVATION_BASE + (MIN_CONTEXT - 1) * 1000)
    assert info.value.kind == "out_of_memory"


@pytest.mark.gpu
def test_cuda_int4_chat_under_a_budget_keeps_the_packed_table_on_the_gpu_and_replays_the_graph(folder):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from studio.engine.memory import MemoryManager

    gpu = probe("cuda")
    rec = Recorder(ModelCache(), gpu, settings={"chat_context_length": 256})
    rec.ctx.memory = MemoryManager(gpu, budget_bytes=ACTIVATION_BASE + (64 << 20))
    first = run_chat(job(folder, quant="int4", max_tokens=20), rec.ctx)
    again = run_chat(job(folder, quant="int4", max_tokens=20), rec.ctx)
    assert first["text"] == again["text"] and first["completion_tokens"] == 20
    cm = rec.ctx.models.get(rec.ctx.models.summary()[0]["key"])
    assert cm.compiled_step is not None and not cm.compile_failed
    assert isinstance(cm.model.model.embed_tokens, QuantEmbedding)
    assert cm.model.model.embed_tokens.weight_q.device.type == "cuda"


def test_quantize_state_fuses_layer_by_layer_as_build_llm_would(folder):
    from studio.models.hf_loader import load_hf_folder
    from studio.models.llm_build import build_llm, fuse_projections

    loaded = load_hf_folder(folder)
    cfg, out, _ = quantize_state(loaded.config, loaded.state_dict, "int8", "cpu")
    assert cfg.fused_qkv and cfg.fused_gate_up
    assert "model.layers.0.self_attn.qkv_proj.weight" in out and "model.layers.0.self_attn.q_proj.weight" not in out
    # the same as quantizing after build_llm's own fusion: per-row quantization does not care
    fcfg, fused = fuse_projections(LLMConfig.from_hf(loaded.config), loaded.state_dict)
    _, ref, _ = quantize_state(fcfg, fused, "int8", "cpu")
    for key, w in ref.items():
        a, b = (w.dequantize(), out[key].dequantize()) if hasattr(w, "dequantize") else (w, out[key])
        assert torch.equal(a, b), key
    m = build_llm(cfg, out, fuse=True)
    m.setup_caches(1, 8)
    with torch.inference_mode():
        assert torch.isfinite(m(torch.tensor([[5, 6]]), torch.arange(2))).all()


def test_quant_on_an_already_packed_gguf_says_it_keeps_the_file_as_stored():
    rec = Recorder(ModelCache(), probe("cpu"))
    out = run_chat(ChatJob(messages=[{"role": "user", "content": "Hi"}], temperature=0.0, max_tokens=2,
                           quant="int8"), rec.ctx)  # the bundled SmolLM2 Q4_1
    assert any("already packed (GGUF)" in n and "kept as stored" in n for n in out["notes"])


def test_a_model_too_big_for_the_budget_is_refused_before_touching_the_gpu(folder, monkeypatch):
    from studio.engine.pipelines import chat
    from studio.models.hf_loader import load_hf_folder

    loaded = load_hf_folder(folder)
    weights = chat.state_bytes(loaded.state_dict, torch.bfloat16)
    assert weights == sum(t.numel() * 2 for t in loaded.state_dict.values())  # float tensors in bf16
    chat.check_weights_fit(loaded.config, loaded.state_dict, torch.bfloat16, None)  # no budget: no check
    chat.check_weights_fit(loaded.config, loaded.state_dict, torch.bfloat16, weights + ACTIVATION_BASE + (1 << 20))
    with pytest.raises(UserError, match=r"needs .* VRAM .* Weights setting, or --quant int4") as info:
        chat.check_weights_fit(loaded.config, loaded.state_dict, torch.bfloat16, weights)
    assert info.value.kind == "out_of_memory"
    # through the loader: refused before build_llm ever runs
    monkeypatch.setattr(chat, "build_llm", lambda *a, **k: pytest.fail("built despite not fitting"))
    with pytest.raises(UserError, match="budget is"):
        chat.load_chat_model(folder, "hf", torch.device("cuda"), torch.bfloat16, False, 256, lambda *a: None,
                             vram_budget=weights)
