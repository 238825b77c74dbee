"""T5 v1.1 and umT5 text encoders (encoder stack only), and their tokenizer.

One encoder serves Wan (umT5-XXL), Flux, SD3, PixArt, LTX-Video and CogVideoX (T5 v1.1 XXL).
T5 v1.1: RMS norm without mean or bias, no attention scaling, gated-GELU (tanh) feed-forward,
a learned relative position bias computed in the first layer and reused by all layers. umT5 is
the same except that every layer has its own relative position bias.

Our module names are short (`blocks.0.attn.q.weight`, `blocks.0.ffn.wi_0.weight`,
`blocks.0.pos_embedding.weight`, `token_embedding.weight`, `norm.weight`); `normalize_state_dict`
converts the Hugging Face layout (`encoder.block.0.layer.0.SelfAttention.q.weight`, `shared.weight`,
`encoder.final_layer_norm.weight`, under any prefix such as `text_encoders.t5xxl.transformer.`),
llama.cpp's GGUF names (`enc.blk.0.attn_q.weight`, `enc.blk.0.attn_rel_b.weight`) and the original
Wan umT5 layout (`blocks.0.ffn.gate.0.weight`, `blocks.0.pos_embedding.embedding.weight`).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import UserError
from studio.models.diffusion_quant import build_compact
from studio.nn.attention import attention


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    dim: int = 4096
    heads: int = 64
    head_dim: int = 64
    ffn_dim: int = 10240
    layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    per_layer_bias: bool = False  # umT5: every layer has its own relative position bias
    eps: float = 1e-6

    @classmethod
    def named(cls, name: str) -> T5Config:
        if name not in CONFIGS:
            raise KeyError(f"unknown T5 config {name!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[name]

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **overrides) -> T5Config:
        """Shapes -> config for a state dict in our layout (run `normalize_state_dict` first).

        The relative bias table is (num_buckets, heads), which gives the head count.
        """
        emb = sd.get("token_embedding.weight")
        bias = sd.get("blocks.0.pos_embedding.weight")
        if emb is None or bias is None:
            raise UserError("bad_model", "This file holds no T5 encoder (no token embedding or relative position "
                            "bias): pick a T5 / umT5 text encoder file.")
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        heads = int(bias.shape[1])
        cfg = cls(
            vocab_size=int(emb.shape[0]),
            dim=int(emb.shape[1]),
            heads=heads,
            head_dim=int(sd["blocks.0.attn.q.weight"].shape[0]) // heads,
            ffn_dim=int(sd["blocks.0.ffn.wi_0.weight"].shape[0]),
            layers=layers,
            num_buckets=int(bias.shape[0]),
            per_layer_bias=layers > 1 and "blocks.1.pos_embedding.weight" in sd,
        )
        return replace(cfg, **overrides)


CONFIGS: dict[str, T5Config] = {
    "t5-v1_1-xxl": T5Config(),
    "umt5-xxl": T5Config(vocab_size=256384, per_layer_bias=True),
}


def relative_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int,
                     device: torch.device | None = None) -> torch.Tensor:
    """(q_len, k_len) bucket index of key position minus query position, bidirectional (encoder).

    Half the buckets for each direction; in each half, small distances get exact buckets and
    larger ones logarithmic bins up to max_distance (Mesh TensorFlow's scheme).
    """
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < exact, rel, large)


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * weight, the statistics in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.dim, inner, bias=False)
        self.k = nn.Linear(cfg.dim, inner, bias=False)
        self.v = nn.Linear(cfg.dim, inner, bias=False)
        self.o = nn.Linear(inner, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x (B, L, D); bias (B|1, H, L, L) holds the position bias and the padding mask
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = attention(q, k, v, mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.wi_1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.wo = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = nn.Embedding(cfg.num_buckets, cfg.heads) if has_bias else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, buckets: torch.Tensor,
                mask_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x, the attention bias for the next block). A block with its own relative-position table
        computes the bias here, inside its forward, so block streaming has its weights on the device."""
        if self.pos_embedding is not None:
            bias = self.pos_embedding(buckets).permute(2, 0, 1).unsqueeze(0).float() + mask_bias  # (B, H, L, L)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x)), bias


class T5Encoder(nn.Module):
    """forward(input_ids (B, L), attention_mask (B, L) | None) -> last_hidden_state (B, L, D)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, has_bias=cfg.per_layer_bias or i == 0) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n = input_ids.shape
        x = self.token_embedding(input_ids)
        buckets = relative_buckets(n, n, self.cfg.num_buckets, self.cfg.max_distance, input_ids.device)
        mask_bias = torch.zeros(b, 1, 1, n, device=x.device)
        if attention_mask is not None:
            # float32 min, not -inf: a row of padding keys only still gets a finite softmax
            mask_bias = mask_bias.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        bias = None
        for block in self.blocks:  # the first block always has a table; T5 v1.1 shares it with the rest
            x, bias = block(x, bias, buckets, mask_bias)
        return self.norm(x)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states with every position past a prompt's end set to zero.

        Wan was trained on umT5 features zero-padded to 512 tokens (its pipelines cut each prompt
        to its length and pad with zeros), not on the encoder's outputs at the padding tokens.
        """
        out = self.forward(input_ids, attention_mask)
        return out * attention_mask[..., None].to(out.dtype)


# ---------------------------------------------------------------- layouts and loading

_HF_BLOCK = {
    "layer.0.SelfAttention.q.": "attn.q.", "layer.0.SelfAttention.k.": "attn.k.",
    "layer.0.SelfAttention.v.": "attn.v.", "layer.0.SelfAttention.o.": "attn.o.",
    "layer.0.SelfAttention.relative_attention_bias.": "pos_embedding.",
    "layer.0.layer_norm.": "norm1.",
    "layer.1.DenseReluDense.wi_0.": "ffn.wi_0.", "layer.1.DenseReluDense.wi_1.": "ffn.wi_1.",
    "layer.1.DenseReluDense.wo.": "ffn.wo.",
    "layer.1.layer_norm.": "norm2.",
}
# llama.cpp's T5 names (GGUF files such as city96's t5-v1_1-xxl / umt5-xxl encoders), after dequantisation
_GGUF_BLOCK = {"attn_q.": "attn.q.", "attn_k.": "attn.k.", "attn_v.": "attn.v.", "attn_o.": "attn.o.",
               "attn_rel_b.": "pos_embedding.", "attn_norm.": "norm1.", "ffn_norm.": "norm2.",
               "ffn_gate.": "ffn.wi_0.", "ffn_up.": "ffn.wi_1.", "ffn_down.": "ffn.wo."}
_WAN_BLOCK = {"ffn.gate.0.": "ffn.wi_0.", "ffn.fc1.": "ffn.wi_1.", "ffn.fc2.": "ffn.wo.",
              "pos_embedding.embedding.": "pos_embedding."}


def _hf_prefix(sd: dict[str, torch.Tensor]) -> str | None:
    for k in sd:
        if m := re.match(r"(.*?)encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$", k):
            return m.group(1)
    return None


def convert_hf(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Hugging Face T5EncoderModel / UMT5EncoderModel keys -> ours; decoder and head are dropped."""
    out = {}
    for key, tensor in sd.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            out["token_embedding.weight"] = tensor
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = tensor
        elif m := re.match(r"encoder\.block\.(\d+)\.(.*)", key):
            rest = m.group(2)
            for old, new in _HF_BLOCK.items():
                if rest.startswith(old):
                    out[f"blocks.{m.group(1)}.{new}{rest[len(old):]}"] = tensor
                    break
            else:
                out[key] = tensor  # unknown: reported by the loader
    return out


def convert_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan umT5 keys (`models_t5_umt5-xxl-enc-bf16.pth`) -> ours."""
    out = {}
    for key, tensor in sd.items():
        if key == "pos_embedding.embedding.weight":  # a shared-position T5 in Wan's code
            out["blocks.0.pos_embedding.weight"] = tensor
            continue
        for old, new in _WAN_BLOCK.items():
            key = key.replace(f".{old}", f".{new}")
        out[key] = tensor
    return out


def convert_gguf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama.cpp T5 encoder names (`enc.blk.0.attn_q.weight`, `token_embd.weight`) -> ours; decoder dropped."""
    out = {}
    for key, tensor in sd.items():
        if key == "token_embd.weight":
            out["token_embedding.weight"] = tensor
        elif key == "enc.output_norm.weight":
            out["norm.weight"] = tensor
        elif m := re.match(r"enc\.blk\.(\d+)\.(\w+\.)(.*)", key):
            out[f"blocks.{m[1]}.{_GGUF_BLOCK.get(m[2], m[2])}{m[3]}"] = tensor
    return out


def normalize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> ours: Hugging Face (any prefix), llama.cpp GGUF names, original Wan umT5, ours."""
    prefix = _hf_prefix(sd)
    if prefix is not None:
        return convert_hf(sd, prefix)
    if "enc.blk.0.attn_q.weight" in sd:
        return convert_gguf(sd)
    return convert_wan(sd)


def load_t5_encoder(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, config: dict | None = None, **overrides) -> T5Encoder:
    """Build on the meta device and take the tensors as they are (copies only for a dtype/device change).

    Compact weights (fp8, GGUF: studio.models.diffusion_quant, read with compact=True) stay compact in the
    Linear layers, as ComfyUI users keep T5-XXL in fp8 or Q8 to halve its 9 GB.
    `config`: a transformers text_encoder/config.json (studio.models.diffusers_config.read_config) for
    what shapes cannot tell (relative_attention_max_distance, layer_norm_epsilon)."""
    if config:
        from studio.models.diffusers_config import t5_settings

        overrides = {**t5_settings(config), **overrides}
    sd = normalize_state_dict(sd)
    cfg = T5Config.from_state_dict(sd, **overrides)
    model, missing, unexpected = build_compact(lambda: T5Encoder(cfg), sd, dtype=dtype, device=device)
    if missing or unexpected:
        raise UserError("bad_model", "The weights do not fit a T5 encoder (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}): the file is damaged or of another kind.")
    return model


# ---------------------------------------------------------------- tokenizer


def clean_prompt(text: str) -> str:
    """The cleanup Wan's pipelines apply before tokenizing: HTML entities decoded (twice, for
    double-escaped text), runs of whitespace collapsed to one space, ends stripped."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class T5Tokenizer:
    """A `tokenizers` tokenizer.json: texts -> (input_ids, attention_mask), both (B, max_length) int64.

    The file's own post-processor appends `</s>`; padding uses id 0 (`<pad>`) as T5 does.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer  # only the engine needs it; keeps import of this module cheap

        self.path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(self.path))
        self.pad_id = self.tokenizer.token_to_id("<pad>") or 0

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Tokenizer:
        """Find tokenizer.json in the model folder, its `tokenizer/` or `tokenizer_2/`/`tokenizer_3/` subfolder."""
        folder = Path(folder)
        for sub in ("", "tokenizer", "tokenizer_2", "tokenizer_3", "google/umt5-xxl"):
            candidate = folder / sub / "tokenizer.json"
            if candidate.is_file():
                return cls(candidate)
        raise UserError("model_not_found", f"No T5 tokenizer found in {folder}: put the model's tokenizer.json "
                        f"(from the umt5-xxl or t5-v1_1-xxl repository, the fast-tokenizer file) at "
                        f"{folder / 'tokenizer' / 'tokenizer.json'}.")

    def __call__(self, texts: list[str], max_length: int = 512, clean: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if clean:
            texts = [clean_prompt(t) for t in texts]
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=True)):
            row = enc.ids[:max_length]
            if len(enc.ids) > max_length and enc.ids[-1] != row[-1]:
                row[-1] = enc.ids[-1]  # truncated: keep the closing </s> as HF's truncation does
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids, mask
