"""Build a model on the meta device and take the checkpoint's tensors as its weights.

`load_state_dict(assign=True)` makes the module's parameters *be* the given tensors, so memory-mapped
weights are never copied (unless a dtype or device change asks for it). Each family's builder turns
the missing / unexpected key lists into its own error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


def build_on_meta(make: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], *,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  ) -> tuple[nn.Module, list[str], list[str]]:
    """(module in eval mode, missing keys, unexpected keys). Floating tensors are cast to `dtype`."""
    with torch.device("meta"):
        model = make()
    if dtype is not None or device is not None:
        sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in sd.items()}
    result = model.load_state_dict(dict(sd), strict=False, assign=True)
    return model.eval(), list(result.missing_keys), list(result.unexpected_keys)
