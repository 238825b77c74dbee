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

from studio.library.headers import ModelHeader, read_header

GiB = 1 << 30
DIFFUSION_PREFIX = "model.diffusion_model."
ROLES = ("checkpoint", "diffusion_model", "vae", "text_encoder", "image_encoder", "lora", "controlnet", "llm",
         "unknown")
IMAGE_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "pixart", "sana")
VIDEO_FAMILIES = ("wan", "ltxv", "cogvideox", "mochi")
# The chat engine's families: GGUF general.architecture / HF model_type -> our family name.
LLM_FAMILIES = {"llama": "llama", "mistral": "mistral", "mistral3": "mistral", "qwen2": "qwen2",
                "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
                "gemma3_text": "gemma3", "phi3": "phi3"}
# Activations at the family's native resolution / clip length on top of the weights (rough).
_ACTIVATIONS = {"sd1": 0.6, "sd2": 0.8, "sdxl": 1.5, "sd3": 2.0, "flux": 3.0, "pixart": 1.5, "sana": 1.5,
                "wan": 6.0, "ltxv": 4.0, "cogvideox": 6.0, "mochi": 10.0}
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


class _Keys:
    """Tensor names and shapes with a record of which ones a decision used."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], prefix: str = "") -> None:
        self.shapes = {k[len(prefix):]: tuple(s) for k, s in shapes.items() if k.startswith(prefix)}
        self.prefix = prefix
        self.used: list[str] = []

    def has(self, *keys: str) -> bool:
        if all(k in self.shapes for k in keys):
            self.used.extend(self.prefix + k for k in keys if self.prefix + k not in self.used)
            return True
        return False

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.shapes:
            if self.prefix + key not in self.used:
                self.used.append(self.prefix + key)
            return tuple(self.shapes[key])
        return ()

    def dim(self, key: str, i: int) -> int:
        s = self.shape(key)
        return s[i] if len(s) > abs(i) - (i < 0) else -1

    def find(self, pattern: str) -> str | None:
        rx = re.compile(pattern)
        return next((k for k in sorted(self.shapes) if rx.fullmatch(k)), None)

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in self.shapes if (m := rx.match(k))})


# ---------------------------------------------------------------------------
# Diffusion models (UNets and transformers), on keys with any ComfyUI prefix removed.

def _context_dim(k: _Keys) -> int:
    key = k.find(r"(input_blocks|down_blocks)\.\d+\.(\d+|attentions\.\d+)\.transformer_blocks\.0\.attn2\.to_k\.weight")
    return k.dim(key, 1) if key else -1


def _unet(k: _Keys) -> tuple[str, str, list[str]] | None:
    ldm = k.has("input_blocks.0.0.weight", "out.2.weight")
    dif = not ldm and k.has("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight")
    if not (ldm or dif):
        return None
    ctx = _context_dim(k)
    label = k.shape("label_emb.0.0.weight") if ldm else k.shape("add_embedding.linear_1.weight")
    in_ch = k.dim("input_blocks.0.0.weight" if ldm else "conv_in.weight", 1)
    notes = [f"inpainting UNet ({in_ch} input channels)"] if in_ch == 9 else []
    if label[1:] == (2816,) or ctx == 2048:
        return "sdxl", "base", notes
    if label[1:] == (2560,) or ctx == 1280:
        return "sdxl", "refiner", notes
    if ctx == 1024:
        return "sd2", "2.x", notes
    if ctx == 768:
        return "sd1", "1.x", notes
    return None


def _sd3(k: _Keys) -> tuple[str, str, list[str]] | None:
    if k.has("joint_blocks.0.context_block.adaLN_modulation.1.bias"):
        hidden = k.dim("joint_blocks.0.context_block.adaLN_modulation.1.bias", 0) // 6
        tokens = k.dim("pos_embed", 1)
    elif k.has("transformer_blocks.0.ff_context.net.0.proj.weight", "pos_embed.pos_embed"):
        hidden = k.dim("pos_embed.proj.weight", 0)
        tokens = k.dim("pos_embed.pos_embed", 1)
    else:
        return None
    if hidden == 2432:
        return "sd3", "3.5-large", ["3.5 Large and Large Turbo share shapes; turbo wants ~4 steps, CFG 1"]
    if tokens == 147456:
        return "sd3", "3.5-medium", []
    return "sd3", "3-medium" if tokens == 36864 else f"hidden {hidden}", []


def _flux(k: _Keys) -> tuple[str, str, list[str]] | None:
    if k.has("double_blocks.0.img_attn.norm.key_norm.scale"):
        guided, img_in = k.has("guidance_in.in_layer.weight"), k.dim("img_in.weight", 1)
    elif k.has("single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"):
        guided = k.has("time_text_embed.guidance_embedder.linear_1.weight")
        img_in = k.dim("x_embedder.weight", 1)
    else:
        return None
    variant = "dev" if guided else "schnell"
    extra = {384: "-fill", 128: "-depth/canny"}.get(img_in, "")
    notes = ["guidance_in present: guidance-distilled (dev)" if guided else
             "no guidance_in: timestep-distilled (schnell), ~4 steps"]
    return "flux", variant + extra, notes


def _pixart_sana(k: _Keys) -> tuple[str, str, list[str]] | None:
    if k.has("blocks.0.cross_attn.q_linear.weight"):
        if k.has("blocks.0.mlp.inverted_conv.conv.weight"):
            hidden = k.dim("x_embedder.proj.weight", 0)
            return "sana", {1152: "600M", 2240: "1.6B"}.get(hidden, f"hidden {hidden}"), []
        if k.has("blocks.0.mlp.fc1.weight"):
            tokens = k.dim("y_embedder.y_embedding", 0)
            return "pixart", {120: "alpha", 300: "sigma"}.get(tokens, "unknown"), []
        return None
    if k.has("transformer_blocks.0.ff.conv_inverted.weight", "caption_projection.linear_1.weight"):
        hidden = k.dim("patch_embed.proj.weight", 0)
        return "sana", {1152: "600M", 2240: "1.6B"}.get(hidden, f"hidden {hidden}"), []
    if k.has("adaln_single.linear.weight", "pos_embed.proj.weight", "transformer_blocks.0.attn2.to_k.weight"):
        return "pixart", "alpha or sigma", ["diffusers layout; the pipeline config says which"]
    return None


def _wan(k: _Keys) -> tuple[str, str, list[str]] | None:
    if k.has("head.modulation", "patch_embedding.weight"):
        image = k.has("img_emb.proj.1.weight")
    elif k.has("condition_embedder.time_embedder.linear_1.weight", "patch_embedding.weight"):
        image = k.has("condition_embedder.image_embedder.ff.net.0.proj.weight")
    else:
        return None
    dim, in_ch = k.dim("patch_embedding.weight", 0), k.dim("patch_embedding.weight", 1)
    if dim == 3072 and in_ch == 48:
        return "wan", "2.2-ti2v-5B", ["text and image to video, 48-channel Wan 2.2 VAE"]
    size = {1536: "1.3B", 5120: "14B"}.get(dim, f"dim {dim}")
    if in_ch == 36:
        return "wan", f"i2v-{size}", ["Wan 2.1 I2V (CLIP image input)" if image else
                                      "image-to-video without CLIP input: a Wan 2.2 I2V expert"]
    notes = ["Wan 2.1 and 2.2 T2V 14B experts have the same shapes"] if dim == 5120 else []
    return "wan", f"t2v-{size}", notes


def _ltxv(k: _Keys) -> tuple[str, str, list[str]] | None:
    if k.has("patchify_proj.weight", "adaln_single.emb.timestep_embedder.linear_1.weight"):
        pass
    elif not (k.has("proj_in.weight", "scale_shift_table", "transformer_blocks.0.attn1.norm_q.weight")
              and len(k.shape("proj_in.weight")) == 2):
        return None
    blocks = k.count(r"transformer_blocks\.(\d+)\.")
    return "ltxv", {28: "2B", 48: "13B"}.get(blocks, f"{blocks} blocks"), []


def _cogvideox(k: _Keys) -> tuple[str, str, list[str]] | None:
    if not k.has("patch_embed.text_proj.weight", "transformer_blocks.0.norm1.linear.weight"):
        return None
    s = k.shape("patch_embed.proj.weight")
    size = {1920: "2B", 3072: "5B"}.get(s[0] if s else -1, "unknown size")
    if len(s) == 2:
        return "cogvideox", f"1.5-{size}", ["CogVideoX 1.5 (temporal patches)"]
    return "cogvideox", f"{'i2v' if len(s) > 1 and s[1] == 32 else 't2v'}-{size}", []


def _mochi(k: _Keys) -> tuple[str, str, list[str]] | None:
    if k.has("blocks.0.attn.qkv_x.weight") or k.has("pos_frequencies", "patch_embed.proj.weight"):
        return "mochi", "1-preview", []
    return None


DIFFUSION_DETECTORS = (_flux, _sd3, _wan, _ltxv, _mochi, _cogvideox, _pixart_sana, _unet)


# ---------------------------------------------------------------------------
# VAEs, text encoders, LoRA, ControlNet.

def _vae(k: _Keys) -> tuple[str, str, list[str], list[str]] | None:
    if k.has("decoder.middle.0.residual.0.gamma") or k.has("encoder.mid_block.resnets.0.norm1.gamma"):
        z = k.dim("conv1.weight", 0) // 2 if "conv1.weight" in k.shapes else k.dim("quant_conv.weight", 0) // 2
        if z == 48:
            return "wan-vae", "2.2", ["wan"], ["48 latent channels: Wan 2.2 TI2V 5B"]
        return "wan-vae", "2.1", ["wan"], ["16 latent channels: Wan 2.1 and Wan 2.2 14B"]
    ldm = k.has("encoder.conv_in.weight", "decoder.conv_out.weight")
    if not ldm:
        return None
    z = k.dim("encoder.conv_out.weight", 0) // 2
    if z == 4:
        return ("vae-kl-f8", "sd/sdxl", ["sd1", "sd2", "sdxl", "pixart"],
                ["SD1.x/2.x and SDXL VAEs have the same shapes; the weights differ (SDXL scale 0.13025)"])
    if z == 16:
        return ("vae-16ch", "sd3/flux", ["sd3", "flux"],
                ["SD3 and Flux VAEs have the same shapes; the weights differ"])
    return "vae", f"{z} latent channels", [], []


def _taesd(k: _Keys) -> tuple[str, str, list[str], list[str]] | None:
    # Tiny AutoEncoder: numbered nn.Sequential layers (madebyollin layout, optionally prefixed as in
    # ComfyUI) or diffusers' encoder.layers.N / decoder.layers.N. z = latent channels.
    for enc, dec in (("encoder.layers.", "decoder.layers."), ("taesd_encoder.", "taesd_decoder."), ("", "")):
        first_dec = dec + ("0" if dec == "decoder.layers." else "1")
        d = k.shapes.get(first_dec + ".weight", ())
        e_last = k.shapes.get(enc + "14.weight", ())
        has_dec = len(d) == 4 and d[0] == 64 and d[2:] == (3, 3) and k.find(re.escape(dec) + r"\d+\.conv\.0\.weight")
        has_enc = k.shapes.get(enc + "0.weight", ())[:2] == (64, 3) and len(e_last) == 4 and \
            k.has(enc + "1.conv.0.weight")
        if not (has_dec or has_enc):
            continue
        z = k.dim(first_dec + ".weight", 1) if has_dec else k.dim(enc + "14.weight", 0)
        notes = [] if has_dec and has_enc else ["decoder only"] if has_dec else ["encoder only"]
        if z == 16:
            return "taesd", "16ch (TAESD3/TAEF1)", ["sd3", "flux"], notes
        if z == 4:
            return "taesd", "4ch (TAESD/TAESDXL)", ["sd1", "sd2", "sdxl"], \
                notes + ["TAESD and TAESDXL have the same shapes"]
        return "taesd", f"{z}ch", [], notes
    return None


def _text_encoder(k: _Keys) -> tuple[str, str, list[str], list[str]] | None:
    # HF CLIP: "text_model." in files; transformers 5 drops it in memory; SD3 bundles add more prefix.
    tok = k.find(r"(.*\.)?embeddings\.token_embedding\.weight")
    p = tok[: -len("embeddings.token_embedding.weight")] if tok else ""
    if tok and k.has(p + "encoder.layers.0.self_attn.q_proj.weight"):
        width = k.dim(tok, 1)
        layers = k.count(re.escape(p) + r"encoder\.layers\.(\d+)\.")
    elif k.has("transformer.resblocks.0.attn.in_proj_weight", "token_embedding.weight"):
        width, layers = k.dim("token_embedding.weight", 1), k.count(r"transformer\.resblocks\.(\d+)\.")
    elif k.has("encoder.block.0.layer.0.SelfAttention.q.weight"):
        vocab = k.dim("shared.weight", 0) if "shared.weight" in k.shapes else \
            k.dim("encoder.embed_tokens.weight", 0)
        umt5 = vocab >= 250000 or k.has("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
        d = k.dim("encoder.block.0.layer.0.SelfAttention.q.weight", 1)
        size = {4096: "xxl", 1024: "large", 768: "base"}.get(d, f"d{d}")
        return ("umt5", size, ["wan"], []) if umt5 else ("t5", size, ["sd3", "flux", "pixart", "ltxv",
                                                                      "cogvideox", "mochi"], [])
    elif k.has("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight"):
        return "umt5", "xxl", ["wan"], ["Wan's original umT5 layout"]
    else:
        return None
    if width == 768:
        return "clip-l", f"{layers} layers", ["sd1", "sdxl", "sd3", "flux"], []
    if width == 1280:
        return "clip-g", f"{layers} layers", ["sdxl", "sd3"], []
    if width == 1024:
        return "clip-h", f"{layers} layers", ["sd2"], ["OpenCLIP ViT-H text encoder (SD2.x)"]
    return "clip", f"width {width}", [], []


def _image_encoder(k: _Keys) -> tuple[str, str, list[str], list[str]] | None:
    """CLIP vision towers: HF names (`vision_model.` or bare) and OpenCLIP's `visual.` layout."""
    patch = k.find(r"(.*\.)?embeddings\.patch_embedding\.weight")
    if patch:
        p = patch[: -len("embeddings.patch_embedding.weight")]
        width, layers = k.dim(patch, 0), k.count(re.escape(p) + r"encoder\.layers\.(\d+)\.")
    elif k.has("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight"):
        width, layers = k.dim("visual.conv1.weight", 0), k.count(r"visual\.transformer\.resblocks\.(\d+)\.")
    else:
        return None
    if width == 1280 and layers == 32:
        return "clip-vision-h", "ViT-H/14", ["wan"], ["the image encoder Wan 2.1 image-to-video needs"]
    return "clip-vision", f"width {width}, {layers} layers", [], []


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
        family, why = "flux", "double/single stream blocks"
    elif "joint_blocks" in names:
        family, why = "sd3", "joint_blocks"
    elif re.search(r"(^|\.)blocks[._]\d+[._](self_attn|cross_attn|ffn)", names):
        family, why = "wan", "blocks.N.self_attn/cross_attn"
        d = in_dim(r"self_attn[._]q")
        if d > 0:
            why += f" (dim {d}: {'1.3B' if d == 1536 else '14B' if d == 5120 else '?'})"
    elif re.search(r"transformer_blocks[._]\d+[._]attn[._]add_k_proj", names):
        d = in_dim(r"attn[._]to_k")
        family = {3072: "flux", 1536: "sd3", 2432: "sd3"}.get(d, "")
        why = f"dual-stream attention, width {d}"
    elif re.search(r"input_blocks|down_blocks|output_blocks|up_blocks|mid_block", names) or "lora_te" in names:
        d = in_dim(r"attn2[._]to_k")
        family = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(d, "")
        if not family and re.search(r"lora_te[12]_", names):
            family, d = "sdxl", 2048
        why = f"UNet cross-attention width {d}"
    det = Detection(family or "unknown", f"rank {rank}", "lora", h.format, "kohya" if kohya else "peft",
                    compatible=[family] if family else [], markers=sorted(downs)[:4])
    det.notes.append(f"LoRA for {family} ({why})" if family else
                     "LoRA, but its base model could not be told from its keys; set the family")
    return det


def _controlnet(k: _Keys) -> tuple[str, str] | None:
    if k.has("control_model.input_hint_block.0.weight") or k.has("control_model.time_embed.0.weight"):
        sub = _Keys(k.shapes, "control_model.")
        if sub.has("label_emb.0.0.weight"):
            return "sdxl", "ldm"
        ctx = _context_dim(sub)
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(ctx, "unknown"), "ldm"
    if k.has("controlnet_cond_embedding.conv_in.weight"):
        if k.has("add_embedding.linear_1.weight"):
            return "sdxl", "diffusers"
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(_context_dim(k), "unknown"), "diffusers"
    if k.has("controlnet_blocks.0.weight"):
        if k.has("controlnet_x_embedder.weight") or k.has("controlnet_single_blocks.0.weight"):
            return "flux", "diffusers"
        if k.has("pos_embed.proj.weight"):
            return "sd3", "diffusers"
    return None


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


def detect_header(h: ModelHeader) -> Detection:
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
    k = _Keys({n: t.shape for n, t in h.tensors.items()}, DIFFUSION_PREFIX if prefixed else "")
    layout = "gguf" if h.format == "gguf" else "original"
    cn = _controlnet(k)
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
            _prediction(det, h, k)
            return det
    for fn, role in ((_taesd, "vae"), (_vae, "vae"), (_text_encoder, "text_encoder"),
                     (_image_encoder, "image_encoder")):
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


def _prediction(det: Detection, h: ModelHeader, k: _Keys) -> None:
    meta = {key.lower(): str(v).lower() for key, v in h.metadata.items()}
    hint = " ".join(f"{a}={b}" for a, b in meta.items() if "predict" in a or "v_param" in a or "architecture" in a)
    if det.family in ("sd3", "flux", "sana", "ltxv", "mochi", "wan"):
        det.prediction = "flow"
    elif "v_pred" in k.shapes or re.search(r"prediction_type=v|v_parameterization=true|-v\b|v-prediction", hint):
        det.prediction = "v"
        det.markers.append("v_pred" if "v_pred" in k.shapes else "__metadata__ prediction hint")
    elif re.search(r"prediction_type=eps|prediction_type=epsilon", hint):
        det.prediction = "eps"
        det.markers.append("__metadata__ prediction hint")
    elif det.family == "sd2":
        det.prediction = "v?"
        det.notes.append("v or eps: unknown from the weights, default v for 768 models; "
                         "override the prediction if images come out grey or noisy")
    elif det.family in ("sd1", "sdxl", "pixart", "cogvideox"):
        det.prediction = "v" if det.family == "cogvideox" else "eps"


# diffusers VAE configs carry the latent scaling factor, which is what tells same-shaped VAEs apart.
_VAE_SCALES = {0.18215: ("sd", ["sd1", "sd2"]), 0.13025: ("sdxl", ["sdxl"]), 1.5305: ("sd3", ["sd3"]),
               0.3611: ("flux", ["flux"])}


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
                     compatible=["wan"] if umt5 else ["sd3", "flux", "pixart", "ltxv", "cogvideox", "mochi"],
                     markers=[f"general.architecture={_gguf_arch(h)}", f"token_embd.weight vocab {vocab}"])


def _gguf_arch(h: ModelHeader) -> str:
    arch = h.metadata.get("general.architecture", "")
    return arch if isinstance(arch, str) else ""


def _looks_like_llm(h: ModelHeader) -> bool:
    return any(k.endswith(("self_attn.q_proj.weight", "attn_q.weight")) for k in h.tensors) and \
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


_PIPELINE_CLASSES = {"StableDiffusionPipeline": "sd1", "StableDiffusionXLPipeline": "sdxl",
                     "StableDiffusionXLImg2ImgPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
                     "FluxPipeline": "flux", "PixArtAlphaPipeline": "pixart", "PixArtSigmaPipeline": "pixart",
                     "SanaPipeline": "sana", "WanPipeline": "wan", "WanImageToVideoPipeline": "wan",
                     "LTXPipeline": "ltxv", "LTXImageToVideoPipeline": "ltxv", "CogVideoXPipeline": "cogvideox",
                     "CogVideoXImageToVideoPipeline": "cogvideox", "MochiPipeline": "mochi"}


def _detect_pipeline(h: ModelHeader) -> Detection:
    cls = str(h.config.get("_class_name", ""))
    main = h.components.get("transformer") or h.components.get("unet")
    det = None
    if main is not None and main.tensors:
        sub = _detect_tensors(main)
        if sub.role in ("diffusion_model", "checkpoint"):
            det = sub
    if det is None:
        family = _PIPELINE_CLASSES.get(cls)
        if family is None:
            return _unrecognised(h, f"diffusers pipeline {cls!r} with components {sorted(h.components)}")
        det = Detection(family, "", "checkpoint", "diffusers", "diffusers")
        det.notes.append("family from model_index.json only: the main component's weights were not readable")
    det.role, det.format, det.layout = "checkpoint", "diffusers", "diffusers"
    det.markers.append(f"model_index.json _class_name={cls}")
    if cls == "StableDiffusionXLImg2ImgPipeline" and h.config.get("requires_aesthetics_score"):
        det.variant = "refiner"
    if det.family == "flux" and main is not None and "guidance_embeds" in main.config:
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
    act = _ACTIVATIONS.get(det.family, 0.0) * GiB if det.role in ("checkpoint", "diffusion_model") else 0
    if det.role == "vae":
        act = GiB  # one tiled decode
    if det.role == "llm":
        act = _kv_cache_bytes(h) + 256 * (1 << 20)
    det.vram_bytes = int(gpu_weights + act)
    det.ram_bytes = int(weights + act + 512 * (1 << 20))  # plus the engine process itself


def _kv_cache_bytes(h: ModelHeader, ctx: int = 4096) -> int:
    """fp16 K and V for every layer at `ctx` tokens (or the model's context if shorter)."""
    if h.format == "gguf":
        arch = _gguf_arch(h)
        m = h.metadata
        layers, heads = m.get(f"{arch}.block_count", 0), m.get(f"{arch}.attention.head_count", 1)
        kv = m.get(f"{arch}.attention.head_count_kv", heads)
        head_dim = m.get(f"{arch}.attention.key_length") or m.get(f"{arch}.embedding_length", 0) // max(heads, 1)
        ctx = min(ctx, m.get(f"{arch}.context_length", ctx))
    else:
        c = h.config.get("text_config", h.config)
        layers, heads = c.get("num_hidden_layers", 0), c.get("num_attention_heads", 1)
        kv = c.get("num_key_value_heads", heads)
        head_dim = c.get("head_dim") or c.get("hidden_size", 0) // max(heads, 1)
        ctx = min(ctx, c.get("max_position_embeddings", ctx))
    try:
        return int(2 * layers * kv * head_dim * ctx * 2)
    except TypeError:  # metadata of the wrong type: no estimate rather than a crash
        return 0
