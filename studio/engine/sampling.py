"""Next-token choice from logits: greedy, temperature, top-k, top-p, min-p and penalties.

Order (as llama.cpp and transformers do it): penalties, temperature, top-k, top-p, min-p,
then one draw from a seeded torch.Generator, so the same seed gives the same answer.

What a job leaves unset (None) is the model's own recommendation (resolve_sampling): its
generation_config.json or GGUF `general.sampling.*`, else what its authors recommend
(MODEL_SAMPLING), else FALLBACK_SAMPLING. A 135M model at temperature 0.7 answers "What is
the capital of France?" wrongly about one time in three; at its authors' 0.2 it says Paris.
RepetitionGuard ends an answer that has fallen into a loop of the same phrase.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    temperature: float = 0.7  # <= 0 means greedy
    top_k: int = 40  # <= 0 disables
    top_p: float = 0.95  # >= 1 disables
    min_p: float = 0.0  # <= 0 disables; keeps tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # > 1 discourages tokens already generated
    presence_penalty: float = 0.0  # subtracted once from the logit of every generated token
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field; the pipeline turns it into a UserError."""
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be 0 or more (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be above 0 (1 = off), got {self.repetition_penalty}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise ValueError(f"presence_penalty must be between -2 and 2, got {self.presence_penalty}")


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# Used where neither the job nor the model says. min-p 0.05 cuts the unlikely tail that top-p leaves
# in when the distribution is flat (the habit of llama.cpp and LM Studio).
FALLBACK_SAMPLING: dict[str, float] = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05,
                                       "repetition_penalty": 1.0}

# What model authors recommend on their model cards, for files that carry no sampling settings:
# (lower-cased name prefix, label, settings). The name is GGUF `general.basename` (else
# `general.name`) or the last part of a HF config's `_name_or_path`; the longest prefix wins.
MODEL_SAMPLING: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("smollm2", "SmolLM2", {"temperature": 0.2, "top_p": 0.9}),
    ("smollm3", "SmolLM3", {"temperature": 0.6, "top_p": 0.95}),
    ("qwen2.5", "Qwen2.5", {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    ("qwen3", "Qwen3", {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}),
    ("llama-3", "Llama 3", {"temperature": 0.6, "top_p": 0.9}),
    ("gemma-3", "Gemma 3", {"temperature": 1.0, "top_p": 0.95, "top_k": 64, "min_p": 0.0}),
)

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_sampling(name: str) -> tuple[str, dict[str, float]]:
    """(label, settings) the authors of the model called `name` recommend; ("", {}) when unknown."""
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    best = ("", "", {})
    for prefix, label, values in MODEL_SAMPLING:
        if key.startswith(prefix) and len(prefix) > len(best[0]):
            best = (prefix, label, values)
    return best[1], dict(best[2])


def resolve_sampling(requested: Mapping[str, Any], from_file: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """Each of SAMPLING_KEYS from the first that sets it: the job (`requested`, None = unset), the
    model file (`from_file`), the model's authors (by `model_name`), FALLBACK_SAMPLING."""
    authors = model_sampling(model_name)[1]
    values: dict[str, Any] = {}
    for key in SAMPLING_KEYS:
        table = next((t for t in (requested, from_file, authors) if _number(t.get(key))), FALLBACK_SAMPLING)
        values[key] = table[key]
    values["top_k"] = int(values["top_k"])
    return values


class RepetitionGuard:
    """Notices an answer stuck repeating the same phrase ("la France, la France, ...").

    After each token it knows, for every period p up to `max_period`, how many tokens in a row
    have equalled the token p positions earlier: a tail of run + p tokens is then p-periodic.
    The loop is called once that tail holds `repeats` copies and at least `min_tokens` tokens,
    so a short list, a table rule or a repeated word in a sentence never triggers it.
    """

    def __init__(self, max_period: int = 64, repeats: int = 4, min_tokens: int = 48) -> None:
        self.max_period, self.repeats, self.min_tokens = max_period, repeats, min_tokens
        self.tokens: list[int] = []
        self.runs = [0] * (max_period + 1)  # runs[p]: tokens in a row equal to the one p before

    def push(self, token: int) -> bool:
        """Record the next generated token; True when the answer is looping."""
        self.tokens.append(token)
        n = len(self.tokens)
        looping = False
        for p in range(1, min(self.max_period, n - 1) + 1):
            if self.tokens[-1 - p] == token:
                self.runs[p] += 1
                span = self.runs[p] + p
                if span >= self.repeats * p and span >= self.min_tokens:
                    looping = True
            else:
                self.runs[p] = 0
        return looping


class Sampler:
    """Holds the generator and the counts of generated tokens for one answer.

    Penalties look at generated tokens only: the prompt holds the template's control tokens
    (end-of-turn among them), and penalising those would keep the model from stopping.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str = "cpu") -> None:
        params.validate()
        self.params = params
        self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        self._penalise = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0

    def observe(self, token: int) -> None:
        if self._penalise:
            self.counts[token] += 1

    def __call__(self, logits: Tensor) -> int:
        """logits (V,) for the next position -> chosen token id."""
        return int(self._choose(logits))

    def pick(self, logits: Tensor) -> Tensor:
        """As __call__ followed by observe, but the id stays where the logits are (a 0-dim long tensor) and is
        counted for the penalties there: no host round trip, so the next step can be queued behind it."""
        tok = self._choose(logits)
        if self._penalise:
            self.counts.index_add_(0, tok.view(1), torch.ones(1, dtype=self.counts.dtype, device=tok.device))
        return tok

    def _choose(self, logits: Tensor) -> Tensor:
        p = self.params
        logits = logits.float()
        if self._penalise:
            seen = self.counts > 0
            if p.repetition_penalty != 1.0:
                r = p.repetition_penalty
                logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
            if p.presence_penalty:
                logits = logits - seen.float() * p.presence_penalty
        if p.temperature <= 0:
            return torch.argmax(logits)
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            values, ids = torch.topk(logits, p.top_k)  # sorted, descending
        else:
            values, ids = torch.sort(logits, descending=True)
        probs = torch.softmax(values, dim=-1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            before = torch.cumsum(probs, dim=-1) - probs
            keep &= before < p.top_p
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs[0]
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return ids[choice].view(())


def greedy(logits: Tensor) -> int:
    return int(torch.argmax(logits))


def greedy_on_device(logits: Tensor) -> Tensor:
    """greedy, the id left on the device (see Sampler.pick)."""
    return torch.argmax(logits)
