"""Sparse mixture-of-experts feed-forward: router, stacked experts, shared experts, experts in RAM.

One block serves Mixtral (softmax, top-k renormalised), Qwen3-MoE (softmax, top-k renormalised
when `norm_topk_prob`), DeepSeek V2 (softmax, optionally group-limited, scaled) and DeepSeek V3
(sigmoid plus a selection bias, group-limited on the sum of each group's best two, renormalised,
scaled), with DeepSeek's always-on shared experts beside the routed ones.

Experts are stored stacked, (E, 2I, H) for gate+up and (E, H, I) for down, as transformers 5 and
GGUF's `ffn_*_exps` tensors hold them. Packed experts (GGUF blocks, int8, int4) are one packed
module per expert and matrix (GGUF rows are independent, so expert e is a row slice of the 3D
tensor, no copy).

The grouped matmul never loops over tokens: the (token, slot) pairs are sorted by expert and
each *active* expert multiplies its contiguous slice once. Measured on the 2-core CI CPU while
other jobs shared it (fp32, H=1024, I=512, E=64, k=8; `benchmark_strategies` below, torch 2.13,
one thread; absolute times are inflated by the load, the ratios are the point):

    tokens (decode 1, prefill 16/256)    loop over active experts    gather weights + bmm
         1                                       10.5 ms                    59.8 ms
        16                                        156 ms                    1473 ms
       256                                        130 ms                   39790 ms

Gathering copies k experts' weights per token (k x 3 x H x I floats), which costs more than the
per-expert call overhead at every size (6x at decode, 300x at a 256-token prefill), so the
active-expert loop is the one path. A decode step
touches only k experts; a prefill touches each active expert once.

Experts in RAM (llama.cpp's --n-cpu-moe): `offload_experts` moves a layer's routed experts into
a plain holder outside the module's parameters, so .to(device), state_dict and the memory
manager's byte counts never see them; they are computed on the CPU, and only the routed
tokens' hidden states cross the bus (H floats per token and slot, not the weights).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class RouterSpec:
    n_experts: int
    top_k: int
    score: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = True  # renormalise the k chosen weights to sum to 1
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen
    group_score: str = "max"  # "max" (DeepSeek V2) | "top2sum" (DeepSeek V3)
    scaling: float = 1.0  # routed_scaling_factor
    score_bias: bool = False  # DeepSeek V3: e_score_correction_bias steers the choice, not the weights


class Router(nn.Module):
    """x (N, H) -> (weights (N, k) fp32, expert ids (N, k)). Named `gate` in the block: HF's key."""

    def __init__(self, hidden: int, spec: RouterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.n_experts, hidden))
        if spec.score_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.n_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.spec
        logits = F.linear(x.float(), self.weight.float())  # (N, E), fp32 as every reference does
        scores = logits.sigmoid() if s.score == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if s.score_bias else scores
        if s.n_group > 1 and s.topk_group < s.n_group:
            grouped = choice.view(-1, s.n_group, s.n_experts // s.n_group)  # (N, G, E/G)
            if s.group_score == "top2sum":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(s.topk_group, dim=-1).indices, True)
            dropped = ~keep.unsqueeze(-1).expand_as(grouped).reshape(-1, s.n_experts)
            # V2 zeroes the dropped scores, V3 sets them to -inf: the same choice when scores are >= 0
            choice = choice.masked_fill(dropped, 0.0 if s.score == "softmax" and not s.score_bias else float("-inf"))
        idx = choice.topk(s.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, idx)
        if s.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if s.score == "sigmoid" else 0.0))
        if s.scaling != 1.0:
            weights = weights * s.scaling
        return weights, idx


def _act(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up


class Experts(nn.Module):
    """The routed experts of one layer. Float: two stacked parameters; packed: one module per expert."""

    def __init__(self, n_experts: int, hidden: int, inter: int, activation: str = "silu") -> None:
        super().__init__()
        self.n_experts, self.hidden, self.inter = n_experts, hidden, inter
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))  # (E, 2I, H)
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))  # (E, H, I)
        self.packed: nn.ModuleList | None = None  # [gate_up_0, down_0, gate_up_1, ...] when packed
        self.ram: _RamExperts | None = None  # set by offload_experts: the weights live in CPU RAM

    def set_packed(self, modules: list[nn.Module]) -> None:
        """Replace the float stacks by per-expert packed modules [gate_up_0, down_0, gate_up_1, down_1, ...]."""
        del self.gate_up_proj, self.down_proj
        self.gate_up_proj = self.down_proj = None
        self.packed = nn.ModuleList(modules)

    def _matrices(self) -> tuple[Callable[[int, Tensor], Tensor], Callable[[int, Tensor], Tensor]]:
        holder = self.ram if self.ram is not None else self
        if holder.packed is not None:
            mods = holder.packed
            return (lambda e, x: mods[2 * e](x)), (lambda e, x: mods[2 * e + 1](x))
        gu, dn = holder.gate_up_proj, holder.down_proj
        return (lambda e, x: F.linear(x, gu[e].to(x.dtype))), (lambda e, x: F.linear(x, dn[e].to(x.dtype)))

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        """x (N, H), weights/idx (N, k) -> sum_k weights * expert_k(x), (N, H)."""
        if self.ram is not None:
            dev = x.device
            return self._compute(x.to(self.ram.device), weights.to(self.ram.device), idx.to(self.ram.device)).to(dev)
        return self._compute(x, weights, idx)

    def _compute(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        n, k = idx.shape
        flat = idx.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # the one host sync per layer
        token = order // k  # which token each sorted slot belongs to
        xs = x[token]  # (N*k, H), grouped by expert
        out = torch.empty_like(xs)
        gate_up, down = self._matrices()
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            g, u = gate_up(e, xs[start:start + c]).chunk(2, dim=-1)
            out[start:start + c] = down(e, _act(g, u, self.activation))
            start += c
        out = out * weights.reshape(-1)[order].to(out.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token, out)  # (N, H)

    def forward_gathered(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        """The other grouped form (float only): gather each slot's expert weights, one bmm. Kept for the
        measurement in the module docstring and as the reference the loop is tested against."""
        n, k = idx.shape
        flat = idx.reshape(-1)
        xs = x.repeat_interleave(k, dim=0).unsqueeze(1)  # (N*k, 1, H)
        g, u = torch.bmm(xs, self.gate_up_proj[flat].to(x.dtype).transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(_act(g, u, self.activation), self.down_proj[flat].to(x.dtype).transpose(1, 2))  # (N*k, 1, H)
        return (y.view(n, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(1)

    def extra_repr(self) -> str:
        where = ", in RAM" if self.ram is not None else ""
        form = "packed" if (self.ram or self).packed is not None else "stacked"
        return f"{self.n_experts} experts, hidden={self.hidden}, inter={self.inter}, {form}{where}"


class _RamExperts:
    """Routed expert weights held outside any module (so nothing moves or counts them as device bytes)."""

    def __init__(self, experts: Experts, pin: bool) -> None:
        def host(t: Tensor) -> Tensor:
            t = t.detach().to("cpu")
            return t.pin_memory() if pin else t

        self.device = torch.device("cpu")
        if experts.packed is not None:
            self.packed = [m.to("cpu") for m in experts.packed]
            self.gate_up_proj = self.down_proj = None
        else:
            self.packed = None
            self.gate_up_proj, self.down_proj = host(experts.gate_up_proj), host(experts.down_proj)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        if self.packed is not None:
            return [t for m in self.packed for t in (*m.parameters(), *m.buffers())]
        return [self.gate_up_proj, self.down_proj]


def offload_experts(experts: Experts, pin: bool | None = None) -> int:
    """Keep this layer's routed experts in CPU RAM and compute them there. -> bytes moved off the device."""
    if experts.ram is not None:
        return 0
    pin = torch.cuda.is_available() if pin is None else pin
    experts.ram = _RamExperts(experts, pin)
    if experts.packed is not None:
        experts.packed = None
    else:
        del experts.gate_up_proj, experts.down_proj
        experts.gate_up_proj = experts.down_proj = None
    return experts.ram.nbytes


class SparseMoE(nn.Module):
    """Router + routed experts (+ shared experts): the feed-forward of an MoE layer, named `mlp`."""

    def __init__(self, hidden: int, inter: int, spec: RouterSpec, activation: str = "silu",
                 shared: nn.Module | None = None) -> None:
        super().__init__()
        self.gate = Router(hidden, spec)
        self.experts = Experts(spec.n_experts, hidden, inter, activation)
        if shared is not None:
            self.shared_experts = shared
        self.has_shared = shared is not None

    def forward(self, x: Tensor) -> Tensor:  # (B, T, H) -> (B, T, H)
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, idx = self.gate(flat)
        y = self.experts(flat, weights, idx).view(B, T, H)
        if self.has_shared:
            y = y + self.shared_experts(x)
        return y


def moe_fields(cfg: dict, mt: str, n_layers: int) -> dict:
    """LLMConfig's mixture-of-experts fields from a Hugging Face config.json dict ({} for dense models)."""
    if mt == "mixtral":
        n = int(cfg.get("num_local_experts") or 8)
        return dict(n_experts=n, n_experts_per_tok=int(cfg.get("num_experts_per_tok") or 2),
                    moe_intermediate_size=int(cfg["intermediate_size"]), mlp_types=["moe"] * n_layers)
    if mt == "qwen3_moe":
        n = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        types = ["moe" if n and i not in dense and (i + 1) % step == 0 else "dense" for i in range(n_layers)]
        return dict(n_experts=n, n_experts_per_tok=int(cfg.get("num_experts_per_tok") or 8),
                    moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), mlp_types=types)
    if mt in ("deepseek_v2", "deepseek_v3"):
        n = int(cfg.get("n_routed_experts") or 0)
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        types = ["moe" if n and i >= first_dense and i % freq == 0 else "dense" for i in range(n_layers)]
        v3 = mt == "deepseek_v3" or cfg.get("topk_method") == "noaux_tc"
        method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        grouped = method in ("group_limited_greedy", "noaux_tc")
        return dict(n_experts=n, n_experts_per_tok=int(cfg.get("num_experts_per_tok") or 1),
                    moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
                    n_shared_experts=int(cfg.get("n_shared_experts") or 0),
                    router_score="sigmoid" if v3 else "softmax",
                    # DeepSeek V2 never renormalises (transformers ignores its norm_topk_prob too)
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if v3 else False,
                    n_group=int(cfg.get("n_group") or 1) if grouped else 1,
                    topk_group=int(cfg.get("topk_group") or 1) if grouped else 1,
                    group_score="top2sum" if v3 else "max",
                    routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
                    router_bias=v3, mlp_types=types)
    return {}


# ---------------------------------------------------------------------------
# Expert weights in a state dict: every layout -> one canonical form.

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def canonical_experts(state: dict) -> dict:
    """Expert weights of any layout -> `mlp.experts.gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)
    tensors, or, for packed weights, `mlp.experts.packed.{2e}.weight` (gate+up) / `{2e+1}.weight` (down).

    Layouts read: per-expert HF keys (`experts.{e}.gate_proj.weight`; Mixtral's `block_sparse_moe`
    with w1/w3/w2), transformers 5 stacks (already canonical), and GGUF-style 3D `experts.gate_proj`
    / `up_proj` / `down_proj` (float tensors or GGUFWeight). Non-expert keys pass through.
    """
    from studio.models.llm_build import _concat_rows, is_quant

    out: dict = {}
    groups: dict[str, dict[str, dict[int, object]]] = {}  # prefix -> role -> expert -> weight
    for name, w in state.items():
        if ".block_sparse_moe." in name:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            parts = name.split(".")
            if len(parts) == 8 and parts[4] == "experts" and parts[6] in _MIXTRAL_NAMES:
                name = ".".join(parts[:6] + [_MIXTRAL_NAMES[parts[6]], parts[7]])
        m = _EXPERT_KEY.match(name)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = w
            continue
        stem, _, role = name.rpartition(".")
        if stem.endswith(".mlp.experts") and role in ("gate_proj", "up_proj", "down_proj") and len(w.shape) == 3:
            per = w.experts() if is_quant(w) else list(w.unbind(0))
            groups.setdefault(stem + ".", {})[role] = dict(enumerate(per))
            continue
        out[name] = w
    for prefix, roles in groups.items():
        if set(roles) != {"gate_proj", "up_proj", "down_proj"}:
            raise ValueError(f"{prefix} has only {sorted(roles)} of gate_proj, up_proj, down_proj")
        n = len(roles["gate_proj"])
        if any(sorted(r) != list(range(n)) for r in roles.values()):
            raise ValueError(f"{prefix} does not hold the same experts 0..{n - 1} in every projection")
        gates, ups, downs = ([roles[r][e] for e in range(n)] for r in ("gate_proj", "up_proj", "down_proj"))
        if not any(is_quant(w) for w in gates + ups + downs):
            out[prefix + "gate_up_proj"] = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)
            out[prefix + "down_proj"] = torch.stack(downs)
            continue
        for e in range(n):
            fused = _concat_rows([gates[e], ups[e]])
            if fused is None:  # mixed packings with no exact joint form: unpack this expert's pair
                fused = torch.cat([w.dequantize() if is_quant(w) else w for w in (gates[e], ups[e])])
            out[f"{prefix}packed.{2 * e}.weight"] = fused
            out[f"{prefix}packed.{2 * e + 1}.weight"] = downs[e]
    return out


def prepare_packed_experts(model: nn.Module, state: dict) -> None:
    """Give every Experts module whose weights come packed its per-expert Linear slots (on meta), so the
    builder's generic packed-Linear path fills them."""
    for name, mod in model.named_modules():
        if isinstance(mod, Experts) and f"{name}.packed.0.weight" in state:
            with torch.device("meta"):
                slots = []
                for _ in range(mod.n_experts):
                    slots.append(nn.Linear(mod.hidden, 2 * mod.inter, bias=False))
                    slots.append(nn.Linear(mod.inter, mod.hidden, bias=False))
            mod.set_packed(slots)


# ---------------------------------------------------------------------------
# Experts in RAM: how many layers' experts the device can keep.

def plan_experts_in_ram(expert_bytes: list[int], other_bytes: int, room: int) -> list[bool]:
    """Which MoE layers keep their routed experts in RAM so the rest fits `room` device bytes.

    `expert_bytes[i]` is layer i's routed expert bytes (0 for dense layers), `other_bytes`
    everything that always stays on the device (attention, router, shared experts, norms,
    embeddings, head). Like --n-cpu-moe, the first layers go to RAM and the later ones stay,
    fewest layers moved first. Returns one flag per layer (True: in RAM); all False when everything
    fits, all True on MoE layers when not even the non-expert part leaves room for any.
    """
    n = len(expert_bytes)
    flags = [False] * n
    over = other_bytes + sum(expert_bytes) - room
    for i in range(n):
        if over <= 0:
            break
        if expert_bytes[i]:
            flags[i] = True
            over -= expert_bytes[i]
    return flags


_LAYER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.")


def expert_layer(name: str) -> int | None:
    """The layer index of a routed-expert weight key (any layout), else None."""
    m = _LAYER_EXPERT.match(name)
    return int(m.group(1)) if m else None


@dataclass
class ExpertPlacement:
    """Where the routed experts go: per layer in RAM or not, and the bytes each side holds."""

    in_ram: list[bool]
    device_bytes: int  # weights on the device (everything but the routed experts moved to RAM)
    ram_bytes: int  # routed experts held in RAM

    @property
    def layers_in_ram(self) -> int:
        return sum(self.in_ram)

    def describe(self) -> str:
        n, moe = self.layers_in_ram, len(self.in_ram)
        if not n:
            return ""
        return (f"Experts in RAM: the routed experts of {n} of {moe} layers ({_gib(self.ram_bytes)}) stay in RAM and "
                f"run on the CPU; attention, routers and shared experts ({_gib(self.device_bytes)}) are on the GPU.")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def plan_placement(n_layers: int, state: dict, elem: int, room: int) -> ExpertPlacement:
    """Split a loaded state dict's weights against `room` device bytes (the budget less the cache and
    activations the chat needs): routed experts of the first layers move to RAM until the rest fits."""
    from studio.models.llm_build import is_quant

    experts = [0] * n_layers
    other = 0
    for name, w in state.items():
        size = w.nbytes if is_quant(w) else w.numel() * (elem if w.is_floating_point() else w.element_size())
        layer = expert_layer(name)
        if layer is not None and layer < n_layers:
            experts[layer] += size
        else:
            other += size
    flags = plan_experts_in_ram(experts, other, room)
    moved = sum(b for b, f in zip(experts, flags, strict=True) if f)
    return ExpertPlacement(flags, other + sum(experts) - moved, moved)


def benchmark_strategies(tokens: int, hidden: int = 1024, inter: int = 512, n_experts: int = 64, k: int = 8,
                         repeat: int = 5) -> dict[str, float]:
    """Milliseconds per call of the active-expert loop and of gather+bmm (the table in the docstring)."""
    torch.manual_seed(0)
    ex = Experts(n_experts, hidden, inter)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.02)
        ex.down_proj.normal_(0, 0.02)
    x = torch.randn(tokens, hidden)
    idx = torch.rand(tokens, n_experts).topk(k, dim=-1).indices
    w = torch.rand(tokens, k)
    out = {}
    for name, fn in (("loop", ex.forward), ("gather", ex.forward_gathered)):
        with torch.inference_mode():
            fn(x, w, idx)
            t = time.perf_counter()
            for _ in range(repeat):
                fn(x, w, idx)
        out[name] = (time.perf_counter() - t) / repeat * 1e3
    return out
