"""The family catalog: everything Studio knows about each model family, as data, torch-free.

The UI, the CLI, the library and the engine read lists and defaults from here, so a family
name, a sampler list or a default size is written once. A family's detection markers live in
`studio.library.markers` (they need tensor shapes); the catalog names the families those
markers return, and `tests/test_families.py` holds the two in step.

Adding a diffusion family: one `Family(...)` entry below, its model file(s) under
`studio/models/`, its pipeline module under `studio/engine/pipelines/diffusion/`, its tests
(docs/ARCHITECTURE.md has the checklist).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Kind(str, enum.Enum):
    IMAGE = "image"
    VIDEO = "video"
    CHAT = "chat"
    ENCODER = "encoder"
    VAE = "vae"


# Samplers and schedules, with the labels A1111 writes in PNG parameters (the order is the UI's).
SAMPLER_LABELS: dict[str, str] = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE", "ddim": "DDIM", "lcm": "LCM",
}
SCHEDULE_LABELS: dict[str, str] = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM",
}
# ComfyUI uses k-diffusion's names; the ones that differ from ours.
COMFY_SAMPLER_NAMES: dict[str, str] = {"euler_ancestral": "euler_a", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
                                       "dpmpp_sde_gpu": "dpmpp_sde"}
FLOW_SAMPLER_LABELS: dict[str, str] = {"unipc": "UniPC", "euler": "Euler"}

DIFFUSION_SAMPLERS = tuple(SAMPLER_LABELS)
SCHEDULES = tuple(SCHEDULE_LABELS)
FLOW_SAMPLERS = tuple(FLOW_SAMPLER_LABELS)

PREDICTIONS = ("eps", "v", "flow")

# Weight-only quantization applied at load; GGUF and fp8 files keep their own packing.
QUANT_LABELS: dict[str, str] = {
    "": "Full precision", "int8": "int8 (half the VRAM)", "fp8": "fp8 (half, GPU)",
    "int4": "int4 (a quarter, lower quality)",
}
DIFFUSION_QUANT_MODES = ("int8", "fp8", "int4")
LLM_QUANT_MODES = ("int8", "int4")


@dataclass(frozen=True)
class Companion:
    """A part a family needs beside its main weights, and how to recognise it in the library."""

    role: str  # "text_encoder", "vae", "image_encoder"
    family: str  # the catalog id of the part (e.g. "clip_l", "umt5", or the family's own VAE)
    required: bool = True
    note: str = ""


@dataclass(frozen=True)
class Family:
    id: str
    label: str
    kind: Kind
    runs: bool  # Studio runs it today (detection also knows families it cannot run yet)
    prediction: str = ""  # eps | v | flow | "" (non-diffusion)
    latent_channels: int = 0
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    downsample: int = 8  # pixels per latent cell
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height); the first is the native size
    steps: int = 0
    cfg: float = 0.0
    sampler: str = ""
    schedule: str = ""
    samplers: tuple[str, ...] = ()
    schedules: tuple[str, ...] = ()
    shift: float = 0.0  # flow-matching time shift
    frames: int = 0  # video: default frame count
    fps: float = 0.0
    companions: tuple[Companion, ...] = ()
    quant_modes: tuple[str, ...] = ()
    activation_gib: float = 0.0  # rough activations at the native size on top of the weights
    pipeline: str = ""  # the module under studio/engine/pipelines/diffusion that runs it
    pipeline_classes: tuple[str, ...] = ()  # diffusers model_index.json `_class_name`s
    aliases: tuple[str, ...] = ()  # names the family has in other files (GGUF architecture, model_type)
    notes: tuple[str, ...] = field(default=())

    @property
    def size(self) -> tuple[int, int]:
        return self.sizes[0] if self.sizes else (0, 0)


_CLIP_L = Companion("text_encoder", "clip-l")
_CLIP_G = Companion("text_encoder", "clip-g")
_T5 = Companion("text_encoder", "t5")

SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
SD3 = "sd3"
FLUX = "flux"
PIXART = "pixart"
SANA = "sana"
WAN = "wan"
LTXV = "ltxv"
COGVIDEOX = "cogvideox"
MOCHI = "mochi"

_SD_COMMON = dict(kind=Kind.IMAGE, runs=True, pipeline="sd", latent_channels=4, steps=25, cfg=7.0, sampler="euler",
                  schedule="normal", samplers=DIFFUSION_SAMPLERS, schedules=SCHEDULES,
                  quant_modes=DIFFUSION_QUANT_MODES)

FAMILIES: dict[str, Family] = {f.id: f for f in (
    Family(SD1, "SD 1.x", prediction="eps", latent_scale=0.18215,
           sizes=((512, 512), (512, 768), (768, 512)), activation_gib=0.6,
           companions=(Companion("text_encoder", "clip-l", note="inside single-file checkpoints"),),
           pipeline_classes=("StableDiffusionPipeline",), **_SD_COMMON),
    # SD 2.x v-prediction models are the 768 ones; the eps 2.x base model is 512 (see `size_presets`).
    Family(SD2, "SD 2.x", prediction="v", latent_scale=0.18215,
           sizes=((768, 768), (768, 512), (512, 768)), activation_gib=0.8,
           companions=(Companion("text_encoder", "clip-h", note="inside single-file checkpoints"),),
           **_SD_COMMON),
    Family(SDXL, "SDXL", prediction="eps", latent_scale=0.13025,
           sizes=((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
                  (768, 1344), (1536, 640), (640, 1536)),
           activation_gib=1.5, companions=(_CLIP_L, _CLIP_G),
           pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"), **_SD_COMMON),
    Family(SD3, "SD 3 / 3.5", Kind.IMAGE, runs=True, pipeline="sd3", prediction="flow", latent_channels=16,
           latent_scale=1.5305, latent_shift=0.0609, sizes=((1024, 1024),), steps=28, cfg=4.5, sampler="euler",
           samplers=FLOW_SAMPLERS, shift=3.0, companions=(_CLIP_L, _CLIP_G, _T5), activation_gib=2.0,
           pipeline_classes=("StableDiffusion3Pipeline",)),
    # Flux dev is guidance-distilled: `cfg` is the value fed to its guidance embedding (3.5 as BFL and
    # diffusers default), one pass per step, no negative prompt; schnell ignores it and wants ~4 steps.
    Family(FLUX, "Flux.1", Kind.IMAGE, runs=True, pipeline="flux", prediction="flow", latent_channels=16,
           latent_scale=0.3611, latent_shift=0.1159, sizes=((1024, 1024), (1152, 896), (896, 1152), (1344, 768),
                                                            (768, 1344)),
           steps=28, cfg=3.5, sampler="euler", samplers=FLOW_SAMPLERS, companions=(_CLIP_L, _T5),
           activation_gib=3.0, pipeline_classes=("FluxPipeline",),
           notes=("dev: CFG is the distilled guidance (no negative prompt); schnell: 4 steps, guidance unused",)),
    Family(PIXART, "PixArt", Kind.IMAGE, runs=False, prediction="eps", latent_channels=4, latent_scale=0.13025,
           sizes=((1024, 1024),), companions=(_T5,), activation_gib=1.5,
           pipeline_classes=("PixArtAlphaPipeline", "PixArtSigmaPipeline")),
    Family(SANA, "SANA", Kind.IMAGE, runs=False, prediction="flow", latent_channels=32, downsample=32,
           sizes=((1024, 1024),), activation_gib=1.5, pipeline_classes=("SanaPipeline",)),
    Family(WAN, "Wan 2.x", Kind.VIDEO, runs=True, pipeline="wan", prediction="flow", latent_channels=16, downsample=8,
           sizes=((832, 480), (480, 832), (1280, 720), (720, 1280), (624, 624)), steps=30, cfg=5.0,
           sampler="unipc", samplers=FLOW_SAMPLERS, shift=5.0, frames=81, fps=16.0,
           companions=(Companion("text_encoder", "umt5"), Companion("vae", "wan-vae"),
                       Companion("image_encoder", "clip-vision-h", required=False,
                                 note="Wan 2.1 image-to-video only")),
           quant_modes=("fp8",), activation_gib=6.0,
           pipeline_classes=("WanPipeline", "WanImageToVideoPipeline")),
    Family(LTXV, "LTX-Video", Kind.VIDEO, runs=False, prediction="flow", latent_channels=128, downsample=32,
           companions=(_T5,), activation_gib=4.0,
           pipeline_classes=("LTXPipeline", "LTXImageToVideoPipeline")),
    Family(COGVIDEOX, "CogVideoX", Kind.VIDEO, runs=False, prediction="v", latent_channels=16,
           companions=(_T5,), activation_gib=6.0,
           pipeline_classes=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")),
    Family(MOCHI, "Mochi", Kind.VIDEO, runs=False, prediction="flow", latent_channels=12, companions=(_T5,),
           activation_gib=10.0, pipeline_classes=("MochiPipeline",)),
    # Chat families: the id is ours, the aliases are GGUF `general.architecture` / HF `model_type`.
    Family("llama", "LLaMA", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES),
    Family("mistral", "Mistral", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES, aliases=("mistral3",)),
    Family("qwen2", "Qwen2 / 2.5", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES),
    Family("qwen3", "Qwen3", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES),
    Family("gemma", "Gemma", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES),
    Family("gemma2", "Gemma 2", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES),
    Family("gemma3", "Gemma 3", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES, aliases=("gemma3_text",)),
    Family("phi3", "Phi-3", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES),
    Family("mixtral", "Mixtral", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES,
           notes=("mixture of experts: GGUF files say architecture 'llama' with an expert count",)),
    Family("qwen3_moe", "Qwen3-MoE", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES, aliases=("qwen3moe",)),
    Family("deepseek2", "DeepSeek V2 / V3", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES,
           aliases=("deepseek_v2", "deepseek_v3"),
           notes=("multi-head latent attention (compressed KV cache), shared + routed experts",)),
    Family("mamba", "Mamba", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES,
           notes=("state-space model: a fixed-size state instead of a KV cache",)),
    Family("mamba2", "Mamba-2", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES,
           notes=("state-space model (SSD): a fixed-size state instead of a KV cache",)),
    Family("jamba", "Jamba", Kind.CHAT, runs=True, quant_modes=LLM_QUANT_MODES,
           notes=("hybrid: attention, Mamba and mixture-of-experts layers; KV cache only on attention layers",)),
    # Parts other families use (the ids detection gives them).
    Family("clip-l", "CLIP-L", Kind.ENCODER, runs=True),
    Family("clip-g", "CLIP-G", Kind.ENCODER, runs=True),
    Family("clip-h", "OpenCLIP-H", Kind.ENCODER, runs=True),
    Family("t5", "T5-XXL", Kind.ENCODER, runs=True),
    Family("umt5", "umT5-XXL", Kind.ENCODER, runs=True),
    Family("clip-vision-h", "CLIP ViT-H (vision)", Kind.ENCODER, runs=True),
    Family("vae-kl-f8", "KL-f8 VAE (SD, SDXL)", Kind.VAE, runs=True),
    Family("vae-16ch", "16-channel VAE (SD3, Flux)", Kind.VAE, runs=True),
    Family("wan-vae", "Wan VAE", Kind.VAE, runs=True),
    Family("taesd", "TAESD (previews)", Kind.VAE, runs=True),
)}


def get(family_id: str) -> Family:
    """The catalog entry, or a KeyError that lists the known ids."""
    try:
        return FAMILIES[family_id]
    except KeyError:
        raise KeyError(f"unknown model family {family_id!r}; known: {', '.join(FAMILIES)}") from None


def ids(kind: Kind, *, runnable: bool = False) -> tuple[str, ...]:
    """Family ids of one kind, in catalog order; `runnable` keeps only those Studio runs today."""
    return tuple(f.id for f in FAMILIES.values() if f.kind is kind and (f.runs or not runnable))


def label(family_id: str) -> str:
    f = FAMILIES.get(family_id)
    return f.label if f else family_id


def by_alias(name: str) -> Family | None:
    """A chat family from a GGUF architecture or HF model_type (its id or one of its aliases)."""
    for f in FAMILIES.values():
        if f.kind is Kind.CHAT and (name == f.id or name in f.aliases):
            return f
    return None


def by_pipeline_class(class_name: str) -> Family | None:
    """The family of a diffusers `model_index.json` `_class_name`."""
    return next((f for f in FAMILIES.values() if class_name in f.pipeline_classes), None)


def size_presets(family_id: str, prediction: str = "") -> list[tuple[int, int]]:
    """Preset sizes; the first is the family's native size. SD 2.x eps (the 512 base) uses SD 1.x sizes."""
    if family_id == SD2 and prediction == "eps":
        return list(FAMILIES[SD1].sizes)
    f = FAMILIES.get(family_id)
    return list(f.sizes) if f and f.sizes else list(FAMILIES[SD1].sizes)


def tab_kind(family_id: str) -> Kind | None:
    """Which tab a file of this family belongs to: its own kind, or for a part (encoder, VAE) the
    kind of the first family that uses it (umT5 -> video, CLIP-L -> image); None when unknown."""
    f = FAMILIES.get(family_id)
    if f is None:
        return None
    if f.kind in (Kind.IMAGE, Kind.VIDEO, Kind.CHAT):
        return f.kind
    user = next((u for u in FAMILIES.values() if any(c.family == family_id for c in u.companions)), None)
    return user.kind if user else None


def samplers_for(family_id: str) -> tuple[str, ...]:
    f = FAMILIES.get(family_id)
    return f.samplers if f else DIFFUSION_SAMPLERS


# ---------------------------------------------------------------------------------------------
# Starters: good first downloads (`studio models starters`, `studio models pull ID`). Sizes are the
# files' sizes on the hub (the download checks them again); `min_ram`/`min_vram` say what machine
# it suits (0 VRAM: runs on a CPU). Companions are more files the model needs, pulled with it.

@dataclass(frozen=True)
class Starter:
    id: str
    label: str
    family: str
    repo: str
    file: str  # path in the repo
    size: int  # bytes, all files together
    licence: str
    min_ram: int  # bytes of RAM to run it on the CPU (or to stage it for the GPU)
    min_vram: int  # bytes of VRAM for a comfortable GPU run; 0 = fine on a CPU
    note: str
    companions: tuple[str, ...] = ()  # more files of the same repo

    @property
    def runs(self) -> bool:
        return FAMILIES[self.family].runs if self.family in FAMILIES else False


_GB = 1_000_000_000
STARTERS: tuple[Starter, ...] = (
    Starter("qwen3-1.7b", "Qwen3 1.7B (chat, CPU)", "qwen3", "Qwen/Qwen3-1.7B-GGUF", "Qwen3-1.7B-Q8_0.gguf",
            int(1.83 * _GB), "Apache-2.0", 4 * _GB, 0, "A good chat model for a laptop CPU: 10-20 tokens/s."),
    Starter("qwen3-8b", "Qwen3 8B (chat, GPU)", "qwen3", "Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf",
            int(5.03 * _GB), "Apache-2.0", 8 * _GB, 8 * _GB, "A strong chat model for an 8 GB GPU."),
    Starter("sd15", "Stable Diffusion 1.5 (images, small GPU or CPU)", "sd1",
            "stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", int(4.27 * _GB), "CreativeML OpenRAIL-M", 8 * _GB, 0,
            "512x512 images; the one image model a CPU finishes in minutes."),
    Starter("sdxl", "SDXL 1.0 base (images, GPU)", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0",
            "sd_xl_base_1.0.safetensors", int(6.94 * _GB), "CreativeML OpenRAIL++-M", 16 * _GB, 8 * _GB,
            "1024x1024 images; needs an 8 GB GPU to be pleasant."),
    Starter("flux-schnell", "FLUX.1 schnell (images, big GPU)", "flux", "black-forest-labs/FLUX.1-schnell",
            "flux1-schnell.safetensors", int(23.8 * _GB), "Apache-2.0", 32 * _GB, 16 * _GB,
            "4-step images of high quality; Studio detects Flux but cannot run it yet."),
    Starter("wan-1.3b", "Wan 2.1 T2V 1.3B (video, GPU)", "wan", "Comfy-Org/Wan_2.1_ComfyUI_repackaged",
            "split_files/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors", int(9.8 * _GB), "Apache-2.0",
            16 * _GB, 8 * _GB, "480p text-to-video; with its umT5 text encoder and VAE.",
            companions=("split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                        "split_files/vae/wan_2.1_vae.safetensors")),
)


def starter(starter_id: str) -> Starter | None:
    return next((s for s in STARTERS if s.id == starter_id), None)


def starters_for(ram: int, vram: int) -> list[Starter]:
    """The starters this machine can run (RAM and VRAM in bytes; vram 0 = no GPU)."""
    return [s for s in STARTERS if s.runs and ram >= s.min_ram and (vram >= s.min_vram or s.min_vram == 0)]
