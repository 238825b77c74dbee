"""diffusers folders honour each component's config.json: what shapes cannot show is applied, or refused by name.

Tiny models are built with diffusers / transformers themselves, saved with save_pretrained, loaded
through Studio's folder loader, and held equal to the reference (fp32); configs Studio cannot run
must fail with a UserError that names the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.errors import UserError
from studio.models import diffusers_config as dc

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CTX = 32  # text width: CLIP hidden size = UNet cross-attention width
TOL = 1e-4


def _randomize(model: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():  # every tensor off its init value, so no path hides behind zeros or ones
        for p in model.parameters():
            p.normal_(0, scale)


def _unet(**overrides) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    kwargs = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  norm_num_groups=8,  # the released models use 32: shapes cannot tell
                  attention_head_dim=2,  # two heads on every level, where conv-projection SD1 has 8
                  cross_attention_dim=CTX)
    kwargs.update(overrides)
    net = diffusers.UNet2DConditionModel(**kwargs).eval()
    _randomize(net)
    return net


def _vae(**overrides) -> diffusers.AutoencoderKL:
    torch.manual_seed(1)
    kwargs = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, scaling_factor=0.5, sample_size=16)
    kwargs.update(overrides)
    vae = diffusers.AutoencoderKL(**kwargs).eval()
    _randomize(vae, 0.1)
    return vae


def _clip(**overrides) -> transformers.CLIPTextModel:
    torch.manual_seed(2)
    kwargs = dict(vocab_size=49408, hidden_size=CTX, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2,  # 16-wide heads: shape inference assumes CLIP's 64
                  max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-6,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    kwargs.update(overrides)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs)).eval()
    _randomize(model, 0.2)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    """A diffusers SD1-layout folder of tiny models, and the references it was saved from."""
    root = tmp_path_factory.mktemp("sd_folder")
    refs = {"unet": _unet(), "vae": _vae(), "text_encoder": _clip()}
    for name, model in refs.items():
        model.save_pretrained(root / name)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             prediction_type="v_prediction")
    sched.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root, refs


@pytest.fixture(scope="module")
def loaded(folder):
    from studio.models.sd_checkpoint import load_sd

    return load_sd(folder[0])


def _unet_io() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 17.0]), torch.randn(2, 5, CTX, generator=g)


def test_unet_norm_groups_and_head_count_come_from_config(folder, loaded) -> None:
    ref = folder[1]["unet"]
    assert (loaded.unet.config.norm_groups, loaded.unet.config.num_heads) == (8, 2)
    x, t, ctx = _unet_io()
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        got = loaded.unet(x, t, ctx)
    assert (got - expected).abs().max() < TOL


def test_unet_from_shapes_alone_would_differ(folder) -> None:
    """The parity above can fail: the shape-inferred defaults (32 groups, 8 heads) build a different model."""
    from studio.models.unet import build_unet

    ref = folder[1]["unet"]
    ours = build_unet(ref.state_dict())
    assert (ours.config.norm_groups, ours.config.num_heads) == (32, 8)
    x, t, ctx = _unet_io()
    with torch.no_grad():
        assert (ours(x, t, ctx) - ref(x, t, encoder_hidden_states=ctx).sample).abs().max() > 1e-2


def test_vae_norm_groups_and_scaling_factor_come_from_config(folder, loaded) -> None:
    ref = folder[1]["vae"]
    assert loaded.vae.cfg.norm_num_groups == 8
    assert loaded.vae.cfg.scaling_factor == pytest.approx(0.5)  # not SD1's 0.18215
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        mean, _ = loaded.vae.encode(img)
        assert (mean - dist.mean).abs().max() < TOL
        assert (loaded.vae.decode(mean) - ref.decode(dist.mean).sample).abs().max() < TOL
    assert torch.allclose(loaded.vae.to_latent(mean), mean * 0.5)


def test_clip_head_count_activation_and_eps_come_from_config(folder, loaded) -> None:
    ref = folder[1]["text_encoder"]
    enc = loaded.encoders[0]
    assert (enc.config.heads, enc.config.activation, enc.config.eps) == (2, "quick_gelu", 1e-6)
    tokens = torch.tensor([[49406, 320, 1125, 49407, 49407], [49406, 5, 6, 7, 49407]])
    with torch.no_grad():
        out = ref(tokens, output_hidden_states=True)
        hidden, pooled = enc(tokens, clip_skip=1, final_norm=True)
    assert (hidden - out.last_hidden_state).abs().max() < TOL
    assert (pooled - out.pooler_output).abs().max() < TOL


def test_scheduler_prediction_type_reaches_the_model(loaded) -> None:
    assert loaded.prediction == "v"
    assert loaded.betas == {"beta_start": 0.00085, "beta_end": 0.012, "steps": 1000, "schedule": "scaled_linear"}


def test_scheduler_betas_are_arguments_of_the_pipelines_schedule(loaded) -> None:
    """The SD pipeline builds DiscreteSchedule.from_betas(**model.betas); a linear schedule must differ."""
    from studio.engine.samplers import DiscreteSchedule

    assert torch.equal(DiscreteSchedule.from_betas(**loaded.betas).sigmas, DiscreteSchedule.from_betas().sigmas)
    linear = DiscreteSchedule.from_betas(**dc.scheduler_settings({"beta_schedule": "linear"})["betas"])
    assert not torch.allclose(linear.sigmas, DiscreteSchedule.from_betas().sigmas)


def test_a_separate_vae_folder_brings_its_config(folder) -> None:
    from studio.models.sd_checkpoint import load_sd

    model = load_sd(folder[0], vae_path=folder[0] / "vae")
    assert (model.vae.cfg.norm_num_groups, model.vae.cfg.scaling_factor) == (8, 0.5)


def test_the_job_can_still_force_the_prediction(folder) -> None:
    from studio.models.sd_checkpoint import load_sd

    assert load_sd(folder[0], prediction="eps").prediction == "eps"


def test_a_scheduler_config_without_prediction_type_leaves_it_to_the_loader(folder, tmp_path) -> None:
    """Folders converted before diffusers had the key: the SD2 probe and family rules decide, as for files."""
    from studio.models.sd_checkpoint import load_sd

    assert dc.scheduler_settings({"beta_schedule": "linear"}) == {"prediction": None, "betas": {"schedule": "linear"}}
    old = _rewrite(folder[0], tmp_path / "old", "scheduler", "scheduler_config.json")
    path = old / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "prediction_type"}))
    assert load_sd(old).prediction == "eps"  # an SD1 folder (quick_gelu text encoder)


def test_head_counts_with_one_head_width_become_a_head_dim() -> None:
    cfg = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    assert dc.unet_settings(cfg) == {"num_heads": None, "head_dim": 64}
    sd1 = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8}
    assert dc.unet_settings(sd1) == {"num_heads": 8, "head_dim": None}


# ------------------------------------------------------------------------------------------- refusals

def _rewrite(src: Path, dst: Path, component: str, name: str = "config.json", **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    path = dst / component / name
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(("component", "name", "key", "value"), [
    ("unet", "config.json", "attention_type", "gated"),
    ("unet", "config.json", "time_cond_proj_dim", 256),
    ("unet", "config.json", "resnet_time_scale_shift", "scale_shift"),
    ("unet", "config.json", "attention_head_dim", [2, 3]),  # neither one count nor one width
    ("vae", "config.json", "latents_mean", [0.1, 0.2, 0.3, 0.4]),
    ("vae", "config.json", "act_fn", "gelu"),
    ("text_encoder", "config.json", "hidden_act", "relu"),
    ("text_encoder", "config.json", "num_attention_heads", 3),  # does not divide hidden_size=32
    ("scheduler", "scheduler_config.json", "prediction_type", "sample"),
    ("scheduler", "scheduler_config.json", "rescale_betas_zero_snr", True),
])
def test_values_studio_cannot_run_are_refused_by_name(folder, tmp_path, component, name, key, value) -> None:
    from studio.models.sd_checkpoint import load_sd

    bad = _rewrite(folder[0], tmp_path / "bad", component, name, **{key: value})
    with pytest.raises(UserError) as err:
        load_sd(bad)
    msg = err.value.message
    assert f"{component}/{name}" in msg and key in msg and "supported" in msg, msg


def test_norm_groups_that_do_not_divide_the_widths_are_refused(folder, tmp_path) -> None:
    from studio.models.sd_checkpoint import load_sd

    with pytest.raises(UserError, match=r"vae/config.json: norm_num_groups=12 .*supported: a divisor"):
        load_sd(_rewrite(folder[0], tmp_path / "bad", "vae", norm_num_groups=12))


def test_a_config_that_contradicts_the_weights_is_a_user_error(folder, tmp_path) -> None:
    from studio.models.sd_checkpoint import load_sd

    with pytest.raises(UserError, match="vae/ weights do not fit"):  # the weights are 16 and 32 wide
        load_sd(_rewrite(folder[0], tmp_path / "bad", "vae", norm_num_groups=64, block_out_channels=[64, 128]))


def test_a_damaged_config_is_named(tmp_path) -> None:
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="vae/config.json cannot be read"):
        dc.read_config(tmp_path / "vae")


def test_keys_without_effect_are_ignored() -> None:
    assert dc.vae_settings({"force_upcast": True, "sample_size": 1024, "shift_factor": None}) == {
        "shift_factor": 0.0}
    assert dc.scheduler_settings({"timestep_spacing": "trailing", "steps_offset": 1, "clip_sample": False,
                                  "prediction_type": "epsilon"})["prediction"] == "eps"
    assert dc.unet_settings({"upcast_attention": True, "dropout": 0.1, "sample_size": 96}) == {}


def test_absent_keys_leave_what_the_shapes_imply() -> None:
    """Hand-written partial configs: only the stated keys are applied (diffusers' own defaults are not)."""
    assert dc.clip_settings({"hidden_act": "gelu"}) == {"activation": "gelu"}
    assert dc.scheduler_settings({"prediction_type": "epsilon"}) == {"prediction": "eps", "betas": {}}
    assert dc.wan_transformer_settings({}) == {} and dc.t5_settings({}) == {}
    with pytest.raises(UserError, match="beta_end=0.0001 .*supported: a value above beta_start=0.00085"):
        dc.scheduler_settings({"beta_end": 0.0001})


# ------------------------------------------------------------------------------------------------ Wan

def _saved(model, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """save_pretrained, then what Studio reads back: the weights file(s) and the folder's config."""
    from safetensors.torch import load_file

    model.save_pretrained(path)
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd, dc.read_config(path)


def _wan(**overrides):
    torch.manual_seed(5)
    kwargs = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                  text_dim=32, freq_dim=16, ffn_dim=96, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-4, rope_max_seq_len=64)  # 32-wide heads, eps 1e-4
    kwargs.update(overrides)
    model = diffusers.WanTransformer3DModel(**kwargs).eval()
    _randomize(model, 0.1)
    return model


def test_wan_transformer_head_width_and_eps_come_from_config(tmp_path) -> None:
    from studio.models.wan import load_wan_transformer

    ref = _wan()
    sd, config = _saved(ref, tmp_path / "transformer")
    ours = load_wan_transformer(sd, config=config)
    assert (ours.cfg.heads, ours.cfg.head_dim, ours.cfg.eps) == (2, 32, 1e-4)
    g = torch.Generator().manual_seed(6)
    x, t, ctx = torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([999.0, 250.5]), torch.randn(2, 512, 32, generator=g)
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert (got - want).abs().max() < TOL


@pytest.mark.parametrize(("key", "value", "match"), [
    ("qk_norm", "layer_norm", r"transformer/config.json: qk_norm='layer_norm' is not supported"),
    ("num_attention_heads", 3, r"num_attention_heads=3 x attention_head_dim=32 does not match the weights' width 64"),
    ("_class_name", "WanVACETransformer3DModel", r"_class_name='WanVACETransformer3DModel' is not supported"),
])
def test_wan_transformer_configs_studio_cannot_run_are_refused(tmp_path, key, value, match) -> None:
    from studio.models.wan import load_wan_transformer

    sd, config = _saved(_wan(), tmp_path / "transformer")
    with pytest.raises(UserError, match=match):
        load_wan_transformer(sd, config={**config, key: value})


def test_wan_vae_latent_statistics_come_from_config(tmp_path) -> None:
    from studio.models.wan_vae import load_wan_vae

    mean, std = [0.1 * i for i in range(16)], [1.0 + 0.05 * i for i in range(16)]
    torch.manual_seed(7)
    ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)
    sd, config = _saved(ref, tmp_path / "vae")
    ours = load_wan_vae(sd, config=config)
    assert ours.cfg.latents_mean == pytest.approx(tuple(mean)) and ours.cfg.latents_std == pytest.approx(tuple(std))
    assert load_wan_vae(sd).cfg.latents_mean != ours.cfg.latents_mean  # shapes alone pick Wan 2.1's published ones
    with pytest.raises(UserError, match=r"vae/config.json: attn_scales=\[0.5\] is not supported"):
        load_wan_vae(sd, config={**config, "attn_scales": [0.5]})
    with pytest.raises(UserError, match=r"vae/config.json: latents_std=.*supported: a list of 16 numbers"):
        load_wan_vae(sd, config={**config, "latents_std": [1.0, 2.0]})


def test_umt5_max_distance_and_eps_come_from_config(tmp_path) -> None:
    from studio.models.t5 import load_t5_encoder

    torch.manual_seed(8)
    cfg = transformers.UMT5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                  relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                  feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-3)
    ref = transformers.UMT5EncoderModel(cfg).eval()
    _randomize(ref, 0.3)
    sd, config = _saved(ref, tmp_path / "text_encoder")
    ours = load_t5_encoder(sd, config=config)
    assert (ours.cfg.max_distance, ours.cfg.eps) == (12, 1e-3)
    ids = torch.randint(1, 100, (2, 30), generator=torch.Generator().manual_seed(9))  # 30 > 12: log buckets
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (ours(ids, mask) - want).abs().max() < TOL
        assert (load_t5_encoder(sd)(ids, mask) - want).abs().max() > 1e-3  # the config matters here
    with pytest.raises(UserError, match=r"text_encoder/config.json: feed_forward_proj='relu' is not supported"):
        load_t5_encoder(sd, config={**config, "feed_forward_proj": "relu"})
