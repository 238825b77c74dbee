"""Experts in RAM (llama.cpp's --n-cpu-moe): under a simulated VRAM budget the routed experts of the first
MoE layers stay in CPU RAM and run there; attention, routers and shared experts stay on the device. Same
tokens as the all-resident model, and the device side of the accounting stays under the budget."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_moe_parity import (  # noqa: E402
    NEW_TOKENS,
    PROMPT_LEN,
    VOCAB,
    make_reference,
    save_folder,
    write_moe_gguf,
)

from studio.engine.device import DeviceProfile  # noqa: E402
from studio.engine.memory import MemoryManager  # noqa: E402
from studio.engine.pipelines.chat import ACTIVATION_BASE, _position_bytes, expert_placement  # noqa: E402
from studio.engine.pipelines.decoding import generate_tokens  # noqa: E402
from studio.engine.sampling import greedy  # noqa: E402
from studio.models.gguf_llm import load_gguf_llm  # noqa: E402
from studio.models.hf_loader import load_hf_folder  # noqa: E402
from studio.models.llm_build import build_llm, weight_bytes  # noqa: E402
from studio.models.moe import Experts, plan_experts_in_ram, plan_placement  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tokens(model) -> list[int]:
    model.setup_caches(1, PROMPT_LEN + NEW_TOKENS)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    return list(generate_tokens(model, prompt, NEW_TOKENS, greedy))


def test_plan_moves_the_fewest_first_layers_and_skips_dense_ones():
    assert plan_experts_in_ram([100, 0, 100, 100], 50, 400) == [False] * 4  # everything fits
    assert plan_experts_in_ram([100, 0, 100, 100], 50, 300) == [True, False, False, False]
    assert plan_experts_in_ram([100, 0, 100, 100], 50, 151) == [True, False, True, False]
    assert plan_experts_in_ram([100, 0, 100, 100], 50, 10) == [True, False, True, True]  # all it can


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_experts_in_ram_give_the_same_tokens_and_stay_under_the_budget(tmp_path, family):
    ref = make_reference(family)
    loaded = load_hf_folder(save_folder(tmp_path, family, ref))
    resident = build_llm(loaded.config, loaded.state_dict, fuse=True)
    total = weight_bytes(resident)
    experts = [m for m in resident.modules() if isinstance(m, Experts)]
    one_layer = sum(p.numel() * 4 for p in experts[0].parameters())
    budget = total - one_layer  # one MoE layer's experts too many
    placement = plan_placement(len(resident.model.layers), loaded.state_dict, 4, budget)
    first = resident.config.mlp_types.index("moe")
    expected = [i == first for i in range(3)]  # Qwen3: moe, dense, moe; DeepSeek: dense, moe, moe
    assert placement.in_ram == expected  # only the first MoE layer moves
    assert placement.device_bytes <= budget and placement.device_bytes + placement.ram_bytes == total

    split = build_llm(loaded.config, loaded.state_dict, fuse=True, experts_in_ram=placement.in_ram)
    moved = split.model.layers[first].mlp
    assert moved.experts.ram is not None and moved.experts.gate_up_proj is None
    assert split.model.layers[2].mlp.experts.ram is None
    if family == "deepseek_v3":  # shared experts and the router stay with attention on the device
        names = {n for n, _ in split.named_parameters()}
        assert f"model.layers.{first}.mlp.shared_experts.gate_up_proj.weight" in names
        assert f"model.layers.{first}.mlp.gate.weight" in names
    # the device side is what the manager counts: it never sees the experts held in RAM
    assert weight_bytes(split) == placement.device_bytes
    manager = MemoryManager(DeviceProfile(kind="cpu", name="test", torch_device="cpu"), budget_bytes=budget)
    manager.adopt("moe|llm", split)
    assert manager.used == placement.device_bytes <= budget
    with manager.use("moe|llm"):
        assert _tokens(split) == _tokens(resident)
    assert moved.experts.ram.nbytes == placement.ram_bytes


def test_packed_gguf_experts_in_ram_give_the_same_tokens(tmp_path):
    ref = make_reference("mixtral")
    path = tmp_path / "mixtral-q8.gguf"
    write_moe_gguf(path, "mixtral", ref, "Q8_0")
    loaded = load_gguf_llm(path)
    resident = build_llm(loaded.config, loaded.state_dict, fuse=True)
    split = build_llm(loaded.config, loaded.state_dict, fuse=True, experts_in_ram=[True, False])
    held = split.model.layers[0].mlp.experts.ram
    assert held is not None and held.packed is not None and split.model.layers[0].mlp.experts.packed is None
    assert weight_bytes(split) == weight_bytes(resident) - held.nbytes
    assert _tokens(split) == _tokens(resident)


def test_chat_plans_experts_in_ram_only_for_moe_models_over_the_budget(tmp_path):
    ref = make_reference("qwen3_moe")
    loaded = load_hf_folder(save_folder(tmp_path, "qwen3_moe", ref))
    from studio.models.llm import LLMConfig

    c = LLMConfig.from_hf(loaded.config)
    weights = sum(t.numel() * 4 for t in loaded.state_dict.values())
    cache = ACTIVATION_BASE + 4096 * sum(_position_bytes(c, torch.float32))
    assert expert_placement(loaded.config, loaded.state_dict, torch.float32, None) is None  # no cap
    assert expert_placement(loaded.config, loaded.state_dict, torch.float32, weights + cache) is None
    plan = expert_placement(loaded.config, loaded.state_dict, torch.float32, weights + cache - 1)
    assert plan is not None and plan.in_ram == [True, False, False]
    assert "Experts in RAM" in plan.describe() and "1 of 3 layers" in plan.describe()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_experts_in_ram_on_cuda_match_the_all_gpu_model(tmp_path):
    ref = make_reference("deepseek_v2")
    loaded = load_hf_folder(save_folder(tmp_path, "deepseek_v2", ref))
    gpu = build_llm(loaded.config, loaded.state_dict, device="cuda", fuse=True)
    split = build_llm(loaded.config, loaded.state_dict, device="cuda", fuse=True, experts_in_ram=[False, True, True])
    assert split.model.layers[1].mlp.experts.ram.gate_up_proj.device.type == "cpu"
    before = torch.cuda.memory_allocated()
    assert _tokens(split) == _tokens(gpu)
    assert torch.cuda.memory_allocated() >= before  # ran; the experts never came to the device
    assert all(p.device.type == "cuda" for p in split.parameters())
