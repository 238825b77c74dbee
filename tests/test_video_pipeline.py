"""The Wan video pipeline end to end on tiny random models written as a diffusers Wan folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.engine.context import JobCancelled, UserError
from studio.engine.pipelines.diffusion import wan as V
from studio.media.video import read_frames, read_mp4_metadata, video_info
from studio.protocol import VideoJob

pytest.importorskip("diffusers")  # the tiny models are written with diffusers / transformers, in their layouts
pytest.importorskip("transformers")

from video_fixtures import (  # noqa: E402
    TEXT_DIM,
    Collector,
    build_wan_folder,
    jiggle,
    make_job,
    write_tokenizer,
)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    return build_wan_folder(tmp_path_factory.mktemp("wan") / "Wan-tiny-Diffusers")


def test_text_to_video_writes_an_mp4_with_the_right_frames_size_and_job(wan_folder, tmp_path):
    col = Collector(tmp_path)
    result = V.run_video(make_job(wan_folder, tmp_path), col.ctx)
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
    t = result["timings"]
    assert set(t) == {"load", "encode", "sampling", "decode", "save", "per_step"} and min(t.values()) >= 0
    assert t["per_step"] == pytest.approx(t["sampling"] / 3, abs=1e-3)
    # a second run never overwrites the first
    again = V.run_video(make_job(wan_folder, tmp_path), Collector(tmp_path).ctx)
    assert Path(again["path"]) != path and path.exists()


def test_same_seed_gives_the_same_frames_and_another_seed_does_not(wan_folder, tmp_path):
    def frames(seed: int, name: str) -> np.ndarray:
        r = V.run_video(make_job(wan_folder, tmp_path, seed=seed, steps=2, out=str(tmp_path / name)), Collector(tmp_path).ctx)
        return np.stack(list(read_frames(r["path"])))

    a, b, c = frames(5, "a.mp4"), frames(5, "b.mp4"), frames(6, "c.mp4")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0



def test_frame_count_is_rounded_to_4n_plus_1_with_a_notice(wan_folder, tmp_path):
    assert [V.nearest_4n1(n) for n in (1, 2, 3, 4, 10, 11, 81, 0)] == [1, 1, 5, 5, 9, 13, 81, 1]
    result = V.run_video(make_job(wan_folder, tmp_path, frames=10, steps=1), Collector(tmp_path).ctx)
    assert result["videos"][0]["frames"] in (9, 13)
    assert video_info(result["path"])["frames"] == result["videos"][0]["frames"]
    assert any("10 frames became" in n for n in result["notes"])
    assert result["job"]["frames"] == result["videos"][0]["frames"]


def test_sizes_not_divisible_by_16_are_refused_with_the_nearest_valid_sizes(wan_folder, tmp_path):
    with pytest.raises(UserError, match="496 or 512") as err:
        V.run_video(make_job(wan_folder, tmp_path, width=500), Collector(tmp_path).ctx)
    assert err.value.kind == "bad_input" and "Width 500" in err.value.message
    with pytest.raises(UserError, match="Height 40 .* use 32 or 48"):
        V.run_video(make_job(wan_folder, tmp_path, height=40), Collector(tmp_path).ctx)
    assert not (tmp_path / "clip.mp4").exists()


def test_cancel_stops_within_one_step(wan_folder, tmp_path):
    col = Collector(tmp_path)

    def on_progress(step, total, stage):
        col.progress.append((step, total, stage))
        if stage == "sampling" and step == 2:
            col.ctx.cancel.set()

    col.ctx.on_progress = on_progress
    with pytest.raises(JobCancelled):
        V.run_video(make_job(wan_folder, tmp_path, steps=6), col.ctx)
    assert col.steps() == [1, 2]
    assert not (tmp_path / "clip.mp4").exists()


def test_cancel_keeps_the_partial_video_when_asked(wan_folder, tmp_path):
    col = Collector(tmp_path, keep_partial_video=True)

    def on_progress(step, total, stage):
        col.progress.append((step, total, stage))
        if stage == "sampling" and step == 1:
            col.ctx.cancel.set()

    col.ctx.on_progress = on_progress
    result = V.run_video(make_job(wan_folder, tmp_path, steps=5), col.ctx)
    assert result["partial"] and col.steps() == [1]
    assert any("Cancelled after step 1 of 5" in n for n in result["notes"])
    assert video_info(result["path"])["frames"] == 5
    assert json.loads(Path(result["videos"][0]["sidecar"]).read_text())["partial"] is True


def test_missing_parts_name_the_file_to_install(wan_folder, tmp_path):
    import shutil

    single = tmp_path / "models" / "diffusion_models"
    single.mkdir(parents=True)
    from safetensors.torch import save_file

    from studio.models.weights_io import load_weights

    sd = load_weights(next((wan_folder / "transformer").glob("*.safetensors")))
    save_file({k: v.contiguous() for k, v in sd.items()}, single / "wan_tiny.safetensors")
    with pytest.raises(UserError, match="wan_2.1_vae.safetensors") as err:
        V.run_video(make_job(single / "wan_tiny.safetensors", tmp_path), Collector(tmp_path).ctx)
    assert err.value.kind == "model_not_found"
    # with a VAE in ComfyUI's models/vae, the next thing missing is the text encoder
    (tmp_path / "models" / "vae").mkdir()
    shutil.copy(next((wan_folder / "vae").glob("*.safetensors")), tmp_path / "models" / "vae" / "wan_vae.safetensors")
    with pytest.raises(UserError, match="umt5_xxl"):
        V.run_video(make_job(single / "wan_tiny.safetensors", tmp_path), Collector(tmp_path).ctx)
    # with the encoder in models/text_encoders, the tokenizer.json is what is missing; then it runs
    te = tmp_path / "models" / "text_encoders"
    te.mkdir()
    shutil.copy(next((wan_folder / "text_encoder").glob("*.safetensors")), te / "umt5_tiny.safetensors")
    with pytest.raises(UserError, match="tokenizer.json"):
        V.run_video(make_job(single / "wan_tiny.safetensors", tmp_path), Collector(tmp_path).ctx)
    write_tokenizer(te / "tokenizer" / "tokenizer.json")
    result = V.run_video(make_job(single / "wan_tiny.safetensors", tmp_path, steps=1), Collector(tmp_path).ctx)
    assert result["files"]["vae"].endswith("wan_vae.safetensors")


def test_init_image_on_a_text_to_video_model_is_refused(wan_folder, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "start.png")
    with pytest.raises(UserError, match="cannot start from an image") as err:
        V.run_video(make_job(wan_folder, tmp_path, image=str(tmp_path / "start.png")), Collector(tmp_path).ctx)
    assert err.value.kind == "unsupported"


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

    from studio.cli import common
    from studio.cli.video import add_video_parser

    # the session's engine process stands in for the one the CLI would start (and must not close)
    monkeypatch.setattr(common, "make_client", lambda args: contextlib.nullcontext(engine))

    parser = argparse.ArgumentParser()
    add_video_parser(parser.add_subparsers(dest="kind"), common.engine_args)
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


def test_block_streaming_gives_the_same_video_as_resident_weights(wan_folder, tmp_path):
    from studio.engine.context import ModelCache

    def frames(**settings) -> tuple[np.ndarray, dict]:
        col = Collector(tmp_path, **settings)
        col.ctx.models = ModelCache()  # a fresh load: placement is decided when the model is loaded
        r = V.run_video(make_job(wan_folder, tmp_path, steps=2, out=str(tmp_path / "s.mp4")), col.ctx)
        return np.stack(list(read_frames(r["path"]))), r

    resident, r1 = frames()
    streamed, r2 = frames(video_offload="stream")
    np.testing.assert_array_equal(streamed, resident)
    assert not any("stream" in n for n in r1["notes"])
    assert any(n.startswith("memory: streaming transformer, text_encoder blocks") for n in r2["notes"])


def test_cli_job_uses_absolute_paths_and_the_progress_line_shows_time_left(tmp_path, monkeypatch):
    import argparse
    import io

    from studio.cli.video import ProgressLine, add_video_parser, job_from_args
    from studio.protocol import make

    parser = argparse.ArgumentParser()
    add_video_parser(parser.add_subparsers(dest="kind"), lambda p: None)
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    job = job_from_args(parser.parse_args(["video", "--model", "model.safetensors", "--prompt", "p", "--out",
                                           "out.mp4", "--image", "im.png"]))
    assert job.model == str(tmp_path / "model.safetensors") and job.out == str(tmp_path / "out.mp4")
    assert job.image == str(tmp_path / "im.png")
    named = job_from_args(parser.parse_args(["video", "--model", "wan-1.3b", "--prompt", "p"]))
    assert named.model == "wan-1.3b" and named.frames == 81 and named.sampler == "unipc"

    now = [0.0]
    out = io.StringIO()
    line = ProgressLine(out, clock=lambda: now[0])
    line(make("progress", job_id="j", step=0, total=10, stage="sampling"))
    now[0] = 4.0
    line(make("progress", job_id="j", step=2, total=10, stage="sampling"))
    assert out.getvalue().endswith("sampling   2/10  ~16 s left      ")


def test_out_of_memory_while_sampling_retries_more_frugally_then_says_what_to_do(wan_folder, tmp_path, monkeypatch):
    col = Collector(tmp_path)
    parts = V.load_parts(make_job(wan_folder, tmp_path), col.ctx, torch.float32)  # the cached parts run_video uses
    calls = []

    def oom(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(parts.transformer, "forward", oom)
    with pytest.raises(UserError, match=r"^ran out of VRAM again with model offload: needs .* VRAM \+ .* RAM; "
                       r"has .*; try a smaller or shorter video") as err:
        V.run_video(make_job(wan_folder, tmp_path, steps=1), col.ctx)
    assert err.value.kind == "out_of_memory" and len(calls) == 2  # the first try and one retry
    assert any("retrying with model offload" in st for _, _, st in col.progress)


def test_wan21_i2v_from_comfyui_files_finds_clip_vision_and_writes_an_mp4(wan_folder, tmp_path):
    """Wan 2.1 I2V as ComfyUI users have it: a transformer file in models/diffusion_models, the CLIP
    vision file (HF names under vision_model., like clip_vision_h.safetensors) in models/clip_vision."""
    import shutil

    import transformers
    from diffusers import WanTransformer3DModel
    from PIL import Image
    from safetensors.torch import save_file

    models = tmp_path / "models"
    for sub, src in (("vae", "vae"), ("text_encoders", "text_encoder")):
        (models / sub).mkdir(parents=True)
        shutil.copy(next((wan_folder / src).glob("*.safetensors")), models / sub / f"{src}.safetensors")
    write_tokenizer(models / "text_encoders" / "tokenizer" / "tokenizer.json")
    torch.manual_seed(5)
    net = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=36,
                                out_channels=16, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=1,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
                                image_dim=32, added_kv_proj_dim=128)
    jiggle(net)
    (models / "diffusion_models").mkdir()
    model_file = models / "diffusion_models" / "wan2.1_i2v_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, model_file)
    Image.new("RGB", (40, 32), (200, 120, 30)).save(tmp_path / "start.png")
    job = make_job(model_file, tmp_path, image=str(tmp_path / "start.png"), steps=2)

    with pytest.raises(UserError, match="clip_vision_h.safetensors") as err:
        V.run_video(job, Collector(tmp_path).ctx)
    assert err.value.kind == "model_not_found"

    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=28,
        patch_size=7, projection_dim=16))
    jiggle(clip, 0.1)
    sd = {k if k.startswith(("vision_model.", "visual_projection.")) else "vision_model." + k: v.contiguous()
          for k, v in clip.state_dict().items()}
    (models / "clip_vision").mkdir()
    save_file(sd, models / "clip_vision" / "clip_vision_tiny.safetensors")
    result = V.run_video(job, Collector(tmp_path).ctx)
    assert result["files"]["image_encoder"].endswith("clip_vision_tiny.safetensors")
    info = video_info(result["path"])
    assert (info["frames"], info["width"], info["height"]) == (5, 32, 32)

    with pytest.raises(UserError, match="give it an init image"):
        V.run_video(make_job(model_file, tmp_path, steps=1), Collector(tmp_path).ctx)


def _clip_vision_file(path: Path, width: int = 32) -> Path:
    import transformers
    from safetensors.torch import save_file

    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=28,
        patch_size=7))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"vision_model." + k: v.contiguous() for k, v in clip.state_dict().items()}, path)
    return path


def test_clip_vision_in_the_library_is_found_by_its_header(tmp_path, monkeypatch):
    """The library lists CLIP vision files as unrecognised (detect has no kind for them): the pipeline
    finds one by its tensor names, whatever the file is called."""
    from studio.library.library import Library

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    model_file = tmp_path / "alone" / "wan_i2v.safetensors"
    model_file.parent.mkdir()
    model_file.write_bytes(b"")
    assert V.find_image_encoder(model_file) is None
    encoder = _clip_vision_file(tmp_path / "downloads" / "model.safetensors")
    with Library() as lib:
        lib.add(encoder)
    assert V.find_image_encoder(model_file) == encoder


def test_image_encoder_of_the_wrong_width_or_an_flf2v_model_is_refused(tmp_path):
    from studio.models.wan import WanConfig

    encoder = _clip_vision_file(tmp_path / "clip_vision" / "clip_small.safetensors", width=16)
    parts = {"image_encoder": encoder}
    with pytest.raises(UserError, match="16-wide features but the transformer takes 32") as err:
        V.load_image_encoder(WanConfig(image_dim=32), parts, tmp_path / "wan.safetensors", torch.float32)
    assert err.value.kind == "bad_model"
    with pytest.raises(UserError, match="FLF2V") as err:
        V.load_image_encoder(WanConfig(image_dim=32, image_pos_len=514), parts, tmp_path / "w.safetensors",
                             torch.float32)
    assert err.value.kind == "unsupported"
    assert V.load_image_encoder(WanConfig(), {}, tmp_path / "w.safetensors", torch.float32) is None



@pytest.mark.gpu
def test_cuda_video_is_reproducible_and_the_text_encoder_goes_back_to_pinned_ram(wan_folder, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from studio.engine.context import ModelCache
    from studio.engine.device import probe

    cpu = V.run_video(make_job(wan_folder, tmp_path, steps=2, out=str(tmp_path / "c.mp4")), Collector(tmp_path).ctx)
    col = Collector(tmp_path)
    col.ctx.device, col.ctx.models = probe("cuda"), ModelCache()
    job = make_job(wan_folder, tmp_path, steps=2, out=str(tmp_path / "g.mp4"))
    gpu = V.run_video(job, col.ctx)
    again = V.run_video(job, col.ctx)  # warm parts: the encoder comes in from its pinned copy again
    a, b, c = (np.stack(list(read_frames(r["path"]))) for r in (cpu, gpu, again))
    assert a.shape == b.shape and np.array_equal(b, c)
    # the job ran with its own manager: every part is back in RAM for the next job
    parts = [col.ctx.models.get(e["key"]) for e in col.ctx.models.summary()]
    parts = [p for p in parts if isinstance(p, V.WanParts)]
    assert parts and all(p.device.type == "cpu" for p in parts[0].encoder.parameters())
