"""What the memory manager plans for real-size Flux.1 dev (built on the meta device: no weights) under the
budgets of common cards, from the family's own part list and activation estimates."""

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
