"""Marker keys and shapes of each model family and component: the tables detection decides by.

Each function looks at a set of tensor names and shapes (with any ComfyUI prefix removed) and
returns what it recognised, recording in `_Keys.used` the keys that decided it, so `studio models
info` can say why. detect.py puts them together; nothing here reads files or names.
"""

from __future__ import annotations

import re

from studio import families as F


class Keys:
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

def _context_dim(k: Keys) -> int:
    key = k.find(r"(input_blocks|down_blocks)\.\d+\.(\d+|attentions\.\d+)\.transformer_blocks\.0\.attn2\.to_k\.weight")
    return k.dim(key, 1) if key else -1


def _unet(k: Keys) -> tuple[str, str, list[str]] | None:
    ldm = k.has("input_blocks.0.0.weight", "out.2.weight")
    dif = not ldm and k.has("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight")
    if not (ldm or dif):
        return None
    ctx = _context_dim(k)
    label = k.shape("label_emb.0.0.weight") if ldm else k.shape("add_embedding.linear_1.weight")
    in_ch = k.dim("input_blocks.0.0.weight" if ldm else "conv_in.weight", 1)
    notes = [f"inpainting UNet ({in_ch} input channels)"] if in_ch == 9 else []
    if label[1:] == (2816,) or ctx == 2048:
        return F.SDXL, "base", notes
    if label[1:] == (2560,) or ctx == 1280:
        return F.SDXL, "refiner", notes
    if ctx == 1024:
        return F.SD2, "2.x", notes
    if ctx == 768:
        return F.SD1, "1.x", notes
    return None


def _sd3(k: Keys) -> tuple[str, str, list[str]] | None:
    if k.has("joint_blocks.0.context_block.adaLN_modulation.1.bias"):
        hidden = k.dim("joint_blocks.0.context_block.adaLN_modulation.1.bias", 0) // 6
        tokens = k.dim("pos_embed", 1)
    elif k.has("transformer_blocks.0.ff_context.net.0.proj.weight", "pos_embed.pos_embed"):
        hidden = k.dim("pos_embed.proj.weight", 0)
        tokens = k.dim("pos_embed.pos_embed", 1)
    else:
        return None
    if hidden == 2432:
        return F.SD3, "3.5-large", ["3.5 Large and Large Turbo share shapes; turbo wants ~4 steps, CFG 1"]
    if tokens == 147456:
        return F.SD3, "3.5-medium", []
    return F.SD3, "3-medium" if tokens == 36864 else f"hidden {hidden}", []


def _flux(k: Keys) -> tuple[str, str, list[str]] | None:
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
    return F.FLUX, variant + extra, notes


def _pixart_sana(k: Keys) -> tuple[str, str, list[str]] | None:
    if k.has("blocks.0.cross_attn.q_linear.weight"):
        if k.has("blocks.0.mlp.inverted_conv.conv.weight"):
            hidden = k.dim("x_embedder.proj.weight", 0)
            return F.SANA, {1152: "600M", 2240: "1.6B"}.get(hidden, f"hidden {hidden}"), []
        if k.has("blocks.0.mlp.fc1.weight"):
            tokens = k.dim("y_embedder.y_embedding", 0)
            return F.PIXART, {120: "alpha", 300: "sigma"}.get(tokens, "unknown"), []
        return None
    if k.has("transformer_blocks.0.ff.conv_inverted.weight", "caption_projection.linear_1.weight"):
        hidden = k.dim("patch_embed.proj.weight", 0)
        return F.SANA, {1152: "600M", 2240: "1.6B"}.get(hidden, f"hidden {hidden}"), []
    if k.has("adaln_single.linear.weight", "pos_embed.proj.weight", "transformer_blocks.0.attn2.to_k.weight"):
        return F.PIXART, "alpha or sigma", ["diffusers layout; the pipeline config says which"]
    return None


def _wan(k: Keys) -> tuple[str, str, list[str]] | None:
    if k.has("head.modulation", "patch_embedding.weight"):
        image = k.has("img_emb.proj.1.weight")
    elif k.has("condition_embedder.time_embedder.linear_1.weight", "patch_embedding.weight"):
        image = k.has("condition_embedder.image_embedder.ff.net.0.proj.weight")
    else:
        return None
    dim, in_ch = k.dim("patch_embedding.weight", 0), k.dim("patch_embedding.weight", 1)
    if dim == 3072 and in_ch == 48:
        return F.WAN, "2.2-ti2v-5B", ["text and image to video, 48-channel Wan 2.2 VAE"]
    size = {1536: "1.3B", 5120: "14B"}.get(dim, f"dim {dim}")
    if in_ch == 36:
        return F.WAN, f"i2v-{size}", ["Wan 2.1 I2V (CLIP image input)" if image else
                                      "image-to-video without CLIP input: a Wan 2.2 I2V expert"]
    notes = ["Wan 2.1 and 2.2 T2V 14B experts have the same shapes"] if dim == 5120 else []
    return F.WAN, f"t2v-{size}", notes


def _ltxv(k: Keys) -> tuple[str, str, list[str]] | None:
    if k.has("patchify_proj.weight", "adaln_single.emb.timestep_embedder.linear_1.weight"):
        pass
    elif not (k.has("proj_in.weight", "scale_shift_table", "transformer_blocks.0.attn1.norm_q.weight")
              and len(k.shape("proj_in.weight")) == 2):
        return None
    blocks = k.count(r"transformer_blocks\.(\d+)\.")
    return F.LTXV, {28: "2B", 48: "13B"}.get(blocks, f"{blocks} blocks"), []


def _cogvideox(k: Keys) -> tuple[str, str, list[str]] | None:
    if not k.has("patch_embed.text_proj.weight", "transformer_blocks.0.norm1.linear.weight"):
        return None
    s = k.shape("patch_embed.proj.weight")
    size = {1920: "2B", 3072: "5B"}.get(s[0] if s else -1, "unknown size")
    if len(s) == 2:
        return F.COGVIDEOX, f"1.5-{size}", ["CogVideoX 1.5 (temporal patches)"]
    return F.COGVIDEOX, f"{'i2v' if len(s) > 1 and s[1] == 32 else 't2v'}-{size}", []


def _mochi(k: Keys) -> tuple[str, str, list[str]] | None:
    if k.has("blocks.0.attn.qkv_x.weight") or k.has("pos_frequencies", "patch_embed.proj.weight"):
        return F.MOCHI, "1-preview", []
    return None


DIFFUSION_DETECTORS = (_flux, _sd3, _wan, _ltxv, _mochi, _cogvideox, _pixart_sana, _unet)


# ---------------------------------------------------------------------------
# VAEs, text encoders, LoRA, ControlNet.

def vae(k: Keys) -> tuple[str, str, list[str], list[str]] | None:
    if k.has("decoder.middle.0.residual.0.gamma") or k.has("encoder.mid_block.resnets.0.norm1.gamma"):
        z = k.dim("conv1.weight", 0) // 2 if "conv1.weight" in k.shapes else k.dim("quant_conv.weight", 0) // 2
        if z == 48:
            return "wan-vae", "2.2", [F.WAN], ["48 latent channels: Wan 2.2 TI2V 5B"]
        return "wan-vae", "2.1", [F.WAN], ["16 latent channels: Wan 2.1 and Wan 2.2 14B"]
    ldm = k.has("encoder.conv_in.weight", "decoder.conv_out.weight")
    if not ldm:
        return None
    z = k.dim("encoder.conv_out.weight", 0) // 2
    if z == 4:
        return ("vae-kl-f8", "sd/sdxl", [F.SD1, F.SD2, F.SDXL, F.PIXART],
                ["SD1.x/2.x and SDXL VAEs have the same shapes; the weights differ (SDXL scale 0.13025)"])
    if z == 16:
        return ("vae-16ch", "sd3/flux", [F.SD3, F.FLUX],
                ["SD3 and Flux VAEs have the same shapes; the weights differ"])
    return "vae", f"{z} latent channels", [], []


def taesd(k: Keys) -> tuple[str, str, list[str], list[str]] | None:
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
            return "taesd", "16ch (TAESD3/TAEF1)", [F.SD3, F.FLUX], notes
        if z == 4:
            return "taesd", "4ch (TAESD/TAESDXL)", [F.SD1, F.SD2, F.SDXL], \
                notes + ["TAESD and TAESDXL have the same shapes"]
        return "taesd", f"{z}ch", [], notes
    return None


def text_encoder(k: Keys) -> tuple[str, str, list[str], list[str]] | None:
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
        return ("umt5", size, [F.WAN], []) if umt5 else ("t5", size, [F.SD3, F.FLUX, F.PIXART, F.LTXV,
                                                                      F.COGVIDEOX, F.MOCHI], [])
    elif k.has("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight"):
        return "umt5", "xxl", [F.WAN], ["Wan's original umT5 layout"]
    else:
        return None
    if width == 768:
        return "clip-l", f"{layers} layers", [F.SD1, F.SDXL, F.SD3, F.FLUX], []
    if width == 1280:
        return "clip-g", f"{layers} layers", [F.SDXL, F.SD3], []
    if width == 1024:
        return "clip-h", f"{layers} layers", [F.SD2], ["OpenCLIP ViT-H text encoder (SD2.x)"]
    return "clip", f"width {width}", [], []


def image_encoder(k: Keys) -> tuple[str, str, list[str], list[str]] | None:
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
        return "clip-vision-h", "ViT-H/14", [F.WAN], ["the image encoder Wan 2.1 image-to-video needs"]
    return "clip-vision", f"width {width}, {layers} layers", [], []


def controlnet(k: Keys) -> tuple[str, str] | None:
    if k.has("control_model.input_hint_block.0.weight") or k.has("control_model.time_embed.0.weight"):
        sub = Keys(k.shapes, "control_model.")
        if sub.has("label_emb.0.0.weight"):
            return F.SDXL, "ldm"
        ctx = _context_dim(sub)
        return {768: F.SD1, 1024: F.SD2, 2048: F.SDXL}.get(ctx, "unknown"), "ldm"
    if k.has("controlnet_cond_embedding.conv_in.weight"):
        if k.has("add_embedding.linear_1.weight"):
            return F.SDXL, "diffusers"
        return {768: F.SD1, 1024: F.SD2, 2048: F.SDXL}.get(_context_dim(k), "unknown"), "diffusers"
    if k.has("controlnet_blocks.0.weight"):
        if k.has("controlnet_x_embedder.weight") or k.has("controlnet_single_blocks.0.weight"):
            return F.FLUX, "diffusers"
        if k.has("pos_embed.proj.weight"):
            return F.SD3, "diffusers"
    return None
