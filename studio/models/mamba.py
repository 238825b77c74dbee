"""Mamba and Mamba-2: selective state-space language models with a fixed-size state, no KV cache.

Each layer keeps `(conv_state, ssm_state)`: the last `conv_kernel - 1` inputs of its causal
depthwise convolution and the SSM's hidden state. Decoding a token costs the same at position 10
and at position 100000, and the state never grows (`RecurrentState.nbytes`).

Two scans, held equal by tests: `step` is the slow obvious recurrence for one token (decode), and
prefill runs a parallel form: Mamba-1 a log-depth associative scan over chunks of the prompt
(only products of decays <= 1 are formed, so no overflow); Mamba-2 the chunked SSD algorithm
(intra-chunk "attention" with a segment-sum decay mask plus a recurrence over chunk states).

Module names follow Hugging Face keys (backbone.layers.N.mixer.in_proj, ...), so an HF state dict
loads as it is; mamba_load.py reads folders and llama.cpp GGUF files into that layout.

The model speaks LLM's interface (setup_caches / forward(tokens, input_pos, kv_len, last_only)),
so the chat pipeline's decoding runs it unchanged: positions starting at 0 begin a new sequence
(the state is zeroed), any other position continues the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.errors import UserError
from studio.models.llm import RMSNorm

MODEL_TYPES = ("mamba", "mamba2")
NO_POSITION_LIMIT = 1 << 20  # what llama.cpp writes as the context of a recurrent model
PREFILL_SEGMENT = 1024  # Mamba-2 prefill runs the chunked scan over segments of about this many tokens


@dataclass
class MambaConfig:
    model_type: str = "mamba"  # "mamba" (selective scan, S6) | "mamba2" (SSD)
    vocab_size: int = 50280
    hidden_size: int = 768
    n_layers: int = 24
    state_size: int = 16
    conv_kernel: int = 4
    expand: int = 2
    intermediate_size: int = 0  # 0: expand * hidden_size
    time_step_rank: int = 0  # Mamba-1: 0 means ceil(hidden / 16)
    n_heads: int = 0  # Mamba-2: SSM heads (intermediate = n_heads * head_dim)
    head_dim: int = 64
    n_groups: int = 1  # Mamba-2: B/C groups, also the groups of the gated norm
    chunk_size: int = 256
    time_step_limit: tuple = (0.0, math.inf)
    norm_eps: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    dt_bc_norm: bool = False  # Jamba: RMSNorm (with weights) on dt, B and C after x_proj
    tie_word_embeddings: bool = True
    max_position_embeddings: int = NO_POSITION_LIMIT  # no limit of its own: the chat's context setting rules

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise UserError("unsupported", f"{self.model_type!r} is not a Mamba model type ({', '.join(MODEL_TYPES)}).")
        if not self.intermediate_size:
            self.intermediate_size = self.expand * self.hidden_size
        if not self.time_step_rank:
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if self.model_type == "mamba2":
            if not self.n_heads:
                self.n_heads = self.intermediate_size // self.head_dim
            if self.n_heads * self.head_dim != self.intermediate_size or self.n_heads % self.n_groups:
                raise UserError("bad_model", f"Mamba-2 sizes disagree: {self.n_heads} heads x {self.head_dim} != "
                                f"{self.intermediate_size} inner, or heads not a multiple of {self.n_groups} groups. "
                                "The config.json or GGUF header is damaged; download it again.")
        # transformers 5 writes infinity as {"__float__": "Infinity"} (JSON has no infinity)
        self.time_step_limit = tuple(float(v["__float__"] if isinstance(v, dict) else v) for v in self.time_step_limit)

    @property
    def conv_dim(self) -> int:
        """Channels the convolution sees: x (Mamba-1); x, B and C (Mamba-2)."""
        if self.model_type == "mamba":
            return self.intermediate_size
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per layer and sequence: (conv_state, ssm_state) shapes."""
        conv = (self.conv_dim, self.conv_kernel - 1)
        if self.model_type == "mamba":
            return conv, (self.intermediate_size, self.state_size)
        return conv, (self.n_heads, self.head_dim, self.state_size)

    def state_bytes(self, conv_elem: int = 4) -> int:
        """Bytes of the whole recurrent state of one sequence (all layers), the KV cache's counterpart:
        conv inputs in the compute dtype (`conv_elem` bytes each), the SSM state always fp32."""
        conv, ssm = self.state_shapes()
        return self.n_layers * (math.prod(conv) * conv_elem + math.prod(ssm) * 4)

    @classmethod
    def from_name(cls, name: str) -> MambaConfig:
        if name not in CONFIGS:
            raise KeyError(f"unknown Mamba config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_hf(cls, cfg: dict) -> MambaConfig:
        """From a Hugging Face config.json dict (MambaConfig / Mamba2Config field names)."""
        mt = cfg.get("model_type", "")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if cfg.get(k) is None]
        if missing:
            raise UserError("bad_model", f"config.json lacks {', '.join(missing)}; download it again.")
        hidden = int(cfg["hidden_size"])
        expand = int(cfg.get("expand", 2))
        rank = cfg.get("time_step_rank", "auto")
        limit = cfg.get("time_step_limit") or (0.0, math.inf)
        return cls(
            model_type=mt, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            n_layers=int(cfg["num_hidden_layers"]), state_size=int(cfg.get("state_size", 16 if mt == "mamba" else 128)),
            conv_kernel=int(cfg.get("conv_kernel", 4)), expand=expand,
            intermediate_size=int(cfg.get("intermediate_size") or expand * hidden),
            time_step_rank=0 if rank == "auto" else int(rank),
            n_heads=int(cfg.get("num_heads", 0)) if mt == "mamba2" else 0,
            head_dim=int(cfg.get("head_dim", 64)), n_groups=int(cfg.get("n_groups", 1)),
            chunk_size=int(cfg.get("chunk_size", 256)), time_step_limit=tuple(limit),
            norm_eps=float(cfg.get("layer_norm_epsilon", cfg.get("rms_norm_eps", 1e-5))),
            use_bias=bool(cfg.get("use_bias", False)), use_conv_bias=bool(cfg.get("use_conv_bias", True)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", mt == "mamba")),
        )

    def kv_bytes_per_position(self, elem: int) -> int:
        """Cache bytes one more token of context costs: none, the state is fixed (state_bytes)."""
        return 0

    def build(self, state_dict: dict, dtype: torch.dtype, device: torch.device | str) -> MambaLM:
        """The model with these weights (llm_build.build_llm hands families with their own file here)."""
        from studio.models.mamba_load import build_mamba  # it imports llm_build, which imports this file

        return build_mamba(self, state_dict, dtype, device)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Named configs for benchmarks and tests (real models load from their config.json / GGUF header).
CONFIGS: dict[str, dict[str, Any]] = {
    "mamba-130m": dict(model_type="mamba", vocab_size=50280, hidden_size=768, n_layers=24),
    "mamba-2.8b": dict(model_type="mamba", vocab_size=50280, hidden_size=2560, n_layers=64),
    "mamba2-2.7b": dict(model_type="mamba2", vocab_size=50288, hidden_size=2560, n_layers=64, state_size=128,
                        head_dim=64, n_groups=1),
    "mamba-codestral-7b": dict(model_type="mamba2", vocab_size=32768, hidden_size=4096, n_layers=64,
                               state_size=128, head_dim=64, n_groups=8, tie_word_embeddings=False),
    "tiny-mamba": dict(model_type="mamba", vocab_size=256, hidden_size=64, n_layers=2),
    "tiny-mamba2": dict(model_type="mamba2", vocab_size=256, hidden_size=64, n_layers=2, state_size=16,
                        head_dim=16, n_groups=2, chunk_size=8),
}


# ---------------------------------------------------------------------------
# The state: fixed-size buffers, one pair per layer

class LayerState(nn.Module):
    """One layer's `(conv_state, ssm_state)` for `batch` sequences, updated in place."""

    def __init__(self, batch: int, conv_shape: tuple, ssm_shape: tuple, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        # "cache" in the names: weight_bytes() counts weights, not this
        self.register_buffer("conv_cache", torch.zeros((batch, *conv_shape), dtype=dtype, device=device),
                             persistent=False)
        # the SSM state accumulates over the whole conversation: fp32 whatever the weights are
        self.register_buffer("ssm_cache", torch.zeros((batch, *ssm_shape), dtype=torch.float32, device=device),
                             persistent=False)

    def reset(self) -> None:
        self.conv_cache.zero_()
        self.ssm_cache.zero_()


class RecurrentState:
    """Every layer's state of one model: what replaces the KV cache. Fixed size, whatever the length."""

    def __init__(self, layers: list[LayerState]) -> None:
        self.layers = layers

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for s in self.layers for b in (s.conv_cache, s.ssm_cache))

    def snapshot(self) -> list[tuple[Tensor, Tensor]]:
        """A copy, to come back to (a conversation's position): restore() puts it back."""
        return [(s.conv_cache.clone(), s.ssm_cache.clone()) for s in self.layers]

    def restore(self, saved: list[tuple[Tensor, Tensor]]) -> None:
        for s, (conv, ssm) in zip(self.layers, saved, strict=True):
            s.conv_cache.copy_(conv)
            s.ssm_cache.copy_(ssm)


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> Tensor:
    """Depthwise causal conv1d continuing from `state`; x (B, C, T), weight (C, 1, K), state (B, C, K-1)
    (updated in place with the last K-1 inputs) -> silu(conv) (B, C, T)."""
    T = x.shape[-1]
    full = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, C, K-1+T)
    state.copy_(full[..., -state.shape[-1]:])
    return F.silu(F.conv1d(full, weight, bias, groups=x.shape[1])[..., -T:])


# ---------------------------------------------------------------------------
# Mamba-1: selective scan (S6)

def selective_step(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """One token, the obvious recurrence. h (Bt, E, N) fp32 updated in place; x, dt (Bt, E);
    A (E, N); B, C (Bt, N) -> y (Bt, E) without the D skip."""
    h.mul_(torch.exp(dt[..., None] * A)).add_(dt[..., None] * B[:, None, :] * x[..., None])
    return (h @ C[..., None])[..., 0]


def selective_scan(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int = 64) -> Tensor:
    """The same over a sequence, in parallel: per chunk, a Hillis-Steele scan of (decay, input) pairs
    (log2(chunk) elementwise steps) starting from `h`, which ends as the last state.
    x, dt (Bt, T, E); B, C (Bt, T, N) -> y (Bt, T, E)."""
    ys = []
    for s in range(0, x.shape[1], chunk):
        xs, dts, Bs, Cs = x[:, s:s + chunk], dt[:, s:s + chunk], B[:, s:s + chunk], C[:, s:s + chunk]
        a = torch.exp(dts[..., None] * A)  # (Bt, L, E, N), each <= 1
        b = dts[..., None] * Bs[:, :, None, :] * xs[..., None]
        b[:, 0] += a[:, 0] * h
        step = 1
        while step < a.shape[1]:  # after this, b[t] = state after token t
            b = torch.cat([b[:, :step], b[:, step:] + a[:, step:] * b[:, :-step]], dim=1)
            a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
            step *= 2
        h.copy_(b[:, -1])
        ys.append((b @ Cs[..., None])[..., 0])  # (Bt, L, E)
    return torch.cat(ys, dim=1)


class MambaMixer(nn.Module):
    def __init__(self, c: MambaConfig) -> None:
        super().__init__()
        E, N, R = c.intermediate_size, c.state_size, c.time_step_rank
        self.in_proj = nn.Linear(c.hidden_size, 2 * E, bias=c.use_bias)
        self.conv1d = nn.Conv1d(E, E, c.conv_kernel, groups=E, bias=c.use_conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, c.hidden_size, bias=c.use_bias)
        if c.dt_bc_norm:
            self.dt_layernorm = RMSNorm(R, c.norm_eps)
            self.b_layernorm = RMSNorm(N, c.norm_eps)
            self.c_layernorm = RMSNorm(N, c.norm_eps)
        self.E, self.N, self.R = E, N, R
        self.dt_bc_norm = c.dt_bc_norm

    def forward(self, u: Tensor, state: LayerState) -> Tensor:
        """u (B, T, C) -> (B, T, C), advancing `state` by T tokens."""
        B_, T, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, E) each
        x = causal_conv(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, state.conv_cache).transpose(1, 2)
        dt, Bm, Cm = self.x_proj(x).split([self.R, self.N, self.N], dim=-1)
        if self.dt_bc_norm:
            dt, Bm, Cm = self.dt_layernorm(dt), self.b_layernorm(Bm), self.c_layernorm(Cm)
        dt = F.softplus(self.dt_proj(dt).float())  # (B, T, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        xf, Bm, Cm = x.float(), Bm.float(), Cm.float()
        if T == 1:
            y = selective_step(state.ssm_cache, xf[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])[:, None]
        else:
            y = selective_scan(state.ssm_cache, xf, dt, A, Bm, Cm)
        y = (y + xf * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(u.dtype))


# ---------------------------------------------------------------------------
# Mamba-2: state space duality (SSD), multi-head state, grouped gated norm

def ssd_step(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """One token. h (Bt, H, P, N) fp32 in place; x (Bt, H, P); dt (Bt, H); A (H,); B, C (Bt, H, N)
    (already repeated per head) -> y (Bt, H, P) without the D skip."""
    h.mul_(torch.exp(dt * A)[..., None, None]).add_((dt[..., None] * x)[..., None] * B[:, :, None, :])
    return (h @ C[..., None])[..., 0]


def _segsum(a: Tensor) -> Tensor:
    """a (..., L) -> (..., L, L): sum of a[j+1..i] at [i, j] for j <= i, -inf above the diagonal.
    Built from masked cumulative sums, not differences of one cumsum, so it stays exact."""
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)  # [.., i, j] = a[i]
    lower = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), -1)
    out = torch.cumsum(a.masked_fill(~lower, 0), dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device)), -math.inf)


def ssd_scan(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
    """The same over a sequence, chunked (Mamba-2's SSD): within a chunk the output is a masked
    (C B^T * decay) product, across chunks a recurrence on the chunk-end states, starting at `h`
    (left holding the last state). x (Bt, T, H, P); dt (Bt, T, H); B, C (Bt, T, H, N) -> (Bt, T, H, P)."""
    Bt, T, H, P = x.shape
    pad = (-T) % chunk
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (x, dt, B, C))
    n = x.shape[1] // chunk
    x, dt, B, C = (t.reshape(Bt, n, chunk, *t.shape[2:]) for t in (x, dt, B, C))  # (Bt, c, l, ...)
    a = (dt * A).permute(0, 3, 1, 2)  # (Bt, H, c, l) log-decays
    a_cum = torch.cumsum(a, dim=-1)
    xdt = x * dt[..., None]
    decay = torch.exp(_segsum(a))  # (Bt, H, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (Bt, H, c, l): decay from each token to its chunk's end
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)  # each chunk's own contribution
    states = torch.cat([h[:, None], states], dim=1)  # (Bt, c+1, H, P, N)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (Bt, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # state at each chunk start, and the end
    h.copy_(states[:, -1])
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states[:, :-1], torch.exp(a_cum))
    return (y_diag + y_off).reshape(Bt, n * chunk, H, P)[:, :T]


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(gate) over `groups` equal slices of the features (Mamba-2's norm)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps = groups, eps

    def forward(self, y: Tensor, gate: Tensor) -> Tensor:
        h = y.float() * F.silu(gate.float())
        g = h.view(*h.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(y.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, c: MambaConfig) -> None:
        super().__init__()
        E, H = c.intermediate_size, c.n_heads
        self.in_proj = nn.Linear(c.hidden_size, E + c.conv_dim + H, bias=c.use_bias)  # z | x B C | dt
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.conv_kernel, groups=c.conv_dim, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(E, c.n_groups, c.norm_eps)
        self.out_proj = nn.Linear(E, c.hidden_size, bias=c.use_bias)
        self.E, self.H, self.P, self.N, self.G = E, H, c.head_dim, c.state_size, c.n_groups
        self.conv_dim, self.chunk = c.conv_dim, c.chunk_size
        self.dt_min, self.dt_max = c.time_step_limit

    def forward(self, u: Tensor, state: LayerState) -> Tensor:
        Bt, T, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([self.E, self.conv_dim, self.H], dim=-1)
        xbc = causal_conv(xbc.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, state.conv_cache).transpose(1, 2)
        x, Bm, Cm = xbc.float().split([self.E, self.G * self.N, self.G * self.N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(self.dt_min, self.dt_max)  # (Bt, T, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        rep = self.H // self.G  # heads share their group's B and C
        Bm = Bm.view(Bt, T, self.G, 1, self.N).expand(-1, -1, -1, rep, -1).reshape(Bt, T, self.H, self.N)
        Cm = Cm.view(Bt, T, self.G, 1, self.N).expand(-1, -1, -1, rep, -1).reshape(Bt, T, self.H, self.N)
        x = x.view(Bt, T, self.H, self.P)
        if T == 1:
            y = ssd_step(state.ssm_cache, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])[:, None]
        else:  # segments bound the (heads, tokens, chunk) decay tensors of a long prompt (~400 MB for 7B sizes)
            seg = max(self.chunk, PREFILL_SEGMENT // self.chunk * self.chunk)
            y = torch.cat([ssd_scan(state.ssm_cache, x[:, s:s + seg], dt[:, s:s + seg], A, Bm[:, s:s + seg],
                                    Cm[:, s:s + seg], self.chunk) for s in range(0, T, seg)], dim=1)
        y = y + x * self.D.float()[:, None]
        y = self.norm(y.reshape(Bt, T, self.E), z)
        return self.out_proj(y.to(u.dtype))


# ---------------------------------------------------------------------------
# The model

class MambaBlock(nn.Module):
    def __init__(self, c: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mixer = MambaMixer(c) if c.model_type == "mamba" else Mamba2Mixer(c)

    def forward(self, x: Tensor, state: LayerState) -> Tensor:
        return x + self.mixer(self.norm(x), state)


class MambaBackbone(nn.Module):
    """Named `backbone` inside MambaLM so parameter names match Hugging Face keys."""

    def __init__(self, c: MambaConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden_size, _weight=torch.empty(c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList(MambaBlock(c) for _ in range(c.n_layers))
        self.norm_f = RMSNorm(c.hidden_size, c.norm_eps)


class RecurrentLM(nn.Module):
    """What MambaLM and JambaLM share: per-layer recurrent states behind LLM's calling convention."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.max_batch = -1
        self.max_seq_len = -1
        self.states: list[LayerState] = []

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    @property
    def state(self) -> RecurrentState:
        """The recurrent layers' state (a hybrid's attention layers keep a KV cache indexed by position)."""
        return RecurrentState(self.states)

    def reset_at_sequence_start(self, input_pos: Tensor) -> None:
        """Eager calls starting at position 0 zero the state (one host read of input_pos[0]);
        the compiled one-token step always continues it."""
        if not torch.compiler.is_compiling() and int(input_pos[0]) == 0:
            for s in self.states:
                s.reset()


class MambaLM(RecurrentLM):
    """A Mamba / Mamba-2 language model with LLM's calling convention (see the module docstring)."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__(config)
        self.backbone = MambaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm_f

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate the state. `max_seq_len` is only a limit the caller keeps: the state is the same size
        for any length, and growing the limit keeps the state (a conversation goes on)."""
        dtype = dtype or self.backbone.norm_f.weight.dtype
        device = torch.device(device) if device is not None else self.device
        same = (self.states and max_batch == self.max_batch and self.states[0].conv_cache.dtype == dtype
                and self.states[0].conv_cache.device == device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        if same:
            return
        conv, ssm = self.config.state_shapes()
        self.states = [LayerState(max_batch, conv, ssm, dtype, device) for _ in range(self.config.n_layers)]
        self.state_modules = nn.ModuleList(self.states)  # so .to() and memory accounting see them

    def forward(self, tokens: Tensor, input_pos: Tensor, kv_len: int | None = None,
                last_only: bool = False) -> Tensor:
        """tokens (B, T) at positions input_pos (T,) -> logits (B, T, V) (or (B, 1, V) with last_only).

        Position 0 starts a new sequence (reset_at_sequence_start). `kv_len` is accepted and ignored.
        """
        assert self.states, "call setup_caches() before forward()"
        self.reset_at_sequence_start(input_pos)
        x = self.backbone.embeddings(tokens).to(self.backbone.norm_f.weight.dtype)  # (B, T, C)
        for layer, s in zip(self.backbone.layers, self.states, strict=True):
            x = layer(x, s)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.backbone.norm_f(x))
