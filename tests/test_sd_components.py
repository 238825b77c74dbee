"""UNet-only SD / SDXL files (ComfyUI models/unet, models/diffusion_models) with separate text encoder
and VAE files: given as paths, or found in ComfyUI's folders beside the model, roles read from shapes.

Tiny full checkpoints are split the way ComfyUI ships the parts: the UNet alone (LDM names, with or
without `model.diffusion_model.`), CLIP-L and OpenCLIP-G in Hugging Face `text_model.*` layout, and
the VAE in LDM names without a prefix. Every split must make the full checkpoint's image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_fixtures import _clip, _unet, _vae, tiny_sd1, tiny_sdxl

from studio.engine.context import JobContext, ModelCache, UserError
from studio.engine.device import probe
from studio.engine.pipelines.diffusion.sd import run_image
from studio.models.clip import PREFIXES, ClipConfig, ClipTextModel, to_openclip, to_ours
from studio.models.sd_checkpoint import load_sd
from studio.models.unet import UNetConfig
from studio.nn.packed_fp8 import Fp8Linear
from studio.protocol import ImageJob

UNET = "model.diffusion_model."


def tiny_sdxl_wide_g(path: Path, seed: int = 0) -> Path:
    """SDXL with a 64-wide CLIP-L and a 128-wide CLIP-G, so the two differ by width as the real ones do."""
    cfg = UNetConfig(block_channels=(64, 128), layers_per_block=1, transformer_depth=(0, 1), transformer_depth_mid=1,
                     num_heads=None, head_dim=64, context_dim=64 + 128, use_linear_projection=True,
                     adm_in_channels=128 + 6 * 256)
    torch.manual_seed(seed + 3)
    g = ClipTextModel(ClipConfig(width=128, layers=2, heads=2, intermediate=256, activation="gelu", projection_dim=128))
    sd = {**_unet(cfg, seed), **_vae(seed + 1)}
    sd.update({PREFIXES["sdxl_l"] + k: v for k, v in _clip(seed + 2).items()})
    sd.update(to_openclip({k: v.contiguous() for k, v in g.state_dict().items()}, prefix=PREFIXES["sdxl_g"]))
    save_file(sd, str(path))
    return path


def split(full: Path, unet: Path, vae: Path, encoders: dict[str, Path], bare: bool = False) -> None:
    """Write the full checkpoint's parts as ComfyUI keeps them; `encoders` maps a PREFIXES key to a file."""
    sd = load_file(str(full))
    unet.parent.mkdir(parents=True, exist_ok=True)
    save_file({(k.removeprefix(UNET) if bare else k): v for k, v in sd.items() if k.startswith(UNET)}, str(unet))
    vae.parent.mkdir(parents=True, exist_ok=True)
    save_file({k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")},
              str(vae))
    for key, path in encoders.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        hf = to_ours(sd, PREFIXES[key])  # OpenCLIP layout -> text_model.* (+ text_projection.weight)
        assert all(k.startswith(("text_model.", "text_projection.")) for k in hf)
        save_file({k: v.contiguous() for k, v in hf.items()}, str(path))


def _fp8_scaled(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI fp8_scaled: matrices and convs float8_e4m3fn with a per-layer scale_weight, the rest bf16.
    -> (file, the same weights dequantized)."""
    out, ref = {}, {}
    for key, t in sd.items():
        if t.ndim >= 2:
            scale = t.abs().max().float() / 448.0
            out[key] = (t.float() / scale).to(torch.float8_e4m3fn)
            ref[key] = out[key].float() * scale
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            out[key[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
        else:
            out[key] = t.to(torch.bfloat16)
            ref[key] = out[key].float()
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, ref


def run(tmp: Path, model: Path, **kw) -> tuple[np.ndarray, dict]:
    ctx = JobContext("job", probe("cpu"), models=ModelCache(), settings={"outputs": str(tmp / "out")})
    job = ImageJob(model=str(model), prompt="a red fox in the snow", negative="blurry", width=64, height=64, steps=3,
                   cfg=5.0, sampler="euler", seed=7, previews=False, **kw)
    result = run_image(job, ctx)
    from PIL import Image

    return np.asarray(Image.open(result["images"][0]["path"]).convert("RGB"), dtype=np.int16), result


def test_sdxl_unet_only_with_given_encoders_and_vae_makes_the_full_checkpoints_image(tmp_path):
    full = tiny_sdxl_wide_g(tmp_path / "full.safetensors")
    # names that lie: the roles must come from the shapes (64 wide = CLIP-L here, 128 = CLIP-G)
    l_file, g_file = tmp_path / "te" / "clip_g.safetensors", tmp_path / "te" / "clip_l.safetensors"
    split(full, tmp_path / "parts" / "unet.safetensors", tmp_path / "parts" / "vae.safetensors",
          {"sdxl_l": l_file, "sdxl_g": g_file})
    want, ref = run(tmp_path, full)
    got, result = run(tmp_path, tmp_path / "parts" / "unet.safetensors", vae=str(tmp_path / "parts" / "vae.safetensors"),
                      text_encoders=[str(g_file), str(l_file)])
    assert result["family"] == "sdxl" and ref["family"] == "sdxl"
    assert np.abs(got - want).max() <= 1
    assert any("ViT-bigG text encoder from clip_l.safetensors" in n for n in result["notes"])


def test_comfyui_folders_are_found_with_no_paths_given(tmp_path):
    full = tiny_sdxl(tmp_path / "full.safetensors")
    models = tmp_path / "ComfyUI" / "models"
    split(full, models / "unet" / "xl.safetensors", models / "vae" / "sdxl_vae.safetensors",
          {"sdxl_l": models / "clip" / "clip_l.safetensors", "sdxl_g": models / "text_encoders" / "clip_g.safetensors"})
    # files in those folders that are not CLIP text encoders are passed over
    save_file({"shared.weight": torch.zeros(8, 4)}, str(models / "clip" / "t5-ish.safetensors"))
    (models / "clip" / "notes.txt").write_text("not a model")
    want, _ = run(tmp_path, full)
    got, result = run(tmp_path, models / "unet" / "xl.safetensors")
    assert np.abs(got - want).max() <= 1
    assert any("VAE from sdxl_vae.safetensors" in n for n in result["notes"])
    assert any("clip_g.safetensors" in n and "text_encoders" in n for n in result["notes"])


def test_fp8_scaled_sd1_unet_only_file_works_the_same_way(tmp_path):
    full = tiny_sd1(tmp_path / "full.safetensors")
    models = tmp_path / "models"
    split(full, models / "diffusion_models" / "plain.safetensors", models / "vae" / "vae.safetensors",
          {"sd1": models / "clip" / "clip_l.safetensors"}, bare=True)
    fp8, ref = _fp8_scaled(load_file(str(models / "diffusion_models" / "plain.safetensors")))
    save_file(fp8, str(models / "diffusion_models" / "fp8.safetensors"))
    sd = load_file(str(full))
    save_file({**{k: v for k, v in sd.items() if not k.startswith(UNET)}, **{UNET + k: v for k, v in ref.items()}},
              str(tmp_path / "reference.safetensors"))
    want, _ = run(tmp_path, tmp_path / "reference.safetensors")
    got, result = run(tmp_path, models / "diffusion_models" / "fp8.safetensors")
    assert result["family"] == "sd1"
    assert np.abs(got - want).max() <= 1
    model = load_sd(models / "diffusion_models" / "fp8.safetensors")
    assert any(isinstance(m, Fp8Linear) for m in model.unet.modules())  # the UNet kept the file's fp8 weights


def test_a_missing_encoder_or_vae_is_named_with_where_to_put_it(tmp_path):
    full = tiny_sdxl_wide_g(tmp_path / "full.safetensors")
    models = tmp_path / "models"
    split(full, models / "unet" / "xl.safetensors", models / "vae" / "vae.safetensors",
          {"sdxl_l": models / "clip" / "clip_l.safetensors", "sdxl_g": tmp_path / "elsewhere" / "g.safetensors"})
    with pytest.raises(UserError, match=r"but no OpenCLIP ViT-bigG text encoder\. .*put clip_g\.safetensors "
                       r"\(OpenCLIP ViT-bigG text encoder, 128 wide\) in .*models/clip or pass --text-encoder FILE"):
        load_sd(models / "unet" / "xl.safetensors")
    with pytest.raises(UserError, match="no OpenCLIP ViT-bigG"):
        load_sd(models / "unet" / "xl.safetensors", text_encoders=[models / "clip" / "clip_l.safetensors"])
    (models / "vae" / "vae.safetensors").unlink()
    with pytest.raises(UserError, match=r"has a UNet but no VAE and no OpenCLIP ViT-bigG .*VAE file for sdxl in .*models/vae"):
        load_sd(models / "unet" / "xl.safetensors")
    # given both encoders, only the VAE is asked for
    with pytest.raises(UserError, match=r"but no VAE\. "):
        load_sd(models / "unet" / "xl.safetensors",
                text_encoders=[models / "clip" / "clip_l.safetensors", tmp_path / "elsewhere" / "g.safetensors"])


def test_an_encoder_of_the_wrong_width_or_kind_is_refused(tmp_path):
    sd1 = tiny_sd1(tmp_path / "sd1.safetensors")
    split(sd1, tmp_path / "unet.safetensors", tmp_path / "vae.safetensors", {})
    xl = tiny_sdxl_wide_g(tmp_path / "xl.safetensors")
    split(xl, tmp_path / "xl_unet.safetensors", tmp_path / "xl_vae.safetensors", {"sdxl_g": tmp_path / "g.safetensors"})
    with pytest.raises(UserError, match=r"g\.safetensors is a 128-wide text encoder .* sd1 model reads a CLIP "
                       r"ViT-L text encoder \(64 wide\)"):
        load_sd(tmp_path / "unet.safetensors", tmp_path / "vae.safetensors", text_encoders=[tmp_path / "g.safetensors"])
    with pytest.raises(UserError, match="vae.safetensors is not a CLIP text encoder file"):
        load_sd(tmp_path / "unet.safetensors", tmp_path / "vae.safetensors", text_encoders=[tmp_path / "vae.safetensors"])


def test_two_vaes_that_both_fit_are_not_guessed_between(tmp_path):
    full = tiny_sd1(tmp_path / "full.safetensors")
    models = tmp_path / "models"
    split(full, models / "unet" / "a.safetensors", models / "vae" / "one.safetensors",
          {"sd1": models / "clip" / "clip_l.safetensors"})
    (models / "vae" / "two.safetensors").write_bytes((models / "vae" / "one.safetensors").read_bytes())
    with pytest.raises(UserError, match="2 VAE files .* fit it .*VAE picker"):
        load_sd(models / "unet" / "a.safetensors")
    model = load_sd(models / "unet" / "a.safetensors", models / "vae" / "two.safetensors")
    assert model.family == "sd1" and model.vae is not None


def test_cli_text_encoder_option_repeats_into_the_job(monkeypatch, tmp_path):
    from dataclasses import asdict

    import studio.cli
    from studio.cli import common
    from studio.protocol import job_from_dict

    seen = []
    monkeypatch.setattr(common, "run_cli_job", lambda args, job, on_event=None: (seen.append(job), (None, 3))[1])
    args = studio.cli.build_parser().parse_args(
        ["generate", "image", "--model", str(tmp_path / "unet.safetensors"), "--prompt", "fox", "--width", "64",
         "--text-encoder", "a.safetensors", "--text-encoder", "b.safetensors"])
    assert args.func(args) == 3
    assert seen[0].text_encoders == ["a.safetensors", "b.safetensors"]
    # and the field crosses the engine protocol
    assert job_from_dict({**asdict(seen[0]), "kind": "image"}).text_encoders == ["a.safetensors", "b.safetensors"]
