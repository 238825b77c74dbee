"""Mamba / Mamba-2 vs transformers on tiny random models, from HF folders and from GGUF files in
llama.cpp's layout; the parallel prefill scans vs the one-token recurrence; a state that does not grow."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize

transformers = pytest.importorskip("transformers")

from studio.engine.context import JobContext, ModelCache  # noqa: E402
from studio.engine.device import probe  # noqa: E402
from studio.engine.pipelines.chat import run_chat  # noqa: E402
from studio.engine.pipelines.decoding import generate_tokens  # noqa: E402
from studio.engine.sampling import greedy  # noqa: E402
from studio.library.detect import detect  # noqa: E402
from studio.models.gguf_llm import load_gguf_llm  # noqa: E402
from studio.models.hf_loader import load_hf_folder  # noqa: E402
from studio.models.jamba import JambaConfig, JambaLM  # noqa: E402
from studio.models.llm_build import build_llm  # noqa: E402
from studio.models.mamba import MambaConfig, MambaLM, selective_scan, selective_step, ssd_scan, ssd_step  # noqa: E402
from studio.nn.packed_gguf import GGUFWeight  # noqa: E402
from studio.protocol import ChatJob  # noqa: E402
from studio.units import fmt_bytes  # noqa: E402

VOCAB = 288  # test_gguf's byte-level BPE vocabulary is this size
PROMPT_LEN = 21  # not a multiple of Mamba-2's chunk: the padded last chunk is exercised
NEW_TOKENS = 24
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _words() -> list[str]:
    words = SPECIALS + ["system", "user", "assistant"]
    return words + [f"w{i}" for i in range(VOCAB - len(words))]


def write_tokenizer(folder) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = _words()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE, "add_bos_token": False}))


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

FAMILIES = {
    "mamba": lambda t: (t.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                      conv_kernel=4, expand=2, layer_norm_epsilon=1e-5), t.MambaForCausalLM),
    "mamba_untied_biased": lambda t: (t.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, use_bias=True, time_step_rank=5,
        tie_word_embeddings=False), t.MambaForCausalLM),
    "mamba2": lambda t: (t.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                        num_heads=8, head_dim=8, n_groups=2, chunk_size=8, expand=2,
                                        tie_word_embeddings=False), t.Mamba2ForCausalLM),
    "mamba2_one_group_tied": lambda t: (t.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=3, num_heads=4, head_dim=16,
        n_groups=1, chunk_size=16, expand=2, tie_word_embeddings=True), t.Mamba2ForCausalLM),
    # attention on layers 1 and 3, experts on 0 and 2 (Mamba layers) and 3 (attention): every combination
    "jamba": lambda t: (t.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
        expert_layer_offset=0, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=2, max_position_embeddings=256), t.JambaForCausalLM),
}


def spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Larger random weights than the init, so a wrong scan, gate or norm cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):  # A = -exp(A_log) between about -0.2 and -5
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.3)
            elif name.endswith(".D") or name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_ref(family: str, seed: int = 0):
    cfg, cls = FAMILIES[family](transformers)
    torch.manual_seed(seed)
    ref = cls(cfg).eval()
    spread_weights(ref, seed)
    return ref


def make_folder(tmp_path, family: str, seed: int = 0):
    ref = make_ref(family, seed)
    folder = tmp_path / family
    ref.save_pretrained(folder)
    write_tokenizer(folder)
    return ref, folder


def reference_greedy(ref, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.clone()
    with torch.inference_mode():
        for _ in range(n):
            nxt = ref(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def prompt_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def check_parity(model: MambaLM, ref) -> None:
    prompt = prompt_ids()
    model.setup_caches(1, PROMPT_LEN + NEW_TOKENS)
    with torch.inference_mode():
        expected = ref(prompt).logits
        got = model(prompt, torch.arange(PROMPT_LEN))
    assert (got - expected).abs().max().item() <= 1e-4
    ours = list(generate_tokens(model, prompt[0].tolist(), NEW_TOKENS, greedy))
    assert ours == reference_greedy(ref, prompt, NEW_TOKENS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers_from_an_hf_folder(tmp_path, family):
    ref, folder = make_folder(tmp_path, family)
    loaded = load_hf_folder(folder)
    model = build_llm(loaded.config, loaded.state_dict, dtype=torch.float32)
    assert isinstance(model, JambaLM if family == "jamba" else MambaLM)
    check_parity(model, ref)


# --- GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes Mamba and Mamba-2 ---------------

_GGUF_NAMES = {"backbone.embeddings": "token_embd", "backbone.norm_f": "output_norm", "lm_head": "output",
               "norm": "attn_norm", "mixer.in_proj": "ssm_in", "mixer.conv1d": "ssm_conv1d",
               "mixer.x_proj": "ssm_x", "mixer.dt_proj": "ssm_dt", "mixer.out_proj": "ssm_out",
               "mixer.norm": "ssm_norm"}


def _gguf_tensor(arch: str, name: str, t: torch.Tensor, cfg) -> tuple[str, np.ndarray]:
    a = t.detach().float()
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("backbone.layers."):
        i, rest = stem.split(".", 3)[2], stem.split(".", 3)[3]
        if suffix in ("A_log", "D", "dt_bias"):  # "mixer" + parameter: no .weight suffix in GGUF
            i, rest = name.split(".")[2], None
            if suffix == "dt_bias":
                return f"blk.{i}.ssm_dt.bias", a.numpy()
            if suffix == "A_log":
                a = -torch.exp(a)
            if arch == "mamba2":
                a = a.reshape(-1, 1)
            return f"blk.{i}.ssm_{suffix[0].lower()}", a.numpy()
        if rest == "mixer.conv1d" and suffix == "weight":
            a = a.squeeze(1)
        if rest == "mixer.norm":
            a = a.reshape(cfg.n_groups, -1)
        return f"blk.{i}.{_GGUF_NAMES[rest]}.{suffix}", a.numpy()
    return f"{_GGUF_NAMES[stem]}.{suffix}", a.numpy()


_JAMBA_NAMES = {"input_layernorm": "attn_norm", "pre_ff_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mamba.in_proj": "ssm_in", "mamba.conv1d": "ssm_conv1d", "mamba.x_proj": "ssm_x",
                "mamba.dt_proj": "ssm_dt", "mamba.out_proj": "ssm_out", "mamba.dt_layernorm": "ssm_dt_norm",
                "mamba.b_layernorm": "ssm_b_norm", "mamba.c_layernorm": "ssm_c_norm",
                "feed_forward.router": "ffn_gate_inp", "feed_forward.gate_proj": "ffn_gate",
                "feed_forward.up_proj": "ffn_up", "feed_forward.down_proj": "ffn_down"}


def _jamba_tensors(sd: dict, inter: int) -> list[tuple[str, np.ndarray]]:
    """convert_hf_to_gguf.py's JambaModel: A_log -> A, conv squeezed, experts stacked per projection."""
    out = [("token_embd.weight", sd["model.embed_tokens.weight"]),
           ("output_norm.weight", sd["model.final_layernorm.weight"]), ("output.weight", sd["lm_head.weight"])]
    for name, t in sd.items():
        if not name.startswith("model.layers."):
            continue
        i, rest = name.split(".", 3)[2], name.split(".", 3)[3]
        if rest == "mamba.A_log":
            out.append((f"blk.{i}.ssm_a", -torch.exp(t)))
        elif rest == "mamba.D":
            out.append((f"blk.{i}.ssm_d", t))
        elif rest == "mamba.conv1d.weight":
            out.append((f"blk.{i}.ssm_conv1d.weight", t.squeeze(1)))
        elif rest == "feed_forward.experts.gate_up_proj":
            out += [(f"blk.{i}.ffn_gate_exps.weight", t[:, :inter]), (f"blk.{i}.ffn_up_exps.weight", t[:, inter:])]
        elif rest == "feed_forward.experts.down_proj":
            out.append((f"blk.{i}.ffn_down_exps.weight", t))
        else:
            stem, _, suffix = rest.rpartition(".")
            out.append((f"blk.{i}.{_JAMBA_NAMES[stem]}.{suffix}", t))
    return [(n, t.detach().float().numpy()) for n, t in out]


def write_gguf(path, ref, arch: str, qtype: str = "F32") -> None:
    """The model as convert_hf_to_gguf.py writes it; qtype quantizes the matrices whose rows fit its blocks."""
    cfg = ref.config
    q = gguf.GGMLQuantizationType[qtype]

    def add(name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        # llama.cpp leaves the router (ffn_gate_inp) unquantized
        if (qtype != "F32" and a.ndim >= 2 and name.endswith(".weight") and a.shape[-1] % 32 == 0
                and "ffn_gate_inp" not in name):
            w.add_tensor(name, gguf_quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    if arch == "jamba":
        w.add_context_length(cfg.max_position_embeddings)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv([cfg.num_key_value_heads if k == "attention" else 0 for k in cfg.layers_block_type])
        w.add_ssm_conv_kernel(cfg.mamba_d_conv)
        w.add_ssm_inner_size(cfg.mamba_expand * cfg.hidden_size)
        w.add_ssm_state_size(cfg.mamba_d_state)
        w.add_ssm_time_step_rank(cfg.mamba_dt_rank)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    else:
        w.add_context_length(2 ** 20)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_ssm_conv_kernel(cfg.conv_kernel)
        w.add_ssm_inner_size(cfg.expand * cfg.hidden_size)
        w.add_ssm_state_size(cfg.state_size)
    if arch == "jamba":
        pass
    elif arch == "mamba":
        w.add_ssm_time_step_rank(cfg.time_step_rank)
        w.add_ssm_dt_b_c_rms(False)
    else:
        w.add_ssm_time_step_rank(cfg.num_heads)
        w.add_ssm_group_count(cfg.n_groups)
    if arch != "jamba":
        w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    w.add_tokenizer_model("gpt2")
    from test_gguf import tiny_vocab  # the byte-level BPE vocabulary those tests write

    tokens, types, merges = tiny_vocab()
    assert len(tokens) == VOCAB
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(TEMPLATE)
    sd = ref.state_dict()
    if arch == "jamba":
        for gname, a in _jamba_tensors(sd, cfg.intermediate_size):
            add(gname, a)
    for name, t in sd.items() if arch != "jamba" else ():
        if name == "lm_head.weight" and torch.equal(t, sd["backbone.embeddings.weight"]):
            continue  # the converter drops a head equal to the embedding
        add(*_gguf_tensor(arch, name, t, cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_in_llama_cpp_layout_matches_transformers(tmp_path, family):
    ref = make_ref(family)
    arch = family.split("_")[0]
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, ref, arch)
    loaded = load_gguf_llm(path)
    sd = ref.state_dict()
    for key, t in loaded.state_dict.items():  # the converter's changes are undone exactly (A: to rounding)
        if key.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            continue  # llama.cpp's per-projection stacks; moe.py joins them (the logits below check it)
        assert t.shape == sd[key].shape, key
        assert torch.allclose(t.float(), sd[key], atol=1e-6, rtol=1e-6), key
    model = build_llm(loaded.config, loaded.state_dict, dtype=torch.float32)
    check_parity(model, ref)
    det = detect(path)
    assert det.family == arch and det.role == "llm"
    if arch == "jamba":
        return  # its memory estimate is tested below
    state = MambaConfig.from_hf(loaded.config).state_bytes(conv_elem=2)  # fp16 on a GPU
    assert f"recurrent state {fmt_bytes(state)} per conversation" in " ".join(det.notes)
    weights = sum(p.numel() * 2 for p in ref.parameters())  # an F32 file computes in half precision
    assert det.vram_bytes == weights + state + 256 * (1 << 20)  # the state, not a KV cache


@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_q8_0_gguf_keeps_matrices_and_experts_packed_and_stays_close(tmp_path, family):
    from studio.models.moe import Experts

    ref = make_ref(family)
    path = tmp_path / f"{family}-q8.gguf"
    write_gguf(path, ref, family, "Q8_0")
    loaded = load_gguf_llm(path)
    packed = [k for k, w in loaded.state_dict.items() if isinstance(w, GGUFWeight)]
    assert any("in_proj" in k for k in packed)
    model = build_llm(loaded.config, loaded.state_dict, dtype=torch.float32)
    if family == "jamba":
        assert any(isinstance(m, Experts) and m.packed is not None for m in model.modules())
    # the same file unpacked to float: the packed modules must compute the same model
    plain = load_gguf_llm(path, keep_quantized=False)
    unpacked = build_llm(plain.config, plain.state_dict, dtype=torch.float32)
    prompt = prompt_ids()
    model.setup_caches(1, PROMPT_LEN)
    unpacked.setup_caches(1, PROMPT_LEN)
    with torch.inference_mode():
        expected, reference = unpacked(prompt, torch.arange(PROMPT_LEN)), ref(prompt).logits
        got = model(prompt, torch.arange(PROMPT_LEN))
    scale = expected.abs().max().item()
    # packed Q8_0 products round the activations too (about 1%); an expert picked differently moves more
    assert (got - expected).abs().max().item() / scale < (0.1 if family == "jamba" else 0.03)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    assert (expected - reference).abs().max().item() / scale < (0.25 if family == "jamba" else 0.05)


# --- the scans -------------------------------------------------------------------------------------

def test_selective_scan_in_parallel_equals_the_one_token_recurrence():
    g = torch.Generator().manual_seed(0)
    Bt, T, E, N = 2, 37, 6, 5  # 37: several chunks of 16, the last one short
    x, B, C = torch.randn(Bt, T, E, generator=g), torch.randn(Bt, T, N, generator=g), torch.randn(Bt, T, N, generator=g)
    dt = torch.rand(Bt, T, E, generator=g) * 2
    A = -torch.rand(E, N, generator=g) * 4
    h0 = torch.randn(Bt, E, N, generator=g)
    h_par, h_seq = h0.clone(), h0.clone()
    y_par = selective_scan(h_par, x, dt, A, B, C, chunk=16)
    y_seq = torch.stack([selective_step(h_seq, x[:, t], dt[:, t], A, B[:, t], C[:, t]) for t in range(T)], dim=1)
    assert torch.allclose(y_par, y_seq, atol=1e-5) and torch.allclose(h_par, h_seq, atol=1e-5)


def test_ssd_chunked_scan_equals_the_one_token_recurrence():
    g = torch.Generator().manual_seed(0)
    Bt, T, H, P, N = 2, 29, 3, 4, 5
    x = torch.randn(Bt, T, H, P, generator=g)
    B, C = torch.randn(Bt, T, H, N, generator=g), torch.randn(Bt, T, H, N, generator=g)
    dt = torch.rand(Bt, T, H, generator=g) * 2
    A = -torch.rand(H, generator=g) * 4
    h0 = torch.randn(Bt, H, P, N, generator=g)
    h_par, h_seq = h0.clone(), h0.clone()
    y_par = ssd_scan(h_par, x, dt, A, B, C, chunk=8)
    y_seq = torch.stack([ssd_step(h_seq, x[:, t], dt[:, t], A, B[:, t], C[:, t]) for t in range(T)], dim=1)
    assert torch.allclose(y_par, y_seq, atol=1e-5) and torch.allclose(h_par, h_seq, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-mamba2"])
def test_prefill_in_pieces_equals_prefill_at_once_and_a_snapshot_resumes(name):
    torch.manual_seed(0)
    model = MambaLM(MambaConfig.from_name(name))
    spread_weights(model, 0)
    model.setup_caches(1, 64)
    ids = torch.randint(0, 256, (1, 30))
    with torch.inference_mode():
        whole = model(ids, torch.arange(30))
        first = model(ids[:, :17], torch.arange(17))
        saved = model.state.snapshot()
        rest = model(ids[:, 17:], torch.arange(17, 30))
        assert torch.allclose(torch.cat([first, rest], 1), whole, atol=1e-5)
        model(ids[:, :5], torch.arange(5))  # position 0: a new sequence, the state starts over
        model.state.restore(saved)
        again = model(ids[:, 17:], torch.arange(17, 30))
    assert torch.allclose(again, rest, atol=1e-6)


def test_state_does_not_grow_over_a_long_decode():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig.from_name("tiny-mamba2"))
    spread_weights(model, 0)
    model.setup_caches(1, 64)  # a limit the caller keeps; the state is the same for any length
    before = model.state.nbytes
    buffers = [b.data_ptr() for s in model.states for b in (s.conv_cache, s.ssm_cache)]
    assert before == model.config.state_bytes()
    model.setup_caches(1, 4096)  # a longer chat: the same state, kept
    out = list(generate_tokens(model, [1, 2, 3], 1000, greedy))
    assert len(out) == 1000
    assert model.state.nbytes == before
    assert [b.data_ptr() for s in model.states for b in (s.conv_cache, s.ssm_cache)] == buffers


# --- through the chat pipeline ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_chat_job_answers_from_a_folder_and_from_gguf(tmp_path, family):
    ref, folder = make_folder(tmp_path, family)
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, ref, family)
    loaded = load_hf_folder(folder)
    text = "<|im_start|>user\nw1 w2 w3<|im_end|>\n<|im_start|>assistant\n"  # what the template renders
    prompt = torch.tensor([loaded.tokenizer.encode(text, add_special_tokens=False).ids])
    expected = reference_greedy(ref, prompt, 8)
    stop = loaded.tokenizer.token_to_id("<|im_end|>")
    expected = expected[:expected.index(stop)] if stop in expected else expected
    for model in (folder, path):
        tokens: list[str] = []
        ctx = JobContext(job_id="t", device=probe("cpu"), models=ModelCache(), on_token=tokens.append,
                         on_progress=lambda *a: None, settings={})
        job = ChatJob(messages=[{"role": "user", "content": "w1 w2 w3"}], model=str(model), temperature=0.0,
                      max_tokens=8)
        out = run_chat(job, ctx)
        assert out["completion_tokens"] >= 1 and "".join(tokens) == out["text"]
        if model == folder:  # the same tokens transformers picks (the GGUF has another tokenizer)
            assert out["completion_tokens"] == len(expected)
            assert out["text"].split() == [loaded.tokenizer.id_to_token(i) for i in expected]
    det = detect(folder)
    assert det.family == family and any("recurrent state" in n for n in det.notes)


# --- detection from real-size header-only files --------------------------------------------------

def test_models_info_counts_mamba_2_8b_state_not_a_kv_cache_from_a_gguf_header(tmp_path):
    from library_fixtures import STRING, U32
    from library_fixtures import write_gguf as write_header_only

    arch = "mamba"
    kv = {"general.architecture": (STRING, arch), "general.file_type": (U32, 15),
          **{f"{arch}.{k}": (U32, v) for k, v in (("block_count", 64), ("embedding_length", 2560),
                                                  ("ssm.conv_kernel", 4), ("ssm.inner_size", 5120),
                                                  ("ssm.state_size", 16), ("ssm.time_step_rank", 160))}}
    tensors = {"token_embd.weight": ((50280, 2560), "Q8_0")}
    tensors.update({f"blk.{i}.ssm_in.weight": ((10240, 2560), "Q4_K") for i in range(64)})
    det = detect(write_header_only(tmp_path / "mamba-2.8b.gguf", kv, tensors))
    assert (det.family, det.role, det.dtype) == ("mamba", "llm", "Q4_K_M")
    state = MambaConfig.from_name("mamba-2.8b").state_bytes(conv_elem=2)
    assert state == 64 * (5120 * 3 * 2 + 5120 * 16 * 4)  # ~23 MB, at any context length
    from studio.library.headers import read_header

    weights = sum(t.nbytes for t in read_header(tmp_path / "mamba-2.8b.gguf").tensors.values())
    assert det.vram_bytes == weights + state + (256 << 20)


def test_models_info_counts_codestral_mamba2_state_from_an_hf_folder(tmp_path):
    from library_fixtures import write_safetensors

    root = tmp_path / "codestral"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "num_hidden_layers": 64, "hidden_size": 4096,
        "num_heads": 128, "head_dim": 64, "n_groups": 8, "state_size": 128, "conv_kernel": 4, "expand": 2,
        "vocab_size": 32768}))
    write_safetensors(root / "model.safetensors", {"backbone.embeddings.weight": (32768, 4096),
                                                   "backbone.layers.0.mixer.in_proj.weight": (18560, 4096)}, "BF16")
    det = detect(root)
    assert (det.family, det.role, det.format) == ("mamba2", "llm", "hf")
    state = MambaConfig.from_name("mamba-codestral-7b").state_bytes(conv_elem=2)
    assert state == 64 * ((8192 + 2 * 8 * 128) * 3 * 2 + 128 * 64 * 128 * 4)  # ~272 MB
    assert det.vram_bytes == det.params * 2 + state + (256 << 20)


def test_models_info_counts_jamba_state_on_mamba_layers_and_kv_only_on_attention_layers(tmp_path):
    from library_fixtures import write_safetensors

    root = tmp_path / "jamba"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "jamba", "architectures": ["JambaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 65536,
        "attn_layer_period": 8, "attn_layer_offset": 4, "expert_layer_period": 2, "expert_layer_offset": 1,
        "num_experts": 16, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
        "max_position_embeddings": 262144}))
    write_safetensors(root / "model.safetensors", {"model.embed_tokens.weight": (65536, 4096)}, "BF16")
    det = detect(root)
    assert (det.family, det.role) == ("jamba", "llm")
    state = JambaConfig.from_name("jamba-v0.1").state_bytes(conv_elem=2)
    assert state == 28 * (8192 * 3 * 2 + 8192 * 16 * 4)  # 28 Mamba layers
    kv = 2 * 4 * 8 * 128 * 4096 * 2  # 4 attention layers, fp16 K and V at 4096 tokens
    assert det.vram_bytes == det.params * 2 + state + kv + (256 << 20)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_cuda_chat_with_the_compiled_step_gives_the_cpu_answer(tmp_path, family):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, folder = make_folder(tmp_path, family)
    answers, steps = [], []
    for device in ("cpu", "cuda"):
        cache = ModelCache()
        ctx = JobContext(job_id="t", device=probe(device), models=cache, on_token=lambda t: None,
                         on_progress=lambda *a: None, settings={})
        job = ChatJob(messages=[{"role": "user", "content": "w1 w2 w3"}], model=str(folder), temperature=0.0,
                      max_tokens=40, dtype="float32")
        answers.append(run_chat(job, ctx)["text"])
        answers.append(run_chat(job, ctx)["text"])  # a second answer: the state starts over, graphs replay
        cm = cache.get(cache.summary()[0]["key"])
        steps.append((cm.compiled_step is not None, cm.compile_failed))
    assert answers[0] == answers[1] == answers[2] == answers[3]
    assert steps[1] == (True, False)  # CUDA decoded through torch.compile, no fallback to eager


def test_mamba2_prefill_in_segments_equals_one_segment(monkeypatch):
    import studio.models.mamba as mamba

    torch.manual_seed(0)
    model = MambaLM(MambaConfig.from_name("tiny-mamba2"))  # chunk 8
    spread_weights(model, 0)
    model.setup_caches(1, 64)
    ids = torch.randint(0, 256, (1, 45))
    with torch.inference_mode():
        whole = model(ids, torch.arange(45))
        monkeypatch.setattr(mamba, "PREFILL_SEGMENT", 16)  # 3 segments of 16 tokens (2 chunks each)
        pieces = model(ids, torch.arange(45))
    assert torch.allclose(whole, pieces, atol=1e-5)
