"""Placement policies under simulated small cards: peak VRAM and time per policy, as JSON.

    python benchmarks/bench_memory.py                          # GPU: a 6 GiB bf16 MLP stack
    python benchmarks/bench_memory.py --factory pkg.mod:make   # any model: make() -> (model, inputs[, blocks])
    python benchmarks/bench_memory.py --budgets 24 8 6 4 --steps 5 --reference
    python benchmarks/bench_memory.py --tiny                   # CPU smoke run of the whole script

Each budget is enforced twice: the MemoryManager plans against it, and
torch.cuda.set_per_process_memory_fraction makes the allocator refuse anything beyond it, so a
policy that does not really fit shows up as "oom". For every budget the script runs each policy
(RESIDENT, MODEL_OFFLOAD, BLOCK_STREAM, SEQUENTIAL) for `--steps` forward passes after a warm-up,
and reports the first-use time (the move to the device, pinning included), the reload time after an
eviction (what a model switch costs), the mean step time, and the peak VRAM above the empty baseline. It also says which policy the planner picks and why. `--reference`
adds accelerate's cpu_offload (sequential, per module) on the same model in the same run.

The factory returns the model on the CPU in its run dtype, a tuple of CPU input tensors, and
optionally the list of blocks to stream (default: the entries of its outermost ModuleLists).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import time
from datetime import datetime, timezone

import torch
from torch import nn

from studio.engine.context import UserError
from studio.engine.device import probe
from studio.engine.memory import MemoryManager, Policy, estimate_module_bytes, is_oom
from studio.units import GiB, fmt_bytes


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(dim, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def default_factory(tiny: bool = False):
    """24 blocks of 4096 -> 16384 -> 4096 in bf16: 6 GiB of weights, ~0.25 GiB per block."""
    dim, hidden, depth, tokens = (64, 256, 4, 16) if tiny else (4096, 16384, 24, 4096)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device("meta"):  # skip the slow fp32 default init of 6 GiB of weights
        model = Stack(dim, hidden, depth)
    model = model.to(dtype).to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g) if p.ndim > 1 else p.fill_(1.0)
    return model, (torch.randn(1, tokens, dim, dtype=dtype, generator=g),), list(model.blocks)


def load_factory(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "make")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clean(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device, base: int) -> int:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0


@torch.no_grad()
def run_policy(manager: MemoryManager, model: nn.Module, inputs: tuple, blocks, policy: Policy, steps: int) -> dict:
    device = manager.device
    clean(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    args = tuple(t.to(device) for t in inputs)
    manager.register("model", model, policy, blocks=blocks)
    try:
        t0 = time.perf_counter()
        with manager.use("model") as m:
            m(*args)  # warm-up: includes the first move to the device
            sync(device)
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(steps):
                out = m(*args)
            sync(device)
            step = (time.perf_counter() - t1) / steps
        top = peak(device, base)
        # A model switch: evict to RAM, then make it ready again (what each job pays under model offload).
        manager.offload("model")
        t2 = time.perf_counter()
        with manager.use("model"):
            sync(device)
        reload = time.perf_counter() - t2
        result = {"asked": policy.value, "policy": manager.policy_of("model").value, "first_s": round(first, 4),
                  "reload_s": round(reload, 4), "step_ms": round(step * 1e3, 2), "peak_vram": top,
                  "accounted_vram": manager.used, "ok": bool(torch.isfinite(out.float()).all())}
    except UserError as exc:  # the manager's accounting refused before touching the device
        result = {"asked": policy.value, "policy": policy.value, "refused": exc.message}
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        result = {"asked": policy.value, "policy": policy.value, "oom": True, "peak_vram": peak(device, base)}
    finally:
        manager.unload("model")
        del args
        clean(device)
    return result


@torch.no_grad()
def run_accelerate(model: nn.Module, inputs: tuple, device: torch.device, steps: int) -> dict:
    """accelerate's sequential cpu_offload (what diffusers' enable_sequential_cpu_offload uses)."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    clean(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    args = tuple(t.to(device) for t in inputs)
    try:
        cpu_offload(model, execution_device=device)
        t0 = time.perf_counter()
        model(*args)
        sync(device)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(steps):
            model(*args)
        sync(device)
        result = {"policy": "accelerate_sequential", "first_s": round(first, 4),
                  "step_ms": round((time.perf_counter() - t1) / steps * 1e3, 2), "peak_vram": peak(device, base)}
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        result = {"policy": "accelerate_sequential", "oom": True}
    finally:
        remove_hook_from_submodules(model)
        model.to("cpu")
        del args
        clean(device)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factory", help="module:function returning (model, inputs[, blocks])")
    ap.add_argument("--budgets", type=float, nargs="+", default=[24, 8, 6, 4], help="GiB")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--policies", nargs="+", default=[p.value for p in Policy])
    ap.add_argument("--activations", type=float, default=None, help="GiB of activations for the planner "
                    "(default: measured from a resident run when it fits the card)")
    ap.add_argument("--reference", action="store_true", help="also run accelerate's cpu_offload")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()

    profile = probe("cpu" if a.tiny else "auto")
    device = torch.device(profile.torch_device)
    made = load_factory(a.factory)() if a.factory else default_factory(a.tiny)
    model, inputs = made[0], made[1]
    blocks = made[2] if len(made) > 2 else None
    weights = estimate_module_bytes(model)

    # Activations: a resident run on the whole card, peak minus weights.
    acts = int(a.activations * GiB) if a.activations is not None else 0
    resident_full = None
    if a.activations is None and device.type == "cuda" and weights < 0.8 * profile.total_vram:
        whole = MemoryManager(profile, budget_bytes=profile.total_vram)
        resident_full = run_policy(whole, model, inputs, blocks, Policy.RESIDENT, a.steps)
        acts = max(0, resident_full.get("peak_vram", 0) - weights)

    results = []
    for budget_gib in a.budgets:
        budget = int(budget_gib * GiB)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / profile.total_vram), device)
        manager = MemoryManager(profile, budget_bytes=budget)
        manager.register("model", model, blocks=blocks)
        try:
            plan = manager.estimate_job({"model": weights}, acts)
            chosen, reason = plan.policy.value, plan.reason
        except UserError as exc:  # nothing fits; still time what the card allows
            chosen, reason = None, exc.message
        manager.unload("model")
        runs = [run_policy(manager, model, inputs, blocks, Policy(p), a.steps) for p in a.policies]
        if a.reference:
            runs.append(run_accelerate(model, inputs, device, a.steps))
        results.append({"budget_gib": budget_gib, "planner": chosen, "reason": reason, "runs": runs})
        for r in runs:
            if "step_ms" in r:
                what = f"{r['step_ms']:8.1f} ms/step  first {r['first_s']:.2f} s  reload {r.get('reload_s', 0):.2f} s"
            else:
                what = "OOM" if r.get("oom") else "refused by the planner"
            print(f"{budget_gib:5.1f} GiB  {r['policy']:22s} {what}  peak {fmt_bytes(r.get('peak_vram', 0))}",
                  flush=True)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)

    report = {
        "bench": "memory", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": profile.label(), "torch": torch.__version__, "host": platform.node(),
        "model": type(model).__name__, "weights_bytes": weights, "activations_bytes": acts,
        "steps": a.steps, "resident_unbounded": resident_full, "budgets": results,
    }
    text = json.dumps(report)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
