"""Quantized diffusion single files: city96-style GGUF and ComfyUI fp8 / fp8-scaled safetensors.

Tiny random Wan transformers and UNets are written in those formats (GGUF with the gguf package's
writer and quantizers, fp8 with torch's float8 casts); the model we load from the file must match
the same model built from the dequantized weights (gguf's own dequantize is the reference), and
its Linear layers must keep the file's compact form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.engine.context import UserError
from studio.engine.offload import estimate_module_bytes
from studio.engine.pipelines.diffusion.wan_parts import read_state_dict as read_video_part
from studio.library.detect import detect
from studio.models.sd_checkpoint import _build_unet, load_sd
from studio.models.unet import UNet, UNetConfig, build_unet
from studio.models.unet_convert import to_ldm
from studio.models.wan import WanConfig, WanTransformer, load_wan_transformer
from studio.models.weights_io import load_weights
from studio.nn.packed_fp8 import Fp8Linear, Fp8Weight
from studio.nn.packed_gguf import GGUFLinear, GGUFWeight

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TINY_WAN = WanConfig(dim=64, heads=2, layers=2, ffn_dim=96, in_channels=4, out_channels=4, text_dim=32, freq_dim=16)


# ------------------------------------------------------------------------------------ tiny models


def _jiggled(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms and modulation tables off their init values too
            p.add_(torch.randn_like(p) * 0.1)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _wan_original(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Wan in the original / ComfyUI layout (the names city96's Wan GGUFs carry)."""
    sd = _jiggled(WanTransformer(TINY_WAN), seed)
    top = [("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
           ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
           ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
           ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
           ("condition_embedder.time_proj.", "time_projection.1."), ("proj_out.", "head.head."),
           ("scale_shift_table", "head.modulation")]
    inner = [(".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_q.", ".q."), (".to_k.", ".k."),
             (".to_v.", ".v."), (".to_out.0.", ".o."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
             (".norm2.", ".norm3."), (".scale_shift_table", ".modulation")]
    out = {}
    for key, t in sd.items():
        for old, new in (inner if key.startswith("blocks.") else top):
            key = key.replace(old, new)
        out[key] = t
    return out


def _wan_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    return x, torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g)


TINY_UNET = UNetConfig(block_channels=(64, 128), layers_per_block=1, transformer_depth=(0, 1), transformer_depth_mid=1,
                       num_heads=None, head_dim=64, context_dim=128, use_linear_projection=True,
                       adm_in_channels=1280 + 6 * 256)  # SDXL base's


def _unet_ldm(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny SDXL-style UNet (linear projections) in the LDM names city96's SD GGUFs carry."""
    sd = _jiggled(UNet(TINY_UNET), seed)
    return {k: v.contiguous() for k, v in to_ldm(sd, 2, 1, [False, True], prefix="").items()}


def _unet_inputs(seed: int = 2) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300.0]), torch.randn(1, 3, 128, generator=g),
            torch.randn(1, TINY_UNET.adm_in_channels, generator=g))


# ------------------------------------------------------------------------------------ GGUF writing


def _write_gguf(path, sd: dict[str, torch.Tensor], arch: str, pick) -> dict[str, torch.Tensor]:
    """Write `sd` as city96 does: `pick(name, tensor)` chooses each tensor's type; a quantized tensor whose
    rows are not whole blocks is flattened to rows of 256 with its shape in comfy.gguf.orig_shape.
    Returns the reference: every tensor as gguf's own dequantize gives it back, in float32."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    ref = {}
    for name, t in sd.items():
        qtype = pick(name, t)
        data = t.float().numpy()
        if qtype not in (Q.F32, Q.F16) and data.shape[-1] % 32:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(data.shape))
            data = data.reshape(-1, 256)
        if qtype == Q.F16:
            data = data.astype(np.float16)
        q = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, q, raw_dtype=qtype)
        ref[name] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(q, qtype))).float().reshape(t.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref


def _city96_types(name: str, t: torch.Tensor):
    """Q4_0 attention, Q8_0 MLPs and embeddings, Q5_0 elsewhere; 1-D F32; matrices whose rows are not
    whole blocks F16 (city96 keeps small and odd tensors in float); convs of 256k values quantized flat."""
    if t.ndim == 1 or t.ndim == 5 or "modulation" in name or "scale_shift" in name:
        return Q.F32
    if t.ndim == 4:
        return Q.Q8_0 if t.numel() % 256 == 0 and t.shape[-1] != 1 else Q.F16
    if t.shape[-1] % 32:
        return Q.F16
    if "attn" in name or ".q." in name or ".k." in name or ".v." in name or ".o." in name:
        return Q.Q4_0
    return Q.Q8_0 if ("ffn" in name or "embedding" in name or "emb" in name) else Q.Q5_0


def _gguf_layers(model: torch.nn.Module) -> list[GGUFLinear]:
    return [m for m in model.modules() if isinstance(m, GGUFLinear)]


# ------------------------------------------------------------------------------------ GGUF tests


def test_gguf_wan_matches_the_dequantized_model_and_stays_compact(tmp_path):
    path = tmp_path / "wan2.1_tiny-Q4_0.gguf"
    ref_sd = _write_gguf(path, _wan_original(), "wan", _city96_types)
    ref = load_wan_transformer(ref_sd, dtype=torch.float32, head_dim=32)
    ours = load_wan_transformer(read_video_part(path, compact=True), dtype=torch.float32, head_dim=32)
    x, t, ctx = _wan_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), ref(x, t, ctx), atol=1e-5, rtol=1e-5)
    layers = _gguf_layers(ours)
    types = {m.weight_q.type_name for m in layers}
    assert {"Q4_0", "Q8_0"} <= types, types
    assert all(isinstance(m.weight_q, GGUFWeight) for m in layers)
    assert ours.blocks[0].attn1.to_q.weight_q.type_name == "Q4_0"  # the file's blocks, not a requantization
    assert estimate_module_bytes(ours) < 0.6 * estimate_module_bytes(ref)


def test_gguf_wan_reads_dequantized_for_plain_builders(tmp_path):
    path = tmp_path / "wan.gguf"
    ref_sd = _write_gguf(path, _wan_original(), "wan", _city96_types)
    plain = read_video_part(path)
    assert set(plain) == set(ref_sd) and all(isinstance(v, torch.Tensor) for v in plain.values())
    for k, v in ref_sd.items():
        torch.testing.assert_close(plain[k].float(), v, atol=0, rtol=0)
    assert plain["patch_embedding.weight"].shape == (64, 4, 1, 2, 2)  # 5-D, written F32 as fix_5d_tensors does


def test_gguf_linear_follows_the_module_to_a_dtype_and_runs_there(tmp_path):
    path = tmp_path / "wan.gguf"
    _write_gguf(path, _wan_original(), "wan", _city96_types)
    ours = load_wan_transformer(load_weights(path, compact=True), dtype=torch.bfloat16, head_dim=32)
    layer = ours.blocks[0].ffn.net[2]
    assert isinstance(layer, GGUFLinear) and layer.raw.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    x, t, ctx = _wan_inputs()
    with torch.no_grad():
        out = ours(x.bfloat16(), t, ctx.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_gguf_unet_with_flattened_convs_matches_the_dequantized_model(tmp_path):
    path = tmp_path / "sdxl_tiny-Q8_0.gguf"
    ref_sd = _write_gguf(path, _unet_ldm(), "sdxl", _city96_types)
    sd = load_weights(path, compact=True)
    # 3x3 convs went in flattened to rows of 256; the reader gives them their real shape back
    assert sd["input_blocks.1.0.in_layers.2.weight"].shape == (64, 64, 3, 3)
    ref = build_unet(ref_sd, dtype=torch.float32)
    ours = _build_unet(sd, torch.float32)
    x, t, ctx, y = _unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx, y), ref(x, t, ctx, y), atol=1e-5, rtol=1e-5)
    layers = _gguf_layers(ours)
    assert len(layers) >= 8 and {"Q4_0", "Q8_0"} <= {m.weight_q.type_name for m in layers}
    assert estimate_module_bytes(ours) < 0.7 * estimate_module_bytes(ref)


def test_gguf_unet_only_file_in_the_image_loader_asks_for_the_missing_parts(tmp_path):
    # The image pipeline takes full checkpoints: a UNet-only GGUF loads as far as its UNet, then the
    # user is told what is missing rather than getting a format error.
    path = tmp_path / "unet.gguf"
    _write_gguf(path, _unet_ldm(), "sdxl", _city96_types)
    with pytest.raises(UserError, match="has a UNet but no VAE"):
        load_sd(path, dtype=torch.float32)


def test_gguf_with_an_unreadable_type_or_corrupt_header_says_so(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(UserError, match="is a GGUF file that cannot be read"):
        load_weights(bad)
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), arch="wan")
    writer.add_tensor("blocks.0.self_attn.q.weight", np.zeros((64, 32), np.int8), raw_dtype=Q.I8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="cannot read yet"):
        load_weights(path, compact=True)


def test_gguf_diffusion_models_are_detected_with_their_original_shapes(tmp_path):
    wan = tmp_path / "wan.gguf"
    _write_gguf(wan, _wan_original(), "wan", _city96_types)
    det = detect(wan)
    assert (det.family, det.role, det.format) == ("wan", "diffusion_model", "gguf")
    # SD1 as city96 converts it: 3x3 convs and the 768-wide attn2.to_k flattened to rows of 256
    g = torch.Generator().manual_seed(0)
    shapes = {"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3),
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 776 - 8),
              "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1)}
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    sd1 = tmp_path / "sd1.gguf"
    _write_gguf(sd1, sd, "sd1", lambda n, t: Q.Q8_0 if t.numel() % 256 == 0 and t.shape[-1] != 1 else Q.F16)
    from studio.library.headers import read_header

    assert read_header(sd1).tensors["input_blocks.0.0.weight"].shape == (45, 256)  # as stored
    det = detect(sd1)
    assert (det.family, det.role, det.format) == ("sd1", "diffusion_model", "gguf")


# ------------------------------------------------------------------------------------ fp8


def _fp8(sd: dict[str, torch.Tensor], scaled: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI's fp8 files: matrices and convs as float8_e4m3fn (norms, biases, tables stay bf16); scaled
    ones with a per-layer scale_weight (and scale_input, and the scaled_fp8 marker). -> (file, reference)."""
    out, ref = {}, {}
    for key, t in sd.items():
        if t.ndim >= 2 and "modulation" not in key and "scale_shift" not in key:
            scale = (t.abs().max().float() / 448.0) if scaled else torch.tensor(1.0)
            q = (t.float() / scale).to(torch.float8_e4m3fn)
            out[key] = q
            ref[key] = q.float() * scale
            if scaled:
                base = key[: -len("weight")]
                out[base + "scale_weight"] = scale.reshape(())
                out[base + "scale_input"] = torch.tensor(1.0)
        else:
            out[key] = t.to(torch.bfloat16)
            ref[key] = out[key].float()
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, ref


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_wan_keeps_fp8_linears_and_matches_the_dequantized_model(tmp_path, scaled):
    file_sd, ref_sd = _fp8(_wan_original(), scaled)
    path = tmp_path / "wan.safetensors"
    save_file(file_sd, str(path))
    ref = load_wan_transformer(ref_sd, dtype=torch.float32, head_dim=32)
    ours = load_wan_transformer(read_video_part(path, compact=True), dtype=torch.float32, head_dim=32)
    x, t, ctx = _wan_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), ref(x, t, ctx), atol=1e-5, rtol=1e-5)
    q = ours.blocks[1].attn2.to_v
    assert isinstance(q, Fp8Linear) and q.weight.dtype == torch.float8_e4m3fn
    assert estimate_module_bytes(ours) < 0.5 * estimate_module_bytes(ref)
    # the plain (dequantized) read fits a plain builder: no unknown scale keys, the scale applied
    plain = read_video_part(path)
    assert not any("scale_" in k or k == "scaled_fp8" for k in plain)
    model = load_wan_transformer(plain, dtype=torch.float32, head_dim=32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx), ref(x, t, ctx), atol=3e-2, rtol=3e-2)  # bf16 dequantization


def test_fp8_scaled_full_sdxl_checkpoint_loads_in_the_image_loader(tmp_path):
    from safetensors.torch import load_file
    from sd_fixtures import tiny_sdxl

    full = load_file(str(tiny_sdxl(tmp_path / "full.safetensors")))
    unet = {k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}
    file_unet, ref_unet = _fp8(unet, scaled=True)
    save_file({**full, **file_unet}, str(tmp_path / "fp8.safetensors"))
    save_file({**full, **ref_unet}, str(tmp_path / "ref.safetensors"))
    ours = load_sd(tmp_path / "fp8.safetensors", dtype=torch.float32)
    ref = load_sd(tmp_path / "ref.safetensors", dtype=torch.float32)
    assert any(isinstance(m, Fp8Linear) for m in ours.unet.modules())
    from studio.engine.pipelines.diffusion.sd import packed_layer_kind

    assert packed_layer_kind(ours.unet) == "fp8" and packed_layer_kind(ref.unet) == ""
    g = torch.Generator().manual_seed(3)
    x, ctx, y = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 128, generator=g), torch.randn(1, 1600, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours.unet(x, torch.tensor([10.0]), ctx, y), ref.unet(x, torch.tensor([10.0]), ctx, y),
                                   atol=1e-5, rtol=1e-5)


def test_fp8_scale_for_a_missing_weight_is_a_damaged_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn), "b.scale_weight": torch.tensor(2.0)}, str(path))
    with pytest.raises(UserError, match="scale_weight entries for weights it does not hold"):
        load_weights(path)


def test_fp8_weight_dequantizes_with_a_scalar_or_per_channel_scale():
    q = torch.randn(3, 5).to(torch.float8_e4m3fn)
    torch.testing.assert_close(Fp8Weight(q, torch.tensor(0.5)).dequantize(), q.float() * 0.5)
    s = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(Fp8Weight(q, s).dequantize(), q.float() * s[:, None])
    lin = Fp8Weight(q, s).to_module(None)
    torch.testing.assert_close(lin(torch.eye(5)), (q.float() * s[:, None]).t())


# ------------------------------------------------------------------------------------ the video pipeline


def test_video_job_on_a_gguf_wan_file_matches_the_dequantized_safetensors(tmp_path):
    """The video pipeline runs a .gguf transformer (formerly refused) and gives the video the same weights
    written dequantized as safetensors give."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from video_fixtures import Collector, build_wan_folder, make_job, write_tokenizer

    from studio.engine.context import ModelCache
    from studio.engine.pipelines.diffusion import wan as V
    from studio.media.video import read_frames

    folder = build_wan_folder(tmp_path / "wan")
    net = load_file(str(next((folder / "transformer").glob("*.safetensors"))))
    files = tmp_path / "diffusion_models"
    files.mkdir()
    ref_sd = _write_gguf(files / "wan_tiny-Q8_0.gguf", net, "wan", _city96_types)
    save_file(ref_sd, str(files / "wan_tiny_dequantized.safetensors"))
    write_tokenizer(files / "tokenizer" / "tokenizer.json")

    def frames(name: str) -> np.ndarray:
        col = Collector(tmp_path)
        col.ctx.models = ModelCache()
        job = make_job(files / name, tmp_path, steps=2, vae=str(folder / "vae"),
                       text_encoder=str(folder / "text_encoder"), out=str(tmp_path / f"{name}.mp4"))
        out = np.stack(list(read_frames(V.run_video(job, col.ctx)["path"]))).astype(int)
        (entry,) = col.ctx.models.summary()
        parts = col.ctx.models.get(entry["key"])
        # the Models/Memory panels' size counts the GGUF blocks (buffers), not just the parameters
        want = sum(estimate_module_bytes(m) for m in (parts.transformer, parts.vae, parts.encoder))
        assert entry["bytes"] == want
        return out

    ours, ref = frames("wan_tiny-Q8_0.gguf"), frames("wan_tiny_dequantized.safetensors")
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 2


def test_a_lora_on_an_fp8_checkpoint_is_refused_not_applied_to_the_raw_fp8_weights(tmp_path):
    # LoRA patching adds to `module.weight`: on fp8 storage it would ignore the scale and corrupt the UNet
    from safetensors.torch import load_file
    from sd_fixtures import tiny_sdxl

    from studio.engine.context import JobContext, ModelCache, UserError
    from studio.engine.device import probe
    from studio.engine.pipelines.diffusion.sd import run_image
    from studio.protocol import ImageJob

    full = load_file(str(tiny_sdxl(tmp_path / "full.safetensors")))
    unet = {k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}
    save_file({**full, **_fp8(unet, scaled=False)[0]}, str(tmp_path / "fp8.safetensors"))
    ctx = JobContext("j", probe("cpu"), models=ModelCache(), settings={"outputs": str(tmp_path)})
    job = ImageJob(model=str(tmp_path / "fp8.safetensors"), prompt="a cat", width=64, height=64, steps=1,
                   loras=[{"path": str(tmp_path / "style.safetensors"), "weight": 0.8}])
    with pytest.raises(UserError, match="fp8 .*fp16/bf16 version") as info:
        run_image(job, ctx)
    assert info.value.kind == "unsupported"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gguf", "fp8_scaled"])
def test_compact_wan_on_cuda_matches_the_cpu(tmp_path, kind):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if kind == "gguf":
        path = tmp_path / "wan.gguf"
        _write_gguf(path, _wan_original(), "wan", _city96_types)
    else:
        path = tmp_path / "wan_fp8_scaled.safetensors"
        save_file(_fp8(_wan_original(), scaled=True)[0], str(path))
    cpu = load_wan_transformer(load_weights(path, compact=True), dtype=torch.float32, head_dim=32)
    gpu = load_wan_transformer(load_weights(path, compact=True), dtype=torch.float32, head_dim=32).to("cuda")
    x, t, ctx = _wan_inputs()
    with torch.no_grad():
        want = cpu(x, t, ctx)
        got = gpu(x.cuda(), t.cuda(), ctx.cuda()).cpu()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
