"""Placement plans: which policy each component of a job gets under a VRAM budget, and what it needs.

Pure arithmetic on byte counts (a module, when given, is only measured), so a budget such as
`--vram-budget 4GiB` plans a small card on any machine. `memory.MemoryManager` carries the plans out.

Policies, fastest first:
  RESIDENT       everything on the device at once
  MODEL_OFFLOAD  whole components moved to the device when used, LRU-evicted to RAM
  BLOCK_STREAM   weights in pinned RAM, one block on the device at a time, the next prefetched
  SEQUENTIAL     per-layer streaming: minimum VRAM, slowest
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from studio.engine.context import UserError
from studio.engine.offload import estimate_module_bytes, find_blocks, leaf_blocks, tensor_bytes
from studio.units import fmt_bytes

# Without the real module we assume a streamed component splits into this many equal blocks,
# and that its largest single layer is this fraction of it (SDXL UNet: ~1/90; CLIP-G: ~1/11
# because of its token embedding, but an embedding lookup is tiny next to the rest of the job).
DEFAULT_BLOCKS = 16
DEFAULT_LEAF_FRACTION = 1 / 64


class Policy(enum.Enum):
    RESIDENT = "resident"
    MODEL_OFFLOAD = "model_offload"
    BLOCK_STREAM = "block_stream"
    SEQUENTIAL = "sequential"

    @property
    def label(self) -> str:
        return _LABELS[self]

    def more_frugal(self) -> Policy | None:
        """The next policy down the ladder, or None at the bottom."""
        i = _ORDER.index(self)
        return _ORDER[i + 1] if i + 1 < len(_ORDER) else None


_ORDER = (Policy.RESIDENT, Policy.MODEL_OFFLOAD, Policy.BLOCK_STREAM, Policy.SEQUENTIAL)
_LABELS = {
    Policy.RESIDENT: "all resident",
    Policy.MODEL_OFFLOAD: "model offload",
    Policy.BLOCK_STREAM: "block streaming",
    Policy.SEQUENTIAL: "sequential offload",
}


@dataclass(frozen=True)
class ComponentShape:
    """What the planner knows of one component: its size and how finely it can be streamed."""

    bytes: int
    block_bytes: tuple[int, ...] = ()  # streamable blocks; their sum may be < bytes (the rest stays resident)
    largest_leaf: int = 0  # biggest single layer, for sequential offload

    def stream_need(self) -> int:
        """Device bytes while block-streaming: the non-block rest + the running block + the prefetched one."""
        blocks = self.block_bytes or (self.bytes // DEFAULT_BLOCKS,) * DEFAULT_BLOCKS
        rest = max(0, self.bytes - sum(blocks))
        return rest + 2 * max(blocks)

    def sequential_need(self) -> int:
        leaf = self.largest_leaf or int(self.bytes * DEFAULT_LEAF_FRACTION)
        return 2 * leaf

    def scaled(self, nbytes: int) -> ComponentShape:
        """The same structure at another size (e.g. measured in fp32, run in bf16)."""
        if not self.bytes:
            return ComponentShape(nbytes)
        f = nbytes / self.bytes
        return ComponentShape(nbytes, tuple(int(b * f) for b in self.block_bytes), int(self.largest_leaf * f))

    @classmethod
    def of(cls, module: nn.Module, blocks: list[nn.Module] | None = None) -> ComponentShape:
        blocks = find_blocks(module) if blocks is None else blocks
        leaves = leaf_blocks(module)
        return cls(
            bytes=estimate_module_bytes(module),
            block_bytes=tuple(estimate_module_bytes(b) for b in blocks),
            largest_leaf=max((sum(tensor_bytes(t) for t in _direct_tensors(m)) for m in leaves), default=0),
        )


def _direct_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)


@dataclass
class Plan:
    """The placement chosen for one job, with the numbers behind it."""

    policy: Policy  # the most frugal policy any component uses
    per_component: dict[str, Policy]
    reason: str
    vram_needed: int  # peak device bytes under this plan, activations included
    ram_needed: int  # bytes of weights held in CPU RAM (pinned for streamed components)
    vram_budget: int | None  # None: no cap (CPU)
    ram_available: int
    activations: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, ComponentShape] = field(default_factory=dict)
    vae_tiles: bool = False  # the pipeline should decode in tiles (set on an OOM retry)
    # Streamed policies make real copies even on the CPU, so the streaming path runs (and is tested)
    # without a GPU; otherwise a CPU "move" is a no-op.
    copy_on_cpu: bool = False
    advice: str = ""  # what the user can try when this job runs out of memory

    def needs_text(self) -> str:
        """'needs 2.1 GiB VRAM + 6.9 GiB RAM; has 4.0 GiB VRAM budget + 31.2 GiB RAM'."""
        return _needs_text(self.vram_needed, self.ram_needed, self.vram_budget, self.ram_available)

    def more_frugal(self) -> Plan | None:
        """Every component one step down the ladder, tiled VAE on; None when nothing is left to give."""
        moved = {name: p.more_frugal() or p for name, p in self.per_component.items()}
        if moved == self.per_component and self.vae_tiles:
            return None
        vram, ram = _needs(self.shapes, moved, self.activations)
        policy = max(moved.values(), key=_ORDER.index, default=Policy.SEQUENTIAL)
        changed = ", ".join(f"{n}: {p.label}" for n, p in moved.items())
        return replace(self, policy=policy, per_component=moved, vram_needed=vram, ram_needed=ram,
                       vae_tiles=True, reason=f"retrying more frugally ({changed}; tiled VAE)")


def _needs_text(vram: int, ram: int, budget: int | None, ram_available: int) -> str:
    has_vram = "no VRAM cap" if budget is None else f"{fmt_bytes(budget)} VRAM budget"
    has_ram = f" + {fmt_bytes(ram_available)} RAM" if ram_available else ""
    return f"needs {fmt_bytes(vram)} VRAM + {fmt_bytes(ram)} RAM; has {has_vram}{has_ram}"


def device_need(shape: ComponentShape, policy: Policy) -> int:
    if policy in (Policy.RESIDENT, Policy.MODEL_OFFLOAD):
        return shape.bytes
    if policy is Policy.BLOCK_STREAM:
        return min(shape.bytes, shape.stream_need())
    return min(shape.bytes, shape.sequential_need())


def _needs(shapes: Mapping[str, ComponentShape], policies: Mapping[str, Policy],
           activations: Mapping[str, int]) -> tuple[int, int]:
    """(peak VRAM, RAM) for per-component policies. Components run one after another."""
    if all(p is Policy.RESIDENT for p in policies.values()):
        vram = sum(s.bytes for s in shapes.values()) + max(activations.values(), default=0)
        return vram, 0
    vram = max((device_need(shapes[n], p) + activations.get(n, 0) for n, p in policies.items()), default=0)
    # Offloaded and streamed weights live in RAM between uses.
    return vram, sum(shapes[n].bytes for n, p in policies.items() if p is not Policy.RESIDENT)


DEFAULT_ADVICE = "try a smaller size, a quantized model (int8/int4), or a larger --vram-budget"


def plan_job(
    components: Mapping[str, int | ComponentShape],
    activations_bytes: int | Mapping[str, int],
    budget: int | None,
    ram_available: int = 0,
    *,
    force: Mapping[str, Policy] | None = None,
    advice: str = DEFAULT_ADVICE,
) -> Plan:
    """Choose the fastest placement that fits `budget`; raise UserError('out_of_memory') when none does.

    `activations_bytes` is one peak for the whole job or a peak per component (a VAE decode at
    1024² needs far more than a UNet step). Components are assumed to run one at a time.
    `force` pins components to a policy (a setting that asks for streaming; a chat model whose
    decode step needs it resident); a pinned component that does not fit is refused with numbers.
    `advice` ends every refusal: what the user can change for this kind of job.
    """
    force = dict(force or {})
    shapes = {n: c if isinstance(c, ComponentShape) else ComponentShape(int(c)) for n, c in components.items()}
    if isinstance(activations_bytes, Mapping):
        acts = {n: int(activations_bytes.get(n, 0)) for n in shapes}
    else:
        acts = dict.fromkeys(shapes, int(activations_bytes))
    sizes = " + ".join(f"{n} {fmt_bytes(s.bytes)}" for n, s in shapes.items())

    def make(per: dict[str, Policy], reason: str) -> Plan:
        per = {**per, **{n: p for n, p in force.items() if n in per}}
        vram, ram = _needs(shapes, per, acts)
        policy = max(per.values(), key=_ORDER.index, default=Policy.RESIDENT)
        return Plan(policy, per, reason, vram, ram, budget, ram_available, acts, shapes, advice=advice)

    if budget is None:
        plan = make(dict.fromkeys(shapes, Policy.RESIDENT), f"{sizes}: no VRAM budget applies, every component "
                    "stays resident")
        if any(p is not Policy.RESIDENT for p in plan.per_component.values()):
            plan.reason = f"{sizes}: {describe(plan.per_component)} as asked"
        return plan
    for name, policy in force.items():
        if name in shapes and device_need(shapes[name], policy) + acts[name] > budget:
            need = device_need(shapes[name], policy) + acts[name]
            raise UserError("out_of_memory", f"{name} needs {fmt_bytes(need)} of VRAM with {policy.label} "
                            f"({fmt_bytes(shapes[name].bytes)} of weights), but the budget is "
                            f"{fmt_bytes(budget)}; {advice}")
    resident = make(dict.fromkeys(shapes, Policy.RESIDENT), "")
    if resident.vram_needed <= budget:
        resident.reason = f"{sizes} fit the {fmt_bytes(budget)} budget with activations; " + (
            describe(resident.per_component) if resident.policy is not Policy.RESIDENT else "all resident")
        return resident

    per: dict[str, Policy] = {}
    for name, shape in shapes.items():
        for policy in _ORDER[1:]:
            if device_need(shape, policy) + acts[name] <= budget:
                per[name] = policy
                break
        else:
            plan = make(dict.fromkeys(shapes, Policy.SEQUENTIAL), "")
            raise UserError(
                "out_of_memory",
                f"{name} cannot run in the {fmt_bytes(budget)} VRAM budget even one layer at a time: "
                f"{plan.needs_text()}; {advice}",
            )
    plan = make(per, "")
    if ram_available and plan.ram_needed > ram_available:
        raise UserError(
            "out_of_memory",
            f"{sizes} do not fit the {fmt_bytes(budget)} VRAM budget and the weights do not fit in RAM "
            f"either: {plan.needs_text()}; try a quantized model (int8/int4) or close other programs",
        )
    plan.reason = (f"{sizes} (+ {fmt_bytes(max(acts.values(), default=0))} activations) exceed the "
                   f"{fmt_bytes(budget)} budget; " + describe(plan.per_component))
    return plan


def describe(per: Mapping[str, Policy]) -> str:
    """'streaming transformer blocks; loading vae, text_encoder one at a time': what moves, streaming first."""
    how = {
        Policy.MODEL_OFFLOAD: "loading {} one at a time",
        Policy.BLOCK_STREAM: "streaming {} blocks",
        Policy.SEQUENTIAL: "streaming {} layer by layer",
    }
    parts = []
    for policy in reversed(_ORDER[1:]):  # the notable news first: what streams
        names = [n for n, p in per.items() if p is policy]
        if names:
            parts.append(how[policy].format(", ".join(names)))
    return "; ".join(parts) or "all resident"
