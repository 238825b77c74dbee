"""The steps every diffusion job runs, and the helpers its families share.

run_diffusion(job, ctx, family):
  1. family.validate(job) -> (job, notes); the seed is fixed here, so an OOM retry makes the same output;
  2. family.load(job, ctx, dtype) -> model: read (or reuse) its parts, on the CPU;
  3. family.parts(model) are registered with the MemoryManager, which plans where each lives against
     the VRAM budget (family.activations, family.force); a family never moves weights itself;
  4. under the manager's one out-of-memory path, family.generate(run) -> typed result: encode the
     prompt, prepare latents (seeded noise, init image), denoise with a sampler (progress, preview and
     cancel every step), decode, write the output. `run.use(part)` makes a part ready on the device.

A family module (sd.py, wan.py) supplies those five functions; everything else lives here.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from studio.engine import outputs
from studio.engine.context import JobContext, UserError
from studio.engine.memory import DEFAULT_ADVICE, MemoryManager, Plan, Policy, describe, run_with_oom_retry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------- shared helpers

def compute_dtype(ctx: JobContext) -> torch.dtype:
    """The dtype the model's weights and activations use on this device (the profile decides)."""
    return DTYPES.get(ctx.device.compute_dtype(), torch.float32)


def fix_seed(job: Any) -> Any:
    """The job with a concrete seed: a random one drawn now when it asks for any (-1)."""
    return job if job.seed >= 0 else replace(job, seed=random.randrange(2**32))


def noise(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from `seed`: the same numbers on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(device, dtype)


def memory_of(ctx: JobContext) -> MemoryManager:
    """The engine's placement manager; a job run outside the engine (tests, scripts) gets one of its
    own, which puts every part back in RAM when the job ends (run_diffusion)."""
    return ctx.memory if ctx.memory is not None else MemoryManager(ctx.device)


def read_rgb(path: str, mode: str = "RGB"):
    """An image file as a PIL image in `mode`, or a UserError saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError("bad_input", f"Cannot read the image {Path(path).name}: {exc}") from None


def load_image(path: str, width: int, height: int, *, fit: Literal["stretch", "cover"],
               value_range: Literal["0..1", "-1..1"], mode: str = "RGB") -> torch.Tensor:
    """An image file -> (1, C, height, width) float32.

    fit="stretch" resizes to exactly width x height (img2img and masks: the pixels must line up with
    what the user painted on); fit="cover" scales to cover and centre-crops, never distorting (an init
    frame for video). value_range "0..1" or "-1..1" (what a VAE encodes). mode "L" gives one channel.
    """
    from PIL import Image

    if fit not in ("stretch", "cover") or value_range not in ("0..1", "-1..1"):
        raise ValueError(f"load_image: fit must be stretch|cover and value_range 0..1|-1..1, got {fit!r}, "
                         f"{value_range!r}")
    im = read_rgb(path, mode)
    if fit == "stretch":
        im = im.resize((width, height), Image.Resampling.LANCZOS)
    else:
        scale = max(width / im.width, height / im.height)
        im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))),
                       Image.Resampling.LANCZOS)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if value_range == "-1..1":
        arr = arr * 2 - 1
    t = torch.from_numpy(arr.copy())
    return t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]


def keep_one(ctx: JobContext, prefix: str) -> None:
    """Before loading a model of a family that keeps one at a time: drop the family's cached models
    (RAM) through the manager, which takes their parts off the device."""
    for key in [m["key"] for m in ctx.models.summary() if m["key"].startswith(prefix)]:
        ctx.models.unload(key)
        if ctx.memory is not None:
            ctx.memory.unload(key)


def output_target(out: str, suffix: str, ctx: JobContext, fallback: Path) -> tuple[Path, str]:
    return outputs.output_target(out, suffix, ctx, fallback)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so stage timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per stage, from marks taken at each stage's end."""

    started: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, stage: str, device: torch.device | None = None) -> None:
        if device is not None:
            sync(device)
        self.marks[stage] = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def stages(self) -> dict[str, float]:
        out, last = {}, self.started
        for stage, at in self.marks.items():
            out[stage] = round(at - last, 3)
            last = at
        return out


# ---------------------------------------------------------------------------------- the skeleton

@dataclass
class Part:
    """A component the manager places: the module and its streamable blocks (None: found by the manager)."""

    module: torch.nn.Module
    blocks: list[torch.nn.Module] | None = None


class Family(Protocol):
    advice: str  # what to try when the job runs out of memory

    def validate(self, job: Any, ctx: JobContext) -> tuple[Any, list[str]]: ...
    def load(self, job: Any, ctx: JobContext, dtype: torch.dtype, notes: list[str]) -> Any: ...
    def parts(self, model: Any) -> dict[str, Part]: ...
    def activations(self, model: Any, job: Any, dtype: torch.dtype) -> dict[str, int]: ...
    def force(self, job: Any, ctx: JobContext) -> dict[str, Policy]: ...
    def generate(self, run: Run) -> Any: ...


@dataclass
class Run:
    """What a family's generate() works with: the job (seed fixed), its model, where its parts live."""

    job: Any
    ctx: JobContext
    model: Any
    dtype: torch.dtype
    mem: MemoryManager
    names: dict[str, str]  # part -> the manager's name for it
    plan: Plan
    notes: list[str]
    timings: Timings

    @property
    def device(self) -> torch.device:
        return self.mem.device

    @contextlib.contextmanager
    def use(self, *parts: str) -> Iterator[None]:
        """Make these parts ready on the device for the block (the manager evicts others if needed)."""
        with contextlib.ExitStack() as stack:
            for part in parts:
                if part in self.names:
                    stack.enter_context(self.mem.use(self.names[part]))
            yield


def register(mem: MemoryManager, key: str, parts: dict[str, Part]) -> dict[str, str]:
    """Hand a model's parts to the manager once; -> part -> manager name ("<model key>|<part>")."""
    names = {part: f"{key}|{part}" for part in parts}
    for part, p in parts.items():
        if names[part] not in mem.names():
            mem.register(names[part], p.module, blocks=p.blocks)
    return names


def part_bytes(module: torch.nn.Module) -> int:
    from studio.engine.offload import estimate_module_bytes

    return estimate_module_bytes(module)  # buffers too: GGUF blocks and fp8 weights live in buffers


def run_diffusion(job: Any, ctx: JobContext, family: Family) -> Any:
    """Run one diffusion job through the steps above; returns the family's typed result."""
    timings = Timings()
    job, notes = family.validate(job, ctx)
    job = fix_seed(job)
    dtype = compute_dtype(ctx)
    model = family.load(job, ctx, dtype, notes)
    timings.mark("load")
    own_manager = ctx.memory is None
    mem = memory_of(ctx)
    try:
        parts = family.parts(model)
        names = register(mem, model.key, parts)
        sizes = {names[p]: part_bytes(part.module) for p, part in parts.items()}
        acts = {names[p]: b for p, b in family.activations(model, job, dtype).items() if p in names}
        force = {names[p]: policy for p, policy in family.force(job, ctx).items() if p in names}
        plan = mem.estimate_job(sizes, acts, force=force, advice=family.advice or DEFAULT_ADVICE,
                                copy_on_cpu=bool(force))
        if plan.policy is not Policy.RESIDENT:
            placed = describe({p: plan.per_component[n] for p, n in names.items()})
            notes.append(f"memory: {placed} ({plan.needs_text()})")

        def attempt(p: Plan) -> Any:
            return family.generate(Run(job, ctx, model, dtype, mem, names, p, notes, timings))

        return run_with_oom_retry(attempt, mem, plan,
                                  on_retry=lambda text: (notes.append(text), ctx.progress(0, 1, text)))
    finally:
        if own_manager:
            # Outside the engine nobody else will ever move these parts back: leave them on the CPU,
            # hooks removed, for whoever runs the cached model next.
            mem.offload()
