"""SD1/SDXL pipeline end to end on tiny single-file checkpoints: txt2img, img2img, inpaint, LoRA, PNGs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sd_fixtures import tiny_lora, tiny_sd1, tiny_sdxl

from studio.engine.context import CancelToken, JobCancelled, JobContext, ModelCache, UserError
from studio.engine.device import probe
from studio.engine.pipelines.diffusion.sd import run_image
from studio.library.pngmeta import read_png_parameters
from studio.models.sd_checkpoint import load_sd
from studio.protocol import ImageJob


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_sd1(tmp_path_factory.mktemp("sd") / "tiny-sd1.safetensors")


@pytest.fixture(scope="module")
def xl_ckpt(tmp_path_factory) -> Path:
    return tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors")


@pytest.fixture(scope="module")
def models() -> ModelCache:
    return ModelCache()


class Recorder:
    def __init__(self, tmp: Path, models: ModelCache, cancel_after: int | None = None) -> None:
        self.events: list = []
        self.cancel = CancelToken()
        self.ctx = JobContext("job", probe("cpu"), cancel=self.cancel, models=models, settings={"outputs": str(tmp)},
                              on_progress=self.progress, on_preview=self.preview)
        self.cancel_after = cancel_after

    def progress(self, step, total, stage):
        self.events.append(("progress", step, total, stage))
        if self.cancel_after is not None and stage == "sampling" and step >= self.cancel_after:
            self.cancel.set()

    def preview(self, data, mime, w, h):
        self.events.append(("preview", data[:2], mime))


def job(model: Path, **kw) -> ImageJob:
    base = dict(model=str(model), prompt="a red fox in the snow", negative="blurry", width=64, height=64, steps=4,
                cfg=5.0, sampler="euler", seed=42)
    return ImageJob(**{**base, **kw})


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_txt2img_is_deterministic_for_a_seed_and_differs_for_another(ckpt, models, tmp_path):
    a = run_image(job(ckpt), Recorder(tmp_path, models).ctx)
    b = run_image(job(ckpt), Recorder(tmp_path, models).ctx)
    c = run_image(job(ckpt, seed=43), Recorder(tmp_path, models).ctx)
    pa, pb, pc = (pixels(r["images"][0]["path"]) for r in (a, b, c))
    assert pa.shape == (64, 64, 3)
    assert np.array_equal(pa, pb)
    assert np.abs(pa - pc).mean() > 1
    assert a["images"][0]["path"] != b["images"][0]["path"]  # never overwritten
    assert a["family"] == "sd1" and a["prediction"] == "eps"


def test_every_sampler_and_schedule_produces_an_image(ckpt, models, tmp_path):
    for sampler in ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "lcm"):
        r = run_image(job(ckpt, sampler=sampler, steps=3, previews=False), Recorder(tmp_path, models).ctx)
        assert np.isfinite(pixels(r["images"][0]["path"])).all()
    for schedule in ("normal", "karras", "exponential", "sgm_uniform"):
        run_image(job(ckpt, schedule=schedule, steps=3, previews=False), Recorder(tmp_path, models).ctx)


def test_progress_and_a_preview_every_step(ckpt, models, tmp_path):
    rec = Recorder(tmp_path, models)
    run_image(job(ckpt, steps=5), rec.ctx)
    sampling = [e for e in rec.events if e[0] == "progress" and e[3] == "sampling"]
    assert [e[1] for e in sampling] == [1, 2, 3, 4, 5] and all(e[2] == 5 for e in sampling)
    previews = [e for e in rec.events if e[0] == "preview"]
    assert len(previews) == 5 and all(p[1] == b"\xff\xd8" and p[2] == "image/jpeg" for p in previews)


def test_cancel_stops_within_one_step(ckpt, models, tmp_path):
    rec = Recorder(tmp_path, models, cancel_after=2)
    with pytest.raises(JobCancelled):
        run_image(job(ckpt, steps=20), rec.ctx)
    steps = [e[1] for e in rec.events if e[0] == "progress" and e[3] == "sampling"]
    assert max(steps) == 2


def test_png_metadata_round_trips_and_reruns_the_same_image(ckpt, models, tmp_path):
    r = run_image(job(ckpt, prompt="a (red:1.3) fox, [snow]", seed=7), Recorder(tmp_path, models).ctx)
    path = r["images"][0]["path"]
    params = read_png_parameters(path)
    assert params["prompt"] == "a (red:1.3) fox, [snow]" and params["seed"] == 7 and params["steps"] == 4
    text = Image.open(path).text["parameters"]
    assert "Steps: 4" in text and "Seed: 7" in text and "Negative prompt: blurry" in text
    again = run_image(job(ckpt, prompt=params["prompt"], seed=params["seed"]), Recorder(tmp_path, models).ctx)
    assert np.array_equal(pixels(path), pixels(again["images"][0]["path"]))


def test_batches_use_consecutive_seeds_like_a1111(ckpt, models, tmp_path):
    r = run_image(job(ckpt, batch_size=2, batch_count=2, seed=100), Recorder(tmp_path, models).ctx)
    assert [i["seed"] for i in r["images"]] == [100, 101, 102, 103]
    single = run_image(job(ckpt, seed=101), Recorder(tmp_path, models).ctx)
    # batching is numerically close to running alone (batched matmuls may round differently)
    assert np.abs(pixels(r["images"][1]["path"]) - pixels(single["images"][0]["path"])).max() <= 2


def test_img2img_keeps_the_init_image_at_low_strength(ckpt, models, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))[..., None].repeat(3, 2)).save(init)
    # The random tiny VAE does not reconstruct the picture, so the reference is what img2img returns
    # when it barely denoises: the init image through encode + decode.
    kept = pixels(run_image(job(ckpt, init_image=str(init), strength=0.02, steps=20),
                            Recorder(tmp_path, models).ctx)["images"][0]["path"])
    weak = run_image(job(ckpt, init_image=str(init), strength=0.2), Recorder(tmp_path, models).ctx)
    strong = run_image(job(ckpt, init_image=str(init), strength=1.0), Recorder(tmp_path, models).ctx)
    near = np.abs(pixels(weak["images"][0]["path"]) - kept).mean()
    far = np.abs(pixels(strong["images"][0]["path"]) - kept).mean()
    assert near < far / 2


def test_inpainting_with_a_regular_model_keeps_pixels_outside_the_mask_close(ckpt, models, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((64, 64), np.uint8)
    m[:, 32:] = 255
    Image.fromarray(m).save(mask)
    a = run_image(job(ckpt, init_image=str(init), mask=str(mask), strength=1.0), Recorder(tmp_path, models).ctx)
    b = run_image(job(ckpt, init_image=str(init), mask=str(mask), strength=1.0, seed=99), Recorder(tmp_path, models).ctx)
    pa, pb = pixels(a["images"][0]["path"]), pixels(b["images"][0]["path"])
    left = np.abs(pa[:, :24] - pb[:, :24]).mean()
    right = np.abs(pa[:, 40:] - pb[:, 40:]).mean()
    assert left < right  # outside the mask both seeds keep the original; inside they differ


def test_inpaint_model_with_nine_channels_runs(tmp_path, models):
    path = tiny_sd1(tmp_path / "inpaint.safetensors", seed=3, in_channels=9)
    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask)
    r = run_image(job(path, init_image=str(init), mask=str(mask), strength=1.0), Recorder(tmp_path, models).ctx)
    assert len(r["images"]) == 1
    with pytest.raises(UserError, match="inpainting model"):
        run_image(job(path), Recorder(tmp_path, models).ctx)


def test_sdxl_single_file_runs_with_both_text_encoders(xl_ckpt, models, tmp_path):
    loaded = load_sd(xl_ckpt)
    assert loaded.family == "sdxl" and len(loaded.encoders) == 2
    assert loaded.encoders[1].config.projection_dim == 64
    r = run_image(job(xl_ckpt, steps=2), Recorder(tmp_path, models).ctx)
    assert r["family"] == "sdxl" and pixels(r["images"][0]["path"]).shape == (64, 64, 3)


def test_lora_changes_the_image_and_is_removed_again(ckpt, models, tmp_path):
    lora = tiny_lora(tmp_path / "style.safetensors")
    plain = run_image(job(ckpt), Recorder(tmp_path, models).ctx)
    styled = run_image(job(ckpt, loras=[{"path": str(lora), "weight": 0.8}]), Recorder(tmp_path, models).ctx)
    plain2 = run_image(job(ckpt), Recorder(tmp_path, models).ctx)
    pp, ps, pp2 = (pixels(r["images"][0]["path"]) for r in (plain, styled, plain2))
    assert np.abs(pp - ps).mean() > 0.5
    assert np.array_equal(pp, pp2)  # weights restored exactly
    peft = tiny_lora(tmp_path / "peft.safetensors", kohya=False)
    run_image(job(ckpt, loras=[{"path": str(peft), "weight": 1.0}, {"path": str(lora), "weight": 0.5}]),
              Recorder(tmp_path, models).ctx)


def test_lora_for_another_family_is_refused_clearly(xl_ckpt, ckpt, models, tmp_path):
    lora = tiny_lora(tmp_path / "sd1-style.safetensors")
    with pytest.raises(UserError, match="does not fit this sdxl model"):
        run_image(job(xl_ckpt, steps=1, loras=[{"path": str(lora), "weight": 1.0}]), Recorder(tmp_path, models).ctx)


@pytest.mark.parametrize("change,message", [
    ({"width": 65}, "multiple of 8: use 64 or 72"),
    ({"steps": 0}, "steps"),
    ({"sampler": "warp"}, "unknown sampler"),
    ({"strength": 0.0}, "strength"),
    ({"mask": "/tmp/m.png"}, "needs an image"),
    ({"model": ""}, "No image model chosen"),
    ({"model": "/nowhere/model.safetensors"}, "No image model .*/nowhere/model.safetensors.*studio models add FILE"),
])
def test_bad_input_is_refused_with_a_message_that_says_what_to_do(ckpt, models, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        run_image(job(change.pop("model", ckpt), **change), Recorder(tmp_path, models).ctx)


def test_the_wrong_kind_of_model_is_refused(tmp_path, models):
    lora = tiny_lora(tmp_path / "a-lora.safetensors")
    with pytest.raises(UserError, match="LoRA|UNet"):
        run_image(job(lora), Recorder(tmp_path, models).ctx)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError):
        run_image(job(garbage), Recorder(tmp_path, models).ctx)


def test_a_missing_vae_in_the_checkpoint_is_a_clear_error(tmp_path, models):
    from safetensors.torch import load_file, save_file

    full = tiny_sd1(tmp_path / "full.safetensors")
    sd = {k: v for k, v in load_file(str(full)).items() if not k.startswith("first_stage_model.")}
    save_file(sd, str(tmp_path / "novae.safetensors"))
    with pytest.raises(UserError, match="no VAE"):
        run_image(job(tmp_path / "novae.safetensors"), Recorder(tmp_path, models).ctx)
    # ... and a separate VAE file fixes it
    vae = {k: v for k, v in load_file(str(full)).items() if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    r = run_image(job(tmp_path / "novae.safetensors", vae=str(tmp_path / "vae.safetensors")),
                  Recorder(tmp_path, models).ctx)
    assert r["notes"] and "VAE from vae.safetensors" in r["notes"][0]


def test_nan_output_is_reported_with_the_usual_fix(ckpt, tmp_path):
    models = ModelCache()
    rec = Recorder(tmp_path, models)
    run_image(job(ckpt, steps=1), rec.ctx)
    (model,) = [models.get(m["key"]) for m in models.summary()]
    with torch.inference_mode():  # the engine loads weights under inference mode
        model.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(UserError, match="NaN"):
        run_image(job(ckpt, steps=1), Recorder(tmp_path, models).ctx)


def test_user_files_are_never_overwritten(ckpt, models, tmp_path):
    target = tmp_path / "mine.png"
    target.write_bytes(b"precious")
    r = run_image(job(ckpt, out=str(target)), Recorder(tmp_path, models).ctx)
    assert target.read_bytes() == b"precious"
    assert Path(r["images"][0]["path"]).name == "mine-00001.png"


def test_image_job_through_the_engine_process(engine, ckpt, tmp_path):
    from studio.protocol import ImageJob

    handle = engine.submit(ImageJob(model=str(ckpt), prompt="fox", width=64, height=64, steps=3, seed=1,
                                    out=str(tmp_path / "e2e.png")))
    result = handle.wait(120)
    kinds = [e.type for e in handle.events]
    assert kinds.count("progress") >= 3 and "preview" in kinds
    preview = next(e for e in handle.events if e.type == "preview")
    assert preview.payloads[0][:2] == b"\xff\xd8"
    assert Path(result["images"][0]["path"]).is_file()
    digest = hashlib.sha256(Path(result["images"][0]["path"]).read_bytes()).hexdigest()
    assert digest  # a real PNG was written by the engine process


def test_cli_generate_image_writes_a_png(ckpt, tmp_path):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "studio", "generate", "image", "--model", str(ckpt), "--prompt",
                          "fox", "--width", "64", "--height", "64", "--steps", "2", "--seed", "5", "--out",
                          str(tmp_path / "cli.png"), "--json", "--device", "cpu"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["images"][0]["seed"] == 5 and Path(result["images"][0]["path"]).name == "cli.png"




def test_an_installed_taesd_makes_the_previews(ckpt, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from studio.engine.previews import TAESD
    from studio.library.library import Library

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    torch.manual_seed(0)
    # a real-layout TAESD decoder (diffusers' AutoencoderTiny names), random weights
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny(latent_channels=4)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "taesd.safetensors"))
    with Library() as lib:
        lib.add(tmp_path / "taesd.safetensors")
    models = ModelCache()
    rec = Recorder(tmp_path, models)
    run_image(job(ckpt, steps=2), rec.ctx)
    assert isinstance(models.get("taesd:sd"), TAESD)
    previews = [e for e in rec.events if e[0] == "preview"]
    assert len(previews) == 2


def test_a_diffusers_folder_loads_like_the_single_file(ckpt, tmp_path, models):
    """Write the tiny checkpoint out as a diffusers folder (unet/, vae/, text_encoder/, tokenizer/)."""
    import json

    from safetensors.torch import save_file

    single = load_sd(ckpt)
    for name, module in (("unet", single.unet), ("vae", single.vae), ("text_encoder", single.encoders[0])):
        (tmp_path / "folder" / name).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                  str(tmp_path / "folder" / name / "diffusion_pytorch_model.safetensors"))
    # no text_encoder/config.json: the tiny CLIP's weights are quick_gelu but a 64-wide single file reads as
    # gelu (CLIP-L is the only quick_gelu tower), and a folder's config.json now wins over that guess
    (tmp_path / "folder" / "scheduler").mkdir()
    (tmp_path / "folder" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    folder = load_sd(tmp_path / "folder")
    assert folder.family == "sd1" and folder.prediction == "eps"
    a = run_image(job(ckpt), Recorder(tmp_path, models).ctx)
    b = run_image(job(tmp_path / "folder"), Recorder(tmp_path, models).ctx)
    assert np.array_equal(pixels(a["images"][0]["path"]), pixels(b["images"][0]["path"]))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_quantized_unet_makes_nearly_the_same_image_in_less_memory(xl_ckpt, tmp_path, mode):
    models = ModelCache()
    full = run_image(job(xl_ckpt, steps=2), Recorder(tmp_path, models).ctx)
    quant = run_image(job(xl_ckpt, steps=2, quant=mode), Recorder(tmp_path, models).ctx)
    assert any(f"UNet weights {mode}" in n for n in quant["notes"])
    diff = np.abs(pixels(full["images"][0]["path"]) - pixels(quant["images"][0]["path"])).mean()
    assert diff < 8  # a few levels out of 255 on average
    with pytest.raises(UserError, match="LoRAs cannot be applied"):
        run_image(job(xl_ckpt, quant=mode, loras=[{"path": "x", "weight": 1.0}]), Recorder(tmp_path, models).ctx)


def test_models_info_reports_what_quantization_saves_and_costs(xl_ckpt):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "studio", "models", "info", str(xl_ckpt), "--quant", "int8", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    q = json.loads(out.stdout)["quantization"]
    assert q["component"] == "unet" and q["bytes_quantized"] < q["bytes_original"]
    assert 0 < q["relative_error"] < 0.05


def test_a_prompt_longer_than_77_tokens_with_a_short_negative_runs(ckpt, models, tmp_path):
    long = ", ".join(["a red fox in deep snow under the northern lights"] * 12)  # several 77-token chunks
    r = run_image(job(ckpt, prompt=long, negative="", steps=2), Recorder(tmp_path, models).ctx)
    assert pixels(r["images"][0]["path"]).shape == (64, 64, 3)
