"""Flux LoRAs in the formats people share, against the same deltas merged into diffusers' (unfused) modules."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from studio.errors import UserError
from studio.models.clip import build_clip
from studio.models.flux import load_flux_transformer
from studio.models.flux_lora import apply_flux_loras, restore_flux_loras
from tests.flux_fixtures import AXES, build_flux_folder, save, tiny_clip, tiny_transformer
from tests.test_flux import _inputs, _job, _reference
from tests.video_fixtures import Collector

RANK = 4


def _pair(out: int, cin: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, cin, generator=g) * 0.1, torch.randn(out, RANK, generator=g) * 0.1


def _model(net):
    return SimpleNamespace(transformer=load_flux_transformer(copy.deepcopy(dict(net.state_dict())), axes_dim=AXES),
                           clip=build_clip(dict(tiny_clip().state_dict())), loras=(), original={}, encoded={})


def _merged(net, deltas: dict[str, torch.Tensor]):
    """diffusers' transformer with each delta added to its (separate) module's weight."""
    ref = copy.deepcopy(net)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            mods[name].weight += delta
    return ref


def _check(ours, ref, guidance=True):
    img, ids, txt, tids, t, y = _inputs()
    g = torch.full((2,), 3.5) if guidance else None
    with torch.no_grad():
        torch.testing.assert_close(ours(img, ids, txt, tids, t, y, g), _reference(ref, img, ids, txt, tids, t, y, g),
                                   atol=1e-4, rtol=1e-4)


def test_diffusers_peft_lora_patches_row_ranges_of_the_fused_weights(tmp_path):
    net = tiny_transformer(True)
    h, mlp = 32, 128
    shapes = {"transformer_blocks.0.attn.to_k": (h, h), "transformer_blocks.1.attn.add_v_proj": (h, h),
              "single_transformer_blocks.1.proj_mlp": (mlp, h), "single_transformer_blocks.0.attn.to_q": (h, h),
              "transformer_blocks.1.ff_context.net.2": (h, mlp), "norm_out.linear": (2 * h, h),
              "single_transformer_blocks.0.proj_out": (h, h + mlp)}
    file, deltas = {}, {}
    for i, (name, (out, cin)) in enumerate(shapes.items()):
        down, up = _pair(out, cin, i)
        file[f"transformer.{name}.lora_A.weight"], file[f"transformer.{name}.lora_B.weight"] = down, up
        deltas[name] = 0.8 * (up @ down)
    path = save(file, tmp_path / "ai-toolkit.safetensors")
    model = _model(net)
    from studio.engine.pipelines.diffusion.files import read_state_dict

    assert apply_flux_loras(model, [(path, 0.8)], read_state_dict) == []
    _check(model.transformer, _merged(net, deltas))
    restore_flux_loras(model)
    _check(model.transformer, net)  # the exact weights back


def test_kohya_bfl_lora_with_alpha_and_a_text_encoder_part(tmp_path):
    net = tiny_transformer(True)
    h, mlp = 32, 128
    file, deltas = {}, {}
    down, up = _pair(3 * h, h, 1)  # double block 0's image qkv: thirds of `up` go to to_q / to_k / to_v
    file["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] = down
    file["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = up
    file["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(2.0)
    for j, c in enumerate("qkv"):
        deltas[f"transformer_blocks.0.attn.to_{c}"] = 0.5 * (up[j * h:(j + 1) * h] @ down)
    down, up = _pair(3 * h + mlp, h, 2)
    file["lora_unet_single_blocks_1_linear1.lora_down.weight"] = down
    file["lora_unet_single_blocks_1_linear1.lora_up.weight"] = up
    file["lora_unet_single_blocks_1_linear1.alpha"] = torch.tensor(2.0)
    for j, c in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        deltas[f"single_transformer_blocks.1.{c}"] = 0.5 * (up[j * h:(j + 1) * h] @ down)
    deltas["single_transformer_blocks.1.proj_mlp"] = 0.5 * (up[3 * h:] @ down)
    te_down, te_up = _pair(64, 64, 3)
    file["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = te_down
    file["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = te_up
    file["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(2.0)
    path = save(file, tmp_path / "kohya.safetensors")
    model = _model(net)
    from studio.engine.pipelines.diffusion.files import read_state_dict

    model.encoded["x"] = "stale"
    apply_flux_loras(model, [(path, 1.0)], read_state_dict)  # alpha / rank = 0.5
    assert model.encoded == {}  # prompts encode differently now
    _check(model.transformer, _merged(net, deltas))
    ref_clip = tiny_clip()
    with torch.no_grad():
        q_proj = next(m for n, m in ref_clip.named_modules() if n.endswith("encoder.layers.0.self_attn.q_proj"))
        q_proj.weight += 0.5 * (te_up @ te_down)
        ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 4])
        want = ref_clip(ids).last_hidden_state
        got, _ = model.clip(ids, pooled=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_lora_for_another_family_and_packed_weights_are_refused(tmp_path):
    from safetensors.torch import save_file
    from test_diffusion_quant import _fp8

    from studio.engine.pipelines.diffusion.files import read_state_dict
    from tests.flux_fixtures import to_bfl

    sdxl = save({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 320),
                 "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(320, 4)}, tmp_path / "sdxl.safetensors")
    model = _model(tiny_transformer(True))
    with pytest.raises(UserError, match="does not fit this Flux model"):
        apply_flux_loras(model, [(sdxl, 1.0)], read_state_dict)
    assert model.original == {} and model.loras == ()
    file_sd, _ = _fp8(to_bfl(tiny_transformer(True).state_dict()), scaled=False)
    save_file(file_sd, str(tmp_path / "fp8.safetensors"))
    packed = SimpleNamespace(transformer=load_flux_transformer(read_state_dict(tmp_path / "fp8.safetensors",
                                                                               compact=True)),
                             clip=model.clip, loras=(), original={}, encoded={})
    with pytest.raises(UserError, match="fp8"):
        apply_flux_loras(packed, [(sdxl, 1.0)], read_state_dict)


def test_a_job_with_a_lora_changes_the_image_and_the_next_job_without_it_restores_it(tmp_path):
    from PIL import Image

    from studio.engine.pipelines.diffusion.flux import run_image

    folder = build_flux_folder(tmp_path / "flux", False)
    down, up = _pair(96, 32, 7)
    lora = save({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down * 20,
                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up * 20}, tmp_path / "style.safetensors")
    col = Collector(tmp_path)

    def image(name, loras=()):
        job = _job(folder, tmp_path, steps=2, loras=[{"path": str(lora), "weight": 1.0} for _ in loras],
                   out=str(tmp_path / name))
        return np.asarray(Image.open(run_image(job, col.ctx).images[0]["path"]))

    plain, styled, again = image("a.png"), image("b.png", [lora]), image("c.png")
    assert np.abs(plain.astype(int) - styled.astype(int)).max() > 10
    np.testing.assert_array_equal(plain, again)
