"""What is this model? Family, variant and role from marker keys and shapes, never the file name.

Input is a ModelHeader (headers.py). The key tables follow the layouts people download:
original/LDM single files, ComfyUI `model.diffusion_model.` files, diffusers folders and
single diffusers-layout files, Hugging Face LLM folders and GGUF (whose tensor names keep
the original layout). Every decision records the keys that made it, so `studio models info`
can show why.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio import families as F
from studio.families import Kind
from studio.library.headers import HeaderError, ModelHeader, read_header
from studio.library.markers import (
    DIFFUSION_DETECTORS,
    Keys,
    controlnet,
    image_encoder,
    taesd,
    text_encoder,
    vae,
)
from studio.units import GiB, fmt_bytes

DIFFUSION_PREFIX = "model.diffusion_model."
ROLES = ("checkpoint", "diffusion_model", "vae", "text_encoder", "image_encoder", "lora", "controlnet", "llm",
         "unknown")
IMAGE_FAMILIES = F.ids(Kind.IMAGE)
VIDEO_FAMILIES = F.ids(Kind.VIDEO)
# The chat engine's families: GGUF general.architecture / HF model_type -> our family name.
LLM_FAMILIES = {name: f.id for f in F.FAMILIES.values() if f.kind is Kind.CHAT for name in (f.id, *f.aliases)}
# Activations at the family's native resolution / clip length on top of the weights (rough).
_GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
                    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
                    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0"}


@dataclass
class Detection:
    family: str  # sd1 sd2 sdxl sd3 flux pixart sana wan ltxv cogvideox mochi | vae/encoder kinds | llm arch
    variant: str
    role: str  # one of ROLES
    format: str  # safetensors | gguf | pytorch-pickle | diffusers | hf
    layout: str = ""  # ldm-checkpoint | comfyui-prefixed | original | diffusers | hf | gguf | kohya | peft
    dtype: str = ""  # dominant stored dtype, or the GGUF quantization
    params: int = 0
    active_params: int = 0  # mixture of experts: parameters one token runs through (0: dense, all of them)
    file_size: int = 0
    ram_bytes: int = 0  # to run on the CPU: weights + activations
    vram_bytes: int = 0  # to run fully resident on a GPU (fp16/bf16 compute)
    prediction: str = ""  # eps | v | flow | "" ; for SD2 may be "v?" (unknown, defaulting to v)
    compatible: list[str] = field(default_factory=list)  # base families a vae/lora/controlnet/encoder serves
    markers: list[str] = field(default_factory=list)  # the keys / config fields that decided
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def recognised(self) -> bool:
        return self.role != "unknown"


_LORA_SUFFIX = re.compile(r"\.(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up)(\.default)?\.weight$")


def _lora(h: ModelHeader) -> Detection | None:
    downs = {k: t.shape for k, t in h.tensors.items() if _LORA_SUFFIX.search(k)}
    if not downs:
        return None
    kohya = any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in downs)
    names = " ".join(downs)
    rank = min((min(s) for k, s in downs.items() if ("down" in k or "lora_A" in k) and len(s) >= 2), default=0)

    def in_dim(pattern: str) -> int:
        rx = re.compile(pattern)
        return next((s[1] for k, s in downs.items() if rx.search(k) and ("down" in k or "lora_A" in k)
                     and len(s) >= 2), -1)

    family, why = "", ""
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", names):
        family, why = F.FLUX, "double/single stream blocks"
    elif "joint_blocks" in names:
        family, why = F.SD3, "joint_blocks"
    elif re.search(r"(^|\.)blocks[._]\d+[._](self_attn|cross_attn|ffn)", names):
        family, why = F.WAN, "blocks.N.self_attn/cross_attn"
        d = in_dim(r"self_attn[._]q")
        if d > 0:
            why += f" (dim {d}: {'1.3B' if d == 1536 else '14B' if d == 5120 else '?'})"
    elif re.search(r"transformer_blocks[._]\d+[._]attn[._]add_k_proj", names):
        d = in_dim(r"attn[._]to_k")
        family = {3072: F.FLUX, 1536: F.SD3, 2432: F.SD3}.get(d, "")
        why = f"dual-stream attention, width {d}"
    elif re.search(r"input_blocks|down_blocks|output_blocks|up_blocks|mid_block", names) or "lora_te" in names:
        d = in_dim(r"attn2[._]to_k")
        family = {768: F.SD1, 1024: F.SD2, 2048: F.SDXL}.get(d, "")
        if not family and re.search(r"lora_te[12]_", names):
            family, d = F.SDXL, 2048
        why = f"UNet cross-attention width {d}"
    det = Detection(family or "unknown", f"rank {rank}", "lora", h.format, "kohya" if kohya else "peft",
                    compatible=[family] if family else [], markers=sorted(downs)[:4])
    det.notes.append(f"LoRA for {family} ({why})" if family else
                     "LoRA, but its base model could not be told from its keys; set the family")
    return det


# ---------------------------------------------------------------------------
# Putting it together.

# Keys only diffusers-layout transformers / UNets have.
_DIFFUSERS_MARKERS = ("conv_in.weight", "x_embedder.weight", "pos_embed.pos_embed", "proj_in.weight",
                      "patch_embed.proj.weight", "pos_frequencies", "caption_projection.linear_1.weight",
                      "condition_embedder.time_embedder.linear_1.weight", "transformer_blocks.0.attn1.to_q.weight")
_COMPONENT_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.")


def detect(path: Path | str) -> Detection:
    """Read the header of a file or folder and detect it. Raises HeaderError for unreadable input."""
    return detect_header(read_header(path))


# GGUF keys detection reads, by suffix after "<arch>.": per-layer lists are allowed where llama.cpp allows them.
_GGUF_INT_KEYS = ("block_count", "context_length", "embedding_length", "attention.key_length",
                  "attention.value_length", "expert_count", "expert_used_count")
_GGUF_INT_OR_LIST_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")
_GGUF_STR_KEYS = ("general.architecture", "general.name", "general.basename", "general.size_label")


def _check_gguf_types(h: ModelHeader) -> None:
    """Wrongly typed metadata (block_count as a string) is this file's error, said plainly."""
    m = h.metadata

    def bad(key: str, want: str) -> HeaderError:
        v = m[key]
        return HeaderError(f"{h.path}: GGUF metadata {key} is {type(v).__name__} {str(v)[:40]!r}, not {want}; "
                           "the file is corrupt or was written by a broken converter, download it again")

    def is_int(v: object) -> bool:
        return type(v) is int and v >= 0
    for key in _GGUF_STR_KEYS:
        if key in m and not isinstance(m[key], str):
            raise bad(key, "text")
    if "general.file_type" in m and not is_int(m["general.file_type"]):
        raise bad("general.file_type", "an integer")
    arch = _gguf_arch(h)
    for suffix in _GGUF_INT_KEYS:
        key = f"{arch}.{suffix}"
        if key in m and not is_int(m[key]):
            raise bad(key, "a non-negative integer")
    for suffix in _GGUF_INT_OR_LIST_KEYS:
        key = f"{arch}.{suffix}"
        v = m.get(key)
        if key in m and not (is_int(v) or isinstance(v, list) and all(is_int(x) for x in v)):
            raise bad(key, "a non-negative integer or a list of them")


def detect_header(h: ModelHeader) -> Detection:
    """Detection from a header. Raises HeaderError when the header's values have the wrong types."""
    if h.format == "gguf":
        _check_gguf_types(h)
    try:
        return _detect_header(h)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        if isinstance(e, HeaderError):
            raise
        # A value of a shape no real file has; the file is the problem, not Studio.
        raise HeaderError(f"{h.path}: this file's header holds a value of an unexpected type or shape "
                          f"({type(e).__name__}: {str(e)[:100]}); the file is corrupt, download it again") from None


def _detect_header(h: ModelHeader) -> Detection:
    if h.format == "diffusers" and h.components:
        det = _detect_pipeline(h)
    elif h.format == "hf" or (h.format == "gguf" and _gguf_arch(h) in LLM_FAMILIES):
        det = _detect_llm(h)
    elif h.format == "gguf" and _gguf_arch(h) in ("t5", "t5encoder"):
        det = _detect_gguf_t5(h)
    else:
        det = _detect_tensors(h)
        if det.role == "vae" and h.format == "diffusers":
            _vae_from_config(det, h.config)
    _fill_stats(det, h)
    det.notes.extend(n for n in h.notes if n not in det.notes)
    return det


def _detect_tensors(h: ModelHeader) -> Detection:
    lora = _lora(h)
    if lora:
        return lora
    prefixed = any(k.startswith(DIFFUSION_PREFIX) for k in h.tensors)
    k = Keys(_shapes(h), DIFFUSION_PREFIX if prefixed else "")
    layout = "gguf" if h.format == "gguf" else "original"
    cn = controlnet(k)
    if cn:
        return Detection(cn[0], cn[1], "controlnet", h.format, cn[1], compatible=[cn[0]], markers=k.used)
    for fn in DIFFUSION_DETECTORS:
        hit = fn(k)
        if hit:
            family, variant, notes = hit
            parts = sorted({p for p in _COMPONENT_PREFIXES if any(key.startswith(p) for key in h.tensors)})
            role = "checkpoint" if prefixed and parts else "diffusion_model"
            if prefixed:
                layout = "ldm-checkpoint" if parts else "comfyui-prefixed"
            elif any(m in k.shapes for m in _DIFFUSERS_MARKERS):
                layout = "diffusers"
            det = Detection(family, variant, role, h.format, layout, markers=k.used, notes=list(notes))
            if parts:
                det.notes.append("contains " + ", ".join(p.rstrip(".") for p in parts))
            if "scaled_fp8" in h.tensors or any(key.endswith(".scale_weight") for key in h.tensors):
                det.notes.append("fp8 weights with per-layer scales (ComfyUI fp8_scaled)")
            _prediction(det, h, k)
            return det
    for fn, role in ((taesd, "vae"), (vae, "vae"), (text_encoder, "text_encoder"),
                     (image_encoder, "image_encoder")):
        k.used = []
        hit = fn(k)
        if hit:
            family, variant, compatible, notes = hit
            if role == "vae" and any(key.startswith(("encoder.down_blocks.", "encoder.mid_block.", "encoder.layers."))
                                     for key in k.shapes):
                layout = "diffusers"
            return Detection(family, variant, role, h.format, layout, compatible=compatible, markers=k.used,
                             notes=notes)
    if _looks_like_llm(h):
        return _detect_llm(h)
    return _unrecognised(h)


def _shapes(h: ModelHeader) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in torch order; a GGUF converter that flattened a tensor to quantize it (ComfyUI-GGUF)
    keeps the real shape in `comfy.gguf.orig_shape.<name>`."""
    shapes = {n: t.shape for n, t in h.tensors.items()}
    if h.format == "gguf":
        for name in shapes:
            orig = h.metadata.get("comfy.gguf.orig_shape." + name)
            if isinstance(orig, (list, tuple)) and orig and all(isinstance(d, int) for d in orig):
                shapes[name] = tuple(orig)
    return shapes


def _prediction(det: Detection, h: ModelHeader, k: Keys) -> None:
    meta = {key.lower(): str(v).lower() for key, v in h.metadata.items()}
    hint = " ".join(f"{a}={b}" for a, b in meta.items() if "predict" in a or "v_param" in a or "architecture" in a)
    catalog = F.FAMILIES.get(det.family)
    if catalog is not None and catalog.prediction == "flow":
        det.prediction = "flow"
    elif "v_pred" in k.shapes or re.search(r"prediction_type=v|v_parameterization=true|-v\b|v-prediction", hint):
        det.prediction = "v"
        det.markers.append("v_pred" if "v_pred" in k.shapes else "__metadata__ prediction hint")
    elif re.search(r"prediction_type=eps|prediction_type=epsilon", hint):
        det.prediction = "eps"
        det.markers.append("__metadata__ prediction hint")
    elif det.family == F.SD2:
        det.prediction = "v?"
        det.notes.append("v or eps: unknown from the weights, default v for 768 models; "
                         "override the prediction if images come out grey or noisy")
    elif catalog is not None and catalog.prediction:
        det.prediction = catalog.prediction


# diffusers VAE configs carry the latent scaling factor, which is what tells same-shaped VAEs apart.
# The variant is the families' common name ("sd" for SD 1.x and 2.x, which share a VAE).
_VAE_SCALES: dict[float, tuple[str, list[str]]] = {}
for _f in F.FAMILIES.values():
    if _f.kind is Kind.IMAGE and _f.latent_scale != 1.0:
        _VAE_SCALES.setdefault(round(_f.latent_scale, 5), ("", []))[1].append(_f.id)
_VAE_SCALES = {k: (ids[0] if len(ids) == 1 else ids[0].rstrip("0123456789"), ids) for k, (_, ids) in _VAE_SCALES.items()}


def _vae_from_config(det: Detection, config: dict) -> None:
    scale = config.get("scaling_factor")
    hit = _VAE_SCALES.get(round(scale, 5)) if isinstance(scale, (int, float)) else None
    if hit:
        det.variant, det.compatible = hit[0], list(hit[1])
        det.markers.append(f"config scaling_factor={scale}")
        det.notes = [n for n in det.notes if "same shapes" not in n]


def _detect_gguf_t5(h: ModelHeader) -> Detection:
    vocab = h.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in h.tensors else 0
    umt5 = vocab >= 250000
    return Detection("umt5" if umt5 else "t5", "xxl", "text_encoder", "gguf", "gguf",
                     compatible=_users_of("umt5" if umt5 else "t5"),
                     markers=[f"general.architecture={_gguf_arch(h)}", f"token_embd.weight vocab {vocab}"])


def _users_of(part: str) -> list[str]:
    """The families whose catalog entry names `part` as a companion."""
    return [f.id for f in F.FAMILIES.values() if any(c.family == part for c in f.companions)]


def _gguf_arch(h: ModelHeader) -> str:
    arch = h.metadata.get("general.architecture", "")
    return arch if isinstance(arch, str) else ""


def _looks_like_llm(h: ModelHeader) -> bool:
    return any(k.endswith(("self_attn.q_proj.weight", "attn_q.weight", "self_attn.q_a_proj.weight", "attn_q_a.weight"))
               for k in h.tensors) and \
        any(k.endswith(("embed_tokens.weight", "token_embd.weight")) for k in h.tensors)


def _detect_llm(h: ModelHeader) -> Detection:
    markers: list[str] = []
    if h.format == "gguf":
        arch = _gguf_arch(h)
        markers.append(f"general.architecture={arch}")
        family = LLM_FAMILIES.get(arch, arch or "unknown")
        size = h.metadata.get("general.size_label", "")
        variant = str(size) if size else ""
        notes = [f"GGUF v{h.metadata.get('GGUF.version')}"]
        if arch == "llama" and "mistral" in str(h.metadata.get("general.basename", "")).lower():
            notes.append("general.basename says Mistral (llama architecture)")
        if arch == "llama" and h.metadata.get("llama.expert_count"):  # llama.cpp writes Mixtral as llama
            family = LLM_FAMILIES.get("mixtral", family)
            markers.append(f"llama.expert_count={h.metadata['llama.expert_count']}")
    else:
        mt = str(h.config.get("model_type", ""))
        archs = h.config.get("architectures") or []
        markers += [f"model_type={mt}"] + ([f"architectures={archs[0]}"] if archs else [])
        family = LLM_FAMILIES.get(mt, mt or "unknown")
        variant, notes = "", []
        if not mt:
            notes.append("LLM-shaped weights without a config.json model_type; set the family")
    known = family in LLM_FAMILIES.values()
    if not known:
        notes.append(f"architecture {family!r} is not one the chat engine runs yet")
    return Detection(family, variant, "llm", h.format, "gguf" if h.format == "gguf" else "hf",
                     markers=markers, notes=notes)




def _detect_pipeline(h: ModelHeader) -> Detection:
    cls = str(h.config.get("_class_name", ""))
    main = h.components.get("transformer") or h.components.get("unet")
    det = None
    if main is not None and main.tensors:
        sub = _detect_tensors(main)
        if sub.role in ("diffusion_model", "checkpoint"):
            det = sub
    if det is None:
        family = getattr(F.by_pipeline_class(cls), "id", None)
        if family is None:
            return _unrecognised(h, f"diffusers pipeline {cls!r} with components {sorted(h.components)}")
        det = Detection(family, "", "checkpoint", "diffusers", "diffusers")
        det.notes.append("family from model_index.json only: the main component's weights were not readable")
    det.role, det.format, det.layout = "checkpoint", "diffusers", "diffusers"
    det.markers.append(f"model_index.json _class_name={cls}")
    if cls == "StableDiffusionXLImg2ImgPipeline" and h.config.get("requires_aesthetics_score"):
        det.variant = "refiner"
    if det.family == F.FLUX and main is not None and "guidance_embeds" in main.config:
        det.variant = "dev" if main.config["guidance_embeds"] else "schnell"
        det.markers.append(f"transformer config guidance_embeds={main.config['guidance_embeds']}")
    sched = h.components.get("scheduler")
    pred = sched.config.get("prediction_type") if sched is not None else None
    if pred in ("epsilon", "v_prediction"):
        det.prediction = "eps" if pred == "epsilon" else "v"
        det.notes = [n for n in det.notes if not n.startswith("v or eps")]
        det.markers.append(f"scheduler prediction_type={pred}")
    det.notes.append("components: " + ", ".join(sorted(h.components)))
    return det


def _unrecognised(h: ModelHeader, seen: str = "") -> Detection:
    prefixes = Counter(".".join(k.split(".")[:2]) for k in h.tensors)
    top = ", ".join(f"{p} ({n})" for p, n in prefixes.most_common(5))
    what = seen or f"{len(h.tensors)} tensors; top key prefixes: {top or 'none'}"
    return Detection("unknown", "", "unknown", h.format, notes=[
        f"not recognised: {what}. If you know what it is, set the family (studio models add --family)"])


def _fill_stats(det: Detection, h: ModelHeader) -> None:
    tensors = list(h.tensors.values()) + [t for c in h.components.values() for t in c.tensors.values()]
    det.params = sum(t.numel for t in tensors)
    det.file_size = h.file_size
    weights = sum(t.nbytes for t in tensors)
    by_bytes = Counter()
    for t in tensors:
        by_bytes[t.dtype] += t.nbytes
    det.dtype = by_bytes.most_common(1)[0][0] if by_bytes else ""
    if h.format == "gguf" and isinstance(h.metadata.get("general.file_type"), int):
        det.dtype = _GGUF_FILE_TYPES.get(h.metadata["general.file_type"], det.dtype)
    # fp32 files compute in half precision on a GPU; quantized files stay quantized.
    gpu_weights = min(weights, det.params * 2) if det.dtype in ("F32", "F64") else weights
    catalog = F.FAMILIES.get(det.family)
    act = (catalog.activation_gib if catalog else 0.0) * GiB if det.role in ("checkpoint", "diffusion_model") else 0
    if det.role == "vae":
        act = GiB  # one tiled decode
    if det.role == "llm":
        state = _recurrent_state_bytes(h)
        if state:  # a state-space model keeps a fixed state instead of a KV cache that grows with the context
            det.notes.append(f"recurrent state {fmt_bytes(state)} per conversation, the same at any length "
                             "(no KV cache)")
        act = state + _kv_cache_bytes(h) + 256 * (1 << 20)
        _moe_stats(det, h, tensors, gpu_weights / max(weights, 1), act)
    det.vram_bytes = int(gpu_weights + act)
    det.ram_bytes = int(weights + act + 512 * (1 << 20))  # plus the engine process itself


_EXPERT_TENSOR = re.compile(r"\.ffn_(gate|up|down)_exps\.|\.(mlp|block_sparse_moe)\.experts\.")


def _moe_counts(h: ModelHeader) -> tuple[int, int]:
    """(experts, experts used per token) from GGUF `{arch}.expert_*` or config.json; (0, 0) when dense."""
    if h.format == "gguf":
        arch = _gguf_arch(h)
        n, k = h.metadata.get(f"{arch}.expert_count"), h.metadata.get(f"{arch}.expert_used_count")
    else:
        c = h.config.get("text_config", h.config)
        n = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts")
        k = c.get("num_experts_per_tok")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, k))
    return (int(n), int(k)) if ok and k <= n else (0, 0)


def _moe_stats(det: Detection, h: ModelHeader, tensors: list, gpu_scale: float, act: int) -> None:
    """Active parameters per token and the experts-in-RAM footprint of a mixture of experts."""
    n, k = _moe_counts(h)
    if not n:
        return
    names = list(h.tensors)
    routed = [t for name, t in zip(names, h.tensors.values(), strict=True) if _EXPERT_TENSOR.search(name)]
    expert_params = sum(t.numel for t in routed)
    if not expert_params:
        return
    det.active_params = det.params - expert_params + expert_params * k // n
    expert_bytes = sum(t.nbytes for t in routed) * gpu_scale
    det.notes.append(f"mixture of experts: {n} experts, {k} per token; ~{det.active_params / 1e9:.2f}B of "
                     f"{det.params / 1e9:.2f}B parameters active per token")
    rest = sum(t.nbytes for t in tensors) * gpu_scale - expert_bytes
    det.notes.append(f"with experts in RAM: ~{fmt_bytes(int(rest + act))} VRAM (attention, routers, shared experts) "
                     f"+ {fmt_bytes(int(expert_bytes))} of routed experts in RAM")


def _kv_cache_bytes(h: ModelHeader, ctx: int = 4096) -> int:
    """fp16 K and V for every layer at `ctx` tokens (or the model's context if shorter)."""
    try:
        return _kv_estimate(h, ctx)
    except (TypeError, ValueError):  # per-layer lists or odd metadata: no estimate rather than a crash
        return 0


def _mla_width(h: ModelHeader) -> int:
    """kv_lora_rank + rotary dims of a multi-head-latent-attention model, else 0."""
    if h.format == "gguf":
        arch = _gguf_arch(h)
        rank, rope = h.metadata.get(f"{arch}.attention.kv_lora_rank"), h.metadata.get(f"{arch}.rope.dimension_count")
    else:
        c = h.config.get("text_config", h.config)
        rank, rope = c.get("kv_lora_rank"), c.get("qk_rope_head_dim")
    return rank + rope if all(isinstance(v, int) and v > 0 for v in (rank, rope)) else 0


def _recurrent_state_bytes(h: ModelHeader) -> int:
    """Mamba-style state per sequence: conv inputs (fp16) and the SSM state (fp32) of every layer; 0 for
    a model without one. Read from GGUF `{arch}.ssm.*` or config.json's state_size / conv_kernel."""
    if h.format == "gguf":
        m, arch = h.metadata, _gguf_arch(h)
        state, inner = m.get(f"{arch}.ssm.state_size"), m.get(f"{arch}.ssm.inner_size")
        kernel, layers = m.get(f"{arch}.ssm.conv_kernel", 4), m.get(f"{arch}.block_count", 0)
        groups = m.get(f"{arch}.ssm.group_count")
        kv = m.get(f"{arch}.attention.head_count_kv")
        if isinstance(kv, list) and isinstance(layers, int):  # a hybrid (Jamba): layers with KV heads attend
            layers -= sum(1 for k in kv if k)
    else:
        c = h.config
        state, kernel = c.get("state_size") or c.get("mamba_d_state"), c.get("conv_kernel") or c.get("mamba_d_conv", 4)
        layers = c.get("num_hidden_layers", 0)
        expand = c.get("expand") or c.get("mamba_expand", 2)
        inner = c.get("intermediate_size") if "state_size" in c else None
        inner = inner or expand * c.get("hidden_size", 0)
        groups = c.get("n_groups") if "num_heads" in c else None  # Mamba-2: B and C pass the conv too
        layers -= _hf_attention_layers(c) if "attn_layer_period" in c else 0
    if not all(isinstance(v, int) and v > 0 for v in (state, inner, kernel, layers)):
        return 0
    conv = inner + (2 * groups * state if isinstance(groups, int) else 0)
    return layers * (conv * (kernel - 1) * 2 + inner * state * 4)


def _hf_attention_layers(c: dict) -> int:
    """How many layers of a Jamba-style hybrid attend (the others are Mamba layers)."""
    period, offset = c.get("attn_layer_period", 1), c.get("attn_layer_offset", 0)
    return sum(1 for i in range(c.get("num_hidden_layers", 0)) if i % max(period, 1) == offset)


def _kv_estimate(h: ModelHeader, ctx: int) -> int:
    mla = _mla_width(h)
    if mla:  # DeepSeek's MLA caches one latent vector + one rotary key per token and layer, fp16
        c = h.config.get("text_config", h.config)
        layers = h.metadata.get(f"{_gguf_arch(h)}.block_count", 0) if h.format == "gguf" else c.get("num_hidden_layers", 0)
        limit = (h.metadata.get(f"{_gguf_arch(h)}.context_length", ctx) if h.format == "gguf"
                 else c.get("max_position_embeddings", ctx))
        return int(layers * mla * min(ctx, limit) * 2)
    if h.format == "gguf":
        arch = _gguf_arch(h)
        m = h.metadata
        layers, heads = m.get(f"{arch}.block_count", 0), m.get(f"{arch}.attention.head_count", 1)
        kv = m.get(f"{arch}.attention.head_count_kv", heads)
        head_dim = m.get(f"{arch}.attention.key_length") or m.get(f"{arch}.embedding_length", 0) // max(heads, 1)
        ctx = min(ctx, m.get(f"{arch}.context_length", ctx))
        if f"{arch}.ssm.state_size" in m and not isinstance(kv, list):
            return 0  # attention-free (Mamba): a fixed state, counted apart
        if isinstance(kv, list):  # per-layer counts (Jamba: 0 on its Mamba layers)
            layers, kv = 1, sum(kv)
    else:
        c = h.config.get("text_config", h.config)
        if "num_attention_heads" not in c and "state_size" in c:
            return 0  # attention-free (Mamba): a fixed state, counted apart
        layers, heads = c.get("num_hidden_layers", 0), c.get("num_attention_heads", 1)
        if "attn_layer_period" in c:
            layers = _hf_attention_layers(c)
        kv = c.get("num_key_value_heads", heads)
        head_dim = c.get("head_dim") or c.get("hidden_size", 0) // max(heads, 1)
        ctx = min(ctx, c.get("max_position_embeddings", ctx))
    return int(2 * layers * kv * head_dim * ctx * 2)
