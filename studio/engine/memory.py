"""The placement manager: the ONLY place that moves weights between RAM and the device.

A job names its components (UNet, text encoders, VAE, ...) and their sizes; `estimate_job`
picks the fastest policy that fits the VRAM budget and says why. `MemoryManager` holds the
registered modules, accounts the bytes each one occupies on the device against the budget,
and makes a component ready with `use(name)`, evicting least-recently-used ones to RAM only
until enough is free. Accounting is plain arithmetic on byte counts, so a budget such as
`--vram-budget 4GiB` simulates a small card on any machine, including in tests on a CPU.

Policies, fastest first:
  RESIDENT       everything on the device at once
  MODEL_OFFLOAD  whole components moved to the device when used, LRU-evicted to RAM
  BLOCK_STREAM   weights in pinned RAM, one block on the device at a time, the next prefetched
  SEQUENTIAL     per-layer streaming: minimum VRAM, slowest
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from studio.engine.context import UserError
from studio.engine.device import DeviceProfile
from studio.engine.memory_plan import (  # the manager carries out plans; callers reach them from here too
    DEFAULT_ADVICE,
    ComponentShape,
    Plan,
    Policy,
    describe,
    device_need,
    plan_job,
)
from studio.engine.offload import (
    BlockStreamer,
    WholeModule,
    estimate_module_bytes,
    find_blocks,
)
from studio.engine.weights import QUANT_MODES, QuantSummary, memory_report, quantize_model
from studio.units import fmt_bytes

# The quantization hooks live beside the weight loaders; the manager's callers reach them from here.
__all__ = [
    "ComponentShape", "MemoryManager", "Plan", "Policy", "QUANT_MODES", "QuantSummary", "estimate_module_bytes",
    "describe", "fmt_bytes", "is_oom", "memory_report", "out_of_memory", "plan_job", "quantize_model", "run_with_oom_retry",
]

T = TypeVar("T")

# ---------------------------------------------------------------------------
# The manager: registered modules, byte accounting, LRU.


@dataclass
class _Entry:
    name: str
    module: nn.Module
    policy: Policy
    shape: ComponentShape
    blocks: list[nn.Module] | None
    on_device: bool = False
    in_use: int = 0
    last_used: int = 0
    streamer: BlockStreamer | None = None
    whole: WholeModule | None = None  # pinned CPU copy of a model-offloaded component

    def device_bytes(self) -> int:
        return device_need(self.shape, self.policy)


class MemoryManager:
    """Owns every registered model's placement. Thread-safe: the server thread reads `status()`."""

    def __init__(self, profile: DeviceProfile, budget_bytes: int | None = None, *,
                 on_notice: Callable[[str], None] | None = None) -> None:
        self.profile = profile
        self.device = torch.device(profile.torch_device)
        if budget_bytes is not None:
            self.budget: int | None = int(budget_bytes)
        elif profile.vram_budget:
            self.budget = profile.vram_budget
        elif profile.total_vram and profile.kind != "mps":  # MPS shares RAM; no separate card to budget
            self.budget = profile.total_vram
        else:
            self.budget = None
        self.on_notice = on_notice or (lambda text: None)
        self._entries: dict[str, _Entry] = {}
        self._activations: dict[str, int] = {}
        self._copy_on_cpu = False
        self._clock = itertools.count(1)
        self._lock = threading.RLock()

    # -- planning ----------------------------------------------------------
    def estimate_job(self, components: Mapping[str, int | ComponentShape],
                     activations_bytes: int | Mapping[str, int] = 0, *,
                     force: Mapping[str, Policy] | None = None, advice: str = DEFAULT_ADVICE,
                     copy_on_cpu: bool = False) -> Plan:
        """plan_job against this manager's budget (see plan_job for `force` and `advice`).

        A byte count given for a registered component keeps that size but takes its block structure
        from the measured module, so streaming needs are exact rather than the default guess.
        """
        shaped = {n: self._entries[n].shape.scaled(int(c)) if n in self._entries and not isinstance(c, ComponentShape)
                  else c for n, c in components.items()}
        plan = plan_job(shaped, activations_bytes, self.budget, self.profile.total_ram, force=force, advice=advice)
        plan.copy_on_cpu = copy_on_cpu and self.device.type == "cpu"
        return plan

    def apply_plan(self, plan: Plan) -> None:
        """Switch registered components to the plan's policies (offloading those that change)."""
        with self._lock:
            self._copy_on_cpu = plan.copy_on_cpu
            self._activations = dict(plan.activations)
            for name, policy in plan.per_component.items():
                if name in self._entries:
                    self.set_policy(name, policy)

    # -- registry ----------------------------------------------------------
    def register(self, name: str, module: nn.Module, policy: Policy = Policy.MODEL_OFFLOAD,
                 *, blocks: list[nn.Module] | None = None) -> None:
        """Hand a module (on the CPU) to the manager. `blocks` are its streamable units (default: found)."""
        with self._lock:
            if name in self._entries:
                self.unload(name)
            module.to("cpu")
            shape = ComponentShape.of(module, blocks)
            self._entries[name] = _Entry(name, module, policy, shape, blocks)

    def adopt(self, name: str, module: nn.Module) -> None:
        """Register a module where it is, resident: built in place on the device (after `make_room`) a
        large model needs no second copy in RAM; one found on the CPU is loaded on its first use."""
        with self._lock:
            if name in self._entries:
                self.unload(name)
            first = next(itertools.chain(module.parameters(), module.buffers()), None)
            placed = first is not None and first.device.type == self.device.type
            entry = _Entry(name, module, Policy.RESIDENT, ComponentShape.of(module), None, on_device=placed)
            entry.last_used = next(self._clock)
            self._entries[name] = entry

    def make_room(self, nbytes: int, keep: str | None = None) -> None:
        """Evict least-recently-used idle components until `nbytes` are free within the budget."""
        if self.budget is None:
            return
        with self._lock:
            while self.budget - self.used < nbytes:
                idle = [e for e in self._entries.values() if e.on_device and not e.in_use and e.name != keep]
                if not idle:
                    break
                self._offload(min(idle, key=lambda e: e.last_used))
        self.free_cache()

    def budget_for(self, name: str) -> int | None:
        """The budget left to `name` next to the other components now on the device (None: no cap)."""
        if self.budget is None:
            return None
        with self._lock:
            others = sum(e.device_bytes() for e in self._entries.values() if e.on_device and e.name != name)
        return self.budget - others

    def set_policy(self, name: str, policy: Policy) -> None:
        with self._lock:
            entry = self._entries[name]
            if entry.policy is not policy:
                if entry.in_use:
                    raise RuntimeError(f"cannot change the policy of {name} while it runs")
                self._offload(entry)
                entry.policy = policy

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def policy_of(self, name: str) -> Policy:
        return self._entries[name].policy

    def on_device(self, name: str) -> bool:
        """Whether the component currently holds its device bytes (whole, or its streaming window)."""
        with self._lock:
            return self._entries[name].on_device

    @property
    def used(self) -> int:
        with self._lock:
            return sum(e.device_bytes() for e in self._entries.values() if e.on_device)

    @property
    def free(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    # -- placement ---------------------------------------------------------
    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """Make a component ready on the device for the duration of the block; it stays warm after."""
        with self._lock:
            entry = self._entries[name]
            if not entry.on_device:
                self._fit(entry)
                self._load(entry)
            entry.in_use += 1
            entry.last_used = next(self._clock)
        try:
            yield entry.module
        finally:
            with self._lock:
                entry.in_use -= 1

    def offload(self, name: str | None = None) -> list[str]:
        """Move one component (or all idle ones) back to RAM, keeping it registered."""
        with self._lock:
            entries = [self._entries[name]] if name is not None else list(self._entries.values())
            moved = [e.name for e in entries if e.on_device and not e.in_use]
            for e in entries:
                if not e.in_use:
                    self._offload(e)
        self.free_cache()
        return moved

    def unload(self, name: str | None = None) -> list[str]:
        """Forget one component (or all): off the device, hooks removed, references dropped.

        A model's cache key also names its parts ("<key>|unet", ...), so unloading the key drops them all."""
        with self._lock:
            names = list(self._entries) if name is None else [
                n for n in self._entries if n == name or n.startswith(f"{name}|")]
            for n in names:
                entry = self._entries[n]
                if entry.in_use:
                    raise UserError("bad_input", f"{n} is in use by the running job; cancel it first, then unload")
                self._offload(entry)
                del self._entries[n]
        self.free_cache()
        return names

    def free_cache(self) -> None:
        """Return freed device memory to the driver so the next allocation (or another app) can have it."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def _room_for(self, entry: _Entry) -> int:
        return entry.device_bytes() + self._activations.get(entry.name, 0)

    def _fit(self, entry: _Entry) -> None:
        """Evict least-recently-used idle components until `entry` fits; demote it if nothing else helps."""
        if self.budget is None:
            return
        while self.used + self._room_for(entry) > self.budget:
            idle = [e for e in self._entries.values() if e.on_device and not e.in_use and e is not entry]
            if not idle:
                break
            victim = min(idle, key=lambda e: e.last_used)
            self._offload(victim)
        while self.used + self._room_for(entry) > self.budget:
            lower = entry.policy.more_frugal()
            if lower is None:
                busy = [e.name for e in self._entries.values() if e.on_device]
                held = (f"; {fmt_bytes(self.used)} of it is held by {', '.join(busy)}, which are running"
                        if busy else "")
                raise UserError(
                    "out_of_memory",
                    f"{entry.name} needs {fmt_bytes(self._room_for(entry))} of VRAM even layer by layer, and the "
                    f"budget is {fmt_bytes(self.budget)}{held}; try a quantized model or a larger --vram-budget",
                )
            self.on_notice(f"{entry.name} does not fit the {fmt_bytes(self.budget)} VRAM budget with "
                           f"{entry.policy.label}; switching to {lower.label}")
            entry.policy = lower

    def _load(self, entry: _Entry) -> None:
        try:
            if entry.policy is Policy.MODEL_OFFLOAD and self.device.type == "cuda":
                # It will move again: keep a pinned CPU copy so reloads are fast and evictions free.
                if entry.whole is None:
                    entry.whole = WholeModule(entry.module, pin=True)
                entry.whole.to_device(self.device)
            elif entry.policy in (Policy.RESIDENT, Policy.MODEL_OFFLOAD):
                entry.module.to(self.device)
            elif entry.policy is Policy.SEQUENTIAL:
                entry.streamer = BlockStreamer.sequential(entry.module, self.device,
                                                          copy_on_cpu=self._copy_on_cpu).attach()
            else:
                blocks = entry.blocks if entry.blocks is not None else find_blocks(entry.module)
                entry.streamer = BlockStreamer(entry.module, blocks, self.device, copy_on_cpu=self._copy_on_cpu).attach()
        except BaseException:
            # A real OOM halfway through a move leaves some weights on the device: take them back,
            # so the retry starts from a clean slate.
            if entry.streamer is not None:
                entry.streamer.detach()
                entry.streamer = None
            entry.module.to("cpu")
            raise
        entry.on_device = True

    def _offload(self, entry: _Entry) -> None:
        if not entry.on_device:
            return
        if entry.streamer is not None:
            entry.streamer.detach()
            entry.streamer = None
        elif entry.whole is not None and entry.whole.on_device:
            entry.whole.to_host()
        else:
            entry.module.to("cpu")
        entry.on_device = False

    def out_of_memory(self) -> UserError:
        """A device OOM outside any job's plan (while loading, a self-test): free what is idle and say what
        was held against the budget. The one message shape of every OOM the user sees."""
        with self._lock:
            held = [(e.name.split("|")[-1], e.device_bytes()) for e in self._entries.values() if e.on_device]
            used = self.used
        self.offload()
        has = "no VRAM cap" if self.budget is None else f"{fmt_bytes(self.budget)} VRAM budget"
        what = ", ".join(f"{n} {fmt_bytes(b)}" for n, b in held) or "no model"
        return UserError("out_of_memory", f"ran out of VRAM outside a planned step: {fmt_bytes(used)} was held "
                         f"({what}); has {has}; idle models are now back in RAM: try again, {DEFAULT_ADVICE}")

    # -- reporting ---------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The device/memory/models part of an `engine_status` event."""
        gpu = self.device.type != "cpu"
        with self._lock:
            models = []
            ram_used = 0
            for e in self._entries.values():
                whole_on_device = e.on_device and e.policy in (Policy.RESIDENT, Policy.MODEL_OFFLOAD)
                where = "VRAM" if whole_on_device and gpu else "RAM"
                if where == "RAM":
                    ram_used += e.shape.bytes
                models.append({"key": e.name, "bytes": e.shape.bytes, "where": where, "policy": e.policy.value,
                               "vram_bytes": e.device_bytes() if e.on_device else 0})
            used = self.used
        budget = self.budget or 0
        return {
            "device": self.profile.to_dict(),
            "memory": {"budget": budget, "used": used, "free": max(0, budget - used), "ram_used": ram_used},
            "models": models,
        }


# ---------------------------------------------------------------------------
# OOM: retry once, more frugally; then fail with numbers.


def is_oom(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS and older builds raise RuntimeError('... out of memory')."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_with_oom_retry(fn: Callable[[Plan], T], manager: MemoryManager, plan: Plan,
                       on_retry: Callable[[str], None] | None = None,
                       can_retry: Callable[[], bool] | None = None) -> T:
    """The one out-of-memory path of every job: run `fn(plan)`; on a device OOM free what we can,
    step every component down once and retry; a second OOM becomes UserError('out_of_memory')
    saying what was needed against the budget and what to try (the plan's `advice`).

    `on_retry` gets the sentence the user should see. `can_retry` says whether a rerun is still
    harmless (a chat answer that already streamed text cannot start over): when it returns False
    the first OOM fails at once, with the same message.
    """
    manager.apply_plan(plan)
    try:
        return fn(plan)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
    # Here, outside the except block, the exception's traceback (and the activations its frames
    # hold) is already gone, so emptying the allocator's cache actually frees them.
    manager.offload()
    frugal = plan.more_frugal()
    if frugal is None or (can_retry is not None and not can_retry()):
        raise out_of_memory(plan, again=False)
    (on_retry or manager.on_notice)(f"ran out of VRAM with {plan.policy.label}; retrying with {frugal.policy.label}")
    manager.apply_plan(frugal)
    try:
        return fn(frugal)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
    manager.offload()
    raise out_of_memory(frugal, again=True)


def out_of_memory(plan: Plan, again: bool) -> UserError:
    """'ran out of VRAM [again] with <policy>: needs X VRAM + Y RAM; has Z VRAM budget + W RAM; <advice>'."""
    return UserError("out_of_memory", f"ran out of VRAM{' again' if again else ''} with {plan.policy.label}: "
                     f"{plan.needs_text()}; {plan.advice or DEFAULT_ADVICE}")
