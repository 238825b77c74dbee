"""The Wan video pipeline end to end on tiny random models written as a diffusers Wan folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.engine.context import JobCancelled, JobContext, ModelCache, UserError
from studio.engine.device import probe
from studio.engine.pipelines import video as V
from studio.engine.video_io import read_frames, read_mp4_metadata, video_info
from studio.protocol import VideoJob

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TEXT_DIM = 32
CACHE = ModelCache()  # loaded models shared by the tests, as the engine keeps them warm between jobs
WORDS = ["a", "red", "fox", "runs", "in", "snow", "blurry", "bad", "cat"]


def _jiggle(model, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():  # move every weight off its init value so nothing is trivially zero
            p.add_(torch.randn_like(p) * scale)


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """A diffusers-layout Wan folder (transformer/, vae/, text_encoder/, tokenizer/) of tiny random models.

    Heads are 128 wide as in every released Wan: single files do not state the width.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan") / "Wan-tiny-Diffusers"
    torch.manual_seed(0)
    net = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=2,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    _jiggle(net)
    net.save_pretrained(root / "transformer")
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    _jiggle(vae, 0.02)
    vae.save_pretrained(root / "vae")
    cfg = transformers.UMT5Config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=48,
                                  num_layers=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                  dropout_rate=0.0)
    enc = transformers.UMT5EncoderModel(cfg)
    _jiggle(enc, 0.1)
    enc.save_pretrained(root / "text_encoder")
    _write_tokenizer(root / "tokenizer" / "tokenizer.json")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


class Collector:
    def __init__(self, tmp: Path, **settings) -> None:
        self.progress: list[tuple[int, int, str]] = []
        self.previews: list[tuple[bytes, int, int]] = []
        self.ctx = JobContext("job", probe("cpu"), on_progress=lambda s, t, st: self.progress.append((s, t, st)),
                              on_preview=lambda d, m, w, h: self.previews.append((d, w, h)),
                              settings={"outputs": str(tmp / "outputs"), **settings}, models=CACHE)

    def steps(self) -> list[int]:
        return [s for s, _, st in self.progress if st == "sampling"]


def _job(folder: Path, tmp: Path, **kw) -> VideoJob:
    base = dict(model=str(folder), prompt="a red fox runs in snow", negative="blurry bad", width=32, height=32,
                frames=5, fps=8.0, steps=3, cfg=4.0, shift=3.0, sampler="unipc", seed=11, out=str(tmp / "clip.mp4"))
    base.update(kw)
    return VideoJob(**base)


def test_text_to_video_writes_an_mp4_with_the_right_frames_size_and_job(wan_folder, tmp_path):
    col = Collector(tmp_path)
    result = V.run_video(_job(wan_folder, tmp_path), col.ctx)
    path = Path(result["path"])
    assert path == tmp_path / "clip.mp4"
    info = video_info(path)
    assert (info["frames"], info["width"], info["height"]) == (5, 32, 32)
    assert info["fps"] == pytest.approx(8)
    assert len(list(read_frames(path))) == 5
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["prompt"] == "a red fox runs in snow" and side["seed"] == 11 and side["kind"] == "video"
    assert side["steps"] == 3 and side["frames"] == 5 and side["model"] == str(wan_folder)
    assert json.loads(read_mp4_metadata(path)["©cmt"])["seed"] == 11
    assert col.steps() == [1, 2, 3]
    assert len(col.previews) == 3 and col.previews[0][0][:2] == b"\xff\xd8"  # a JPEG of the middle frame
    assert result["videos"][0]["frames"] == 5 and result["notes"] == [] and not result["partial"]
    # a second run never overwrites the first
    again = V.run_video(_job(wan_folder, tmp_path), Collector(tmp_path).ctx)
    assert Path(again["path"]) != path and path.exists()


def test_same_seed_gives_the_same_frames_and_another_seed_does_not(wan_folder, tmp_path):
    def frames(seed: int, name: str) -> np.ndarray:
        r = V.run_video(_job(wan_folder, tmp_path, seed=seed, steps=2, out=str(tmp_path / name)), Collector(tmp_path).ctx)
        return np.stack(list(read_frames(r["path"])))

    a, b, c = frames(5, "a.mp4"), frames(5, "b.mp4"), frames(6, "c.mp4")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_pipeline_latent_matches_diffusers_wan_pipeline(wan_folder, tmp_path, monkeypatch):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast

    captured = {}
    real_decode = V.decode

    def spy(parts, latent, ctx):
        captured["latent"] = latent.clone()
        return real_decode(parts, latent, ctx)

    monkeypatch.setattr(V, "decode", spy)
    job = _job(wan_folder, tmp_path, steps=4)
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


def test_frame_count_is_rounded_to_4n_plus_1_with_a_notice(wan_folder, tmp_path):
    assert [V.nearest_4n1(n) for n in (1, 2, 3, 4, 10, 11, 81, 0)] == [1, 1, 5, 5, 9, 13, 81, 1]
    result = V.run_video(_job(wan_folder, tmp_path, frames=10, steps=1), Collector(tmp_path).ctx)
    assert result["videos"][0]["frames"] in (9, 13)
    assert video_info(result["path"])["frames"] == result["videos"][0]["frames"]
    assert any("10 frames became" in n for n in result["notes"])
    assert result["job"]["frames"] == result["videos"][0]["frames"]


def test_sizes_not_divisible_by_16_are_refused_with_the_nearest_valid_sizes(wan_folder, tmp_path):
    with pytest.raises(UserError, match="496 or 512") as err:
        V.run_video(_job(wan_folder, tmp_path, width=500), Collector(tmp_path).ctx)
    assert err.value.kind == "bad_input" and "Width 500" in err.value.message
    with pytest.raises(UserError, match="Height 40 .* use 32 or 48"):
        V.run_video(_job(wan_folder, tmp_path, height=40), Collector(tmp_path).ctx)
    assert not (tmp_path / "clip.mp4").exists()


def test_cancel_stops_within_one_step(wan_folder, tmp_path):
    col = Collector(tmp_path)

    def on_progress(step, total, stage):
        col.progress.append((step, total, stage))
        if stage == "sampling" and step == 2:
            col.ctx.cancel.set()

    col.ctx.on_progress = on_progress
    with pytest.raises(JobCancelled):
        V.run_video(_job(wan_folder, tmp_path, steps=6), col.ctx)
    assert col.steps() == [1, 2]
    assert not (tmp_path / "clip.mp4").exists()


def test_cancel_keeps_the_partial_video_when_asked(wan_folder, tmp_path):
    col = Collector(tmp_path, keep_partial_video=True)

    def on_progress(step, total, stage):
        col.progress.append((step, total, stage))
        if stage == "sampling" and step == 1:
            col.ctx.cancel.set()

    col.ctx.on_progress = on_progress
    result = V.run_video(_job(wan_folder, tmp_path, steps=5), col.ctx)
    assert result["partial"] and col.steps() == [1]
    assert any("Cancelled after step 1 of 5" in n for n in result["notes"])
    assert video_info(result["path"])["frames"] == 5
    assert json.loads(Path(result["videos"][0]["sidecar"]).read_text())["partial"] is True


def test_missing_parts_name_the_file_to_install(wan_folder, tmp_path):
    import shutil

    single = tmp_path / "models" / "diffusion_models"
    single.mkdir(parents=True)
    from safetensors.torch import save_file

    from studio.engine.weights import load_weights

    sd = load_weights(next((wan_folder / "transformer").glob("*.safetensors")))
    save_file({k: v.contiguous() for k, v in sd.items()}, single / "wan_tiny.safetensors")
    with pytest.raises(UserError, match="wan_2.1_vae.safetensors") as err:
        V.run_video(_job(single / "wan_tiny.safetensors", tmp_path), Collector(tmp_path).ctx)
    assert err.value.kind == "model_not_found"
    # with a VAE in ComfyUI's models/vae, the next thing missing is the text encoder
    (tmp_path / "models" / "vae").mkdir()
    shutil.copy(next((wan_folder / "vae").glob("*.safetensors")), tmp_path / "models" / "vae" / "wan_vae.safetensors")
    with pytest.raises(UserError, match="umt5_xxl"):
        V.run_video(_job(single / "wan_tiny.safetensors", tmp_path), Collector(tmp_path).ctx)
    # with the encoder in models/text_encoders, the tokenizer.json is what is missing; then it runs
    te = tmp_path / "models" / "text_encoders"
    te.mkdir()
    shutil.copy(next((wan_folder / "text_encoder").glob("*.safetensors")), te / "umt5_tiny.safetensors")
    with pytest.raises(UserError, match="tokenizer.json"):
        V.run_video(_job(single / "wan_tiny.safetensors", tmp_path), Collector(tmp_path).ctx)
    _write_tokenizer(te / "tokenizer" / "tokenizer.json")
    result = V.run_video(_job(single / "wan_tiny.safetensors", tmp_path, steps=1), Collector(tmp_path).ctx)
    assert result["files"]["vae"].endswith("wan_vae.safetensors")


def test_bad_jobs_are_refused_before_loading(tmp_path):
    ctx = Collector(tmp_path).ctx
    for kw, match in (({"model": ""}, "Pick a Wan model"), ({"steps": 0}, "steps 0"),
                      ({"sampler": "dpm"}, "unknown flow sampler"), ({"shift": 0.0}, "shift"),
                      ({"image": str(tmp_path / "nope.png")}, "does not exist")):
        job = VideoJob(**{"model": "x", "width": 32, "height": 32, **kw})
        with pytest.raises(UserError, match=match):
            V.run_video(job, ctx)


def test_cli_generate_video_runs_through_the_engine(wan_folder, tmp_path, capsys, engine, monkeypatch):
    import argparse
    import contextlib

    import studio.cli
    from studio.cli import _engine_args
    from studio.cli_video import add_video_parser

    # the session's engine process stands in for the one the CLI would start (and must not close)
    monkeypatch.setattr(studio.cli, "make_client", lambda args: contextlib.nullcontext(engine))

    parser = argparse.ArgumentParser()
    add_video_parser(parser.add_subparsers(dest="kind"), _engine_args)
    out = tmp_path / "cli.mp4"
    args = parser.parse_args(["video", "--model", str(wan_folder), "--prompt", "a fox", "--frames", "6", "--fps", "8",
                              "--width", "32", "--height", "32", "--steps", "1", "--cfg", "3", "--shift", "3",
                              "--seed", "4", "--out", str(out), "--device", "cpu", "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(out) and result["job"]["frames"] == 5 and result["notes"]
    assert video_info(out)["frames"] == 5
    bad = parser.parse_args(["video", "--model", str(wan_folder), "--prompt", "x", "--width", "500", "--height",
                             "32", "--device", "cpu"])
    assert bad.func(bad) == 1
    assert "496 or 512" in capsys.readouterr().err
