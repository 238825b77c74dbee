"""Block streaming and sequential offload give bitwise the resident output; fp8 storage stays close."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from studio.engine.offload import (
    BlockStreamer,
    WholeModule,
    find_blocks,
    leaf_blocks,
)
from studio.nn.packed_fp8 import Fp8Linear, fp8_supported


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x)))) * self.gain


class Tiny(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 4, reverse: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 8)
        self.reverse = reverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 8)
        h = self.inp(x)
        for b in (reversed(self.blocks) if self.reverse else self.blocks):
            h = b(h)
        return self.out(h)


def make(seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kw).eval()


def sample() -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def watch(streamer: BlockStreamer, blocks: list[nn.Module]) -> tuple[list[tuple[int, bool, int]], list]:
    """Record, inside each block's forward, (block, weight not at its CPU home, blocks held on device)."""
    homes = {id(b): b.up.weight.data_ptr() for b in blocks}
    seen: list[tuple[int, bool, int]] = []
    # Registered after attach(), so they run after the streamer's own pre-hooks.
    handles = [b.register_forward_pre_hook(
        lambda m, a, i=i: seen.append((i, m.up.weight.data_ptr() != homes[id(m)], streamer.blocks_on_device())))
        for i, b in enumerate(blocks)]
    return seen, handles


def test_find_blocks_takes_outermost_module_list_entries():
    model = make()
    assert find_blocks(model) == list(model.blocks)
    leaves = leaf_blocks(model)
    assert model.inp in leaves and model.blocks[0].norm in leaves
    assert model.blocks[0] in leaves  # owns the `gain` buffer directly


@torch.no_grad()
def test_block_streaming_matches_resident_bitwise_and_holds_at_most_two_blocks():
    model = make()
    x = sample()
    expected = model(x)
    streamer = BlockStreamer(model, list(model.blocks), "cpu", copy_on_cpu=True).attach()
    seen, handles = watch(streamer, list(model.blocks))
    first = model(x)
    second = model(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert [i for i, _, _ in seen] == [0, 1, 2, 3] * 2
    assert all(moved for _, moved, _ in seen), "each block ran on a device copy, not its CPU home"
    assert max(n for _, _, n in seen) <= 2 and streamer.peak_blocks <= 2
    # After the first pass the wrap-around prefetch of block 0 is ready, and each next block is too.
    assert streamer.prefetch_hits >= 7
    for h in handles:
        h.remove()
    streamer.detach()
    assert not model.blocks[0]._forward_pre_hooks and not model.blocks[0]._forward_hooks
    assert torch.equal(model(x), expected)


@torch.no_grad()
def test_prefetch_learns_an_execution_order_that_differs_from_the_list():
    model = make(reverse=True)
    x = sample()
    expected = model(x)
    streamer = BlockStreamer(model, list(model.blocks), "cpu", copy_on_cpu=True).attach()
    model(x)  # learns 3 -> 2 -> 1 -> 0
    model(x)  # learns the wrap-around 0 -> 3
    hits, loads = streamer.prefetch_hits, streamer.loads
    assert torch.equal(model(x), expected)
    # Third pass: every block (3, 2, 1, 0) was the learned prediction, and no guess was wasted.
    assert streamer.prefetch_hits - hits == 4
    assert streamer.loads - loads == 4
    streamer.detach()


@torch.no_grad()
def test_sequential_offload_matches_resident_bitwise_with_one_layer_at_a_time():
    model = make()
    x = sample()
    expected = model(x)
    with BlockStreamer.sequential(model, "cpu", copy_on_cpu=True) as streamer:
        got = model(x)
        # A Block owns `gain` and is active while its children run: parent + child + prefetch.
        assert streamer.peak_blocks <= 3
        assert streamer.largest_block < sum(p.numel() * 4 for p in model.blocks[0].parameters())
    assert torch.equal(got, expected)


@torch.no_grad()
def test_streaming_without_copies_on_cpu_is_a_no_op_move():
    model = make()
    x = sample()
    expected = model(x)
    ptr = model.blocks[2].up.weight.data_ptr()
    with BlockStreamer(model, list(model.blocks), "cpu"):
        assert torch.equal(model(x), expected)
        assert model.blocks[2].up.weight.data_ptr() == ptr


@torch.no_grad()
def test_tied_weights_shared_by_two_blocks_stay_resident():
    model = make()
    model.blocks[3].up.weight = model.blocks[0].up.weight  # tie across blocks
    x = sample()
    expected = model(x)
    streamer = BlockStreamer(model, list(model.blocks), "cpu", copy_on_cpu=True)
    tied = model.blocks[0].up.weight
    assert any(s[0] is model.blocks[0].up and s[1] == "weight" for s in streamer._resident)
    with streamer:
        assert torch.equal(model(x), expected)
        assert model.blocks[3].up.weight is tied


def test_nested_blocks_are_rejected():
    model = make()
    with pytest.raises(ValueError, match="nested"):
        BlockStreamer(model, [model.blocks[0], model.blocks[0].up], "cpu")


@torch.no_grad()
def test_a_failing_block_is_released_from_the_device():
    model = make()
    streamer = BlockStreamer(model, list(model.blocks), "cpu", copy_on_cpu=True, prefetch=False).attach()
    block = streamer._blocks[1]
    home = next(h for (m, n, _), h in zip(block.slots, block.host, strict=True) if m is model.blocks[1].norm and n == "weight")

    def boom(m, a):
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(sample())
    handle.remove()
    # The failed block's post-hook still ran (always_call): its weights are back at their CPU home.
    assert model.blocks[1].norm.weight.data_ptr() == home.data_ptr()
    assert streamer.blocks_on_device() == 0
    streamer.detach()


@torch.no_grad()
def test_whole_module_swaps_to_a_device_copy_and_back_to_the_same_host_storage():
    model = make()
    model.blocks[3].up.weight = model.blocks[0].up.weight  # a tied weight moves once
    x = sample()
    expected = model(x)
    whole = WholeModule(model)
    homes = [p.data_ptr() for p in model.parameters()]
    # The CPU stands in for the device: to_device always makes a copy, so every tensor must leave
    # its host storage and come back.
    whole.to_device("cpu")
    assert whole.on_device and not set(homes) & {p.data_ptr() for p in model.parameters()}
    assert torch.equal(model(x), expected)
    assert model.blocks[3].up.weight is model.blocks[0].up.weight
    assert len(whole.slots) == len({id(p) for p in model.parameters()}) + len(list(model.buffers()))
    whole.to_host()
    assert [p.data_ptr() for p in model.parameters()] == homes  # no copy back: the same storage
    assert torch.equal(model(x), expected)


@pytest.mark.skipif(not fp8_supported(), reason="this torch cannot cast to float8_e4m3fn")
@torch.no_grad()
def test_fp8_linear_stays_within_e4m3_rounding_and_quarters_fp32_bytes():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = Fp8Linear.from_linear(lin)
    w = lin.weight.float()
    err = (q.dequantize() - w).abs()
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal numbers; values in
    # the subnormal range (below 2^-6 * scale) are rounded to a grid of 2^-9 * scale.
    bound = torch.maximum(w.abs() * 2**-4, q.scale[:, None] * 2**-9) + 1e-7
    assert bool((err <= bound).all())
    x = torch.randn(4, 64)
    ref = lin(x)
    assert (q(x) - ref).abs().max() / ref.abs().max() < 0.03
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.nbytes * 4 == w.nbytes


# ---------------------------------------------------------------------------
# The real CUDA path: pinned memory, side stream, events.


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_block_streaming_matches_resident_bitwise_and_uses_less_vram():
    dev = torch.device("cuda")
    model = make(dim=1024, depth=8)
    x = sample().to(dev)
    model.to(dev)
    expected = model(x)
    model.to("cpu")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    streamer = BlockStreamer(model, list(model.blocks), dev).attach()
    assert streamer._blocks[0].host[0].is_pinned()
    for _ in range(3):
        got = model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.equal(got, expected)
    assert streamer.prefetch_hits >= 8 * 3 - 1
    block = streamer.largest_block
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert peak < streamer.resident_bytes + 3 * block + (8 << 20) < weights
    streamer.detach()
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_sequential_offload_matches_resident_bitwise():
    dev = torch.device("cuda")
    model = make(dim=512, depth=4)
    x = sample().to(dev)
    expected = model.to(dev)(x)
    model.to("cpu")
    with BlockStreamer.sequential(model, dev):
        got = model(x)
        got2 = model(x)
    assert torch.equal(got, expected) and torch.equal(got2, expected)


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_model_offload_reloads_from_pinned_memory_and_evicts_without_copying():
    from studio.engine.device import probe
    from studio.engine.memory import MemoryManager, Policy

    profile = probe("cuda")
    model = make(dim=1024, depth=4)
    x = sample()
    expected = model(x)
    mm = MemoryManager(profile, budget_bytes=1 << 30)
    mm.register("m", model, Policy.MODEL_OFFLOAD)
    with mm.use("m") as m:
        assert m.inp.weight.is_cuda
        got = m(x.cuda()).cpu()
    mm.offload("m")
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.parameters())
    homes = [p.data_ptr() for p in model.parameters()]
    with mm.use("m") as m:
        assert m.inp.weight.is_cuda
        again = m(x.cuda()).cpu()
    mm.offload("m")
    assert [p.data_ptr() for p in model.parameters()] == homes  # eviction pointed back, no new copy
    assert torch.allclose(got, expected, atol=1e-4) and torch.equal(again, got)
