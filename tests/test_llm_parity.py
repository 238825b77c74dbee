"""Our LLM vs transformers on tiny random models of every family, loaded from saved HF folders."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from studio.engine.context import UserError  # noqa: E402
from studio.engine.pipelines.decoding import decode_step, generate_tokens  # noqa: E402
from studio.engine.sampling import greedy  # noqa: E402
from studio.models.hf_loader import load_hf_folder  # noqa: E402
from studio.models.llm import LLMConfig  # noqa: E402
from studio.models.llm_build import build_llm  # noqa: E402

VOCAB = 128
PROMPT_LEN = 20
NEW_TOKENS = 32
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box OpenMP threads that
    spin-wait for each other make every small op 10-100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def write_tokenizer(folder, vocab_size: int = VOCAB) -> None:
    """A WordLevel tokenizer with ChatML-style special tokens: enough for loading and chat tests."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = specials + ["system", "user", "assistant"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template, "add_bos_token": False}))


def spread_weights(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises with std 0.02, which makes attention nearly uniform and would
    hide rope and mask mistakes: use larger random weights (norm weights random too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.0 if "gemma" in type(model).__name__.lower()
                                                                    else 1.0))
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


FAMILIES = {
    "llama": lambda t: (t.LlamaConfig(**COMMON, num_hidden_layers=2, head_dim=16), t.LlamaForCausalLM),
    "llama3_rope_scaling": lambda t: (t.LlamaConfig(
        **COMMON, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}), t.LlamaForCausalLM),
    "mistral_sliding_window": lambda t: (t.MistralConfig(**COMMON, num_hidden_layers=2, head_dim=16,
                                                         sliding_window=8), t.MistralForCausalLM),
    "qwen2": lambda t: (t.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True),
                        t.Qwen2ForCausalLM),
    "qwen3": lambda t: (t.Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=32), t.Qwen3ForCausalLM),
    "gemma": lambda t: (t.GemmaConfig(**COMMON, num_hidden_layers=2, head_dim=16), t.GemmaForCausalLM),
    "gemma2": lambda t: (t.Gemma2Config(**COMMON, num_hidden_layers=4, head_dim=16, sliding_window=8,
                                        query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=3.0), t.Gemma2ForCausalLM),
    "gemma3_text": lambda t: (t.Gemma3TextConfig(
        **COMMON, num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        t.Gemma3ForCausalLM),
    "phi3": lambda t: (t.Phi3Config(**COMMON, num_hidden_layers=2, pad_token_id=0), t.Phi3ForCausalLM),
}


def make_folder(tmp_path, family: str, seed: int = 0):
    cfg, cls = FAMILIES[family](transformers)
    torch.manual_seed(seed)
    ref = cls(cfg).eval()
    spread_weights(ref, seed)
    folder = tmp_path / family
    ref.save_pretrained(folder)
    write_tokenizer(folder)
    return ref, folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(tmp_path, family):
    ref, folder = make_folder(tmp_path, family)
    loaded = load_hf_folder(folder)
    model = build_llm(loaded.config, loaded.state_dict, dtype=torch.float32)
    model.setup_caches(1, PROMPT_LEN + NEW_TOKENS)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))

    with torch.inference_mode():
        expected = ref(prompt).logits  # (1, T, V)
        got = model(prompt, torch.arange(PROMPT_LEN))
    assert (got - expected).abs().max().item() <= 1e-4

    ours = list(generate_tokens(model, prompt[0].tolist(), NEW_TOKENS, greedy))
    ids = prompt.clone()
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            nxt = ref(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert ours == ids[0, PROMPT_LEN:].tolist()
    # The compiled path's step attends to a static bucket (here the whole 52-slot cache) with
    # masked slots past the position: same tokens, window and soft-capping included.
    assert list(generate_tokens(model, prompt[0].tolist(), NEW_TOKENS, greedy, step=decode_step)) == ours


def test_decode_with_cache_matches_full_recompute_past_the_sliding_window(tmp_path):
    # One token at a time through the cache must equal the whole sequence at once.
    _, folder = make_folder(tmp_path, "gemma2")
    loaded = load_hf_folder(folder)
    model = build_llm(loaded.config, loaded.state_dict)
    model.setup_caches(1, 32)
    seq = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(seq, torch.arange(24))
        model.setup_caches(1, 32)
        steps = [model(seq[:, i:i + 1], torch.tensor([i]), kv_len=i + 1) for i in range(24)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_config_reads_old_style_rope_fields():
    cfg = LLMConfig.from_hf({"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8,
                             "num_hidden_layers": 6, "num_attention_heads": 2, "intermediate_size": 16,
                             "head_dim": 4, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 4})
    assert cfg.rope_theta == 1e6 and cfg.local_rope_theta == 1e4
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]


def test_unknown_architecture_names_what_was_found_and_what_runs(tmp_path):
    # (mamba, the example here before, runs now: test_recurrent_parity.py)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(UserError) as err:
        load_hf_folder(tmp_path)
    assert err.value.kind == "unsupported"
    assert "falcon" in err.value.message and "llama" in err.value.message


def test_missing_pieces_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_hf_folder(tmp_path)
    _, folder = make_folder(tmp_path, "llama")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json"):
        load_hf_folder(folder)
    write_tokenizer(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        load_hf_folder(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(UserError, match="never unpickles"):
        load_hf_folder(folder)


def test_truncated_safetensors_is_reported_not_crashed(tmp_path):
    _, folder = make_folder(tmp_path, "llama")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_hf_folder(folder)
    assert err.value.kind == "bad_model" and "download it again" in err.value.message


def test_sharded_folder_loads_all_shards(tmp_path):
    ref, folder = make_folder(tmp_path, "qwen2")
    ref.save_pretrained(folder, max_shard_size="40KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    assert (folder / "model.safetensors.index.json").is_file()
    loaded = load_hf_folder(folder)
    assert set(loaded.state_dict) == set(ref.state_dict()) - {"lm_head.weight"}


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_fused_projections_give_the_same_logits(tmp_path, family):
    _, folder = make_folder(tmp_path, family)
    loaded = load_hf_folder(folder)
    plain = build_llm(loaded.config, loaded.state_dict)
    fused = build_llm(loaded.config, loaded.state_dict, fuse=True)
    assert fused.config.fused_qkv and hasattr(fused.model.layers[0].self_attn, "qkv_proj")
    seq = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        outs = []
        for m in (plain, fused):
            m.setup_caches(1, 16)
            outs.append(m(seq, torch.arange(16)))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_multimodal_gemma3_folder_loads_its_language_model(tmp_path):
    # Gemma3ForConditionalGeneration checkpoints: text config nested, weights under
    # language_model.*, vision tower beside them. Only the language model is read.
    from safetensors.torch import load_file, save_file

    ref, folder = make_folder(tmp_path, "gemma3_text")
    tensors = load_file(folder / "model.safetensors")
    renamed = {k.replace("model.", "language_model.model.", 1): v for k, v in tensors.items()}
    renamed["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(4)
    save_file(renamed, folder / "model.safetensors")
    text = json.loads((folder / "config.json").read_text())
    for key in ("vocab_size", "rms_norm_eps"):  # Hub configs leave defaults out; keep ones we changed
        if text[key] == transformers.Gemma3TextConfig().to_dict()[key]:
            text.pop(key)
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                    "architectures": ["Gemma3ForConditionalGeneration"]}))
    loaded = load_hf_folder(folder)
    model = build_llm(loaded.config, loaded.state_dict)
    model.setup_caches(1, PROMPT_LEN)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (model(prompt, torch.arange(PROMPT_LEN)) - ref(prompt).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_int8_quantized_load_of_every_family_stays_close_to_the_reference(tmp_path, family):
    # ChatJob.quant packs each family's matrices and fuses q/k/v and gate/up while packing
    # (qkv biases, q/k norms, tied heads and Phi-3's already-fused layout included)
    from studio.models.llm_build import quantize_state
    from studio.nn.packed import QuantEmbedding

    ref, folder = make_folder(tmp_path, family)
    loaded = load_hf_folder(folder)
    cfg, state, saved = quantize_state(loaded.config, loaded.state_dict, "int8", "cpu")
    model = build_llm(cfg, state, dtype=torch.float32, fuse=True)
    model.setup_caches(1, PROMPT_LEN)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(prompt).logits
        got = model(prompt, torch.arange(PROMPT_LEN))
    rel = ((got - expected).norm() / expected.norm()).item()
    assert 0 < rel < 0.05, rel
    assert saved > 0 and isinstance(model.model.embed_tokens, QuantEmbedding)
