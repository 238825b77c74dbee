"""Mixture-of-experts and MLA families vs transformers on tiny random models, from HF folders and from
GGUF files written with the `gguf` package in llama.cpp's layout (stacked `ffn_*_exps`, `ffn_gate_inp`,
shared `ffn_*_shexp`, DeepSeek's `attn_kv_a_mqa` / `attn_k_b` / `attn_v_b`, `exp_probs_b`)."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize

transformers = pytest.importorskip("transformers")

from test_gguf import tiny_vocab  # noqa: E402
from test_llm_parity import spread_weights, write_tokenizer  # noqa: E402

from studio.engine.pipelines.decoding import generate_tokens  # noqa: E402
from studio.engine.sampling import greedy  # noqa: E402
from studio.models.gguf_llm import load_gguf_llm  # noqa: E402
from studio.models.hf_loader import load_hf_folder  # noqa: E402
from studio.models.llm_build import build_llm  # noqa: E402
from studio.models.moe import Experts, SparseMoE  # noqa: E402

VOCAB = 288  # test_gguf's byte-level vocabulary size, so one tokenizer serves both layouts
PROMPT_LEN, NEW_TOKENS = 16, 24
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              max_position_embeddings=128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dsv2(t, **kw):
    return t.DeepseekV2Config(**COMMON, num_hidden_layers=3, num_key_value_heads=4, moe_intermediate_size=32,
                              n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
                              kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, **kw)


FAMILIES = {
    "mixtral": lambda t: (t.MixtralConfig(**COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                          num_local_experts=4, num_experts_per_tok=2), t.MixtralForCausalLM),
    "qwen3_moe": lambda t: (t.Qwen3MoeConfig(**COMMON, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                             moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                                             norm_topk_prob=True, mlp_only_layers=[1]), t.Qwen3MoeForCausalLM),
    # V2-Lite's shape: no q compression, greedy softmax routing
    "deepseek_v2_lite": lambda t: (_dsv2(t, q_lora_rank=None, topk_method="greedy"), t.DeepseekV2ForCausalLM),
    # V2's: q compression, group-limited routing, routed scaling, yarn rope with mscale
    "deepseek_v2": lambda t: (_dsv2(t, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    routed_scaling_factor=2.0,
                                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                     "original_max_position_embeddings": 32, "beta_fast": 32,
                                                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
                                t.DeepseekV2ForCausalLM),
    # V3's: sigmoid scores with a selection bias, top-2-sum group scores, renormalised and scaled
    "deepseek_v3": lambda t: (t.DeepseekV3Config(**COMMON, num_hidden_layers=3, num_key_value_heads=4,
                                                 moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
                                                 n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                                                 q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                                 v_head_dim=16, n_group=4, topk_group=2, norm_topk_prob=True,
                                                 routed_scaling_factor=2.5), t.DeepseekV3ForCausalLM),
}


def make_reference(family: str, seed: int = 0):
    cfg, cls = FAMILIES[family](transformers)
    torch.manual_seed(seed)
    ref = cls(cfg).eval()
    spread_weights(ref, seed)
    with torch.no_grad():  # a selection bias that changes which experts win, so a missing one shows
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return ref


def save_folder(tmp_path, family: str, ref) -> object:
    folder = tmp_path / family
    ref.save_pretrained(folder)
    write_tokenizer(folder, VOCAB)
    return folder


def reference_greedy(ref, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.clone()
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.cat([ids, ref(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def check_parity(ref, loaded, atol: float = 1e-4) -> None:
    model = build_llm(loaded.config, loaded.state_dict, dtype=torch.float32, fuse=True)
    model.setup_caches(1, PROMPT_LEN + NEW_TOKENS)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(prompt).logits
        got = model(prompt, torch.arange(PROMPT_LEN))
    assert (got - expected).abs().max().item() <= atol
    ours = list(generate_tokens(model, prompt[0].tolist(), NEW_TOKENS, greedy))
    assert ours == reference_greedy(ref, prompt, NEW_TOKENS)


# --- GGUF in llama.cpp's layout ----------------------------------------------------------------------

_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "deepseek_v2_lite": "deepseek2", "deepseek_v2": "deepseek2",
         "deepseek_v3": "deepseek2"}
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          "block_sparse_moe.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
          "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp",
          "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
          "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
          "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(family: str, ref) -> dict[str, np.ndarray]:
    """The reference's weights under llama.cpp's names: experts stacked (E, out, in), Q/K permuted for
    `llama`, DeepSeek's kv_b split per head into k_b (H, rank, nope) and v_b (H, v, rank)."""
    c = ref.config
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for key, t in ref.state_dict().items():
        a = t.detach().float().numpy().copy()
        m = _EXPERT.fullmatch(key)
        if m:
            experts.setdefault((int(m.group(1)), _ROLE[m.group(3)]), {})[int(m.group(2))] = a
            continue
        if key == "model.embed_tokens.weight":
            out["token_embd.weight"] = a
            continue
        if key in ("model.norm.weight", "lm_head.weight"):
            out[{"model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[key]] = a
            continue
        _, _, i, rest = key.split(".", 3)
        stem, suffix = rest.rsplit(".", 1)
        if stem == "mlp.experts":  # transformers 5 keeps experts stacked in memory: (E, 2I, H) and (E, H, I)
            if suffix == "gate_up_proj":
                gate, up = np.split(a, 2, axis=1)
                out[f"blk.{i}.ffn_gate_exps.weight"] = np.ascontiguousarray(gate)
                out[f"blk.{i}.ffn_up_exps.weight"] = np.ascontiguousarray(up)
            else:
                out[f"blk.{i}.ffn_down_exps.weight"] = a
            continue
        if suffix == "e_score_correction_bias":
            out[f"blk.{i}.exp_probs_b.bias"] = a
            continue
        if family == "mixtral" and stem in ("self_attn.q_proj", "self_attn.k_proj"):
            a = _permute(a, c.num_attention_heads if "q_proj" in stem else c.num_key_value_heads)
        if stem == "self_attn.kv_b_proj":  # what convert_hf_to_gguf writes for llama.cpp's MLA
            kv = a.reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
            out[f"blk.{i}.attn_k_b.weight"] = np.ascontiguousarray(kv[:, :c.qk_nope_head_dim].transpose(0, 2, 1))
            out[f"blk.{i}.attn_v_b.weight"] = np.ascontiguousarray(kv[:, c.qk_nope_head_dim:])
            continue
        out[f"blk.{i}.{_NAMES[stem]}.{suffix}"] = a
    for (i, role), per in experts.items():
        out[f"blk.{i}.ffn_{role}_exps.weight"] = np.stack([per[e] for e in sorted(per)])
    return out


def write_moe_gguf(path, family: str, ref, qtype: str = "F32") -> None:
    c = ref.config
    arch = _ARCH[family]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_vocab_size(VOCAB)
    if arch == "deepseek2":
        # the layout llama.cpp's converter writes since its MLA rework: one compressed kv "head"
        w.add_head_count_kv(1)
        w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        w.add_value_length(c.kv_lora_rank)
        w.add_uint32(f"{arch}.attention.key_length_mla", c.qk_nope_head_dim + c.qk_rope_head_dim)
        w.add_uint32(f"{arch}.attention.value_length_mla", c.v_head_dim)
        w.add_rope_dimension_count(c.qk_rope_head_dim)
        w.add_kv_lora_rank(c.kv_lora_rank)
        if c.q_lora_rank:
            w.add_q_lora_rank(c.q_lora_rank)
        w.add_leading_dense_block_count(c.first_k_dense_replace)
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_shared_count(c.n_shared_experts)
        w.add_expert_weights_scale(c.routed_scaling_factor)
        v3 = family == "deepseek_v3"
        w.add_expert_weights_norm(bool(c.norm_topk_prob) if v3 else False)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
        if getattr(c, "topk_method", "noaux_tc") != "greedy":
            w.add_uint32(f"{arch}.expert_group_count", c.n_group)
            w.add_uint32(f"{arch}.expert_group_used_count", c.topk_group)
        rope = c.rope_parameters
        if rope.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    else:
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(c.head_dim)
        w.add_expert_count(c.num_local_experts if family == "mixtral" else c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if family == "qwen3_moe":
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    q = gguf.GGMLQuantizationType[qtype]
    for name, a in gguf_tensors(family, ref).items():
        # llama.cpp keeps routers, norms and small tensors in float; experts and projections quantize
        if qtype != "F32" and a.ndim >= 2 and "gate_inp" not in name and a.shape[-1] % 32 == 0:
            w.add_tensor(name, np.ascontiguousarray(gguf_quantize(a, q)), raw_dtype=q)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_folder_logits_and_greedy_tokens_match_transformers(tmp_path, family):
    ref = make_reference(family)
    check_parity(ref, load_hf_folder(save_folder(tmp_path, family, ref)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_in_llama_cpp_layout_matches_transformers(tmp_path, family):
    ref = make_reference(family)
    path = tmp_path / f"{family}.gguf"
    write_moe_gguf(path, family, ref)
    loaded = load_gguf_llm(path)
    assert loaded.config["model_type"] == ref.config.model_type
    check_parity(ref, loaded)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_quantized_gguf_experts_stay_packed_and_close(tmp_path, family):
    # Q8_0 experts become one packed module per expert (int8 per channel), never a float copy
    ref = make_reference(family)
    path = tmp_path / f"{family}-q8.gguf"
    write_moe_gguf(path, family, ref, "Q8_0")
    loaded = load_gguf_llm(path)
    model = build_llm(loaded.config, loaded.state_dict, fuse=True)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(e.packed is not None and e.gate_up_proj is None for e in experts)
    model.setup_caches(1, PROMPT_LEN)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(prompt).logits
        got = model(prompt, torch.arange(PROMPT_LEN))
    rel = ((got - expected).norm() / expected.norm()).item()
    # Q8_0's rounding flips a few routing choices of these deliberately spread tiny weights (the
    # dequantized float model is ~0.1 off too); a wrong expert layout is off by ~1
    assert 0 < rel < 0.15, rel
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.7


def test_active_expert_loop_equals_gathered_bmm_and_a_per_token_reference():
    torch.manual_seed(0)
    ex = Experts(6, 16, 8)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
    x = torch.randn(10, 16)
    idx = torch.rand(10, 6).topk(2, dim=-1).indices
    w = torch.rand(10, 2)
    slow = torch.stack([sum(w[n, j] * (lambda g, u: (torch.nn.functional.silu(g) * u) @ ex.down_proj[idx[n, j]].T)(
        *(x[n] @ ex.gate_up_proj[idx[n, j]].T).chunk(2)) for j in range(2)) for n in range(10)])
    with torch.inference_mode():
        assert torch.allclose(ex(x, w, idx), slow, atol=1e-4)
        assert torch.allclose(ex.forward_gathered(x, w, idx), slow, atol=1e-4)


def test_int8_quantized_hf_moe_packs_experts_and_keeps_the_router_exact(tmp_path):
    from studio.models.llm_build import quantize_state

    ref = make_reference("qwen3_moe")
    loaded = load_hf_folder(save_folder(tmp_path, "qwen3_moe", ref))
    cfg, state, saved = quantize_state(loaded.config, loaded.state_dict, "int8", "cpu")
    assert saved > 0 and isinstance(state["model.layers.0.mlp.gate.weight"], torch.Tensor)
    model = build_llm(cfg, state, fuse=True)
    moe = model.model.layers[0].mlp
    assert isinstance(moe, SparseMoE) and moe.experts.packed is not None
    model.setup_caches(1, PROMPT_LEN)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(prompt).logits
        got = model(prompt, torch.arange(PROMPT_LEN))
    assert ((got - expected).norm() / expected.norm()).item() < 0.05


def test_missing_expert_gives_a_clear_error(tmp_path):
    from studio.errors import UserError

    ref = make_reference("mixtral")
    folder = save_folder(tmp_path, "mixtral", ref)
    loaded = load_hf_folder(folder)
    del loaded.state_dict["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(UserError, match="expert weights"):
        build_llm(loaded.config, loaded.state_dict)


def test_chat_config_json_of_each_family_is_read(tmp_path):
    ref = make_reference("qwen3_moe")
    folder = save_folder(tmp_path, "qwen3_moe", ref)
    cfg = json.loads((folder / "config.json").read_text())
    from studio.models.llm import LLMConfig

    c = LLMConfig.from_hf(cfg)
    assert c.mlp_types == ["moe", "dense", "moe"] and c.n_experts == 8 and c.n_experts_per_tok == 3


# --- detection from real-size header-only files --------------------------------------------------------

def test_qwen3_30b_a3b_folder_reports_total_and_active_parameters(tmp_path):
    from library_fixtures import write_safetensors

    from studio.library.detect import detect

    h, layers, experts, inter, vocab = 2048, 48, 128, 768, 151936
    root = tmp_path / "Qwen3-30B-A3B"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": h,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": experts, "num_experts_per_tok": 8, "moe_intermediate_size": inter,
        "max_position_embeddings": 40960, "vocab_size": vocab}))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (4096, h), p + "self_attn.k_proj.weight": (512, h),
                   p + "self_attn.v_proj.weight": (512, h), p + "self_attn.o_proj.weight": (h, 4096),
                   p + "mlp.gate.weight": (experts, h)}
        for e in range(experts):
            shapes |= {f"{p}mlp.experts.{e}.gate_proj.weight": (inter, h),
                       f"{p}mlp.experts.{e}.up_proj.weight": (inter, h),
                       f"{p}mlp.experts.{e}.down_proj.weight": (h, inter)}
    write_safetensors(root / "model.safetensors", shapes, "BF16")
    det = detect(root)
    assert (det.family, det.role) == ("qwen3_moe", "llm")
    assert 30.0e9 < det.params < 31.0e9 and 3.0e9 < det.active_params < 3.6e9  # "30B-A3B"
    routed = layers * experts * 3 * inter * h * 2
    kv = 2 * layers * 4 * 128 * 4096 * 2
    assert det.vram_bytes == det.params * 2 + kv + (256 << 20)
    ram_note = next(n for n in det.notes if n.startswith("with experts in RAM"))
    assert f"{(det.params * 2 - routed + kv + (256 << 20)) / (1 << 30):.1f} GiB VRAM" in ram_note


def test_deepseek_v2_lite_gguf_counts_experts_and_the_compressed_cache(tmp_path):
    from library_fixtures import STRING, U32, write_gguf

    from studio.library.detect import detect

    h, layers, experts, inter, rank, rope, vocab = 2048, 27, 64, 1408, 512, 64, 102400
    kv = {"general.architecture": (STRING, "deepseek2"), "general.file_type": (U32, 7),
          "deepseek2.block_count": (U32, layers), "deepseek2.context_length": (U32, 163840),
          "deepseek2.attention.head_count": (U32, 16), "deepseek2.attention.head_count_kv": (U32, 1),
          "deepseek2.attention.key_length": (U32, rank + rope), "deepseek2.attention.kv_lora_rank": (U32, rank),
          "deepseek2.rope.dimension_count": (U32, rope), "deepseek2.expert_count": (U32, experts),
          "deepseek2.expert_used_count": (U32, 6), "deepseek2.expert_shared_count": (U32, 2)}
    t: dict = {"token_embd.weight": ((vocab, h), "Q8_0"), "output.weight": ((vocab, h), "Q8_0")}
    for i in range(layers):
        b = f"blk.{i}."
        t |= {b + "attn_q.weight": ((16 * 192, h), "Q8_0"), b + "attn_kv_a_mqa.weight": ((rank + rope, h), "Q8_0"),
              b + "attn_kv_b.weight": ((16 * 256, rank), "Q8_0"), b + "attn_output.weight": ((h, 16 * 128), "Q8_0")}
        if i == 0:
            t |= {b + "ffn_gate.weight": ((10944, h), "Q8_0"), b + "ffn_up.weight": ((10944, h), "Q8_0"),
                  b + "ffn_down.weight": ((h, 10944), "Q8_0")}
        else:
            t |= {b + "ffn_gate_inp.weight": ((experts, h), "F32"),
                  b + "ffn_gate_exps.weight": ((experts, inter, h), "Q8_0"),
                  b + "ffn_up_exps.weight": ((experts, inter, h), "Q8_0"),
                  b + "ffn_down_exps.weight": ((experts, h, inter), "Q8_0"),
                  b + "ffn_gate_shexp.weight": ((2 * inter, h), "Q8_0"), b + "ffn_up_shexp.weight": ((2 * inter, h), "Q8_0"),
                  b + "ffn_down_shexp.weight": ((h, 2 * inter), "Q8_0")}
    det = detect(write_gguf(tmp_path / "DeepSeek-V2-Lite-Q8_0.gguf", kv, t))
    assert (det.family, det.role, det.dtype) == ("deepseek2", "llm", "Q8_0")
    assert 15.5e9 < det.params < 16.0e9 and 2.3e9 < det.active_params < 2.7e9  # "16B, 2.4B active"
    weights = det.file_size - 0  # header-only file: its declared size is header + tensor data
    cache = layers * (rank + rope) * 4096 * 2  # 576 numbers per token and layer, not 16 heads x (192 + 128) x 2
    assert abs(det.vram_bytes - (weights + cache + (256 << 20))) < (1 << 20)


# --- the chat pipeline ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family,layout", [("qwen3_moe", "hf"), ("mixtral", "gguf"), ("deepseek_v2_lite", "hf"),
                                           ("deepseek_v3", "gguf")])
def test_chat_pipeline_answers_with_the_reference_greedy_tokens(tmp_path, family, layout):
    from types import SimpleNamespace

    from test_chat_pipeline import Recorder, job

    from studio.engine.context import ModelCache
    from studio.engine.device import DeviceProfile
    from studio.engine.pipelines.chat import encode_prompt, render_prompt, run_chat

    ref = make_reference(family)
    if layout == "hf":
        model = save_folder(tmp_path, family, ref)
    else:
        model = tmp_path / f"{family}.gguf"
        write_moe_gguf(model, family, ref)
    rec = Recorder(ModelCache(), DeviceProfile(kind="cpu", name="test", torch_device="cpu"))
    messages = [{"role": "user", "content": "the"}]
    out = run_chat(job(model, messages=messages, max_tokens=6), rec.ctx)
    assert "".join(rec.tokens) == out["text"] and out["completion_tokens"] >= 1
    loaded = load_gguf_llm(model) if layout == "gguf" else load_hf_folder(model)
    cm = SimpleNamespace(tokenizer=loaded.tokenizer, chat_template=loaded.chat_template, bos_token=loaded.bos_token,
                         eos_token=loaded.eos_token, add_bos=loaded.add_bos)
    prompt = encode_prompt(cm, render_prompt(cm, messages))
    assert len(prompt) == out["prompt_tokens"]
    expected = reference_greedy(ref, torch.tensor([prompt]), out["completion_tokens"])
    assert loaded.tokenizer.decode(expected, skip_special_tokens=True) == out["text"]
