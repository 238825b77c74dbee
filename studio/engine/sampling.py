"""Next-token choice from logits: greedy, temperature, top-k, top-p, min-p and penalties.

Order (as llama.cpp and transformers do it): penalties, temperature, top-k, top-p, min-p,
then one draw from a seeded torch.Generator, so the same seed gives the same answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
