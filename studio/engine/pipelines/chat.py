"""Chat: one assistant answer, streamed token by token.

run_chat resolves the model (bundled default, a .gguf file or a Hugging Face folder),
keeps it warm in ctx.models, renders the chat template, fits the prompt into the context,
prefills, then decodes with sampling. Text streams through ctx.token as it is decoded;
cancel is checked before every token. Each one-token decode step attends to a prefix of
the KV cache: eagerly, exactly the filled part. On CUDA, models of the LLaMA layout with plain
weights decode through the fused Triton step (studio/models/llm_decode.py: one CUDA graph for every
position); the others under torch.compile(mode="reduce-overhead") (CUDA graphs, which need static
shapes), attending to the next power of two of the filled length (a "bucket"; decoding.py),
at most the cache), one graph per bucket. On CUDA the next step is queued before the host reads
each token (lookahead; the `chat_lookahead` setting turns it off).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.engine.context import JobContext, UserError
from studio.engine.memory import (
    MemoryManager,
    Plan,
    Policy,
    estimate_module_bytes,
    fmt_bytes,
    plan_job,
    run_with_oom_retry,
)
from studio.engine.pipelines.decoding import StopFilter, compile_decode_step, generate_tokens, stream_text
from studio.engine.resolve import library_path
from studio.engine.sampling import SAMPLING_KEYS, RepetitionGuard, Sampler, SamplingParams, resolve_sampling
from studio.models.llm import LLM
from studio.models.llm_build import (
    LLM_QUANT_MODES,
    LoadedLLM,
    build_llm,
    chat_config,
    is_quant,
    quantize_state,
    weight_bytes,
)
from studio.protocol import ChatJob, ChatResult

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8192  # tokens; settings["chat_context_length"] changes it
CPU_CACHE_STEP = 256  # on CPU the KV cache grows in steps of this many positions
ROLES = ("system", "user", "assistant")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ChatModel:
    """A built model with its tokenizer and chat metadata, kept warm between jobs."""

    model: LLM
    tokenizer: Any
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    stop_ids: set
    add_bos: bool
    context_length: int
    device: torch.device
    dtype: torch.dtype
    name: str
    nbytes: int
    generation_defaults: dict = field(default_factory=dict)  # sampling the model file recommends
    model_name: str = ""  # what the file calls the model: picks its authors' sampling (sampling.MODEL_SAMPLING)
    compiled_step: Callable | None = None
    compile_failed: bool = False  # torch.compile could not handle it: eager from then on
    fused_failed: bool = False  # the fused step could not be built here: torch.compile from then on
    notes: list = field(default_factory=list)  # what loading decided for the user (quantization, context)


# ---------------------------------------------------------------------------
# Finding and loading the model

def resolve_model(spec: str) -> tuple[Path, str]:
    """A job's `model` -> (path, "gguf" | "hf"). Chosen by file content, not by file name."""
    if not spec:
        from studio.models.bundled import default_chat_model

        return default_chat_model(), "gguf"
    path = Path(spec).expanduser()
    if not path.exists():
        path = library_path(spec)
    if path is None:
        raise UserError("model_not_found", f"No model at {spec!r} and none of that name in the library. Give the "
                        "path to a .gguf file or a Hugging Face model folder, a name from `studio models list`, "
                        "or leave the model empty for the bundled SmolLM2.")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, "hf"
        ggufs = sorted(p for p in path.iterdir() if p.is_file() and _magic(p) == b"GGUF")
        if len(ggufs) == 1:
            return ggufs[0], "gguf"
        raise UserError("bad_model", f"{path} is neither a Hugging Face model folder (no config.json) nor a "
                        f"folder with exactly one GGUF file ({len(ggufs)} found). Choose the model file itself.")
    magic = _magic(path)
    if magic == b"GGUF":
        return path, "gguf"
    if path.name == "config.json" or magic[:1] == b"{":
        return path.parent, "hf"
    raise UserError("bad_model", f"{path.name} is not a GGUF file (it starts with {magic!r}). For a safetensors "
                    "LLM choose its whole folder (config.json, tokenizer.json and weights).")


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(4)
    except OSError as exc:
        raise UserError("model_not_found", f"Cannot read {path}: {exc}") from None


def choose_dtype(requested: str, device_profile: Any) -> tuple[torch.dtype, bool]:
    """(compute dtype, dequantize?) "auto" keeps quantized weights packed; a named dtype unpacks them."""
    if requested == "auto":
        name = device_profile.compute_dtype() if device_profile is not None else "float32"
        return DTYPES.get(name, torch.float32), False
    if requested not in DTYPES:
        raise UserError("bad_input", f"dtype {requested!r} is not one of auto, {', '.join(DTYPES)}.")
    return DTYPES[requested], True


MIN_CONTEXT = 512  # below this a chat is not worth having: the model does not fit
ACTIVATION_BASE = 512 << 20  # CUDA context slack, graph pools, sampler buffers


def cache_bytes_per_position(model: LLM, dtype: torch.dtype) -> int:
    """KV-cache bytes one token of context costs (every layer keeps K and V)."""
    return _position_bytes(model.config, dtype)[0]


def _position_bytes(c: Any, dtype: torch.dtype) -> tuple[int, int]:
    """(KV-cache bytes, prefill activation bytes) one token of context costs for config `c`.
    Activations per prefill token: the fused gate/up output, the MLP input and a few hidden-size temporaries."""
    elem = torch.empty((), dtype=dtype).element_size()
    # every config says what a position costs: K and V, MLA's latent, or nothing (a recurrent state)
    return c.kv_bytes_per_position(elem), (2 * c.intermediate_size + 6 * c.hidden_size) * elem


def state_bytes(state: dict, dtype: torch.dtype) -> int:
    """Bytes the weights will take once built: packed weights as they are, float tensors in `dtype`."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    for w in state.values():
        if is_quant(w):
            total += w.nbytes
        elif isinstance(w, torch.Tensor):
            total += w.numel() * (elem if w.is_floating_point() else w.element_size())
    return total


CHAT_ADVICE = ("try int4 (this chat's Weights setting, or --quant int4), a smaller model (a Q4 GGUF), or a larger "
               "VRAM budget in Settings")


def _check_fits(weights: int, per_pos: int, budget: int) -> None:
    """The manager's verdict on the weights plus a MIN_CONTEXT-token chat, resident (the decode step's
    graphs and static cache need it whole on the device); UserError('out_of_memory') with numbers."""
    plan_job({f"the model for a {MIN_CONTEXT}-token chat": weights}, ACTIVATION_BASE + MIN_CONTEXT * per_pos,
             budget, force={f"the model for a {MIN_CONTEXT}-token chat": Policy.RESIDENT}, advice=CHAT_ADVICE)


def check_weights_fit(config: Any, state: dict, dtype: torch.dtype, budget: int | None) -> None:
    """Refuse, with numbers, a model whose weights and a minimal context cannot fit the VRAM budget,
    before anything is copied to the GPU (a CUDA out-of-memory halfway through loading says less)."""
    if budget is None:
        return
    from studio.models.llm_build import chat_config

    c = chat_config(config)
    _check_fits(state_bytes(state, dtype), sum(_position_bytes(c, dtype)), budget)


def fit_context(model: LLM, dtype: torch.dtype, requested: int, budget: int | None) -> tuple[int, str]:
    """The longest context (<= requested) whose KV cache and prefill activations fit next to the weights
    in a VRAM budget. -> (context, note for the user or ""). UserError when not even MIN_CONTEXT fits."""
    if budget is None:
        return requested, ""
    weights = weight_bytes(model)
    per_pos = sum(_position_bytes(model.config, dtype))
    fits = max(0, budget - weights - ACTIVATION_BASE) // per_pos
    if fits >= requested:
        return requested, ""
    if fits < MIN_CONTEXT:
        _check_fits(weights, per_pos, budget)
    ctx_len = fits // 256 * 256
    return ctx_len, (f"Context shortened to {ctx_len} tokens (from {requested}) so the KV cache fits the "
                     f"{fmt_bytes(budget)} VRAM budget next to {fmt_bytes(weights)} of weights.")


def expert_placement(config: Any, state: dict, dtype: torch.dtype, budget: int | None,
                     context: int = 4096) -> Any:
    """For a mixture-of-experts model whose weights and a `context`-token cache overflow the VRAM
    budget: which layers keep their routed experts in RAM (moe.ExpertPlacement). None when all fits."""
    from studio.models.moe import plan_placement

    c = chat_config(config)
    if budget is None or not getattr(c, "n_experts", 0):
        return None
    elem = torch.empty((), dtype=dtype).element_size()
    room = budget - ACTIVATION_BASE - context * sum(_position_bytes(c, dtype))
    placement = plan_placement(c.n_layers, state, elem, room)
    return placement if placement.layers_in_ram else None


def load_chat_model(path: Path, kind: str, device: torch.device, dtype: torch.dtype, dequantize: bool,
                    context_limit: int, progress: Callable[[int, int, str], None], quant: str = "",
                    vram_budget: int | None = None, memory: MemoryManager | None = None,
                    name: str = "llm") -> ChatModel:
    """Read, (optionally) quantize, build and place a chat model. `quant` ("int8"/"int4") packs the
    full-precision matrices; `vram_budget` (bytes, CUDA only) shortens the context to fit. With a
    `memory` manager the model is registered there as `name`: it makes room first (evicting idle
    parts of other jobs) and the context fits what the other resident models leave."""
    total = 3
    progress(0, total, "loading")
    if kind == "gguf":
        from studio.models.gguf_llm import load_gguf_llm

        loaded: LoadedLLM = load_gguf_llm(path)
    else:
        from studio.models.hf_loader import load_hf_folder

        loaded = load_hf_folder(path)
    progress(1, total, "loading")
    state, config = loaded.state_dict, loaded.config
    notes: list[str] = []
    if dequantize:
        state = {k: (v.dequantize(dtype) if is_quant(v) else v) for k, v in state.items()}
    if quant:
        progress(1, total, f"quantizing to {quant}")
        config, state, saved = quantize_state(config, state, quant, device)
        if saved:
            notes.append(f"Weights quantized to {quant}: {fmt_bytes(saved)} smaller.")
        else:
            notes.append(f"This model's weights are already packed ({kind.upper() if kind == 'gguf' else 'quantized'}); "
                         f"{quant} changes nothing, so they are kept as stored.")
    in_ram = None
    if device.type == "cuda":
        placement = expert_placement(config, state, dtype, vram_budget)
        if placement is not None:  # an MoE model over the budget: routed experts in RAM (--n-cpu-moe)
            in_ram = placement.in_ram
            notes.append(placement.describe())
            progress(1, total, placement.describe())  # the plan is told before the weights move
            _check_fits(placement.device_bytes, sum(_position_bytes(chat_config(config), dtype)), vram_budget)
        else:
            check_weights_fit(config, state, dtype, vram_budget)
        if memory is not None:
            c = chat_config(config)
            weights = placement.device_bytes if placement is not None else state_bytes(state, dtype)
            memory.make_room(weights + ACTIVATION_BASE + MIN_CONTEXT * sum(_position_bytes(c, dtype)))
            vram_budget = memory.budget_for(name)
    model = build_llm(config, state, dtype=dtype, device=device, fuse=True, experts_in_ram=in_ram)
    del state
    progress(2, total, "loading")
    stop = set(loaded.stop_token_ids)
    eos_id = loaded.tokenizer.token_to_id(loaded.eos_token) if loaded.eos_token else None
    if eos_id is not None:
        stop.add(eos_id)
    ctx_len = min(model.config.max_position_embeddings, context_limit)
    if device.type == "cuda":
        ctx_len, note = fit_context(model, dtype, ctx_len, vram_budget)
        if note:
            notes.append(note)  # one static cache of the full context: CUDA graphs need fixed shapes
        model.setup_caches(1, ctx_len, dtype, device)
    if memory is not None:
        memory.adopt(name, model)  # built in place on the device: weights and cache, accounted from here on
    cm = ChatModel(model=model, tokenizer=loaded.tokenizer, chat_template=loaded.chat_template,
                   bos_token=loaded.bos_token, eos_token=loaded.eos_token, stop_ids=stop,
                   add_bos=loaded.add_bos, context_length=ctx_len, device=device, dtype=dtype,
                   name=str(path), nbytes=weight_bytes(model),
                   generation_defaults=file_sampling(path, loaded), model_name=loaded.model_name,
                   notes=notes)
    progress(3, total, "loading")
    return cm


def file_sampling(path: Path, loaded: LoadedLLM) -> dict:
    """The sampling the model file recommends; for the bundled SmolLM2, what was measured to answer right."""
    from studio.models.bundled import BUNDLED_SAMPLING, is_bundled

    return {**loaded.generation_defaults, **BUNDLED_SAMPLING} if is_bundled(path) else dict(loaded.generation_defaults)


def ensure_cache(cm: ChatModel, needed: int) -> None:
    if cm.model.max_seq_len >= needed:
        return
    size = min(cm.context_length, -(-needed // CPU_CACHE_STEP) * CPU_CACHE_STEP)
    cm.model.setup_caches(1, size, cm.dtype, cm.device)


# ---------------------------------------------------------------------------
# Prompt

def check_messages(job: ChatJob) -> list[dict]:
    msgs: list[dict] = []
    if job.system:
        msgs.append({"role": "system", "content": job.system})
    if not job.messages:
        raise UserError("bad_input", "The conversation is empty: send at least one user message.")
    for i, m in enumerate(job.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError("bad_input", f"Message {i} must be {{'role': 'user'|'assistant'|'system', "
                            f"'content': text}}; got {str(m)[:80]!r}.")
        msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


def render_prompt(cm: ChatModel, messages: list[dict], cancel_check: Callable[[], None] | None = None) -> str:
    if not cm.chat_template:
        # No template shipped: a plain transcript the model can at least continue.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"
    import jinja2

    from studio.models.chat_template import render_chat

    try:
        return render_chat(cm.chat_template, messages, bos_token=cm.bos_token, eos_token=cm.eos_token,
                           add_generation_prompt=True, cancel_check=cancel_check)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise UserError("bad_input", f"The model's chat template refused this conversation: {exc}. "
                        "Check that user and assistant turns alternate.") from None


def encode_prompt(cm: ChatModel, text: str) -> list[int]:
    ids = cm.tokenizer.encode(text, add_special_tokens=False).ids
    if cm.add_bos and cm.bos_token and not text.startswith(cm.bos_token):
        bos = cm.tokenizer.token_to_id(cm.bos_token)
        if bos is not None:
            ids = [bos, *ids]
    return ids


def fit_prompt(cm: ChatModel, messages: list[dict], max_tokens: int, overflow: str,
               cancel_check: Callable[[], None] | None = None) -> tuple[list[int], int]:
    """(prompt ids, number of turns dropped). Room is kept for min(max_tokens, context/2) new tokens."""
    limit = cm.context_length
    reserve = min(max_tokens, limit // 2)
    ids = encode_prompt(cm, render_prompt(cm, messages, cancel_check))
    if len(ids) + reserve <= limit:
        return ids, 0
    if overflow == "error":
        raise UserError("context_full", f"The conversation is {len(ids)} tokens and the answer needs room for "
                        f"{reserve} more, but this model's context holds {limit}. Start a new chat, shorten "
                        "the messages or lower max tokens, or choose 'truncate' to drop the oldest turns.")
    msgs = list(messages)
    dropped = 0
    while len(ids) + reserve > limit:
        turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
        if len(turns) <= 1:
            raise UserError("context_full", f"Even the last message alone is {len(ids)} tokens, too long for "
                            f"this model's context of {limit} with {reserve} tokens left for the answer. "
                            "Shorten the message or the system prompt.")
        del msgs[turns[0]]
        dropped += 1
        # a conversation must not open with an assistant turn (many templates refuse it)
        while True:
            turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
            if len(turns) > 1 and msgs[turns[0]]["role"] == "assistant":
                del msgs[turns[0]]
                dropped += 1
            else:
                break
        ids = encode_prompt(cm, render_prompt(cm, msgs, cancel_check))
    return ids, dropped


# ---------------------------------------------------------------------------
# The decode step

def compiled_step(cm: ChatModel) -> Callable | None:
    """The fast decode step, built once per loaded model (None where eager is used): the fused Triton
    step where the model allows it, else decode_step under torch.compile with CUDA graphs."""
    if cm.device.type != "cuda":
        return None
    if getattr(cm.model.config, "n_experts", 0):
        return None  # the grouped expert matmul reads expert counts on the host each layer: no CUDA graph
    if cm.compiled_step is None:
        from studio.models.llm_decode import FusedDecoder, unsupported

        why = "it failed here before" if cm.fused_failed else unsupported(cm.model)
        if why is None:
            cm.compiled_step = FusedDecoder(cm.model)
        elif not cm.compile_failed:
            log.info("decoding through torch.compile, not the fused step: %s", why)
            cm.compiled_step = compile_decode_step(cm.context_length, mode="reduce-overhead")
    return cm.compiled_step


def step_failed(cm: ChatModel, exc: Exception) -> None:
    """generate_tokens fell back to eager: the next answer tries the next slower step."""
    from studio.models.llm_decode import FusedDecoder

    if isinstance(cm.compiled_step, FusedDecoder):
        cm.fused_failed = True
    else:
        cm.compile_failed = True
    cm.compiled_step = None


def run_chat(job: ChatJob, ctx: JobContext) -> ChatResult:
    """Answer the conversation in `job`, streaming text through ctx.token. Returns the summary."""
    from studio.models.tokenizer import IncrementalDecoder

    if job.overflow not in ("error", "truncate"):
        raise UserError("bad_input", f"overflow must be 'error' or 'truncate', got {job.overflow!r}.")
    if not isinstance(job.max_tokens, int) or job.max_tokens < 1:
        raise UserError("bad_input", f"max_tokens must be at least 1, got {job.max_tokens!r}.")
    if not all(isinstance(s, str) for s in job.stop):
        raise UserError("bad_input", "stop must be a list of strings.")
    requested = {k: getattr(job, k) for k in SAMPLING_KEYS}
    try:  # the values the job sets are checked before a model is loaded for it
        SamplingParams(**{k: v for k, v in requested.items() if v is not None}).validate()
    except ValueError as exc:
        raise UserError("bad_input", f"{exc}.") from None
    messages = check_messages(job)

    path, kind = resolve_model(job.model)
    device = torch.device(ctx.device.torch_device if ctx.device is not None else "cpu")
    dtype, dequantize = choose_dtype(job.dtype, ctx.device)
    limit = int(ctx.settings.get("chat_context_length", DEFAULT_CONTEXT))
    if job.quant not in ("",) + LLM_QUANT_MODES:
        raise UserError("bad_input", f"quantization {job.quant!r} is not one of {', '.join(LLM_QUANT_MODES)} "
                        "(or empty for none).")
    # The manager places the model and says whether it fits; a job run outside the engine gets its own.
    mem = ctx.memory if ctx.memory is not None else MemoryManager(ctx.device) if ctx.device is not None else None
    budget = mem.budget if mem is not None and device.type == "cuda" else None
    key = f"llm:{path.resolve()}:{device}:{dtype}:{'dequant' if dequantize else 'packed'}:{limit}:{job.quant}:{budget}"
    name = f"{key}|llm"  # the manager's name for the model: "<cache key>|<part>", as for every job
    fresh = ctx.models.get(key) is None  # loading notes are told once, with the answer that loaded it
    cm: ChatModel = ctx.models.get_or_load(
        key, lambda: load_chat_model(path, kind, device, dtype, dequantize, limit, ctx.progress, job.quant, budget,
                                     memory=mem, name=name),
        nbytes=lambda m: m.nbytes, path=str(path), where="RAM" if device.type == "cpu" else "VRAM")
    if mem is not None and name not in mem.names():
        mem.adopt(name, cm.model)  # loaded under another manager (a script's ModelCache shared between runs)

    t_start = time.perf_counter()
    prompt, dropped = fit_prompt(cm, messages, job.max_tokens, job.overflow, ctx.cancel.check)
    max_new = min(job.max_tokens, cm.context_length - len(prompt))
    ensure_cache(cm, len(prompt) + max_new)
    sampling = resolve_sampling(requested, cm.generation_defaults, cm.model_name)
    params = SamplingParams(**sampling, presence_penalty=job.presence_penalty, seed=job.seed)
    try:  # a model file's own values may be out of range too
        params.validate()
    except ValueError as exc:
        raise UserError("bad_input", f"{exc} (from the model's defaults; set it in the chat's settings).") from None
    started = [False]  # a token was sampled: the answer cannot start over after an out-of-memory

    def answer(plan: Plan | None) -> ChatResult:
        if mem is not None and not mem.on_device(name):
            cm.compiled_step = None  # the manager moved the model: graphs captured on the old copy are stale
        with mem.use(name) if mem is not None else contextlib.nullcontext():
            sampler = Sampler(params, cm.model.config.vocab_size, device)
            ctx.cancel.check()
            step = compiled_step(cm) if ctx.settings.get("chat_compile", True) else None
            if device.type == "cuda" and step is not None:
                from studio.models.llm_decode import FusedDecoder

                if isinstance(step, FusedDecoder) and not step.built:  # kernels compile, the graph is captured
                    ctx.progress(0, 1, "preparing the GPU decode step")
            ahead = bool(ctx.settings.get("chat_lookahead", True)) and device.type == "cuda"
            tokens = generate_tokens(cm.model, prompt, max_new, sampler.pick, cm.stop_ids, step, lookahead=ahead,
                                     on_fallback=lambda exc: step_failed(cm, exc))
            out = stream_text(tokens, cm.stop_ids, IncrementalDecoder(cm.tokenizer, skip_special=True),
                              StopFilter(list(job.stop)), ctx.token, ctx.cancel, t_start, guard=RepetitionGuard(),
                              on_sample=lambda: started.__setitem__(0, True))
            return ChatResult(
                text=out.text,
                prompt_tokens=len(prompt),
                completion_tokens=out.completion,
                ttft_s=round(out.ttft, 4),
                tokens_per_s=out.tokens_per_s,
                model=cm.name,
                finish_reason=out.finish,
                context_length=cm.context_length,
                seed=sampler.seed,
                dropped_turns=dropped,
                notes=list(cm.notes) if fresh else [],
                sampling={**sampling, "presence_penalty": job.presence_penalty},
            )

    if mem is None:
        return answer(None)
    # The one out-of-memory path: free, retry once with the model loaded on use, then numbers.
    plan = mem.estimate_job({name: estimate_module_bytes(cm.model)}, {name: ACTIVATION_BASE},
                            force={name: Policy.RESIDENT}, advice=CHAT_ADVICE)
    return run_with_oom_retry(answer, mem, plan, on_retry=lambda text: ctx.progress(0, 1, text),
                              can_retry=lambda: not started[0])
