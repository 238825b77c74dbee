"""The Wan video pipeline against diffusers' WanPipeline / WanImageToVideoPipeline on tiny random models:
the final latents (before the VAE decode) must match for T2V, Wan 2.1 I2V (CLIP image context), I2V with
two experts, and TI2V."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.engine.context import UserError
from studio.engine.pipelines.diffusion import wan as V
from studio.media.video import video_info
from studio.protocol import VideoJob

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from video_fixtures import TEXT_DIM, Collector, build_wan_folder, jiggle, make_job  # noqa: E402


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    return build_wan_folder(tmp_path_factory.mktemp("wan") / "Wan-tiny-Diffusers")


def test_pipeline_latent_matches_diffusers_wan_pipeline(wan_folder, tmp_path, monkeypatch):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast

    captured = {}
    real_decode = V.decode

    def spy(parts, latent, ctx):
        captured["latent"] = latent.clone()
        return real_decode(parts, latent, ctx)

    monkeypatch.setattr(V, "decode", spy)
    job = make_job(wan_folder, tmp_path, steps=4)
    V.run_video(job, Collector(tmp_path).ctx)

    tok = PreTrainedTokenizerFast(tokenizer_file=str(wan_folder / "tokenizer" / "tokenizer.json"),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    pipe = WanPipeline(tokenizer=tok, text_encoder=transformers.UMT5EncoderModel.from_pretrained(
        wan_folder / "text_encoder"), transformer=WanTransformer3DModel.from_pretrained(wan_folder / "transformer"),
        vae=AutoencoderKLWan.from_pretrained(wan_folder / "vae"),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=job.shift, solver_order=2, final_sigmas_type="zero"))
    ref = pipe(prompt=job.prompt, negative_prompt=job.negative, height=32, width=32, num_frames=5,
               num_inference_steps=job.steps, guidance_scale=job.cfg, output_type="latent",
               generator=torch.Generator().manual_seed(job.seed)).frames
    torch.testing.assert_close(captured["latent"].float(), ref.float(), atol=1e-4, rtol=1e-4)



# ---------------------------------------------------------------- image-to-video, against diffusers


def _image(path: Path, w: int, h: int) -> Path:
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)).save(path)
    return path


def _variant_folder(base: Path, root: Path, net_kwargs: dict, vae=None, experts: int = 1,
                    boundary: float | None = None) -> Path:
    """A Wan folder sharing the T2V fixture's text encoder and tokenizer, with other transformer(s) / VAE."""
    import shutil

    from diffusers import WanTransformer3DModel

    shutil.copytree(base / "text_encoder", root / "text_encoder")
    shutil.copytree(base / "tokenizer", root / "tokenizer")
    if vae is None:
        shutil.copytree(base / "vae", root / "vae")
    else:
        vae.save_pretrained(root / "vae")
    for i, name in enumerate(["transformer", "transformer_2"][:experts]):
        torch.manual_seed(10 + i)
        net = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128,
                                    text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=1, cross_attn_norm=True,
                                    qk_norm="rms_norm_across_heads", rope_max_seq_len=64, **net_kwargs)
        jiggle(net)
        net.save_pretrained(root / name)
    index = {"_class_name": "WanImageToVideoPipeline"}
    if boundary is not None:
        index["boundary_ratio"] = boundary
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _diffusers_i2v(folder: Path, job: VideoJob, expand: bool, boundary: float | None, monkeypatch):
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from diffusers.pipelines.wan import pipeline_wan_i2v
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel, PreTrainedTokenizerFast

    # its prompt cleaning needs ftfy (not installed); ftfy leaves plain ASCII prompts as they are
    monkeypatch.setattr(pipeline_wan_i2v, "basic_clean", lambda text: text.strip(), raising=False)

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer" / "tokenizer.json"),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    second = folder / "transformer_2"
    clip = {}
    if (folder / "image_encoder").is_dir():
        encoder = CLIPVisionModel.from_pretrained(folder / "image_encoder")
        size = encoder.config.image_size
        clip = {"image_encoder": encoder, "image_processor": CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size})}
    pipe = WanImageToVideoPipeline(
        tokenizer=tok, text_encoder=transformers.UMT5EncoderModel.from_pretrained(folder / "text_encoder"),
        vae=AutoencoderKLWan.from_pretrained(folder / "vae"),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=job.shift, solver_order=2, final_sigmas_type="zero"),
        transformer=WanTransformer3DModel.from_pretrained(folder / "transformer"),
        transformer_2=WanTransformer3DModel.from_pretrained(second) if second.is_dir() else None,
        boundary_ratio=boundary, expand_timesteps=expand, **clip)
    return pipe(image=Image.open(job.image), prompt=job.prompt, negative_prompt=job.negative, height=job.height,
                width=job.width, num_frames=job.frames, num_inference_steps=job.steps, guidance_scale=job.cfg,
                output_type="latent", generator=torch.Generator().manual_seed(job.seed)).frames


def _our_latent(job: VideoJob, tmp: Path, monkeypatch) -> torch.Tensor:
    captured = {}
    real_decode = V.decode

    def spy(parts, latent, ctx):
        captured["latent"] = latent.clone()
        return real_decode(parts, latent, ctx)

    monkeypatch.setattr(V, "decode", spy)
    result = V.run_video(job, Collector(tmp).ctx)
    assert video_info(result["path"])["frames"] == job.frames
    return captured["latent"].float()


def test_wan21_i2v_with_clip_image_context_matches_diffusers(wan_folder, tmp_path, monkeypatch):
    """Wan 2.1 I2V 14B's shape: 36 input channels and the CLIP encoder's penultimate hidden states as
    image tokens. The init image is larger than the video, so CLIP sees the whole image (at its own
    224-style size) while the VAE sees the video-sized one, as in diffusers."""
    folder = _variant_folder(wan_folder, tmp_path / "i2v21", {"in_channels": 36, "out_channels": 16,
                                                              "image_dim": 32, "added_kv_proj_dim": 128})
    torch.manual_seed(3)
    encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=7, hidden_act="gelu"))
    jiggle(encoder, 0.1)
    encoder.save_pretrained(folder / "image_encoder")
    job = make_job(folder, tmp_path, image=str(_image(tmp_path / "start.png", 48, 48)), steps=3)
    ours = _our_latent(job, tmp_path, monkeypatch)
    ref = _diffusers_i2v(folder, job, expand=False, boundary=None, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)


def test_i2v_with_two_experts_matches_diffusers(wan_folder, tmp_path, monkeypatch):
    """Wan 2.2 I2V A14B's shape: 36 input channels (noise | mask | image latents), no CLIP, a high-noise
    and a low-noise expert switched at boundary_ratio * 1000."""
    folder = _variant_folder(wan_folder, tmp_path / "i2v", {"in_channels": 36, "out_channels": 16}, experts=2,
                             boundary=0.9)
    job = make_job(folder, tmp_path, image=str(_image(tmp_path / "start.png", 32, 32)), steps=4)
    ours = _our_latent(job, tmp_path, monkeypatch)
    ref = _diffusers_i2v(folder, job, expand=False, boundary=0.9, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)


def test_ti2v_keeps_the_first_frame_and_matches_diffusers(wan_folder, tmp_path, monkeypatch):
    """Wan 2.2 TI2V 5B's shape: 48-channel latents of the 16x VAE; the image is the first latent frame,
    held clean (its tokens at t = 0)."""
    from diffusers import AutoencoderKLWan

    from studio.models.wan_vae import WAN22_MEAN, WAN22_STD

    torch.manual_seed(1)
    vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=list(WAN22_MEAN),
                           latents_std=list(WAN22_STD))
    jiggle(vae, 0.02)
    folder = _variant_folder(wan_folder, tmp_path / "ti2v", {"in_channels": 48, "out_channels": 48}, vae=vae)
    job = make_job(folder, tmp_path, image=str(_image(tmp_path / "start.png", 64, 64)), width=64, height=64, steps=3)
    ours = _our_latent(job, tmp_path, monkeypatch)
    ref = _diffusers_i2v(folder, job, expand=True, boundary=None, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="multiple of 32: use 32 or 64"):
        V.run_video(replace(job, width=48), Collector(tmp_path).ctx)

