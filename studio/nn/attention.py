"""Attention, the one function every model calls: softmax(q k^T * scale + mask) v.

The fast path is torch's scaled_dot_product_attention (flash / memory-efficient / math kernels,
chosen by torch for the device and dtype). Soft-capped logits (Gemma 2) are something SDPA cannot
do, so they take the plain path: the scores are materialised, capped, masked and softmaxed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, causal: bool = False,
              scale: float | None = None, softcap: float | None = None) -> Tensor:
    """q (B, H, T, D), k and v (B, H, S, D) -> (B, H, T, D).

    mask: boolean (True = attend) or additive float, broadcastable to (B, H, T, S). causal: the
    lower-triangular mask (not with `mask`). scale: 1 / sqrt(D) if None. softcap: logits become
    softcap * tanh(logits / softcap) before the softmax; needs a boolean mask or none.
    """
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    if causal or (mask is not None and mask.dtype != torch.bool):
        raise ValueError("soft-capped attention takes a boolean mask (True = attend), not causal=True or a float mask")
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, T, S)
    s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v
