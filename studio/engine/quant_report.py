"""What quantizing a model would save and cost: `studio models info FILE --quant MODE`.

Loads the model's heavy part twice from the memory-mapped file (once kept in full precision, once
quantized), runs both on one fixed input on the CPU, and reports bytes and error. The input is
fixed (seeded) so the numbers are comparable between files and runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.engine.context import UserError


def quant_report(path: str | Path, mode: str) -> dict[str, Any]:
    from studio.engine.weights import memory_report, quantize_model

    path = Path(path)
    original, sample, what = _load(path)
    quantized, _, _ = _load(path)
    summary = quantize_model(quantized, mode)
    with torch.inference_mode():
        report = memory_report(original, quantized, sample)
    report.update(mode=mode, component=what, layers_quantized=len(summary.replaced),
                  layers_kept=len(summary.skipped))
    return report


def _load(path: Path) -> tuple[torch.nn.Module, tuple, str]:
    """(module in fp32 on the CPU, a fixed sample input, what it is)."""
    gen = torch.Generator().manual_seed(0)
    if path.is_file() and _magic(path) == b"GGUF":
        return _llm(path, gen)
    if path.is_dir() and (path / "config.json").is_file():
        return _llm(path, gen)
    from studio.models.sd_checkpoint import read_state_dict
    from studio.models.unet import build_unet

    sd = read_state_dict(path) if path.is_file() else None
    if sd is None:
        raise UserError("unsupported", f"{path} is not a file Studio can quantize: pick a checkpoint or an LLM.")
    try:
        unet = build_unet(sd, dtype=torch.float32)
    except ValueError:
        raise UserError("unsupported", f"{path.name} has no UNet or LLM to quantize: quantization applies to "
                        "Stable Diffusion checkpoints and chat models.") from None
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=gen)
    ctx = torch.randn(1, 77, cfg.context_dim, generator=gen)
    y = torch.randn(1, cfg.adm_in_channels, generator=gen) if cfg.adm_in_channels else None
    return unet.eval(), (x, torch.tensor([500.0]), ctx, y), "unet"


def _llm(path: Path, gen: torch.Generator) -> tuple[torch.nn.Module, tuple, str]:
    from studio.engine.pipelines.chat import load_chat_model, resolve_model

    model_path, kind = resolve_model(str(path))
    from studio.engine.pipelines.chat import ensure_cache

    cm = load_chat_model(model_path, kind, torch.device("cpu"), torch.float32, True, 64, lambda *a: None)
    ensure_cache(cm, 16)
    tokens = torch.randint(0, cm.model.config.vocab_size, (1, 16), generator=gen)
    model = cm.model

    class Logits(torch.nn.Module):  # fixed positions, fresh cache every call: comparable outputs
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.model(t, torch.arange(t.shape[1]), kv_len=t.shape[1])

    return Logits().eval(), (tokens,), "llm"


def _magic(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)
