"""Detection from headers only: every family and layout, on header-only sparse files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from library_fixtures import (
    FLUX,
    SAFETENSORS_CASES,
    SDXL_UNET,
    STRING,
    U32,
    smollm2_gguf,
    write_gguf,
    write_safetensors,
)

from studio.library.detect import detect
from studio.library.headers import read_header

GiB = 1 << 30


@pytest.mark.parametrize("name", sorted(SAFETENSORS_CASES))
def test_detects_family_variant_role_and_layout_from_marker_keys(tmp_path, name):
    shapes, (family, variant, role, layout) = SAFETENSORS_CASES[name]
    # the file name says nothing: detection must come from the header
    det = detect(write_safetensors(tmp_path / "model.safetensors", shapes))
    assert (det.family, det.variant, det.role, det.layout) == (family, variant, role, layout), det
    assert det.markers, "a detection must say which keys decided it"


def test_file_name_is_never_used(tmp_path):
    shapes, _ = SAFETENSORS_CASES["flux_dev"]
    det = detect(write_safetensors(tmp_path / "sd15-pruned-emaonly.safetensors", shapes))
    assert det.family == "flux"


def test_flux_dev_and_schnell_differ_only_by_guidance_in(tmp_path):
    dev = detect(write_safetensors(tmp_path / "a.safetensors", {**FLUX, "guidance_in.in_layer.weight": (3072, 256)}))
    schnell = detect(write_safetensors(tmp_path / "b.safetensors", FLUX))
    assert dev.variant == "dev" and schnell.variant == "schnell"
    assert "guidance_in.in_layer.weight" in dev.markers


def test_sd2_without_hints_reports_unknown_prediction_defaulting_to_v(tmp_path):
    det = detect(write_safetensors(tmp_path / "m.safetensors", SAFETENSORS_CASES["sd21_ldm"][0]))
    assert det.prediction == "v?"
    assert any("v or eps: unknown" in n and "default v for 768" in n for n in det.notes)


def test_sd2_metadata_hint_decides_prediction(tmp_path):
    shapes = SAFETENSORS_CASES["sd21_ldm"][0]
    v = detect(write_safetensors(tmp_path / "v.safetensors", shapes,
                                 metadata={"modelspec.architecture": "stable-diffusion-v2-768-v"}))
    eps = detect(write_safetensors(tmp_path / "e.safetensors", shapes, metadata={"prediction_type": "epsilon"}))
    assert v.prediction == "v" and eps.prediction == "eps"


def test_parameter_count_dtype_and_estimates_follow_the_header(tmp_path):
    shapes = {**SDXL_UNET, "big": (1000, 1000)}
    det = detect(write_safetensors(tmp_path / "m.safetensors", shapes, dtype="F32"))
    params = sum(__import__("math").prod(s) for s in shapes.values())
    assert det.params == params and det.dtype == "F32"
    # fp32 weights run in half precision on a GPU; the CPU holds them as stored
    assert det.vram_bytes == params * 2 + int(1.5 * GiB)
    assert det.ram_bytes > params * 4


def test_fp8_text_encoder_reports_its_dtype(tmp_path):
    det = detect(write_safetensors(tmp_path / "t5.safetensors", SAFETENSORS_CASES["t5xxl"][0], dtype="F8_E4M3"))
    assert det.family == "t5" and det.dtype == "F8_E4M3"
    assert "flux" in det.compatible


def test_unrecognised_file_says_what_was_seen(tmp_path):
    det = detect(write_safetensors(tmp_path / "m.safetensors", {"foo.bar.weight": (3, 3), "foo.baz": (2,)}))
    assert det.role == "unknown" and not det.recognised
    assert "2 tensors" in det.notes[0] and "foo.bar (1)" in det.notes[0] and "set the family" in det.notes[0]


def test_lora_without_a_known_base_asks_for_the_family(tmp_path):
    det = detect(write_safetensors(tmp_path / "m.safetensors", {"something.lora_A.weight": (4, 77)}))
    assert det.role == "lora" and det.family == "unknown" and "set the family" in det.notes[0]


def test_real_smollm2_gguf_is_a_llama_llm_with_q4_1_quantization():
    det = detect(smollm2_gguf())
    assert (det.family, det.role, det.format, det.dtype) == ("llama", "llm", "gguf", "Q4_1")
    assert 134_000_000 < det.params < 135_000_000
    assert "general.architecture=llama" in det.markers
    # weights (~94 MiB) + fp16 KV cache for 4096 tokens (30 layers x 3 kv heads x 64) + buffers
    weights = sum(t.nbytes for t in read_header(smollm2_gguf()).tensors.values())
    assert det.vram_bytes == weights + 2 * 30 * 3 * 64 * 4096 * 2 + (256 << 20)


@pytest.mark.parametrize("arch,family", [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gemma2", "gemma2"),
                                         ("gemma3", "gemma3"), ("phi3", "phi3"), ("llama", "llama")])
def test_gguf_llm_families_come_from_general_architecture(tmp_path, arch, family):
    p = write_gguf(tmp_path / "m.gguf", {"general.architecture": (STRING, arch), "general.file_type": (U32, 15),
                                         f"{arch}.block_count": (U32, 2)},
                   {"token_embd.weight": ((1000, 64), "Q8_0"), "blk.0.attn_q.weight": ((64, 256), "Q4_K")})
    det = detect(p)
    assert (det.family, det.role, det.dtype) == (family, "llm", "Q4_K_M")


def test_gguf_diffusion_model_is_detected_from_its_tensor_names(tmp_path):
    p = write_gguf(tmp_path / "flux.gguf", {"general.architecture": (STRING, "flux")},
                   {"double_blocks.0.img_attn.norm.key_norm.scale": ((128,), "F32"),
                    "img_in.weight": ((3072, 64), "F16"), "guidance_in.in_layer.weight": ((3072, 256), "Q8_0"),
                    "double_blocks.0.img_attn.qkv.weight": ((9216, 3072), "Q8_0")})
    det = detect(p)
    assert (det.family, det.variant, det.role, det.format, det.dtype) == ("flux", "dev", "diffusion_model",
                                                                          "gguf", "Q8_0")


def test_diffusers_sdxl_pipeline_folder(tmp_path):
    root = tmp_path / "sdxl"
    (root / "unet").mkdir(parents=True)
    (root / "scheduler").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    write_safetensors(root / "unet" / "diffusion_pytorch_model.safetensors",
                      SAFETENSORS_CASES["sdxl_unet_diffusers"][0])
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    det = detect(root)
    assert (det.family, det.variant, det.role, det.format) == ("sdxl", "base", "checkpoint", "diffusers")
    assert det.prediction == "eps"
    assert "model_index.json _class_name=StableDiffusionXLPipeline" in det.markers


def test_diffusers_sd2_folder_takes_v_prediction_from_the_scheduler(tmp_path):
    root = tmp_path / "sd2"
    (root / "unet").mkdir(parents=True)
    (root / "scheduler").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    write_safetensors(root / "unet" / "diffusion_pytorch_model.safetensors",
                      {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
                       "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 1024)})
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    det = detect(root)
    assert (det.family, det.prediction) == ("sd2", "v")
    assert not any("v or eps" in n for n in det.notes)


def test_diffusers_flux_folder_variant_from_transformer_config(tmp_path):
    root = tmp_path / "flux"
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (root / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    shapes = dict(SAFETENSORS_CASES["flux_dev_diffusers"][0])
    shapes.pop("time_text_embed.guidance_embedder.linear_1.weight")
    # sharded like the real repo
    half = len(shapes) // 2
    items = list(shapes.items())
    write_safetensors(root / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors", dict(items[:half]))
    write_safetensors(root / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors", dict(items[half:]))
    det = detect(root)
    assert (det.family, det.variant, det.role) == ("flux", "schnell", "checkpoint")


def test_hf_llm_folder_with_shards(tmp_path):
    root = tmp_path / "qwen"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "max_position_embeddings": 1024}))
    write_safetensors(root / "model-00001-of-00002.safetensors", {"model.embed_tokens.weight": (1000, 64)}, "BF16")
    write_safetensors(root / "model-00002-of-00002.safetensors",
                      {"model.layers.0.self_attn.q_proj.weight": (64, 64)}, "BF16")
    (root / "model.safetensors.index.json").write_text("{}")
    det = detect(root)
    assert (det.family, det.role, det.format, det.dtype) == ("qwen2", "llm", "hf", "BF16")
    assert det.params == 1000 * 64 + 64 * 64
    assert "model_type=qwen2" in det.markers
    assert det.vram_bytes == det.params * 2 + 2 * 2 * 2 * 16 * 1024 * 2 + (256 << 20)


def test_llm_weights_without_config_are_an_llm_of_unknown_family(tmp_path):
    det = detect(write_safetensors(tmp_path / "m.safetensors", {"model.embed_tokens.weight": (100, 8),
                                                                 "model.layers.0.self_attn.q_proj.weight": (8, 8)}))
    assert det.role == "llm" and det.family == "unknown"


def test_torch_pickle_checkpoint_is_detected_from_key_names_only(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"model.diffusion_model." + k: torch.zeros(s)
          for k, s in {"input_blocks.0.0.weight": (4, 4, 1, 1), "out.2.weight": (4, 4, 1, 1)}.items()}
    sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(320, 768)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "x.ckpt")
    det = detect(tmp_path / "x.ckpt")
    assert (det.family, det.role, det.format) == ("sd1", "checkpoint", "pytorch-pickle")
    assert any("weights_only=True" in n for n in det.notes)


def test_diffusers_vae_folder_is_told_apart_by_its_scaling_factor(tmp_path):
    from library_fixtures import KL_VAE
    for scale, variant, compatible in ((0.13025, "sdxl", ["sdxl", "pixart"]), (0.18215, "sd", ["sd1", "sd2"])):
        root = tmp_path / variant
        root.mkdir()
        (root / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "scaling_factor": scale}))
        write_safetensors(root / "diffusion_pytorch_model.safetensors", KL_VAE)
        det = detect(root)
        assert (det.family, det.variant, det.role, det.compatible) == ("vae-kl-f8", variant, "vae", compatible)


@pytest.mark.parametrize("vocab,family", [(32128, "t5"), (256384, "umt5")])
def test_gguf_t5_encoders_are_text_encoders(tmp_path, vocab, family):
    p = write_gguf(tmp_path / "t5.gguf", {"general.architecture": (STRING, "t5encoder")},
                   {"token_embd.weight": ((vocab, 64), "Q8_0"), "enc.blk.0.attn_q.weight": ((64, 64), "Q8_0")})
    det = detect(p)
    assert (det.family, det.role) == (family, "text_encoder")


# diffusers' own single-file detector, as an independent check of our fixtures and tables.
_DIFFUSERS_NAMES = {"sd15_ldm": "v1", "sd21_ldm": "v2", "sdxl_base_ldm": "xl_base", "sdxl_refiner_ldm": "xl_refiner",
                    "sd3_medium_ckpt": "sd3", "sd35_large": "sd35_large", "sd35_medium": "sd35_medium",
                    "flux_dev": "flux-dev", "flux_schnell_comfy": "flux-schnell", "sana_1600m": "sana",
                    "wan_t2v_1_3b": "wan-t2v-1.3B", "wan21_i2v_14b": "wan-i2v-14B", "ltxv_2b_ckpt": "ltx-video",
                    "mochi": "mochi-1-preview", "controlnet_sd15_ldm": "controlnet",
                    "controlnet_sdxl_diffusers": "controlnet_xl_small"}


@pytest.mark.parametrize("name", sorted(_DIFFUSERS_NAMES))
def test_our_detection_agrees_with_diffusers_single_file_detector(tmp_path, name):
    torch = pytest.importorskip("torch")
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    shapes, _ = SAFETENSORS_CASES[name]
    assert sfu.infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()}) == \
        _DIFFUSERS_NAMES[name]
    assert detect(write_safetensors(tmp_path / "m.safetensors", shapes)).recognised


# Real module key names: tiny diffusers / transformers models built on the meta device (no memory),
# their state_dict names and shapes written as a header. Guards our diffusers-layout tables against
# drifting from the library that defines the layout.
_TINY_DIFFUSERS = {
    "UNet2DConditionModel": (dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                  attention_head_dim=8, norm_num_groups=8), ("sd1", "diffusion_model")),
    "FluxTransformer2DModel": (dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
                               ("flux", "diffusion_model")),
    "SD3Transformer2DModel": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                   pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16),
                              ("sd3", "diffusion_model")),
    "WanTransformer3DModel": (dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                   out_channels=16, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1,
                                   rope_max_seq_len=32), ("wan", "diffusion_model")),
    "LTXVideoTransformer3DModel": (dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                        cross_attention_dim=16, num_layers=1, caption_channels=16),
                                   ("ltxv", "diffusion_model")),
    "CogVideoXTransformer3DModel": (dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                         text_embed_dim=16, time_embed_dim=4, num_layers=1, sample_width=8,
                                         sample_height=8, sample_frames=9), ("cogvideox", "diffusion_model")),
    "MochiTransformer3DModel": (dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                     pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4),
                                ("mochi", "diffusion_model")),
    "PixArtTransformer2DModel": (dict(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                      caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=16,
                                      norm_type="ada_norm_single"), ("pixart", "diffusion_model")),
    "SanaTransformer2DModel": (dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                    attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                    cross_attention_dim=16, caption_channels=16, sample_size=8),
                               ("sana", "diffusion_model")),
    "AutoencoderKL": (dict(block_out_channels=(8,), norm_num_groups=8, latent_channels=4), ("vae-kl-f8", "vae")),
    "AutoencoderTiny": (dict(), ("taesd", "vae")),
    "AutoencoderKLWan": (dict(base_dim=8, z_dim=16, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False]),
                         ("wan-vae", "vae")),
    "ControlNetModel": (dict(layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=768,
                             attention_head_dim=8, conditioning_embedding_out_channels=(16, 32)),
                        ("sd1", "controlnet")),
}


def _header_of(module):
    from studio.library.headers import ModelHeader, TensorInfo
    tensors = {k: TensorInfo("F32", tuple(v.shape), 0) for k, v in module.state_dict().items()}
    return ModelHeader(Path("tiny"), "safetensors", 0, tensors)


@pytest.mark.parametrize("cls", sorted(_TINY_DIFFUSERS))
def test_diffusers_module_key_layouts_are_recognised(cls):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from studio.library.detect import detect_header
    config, (family, role) = _TINY_DIFFUSERS[cls]
    with torch.device("meta"):
        module = getattr(diffusers, cls)(**config)
    det = detect_header(_header_of(module))
    assert (det.family, det.role) == (family, role), det
    if role == "diffusion_model":
        assert det.layout == "diffusers"


@pytest.mark.parametrize("cls,width,layers,family", [("CLIPTextModel", 768, 1, "clip-l"),
                                                     ("CLIPTextModelWithProjection", 1280, 2, "clip-g")])
def test_transformers_clip_text_encoders_are_recognised(cls, width, layers, family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from studio.library.detect import detect_header
    cfg = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, projection_dim=width)
    with torch.device("meta"):
        module = getattr(transformers, cls)(cfg)
    det = detect_header(_header_of(module))
    assert (det.family, det.role, det.variant) == (family, "text_encoder", f"{layers} layers")


@pytest.mark.parametrize("cls,cfg_cls,vocab,family", [("T5EncoderModel", "T5Config", 32128, "t5"),
                                                      ("UMT5EncoderModel", "UMT5Config", 256384, "umt5")])
def test_transformers_t5_encoders_are_recognised(cls, cfg_cls, vocab, family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from studio.library.detect import detect_header
    cfg = getattr(transformers, cfg_cls)(d_model=64, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=vocab)
    with torch.device("meta"):
        module = getattr(transformers, cls)(cfg)
    det = detect_header(_header_of(module))
    assert (det.family, det.role) == (family, "text_encoder")


def test_clip_vision_h_is_an_image_encoder_for_wan(tmp_path):
    """The ViT-H/14 image tower Wan 2.1 I2V needs, in the HF names ComfyUI's clip_vision_h file uses."""
    from library_fixtures import write_safetensors

    shapes = {"vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
              "vision_model.embeddings.class_embedding": (1280,),
              "vision_model.embeddings.position_embedding.weight": (257, 1280),
              "vision_model.pre_layrnorm.weight": (1280,)}
    for i in range(32):
        shapes[f"vision_model.encoder.layers.{i}.self_attn.q_proj.weight"] = (1280, 1280)
    path = write_safetensors(tmp_path / "clip_vision_h.safetensors", shapes)
    det = detect(path)
    assert (det.family, det.role, det.variant) == ("clip-vision-h", "image_encoder", "ViT-H/14")
    assert "wan" in det.compatible
