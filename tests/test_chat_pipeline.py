"""run_chat end to end on a tiny random Hugging Face folder (and the bundled SmolLM2)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from studio.engine.context import JobCancelled, JobContext, ModelCache, UserError  # noqa: E402
from studio.engine.device import probe  # noqa: E402
from studio.engine.pipelines.chat import run_chat  # noqa: E402
from studio.engine.pipelines.decoding import StopFilter  # noqa: E402
from studio.protocol import ChatJob  # noqa: E402

VOCAB = 128
N_SPECIAL = 5  # <unk> <s> </s> <|im_start|> <|im_end|>
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box OpenMP threads that
    spin-wait for each other make every small op 10-100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def make_folder(path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256, eos_token_id=4, bos_token_id=1)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
        # Special tokens never win (logit 0 against the max of ~120 random logits), so the
        # answers run to max_tokens.
        ref.lm_head.weight[:N_SPECIAL] = 0
    ref.save_pretrained(path)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = specials + ["system", "user", "assistant"] + [f"w{i}" for i in range(VOCAB - 8)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def cache():
    return ModelCache()  # shared: the model loads once for the whole file, as in the engine


@pytest.fixture(scope="module")
def cpu():
    return probe("cpu")


class Recorder:
    def __init__(self, cache, cpu, settings=None, cancel_after: int | None = None):
        self.tokens: list[str] = []
        self.progress: list[tuple] = []
        self.cancel_after = cancel_after
        self.ctx = JobContext(job_id="t", device=cpu, models=cache, on_token=self._token,
                              on_progress=lambda s, t, stage: self.progress.append((s, t, stage)),
                              settings=settings or {})

    def _token(self, text: str) -> None:
        self.tokens.append(text)
        if self.cancel_after is not None and len(self.tokens) >= self.cancel_after:
            self.ctx.cancel.set()


def job(folder, **kw) -> ChatJob:
    base = dict(messages=[{"role": "user", "content": "w1 w2 w3"}], model=str(folder), temperature=0.0,
                max_tokens=12)
    return ChatJob(**{**base, **kw})


def test_tokens_stream_and_join_to_the_result_text(folder, cache, cpu):
    rec = Recorder(cache, cpu)
    out = run_chat(job(folder), rec.ctx)
    assert len(rec.tokens) == 12 and "".join(rec.tokens) == out["text"]
    assert out["completion_tokens"] == 12 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] == len("<|im_start|> user w1 w2 w3 <|im_end|> <|im_start|> assistant".split())
    assert out["model"] == str(folder) and out["context_length"] == 256
    assert out["ttft_s"] > 0 and out["tokens_per_s"] > 0


def test_model_loads_once_with_progress_then_stays_warm(folder, cpu):
    shared = ModelCache()
    first, second = Recorder(shared, cpu), Recorder(shared, cpu)
    run_chat(job(folder, max_tokens=2), first.ctx)
    run_chat(job(folder, max_tokens=2), second.ctx)
    assert [p for p in first.progress if p[2] == "loading"][-1] == (3, 3, "loading")
    assert not [p for p in second.progress if p[2] == "loading"]


def test_same_seed_same_answer_other_seed_other_answer(folder, cache, cpu):
    def text(seed):
        return run_chat(job(folder, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed),
                        Recorder(cache, cpu).ctx)
    a, b, c = text(7), text(7), text(8)
    assert a["text"] == b["text"] and a["seed"] == 7
    assert a["text"] != c["text"]


def test_stop_string_ends_the_answer_and_is_not_emitted(folder, cache, cpu):
    full = run_chat(job(folder), Recorder(cache, cpu).ctx)["text"]
    words = full.split()
    stop = next(w for i, w in enumerate(words) if i >= 3 and w not in words[:i])
    cut = full[:full.index(stop)]
    rec = Recorder(cache, cpu)
    out = run_chat(job(folder, stop=[stop, "never-there"]), rec.ctx)
    assert out["text"] == cut and "".join(rec.tokens) == cut
    assert out["finish_reason"] == "stop"


def test_stop_filter_holds_back_a_partial_stop_across_tokens():
    f = StopFilter(["END"])
    assert f.feed("abc E") == ("abc ", False)
    assert f.feed("N") == ("", False)
    assert f.feed("x") == ("ENx", False)
    assert f.feed(" yy EN") == (" yy ", False)
    assert f.feed("D tail") == ("", True)


def test_stop_token_from_generation_config_ends_the_answer_unshown(folder, tmp_path, cache, cpu):
    import shutil

    first_word = run_chat(job(folder), Recorder(cache, cpu).ctx)["text"].split()[0]
    copy = tmp_path / "eos"
    shutil.copytree(folder, copy)
    vocab = json.loads((copy / "tokenizer.json").read_text())["model"]["vocab"]
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, vocab[first_word]]}))
    out = run_chat(job(copy), Recorder(ModelCache(), cpu).ctx)
    assert out["finish_reason"] == "stop" and out["text"] == "" and out["completion_tokens"] == 0


def test_max_tokens_bounds_the_answer(folder, cache, cpu):
    out = run_chat(job(folder, max_tokens=5), Recorder(cache, cpu).ctx)
    assert out["completion_tokens"] == 5 and out["finish_reason"] == "length"


def test_cancel_stops_within_one_token_after_streaming_the_text(folder, cache, cpu):
    rec = Recorder(cache, cpu, cancel_after=3)
    with pytest.raises(JobCancelled):
        run_chat(job(folder, max_tokens=50), rec.ctx)
    assert len(rec.tokens) == 3


def test_context_overflow_error_says_sizes_and_what_to_do(folder, cache, cpu):
    long = " ".join(f"w{i % 100}" for i in range(80))
    rec = Recorder(cache, cpu, settings={"chat_context_length": 64})
    with pytest.raises(UserError) as err:
        run_chat(job(folder, messages=[{"role": "user", "content": long}], max_tokens=8), rec.ctx)
    assert err.value.kind == "context_full"
    assert "64" in err.value.message and "truncate" in err.value.message


def test_context_overflow_truncate_drops_oldest_turns(folder, cache, cpu):
    turn = " ".join(f"w{i}" for i in range(20))
    msgs = []
    for _ in range(3):
        msgs += [{"role": "user", "content": turn}, {"role": "assistant", "content": turn}]
    msgs.append({"role": "user", "content": "w1 w2"})
    rec = Recorder(cache, cpu, settings={"chat_context_length": 64})
    out = run_chat(job(folder, messages=msgs, system="w9", max_tokens=8, overflow="truncate"), rec.ctx)
    assert out["dropped_turns"] >= 4 and out["prompt_tokens"] + 8 <= 64
    assert out["completion_tokens"] == 8


@pytest.mark.parametrize("fields, kind", [
    (dict(messages=[]), "bad_input"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "bad_input"),
    (dict(messages=[{"role": "user", "content": 3}]), "bad_input"),
    (dict(temperature=-1.0), "bad_input"),
    (dict(top_p=0.0), "bad_input"),
    (dict(max_tokens=0), "bad_input"),
    (dict(overflow="shrink"), "bad_input"),
    (dict(dtype="int3"), "bad_input"),
    (dict(model="/nonexistent/model.gguf"), "model_not_found"),
])
def test_bad_input_is_a_user_error(folder, cache, cpu, fields, kind):
    with pytest.raises(UserError) as err:
        run_chat(job(folder, **fields), Recorder(cache, cpu).ctx)
    assert err.value.kind == kind


def test_a_file_that_is_not_a_model_is_refused(tmp_path, cache, cpu):
    bogus = tmp_path / "notes.gguf"
    bogus.write_bytes(b"hello, not a model")
    with pytest.raises(UserError) as err:
        run_chat(job(bogus), Recorder(cache, cpu).ctx)
    assert err.value.kind == "bad_model" and "not a GGUF" in err.value.message


def test_bundled_smollm2_answers_the_capital_of_france(cache, cpu):
    pytest.importorskip("studio.models.bundled")
    rec = Recorder(cache, cpu)
    out = run_chat(ChatJob(messages=[{"role": "user", "content": "What is the capital of France?"}],
                           temperature=0.0, max_tokens=24), rec.ctx)
    assert "Paris" in out["text"], out["text"]
    assert out["finish_reason"] in ("stop", "length") and out["completion_tokens"] > 0


@pytest.mark.gpu
def test_cuda_compiled_decode_matches_cpu_greedy(folder, cache, cpu):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    expected = run_chat(job(folder, max_tokens=24), Recorder(cache, cpu).ctx)["text"]
    gpu = probe("cuda")
    rec = Recorder(ModelCache(), gpu)
    out = run_chat(job(folder, max_tokens=24, dtype="float32"), rec.ctx)
    assert out["text"] == expected
    cm = rec.ctx.models.get(rec.ctx.models.summary()[0]["key"])
    from studio.models.llm_decode import FusedDecoder

    assert isinstance(cm.compiled_step, FusedDecoder) and not cm.fused_failed  # a LLaMA layout: the fused step
    assert (0, 1, "preparing the GPU decode step") in rec.progress  # its first use is told, once
    rec.progress.clear()
    again = run_chat(job(folder, max_tokens=24, dtype="float32"), rec.ctx)  # replays the captured graph
    assert again["text"] == expected
    assert not [p for p in rec.progress if p[2] == "preparing the GPU decode step"]


# --- bucketed decode step ------------------------------------------------------------------

from studio.engine.pipelines.decoding import (  # noqa: E402
    compile_decode_step,
    decode_step,
    generate_tokens,
    kv_bucket,
    kv_buckets,
)
from studio.engine.sampling import greedy  # noqa: E402
from studio.models.llm import LLM, LLMConfig  # noqa: E402

BUCKET_PROMPT, BUCKET_NEW = 250, 20  # decoding crosses the 256 bucket into 512


def test_bucket_is_the_next_power_of_two_at_least_256_capped_at_the_cache():
    assert [kv_bucket(n, 8192) for n in (1, 255, 256, 257, 512, 513, 4097, 8192)] == [
        256, 256, 256, 512, 512, 1024, 8192, 8192]
    assert kv_bucket(2049, 3000) == 3000 and kv_bucket(10, 100) == 100
    assert kv_buckets(8192) == [256, 512, 1024, 2048, 4096, 8192]
    assert kv_buckets(3000) == [256, 512, 1024, 2048, 3000] and kv_buckets(100) == [100]
    for filled in (0, 8193):
        with pytest.raises(ValueError):
            kv_bucket(filled, 8192)


def tiny_model(**overrides) -> LLM:
    cfg = LLMConfig(**{**LLMConfig.from_name("tiny-llama").to_dict(), "max_position_embeddings": 1024,
                       "layer_types": [], **overrides})
    torch.manual_seed(0)
    model = LLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.ndim == 2 else p.fill_(1.0)
    model.setup_caches(1, 1024)
    return model


def decode_with_logits(model: LLM, step) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits each was chosen from, after filling the cache with garbage
    (a previous answer leaves stale entries past the current position: the mask must hide them)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_cache.k_cache.normal_(0, 10)
            layer.self_attn.kv_cache.v_cache.normal_(0, 10)
    seen: list[torch.Tensor] = []

    def choose(logits: torch.Tensor) -> int:
        seen.append(logits.float().clone())
        return greedy(logits)

    prompt = torch.randint(0, 256, (BUCKET_PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    tokens = list(generate_tokens(model, prompt, BUCKET_NEW, choose, step=step))
    return tokens, torch.stack(seen)


# Mistral-style all-sliding, and Gemma2-style alternating sliding/global with soft-capping
# (the plain attention path instead of SDPA): both windows far smaller than the bucket.
WINDOWED = {
    "full": {},
    "sliding": dict(sliding_window=8),
    "alternating_softcap": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                attn_softcap=5.0, final_softcap=3.0),
}


@pytest.mark.parametrize("attention", list(WINDOWED))
def test_bucketed_decode_matches_exact_length_decode_across_a_bucket_boundary(attention):
    model = tiny_model(**WINDOWED[attention])
    exact_tokens, exact_logits = decode_with_logits(model, step=None)
    bucket_tokens, bucket_logits = decode_with_logits(model, step=decode_step)
    assert bucket_tokens == exact_tokens
    assert (bucket_logits - exact_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("attention", ["sliding", "alternating_softcap"])
def test_bucketed_decode_keeps_the_sliding_window(attention):
    # Every decoded token's logits must equal those of one full forward pass over the whole
    # sequence (window mask applied there), not of attention over the whole bucket.
    model = tiny_model(**WINDOWED[attention])
    tokens, logits = decode_with_logits(model, step=decode_step)
    prompt = torch.randint(0, 256, (BUCKET_PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    seq = torch.tensor([prompt + tokens[:-1]])  # (1, T)
    with torch.inference_mode():
        full = model(seq, torch.arange(seq.shape[1]))[0, BUCKET_PROMPT - 1:]  # (new, V)
    assert (full - logits).abs().max().item() <= 1e-4


def test_compiled_step_traces_one_graph_per_bucket_and_matches_eager():
    from torch._dynamo.testing import CompileCounter

    model = tiny_model()
    exact_tokens, exact_logits = decode_with_logits(model, step=None)
    torch._dynamo.reset()
    try:
        counter = CompileCounter()  # dynamo traces as for CUDA graphs; the graph then runs eagerly
        stats = torch._dynamo.utils.counters["stats"]
        before = stats["unique_graphs"]
        step = compile_decode_step(model.max_seq_len, backend=counter)
        tokens, logits = decode_with_logits(model, step=step)
        assert counter.frame_count == 2  # buckets 256 and 512, no recompile between steps
        assert stats["unique_graphs"] - before == 2
        again, _ = decode_with_logits(model, step=step)
        assert counter.frame_count == 2
    finally:
        torch._dynamo.reset()
    assert tokens == exact_tokens == again
    assert (logits - exact_logits).abs().max().item() <= 1e-4


def test_compiler_failure_falls_back_to_eager_with_the_same_answer():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("this backend cannot compile")

    model = tiny_model()
    exact_tokens, _ = decode_with_logits(model, step=None)
    heard: list[Exception] = []
    torch._dynamo.reset()
    try:
        step = compile_decode_step(model.max_seq_len, backend=broken_backend)
        prompt = torch.randint(0, 256, (BUCKET_PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
        tokens = list(generate_tokens(model, prompt, BUCKET_NEW, greedy, step=step, on_fallback=heard.append))
    finally:
        torch._dynamo.reset()
    assert tokens == exact_tokens
    assert len(heard) == 1 and "cannot compile" in str(heard[0])


@pytest.mark.gpu
def test_cuda_graph_bucketed_step_matches_eager_across_a_bucket_boundary():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model().cuda()
    model.setup_caches(1, 1024, torch.float32, "cuda")
    exact_tokens, exact_logits = decode_with_logits(model, step=None)
    torch._dynamo.reset()
    try:
        stats = torch._dynamo.utils.counters["stats"]  # not cleared by reset(): count the difference
        before = stats["unique_graphs"]
        step = compile_decode_step(model.max_seq_len, mode="reduce-overhead")
        tokens, logits = decode_with_logits(model, step=step)
        assert stats["unique_graphs"] - before == 2  # buckets 256 and 512
        again, again_logits = decode_with_logits(model, step=step)  # replays the captured graphs
        assert stats["unique_graphs"] - before == 2
    finally:
        torch._dynamo.reset()
    assert tokens == exact_tokens == again
    assert (logits - exact_logits).abs().max().item() <= 1e-3
    assert (again_logits - exact_logits).abs().max().item() <= 1e-3


# --- sampling --------------------------------------------------------------------------------

from studio.engine.sampling import Sampler, SamplingParams  # noqa: E402


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 200) -> set[int]:
    s = Sampler(params, logits.shape[-1])
    return {s(logits) for _ in range(n)}


LOGITS = torch.tensor([4.0, 3.9, 3.8, 1.0, 0.5, -2.0])


def test_zero_temperature_and_top_k_one_are_greedy():
    assert draws(SamplingParams(temperature=0.0, seed=1), LOGITS) == {0}
    assert draws(SamplingParams(temperature=1.0, top_k=1, seed=1), LOGITS) == {0}


def test_top_k_top_p_and_min_p_cut_the_tail():
    assert draws(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, seed=1), LOGITS) == {0, 1, 2}
    # p = [.35, .32, .29, .02, ...]: top_p 0.6 keeps the first two (their mass passes 0.6)
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.6, seed=1), LOGITS) == {0, 1}
    # min_p 0.5 keeps tokens with p >= half of the best one
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=1), LOGITS) == {0, 1, 2}


def test_same_seed_same_draws():
    p = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=42)
    a, b = Sampler(p, 6), Sampler(p, 6)
    assert [a(LOGITS) for _ in range(50)] == [b(LOGITS) for _ in range(50)]


def test_penalties_push_away_from_generated_tokens():
    for params in (SamplingParams(temperature=0.0, repetition_penalty=2.0),
                   SamplingParams(temperature=0.0, presence_penalty=1.0)):
        s = Sampler(params, 6)
        first = s(LOGITS)
        s.observe(first)
        assert first == 0 and s(LOGITS) == 1


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(repetition_penalty=0.0), dict(presence_penalty=3.0)])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


@pytest.mark.gpu
def test_cuda_compiled_step_with_packed_int4_weights_matches_eager():
    # GGUF Q4 weights become Int4Linear modules: they must survive torch.compile + CUDA graphs.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from studio.models.llm_build import build_llm
    from studio.nn.packed_int import quantize_int4

    cfg = LLMConfig(model_type="llama", vocab_size=256, hidden_size=256, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=64, intermediate_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    ref = LLM(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1) if p.ndim == 2 else p.fill_(1.0)
    sd = {k: (quantize_int4(v, 32) if k.startswith("model.layers.") and v.ndim == 2 else v)
          for k, v in ref.state_dict().items()}
    model = build_llm(cfg, sd, dtype=torch.bfloat16, device="cuda", fuse=True)
    model.setup_caches(1, 64)
    step = compile_decode_step(64, mode="reduce-overhead")
    T = 8
    with torch.inference_mode():
        model(torch.arange(T, device="cuda")[None], torch.arange(T, device="cuda"), kv_len=T)
        for i in range(6):
            tok = torch.tensor([[i + 3]], device="cuda")
            pos = torch.tensor([T + i], device="cuda")
            eager = model(tok, pos, kv_len=T + i + 1, last_only=True).float()
            compiled = step(model, tok, pos, kv_bucket(T + i + 1, 64)).float()
            assert (compiled - eager).abs().max().item() <= 0.02 * eager.abs().max().item()


def test_a_library_name_resolves_to_the_installed_model(tmp_path, monkeypatch):
    from studio.engine.pipelines.chat import resolve_model
    from studio.library.library import Library
    from studio.models.bundled import default_chat_model

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    with Library() as lib:
        entry = lib.add(default_chat_model(), name="smol")
    path, kind = resolve_model("smol")
    assert path == entry.path and kind == "gguf"
    with pytest.raises(UserError, match="none of that name in the library"):
        resolve_model("no-such-model")


# --- one-token lookahead -------------------------------------------------------------------

def sampled_tokens(choose_kind: str, lookahead: bool, params: SamplingParams, stop: frozenset = frozenset(),
                   n: int = 24) -> list[int]:
    model = tiny_model()
    sampler = Sampler(params, model.config.vocab_size)

    def old_style(logits: torch.Tensor) -> int:  # the int path: choose, then count for the penalties
        tok = sampler(logits)
        sampler.observe(tok)
        return tok

    choose = sampler.pick if choose_kind == "device" else old_style
    prompt = list(range(3, 40))
    return list(generate_tokens(model, prompt, n, choose, stop, lookahead=lookahead))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.5,
                   seed=7),
], ids=["greedy", "sampled_with_penalties"])
def test_lookahead_gives_the_same_tokens_draws_and_penalties(params):
    # lookahead queues the next step and the next choice before the host reads a token; on the CPU it
    # runs the same order of operations, so any reordering of draws or penalty counts would show here
    reference = sampled_tokens("int", False, params)
    assert sampled_tokens("device", False, params) == reference
    assert sampled_tokens("device", True, params) == reference
    assert len(set(reference)) > 3  # a real sequence, not one repeated token


def test_lookahead_stops_at_a_stop_token_like_the_plain_loop():
    params = SamplingParams(temperature=0.0)
    full = sampled_tokens("int", False, params)
    stop = frozenset({full[5]})
    first = full.index(full[5])  # the first time that id comes
    want = full[:first + 1]
    assert sampled_tokens("device", True, params, stop) == want
    assert sampled_tokens("int", False, params, stop) == want


@pytest.mark.gpu
def test_cuda_lookahead_answers_as_the_cpu_does(folder, cache, cpu):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    expected = run_chat(job(folder, max_tokens=24), Recorder(cache, cpu).ctx)["text"]
    rec = Recorder(ModelCache(), probe("cuda"), settings={"chat_lookahead": True})
    for _ in range(2):  # the second replays the captured graphs
        assert run_chat(job(folder, max_tokens=24, dtype="float32"), rec.ctx)["text"] == expected
    sampled = job(folder, max_tokens=24, dtype="float32", temperature=0.8, seed=3, repetition_penalty=1.2)
    plain = run_chat(sampled, Recorder(ModelCache(), probe("cuda")).ctx)["text"]
    assert run_chat(sampled, rec.ctx)["text"] == plain
