"""Block streaming: weights live in (pinned) CPU RAM and visit the device one block at a time.

A forward pre-hook on each block makes its weights ready on the device; while it runs, the
block expected next is already being copied on a side CUDA stream (non_blocking from pinned
memory), so the copy hides behind compute. A forward hook puts the block's tensors back to
their CPU copies and frees the device copies. At most the running block, its nested active
blocks and one prefetched block are on the device at once.

Only the tensors' storage moves: the module objects, their Parameters and hooks stay as they
are, so the output is bitwise the same as with everything resident.

On a CPU device every "move" is a no-op unless `copy_on_cpu=True`, which makes real copies so
the bookkeeping can be checked without a GPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def estimate_module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor counted once (works on meta)."""
    seen: set[int] = set()
    total = 0
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def find_blocks(module: nn.Module) -> list[nn.Module]:
    """A model's streamable blocks: its own `stream_blocks()` if it has one, else the entries of
    its outermost ModuleLists (transformer layers, UNet down/up blocks), in registration order."""
    custom = getattr(module, "stream_blocks", None)
    if callable(custom):
        return list(custom())
    blocks: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(child)
            else:
                visit(child)

    visit(module)
    return blocks


def leaf_blocks(module: nn.Module) -> list[nn.Module]:
    """Every submodule that directly owns a parameter or buffer: the units of sequential offload."""
    return [m for m in module.modules()
            if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None]


# A tensor slot: (owning module, attribute name, is it a Parameter).
_Slot = tuple[nn.Module, str, bool]


def _slots(module: nn.Module, recurse: bool) -> list[_Slot]:
    mods = module.modules() if recurse else [module]
    out: list[_Slot] = []
    for m in mods:
        out += [(m, n, True) for n, p in m._parameters.items() if p is not None]
        out += [(m, n, False) for n, b in m._buffers.items() if b is not None]
    return out


def _get(slot: _Slot) -> torch.Tensor:
    m, name, is_param = slot
    return m._parameters[name] if is_param else m._buffers[name]


def _set(slot: _Slot, data: torch.Tensor) -> None:
    m, name, is_param = slot
    if is_param:
        # Swap the storage, keep the Parameter object: optimisers, ties and hooks keep pointing at it.
        m._parameters[name].data = data
    else:
        m._buffers[name] = data


@dataclass
class _Block:
    module: nn.Module
    slots: list[_Slot]
    host: list[torch.Tensor]  # the CPU (pinned) copies: the weights' home
    nbytes: int
    on_device: list[torch.Tensor] | None = None  # device copies while loaded or prefetched
    ready: object | None = None  # torch.cuda.Event recorded after the copy on the side stream
    active: int = 0  # nesting depth of running forwards
    handles: list = field(default_factory=list)


class BlockStreamer:
    """Stream `blocks` of `model` through `device`; everything outside the blocks stays resident there.

    Use as a context manager or call attach()/detach(). Counters (`loads`, `prefetch_hits`,
    `peak_blocks`) say what happened, for tests and benchmarks.
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device: torch.device | str, *,
                 prefetch: bool = True, pin: bool | None = None, copy_on_cpu: bool = False,
                 direct_only: bool = False) -> None:
        self.model = model
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda if pin is None else pin
        self.copy = copy_on_cpu or self.device.type != "cpu"
        ids = {id(b) for b in blocks}
        if len(ids) != len(blocks):
            raise ValueError("a block is listed twice")
        if not direct_only:
            for b in blocks:
                for sub in b.modules():
                    if sub is not b and id(sub) in ids:
                        raise ValueError(f"block {type(sub).__name__} is nested inside block {type(b).__name__}; "
                                         "list either the parent or its children")
        per_block = [_slots(b, recurse=not direct_only) for b in blocks]
        # A tensor reachable from two blocks (tied weights) stays resident: streaming it with one
        # block would pull it from under the other.
        owners: dict[int, int] = {}
        for slots in per_block:
            for s in slots:
                owners[id(_get(s))] = owners.get(id(_get(s)), 0) + 1
        self._blocks: list[_Block] = []
        streamed: set[int] = set()
        for b, slots in zip(blocks, per_block, strict=True):
            mine = [s for s in slots if owners[id(_get(s))] == 1]
            streamed.update(id(_get(s)) for s in mine)
            self._blocks.append(_Block(b, mine, [], sum(tensor_bytes(_get(s)) for s in mine)))
        self._resident = [s for s in _slots(model, recurse=True) if id(_get(s)) not in streamed]
        self._resident_host: list[torch.Tensor] = []
        self._index = {id(b.module): i for i, b in enumerate(self._blocks)}
        self._next: dict[int, int] = {}  # learned execution order: block -> the block that ran after it
        self._last: int | None = None
        self._pending: int | None = None  # the block being prefetched
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.attached = False
        self.loads = 0
        self.prefetch_hits = 0
        self.peak_blocks = 0

    @classmethod
    def sequential(cls, model: nn.Module, device: torch.device | str, **kw) -> BlockStreamer:
        """Sequential offload: every module that owns weights is its own block (minimum VRAM)."""
        return cls(model, leaf_blocks(model), device, direct_only=True, **kw)

    @property
    def largest_block(self) -> int:
        return max((b.nbytes for b in self._blocks), default=0)

    @property
    def resident_bytes(self) -> int:
        return sum(tensor_bytes(_get(s)) for s in self._resident)

    def device_bytes(self) -> int:
        """Peak weight bytes on the device: the resident rest, a running block and a prefetched one."""
        return self.resident_bytes + 2 * self.largest_block

    def blocks_on_device(self) -> int:
        return sum(b.on_device is not None for b in self._blocks)

    # -- lifecycle ---------------------------------------------------------
    def attach(self) -> BlockStreamer:
        if self.attached:
            return self
        self.attached = True  # from here on detach() can undo a partial attach (e.g. an OOM)
        try:
            for b in self._blocks:
                b.host = [self._home(_get(s)) for s in b.slots]
                for s, h in zip(b.slots, b.host, strict=True):
                    _set(s, h)
                b.handles = [
                    b.module.register_forward_pre_hook(self._make_pre(b)),
                    b.module.register_forward_hook(self._make_post(b), always_call=True),
                ]
            # detach() shares storage with the CPU tensors as they are now, before `.data` is swapped.
            self._resident_host = [_get(s).detach() for s in self._resident]
            for s in self._resident:
                _set(s, _get(s).to(self.device))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove the hooks and leave the whole model on the CPU."""
        if not self.attached:
            return
        if self._stream is not None:
            self._stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        for b in self._blocks:
            for h in b.handles:
                h.remove()
            b.handles = []
            self._drop(b)
            if b.host:
                for s, h in zip(b.slots, b.host, strict=True):
                    _set(s, h)
        if self._resident_host:
            for s, h in zip(self._resident, self._resident_host, strict=True):
                _set(s, h.to("cpu"))
        self._resident_host = []
        self._pending = None
        self.attached = False

    def release(self) -> None:
        """Drop any prefetched block (e.g. between jobs); hooks stay."""
        for b in self._blocks:
            if not b.active:
                self._drop(b)
        self._pending = None

    def __enter__(self) -> BlockStreamer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- moves -------------------------------------------------------------
    def _home(self, t: torch.Tensor) -> torch.Tensor:
        return _host_copy(t, self.pin)

    def _fetch(self, b: _Block) -> None:
        """Start copying a block to the device (on the side stream when there is one)."""
        if b.on_device is not None:
            return
        self.loads += 1
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                b.on_device = [h.to(self.device, non_blocking=True) for h in b.host]
                b.ready = torch.cuda.Event()
                b.ready.record(self._stream)
        else:
            b.on_device = [h.to(self.device, copy=self.copy) for h in b.host]
        self.peak_blocks = max(self.peak_blocks, self.blocks_on_device())

    def _drop(self, b: _Block) -> None:
        if b.on_device is None:
            return
        if self._stream is not None:
            # Memory allocated on the side stream but read by compute on the current stream must not
            # be reused by the allocator before that compute is done.
            current = torch.cuda.current_stream(self.device)
            for t in b.on_device:
                t.record_stream(current)
        b.on_device = None
        b.ready = None

    def _make_pre(self, b: _Block):
        def pre_hook(module: nn.Module, args) -> None:
            i = self._index[id(module)]
            if self._last is not None and self._last != i:
                self._next[self._last] = i
            self._last = i
            if b.active == 0:
                if self._pending is not None and self._pending != i:
                    stale = self._blocks[self._pending]
                    if stale.active == 0:
                        self._drop(stale)  # the guess was wrong; don't hold two spare blocks
                if self._pending == i and b.on_device is not None:
                    self.prefetch_hits += 1
                self._pending = None
                self._fetch(b)
                if b.ready is not None:
                    torch.cuda.current_stream(self.device).wait_event(b.ready)
                for s, t in zip(b.slots, b.on_device, strict=True):
                    _set(s, t)
            b.active += 1
            if self.prefetch and len(self._blocks) > 1:
                j = self._next.get(i, (i + 1) % len(self._blocks))
                nxt = self._blocks[j]
                if nxt.on_device is None:
                    self._fetch(nxt)
                    self._pending = j

        return pre_hook

    def _make_post(self, b: _Block):
        def post_hook(module: nn.Module, args, output) -> None:
            b.active -= 1
            if b.active == 0:
                for s, h in zip(b.slots, b.host, strict=True):
                    _set(s, h)
                if self._pending != self._index[id(module)]:
                    self._drop(b)

        return post_hook


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.pin_memory() if pin and not t.is_pinned() else t


class WholeModule:
    """A whole module's weights kept in (pinned) CPU RAM, with a device copy made and dropped cheaply.

    `to_device()` copies from pinned memory (non_blocking: ordered on the current stream, several
    times faster than from pageable memory); `to_host()` just points the module back at its CPU
    copies, so evicting costs no device-to-host copy. Inference never writes weights, so the CPU
    copy stays valid. The price is that the weights always hold RAM, which is where model
    offload keeps them anyway.
    """

    def __init__(self, module: nn.Module, pin: bool = False) -> None:
        self.module = module
        seen: set[int] = set()
        self.slots: list[_Slot] = []
        for slot in _slots(module, recurse=True):
            if id(_get(slot)) not in seen:  # a tied tensor moves once
                seen.add(id(_get(slot)))
                self.slots.append(slot)
        self.host: list[torch.Tensor] = []
        for slot in self.slots:
            self.host.append(_host_copy(_get(slot), pin))
            _set(slot, self.host[-1])
        self.on_device = False

    def to_device(self, device: torch.device | str) -> None:
        device = torch.device(device)
        try:
            for slot, h in zip(self.slots, self.host, strict=True):
                _set(slot, h.to(device, non_blocking=True, copy=True))  # a real copy even on the CPU
        except BaseException:
            self.to_host()  # an OOM halfway: don't leave half the weights on the device
            raise
        self.on_device = True

    def to_host(self) -> None:
        for slot, h in zip(self.slots, self.host, strict=True):
            _set(slot, h)
        self.on_device = False
