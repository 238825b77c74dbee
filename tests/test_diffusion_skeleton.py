"""The diffusion skeleton's shared helpers, and the one memory manager behind image, video and chat:
placement under a small budget and the one out-of-memory path every job goes through."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.engine.context import JobContext, ModelCache, UserError
from studio.engine.device import probe
from studio.engine.memory import MemoryManager, Policy
from studio.engine.pipelines.diffusion.files import find_companion, read_state_dict
from studio.engine.pipelines.diffusion.skeleton import compute_dtype, load_image

# Every OOM a job cannot recover from reads the same way, whatever the job.
OOM_MESSAGE = re.compile(r"^ran out of VRAM again with [a-z ]+: needs \S+ \S+ VRAM \+ \S+ \S+ RAM; has .+; try \S")


# ---------------------------------------------------------------------------------- images


@pytest.fixture
def striped(tmp_path) -> Path:
    """40x20: a green stripe in the left 8 columns, red elsewhere."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :, 0] = 255
    arr[:, :8] = (0, 255, 0)
    path = tmp_path / "striped.png"
    Image.fromarray(arr).save(path)
    return path


def test_load_image_stretch_keeps_the_whole_picture_in_0_to_1(striped):
    t = load_image(str(striped), 16, 16, fit="stretch", value_range="0..1")
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32
    assert 0.0 <= t.min() and t.max() <= 1.0
    assert t[0, 1, :, 0].mean() > 0.9  # the stripe is squeezed, not cut: still in the first column


def test_load_image_cover_crops_the_centre_without_stretching_in_minus_1_to_1(striped):
    t = load_image(str(striped), 16, 16, fit="cover", value_range="-1..1")
    assert t.shape == (1, 3, 16, 16)
    assert t.min() >= -1.0 and t.max() <= 1.0 and t.min() < -0.9  # black channels reach -1
    assert t[0, 1].max() < -0.9  # the stripe lay outside the centred square: no green left
    assert t[0, 0].min() > 0.9


def test_load_image_gray_mode_and_bad_input(striped, tmp_path):
    assert load_image(str(striped), 8, 8, fit="stretch", value_range="0..1", mode="L").shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="fit must be"):
        load_image(str(striped), 8, 8, fit="squash", value_range="0..1")  # type: ignore[arg-type]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="Cannot read the image bad.png") as err:
        load_image(str(tmp_path / "bad.png"), 8, 8, fit="cover", value_range="-1..1")
    assert err.value.kind == "bad_input"


def test_compute_dtype_follows_the_device_profile():
    cpu = probe("cpu")
    assert compute_dtype(JobContext("j", cpu)) is torch.float32


# ---------------------------------------------------------------------------------- files


def test_companion_is_found_beside_the_model_and_in_comfyui_subfolders(tmp_path):
    from safetensors.torch import save_file

    models = tmp_path / "models"
    model = models / "diffusion_models" / "wan.safetensors"
    nested = models / "vae" / "wan" / "wan_2.1_vae.safetensors"  # users sort ComfyUI folders into subfolders
    for p in (model, nested):
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.zeros(1)}, str(p))
    (models / "vae" / "notes.txt").write_text("not weights")

    def is_vae(p: Path) -> bool:
        return p.parent.name == "wan"

    assert find_companion(model, ("vae",), is_vae) == nested
    beside = model.parent / "vae.safetensors"  # the model's own folder is searched first
    save_file({"x": torch.zeros(1)}, str(beside))
    assert find_companion(model, ("vae",), lambda p: p.stem.startswith(("vae", "wan_"))) == beside
    assert find_companion(model, ("vae",), lambda p: True) != model  # never the model itself
    assert find_companion(model, ("vae",), lambda p: False) is None


def test_read_state_dict_merges_shards_and_names_a_damaged_file(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "part-1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(folder / "part-2.safetensors"))
    sd = read_state_dict(folder)
    assert set(sd) == {"a", "b"} and sd["b"].shape == (3,)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="broken.safetensors") as err:
        read_state_dict(tmp_path / "broken.safetensors")
    assert err.value.kind == "bad_model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No weights in"):
        read_state_dict(tmp_path / "empty")


# ---------------------------------------------------------------------------------- video placement


@pytest.fixture(scope="module")
def wan_deep(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from video_fixtures import build_wan_folder

    # 8 blocks: streaming two at a time needs a quarter of the transformer
    return build_wan_folder(tmp_path_factory.mktemp("wan8") / "Wan-tiny-Diffusers", layers=8)


def test_video_under_a_small_vram_budget_streams_the_transformer_through_the_manager(wan_deep, tmp_path):
    from video_fixtures import make_job

    from studio.engine.pipelines.diffusion import wan as V
    from studio.media.video import read_frames

    def run(budget: int, name: str):
        profile = probe("cpu")
        ctx = JobContext("j", profile, models=ModelCache(), settings={"outputs": str(tmp_path)})
        ctx.memory = MemoryManager(profile, budget_bytes=budget or None)  # the engine's manager with --vram-budget
        result = V.run_video(make_job(wan_deep, tmp_path, steps=2, out=str(tmp_path / name)), ctx)
        return result, ctx.memory

    resident, mem_r = run(0, "r.mp4")
    streamed, mem_s = run(4 << 20, "s.mp4")  # the transformer is 5.4 MB; two of its blocks 1.8 MB
    key = next(n for n in mem_s.names() if n.endswith("|transformer"))
    assert mem_s.policy_of(key) is Policy.BLOCK_STREAM
    assert mem_r.policy_of(next(n for n in mem_r.names() if n.endswith("|transformer"))) is Policy.RESIDENT
    assert any(n.startswith("memory: streaming transformer") and "4.0 MiB VRAM budget" in n
               for n in streamed.notes)
    a, b = (np.stack(list(read_frames(r.path))) for r in (resident, streamed))
    np.testing.assert_array_equal(a, b)  # streaming moves weights, never changes the numbers


# ---------------------------------------------------------------------------------- one OOM path


def _oom_once_more(calls: list):
    def forward(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return forward


def _assert_one_oom_path(err: pytest.ExceptionInfo, calls: list, progress: list[str], advice: str) -> None:
    assert err.value.kind == "out_of_memory"
    assert OOM_MESSAGE.match(err.value.message), err.value.message
    assert advice in err.value.message
    assert len(calls) == 2  # tried, freed and retried once more frugally, then gave up
    assert any(re.match(r"ran out of VRAM with [a-z ]+; retrying with [a-z ]+$", p) for p in progress)


def test_image_out_of_memory_retries_once_then_fails_with_numbers(tmp_path, monkeypatch):
    from sd_fixtures import tiny_sd1

    from studio.engine.pipelines.diffusion.sd import run_image
    from studio.models.unet import UNet
    from studio.protocol import ImageJob

    ckpt = tiny_sd1(tmp_path / "tiny.safetensors")
    calls, progress = [], []
    monkeypatch.setattr(UNet, "forward", _oom_once_more(calls))
    ctx = JobContext("j", probe("cpu"), settings={"outputs": str(tmp_path)},
                     on_progress=lambda s, t, stage: progress.append(stage))
    with pytest.raises(UserError) as err:
        run_image(ImageJob(model=str(ckpt), prompt="fox", width=64, height=64, steps=2, seed=1), ctx)
    _assert_one_oom_path(err, calls, progress, "try a smaller image size")


def test_video_out_of_memory_retries_once_then_fails_with_numbers(wan_deep, tmp_path, monkeypatch):
    from video_fixtures import make_job

    from studio.engine.pipelines.diffusion import wan as V
    from studio.models.wan import WanTransformer

    calls, progress = [], []
    monkeypatch.setattr(WanTransformer, "forward", _oom_once_more(calls))
    ctx = JobContext("j", probe("cpu"), models=ModelCache(), settings={"outputs": str(tmp_path)},
                     on_progress=lambda s, t, stage: progress.append(stage))
    with pytest.raises(UserError) as err:
        V.run_video(make_job(wan_deep, tmp_path, steps=1), ctx)
    _assert_one_oom_path(err, calls, progress, "try a smaller or shorter video")


def test_chat_out_of_memory_retries_once_then_fails_with_numbers(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_chat_pipeline import make_folder

    from studio.engine.pipelines import chat
    from studio.protocol import ChatJob

    folder = make_folder(tmp_path / "tiny_chat")
    calls, progress = [], []
    raise_oom = _oom_once_more(calls)

    def generate_tokens(*args, **kwargs):
        raise_oom()
        yield 0  # a generator, as the real one is

    monkeypatch.setattr(chat, "generate_tokens", generate_tokens)
    ctx = JobContext("j", probe("cpu"), models=ModelCache(), on_progress=lambda s, t, stage: progress.append(stage))
    with pytest.raises(UserError) as err:
        chat.run_chat(ChatJob(model=str(folder), messages=[{"role": "user", "content": "w9 w10"}], max_tokens=4), ctx)
    _assert_one_oom_path(err, calls, progress, "try int4")


def test_chat_that_already_streamed_text_is_not_rerun_after_an_out_of_memory(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_chat_pipeline import make_folder

    from studio.engine.pipelines import chat
    from studio.protocol import ChatJob

    folder = make_folder(tmp_path / "tiny_chat")
    calls = []

    def generate_tokens(*args, **kwargs):
        calls.append(1)
        yield 20  # a word reaches the user...
        raise torch.OutOfMemoryError("CUDA out of memory")  # ...then the device runs out

    monkeypatch.setattr(chat, "generate_tokens", generate_tokens)
    tokens: list[str] = []
    ctx = JobContext("j", probe("cpu"), models=ModelCache(), on_token=tokens.append)
    with pytest.raises(UserError, match=r"^ran out of VRAM with all resident: needs") as err:
        chat.run_chat(ChatJob(model=str(folder), messages=[{"role": "user", "content": "w9"}], max_tokens=4,
                              stop=[]), ctx)
    assert err.value.kind == "out_of_memory" and len(calls) == 1


def test_an_oom_outside_any_plan_is_worded_by_the_manager():
    mm = MemoryManager(probe("cpu"), budget_bytes=1 << 30)
    mm.register("sd:x|unet", torch.nn.Linear(4, 4))
    with mm.use("sd:x|unet"):
        pass
    err = mm.out_of_memory()
    assert err.kind == "out_of_memory"
    assert re.match(r"^ran out of VRAM outside a planned step: \S+ \S+ was held \(unet \S+ \S+\); has 1.0 GiB "
                    r"VRAM budget; .* try again", err.message), err.message
    assert not mm.on_device("sd:x|unet")  # freed


@pytest.mark.gpu
def test_cuda_chat_model_evicted_by_another_job_comes_back_and_answers_the_same(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("transformers")
    from test_chat_pipeline import make_folder

    from studio.engine.pipelines.chat import run_chat
    from studio.protocol import ChatJob

    folder = make_folder(tmp_path / "tiny_chat")
    gpu = probe("cuda")
    ctx = JobContext("j", gpu, models=ModelCache(), settings={"chat_context_length": 256})
    ctx.memory = MemoryManager(gpu, budget_bytes=1 << 30)
    job = ChatJob(model=str(folder), messages=[{"role": "user", "content": "w9 w10"}], max_tokens=12,
                  temperature=0.0)
    first = run_chat(job, ctx)
    name = next(n for n in ctx.memory.names() if n.endswith("|llm"))
    assert ctx.memory.on_device(name)
    ctx.memory.register("sd:other|unet", torch.nn.Linear(8, 8))
    ctx.memory.make_room(ctx.memory.budget, keep="sd:other|unet")  # another job needs the whole card
    assert not ctx.memory.on_device(name)
    again = run_chat(job, ctx)  # back on the device, its decode graphs rebuilt on the new copy
    assert again.text == first.text and again.completion_tokens == 12 and ctx.memory.on_device(name)
