"""Chat templates render exactly as transformers' apply_chat_template; broken templates fail clearly."""

from __future__ import annotations

import pytest

from studio.engine.context import UserError
from studio.models.bundled import default_chat_model
from studio.models.chat_template import CHATML_TEMPLATE, render_chat
from studio.models.gguf_llm import read_gguf

# Llama-3 style: bos_token, loop controls, namespace, tojson of tools, raise_exception on bad roles.
LLAMA3_LIKE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% continue %}{% endif %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if tools is defined and tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if ns.sys %}[{{ ns.sys }}]{% endif %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Héllo 你好 🙂 \"quotes\" <tags>"}],
    [{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": "ok"}],
]


def _hf_tokenizer(template: str):
    """A transformers fast tokenizer carrying `template`, to call the real apply_chat_template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    return read_gguf(default_chat_model()).metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_template_renders_like_transformers(smollm2_template, conv, gen):
    messages = CONVERSATIONS[conv]
    ref = _hf_tokenizer(smollm2_template).apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert render_chat(smollm2_template, messages, add_generation_prompt=gen) == ref


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_llama3_like_template_with_tools_renders_like_transformers(conv):
    messages = CONVERSATIONS[conv]
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": "string"}}}]
    ref = _hf_tokenizer(LLAMA3_LIKE).apply_chat_template(messages, tools=tools, tokenize=False,
                                                         add_generation_prompt=True)
    ours = render_chat(LLAMA3_LIKE, messages, bos_token="<s>", eos_token="</s>", tools=tools)
    assert ours == ref
    assert "météo" in ours  # tojson keeps non-ASCII as is


def test_smollm2_default_system_prompt_appears(smollm2_template):
    text = render_chat(smollm2_template, CONVERSATIONS[0])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_missing_template_falls_back_to_chatml():
    text = render_chat(None, CONVERSATIONS[0])
    assert text == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(CHATML_TEMPLATE, CONVERSATIONS[0], add_generation_prompt=False).endswith("<|im_end|>\n")


def test_raise_exception_in_template_becomes_bad_model_error_with_its_message():
    with pytest.raises(UserError) as err:
        render_chat(LLAMA3_LIKE, [{"role": "tool", "content": "x"}])
    assert err.value.kind == "bad_model" and "Unknown role: tool" in err.value.message


def test_template_syntax_error_is_bad_model():
    with pytest.raises(UserError) as err:
        render_chat("{% for m in messages %}{{ m['content'] }", CONVERSATIONS[0])
    assert err.value.kind == "bad_model" and "chat template" in err.value.message


def test_template_cannot_reach_python_internals():
    with pytest.raises(UserError):
        render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", CONVERSATIONS[0])
    with pytest.raises(UserError):
        render_chat("{% set ns = namespace() %}{% set ns._x = 1 %}", CONVERSATIONS[0])


def test_strftime_now_is_available():
    text = render_chat("{{ strftime_now('%Y') }}", [])
    assert text.isdigit() and len(text) == 4
