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

from studio.errors import UserError
from studio.models.clip import PREFIXES, ClipTextModel, build_clip, find_text_encoders
from studio.models.clip_tokenizer import ClipTokenizer
from studio.models.diffusion_quant import build_compact, is_compact
from studio.models.unet import UNet, UNetConfig, build_unet
from studio.models.vae import AutoencoderKL, load_vae
from studio.models.weights_io import load_weights
from studio.nn.packed import QuantWeight

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
    # DiscreteSchedule.from_betas arguments from a folder's scheduler config; empty: SD's own schedule
    betas: dict[str, Any] = field(default_factory=dict)

    @property
    def inpaint(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def latent_family(self) -> str:
        """The latent space (preview factors, VAE scaling): the refiner shares SDXL's."""
        return "sdxl" if self.family.startswith("sdxl") else self.family


def family_of(cfg: UNetConfig) -> str:
    """From the UNet's shapes: the released widths first, then the structure they imply (toy and pruned
    models): SDXL's class embedding is CLIP-G's pooled output plus 6 (base: size, crop, target) or
    5 (refiner: size, crop, aesthetic score) 256-wide Fourier features, and the refiner's text context
    is CLIP-G's alone; SD2 projects attention in and out with Linear layers, SD1 with 1x1 convs."""
    adm, ctx = cfg.adm_in_channels, cfg.context_dim
    if adm == 2816:
        return "sdxl"
    if adm == 2560:
        return "sdxl_refiner"
    if adm and adm - 5 * 256 == ctx:
        return "sdxl_refiner"
    if adm and 0 < adm - 6 * 256 < ctx:
        return "sdxl"
    if adm:
        raise UserError("unsupported", f"This UNet takes a {adm}-wide class embedding, which no "
                        "supported SD family uses (SD1, SD2, SDXL base and refiner are supported).")
    if ctx == 1024:
        return "sd2"
    if ctx == 768:
        return "sd1"
    return "sd2" if cfg.use_linear_projection else "sd1"


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
    try:
        return load_weights(path, compact=compact)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError("bad_model", f"Cannot read {path.name}: {exc}. The file may be damaged or incomplete: "
                        "download it again.") from None


def load_sd(path: str | Path, vae_path: str | Path | None = None, dtype: torch.dtype = torch.float32,
            prediction: str = "auto", text_encoders: list | tuple = ()) -> SDModel:
    """Load a checkpoint file or diffusers folder; `vae_path` (a VAE file or folder) overrides its VAE.

    `text_encoders`: CLIP text encoder files for a UNet-only file (they replace a full file's own);
    each one's role is read from its shapes. Without them, a file that lacks its VAE or text encoders
    takes them from ComfyUI's folders beside its own (models/clip, models/text_encoders, models/vae).
    """
    path = Path(path)
    given = [Path(p) for p in text_encoders]
    if path.is_dir():
        if given:
            raise UserError("bad_input", f"{path.name} is a diffusers folder with its own text encoders: "
                            "text encoder files go with single-file models. Leave them out.")
        model = _load_folder(path, dtype)
    else:
        model = _load_single_file(path, dtype, need_vae=not vae_path, text_encoders=given)
    if vae_path:
        try:
            model.vae = load_vae_component(Path(vae_path), model.latent_family, dtype)
        except (ValueError, KeyError) as exc:
            raise UserError("bad_model", f"{Path(vae_path).name} is not a VAE for {model.family}: {exc}") from None
        model.notes.insert(0, f"VAE from {Path(vae_path).name}")
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


def _load_single_file(path: Path, dtype: torch.dtype, need_vae: bool = True,
                      text_encoders: list[Path] | None = None) -> SDModel:
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
    latent = "sdxl" if family.startswith("sdxl") else family
    notes = []
    vae_keys = {k: v for k, v in sd.items() if k.startswith(("first_stage_model.", "vae."))}
    vae = load_vae(vae_keys, family=latent, dtype=dtype) if vae_keys else None
    vae_file = _find_vae(path, latent) if vae is None and need_vae else None

    slots = _encoder_slots(family, unet.config)
    inside = [any(k.startswith(slot.prefix) for k in sd) for slot in slots]
    if text_encoders:
        files = _match_given(path, family, slots, text_encoders)
    else:
        files = [None] * len(slots) if all(inside) else _find_encoders(path, slots, inside, notes)
    missing = [slot for slot, f, i in zip(slots, files, inside, strict=True) if f is None and not i]
    no_vae = need_vae and vae is None and vae_file is None
    if missing or no_vae:
        raise _missing_parts(path, family, no_vae, missing)

    if vae_file is not None:
        try:
            vae = load_vae(read_state_dict(vae_file), family=latent, dtype=dtype)
        except (ValueError, KeyError) as exc:
            raise UserError("bad_model", f"{vae_file} is not a VAE for {family}: {exc}. Pass --vae FILE.") from None
        notes.insert(0, f"VAE from {vae_file.name} (found in {vae_file.parent})")
    encoders = []
    for slot, found in zip(slots, files, strict=True):
        if found is None:
            encoders.append(build_clip(sd, prefix=slot.prefix, dtype=dtype))
            continue
        try:
            encoders.append(build_clip(read_state_dict(found.path), prefix=found.prefix, dtype=dtype))
        except (ValueError, KeyError) as exc:
            raise UserError("bad_model", f"{found.path.name} looked like a {_ROLES[slot.role][1]} but does not "
                            f"load as one ({exc}). The file may be damaged: download it again.") from None
        if text_encoders:
            notes.append(f"{_ROLES[slot.role][1]} from {found.path.name}")
    tokenizers = [ClipTokenizer.bundled(pad_id=None if enc.config.width == 768 else 0) for enc in encoders]
    model = SDModel(family, unet, vae, encoders, tokenizers, "eps", str(path), notes=notes)
    model._metadata = _safetensors_metadata(path)  # type: ignore[attr-defined]
    model._v_key = "v_pred" in sd  # type: ignore[attr-defined]  # ComfyUI marks v models with this key
    return model


# ------------------------------------------------------------------------------ separate component files
# A ComfyUI `models/unet` or `models/diffusion_models` file holds the UNet alone; the VAE and the CLIP
# text encoders come from their own files, whose roles are read from their shapes, never their names.

# what the messages call each text encoder: (ComfyUI's file name for it, what it is)
_ROLES = {
    "clip_l": ("clip_l.safetensors", "CLIP ViT-L text encoder"),
    "clip_h": ("an OpenCLIP ViT-H text encoder file", "OpenCLIP ViT-H text encoder"),
    "clip_g": ("clip_g.safetensors", "OpenCLIP ViT-bigG text encoder"),
}
_WIDTHS = {768: "CLIP ViT-L (SD1, SDXL)", 1024: "OpenCLIP ViT-H (SD2)", 1280: "OpenCLIP ViT-bigG (SDXL)"}
_WEIGHT_FILES = (".safetensors", ".sft", ".gguf")  # formats whose headers name every tensor's shape


@dataclass(frozen=True)
class _Slot:
    role: str  # clip_l, clip_h, clip_g
    prefix: str  # where a full single file keeps this encoder
    width: int  # the hidden width the UNet's shapes ask of it


@dataclass(frozen=True)
class _EncoderFile:
    path: Path
    prefix: str  # of the encoder's keys inside the file ("" for ComfyUI's clip_l / clip_g files)
    width: int
    projection: bool  # has a text_projection (SDXL's CLIP-G; SD3's CLIP-L has one too)


def _encoder_slots(family: str, cfg: UNetConfig) -> list[_Slot]:
    """The text encoders the UNet reads, in the order SDModel.encoders keeps them.

    SDXL's context is CLIP-L's and CLIP-G's hidden states side by side, and its class embedding starts
    with CLIP-G's pooled output (as wide as CLIP-G itself in the released model): 2048 = 768 + 1280."""
    if family == "sdxl":
        g = cfg.adm_in_channels - 6 * 256
        return [_Slot("clip_l", PREFIXES["sdxl_l"], cfg.context_dim - g), _Slot("clip_g", PREFIXES["sdxl_g"], g)]
    role = {"sd1": "clip_l", "sd2": "clip_h", "sdxl_refiner": "clip_g"}[family]
    return [_Slot(role, PREFIXES["sdxl_refiner_g" if family == "sdxl_refiner" else family], cfg.context_dim)]


def _encoder_file(path: Path) -> _EncoderFile | None:
    """The one CLIP text encoder a file holds, from its header alone (no tensor data); None otherwise."""
    from studio.library.headers import read_header

    tensors = read_header(path).tensors
    found = find_text_encoders(tensors)  # type: ignore[arg-type]  # only the names are looked at
    if len(found) != 1:
        return None
    p = found[0]
    for name in ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight",
                 "token_embedding.weight"):
        if p + name in tensors:
            width = tensors[p + name].shape[-1]  # (vocab, width)
            projection = p + "text_projection.weight" in tensors or p + "text_projection" in tensors
            return _EncoderFile(path, p, width, projection)
    return None


def _assign(slots: list[_Slot], files: list[_EncoderFile]) -> list[_EncoderFile | None]:
    """Each slot takes a file of its width. Real CLIP-L, -H and -G differ in width; toy models can give
    L and G one width, and then G is the one with a text projection."""
    left, chosen = list(files), []
    for slot in slots:
        fits = sorted((f for f in left if f.width == slot.width), key=lambda f: f.projection != (slot.role == "clip_g"))
        chosen.append(fits[0] if fits else None)
        if fits:
            left.remove(fits[0])
    return chosen


def _needs(family: str, slots: list[_Slot]) -> str:
    return f"this {family} model reads " + " and ".join(f"a {_ROLES[s.role][1]} ({s.width} wide)" for s in slots)


def _match_given(path: Path, family: str, slots: list[_Slot], given: list[Path]) -> list[_EncoderFile | None]:
    from studio.library.headers import HeaderError

    files = []
    for f in given:
        try:
            enc = _encoder_file(f)
        except (HeaderError, OSError) as exc:
            raise UserError("bad_model", f"Cannot read the text encoder {f.name}: {exc}") from None
        if enc is None:
            raise UserError("bad_model", f"{f.name} is not a CLIP text encoder file (one text_model or OpenCLIP "
                            f"text tower): {_needs(family, slots)}.")
        files.append(enc)
    chosen = _assign(slots, files)
    for enc in files:
        if enc not in chosen:
            kind = _WIDTHS.get(enc.width, "a text encoder no SD family uses")
            raise UserError("bad_model", f"{enc.path.name} is a {enc.width}-wide text encoder ({kind}), but "
                            f"{_needs(family, slots)}. Leave it out or pick the matching file.")
    return chosen


def _component_dirs(path: Path, names: tuple[str, ...]) -> list[Path]:
    """ComfyUI's folders beside the model's own: models/unet/x.safetensors -> models/clip, ..."""
    return [path.parent.parent / n for n in names if (path.parent.parent / n).is_dir()]


def _weight_files(folders: list[Path]) -> list[Path]:
    return [f for d in folders for f in sorted(d.rglob("*")) if f.suffix.lower() in _WEIGHT_FILES and f.is_file()]


def _find_encoders(path: Path, slots: list[_Slot], inside: list[bool], notes: list[str]) -> list[_EncoderFile | None]:
    """Text encoders the single file lacks, from models/text_encoders and models/clip (headers only)."""
    from studio.library.headers import HeaderError

    files = []
    for f in _weight_files(_component_dirs(path, ("text_encoders", "clip"))):
        try:
            enc = _encoder_file(f)
        except (HeaderError, OSError):
            continue  # a damaged or foreign file among the user's encoders is not this model's problem
        if enc is not None:
            files.append(enc)
    wanted = [s for s, i in zip(slots, inside, strict=True) if not i]
    found = iter(_assign(wanted, files))
    chosen = [None if i else next(found) for i in inside]
    for slot, enc in zip(slots, chosen, strict=True):
        if enc is not None:
            others = sum(f.width == enc.width for f in files) - 1
            notes.append(f"{_ROLES[slot.role][1]} from {enc.path.name} (found in {enc.path.parent}"
                         + (f"; {others} more fit: pass --text-encoder to choose)" if others > 0 else ")"))
    return chosen


def _is_sd_vae(tensors: dict) -> bool:
    """A KL-f8 VAE with 4 latent channels (SD1, SD2, SDXL), in LDM or diffusers names, alone in its file."""
    for p in ("", "first_stage_model.", "vae."):
        conv = tensors.get(p + "decoder.conv_in.weight")
        if conv is not None and len(conv.shape) == 4 and conv.shape[1] == 4 and p + "post_quant_conv.weight" in tensors:
            return all(k.startswith(p) and not k.startswith("model.") for k in tensors)
    return False


def _find_vae(path: Path, latent: str) -> Path | None:
    """The VAE in models/vae, if exactly one there fits (SD1's and SDXL's VAEs have the same shapes)."""
    from studio.library.headers import HeaderError, read_header

    fits = []
    for f in _weight_files(_component_dirs(path, ("vae",))):
        try:
            if _is_sd_vae(read_header(f).tensors):
                fits.append(f)
        except (HeaderError, OSError):
            continue
    if len(fits) > 1:
        raise UserError("bad_model", f"{path.name} has no VAE of its own, and {len(fits)} VAE files in "
                        f"{fits[0].parent} fit it ({', '.join(f.name for f in fits[:4])}): choose the {latent} "
                        "one in the VAE picker (or pass --vae FILE).")
    return fits[0] if fits else None


def _missing_parts(path: Path, family: str, vae: bool, slots: list[_Slot]) -> UserError:
    models = path.parent.parent
    parts, fixes = [], []
    if vae:
        parts.append("no VAE")
        fixes.append(f"put a VAE file for {family} in {models / 'vae'} or choose one in the VAE picker (--vae FILE)")
    for slot in slots:
        name, what = _ROLES[slot.role]
        parts.append(f"no {what}")
        wide = f", {slot.width} wide" if slot.width > 0 else ""
        fixes.append(f"put {name} ({what}{wide}) in {models / 'clip'} or pass --text-encoder FILE")
    listed = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return UserError("bad_model", f"{path.name} has a UNet but {listed}. To run this {family} model, "
                     + "; ".join(fixes) + ".")


def _load_folder(path: Path, dtype: torch.dtype) -> SDModel:
    """Each component's config.json decides what its shapes cannot (studio.models.diffusers_config)."""
    from studio.models import diffusers_config as dc

    if not (path / "unet").is_dir():
        raise UserError("bad_model", f"{path} is not a diffusers Stable Diffusion folder (no unet/ inside).")
    unet_cfg = dc.read_config(path / "unet")
    unet = _config_fitted("unet", lambda: build_unet(_read_component(path / "unet"), dtype=dtype,
                                                     **(dc.unet_settings(unet_cfg) if unet_cfg else {})))
    family = _family_from_folder(path) or family_of(unet.config)
    vae = load_vae_component(path / "vae", "sdxl" if family.startswith("sdxl") else family, dtype)
    encoders, tokenizers = [], []
    names = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
             "sdxl_refiner": ["text_encoder_2"]}[family]
    for name in names:
        enc_sd = _read_component(path / name)
        enc_cfg = dc.read_config(path / name)
        settings = dc.clip_settings(enc_cfg) if enc_cfg else {}
        enc = _config_fitted(name, lambda sd=enc_sd, s=settings: build_clip(
            sd, prefix="" if "text_model.embeddings.token_embedding.weight" in sd else None, dtype=dtype, **s))
        encoders.append(enc)
        tok_dir = path / name.replace("text_encoder", "tokenizer")
        tokenizers.append(ClipTokenizer.load(tok_dir, pad_id=None if enc.config.width == 768 else 0))
    model = SDModel(family, unet, vae, encoders, tokenizers, "eps", str(path))
    sched_cfg = dc.read_config(path / "scheduler", "scheduler_config.json")
    if sched_cfg:
        sched = dc.scheduler_settings(sched_cfg)
        model._metadata = {"prediction_type": sched["prediction"]}  # type: ignore[attr-defined]
        model.betas = sched["betas"]
    return model


def load_vae_component(path: Path, family: str, dtype: torch.dtype) -> AutoencoderKL:
    """A VAE file or diffusers vae/ folder; a folder's config.json sets norm groups and latent scaling
    (a config's scaling_factor wins over the family's: it describes this VAE's latent space)."""
    from dataclasses import replace

    from studio.models import diffusers_config as dc

    config = dc.read_config(path)
    settings = dc.vae_settings(config) if config else {}
    groups = settings.pop("norm_num_groups", 32)
    vae = _config_fitted("vae", lambda: load_vae(_read_component(path), family=family, dtype=dtype,
                                                 norm_num_groups=groups))
    if settings:
        vae.cfg = replace(vae.cfg, **settings)
    return vae


def _config_fitted(component: str, build):
    """Shape errors after a config.json was applied mean the config and the weights disagree."""
    try:
        return build()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError("bad_model", f"The {component}/ weights do not fit a model Studio can build from them "
                        f"and their config.json ({str(exc)[:300]}): the folder is damaged or mixes two models. "
                        "Download it again.") from None


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
