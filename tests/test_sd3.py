"""SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel in each layout (diffusers, Stability's
original names, ComfyUI's prefix), with and without QK norm and MMDiT-X dual attention."""

from __future__ import annotations

import pytest
import torch

from studio.errors import UserError
from studio.models.sd3 import SD3Config, SD3Transformer, load_sd3_transformer, normalize_state_dict
from tests.video_fixtures import jiggle

HEADS = 2


def tiny_sd3(dual: tuple[int, ...] = (), qk_norm: str | None = None, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=32,
                                num_attention_heads=HEADS, joint_attention_dim=24, caption_projection_dim=64,
                                pooled_projection_dim=20, out_channels=16, pos_embed_max_size=12,
                                dual_attention_layers=dual, qk_norm=qk_norm)
    jiggle(net, 0.1)
    return net.eval()


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def to_sai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel names -> Stability's original ones, written out by hand."""
    plain = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
             "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for leaf in ("weight", "bias"):
        for old, new in plain.items():
            out[f"{new}.{leaf}"] = sd[f"{old}.{leaf}"]
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(sd[f"norm_out.linear.{leaf}"])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(depth):
        p, q = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == depth - 1
        for leaf in ("weight", "bias"):
            out[f"{q}x_block.attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn.to_{c}.{leaf}"] for c in "qkv"])
            out[f"{q}context_block.attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn.add_{c}_proj.{leaf}"] for c in "qkv"])
            out[f"{q}x_block.attn.proj.{leaf}"] = sd[f"{p}attn.to_out.0.{leaf}"]
            out[f"{q}x_block.adaLN_modulation.1.{leaf}"] = sd[f"{p}norm1.linear.{leaf}"]
            ctx_mod = sd[f"{p}norm1_context.linear.{leaf}"]
            out[f"{q}context_block.adaLN_modulation.1.{leaf}"] = _swap(ctx_mod) if last else ctx_mod
            out[f"{q}x_block.mlp.fc1.{leaf}"] = sd[f"{p}ff.net.0.proj.{leaf}"]
            out[f"{q}x_block.mlp.fc2.{leaf}"] = sd[f"{p}ff.net.2.{leaf}"]
            if not last:
                out[f"{q}context_block.attn.proj.{leaf}"] = sd[f"{p}attn.to_add_out.{leaf}"]
                out[f"{q}context_block.mlp.fc1.{leaf}"] = sd[f"{p}ff_context.net.0.proj.{leaf}"]
                out[f"{q}context_block.mlp.fc2.{leaf}"] = sd[f"{p}ff_context.net.2.{leaf}"]
            if f"{p}attn2.to_q.{leaf}" in sd:
                out[f"{q}x_block.attn2.qkv.{leaf}"] = torch.cat([sd[f"{p}attn2.to_{c}.{leaf}"] for c in "qkv"])
                out[f"{q}x_block.attn2.proj.{leaf}"] = sd[f"{p}attn2.to_out.0.{leaf}"]
        for old, new in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                         ("attn.norm_added_q", "context_block.attn.ln_q"),
                         ("attn.norm_added_k", "context_block.attn.ln_k"),
                         ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
            if f"{p}{old}.weight" in sd:
                out[f"{q}{new}.weight"] = sd[f"{p}{old}.weight"]
    return out


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 8, 6, generator=g), torch.tensor([700.0, 250.0]), torch.randn(2, 5, 24, generator=g),
            torch.randn(2, 20, generator=g))


def _reference(net, x, t, ctx, y):
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample


VARIANTS = {"3-medium": ((), None), "3.5-large": ((), "rms_norm"), "3.5-medium": ((0, 1), "rms_norm")}


def test_hand_written_stability_layout_is_what_diffusers_converts_from():
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = dict(tiny_sd3((0, 1), "rms_norm").state_dict())
    back = convert_sd3_transformer_checkpoint_to_diffusers(to_sai(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", ["diffusers", "stability", "comfyui"])
def test_transformer_matches_diffusers_in_each_layout(variant, layout):
    net = tiny_sd3(*VARIANTS[variant])
    sd = dict(net.state_dict())
    if layout == "stability":
        sd = to_sai(sd)
    elif layout == "comfyui":
        sd = {"model.diffusion_model." + k: v for k, v in to_sai(sd).items()}
    ours = load_sd3_transformer(sd, heads=HEADS)
    assert ours.cfg.dual_layers == VARIANTS[variant][0] and ours.cfg.qk_norm == bool(VARIANTS[variant][1])
    x, t, ctx, y = _inputs()
    want = _reference(net, x, t, ctx, y)
    with torch.no_grad():
        got = ours(x, t, ctx, y)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_diffusers_folder_config_gives_the_head_count(tmp_path):
    from studio.models.diffusers_config import read_config

    net = tiny_sd3()
    net.save_pretrained(tmp_path / "transformer")
    ours = load_sd3_transformer(dict(net.state_dict()), config=read_config(tmp_path / "transformer"))
    assert ours.cfg.heads == HEADS


def test_both_layouts_convert_to_the_same_tensors():
    sd = dict(tiny_sd3((0,), "rms_norm").state_dict())
    a, b = normalize_state_dict(sd), normalize_state_dict(to_sai(sd))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_named_configs_have_published_sizes():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in SD3Transformer(SD3Config.named(name)).parameters())
                 for name in ("3-medium", "3.5-large", "3.5-medium")}
    assert 2.0e9 < sizes["3-medium"] < 2.1e9  # 2B
    assert 8.0e9 < sizes["3.5-large"] < 8.2e9  # 8.1B
    assert 2.2e9 < sizes["3.5-medium"] < 2.6e9  # 2.5B


def test_too_large_an_image_for_the_position_table_says_so():
    ours = load_sd3_transformer(dict(tiny_sd3().state_dict()), heads=HEADS)
    x, t, ctx, y = _inputs()
    with pytest.raises(UserError, match="up to"):
        ours(torch.randn(1, 16, 32, 32), t[:1], ctx[:1], y[:1])


def test_not_an_sd3_file_says_so():
    with pytest.raises(UserError, match="no SD3 transformer"):
        load_sd3_transformer({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)})


# ---------------------------------------------------------------------------------- whole generations

L_DIM, G_DIM, T5_DIM = 64, 128, 256


def _clip(width: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=3, num_attention_heads=width // 64, max_position_embeddings=77,
                                      hidden_act="gelu", projection_dim=width, eos_token_id=2)
    enc = transformers.CLIPTextModelWithProjection(cfg)
    jiggle(enc, 0.05)
    return enc.eval()


def _t5(seed: int = 3):
    import transformers

    from tests.video_fixtures import WORDS

    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=len(WORDS) + 3, d_model=T5_DIM, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    enc = transformers.T5EncoderModel(cfg)
    jiggle(enc, 0.1)
    return enc.eval()


def _net(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                num_attention_heads=1, joint_attention_dim=T5_DIM, caption_projection_dim=64,
                                pooled_projection_dim=L_DIM + G_DIM, out_channels=16, pos_embed_max_size=16,
                                qk_norm="rms_norm", dual_attention_layers=(0,))
    jiggle(net, 0.1)
    return net.eval()


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build_sd3_folder(root, with_t5: bool = True):
    from tests.flux_fixtures import tiny_vae
    from tests.video_fixtures import write_tokenizer

    _net().save_pretrained(root / "transformer")
    tiny_vae(scaling=1.5305, shift=0.0609).save_pretrained(root / "vae")
    _clip(L_DIM, 2).save_pretrained(root / "text_encoder")
    _clip(G_DIM, 4).save_pretrained(root / "text_encoder_2")
    if with_t5:
        _t5().save_pretrained(root / "text_encoder_3")
        write_tokenizer(root / "tokenizer_3" / "tokenizer.json")
    _scheduler().save_pretrained(root / "scheduler")
    return root


def _reference_image(folder, job):
    """StableDiffusion3Pipeline on the same weights, fed our tokens' embeddings and our seeded noise."""
    import numpy as np
    import transformers
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    from studio.engine.pipelines.diffusion.skeleton import noise
    from studio.models.clip_tokenizer import ClipTokenizer
    from studio.models.t5 import T5Tokenizer

    net = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    clip_l = transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").eval()
    clip_g = transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
    has_t5 = (folder / "text_encoder_3").is_dir()
    t5 = transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_3").eval() if has_t5 else None
    pipe = StableDiffusion3Pipeline(transformer=net, scheduler=_scheduler(), vae=AutoencoderKL.from_pretrained(
        folder / "vae"), text_encoder=clip_l, tokenizer=None, text_encoder_2=clip_g, tokenizer_2=None,
        text_encoder_3=t5, tokenizer_3=None)

    def embed(text):
        hidden, pooled = [], []
        for enc, pad in ((clip_l, None), (clip_g, 0)):
            out = enc(torch.tensor([ClipTokenizer.bundled(pad_id=pad)(text)]), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.nn.functional.pad(torch.cat(hidden, -1), (0, T5_DIM - L_DIM - G_DIM))
        if t5 is not None:
            ids, _ = T5Tokenizer(folder / "tokenizer_3" / "tokenizer.json")([text], max_length=256, clean=False)
            t5_out = t5(ids).last_hidden_state
        else:
            t5_out = torch.zeros(1, 77, T5_DIM)
        return torch.cat([clip, t5_out], 1), torch.cat(pooled, -1)

    with torch.no_grad():
        cond, pooled = embed(job.prompt)
        uncond, upooled = embed(job.negative)
    lat = job.height // 2
    out = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
               negative_pooled_prompt_embeds=upooled, latents=noise((1, 16, lat, lat), job.seed, torch.device("cpu")),
               height=job.height, width=job.width, num_inference_steps=job.steps, guidance_scale=job.cfg,
               output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


def _job(model, tmp_path, **kw):
    from studio.protocol import ImageJob

    base = dict(model=str(model), prompt="a red fox in snow", negative="blurry bad", width=32, height=32, steps=3,
                cfg=4.5, sampler="euler", seed=5, out=str(tmp_path / "out" / "sd3.png"))
    base.update(kw)
    return ImageJob(**base)


def _ours(job, tmp_path):
    import numpy as np
    from PIL import Image

    from studio.engine.pipelines.diffusion.sd3 import run_image
    from tests.video_fixtures import Collector

    col = Collector(tmp_path)
    result = run_image(job, col.ctx)
    assert result.family == "sd3" and col.steps() == list(range(1, job.steps + 1)) and col.previews
    with Image.open(result.images[0]["path"]) as im:
        return np.asarray(im.convert("RGB")), result


@pytest.mark.parametrize("with_t5", [True, False], ids=["clip+t5", "clip-only"])
def test_tiny_generation_matches_sd3_pipeline(tmp_path, with_t5):
    import numpy as np

    folder = build_sd3_folder(tmp_path / "sd3", with_t5)
    job = _job(folder, tmp_path)
    got, result = _ours(job, tmp_path)
    assert with_t5 or any("T5" in n for n in result.notes)
    want = _reference_image(folder, job)
    assert want.std() > 5
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_sigmas_match_flow_match_euler_scheduler():
    from studio.engine.pipelines.diffusion.sd3 import sd3_sigmas

    sched = _scheduler()
    sched.set_timesteps(9)
    torch.testing.assert_close(sd3_sigmas(9, 3.0), sched.sigmas.float(), atol=1e-6, rtol=1e-6)


def test_stability_single_file_with_encoders_inside_matches_the_folder(tmp_path):
    import numpy as np
    from diffusers import AutoencoderKL

    from studio.models.vae import to_ldm_vae
    from tests.flux_fixtures import save
    from tests.video_fixtures import write_tokenizer

    folder = build_sd3_folder(tmp_path / "sd3")
    sd = {"model.diffusion_model." + k: v for k, v in to_sai(_net().state_dict()).items()}
    for name, enc in (("clip_l", _clip(L_DIM, 2)), ("clip_g", _clip(G_DIM, 4)), ("t5xxl", _t5())):
        sd.update({f"text_encoders.{name}.transformer.{k}": v for k, v in enc.state_dict().items()})
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    sd.update({"first_stage_model." + k: v for k, v in to_ldm_vae(vae.state_dict(), up_levels=2).items()})
    model = save(sd, tmp_path / "checkpoints" / "sd3.5_medium_incl_clips_t5xxl.safetensors")
    write_tokenizer(tmp_path / "checkpoints" / "tokenizer.json")
    got, _ = _ours(_job(model, tmp_path, out=str(tmp_path / "a.png")), tmp_path)
    want, _ = _ours(_job(folder, tmp_path, out=str(tmp_path / "b.png")), tmp_path)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_image_jobs_on_an_sd3_file_are_routed_to_this_pipeline(tmp_path):
    from studio import families
    from studio.engine.pipelines.diffusion import pipeline_for
    from tests.flux_fixtures import save

    model = save(to_sai(_net().state_dict()), tmp_path / "sd3.safetensors")
    assert pipeline_for(str(model), families.Kind.IMAGE).__name__.endswith(".sd3")


def test_img2img_runs_the_last_part_of_the_schedule_from_the_noised_image(tmp_path):
    """SD3 img2img against StableDiffusion3Img2ImgPipeline given our start (VAE mean noised to the first kept
    sigma): the same truncated schedule, the same image."""
    import numpy as np
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline
    from PIL import Image

    from studio.engine.pipelines.diffusion.sd3 import encode_prompt, run_image
    from studio.engine.pipelines.diffusion.skeleton import load_image, noise
    from tests.video_fixtures import Collector

    folder = build_sd3_folder(tmp_path / "sd3", with_t5=False)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    job = _job(folder, tmp_path, steps=4, strength=0.5, init_image=str(tmp_path / "init.png"))
    col = Collector(tmp_path)
    result = run_image(job, col.ctx)
    assert col.steps() == [1, 2]
    got = np.asarray(Image.open(result.images[0]["path"]).convert("RGB"))

    model = col.ctx.models.get(next(m["key"] for m in col.ctx.models.summary() if str(folder) in m["key"]))
    with torch.no_grad():  # our encoders match transformers' (the text-to-image test holds them equal)
        cond, pooled = encode_prompt(model, job.prompt, torch.device("cpu"))
        uncond, upooled = encode_prompt(model, job.negative, torch.device("cpu"))
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    sched = _scheduler()
    pipe = StableDiffusion3Img2ImgPipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer"), scheduler=sched, vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pixels = load_image(str(tmp_path / "init.png"), 32, 32, fit="stretch", value_range="-1..1")
    with torch.no_grad():
        lat = (vae.encode(pixels).latent_dist.mean - 0.0609) * 1.5305
    sched.set_timesteps(4)
    s0 = sched.sigmas[2]
    start = (1 - s0) * lat + s0 * noise((1, 16, 16, 16), job.seed, torch.device("cpu"))
    out = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
               negative_pooled_prompt_embeds=upooled, image=pixels * 0.5 + 0.5, latents=start, strength=0.5,
               height=32, width=32, num_inference_steps=4, guidance_scale=job.cfg, output_type="np")
    want = (out.images[0] * 255).round().astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_inpainting_matches_sd3_inpaint_pipeline(tmp_path, monkeypatch):
    """Outside the mask every step lands on the original noised to its sigma, as StableDiffusion3InpaintPipeline
    blends it in after each Euler step; both start from the noise alone at strength 1 and take the VAE mean."""
    import numpy as np
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3InpaintPipeline
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_inpaint as ref_module
    from PIL import Image

    from studio.engine.pipelines.diffusion.sd3 import encode_prompt, run_image
    from studio.engine.pipelines.diffusion.skeleton import noise
    from tests.video_fixtures import Collector

    folder = build_sd3_folder(tmp_path / "sd3", with_t5=False)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    m = np.zeros((32, 32), dtype=np.uint8)
    m[:, 16:] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    job = _job(folder, tmp_path, steps=3, strength=1.0, init_image=str(tmp_path / "init.png"),
               mask=str(tmp_path / "mask.png"))
    col = Collector(tmp_path)
    got = np.asarray(Image.open(run_image(job, col.ctx).images[0]["path"]).convert("RGB"))

    model = col.ctx.models.get(next(e["key"] for e in col.ctx.models.summary() if str(folder) in e["key"]))
    with torch.no_grad():
        cond, pooled = encode_prompt(model, job.prompt, torch.device("cpu"))
        uncond, upooled = encode_prompt(model, job.negative, torch.device("cpu"))
    monkeypatch.setattr(ref_module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    pipe = StableDiffusion3InpaintPipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer"), scheduler=_scheduler(),
        vae=AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    out = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
               negative_pooled_prompt_embeds=upooled, image=Image.open(tmp_path / "init.png"),
               mask_image=Image.open(tmp_path / "mask.png"), latents=noise((1, 16, 16, 16), job.seed,
                                                                           torch.device("cpu")),
               strength=1.0, height=32, width=32, num_inference_steps=3, guidance_scale=job.cfg, output_type="np")
    want = (out.images[0] * 255).round().astype(np.uint8)
    # the same numbers reached two ways (an Euler step from a replaced x0 vs a blend after the step), then
    # amplified by CFG 4.5: a level or two of rounding apart
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_gguf_sd3_stays_compact_and_matches_the_dequantized_model(tmp_path):
    from test_diffusion_quant import _city96_types, _write_gguf

    from studio.engine.offload import estimate_module_bytes
    from studio.engine.pipelines.diffusion.files import read_state_dict
    from studio.nn.packed_gguf import GGUFLinear

    path = tmp_path / "sd3.5_medium-Q8_0.gguf"
    ref_sd = _write_gguf(path, to_sai(tiny_sd3((0,), "rms_norm").state_dict()), "sd3", _city96_types)
    ref = load_sd3_transformer(ref_sd, dtype=torch.float32, heads=HEADS)
    ours = load_sd3_transformer(read_state_dict(path, compact=True), dtype=torch.float32, heads=HEADS)
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx, y), ref(x, t, ctx, y), atol=1e-5, rtol=1e-5)
    assert isinstance(ours.joint_blocks[0].x_block.attn.qkv, GGUFLinear)
    assert estimate_module_bytes(ours) < 0.7 * estimate_module_bytes(ref)
