"""Load an LLM from a GGUF file: metadata -> Hugging Face config, tensors -> HF key names.

The file is parsed here (not with the `gguf` package) because we want every read bounds-checked
against the file size, so a truncated or corrupt download fails at once with a clear message
instead of hanging or allocating gigabytes, and because a tight parser is what makes loading fast
(the 49k-token vocabulary alone is ~100k small strings). Tensor bytes are never copied: each
weight is a view into a private (copy-on-write) memory map of the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from studio.errors import UserError
from studio.models.llm_build import LoadedLLM
from studio.models.moe_gguf import MOE_BLOCK, moe_expected_shapes
from studio.models.tokenizer import special_tokens_from_gguf, tokenizer_from_gguf
from studio.nn.gguf_dequant import GGML_TYPES, dequantize, type_name
from studio.nn.packed import QuantWeight
from studio.nn.packed_gguf import GGUFWeight

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "qwen3moe", "deepseek2")
RECURRENT_ARCHS = ("mamba", "mamba2", "jamba")  # read by mamba_load.py: no attention, a state instead

# GGUF metadata value types: id -> (struct format, size) for the fixed-size ones.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
             10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class _Corrupt(Exception):
    """Raised inside the parser; turned into one UserError naming the file."""


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first; GGUF stores it innermost first
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    data: Tensor  # the whole file as uint8, memory-mapped copy-on-write

    def raw(self, name: str) -> Tensor:
        """The tensor's bytes as uint8 `(rows, row_bytes)` (1-D tensors: one row)."""
        info = self.tensors[name]
        flat = self.data[info.offset:info.offset + info.nbytes]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return flat.view(rows, -1)


class _Reader:
    """Cursor over the mapped file; every read is checked against the end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"it ends early (needs {n} bytes at offset {self.pos}, file has {self.size})")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, vtype: int) -> Any:
        fmt, size = _SCALARS[vtype]
        v = struct.unpack_from(fmt, self.buf, self.take(size))[0]
        # float32 metadata (eps, rope base) as its shortest decimal: 1e-05, not 9.999999747378752e-06
        return float(str(np.float32(v))) if vtype == 6 else v

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """A string array; the hot loop of loading (a vocabulary is ~100k strings), so kept tight."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Corrupt(f"it ends early inside a string array (offset {pos})")
            end = pos + 8 + unpack(buf, pos)[0]
            if end > size:
                raise _Corrupt(f"a string at offset {pos} runs past the end of the file")
            out.append(buf[pos + 8:end].decode("utf-8", errors="replace"))
            pos = end
        self.pos = pos
        return out

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _ARRAY and depth >= _MAX_ARRAY_DEPTH:
            raise _Corrupt(f"its metadata nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if etype in _NP_TYPES:
                size = np.dtype(_NP_TYPES[etype]).itemsize
                start = self.take(count * size)
                arr = np.frombuffer(self.buf, dtype=_NP_TYPES[etype], count=count, offset=start)
                return arr.astype(bool) if etype == 7 else arr
            if etype == _STRING:
                if count * 8 > self.size - self.pos:  # each string has an 8-byte length at least
                    raise _Corrupt(f"a string array claims {count} items, more than the file can hold")
                return self.strings(count)
            if etype == _ARRAY:
                if count * 12 > self.size - self.pos:
                    raise _Corrupt(f"a nested array claims {count} items, more than the file can hold")
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            raise _Corrupt(f"unknown array element type {etype}")
        raise _Corrupt(f"unknown metadata value type {vtype}")


_MAX_ARRAY_DEPTH = 4  # llama.cpp writes arrays of scalars or strings; 5000 levels overflowed the stack


def _bad(path: Path, why: str) -> UserError:
    return UserError("bad_model", f"{path.name} is not a readable GGUF file: {why}. The file is probably "
                     "damaged or incomplete; download it again.", detail=str(path))


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse header, metadata and tensor table; map tensor data without reading it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            # ACCESS_COPY: private pages, so tensors built on views can be written without touching the file.
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise UserError("model_not_found", f"{path} does not exist; check the path or re-add the model.") from None
    except ValueError:  # mmap of an empty file
        raise _bad(path, "it is empty") from None
    r = _Reader(buf)
    try:
        if r.size < 24 or bytes(buf[:4]) != GGUF_MAGIC:
            raise _Corrupt("it does not start with the GGUF signature")
        r.take(4)
        version = r.u32()
        if version not in (2, 3):
            raise _Corrupt(f"it says GGUF version {version}; versions 2 and 3 are supported")
        n_tensors, n_kv = r.u64(), r.u64()
        # Each tensor entry takes >= 24 bytes, each key/value >= 13: reject counts the file cannot hold.
        if n_tensors * 24 + n_kv * 13 > r.size:
            raise _Corrupt(f"its header claims {n_tensors} tensors and {n_kv} metadata entries, "
                           f"more than {r.size} bytes can hold")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.u32())
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.u32()
            if not 1 <= n_dims <= 4:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
            dims = [r.u64() for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), r.u32(), r.u64()))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, (int, np.integer)) or isinstance(align, bool):
            raise _Corrupt(f"its general.alignment is {type(align).__name__} {str(align)[:20]!r}, not a whole number")
        align = int(align)
        if align <= 0 or align & (align - 1):
            raise _Corrupt(f"its general.alignment {align} is not a power of two")
        data_start = (r.pos + align - 1) // align * align
        tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, type_id, offset in infos:
            t = GGML_TYPES.get(type_id)
            if t is None:
                raise UserError("unsupported", f"Tensor {name} is stored as GGML {type_name(type_id)}, which Studio "
                                "cannot read yet. Use a file quantized as Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 or F16.")
            count = int(np.prod(shape, dtype=np.float64))
            if count <= 0 or count > r.size * 8 or shape[-1] % t.block_size:
                raise _Corrupt(f"tensor {name!r} has an impossible shape {shape} for {t.name}")
            nbytes = count // t.block_size * t.type_size
            start = data_start + offset
            if offset % align or start + nbytes > r.size:
                raise _Corrupt(f"tensor {name!r} lies outside the file (ends at {start + nbytes}, file has {r.size})")
            tensors[name] = GGUFTensorInfo(name, shape, type_id, start, nbytes)
    except _Corrupt as e:
        raise _bad(path, str(e)) from None
    data = torch.frombuffer(buf, dtype=torch.uint8) if r.size else torch.empty(0, dtype=torch.uint8)
    return GGUFFile(path, version, meta, tensors, data)


# --- metadata -> Hugging Face config -------------------------------------------------------------

_MODEL_TYPES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma": ("gemma", "GemmaForCausalLM"),
                "gemma2": ("gemma2", "Gemma2ForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
                "phi3": ("phi3", "Phi3ForCausalLM"), "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
                "deepseek2": ("deepseek_v2", "DeepseekV2ForCausalLM")}


def gguf_config(g: GGUFFile) -> dict:
    """A config.json-style dict from `{arch}.*` metadata (and tensor shapes where metadata is silent)."""
    meta = g.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UserError("unsupported", f"{g.path.name} holds a {arch or 'unnamed'!r} model; Studio runs GGUF "
                        f"architectures {', '.join(SUPPORTED_ARCHS)} (Mistral files use 'llama'). "
                        "Pick a model of one of those families.")

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        return v.tolist() if isinstance(v, np.ndarray) else v

    model_type, cls = _MODEL_TYPES[arch]
    try:
        hidden = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        n_layers = int(get("block_count"))
        ffn = get("feed_forward_length")
    except TypeError:
        raise _bad(g.path, f"it lacks {arch}.embedding_length, attention.head_count or block_count") from None
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, int) and (min(hidden, n_heads, n_layers, n_kv) <= 0 or n_heads % n_kv):
        raise _bad(g.path, f"its header has impossible sizes (hidden {hidden}, {n_heads} heads, "
                   f"{n_kv} key/value heads, {n_layers} layers)")
    # Per-layer lists (some files store one value per layer) collapse when uniform.
    if isinstance(n_kv, list):
        n_kv = max(n_kv)
    if isinstance(ffn, list):
        ffn = max(ffn)
    head_dim = int(get("attention.key_length") or hidden // n_heads)
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or g.tensors["token_embd.weight"].shape[0]
    cfg: dict[str, Any] = {
        "model_type": model_type, "architectures": [cls],
        "hidden_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv), "intermediate_size": int(ffn or 4 * hidden),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)), "rope_scaling": None,
        "max_position_embeddings": int(get("context_length", 4096)), "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in g.tensors, "head_dim": head_dim,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling_type = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if scaling_type in ("linear", "yarn") and factor:
        cfg["rope_scaling"] = {"rope_type": scaling_type, "factor": float(factor)}
        if get("rope.scaling.original_context_length"):
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    if "rope_freqs.weight" in g.tensors:
        # Llama 3.1+ files store the llama3 rope scaling as precomputed per-frequency divisors.
        factors = dequantize(g.raw("rope_freqs.weight"), g.tensors["rope_freqs.weight"].type_id, g.tensors["rope_freqs.weight"].shape)
        cfg["rope_freq_factors"] = factors.tolist()
        cfg["rope_scaling"] = _llama3_scaling(factors, head_dim, cfg["rope_theta"])
    rot = get("rope.dimension_count")
    if rot and int(rot) != head_dim:
        cfg["partial_rotary_factor"] = int(rot) / head_dim
    window = get("attention.sliding_window")
    if arch.startswith("gemma"):
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["tie_word_embeddings"] = True  # Gemma has no separate head; the file never carries one
        # GGUF has no field for it; llama.cpp knows the 27B models (46 / 62 layers) scale
        # attention by hidden / heads instead of head_dim, and so do their HF configs.
        big = (arch, n_layers) in (("gemma2", 46), ("gemma3", 62))
        cfg["query_pre_attn_scalar"] = hidden // n_heads if big else head_dim
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = get("attn_logit_softcapping", 50.0)
        cfg["final_logit_softcapping"] = get("final_logit_softcapping", 30.0)
        cfg["sliding_window"] = int(window or 4096)
    if arch == "gemma3":
        cfg["sliding_window"] = int(window or 512)
        cfg["rope_local_base_freq"] = 10000.0
        cfg["sliding_window_pattern"] = 6
        cfg["final_logit_softcapping"] = None
        cfg["attn_logit_softcapping"] = None
    if arch == "qwen2":
        cfg["attention_bias"] = True
    if arch == "phi3":
        cfg["sliding_window"] = int(window) if window else None
        orig = get("rope.scaling.original_context_length")
        if orig:
            cfg["original_max_position_embeddings"] = int(orig)
        if "rope_factors_long.weight" in g.tensors and "rope_factors_short.weight" in g.tensors:
            def factors(name: str) -> list[float]:
                info = g.tensors[name]
                return dequantize(g.raw(name), info.type_id, info.shape).tolist()
            cfg["rope_scaling"] = {"rope_type": "longrope", "long_factor": factors("rope_factors_long.weight"),
                                   "short_factor": factors("rope_factors_short.weight")}
    if get("expert_count") or arch == "deepseek2":
        from studio.models.moe_gguf import moe_gguf_config

        cfg.update(moe_gguf_config(arch, get, g.tensors, cfg))
    return cfg


def _llama3_scaling(factors: Tensor, head_dim: int, theta: float) -> dict | None:
    """Recover llama3 rope_scaling from the stored divisors, trying the values Meta ships.

    Returns None when they do not fit, in which case config['rope_freq_factors'] holds them.
    """
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * torch.pi / inv
    factor = float(factors.max())
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096)):
        lo_w, hi_w = orig / low, orig / high
        smooth = (orig / wavelen - low) / (high - low)
        expect = torch.where(wavelen < hi_w, torch.ones_like(wavelen),
                             torch.where(wavelen > lo_w, torch.full_like(wavelen, factor),
                                         1.0 / ((1 - smooth) / factor + smooth)))
        if expect.shape == factors.shape and torch.allclose(expect, factors.double(), rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": orig}
    return None


# --- tensor names ---------------------------------------------------------------------------------

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# Gemma 2/3 have four norms per block; GGUF's ffn_norm is their pre-feedforward norm.
_GEMMA2_BLOCK = {**_BLOCK, "ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_PHI3_BLOCK = {**_BLOCK, "ffn_up": "mlp.gate_up_proj"}  # Phi-3's ffn_up is the fused gate+up


# Tensors that hold rope parameters, not weights; gguf_config reads them.
_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hf_name(arch: str, name: str) -> str | None:
    """GGUF tensor name -> Hugging Face key, or None for tensors that are not weights (rope_freqs)."""
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk":
        table = _GEMMA2_BLOCK if arch in ("gemma2", "gemma3") else _PHI3_BLOCK if arch == "phi3" else _BLOCK
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}.{suffix}"
        if parts[2] in MOE_BLOCK:  # experts (3D, no suffix in our keys), routers, MLA projections
            return f"model.layers.{parts[1]}.{MOE_BLOCK[parts[2]].format(suffix)}"
    return None


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Per-layer key suffix -> the shape the config implies (checked so a corrupt header is caught here)."""
    h, d, f = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "self_attn.qkv_proj.weight": (q + 2 * kv, h),
            "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
            "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
            "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
            "mlp.gate_up_proj.weight": (2 * f, h), "input_layernorm.weight": (h,), **moe_expected_shapes(cfg)}


def _check_shapes(g: GGUFFile, arch: str, cfg: dict) -> None:
    expected = _expected_shapes(cfg)
    top = {"model.embed_tokens.weight": (cfg["vocab_size"], cfg["hidden_size"]),
           "lm_head.weight": (cfg["vocab_size"], cfg["hidden_size"]), "model.norm.weight": (cfg["hidden_size"],)}
    for name, info in g.tensors.items():
        key = hf_name(arch, name)
        if key is None:
            continue
        parts = key.split(".")
        if key in top:
            want = top[key]
        elif parts[:2] == ["model", "layers"]:
            if not parts[2].isdigit() or int(parts[2]) >= cfg["num_hidden_layers"]:
                raise _bad(g.path, f"tensor {name} is for a layer the header does not have "
                           f"({cfg['num_hidden_layers']} layers)")
            want = expected.get(".".join(parts[3:]))
        else:
            want = None
        if want is not None and tuple(info.shape) != want:
            raise _bad(g.path, f"tensor {name} has shape {tuple(info.shape)} but the header implies {want}")


# Tensors every layer needs, as (any of these GGUF names); q/k/v and gate/up may come fused.
_LAYER_TENSORS = (("attn_q", "attn_qkv", "attn_q_a"), ("attn_k", "attn_qkv", "attn_kv_a_mqa"),
                  ("attn_v", "attn_qkv", "attn_kv_a_mqa"), ("attn_output",),
                  ("ffn_down", "ffn_down_exps"), ("ffn_up", "ffn_up_exps"), ("attn_norm",))


def _check_layers(g: GGUFFile, cfg: dict) -> None:
    """block_count matches the layers the file holds, and each has its core tensors. A missing one
    used to fail model building as an internal KeyError; 10^9 layers would build for hours."""
    n = cfg["num_hidden_layers"]
    held = {int(name.split(".")[1]) for name in g.tensors
            if name.startswith("blk.") and name.count(".") >= 2 and name.split(".")[1].isdigit()}
    if n > len(held):
        raise _bad(g.path, f"its block_count says {n} layers but it holds tensors for {len(held)}")
    for i in range(n):
        for names in _LAYER_TENSORS:
            if not any(f"blk.{i}.{t}.weight" in g.tensors for t in names):
                raise _bad(g.path, f"tensor blk.{i}.{names[0]}.weight (layer {i}'s "
                           f"{_TENSOR_ROLES[names[0]]}) is missing")


_TENSOR_ROLES = {"attn_q": "attention query, q_proj", "attn_k": "attention key, k_proj",
                 "attn_v": "attention value, v_proj", "attn_output": "attention output, o_proj",
                 "ffn_down": "MLP down_proj", "ffn_up": "MLP up_proj", "attn_norm": "input norm"}


def _unpermute_rows(w: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's Q/K row order (it interleaves each head's rotary halves for its rope kernel).

    Works on rows only, so it applies equally to float weights, biases and raw quantized blocks.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_gguf_llm(path: str | Path, *, keep_quantized: bool = True) -> LoadedLLM:
    """Read a GGUF LLM: config, HF-named weights (quantized ones as QuantWeight), tokenizer, chat metadata.

    keep_quantized=False dequantizes every quantized tensor to float32 (F32/F16/BF16 stay as stored).
    """
    g = read_gguf(path)
    if g.metadata.get("general.architecture") in RECURRENT_ARCHS:
        from studio.models.mamba_load import load_mamba_gguf  # it imports this module

        return load_mamba_gguf(g, keep_quantized)
    try:
        config = gguf_config(g)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        # a number stored as text, nested arrays where a number belongs, a missing tensor, ...
        raise _bad(g.path, f"its metadata is inconsistent ({type(e).__name__}: {e})") from None
    arch = g.metadata["general.architecture"]
    _check_layers(g, config)
    _check_shapes(g, arch, config)
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    state: dict[str, Tensor | QuantWeight] = {}
    unknown: list[str] = []
    for name, info in g.tensors.items():
        key = hf_name(arch, name)
        if key is None:
            if name not in _CONFIG_TENSORS:  # those were read into the config
                unknown.append(name)
            continue
        raw = g.raw(name)  # (rows, row_bytes)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            raw = _unpermute_rows(raw, n_heads if ".attn_q." in name else n_kv)
        float_dtype = _FLOAT_TYPES.get(GGML_TYPES[info.type_id].name)
        if float_dtype is not None:  # a view of the mapped bytes in the stored dtype, no copy
            w: Tensor | QuantWeight = dequantize(raw, info.type_id, info.shape, dtype=float_dtype)
            if arch.startswith("gemma") and name.endswith("norm.weight"):
                w = w.float() - 1.0  # llama.cpp stores Gemma's (1 + w) norm scale; HF keys hold w
        elif len(info.shape) != 2 and not (len(info.shape) == 3 and any(t in name for t in ("_exps.", "_k_b.", "_v_b."))):
            raise _bad(g.path, f"quantized tensor {name} is not a matrix")
        elif keep_quantized:
            w = GGUFWeight(raw, info.type_id, tuple(info.shape))  # (E, out, in) for stacked experts
        else:
            w = dequantize(raw, info.type_id, info.shape)
        state[key] = w
    if unknown:
        raise UserError("unsupported", f"{g.path.name} has tensors a plain {arch} model does not: "
                        f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}. It may be a variant "
                        "(mixture of experts, vision) that Studio does not run yet.")
    if "model.embed_tokens.weight" not in state:
        raise _bad(g.path, "it has no token_embd.weight tensor")
    try:
        tok = tokenizer_from_gguf(g.metadata)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # nested arrays for merges, ...
        raise UserError("bad_model", f"The tokenizer in {g.path.name} cannot be rebuilt: {e}. "
                        "Download the file again or pick another quantization of the model.") from None
    special = special_tokens_from_gguf(g.metadata)
    template = g.metadata.get("tokenizer.chat_template")
    return LoadedLLM(
        config=config, state_dict=state, tokenizer=tok,
        chat_template=template if isinstance(template, str) else None,
        bos_token=special["bos_token"], eos_token=special["eos_token"],
        stop_token_ids=special["stop_token_ids"], add_bos=special["add_bos"], source=str(g.path),
        generation_defaults=gguf_sampling(g.metadata), model_name=gguf_model_name(g.metadata),
    )


# Sampling settings llama.cpp's converter copies from generation_config.json -> our names.
GGUF_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                      "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                      "general.sampling.penalty_repeat": "repetition_penalty"}


def gguf_sampling(metadata: dict) -> dict:
    """The sampling settings a GGUF file recommends (often none)."""
    return {ours: metadata[key] for key, ours in GGUF_SAMPLING_KEYS.items()
            if isinstance(metadata.get(key), (int, float)) and not isinstance(metadata.get(key), bool)}


def gguf_model_name(metadata: dict) -> str:
    """general.basename ("smollm2"), else general.name: how the file names its model."""
    for key in ("general.basename", "general.name"):
        if isinstance(metadata.get(key), str) and metadata[key].strip():
            return metadata[key].strip()
    return ""


def gguf_weight_bytes(state_dict: dict[str, Tensor | QuantWeight]) -> int:
    """Bytes the weights of a loaded state dict occupy (packed sizes for quantized ones)."""
    return sum(w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size() for w in state_dict.values())


__all__ = ["GGUFFile", "GGUFTensorInfo", "gguf_config", "gguf_weight_bytes", "hf_name", "load_gguf_llm", "read_gguf"]
