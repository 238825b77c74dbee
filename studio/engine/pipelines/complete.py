"""Completions for the HTTP API (`studio serve`): a raw prompt, or OpenAI-shaped messages with tools.

ChatJob covers the window's chats (user/assistant/system text only). The API also needs what an
OpenAI client sends: a plain prompt to continue (/v1/completions), tool definitions rendered by the
model's own chat template, and `tool` / `tool_calls` turns. The model is the chat pipeline's, found
under the same cache key, so the window and the API share one loaded copy.
"""

from __future__ import annotations

import json
import time

import torch

from studio.engine.context import JobContext, UserError
from studio.engine.pipelines.chat import (
    DEFAULT_CONTEXT,
    ChatModel,
    choose_dtype,
    compiled_step,
    encode_prompt,
    ensure_cache,
    load_chat_model,
    resolve_model,
    step_failed,
)
from studio.engine.pipelines.decoding import StopFilter, generate_tokens, stream_text
from studio.engine.sampling import Sampler, SamplingParams
from studio.protocol import ChatResult, CompletionJob

API_ROLES = ("system", "user", "assistant", "tool")

# For templates without a tool section: the Hermes convention, which Qwen, Hermes and many
# fine-tunes were trained on and which the server's parser reads back.
TOOLS_SYSTEM = ("You can call functions. The available functions, as JSON schemas:\n{tools}\n"
                "To call one, answer with <tool_call>{{\"name\": <function name>, \"arguments\": <arguments "
                "object>}}</tool_call> and nothing else.")


def chat_model_for(spec: str, ctx: JobContext) -> tuple[ChatModel, bool]:
    """The chat pipeline's model for `spec` (loaded now or already warm) -> (model, freshly loaded).
    The cache key is run_chat's for dtype "auto" and no quantization, so both find the same copy."""
    path, kind = resolve_model(spec)
    device = torch.device(ctx.device.torch_device if ctx.device is not None else "cpu")
    dtype, dequantize = choose_dtype("auto", ctx.device)
    limit = int(ctx.settings.get("chat_context_length", DEFAULT_CONTEXT))
    budget = ctx.memory.budget if ctx.memory is not None and device.type == "cuda" else None
    key = f"llm:{path.resolve()}:{device}:{dtype}:{'dequant' if dequantize else 'packed'}:{limit}::{budget}"
    fresh = ctx.models.get(key) is None
    cm: ChatModel = ctx.models.get_or_load(
        key, lambda: load_chat_model(path, kind, device, dtype, dequantize, limit, ctx.progress, "", budget),
        nbytes=lambda m: m.nbytes, path=str(path), where="RAM" if device.type == "cpu" else "VRAM")
    return cm, fresh


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (Qwen2.5/3, Llama 3.1+, Hermes, Mistral do)."""
    return bool(template) and "tools" in template


def _check_messages(messages: list) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in API_ROLES:
            raise UserError("bad_input", f"Message {i} must have a role of {', '.join(API_ROLES)}; got {str(m)[:80]!r}.")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise UserError("bad_input", f"Message {i}: content must be text.")
        out.append({**m, "content": content or ""})
    if not out:
        raise UserError("bad_input", "The conversation is empty: send at least one message.")
    return out


def render(cm: ChatModel, job: CompletionJob) -> tuple[str, list[str]]:
    """The prompt text for a job -> (text, notes)."""
    if job.prompt and job.messages:
        raise UserError("bad_input", "Give either a prompt or messages, not both.")
    if not job.messages:
        if not job.prompt:
            raise UserError("bad_input", "The prompt is empty.")
        return job.prompt, []
    from studio.models.chat_template import render_chat

    messages = _check_messages(job.messages)
    notes: list[str] = []
    extra: dict = {}
    if job.tools and template_supports_tools(cm.chat_template):
        extra["tools"] = job.tools
    elif job.tools:
        spec = "\n".join(json.dumps(t, ensure_ascii=False) for t in job.tools)
        described = TOOLS_SYSTEM.format(tools=spec)
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + described}
        else:
            messages.insert(0, {"role": "system", "content": described})
        notes.append("This model's chat template has no tool section; the tools were described in the system prompt.")
    text = render_chat(cm.chat_template, messages, bos_token=cm.bos_token, eos_token=cm.eos_token,
                       add_generation_prompt=True, **extra)
    return text, notes


def run_completion(job: CompletionJob, ctx: JobContext) -> ChatResult:
    """Continue the prompt (or answer the messages), streaming text through ctx.token."""
    from studio.models.tokenizer import IncrementalDecoder

    if not isinstance(job.max_tokens, int) or job.max_tokens < 1:
        raise UserError("bad_input", f"max_tokens must be at least 1, got {job.max_tokens!r}.")
    if not all(isinstance(s, str) for s in job.stop):
        raise UserError("bad_input", "stop must be a list of strings.")
    params = SamplingParams(temperature=job.temperature, top_k=job.top_k, top_p=job.top_p, min_p=job.min_p,
                            repetition_penalty=job.repetition_penalty, presence_penalty=job.presence_penalty,
                            seed=job.seed)
    try:
        params.validate()
    except ValueError as exc:
        raise UserError("bad_input", f"{exc}.") from None
    cm, fresh = chat_model_for(job.model, ctx)
    t_start = time.perf_counter()
    text, notes = render(cm, job)
    prompt = encode_prompt(cm, text)
    if len(prompt) + 1 > cm.context_length:
        raise UserError("context_full", f"The prompt is {len(prompt)} tokens but this model's context holds "
                        f"{cm.context_length}. Shorten it.")
    max_new = min(job.max_tokens, cm.context_length - len(prompt))
    ensure_cache(cm, len(prompt) + max_new)
    sampler = Sampler(params, cm.model.config.vocab_size, cm.device)
    ctx.cancel.check()
    step = compiled_step(cm) if ctx.settings.get("chat_compile", True) else None
    tokens = generate_tokens(cm.model, prompt, max_new, sampler.pick, cm.stop_ids, step,
                             on_fallback=lambda exc: step_failed(cm, exc))
    # an HTTP client that went away cancels the job: the stream ends within one token
    out = stream_text(tokens, cm.stop_ids, IncrementalDecoder(cm.tokenizer, skip_special=True),
                      StopFilter(list(job.stop)), ctx.token, ctx.cancel, t_start)
    return ChatResult(text=out.text, prompt_tokens=len(prompt), completion_tokens=out.completion,
                      ttft_s=round(out.ttft, 4), tokens_per_s=out.tokens_per_s,
                      model=cm.name, finish_reason=out.finish, context_length=cm.context_length, seed=sampler.seed,
                      notes=(list(cm.notes) if fresh else []) + notes)
