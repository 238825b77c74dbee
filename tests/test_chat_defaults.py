"""Chat sampling left at "model default": the model's own recommendation, min-p, and the repetition guard."""

from __future__ import annotations

import json

import pytest
import torch

from studio.engine.sampling import FALLBACK_SAMPLING, RepetitionGuard, model_sampling, resolve_sampling
from studio.protocol import ChatJob, job_from_dict, job_to_dict

UNSET = dict.fromkeys(FALLBACK_SAMPLING)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on the shared 2-core box
    yield
    torch.set_num_threads(n)


def test_a_fresh_chat_job_leaves_sampling_to_the_model():
    job = ChatJob(messages=[{"role": "user", "content": "hi"}])
    assert all(getattr(job, k) is None for k in FALLBACK_SAMPLING)
    assert job_from_dict(job_to_dict(job)) == job  # None travels over the wire


def test_the_chat_wins_then_the_file_then_the_authors_then_studio():
    assert resolve_sampling(UNSET, {}, "")["temperature"] == FALLBACK_SAMPLING["temperature"]
    assert resolve_sampling(UNSET, {}, "smollm2") == {**FALLBACK_SAMPLING, "temperature": 0.2, "top_p": 0.9}
    from_file = {"temperature": 0.5, "top_k": 7}
    got = resolve_sampling(UNSET, from_file, "smollm2")
    assert (got["temperature"], got["top_k"], got["top_p"]) == (0.5, 7, 0.9)
    got = resolve_sampling({**UNSET, "temperature": 0.0, "min_p": 0.1}, from_file, "smollm2")
    assert (got["temperature"], got["min_p"], got["top_k"]) == (0.0, 0.1, 7)  # 0 is a value, not "unset"


def test_authors_defaults_are_found_by_the_models_own_name():
    assert model_sampling("SmolLM2")[0] == "SmolLM2"
    assert model_sampling("Qwen3")[1]["top_k"] == 20
    assert model_sampling("Llama-3.2")[1]["temperature"] == 0.6
    assert model_sampling("some-new-model") == ("", {})


def test_gguf_metadata_sampling_keys_become_file_defaults():
    from studio.models.gguf_llm import gguf_model_name, gguf_sampling

    meta = {"general.sampling.temp": 0.6, "general.sampling.top_k": 20, "general.sampling.top_p": 0.95,
            "general.sampling.penalty_repeat": 1.05, "general.sampling.min_p": True, "general.basename": "Qwen3"}
    assert gguf_sampling(meta) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.05}
    assert gguf_model_name(meta) == "Qwen3"
    assert gguf_model_name({"general.name": "Some Model"}) == "Some Model"


def test_repetition_guard_stops_a_loop_of_the_same_phrase():
    guard = RepetitionGuard()
    phrase = [11, 12, 13, 14, 15, 16]  # "la femme, la femme, ..." as ids
    fired_at = next(i for i, tok in enumerate(phrase * 20) if guard.push(tok))
    assert 48 <= fired_at + 1 <= 60


def test_repetition_guard_lets_varied_text_and_short_repeats_through():
    guard = RepetitionGuard()
    text = list(range(300))  # no repeats at all
    text += [5, 6, 5, 6, 5, 6]  # a word said three times
    text += [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3, 7] * 3  # a list whose items share a prefix
    assert not any(guard.push(t) for t in text)


def test_repetition_guard_catches_one_token_repeated():
    guard = RepetitionGuard()
    assert [guard.push(7) for _ in range(48)].index(True) == 47


# -- through run_chat --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_parts():
    from studio.engine.context import ModelCache
    from studio.engine.device import probe

    return ModelCache(), probe("cpu")


def _run(job: ChatJob, engine_parts):
    from studio.engine.context import JobContext
    from studio.engine.pipelines.chat import run_chat

    cache, cpu = engine_parts
    ctx = JobContext(job_id="t", device=cpu, models=cache, on_token=lambda text: None,
                     on_progress=lambda *a: None, settings={})
    return run_chat(job, ctx)


def test_generation_config_of_a_folder_sets_the_defaults(tmp_path, engine_parts):
    pytest.importorskip("transformers")
    from test_chat_pipeline import make_folder

    folder = make_folder(tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 5, "top_p": 0.5}))
    out = _run(ChatJob(messages=[{"role": "user", "content": "w1"}], model=str(folder), max_tokens=2), engine_parts)
    assert out.sampling["temperature"] == 0.3 and out.sampling["top_k"] == 5 and out.sampling["top_p"] == 0.5
    assert out.sampling["min_p"] == FALLBACK_SAMPLING["min_p"]
    out = _run(ChatJob(messages=[{"role": "user", "content": "w1"}], model=str(folder), max_tokens=2,
                       temperature=1.0), engine_parts)
    assert out.sampling["temperature"] == 1.0 and out.sampling["top_k"] == 5


def test_a_looping_answer_ends_early_as_repetition(tmp_path, engine_parts):
    pytest.importorskip("transformers")
    from test_chat_pipeline import make_folder

    folder = make_folder(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    # Every logit 0 whatever the input: greedy picks id 0 (<unk>, not a stop token) forever.
    state["model.norm.weight"] = torch.zeros_like(state["model.norm.weight"])
    save_file(state, folder / "model.safetensors")
    out = _run(ChatJob(messages=[{"role": "user", "content": "w1"}], model=str(folder), max_tokens=200,
                       temperature=0.0), engine_parts)
    assert out.finish_reason == "repetition" and out.completion_tokens == 48


@pytest.mark.slow
def test_bundled_model_answers_the_readme_question_in_19_of_20_fresh_chats(engine_parts):
    """The README's question at the defaults a fresh chat uses (nothing set, random seeds)."""
    from studio.errors import UserError
    from studio.models.bundled import default_chat_model

    try:
        default_chat_model()
    except UserError as exc:
        pytest.skip(str(exc))
    answers = []
    for _ in range(20):
        out = _run(ChatJob(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24),
                   engine_parts)
        answers.append(out.text)
    right = sum("Paris" in a for a in answers)
    assert right >= 19, answers


# -- front ends leave sampling to the model ----------------------------------------------------

def test_cli_chat_leaves_sampling_unset_unless_given():
    from studio.cli import build_parser

    args = build_parser().parse_args(["chat", "hi"])
    assert all(getattr(args, k) is None for k in FALLBACK_SAMPLING)
    args = build_parser().parse_args(["chat", "hi", "--temperature", "0.9", "--top-k", "0"])
    assert (args.temperature, args.top_k) == (0.9, 0)


def test_settings_panel_shows_model_default_and_returns_none(qtbot):
    from studio.chatstore import DEFAULT_SETTINGS
    from studio.ui.chat.settings_panel import SettingsPanel

    panel = SettingsPanel()
    qtbot.addWidget(panel)
    panel.load("", DEFAULT_SETTINGS)
    assert panel.fields["temperature"].text() == "model default"
    values = panel.values()
    assert all(values[k] is None for k in FALLBACK_SAMPLING) and values["max_tokens"] == 1024
    panel.fields["temperature"].setValue(0.3)
    panel.fields["top_k"].setValue(0)  # 0 is "no limit", a value of its own
    values = panel.values()
    assert values["temperature"] == pytest.approx(0.3) and values["top_k"] == 0 and values["top_p"] is None
    panel.reset()
    assert panel.values()["temperature"] is None


def test_threads_saved_with_the_old_fixed_defaults_now_mean_model_default(tmp_path):
    from studio.chatstore import ChatStore

    store = ChatStore(tmp_path / "chats.sqlite")
    old = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.0}
    assert store.thread(store.create_thread(settings=old).id).settings["temperature"] is None
    chosen = store.thread(store.create_thread(settings={**old, "temperature": 0.8}).id).settings
    assert (chosen["temperature"], chosen["top_k"]) == (0.8, 40)
