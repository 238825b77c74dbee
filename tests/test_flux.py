"""Flux.1: the transformer against diffusers' FluxTransformer2DModel in every layout, the schedule against
FlowMatchEulerDiscreteScheduler, and whole tiny generations against diffusers' FluxPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.errors import UserError
from studio.models.flux import (
    FluxConfig,
    FluxTransformer,
    image_ids,
    load_flux_transformer,
    normalize_state_dict,
    pack,
    unpack,
)
from tests.flux_fixtures import (
    AXES,
    build_comfy_tree,
    build_flux_folder,
    save,
    tiny_scheduler,
    tiny_transformer,
    to_bfl,
)
from tests.video_fixtures import Collector


def _inputs(seed: int = 0, batch: int = 2, lat: int = 8, txt_len: int = 5):
    g = torch.Generator().manual_seed(seed)
    img = pack(torch.randn(batch, 16, lat, lat, generator=g))
    txt = torch.randn(batch, txt_len, 32, generator=g)
    y = torch.randn(batch, 64, generator=g)
    return img, image_ids(lat, lat), txt, torch.zeros(txt_len, 3), torch.tensor([0.7, 0.25])[:batch], y


def _reference(net, img, ids, txt, tids, t, y, guidance):
    with torch.no_grad():
        return net(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=ids,
                   txt_ids=tids, guidance=guidance).sample


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("layout", ["diffusers", "bfl", "comfyui"])
def test_transformer_matches_diffusers_in_each_layout(guidance, layout):
    net = tiny_transformer(guidance)
    sd = dict(net.state_dict())
    if layout == "bfl":
        sd = to_bfl(sd)
    elif layout == "comfyui":
        sd = {"model.diffusion_model." + k: v for k, v in to_bfl(sd).items()}
    ours = load_flux_transformer(sd, axes_dim=AXES)
    assert ours.cfg.guidance_embed is guidance
    img, ids, txt, tids, t, y = _inputs()
    g = torch.tensor([3.5, 2.0]) if guidance else None
    want = _reference(net, img, ids, txt, tids, t, y, g)
    with torch.no_grad():
        got = ours(img, ids, txt, tids, t, y, g)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_guidance_value_changes_the_output():
    ours = load_flux_transformer(dict(tiny_transformer(True).state_dict()), axes_dim=AXES)
    img, ids, txt, tids, t, y = _inputs()
    with torch.no_grad():
        a, b = (ours(img, ids, txt, tids, t, y, torch.full((2,), g)) for g in (1.0, 4.0))
    assert (a - b).abs().max() > 1e-3


def test_diffusers_folder_config_gives_the_rope_axes(tmp_path):
    from studio.models.diffusers_config import read_config

    net = tiny_transformer(True)
    net.save_pretrained(tmp_path / "transformer")
    ours = load_flux_transformer(dict(net.state_dict()), config=read_config(tmp_path / "transformer"))
    assert ours.cfg.axes_dim == AXES and ours.cfg.heads == 2


def test_config_that_contradicts_the_weights_is_refused(tmp_path):
    net = tiny_transformer(False)
    with pytest.raises(UserError, match="attention heads"):
        load_flux_transformer(dict(net.state_dict()), config={"_class_name": "FluxTransformer2DModel",
                                                              "num_attention_heads": 4, "axes_dims_rope": list(AXES)})
    with pytest.raises(UserError, match="do not add up"):
        load_flux_transformer(dict(net.state_dict()), axes_dim=(16, 56, 56))


def test_not_a_flux_file_says_so():
    with pytest.raises(UserError, match="no Flux transformer"):
        load_flux_transformer({"blocks.0.attn.q.weight": torch.zeros(2, 2)})


def test_named_configs_have_published_sizes():
    with torch.device("meta"):
        n = sum(p.numel() for p in FluxTransformer(FluxConfig.named("dev")).parameters())
    assert 11.8e9 < n < 11.95e9  # Flux.1 dev: 11.9B parameters
    assert not FluxConfig.named("schnell").guidance_embed


def test_diffusers_and_bfl_names_convert_to_the_same_tensors():
    sd = dict(tiny_transformer(True).state_dict())
    a, b = normalize_state_dict(sd), normalize_state_dict(to_bfl(sd))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pack_and_unpack_are_inverse_and_match_diffusers():
    from diffusers import FluxPipeline

    lat = torch.randn(2, 16, 6, 8)
    assert torch.equal(pack(lat), FluxPipeline._pack_latents(lat, 2, 16, 6, 8))
    assert torch.equal(unpack(pack(lat), 6, 8), lat)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 8), ref_ids)


@pytest.mark.parametrize("guidance", [True, False])
def test_sigmas_match_flow_match_euler_scheduler(guidance):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from studio.engine.pipelines.diffusion.flux import flux_mu, flux_sigmas

    sched = tiny_scheduler(guidance)
    steps, seq = 7, 1024
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert flux_mu(seq) == pytest.approx(mu)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flux_sigmas(steps, seq, dynamic=guidance)
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------- whole generations

def _reference_image(folder, job, device="cpu"):
    """FluxPipeline on the same weights, fed our tokens' embeddings and our seeded noise."""
    import transformers
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    from studio.engine.pipelines.diffusion.skeleton import noise
    from studio.models.clip_tokenizer import ClipTokenizer
    from studio.models.t5 import T5Tokenizer

    net = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    clip = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    t5 = transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    pipe = FluxPipeline(scheduler=tiny_scheduler(net.config.guidance_embeds), vae=vae, text_encoder=clip,
                        tokenizer=None, text_encoder_2=t5, tokenizer_2=None, transformer=net)
    t5_len = 512 if net.config.guidance_embeds else 256
    ids, _ = T5Tokenizer(folder / "tokenizer_2" / "tokenizer.json")([job.prompt], max_length=t5_len, clean=False)
    clip_ids = torch.tensor([ClipTokenizer.bundled()(job.prompt)])
    with torch.no_grad():
        embeds = t5(ids).last_hidden_state
        pooled = clip(clip_ids).pooler_output
    lat = job.height // 2  # this tiny VAE downsamples by 2
    latents = FluxPipeline._pack_latents(noise((1, 16, lat, lat), job.seed, torch.device(device)), 1, 16, lat, lat)
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents, height=job.height,
               width=job.width, num_inference_steps=job.steps, guidance_scale=job.cfg, output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


def _job(model, tmp_path, **kw):
    from studio.protocol import ImageJob

    base = dict(model=str(model), prompt="a red fox in snow", width=32, height=32, steps=3, cfg=3.5,
                sampler="euler", seed=7, out=str(tmp_path / "out" / "flux.png"))
    base.update(kw)
    return ImageJob(**base)


def _ours(job, tmp_path):
    from PIL import Image

    from studio.engine.pipelines.diffusion.flux import run_image

    col = Collector(tmp_path)
    result = run_image(job, col.ctx)
    assert len(result.images) == 1 and result.family == "flux"
    assert col.steps() == [1, 2, 3] and col.previews
    with Image.open(result.images[0]["path"]) as im:
        assert "studio" in im.info and "parameters" in im.info
        return np.asarray(im.convert("RGB")), result


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_tiny_generation_matches_flux_pipeline(tmp_path, guidance):
    folder = build_flux_folder(tmp_path / "flux", guidance)
    job = _job(folder, tmp_path, steps=3)
    got, result = _ours(job, tmp_path)
    want = _reference_image(folder, job)
    assert want.std() > 5  # not a flat image
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_comfyui_files_find_their_vae_and_encoders(tmp_path):
    """A transformer in models/unet finds ae, clip_l, t5xxl (and the T5 tokenizer) in ComfyUI's folders and
    makes the same image as the diffusers folder of the same weights."""
    model = build_comfy_tree(tmp_path / "models")
    folder = build_flux_folder(tmp_path / "flux", True)
    got, result = _ours(_job(model, tmp_path, out=str(tmp_path / "a.png")), tmp_path)
    want, _ = _ours(_job(folder, tmp_path, out=str(tmp_path / "b.png")), tmp_path)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_missing_t5_names_the_file_to_install(tmp_path):
    model = build_comfy_tree(tmp_path / "models")
    (tmp_path / "models" / "text_encoders" / "t5xxl.safetensors").unlink()
    from studio.engine.pipelines.diffusion.flux import run_image

    with pytest.raises(UserError, match="t5xxl"):
        run_image(_job(model, tmp_path, out=str(tmp_path / "c.png")), Collector(tmp_path).ctx)


def test_unsupported_inputs_are_refused_before_loading(tmp_path):
    from studio.engine.pipelines.diffusion.flux import FAMILY

    col = Collector(tmp_path)
    with pytest.raises(UserError, match="multiple of 16"):
        FAMILY.validate(_job("x", tmp_path, width=40), col.ctx)
    with pytest.raises(UserError, match="quantization"):
        FAMILY.validate(_job("x", tmp_path, quant="int8"), col.ctx)
    with pytest.raises(UserError, match="needs an image"):
        FAMILY.validate(_job("x", tmp_path, mask="m.png"), col.ctx)
    _, notes = FAMILY.validate(_job("x", tmp_path, negative="blurry"), col.ctx)
    assert any("negative" in n for n in notes)


def test_bfl_file_with_save_roundtrip(tmp_path):
    """A BFL single file on disk (no prefix) loads through the engine's reader to the same module."""
    from studio.engine.pipelines.diffusion.files import read_state_dict

    net = tiny_transformer(False)
    path = save(to_bfl(net.state_dict()), tmp_path / "flux1-schnell.safetensors")
    ours = load_flux_transformer(read_state_dict(path, compact=True), axes_dim=AXES)
    img, ids, txt, tids, t, y = _inputs(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(img, ids, txt, tids, t, y), _reference(net, img, ids, txt, tids, t, y, None),
                                   atol=1e-4, rtol=1e-4)


def test_image_jobs_on_a_flux_model_are_routed_to_this_pipeline(tmp_path):
    from studio import families
    from studio.engine.pipelines.diffusion import pipeline_for, run_generation

    folder = build_flux_folder(tmp_path / "flux", False)
    assert pipeline_for(str(folder), families.Kind.IMAGE).__name__.endswith(".flux")
    job = _job(folder, tmp_path, steps=2, sampler="unipc")
    result = run_generation(job, Collector(tmp_path).ctx, families.Kind.IMAGE)
    assert result.family == families.FLUX and len(result.images) == 1


# ---------------------------------------------------------------------------------- quantized files

def test_gguf_flux_stays_compact_and_matches_the_dequantized_model(tmp_path):
    from test_diffusion_quant import _city96_types, _write_gguf

    from studio.engine.offload import estimate_module_bytes
    from studio.engine.pipelines.diffusion.files import read_state_dict
    from studio.nn.packed_gguf import GGUFLinear

    path = tmp_path / "flux1-dev-Q4_0.gguf"
    ref_sd = _write_gguf(path, to_bfl(tiny_transformer(True).state_dict()), "flux", _city96_types)
    ref = load_flux_transformer(ref_sd, dtype=torch.float32)
    ours = load_flux_transformer(read_state_dict(path, compact=True), dtype=torch.float32)
    img, ids, txt, tids, t, y = _inputs()
    g = torch.full((2,), 3.5)
    with torch.no_grad():
        torch.testing.assert_close(ours(img, ids, txt, tids, t, y, g), ref(img, ids, txt, tids, t, y, g),
                                   atol=1e-5, rtol=1e-5)
    assert isinstance(ours.double_blocks[0].img_attn.qkv, GGUFLinear)
    assert ours.double_blocks[0].img_attn.qkv.weight_q.type_name == "Q4_0"  # the file's blocks as stored
    assert estimate_module_bytes(ours) < 0.6 * estimate_module_bytes(ref)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_flux_keeps_fp8_linears(tmp_path, scaled):
    from safetensors.torch import save_file
    from test_diffusion_quant import _fp8

    from studio.engine.pipelines.diffusion.files import read_state_dict
    from studio.nn.packed_fp8 import Fp8Linear

    sd = {"model.diffusion_model." + k: v for k, v in to_bfl(tiny_transformer(True).state_dict()).items()}
    file_sd, ref_sd = _fp8(sd, scaled)
    save_file(file_sd, str(tmp_path / "flux1-dev-fp8.safetensors"))
    ref = load_flux_transformer(ref_sd, dtype=torch.float32)
    ours = load_flux_transformer(read_state_dict(tmp_path / "flux1-dev-fp8.safetensors", compact=True),
                                 dtype=torch.float32)
    img, ids, txt, tids, t, y = _inputs()
    g = torch.full((2,), 3.5)
    with torch.no_grad():
        torch.testing.assert_close(ours(img, ids, txt, tids, t, y, g), ref(img, ids, txt, tids, t, y, g),
                                   atol=1e-4, rtol=1e-4)
    lin = ours.single_blocks[1].linear1
    assert isinstance(lin, Fp8Linear) and lin.weight.dtype == torch.float8_e4m3fn


def test_comfyui_all_in_one_file_uses_the_encoders_and_vae_inside(tmp_path):
    """ComfyUI's all-in-one checkpoints: the transformer under model.diffusion_model., CLIP-L and T5 under
    text_encoders.*.transformer., the VAE (LDM names) under vae.; the image equals the diffusers folder's."""
    from studio.models.vae import to_ldm_vae
    from tests.flux_fixtures import tiny_clip, tiny_t5, tiny_vae
    from tests.video_fixtures import write_tokenizer

    sd = {"model.diffusion_model." + k: v for k, v in to_bfl(tiny_transformer(True).state_dict()).items()}
    sd.update({"text_encoders.clip_l.transformer." + k: v for k, v in tiny_clip().state_dict().items()})
    sd.update({"text_encoders.t5xxl.transformer." + k: v for k, v in tiny_t5().state_dict().items()})
    sd.update({"vae." + k: v for k, v in to_ldm_vae(tiny_vae().state_dict(), up_levels=2).items()})
    model = save(sd, tmp_path / "checkpoints" / "flux1-dev-fp8.safetensors")
    write_tokenizer(tmp_path / "checkpoints" / "tokenizer.json")
    folder = build_flux_folder(tmp_path / "flux", True)
    got, result = _ours(_job(model, tmp_path, out=str(tmp_path / "a.png")), tmp_path)
    want, _ = _ours(_job(folder, tmp_path, out=str(tmp_path / "b.png")), tmp_path)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_flux_under_a_small_vram_budget_streams_the_transformer_blocks(tmp_path):
    """The manager streams the transformer's double and single blocks (Part.blocks) under a tight budget;
    the image is the same as with everything resident."""
    from studio.engine.context import JobContext, ModelCache
    from studio.engine.device import probe
    from studio.engine.memory import MemoryManager, Policy
    from studio.engine.pipelines.diffusion.flux import run_image

    # 128-wide heads and 6 + 6 blocks: the transformer (79 MiB, 9 MiB a block) outweighs the encoders and VAE
    folder = build_flux_folder(tmp_path / "flux", True, layers=6, head_dim=128, axes=(16, 56, 56))

    def run(budget: int, name: str):
        profile = probe("cpu")
        ctx = JobContext("j", profile, models=ModelCache(), settings={"outputs": str(tmp_path)})
        ctx.memory = MemoryManager(profile, budget_bytes=budget or None)
        result = run_image(_job(folder, tmp_path, steps=2, out=str(tmp_path / name)), ctx)
        key = next(n for n in ctx.memory.names() if n.endswith("|transformer"))
        return result, ctx.memory.policy_of(key)

    resident, p_r = run(0, "r.png")
    streamed, p_s = run(32 << 20, "s.png")
    assert p_r is Policy.RESIDENT and p_s is Policy.BLOCK_STREAM
    assert any(n.startswith("memory: streaming transformer") for n in streamed.notes), streamed.notes
    from PIL import Image

    a, b = (np.asarray(Image.open(r.images[0]["path"])) for r in (resident, streamed))
    np.testing.assert_array_equal(a, b)


def test_a_new_seed_reuses_the_encoded_prompt(tmp_path):
    """The model stays cached between jobs; its prompt conditioning too: the second job's encoders never run."""
    from studio.engine.pipelines.diffusion.flux import run_image

    folder = build_flux_folder(tmp_path / "flux", False)
    col = Collector(tmp_path)
    run_image(_job(folder, tmp_path, steps=1, out=str(tmp_path / "a.png")), col.ctx)
    model = col.ctx.models.get(next(m["key"] for m in col.ctx.models.summary() if str(folder) in m["key"]))
    calls = []
    for enc in (model.t5, model.clip):
        enc.register_forward_hook(lambda *a: calls.append(1))
    run_image(_job(folder, tmp_path, steps=1, seed=8, out=str(tmp_path / "b.png")), col.ctx)
    assert calls == []
    run_image(_job(folder, tmp_path, steps=1, prompt="a cat", out=str(tmp_path / "c.png")), col.ctx)
    assert len(calls) == 2


def _init_png(path, size: int = 32):
    from PIL import Image

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_img2img_matches_flux_img2img_pipeline(tmp_path):
    """diffusers' FluxImg2ImgPipeline, given the start our path should reach (the VAE mean of the image, noised
    to the first kept sigma), runs the same truncated schedule and must land on the same image."""
    import transformers
    from diffusers import AutoencoderKL, FluxImg2ImgPipeline, FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from PIL import Image

    from studio.engine.pipelines.diffusion.flux import run_image
    from studio.engine.pipelines.diffusion.skeleton import load_image, noise
    from studio.models.clip_tokenizer import ClipTokenizer
    from studio.models.t5 import T5Tokenizer

    folder = build_flux_folder(tmp_path / "flux", True)
    init = _init_png(tmp_path / "init.png")
    job = _job(folder, tmp_path, steps=4, strength=0.5, init_image=str(init))
    col = Collector(tmp_path)
    result = run_image(job, col.ctx)
    assert col.steps() == [1, 2]  # the last half of 4 steps
    got = np.asarray(Image.open(result.images[0]["path"]).convert("RGB"))

    net = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    clip = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    t5 = transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()
    sched = tiny_scheduler(True)
    pipe = FluxImg2ImgPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=None, text_encoder_2=t5,
                               tokenizer_2=None, transformer=net)
    ids, _ = T5Tokenizer(folder / "tokenizer_2" / "tokenizer.json")([job.prompt], max_length=512, clean=False)
    with torch.no_grad():
        embeds = t5(ids).last_hidden_state
        pooled = clip(torch.tensor([ClipTokenizer.bundled()(job.prompt)])).pooler_output
        pixels = load_image(str(init), 32, 32, fit="stretch", value_range="-1..1")
        mean = vae.encode(pixels).latent_dist.mean
    lat = FluxPipeline._pack_latents((mean - 0.1159) * 0.3611, 1, 16, 16, 16)

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(64, 256, 4096, 0.5, 1.15))
    s0 = sched.sigmas[2]
    start = (1 - s0) * lat + s0 * FluxPipeline._pack_latents(noise((1, 16, 16, 16), job.seed, torch.device("cpu")),
                                                             1, 16, 16, 16)
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=pixels * 0.5 + 0.5, latents=start,
               strength=0.5, height=32, width=32, num_inference_steps=4, guidance_scale=job.cfg, output_type="np")
    want = (out.images[0] * 255).round().astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def _mask_png(path, size: int = 32):
    from PIL import Image

    m = np.zeros((size, size), dtype=np.uint8)
    m[:, size // 2:] = 255  # repaint the right half
    Image.fromarray(m).save(path)
    return path


def test_fill_model_matches_flux_fill_pipeline(tmp_path, monkeypatch):
    """Flux Fill: the masked image's latent and the mask folded into 2x2 patches join the input channels
    (64 + 64 + 4 x VAE-factor^2: 144 with this tiny VAE, 384 with Flux's). FluxFillPipeline builds them with its
    own code; it samples the VAE posterior, we take its mean (as for img2img), so the reference does too."""
    import transformers
    from diffusers import AutoencoderKL, FluxFillPipeline, FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux import pipeline_flux_fill
    from PIL import Image

    from studio.engine.pipelines.diffusion.flux import run_image
    from studio.engine.pipelines.diffusion.skeleton import noise
    from studio.models.clip_tokenizer import ClipTokenizer
    from studio.models.t5 import T5Tokenizer

    folder = build_flux_folder(tmp_path / "fill", True, in_channels=144)
    init, mask = _init_png(tmp_path / "init.png"), _mask_png(tmp_path / "mask.png")
    job = _job(folder, tmp_path, steps=3, cfg=30.0, init_image=str(init), mask=str(mask), strength=1.0)
    col = Collector(tmp_path)
    got = np.asarray(Image.open(run_image(job, col.ctx).images[0]["path"]).convert("RGB"))
    with pytest.raises(UserError, match="Fill"):
        run_image(_job(folder, tmp_path, steps=1), col.ctx)

    monkeypatch.setattr(pipeline_flux_fill, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    net = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    clip = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    t5 = transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()
    pipe = FluxFillPipeline(scheduler=tiny_scheduler(True), vae=vae, text_encoder=clip, tokenizer=None,
                            text_encoder_2=t5, tokenizer_2=None, transformer=net)
    ids, _ = T5Tokenizer(folder / "tokenizer_2" / "tokenizer.json")([job.prompt], max_length=512, clean=False)
    with torch.no_grad():
        embeds = t5(ids).last_hidden_state
        pooled = clip(torch.tensor([ClipTokenizer.bundled()(job.prompt)])).pooler_output
    latents = FluxPipeline._pack_latents(noise((1, 16, 16, 16), job.seed, torch.device("cpu")), 1, 16, 16, 16)
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=Image.open(init), mask_image=Image.open(mask),
               latents=latents, height=32, width=32, num_inference_steps=3, guidance_scale=30.0, output_type="np")
    want = (out.images[0] * 255).round().astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_inpainting_with_a_regular_model_matches_flux_inpaint_pipeline(tmp_path, monkeypatch):
    """dev with an init image and a mask: outside the mask every step lands on the original noised to its sigma
    (our x0 there is the original; diffusers blends the noised original in after each Euler step: the same
    numbers). At strength 1 both start from the noise alone; both take the VAE mean."""
    import transformers
    from diffusers import AutoencoderKL, FluxInpaintPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux import pipeline_flux_inpaint
    from PIL import Image

    from studio.engine.pipelines.diffusion.flux import run_image
    from studio.engine.pipelines.diffusion.skeleton import noise
    from studio.models.clip_tokenizer import ClipTokenizer
    from studio.models.t5 import T5Tokenizer

    folder = build_flux_folder(tmp_path / "flux", True)
    init, mask = _init_png(tmp_path / "init.png"), _mask_png(tmp_path / "mask.png")
    job = _job(folder, tmp_path, steps=3, init_image=str(init), mask=str(mask), strength=1.0)
    got = np.asarray(Image.open(run_image(job, Collector(tmp_path).ctx).images[0]["path"]).convert("RGB"))

    monkeypatch.setattr(pipeline_flux_inpaint, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    net = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    clip = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    t5 = transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()
    pipe = FluxInpaintPipeline(scheduler=tiny_scheduler(True), vae=AutoencoderKL.from_pretrained(folder / "vae"),
                               text_encoder=clip, tokenizer=None, text_encoder_2=t5, tokenizer_2=None, transformer=net)
    ids, _ = T5Tokenizer(folder / "tokenizer_2" / "tokenizer.json")([job.prompt], max_length=512, clean=False)
    with torch.no_grad():
        embeds = t5(ids).last_hidden_state
        pooled = clip(torch.tensor([ClipTokenizer.bundled()(job.prompt)])).pooler_output
    latents = noise((1, 16, 16, 16), job.seed, torch.device("cpu"))  # this pipeline packs what it is given
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=Image.open(init), mask_image=Image.open(mask),
               latents=latents, strength=1.0, height=32, width=32, num_inference_steps=3, guidance_scale=job.cfg,
               output_type="np")
    want = (out.images[0] * 255).round().astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_kontext_folder_edits_from_reference_tokens_like_flux_kontext_pipeline(tmp_path):
    """Flux.1 Kontext (a diffusers folder says so in model_index.json): the init image is not a start but
    reference tokens after the image's, at position index 1; the start is noise."""
    import json

    import transformers
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
    from PIL import Image

    from studio.engine.pipelines.diffusion.flux import run_image
    from studio.engine.pipelines.diffusion.skeleton import noise
    from studio.models.clip_tokenizer import ClipTokenizer
    from studio.models.t5 import T5Tokenizer

    folder = build_flux_folder(tmp_path / "kontext", True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    init = _init_png(tmp_path / "init.png")
    job = _job(folder, tmp_path, steps=3, cfg=2.5, init_image=str(init), strength=0.3)  # strength: unused here
    got = np.asarray(Image.open(run_image(job, Collector(tmp_path).ctx).images[0]["path"]).convert("RGB"))

    net = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    clip = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    t5 = transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()
    pipe = FluxKontextPipeline(scheduler=tiny_scheduler(True), vae=AutoencoderKL.from_pretrained(folder / "vae"),
                               text_encoder=clip, tokenizer=None, text_encoder_2=t5, tokenizer_2=None, transformer=net)
    ids, _ = T5Tokenizer(folder / "tokenizer_2" / "tokenizer.json")([job.prompt], max_length=512, clean=False)
    with torch.no_grad():
        embeds = t5(ids).last_hidden_state
        pooled = clip(torch.tensor([ClipTokenizer.bundled()(job.prompt)])).pooler_output
    latents = FluxPipeline._pack_latents(noise((1, 16, 16, 16), job.seed, torch.device("cpu")), 1, 16, 16, 16)
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=Image.open(init), latents=latents, height=32,
               width=32, max_area=32 * 32, num_inference_steps=3, guidance_scale=2.5, output_type="np",
               _auto_resize=False)
    want = (out.images[0] * 255).round().astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_bf16_weights_run_and_stay_close_to_fp32():
    sd = dict(tiny_transformer(True).state_dict())
    full, half = load_flux_transformer(sd, axes_dim=AXES), load_flux_transformer(sd, dtype=torch.bfloat16,
                                                                                 axes_dim=AXES)
    assert next(half.parameters()).dtype == torch.bfloat16
    img, ids, txt, tids, t, y = _inputs()
    g = torch.full((2,), 3.5)
    with torch.no_grad():
        a, b = full(img, ids, txt, tids, t, y, g), half(img, ids, txt, tids, t, y, g)
    assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max()


def test_fp8_t5_stays_fp8_and_matches_its_dequantized_self(tmp_path):
    """ComfyUI users keep T5-XXL as t5xxl_fp8_e4m3fn: its Linear layers stay fp8 (half the 9 GB)."""
    from safetensors.torch import save_file
    from test_diffusion_quant import _fp8

    from studio.engine.offload import estimate_module_bytes
    from studio.engine.pipelines.diffusion.files import read_state_dict
    from studio.models.t5 import load_t5_encoder
    from studio.nn.packed_fp8 import Fp8Linear
    from tests.flux_fixtures import tiny_t5

    file_sd, ref_sd = _fp8({k: v.clone() for k, v in tiny_t5().state_dict().items()}, scaled=True)
    save_file(file_sd, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    ours = load_t5_encoder(read_state_dict(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", compact=True),
                           dtype=torch.float32)
    ref = load_t5_encoder(ref_sd, dtype=torch.float32)
    assert isinstance(ours.blocks[1].ffn.wo, Fp8Linear)
    assert estimate_module_bytes(ours) < 0.6 * estimate_module_bytes(ref)
    ids = torch.tensor([[3, 4, 5, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids), atol=1e-4, rtol=1e-4)
