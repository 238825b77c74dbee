"""CLIP vision encoder against transformers' CLIPVisionModel and CLIPImageProcessor on tiny configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.models.clip_vision import ClipVisionConfig, build_clip_vision, find_layout, preprocess, to_ours

transformers = pytest.importorskip("transformers")


def _hf_model(act: str = "gelu"):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, image_size=28, patch_size=7, hidden_act=act)
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the init values (LayerNorms at 1/0, zero biases)
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_penultimate(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def _hf_state_dict(model) -> dict[str, torch.Tensor]:
    # diffusers' Wan image_encoder/ folders (saved by transformers 4) keep the vision_model. prefix
    return {"vision_model." + k: v for k, v in model.state_dict().items()}


def _to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names -> OpenCLIP's visual tower (open_clip VisionTransformer), written from its layout."""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out = {"visual.class_embedding": sd["embeddings.class_embedding"],
           "visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
           "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
           "visual.proj": torch.randn(32, 16), "logit_scale": torch.tensor(4.6)}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for kind in ("weight", "bias"):
            out[f"visual.{theirs}.{kind}"] = sd[f"{ours}.{kind}"]
    for i in range(3):
        b = f"encoder.layers.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"visual.transformer.resblocks.{i}.{theirs}.{kind}"] = sd[f"{b}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{b}self_attn.{p}_proj.{kind}"] for p in "qkv"])
    return out


def _to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names -> the Wan repository's XLMRobertaCLIP.visual (wan/modules/clip.py)."""
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
             "self_attn.out_proj": "attn.proj"}
    out = {"visual.cls_embedding": sd["embeddings.class_embedding"].view(1, 1, -1),
           "visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
           "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],
           "visual.head": torch.randn(32, 16), "textual.token_embedding.weight": torch.randn(10, 8)}
    for ours, theirs in (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")):
        for kind in ("weight", "bias"):
            out[f"visual.{theirs}.{kind}"] = sd[f"{ours}.{kind}"]
    for i in range(3):
        b = f"encoder.layers.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"visual.transformer.{i}.{theirs}.{kind}"] = sd[f"{b}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"visual.transformer.{i}.attn.to_qkv.{kind}"] = torch.cat(
                [sd[f"{b}self_attn.{p}_proj.{kind}"] for p in "qkv"])
    return out


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_penultimate_hidden_states_match_transformers(act):
    hf = _hf_model(act)
    ours = build_clip_vision(_hf_state_dict(hf), activation=act, heads=4)  # heads: only ViT widths are known
    assert ours.config == ClipVisionConfig(width=32, layers=3, heads=4, patch=7, image_size=28, intermediate=64,
                                           activation=act)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        got = ours.encode(pixels)
        every = ours(pixels, 0), ours(pixels)
        ref_all = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert got.shape == (2, 17, 32)
    torch.testing.assert_close(got, _hf_penultimate(hf, pixels), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(every[0], ref_all[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every[1], ref_all[-1], atol=1e-4, rtol=1e-4)


def test_config_json_and_bare_transformers5_names_load():
    hf = _hf_model("quick_gelu")
    cfg = ClipVisionConfig.from_hf_config(hf.config.to_dict())
    ours = build_clip_vision(dict(hf.state_dict()), cfg=cfg)  # transformers 5 saves without vision_model.
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(pixels), _hf_penultimate(hf, pixels), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("convert", [_to_openclip, _to_wan], ids=["openclip", "wan-original"])
def test_other_layouts_give_the_same_features(convert):
    hf = _hf_model()
    sd = convert(dict(hf.state_dict()))
    assert find_layout(sd)[1] == "visual."
    ours = build_clip_vision(sd, heads=4)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(pixels), _hf_penultimate(hf, pixels), atol=1e-4, rtol=1e-4)


def test_vit_h_config_from_shapes():
    """clip_vision_h's shapes (meta tensors: no memory) give Wan's ViT-H/14: 257 tokens, 16 heads."""
    shapes = {"vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
              "vision_model.embeddings.class_embedding": (1280,),
              "vision_model.embeddings.position_embedding.weight": (257, 1280),
              "visual_projection.weight": (1024, 1280)}
    for i in range(32):
        shapes[f"vision_model.encoder.layers.{i}.self_attn.q_proj.weight"] = (1280, 1280)
        shapes[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = (5120, 1280)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = ClipVisionConfig.from_state_dict(to_ours(sd))
    assert cfg == ClipVisionConfig(width=1280, layers=32, heads=16, patch=14, image_size=224, intermediate=5120,
                                   activation="gelu")
    assert cfg.tokens == 257
    assert "visual_projection.weight" not in to_ours(sd)


def test_weights_without_a_vision_tower_are_refused():
    sd = {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)}
    assert find_layout(sd) is None
    with pytest.raises(ValueError, match="no CLIP vision tower"):
        build_clip_vision(sd)


@pytest.mark.parametrize("size,wh", [(224, (300, 200)), (224, (170, 311)), (28, (61, 37)), (28, (28, 28))])
def test_preprocessing_matches_clip_image_processor(size, wh):
    from PIL import Image
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(sum(wh))
    w, h = wh
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1)
    image = Image.fromarray(np.clip(smooth + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))
    ref = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})(
        images=image, return_tensors="pt")["pixel_values"]
    got = preprocess(image, size)
    assert got.shape == (1, 3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-5)
    two = preprocess([image, image.convert("L")], size)  # greyscale converts to RGB, as the processor does
    assert two.shape == (2, 3, size, size)


def test_encode_images_runs_preprocessing_at_the_model_size():
    from PIL import Image

    hf = _hf_model()
    ours = build_clip_vision(_hf_state_dict(hf), heads=4)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    with torch.no_grad():
        got = ours.encode_images(image)
    torch.testing.assert_close(got, _hf_penultimate(hf, preprocess(image, 28)), atol=1e-4, rtol=1e-4)
