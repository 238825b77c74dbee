"""Real-size Flux.1 / SD3 without their weights: what the memory manager plans for dev (built on the meta
device) under common cards' budgets, and how transformer files find their VAE and encoders (header-only
files in ComfyUI's folders)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from studio.engine.memory import ComponentShape, Policy, plan_job
from studio.engine.pipelines.diffusion.flux import FAMILY
from studio.models.clip import ClipConfig, ClipTextModel
from studio.models.flux import FluxConfig, FluxTransformer
from studio.models.t5 import T5Config, T5Encoder
from studio.models.vae import AutoencoderKL, VAEConfig
from studio.protocol import ImageJob

GiB = 1 << 30


@pytest.fixture(scope="module")
def flux_dev():
    with torch.device("meta"):
        return SimpleNamespace(transformer=FluxTransformer(FluxConfig.named("dev")).to(torch.bfloat16),
                               t5=T5Encoder(T5Config.named("t5-v1_1-xxl")).to(torch.bfloat16),
                               clip=ClipTextModel(ClipConfig()).to(torch.bfloat16),
                               vae=AutoencoderKL(VAEConfig.for_family("flux")).to(torch.bfloat16), variant="dev")


def _plan(model, budget: int):
    job = ImageJob(model="x", width=1024, height=1024, cfg=3.5)
    parts = FAMILY.parts(model)
    shapes = {name: ComponentShape.of(p.module, p.blocks) for name, p in parts.items()}
    return plan_job(shapes, FAMILY.activations(model, job, torch.bfloat16), budget, ram_available=64 * GiB,
                    advice=FAMILY.advice)


def test_real_size_parts_weigh_what_the_releases_do(flux_dev):
    shapes = {n: ComponentShape.of(p.module, p.blocks) for n, p in FAMILY.parts(flux_dev).items()}
    assert 22 * GiB < shapes["transformer"].bytes < 22.5 * GiB  # 11.9B parameters in bf16
    assert 8.5 * GiB < shapes["text_encoder_2"].bytes < 9.2 * GiB  # T5-XXL encoder
    assert len(shapes["transformer"].block_bytes) == 19 + 38


@pytest.mark.parametrize("budget,transformer", [(24, Policy.MODEL_OFFLOAD), (12, Policy.BLOCK_STREAM),
                                                (8, Policy.BLOCK_STREAM)])
def test_bf16_dev_under_common_budgets(flux_dev, budget, transformer):
    plan = _plan(flux_dev, budget * GiB)
    assert plan.per_component["transformer"] is transformer
    assert plan.vram_needed <= budget * GiB
    # the T5 (9 GiB) goes out of the way of the transformer, one part on the device at a time
    assert plan.per_component["text_encoder_2"] is not Policy.RESIDENT


def test_everything_resident_on_a_big_card(flux_dev):
    assert _plan(flux_dev, 80 * GiB).policy is Policy.RESIDENT


# ---------------------------------------------------------------------------------- finding real-size parts

VAE16 = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (32, 512, 3, 3),
         "decoder.conv_in.weight": (512, 16, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}


def _clip_header(width: int) -> dict:
    return {"text_model.embeddings.token_embedding.weight": (49408, width),
            "text_model.encoder.layers.0.self_attn.q_proj.weight": (width, width)}


T5_HEADER = {"shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}


@pytest.fixture()
def comfy_models(tmp_path):
    from library_fixtures import FLUX, write_safetensors

    root = tmp_path / "ComfyUI" / "models"
    write_safetensors(root / "vae" / "ae.safetensors", VAE16)
    write_safetensors(root / "text_encoders" / "clip_l.safetensors", _clip_header(768))
    write_safetensors(root / "text_encoders" / "clip_g.safetensors", _clip_header(1280))
    write_safetensors(root / "text_encoders" / "t5" / "t5xxl_fp8_e4m3fn.safetensors", T5_HEADER, dtype="F8_E4M3")
    flux = write_safetensors(root / "diffusion_models" / "flux1-dev.safetensors", FLUX)
    sd3 = write_safetensors(root / "diffusion_models" / "sd3.5_large.safetensors",
                            {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (14592,),
                             "pos_embed": (1, 36864, 2432), "x_embedder.proj.weight": (2432, 16, 2, 2)})
    return root, flux, sd3


def test_flux_file_finds_its_parts_in_comfyui_folders_by_their_headers(comfy_models):
    from studio.engine.context import UserError
    from studio.engine.pipelines.diffusion import flux as P

    root, flux, _ = comfy_models
    parts = P.locate(flux, ImageJob(model=str(flux)), {})
    assert parts["vae"].name == "ae.safetensors" and parts["clip"].name == "clip_l.safetensors"
    assert parts["t5"].name == "t5xxl_fp8_e4m3fn.safetensors"  # in a subfolder, found all the same
    (root / "text_encoders" / "t5" / "t5xxl_fp8_e4m3fn.safetensors").unlink()
    with pytest.raises(UserError, match="t5xxl_fp16.safetensors"):
        P.locate(flux, ImageJob(model=str(flux)), {})
    with pytest.raises(UserError, match="not a T5-XXL or CLIP-L"):
        P.locate(flux, ImageJob(model=str(flux), text_encoders=[str(root / "vae" / "ae.safetensors")]), {})


def test_sd3_file_finds_clip_l_clip_g_and_t5_and_runs_without_t5(comfy_models):
    from studio.engine.pipelines.diffusion import sd3 as P

    root, _, sd3 = comfy_models
    parts = P.locate(sd3, ImageJob(model=str(sd3)), {})
    assert (parts["clip_l"].name, parts["clip_g"].name) == ("clip_l.safetensors", "clip_g.safetensors")
    assert parts["t5"] is not None and parts["vae"].name == "ae.safetensors"
    (root / "text_encoders" / "t5" / "t5xxl_fp8_e4m3fn.safetensors").unlink()
    assert P.locate(sd3, ImageJob(model=str(sd3)), {})["t5"] is None  # optional: zeros, with a note
