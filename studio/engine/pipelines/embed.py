"""Embeddings from a chat model: the mean of its final (normed) hidden states over a text's tokens.

No separate embedding model is needed: the LLM the chat pipeline has loaded (or would load) is used,
under the same cache key. The vectors are L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import torch

from studio.engine.context import JobContext, UserError
from studio.engine.pipelines.chat import encode_prompt, ensure_cache
from studio.engine.pipelines.complete import chat_model_for
from studio.protocol import EmbedJob, EmbedResult

MAX_TEXTS = 256


@torch.inference_mode()
def hidden_mean(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(C,) float32: the final-norm hidden states of `ids`, averaged over the tokens."""
    captured: list[torch.Tensor] = []
    # The last decoder layer's output is the residual stream before the final norm; hooking it keeps
    # LLM.forward as it is and lets last_only skip the vocabulary projection of every token.
    hook = model.model.layers[-1].register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        device = model.key_index.device
        T = len(ids)
        tokens = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        model(tokens, torch.arange(T, device=device), kv_len=T, last_only=True)
    finally:
        hook.remove()
    h = model.model.norm(captured[0])  # (1, T, C)
    return h[0].float().mean(dim=0)  # (C,)


def run_embed(job: EmbedJob, ctx: JobContext) -> EmbedResult:
    if not job.texts or not all(isinstance(t, str) for t in job.texts):
        raise UserError("bad_input", "Embeddings need a list of one or more texts.")
    if len(job.texts) > MAX_TEXTS:
        raise UserError("bad_input", f"At most {MAX_TEXTS} texts per request ({len(job.texts)} given); split them.")
    if any(not t for t in job.texts):
        raise UserError("bad_input", "An empty text has no embedding; remove empty strings from the input.")
    cm, _ = chat_model_for(job.model, ctx)
    vectors, counts = [], []
    for i, text in enumerate(job.texts):
        ctx.cancel.check()
        ids = encode_prompt(cm, text)
        if len(ids) > cm.context_length:
            raise UserError("context_full", f"Text {i} is {len(ids)} tokens; this model reads at most "
                            f"{cm.context_length}. Split it.")
        ensure_cache(cm, len(ids))
        v = hidden_mean(cm.model, ids)
        vectors.append(torch.nn.functional.normalize(v, dim=0).tolist())
        counts.append(len(ids))
        ctx.progress(i + 1, len(job.texts), "embedding")
    return EmbedResult(embeddings=vectors, token_counts=counts, model=cm.name, dimensions=len(vectors[0]))
