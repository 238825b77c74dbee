"""Stable Diffusion 1.x / 2.x / SDXL checkpoints: split a file or folder into UNet, VAE and CLIP encoders.

Layouts: single-file LDM/A1111 checkpoints (`model.diffusion_model.`, `first_stage_model.`,
`cond_stage_model.` / `conditioner.embedders.N.`), ComfyUI saves (same names), and diffusers
folders (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, scheduler/). The family is read
from the UNet's shapes, never from the file name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.engine.context import UserError
from studio.engine.quant import QuantWeight
from studio.models.clip import PREFIXES, ClipTextModel, build_clip, find_text_encoders
from studio.models.clip_tokenizer import ClipTokenizer
from studio.models.diffusion_quant import build_compact, is_compact
from studio.models.unet import UNet, UNetConfig, build_unet
from studio.models.vae import AutoencoderKL, load_vae

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
_COMPONENT_PREFIXES = ("first_stage_model.", "vae.", "cond_stage_model.", "conditioner.")  # all but the UNet


@dataclass
class SDModel:
    """Everything a Stable Diffusion job needs, built and ready on the CPU (placement is the pipeline's)."""

    family: str  # sd1, sd2, sdxl, sdxl_refiner
    unet: UNet
    vae: AutoencoderKL | None  # None only until a separate VAE file is loaded
    encoders: list[ClipTextModel]  # SD1: [CLIP-L]; SD2: [OpenCLIP-H]; SDXL: [CLIP-L, CLIP-G]; refiner: [CLIP-G]
    tokenizers: list[ClipTokenizer]
    prediction: str  # "eps" or "v"
    path: str
    notes: list[str] = field(default_factory=list)
    original: dict[str, torch.Tensor] = field(default_factory=dict)  # weights a LoRA replaced, to restore
    loras: tuple = ()  # ((path, weight), ...) currently applied

    @property
    def inpaint(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def latent_family(self) -> str:
        """The latent space (preview factors, VAE scaling): the refiner shares SDXL's."""
        return "sdxl" if self.family.startswith("sdxl") else self.family


def family_of(cfg: UNetConfig) -> str:
    if cfg.adm_in_channels == 2816:
        return "sdxl"
    if cfg.adm_in_channels == 2560:
        return "sdxl_refiner"
    if cfg.adm_in_channels:
        raise UserError("unsupported", f"This UNet takes a {cfg.adm_in_channels}-wide class embedding, which no "
                        "supported SD family uses (SD1, SD2, SDXL base and refiner are supported).")
    if cfg.context_dim == 1024:
        return "sd2"
    if cfg.context_dim == 768:
        return "sd1"
    raise UserError("unsupported", f"A UNet with {cfg.context_dim}-wide text conditioning is not SD1, SD2 or SDXL.")


def _family_from_encoders(sd: dict[str, torch.Tensor]) -> str | None:
    """Which text encoders a single file carries tells its family (marker keys, not shapes)."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    if has(PREFIXES["sdxl_g"]):
        return "sdxl"
    if has(PREFIXES["sdxl_refiner_g"]):
        return "sdxl_refiner"
    if has(PREFIXES["sd2"]):
        return "sd2"
    if has(PREFIXES["sd1"]):
        return "sd1"
    return None


def read_state_dict(path: Path, compact: bool = False) -> dict[str, torch.Tensor]:
    """Memory-mapped tensors of a .safetensors file; pickles only through the weights-only loader.

    GGUF and fp8 files come dequantized, or with compact=True as stored (see studio.models.diffusion_quant).
    """
    from studio.engine.weights import load_weights

    try:
        return load_weights(path, compact=compact)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError("bad_model", f"Cannot read {path.name}: {exc}. The file may be damaged or incomplete: "
                        "download it again.") from None


def load_sd(path: str | Path, vae_path: str | Path | None = None, dtype: torch.dtype = torch.float32,
            prediction: str = "auto") -> SDModel:
    """Load a checkpoint file or diffusers folder; `vae_path` (a VAE file or folder) overrides its VAE."""
    path = Path(path)
    if path.is_dir():
        model = _load_folder(path, dtype)
    else:
        model = _load_single_file(path, dtype, need_vae=not vae_path)
    if vae_path:
        vae_sd = _read_component(Path(vae_path))
        try:
            model.vae = load_vae(vae_sd, family=model.latent_family, dtype=dtype)
        except (ValueError, KeyError) as exc:
            raise UserError("bad_model", f"{Path(vae_path).name} is not a VAE for {model.family}: {exc}") from None
        model.notes.append(f"VAE from {Path(vae_path).name}")
    model.prediction = _prediction(model, prediction)
    return model


def _read_component(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError("bad_model", f"{path} holds no .safetensors weights.")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(read_state_dict(f))
        return sd
    return read_state_dict(path)


def _build_unet(sd: dict, dtype: torch.dtype) -> UNet:
    """build_unet, keeping a quantized file's Linear weights as stored (GGUF blocks, fp8 + scale)."""
    if not is_compact(sd):
        return build_unet(sd, dtype=dtype)
    from studio.models.unet_convert import to_ours

    sd = to_ours(sd)
    cfg = UNetConfig.from_state_dict(sd)
    model, missing, unexpected = build_compact(lambda: UNet(cfg), sd, dtype=dtype)
    if missing or unexpected:
        raise ValueError(f"UNet weights do not match the model shape: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)})")
    return model


def _load_single_file(path: Path, dtype: torch.dtype, need_vae: bool = True) -> SDModel:
    sd = read_state_dict(path, compact=True)
    try:
        unet = _build_unet(sd, dtype)
    except ValueError as exc:
        raise UserError("bad_model", f"{path.name} has no Stable Diffusion UNet that Studio can load ({exc}). "
                        "Is it a LoRA, a VAE or a text encoder? Pick a full checkpoint.") from None
    family = _family_from_encoders(sd) or family_of(unet.config)
    if family.startswith("sdxl") != bool(unet.config.adm_in_channels):
        raise UserError("bad_model", f"{path.name} mixes parts of different models: its text encoders are "
                        f"{family}'s but its UNet {'is' if unet.config.adm_in_channels else 'is not'} SDXL's.")
    if is_compact(sd):
        # an fp8 checkpoint's VAE and text encoders are small next to its UNet: plain tensors
        sd = {k: v.dequantize(dtype) if isinstance(v, QuantWeight) and k.startswith(_COMPONENT_PREFIXES) else v
              for k, v in sd.items()}
    vae_keys = {k: v for k, v in sd.items() if k.startswith(("first_stage_model.", "vae."))}
    if not vae_keys and need_vae:
        raise UserError("bad_model", f"{path.name} has a UNet but no VAE. Choose a VAE file in the VAE picker "
                        "(or pass --vae).")
    vae = load_vae(vae_keys, family="sdxl" if family.startswith("sdxl") else family, dtype=dtype) if vae_keys else None
    wanted = {"sd1": ["sd1"], "sd2": ["sd2"], "sdxl": ["sdxl_l", "sdxl_g"], "sdxl_refiner": ["sdxl_refiner_g"]}[family]
    encoders = []
    for key in wanted:
        prefix = PREFIXES[key]
        if not any(k.startswith(prefix) for k in sd):
            found = find_text_encoders(sd)
            raise UserError("bad_model", f"{path.name} looks like {family} but its text encoder is missing "
                            f"(no keys under {prefix!r}; found {found or 'none'}). UNet-only files need the "
                            "text encoders from the full checkpoint.")
        encoders.append(build_clip(sd, prefix=prefix, dtype=dtype))
    tokenizers = [ClipTokenizer.bundled(pad_id=None if enc.config.width == 768 else 0) for enc in encoders]
    model = SDModel(family, unet, vae, encoders, tokenizers, "eps", str(path))
    model._metadata = _safetensors_metadata(path)  # type: ignore[attr-defined]
    model._v_key = "v_pred" in sd  # type: ignore[attr-defined]  # ComfyUI marks v models with this key
    return model


def _load_folder(path: Path, dtype: torch.dtype) -> SDModel:
    if not (path / "unet").is_dir():
        raise UserError("bad_model", f"{path} is not a diffusers Stable Diffusion folder (no unet/ inside).")
    unet = build_unet(_read_component(path / "unet"), dtype=dtype)
    family = _family_from_folder(path) or family_of(unet.config)
    vae = load_vae(_read_component(path / "vae"), family="sdxl" if family.startswith("sdxl") else family, dtype=dtype)
    encoders, tokenizers = [], []
    names = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
             "sdxl_refiner": ["text_encoder_2"]}[family]
    for name in names:
        enc_sd = _read_component(path / name)
        enc = build_clip(enc_sd, prefix="" if "text_model.embeddings.token_embedding.weight" in enc_sd else None,
                         dtype=dtype)
        encoders.append(enc)
        tok_dir = path / name.replace("text_encoder", "tokenizer")
        tokenizers.append(ClipTokenizer.load(tok_dir, pad_id=None if enc.config.width == 768 else 0))
    model = SDModel(family, unet, vae, encoders, tokenizers, "eps", str(path))
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        try:
            model._metadata = {"prediction_type": json.loads(sched.read_text()).get("prediction_type", "")}  # type: ignore[attr-defined]
        except (OSError, ValueError):
            pass
    return model


def _family_from_folder(path: Path) -> str | None:
    """SDXL folders have text_encoder_2 (the refiner only that one); SD1 uses OpenAI CLIP (quick_gelu),
    SD2 OpenCLIP (gelu)."""
    one, two = (path / "text_encoder").is_dir(), (path / "text_encoder_2").is_dir()
    if two:
        return "sdxl" if one else "sdxl_refiner"
    config = path / "text_encoder" / "config.json"
    if one and config.is_file():
        try:
            act = json.loads(config.read_text()).get("hidden_act", "")
        except (OSError, ValueError):
            return None
        return "sd1" if act == "quick_gelu" else "sd2"
    return None


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            return fh.metadata() or {}
    except Exception:  # metadata is a hint only; a file safetensors can't open failed earlier anyway
        return {}


def _prediction(model: SDModel, requested: str) -> str:
    if requested in ("eps", "v"):
        return requested
    if requested != "auto":
        raise UserError("bad_input", f"prediction {requested!r} is not one of auto, eps, v.")
    meta = getattr(model, "_metadata", {}) or {}
    hint = str(meta.get("prediction_type") or meta.get("modelspec.prediction_type") or "").lower()
    if hint in ("v_prediction", "v"):
        return "v"
    if hint in ("epsilon", "eps"):
        return "eps"
    if getattr(model, "_v_key", False):
        return "v"
    if model.family == "sd2":
        return "v" if _sd2_predicts_v(model.unet) else "eps"
    return "eps"


@torch.no_grad()
def _sd2_predicts_v(unet: UNet) -> bool:
    """SD2 768-v and 512-base share one architecture; a v model answers a flat input at t=999 with a
    strongly negative offset (the test A1111 uses). 8x8 latents make it cost milliseconds."""
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    ctx = torch.full((1, 2, unet.config.context_dim), 0.5, dtype=param.dtype, device=param.device)
    out = unet(x, torch.tensor([999.0], device=param.device), ctx)
    return float((out.float() - x.float()).mean()) < -1
