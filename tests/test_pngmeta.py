"""PNG metadata: our chunks round-trip; A1111 and ComfyUI images parse; output names never collide."""

from __future__ import annotations

import io
import json
import sys
import threading
from dataclasses import asdict

import pytest
from PIL import Image, PngImagePlugin

from studio.library.pngmeta import (
    a1111_parameters,
    parse_a1111,
    read_png_parameters,
    unique_output_path,
    write_png,
)
from studio.protocol import ImageJob


def test_pngmeta_does_not_import_torch():
    import subprocess

    code = "import sys, studio.library.pngmeta; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def image() -> Image.Image:
    return Image.new("RGB", (16, 8), (200, 30, 60))


def job() -> dict:
    return asdict(ImageJob(model="/models/sd15/dreamshaper_8.safetensors", prompt="a cat, (masterpiece:1.2)\nsecond line",
                           negative="blurry, lowres", width=512, height=768, steps=20, cfg=7.0, sampler="euler_a",
                           schedule="karras", seed=1234, clip_skip=2)) | {"model_hash": "879db523c30d3b9017143d56705015e15a2cb5628762c11d086fed9538abd7fd"}


def test_a1111_parameters_text_looks_like_a1111():
    text = a1111_parameters(job())
    assert text.splitlines() == [
        "a cat, (masterpiece:1.2)",
        "second line",
        "Negative prompt: blurry, lowres",
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: 879db523c3, Model: dreamshaper_8, Clip skip: 2, Version: Studio",
    ]
    assert "CFG scale: 7.5" in a1111_parameters(job() | {"cfg": 7.5})


def test_write_then_read_round_trips_the_full_job(tmp_path):
    path = tmp_path / "out.png"
    j = job()
    write_png(path, image(), j, a1111_parameters(j))
    with Image.open(path) as img:
        assert img.size == (16, 8) and img.text["parameters"] == a1111_parameters(j)
    read = read_png_parameters(path)
    assert read["source"] == "studio"
    assert {k: read[k] for k in j} == j
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_our_a1111_chunk_alone_parses_back_to_the_same_settings():
    j = job()
    parsed = parse_a1111(a1111_parameters(j))
    for key in ("prompt", "negative", "steps", "sampler", "schedule", "cfg", "seed", "width", "height", "clip_skip"):
        assert parsed[key] == j[key], key
    assert parsed["model"] == "dreamshaper_8" and parsed["model_hash"] == "879db523c3"


def test_write_png_to_a_buffer_and_with_non_latin1_text():
    buf = io.BytesIO()
    j = job() | {"prompt": "桜の木, café"}
    write_png(buf, image(), j, a1111_parameters(j))
    buf.seek(0)
    read = read_png_parameters(buf)
    assert read["prompt"] == "桜の木, café"


def png_with_text(tmp_path, name: str, chunks: dict[str, str]):
    info = PngImagePlugin.PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v)
    path = tmp_path / name
    image().save(path, pnginfo=info)
    return path


# Written the way A1111 1.10 writes it: multi-line prompt, LoRA tags, quoted values with commas.
A1111_SAMPLE = """masterpiece, best quality, 1girl, (silver hair:1.3), looking at viewer,
city lights at night <lora:add_detail:0.6>
BREAK cinematic lighting
Negative prompt: (worst quality, low quality:1.4), bad hands,
watermark
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 832x1216, \
Model hash: 4496b36d48, Model: juggernautXL_v9, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, \
Denoising strength: 0.35, Clip skip: 2, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: 4x-UltraSharp, \
Lora hashes: "add_detail: 7c6bad76eb54", ADetailer prompt: "detailed face, blue eyes", Version: v1.10.1"""


def test_reads_a1111_parameters_with_multiline_prompts_and_quoted_values(tmp_path):
    read = read_png_parameters(png_with_text(tmp_path, "a1111.png", {"parameters": A1111_SAMPLE}))
    assert read["source"] == "a1111"
    assert read["prompt"] == ("masterpiece, best quality, 1girl, (silver hair:1.3), looking at viewer,\n"
                              "city lights at night <lora:add_detail:0.6>\nBREAK cinematic lighting")
    assert read["negative"] == "(worst quality, low quality:1.4), bad hands,\nwatermark"
    assert (read["steps"], read["sampler"], read["schedule"], read["cfg"], read["seed"]) == \
        (28, "dpmpp_2m", "karras", 6.5, 3141592653)
    assert (read["width"], read["height"], read["model"], read["model_hash"]) == (832, 1216, "juggernautXL_v9", "4496b36d48")
    assert read["strength"] == 0.35 and read["clip_skip"] == 2 and read["vae"] == "sdxl_vae.safetensors"
    assert read["settings"]["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert read["settings"]["ADetailer prompt"] == "detailed face, blue eyes"


def test_reads_old_a1111_sampler_names_and_prompt_only_text():
    old = parse_a1111("a dog\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x512")
    assert old["sampler"] == "dpmpp_2m" and old["schedule"] == "karras" and old["negative"] == ""
    euler_a = parse_a1111("x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512")
    assert euler_a["sampler"] == "euler_a" and "schedule" not in euler_a
    bare = parse_a1111("just a prompt\nwith two lines")
    assert bare["prompt"] == "just a prompt\nwith two lines" and "steps" not in bare


# The default ComfyUI text-to-image graph in API format, plus a LoRA loader between checkpoint and sampler.
COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 156680208700286, "steps": 20, "cfg": 8.0, "sampler_name": "dpmpp_2m_sde_gpu", "scheduler": "karras",
        "denoise": 1.0, "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 640, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {
        "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,", "clip": ["10", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["10", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "detail.safetensors", "strength_model": 0.8,
                                                  "strength_clip": 0.8, "model": ["4", 0], "clip": ["4", 1]}},
}

COMFY_WORKFLOW = {
    "last_node_id": 9, "last_link_id": 9,
    "nodes": [
        {"id": 3, "type": "KSampler", "inputs": [
            {"name": "model", "type": "MODEL", "link": 1}, {"name": "positive", "type": "CONDITIONING", "link": 4},
            {"name": "negative", "type": "CONDITIONING", "link": 6}, {"name": "latent_image", "type": "LATENT", "link": 2}],
         "widgets_values": [42, "randomize", 25, 5.5, "euler_ancestral", "normal", 1]},
        {"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["sd_xl_base_1.0.safetensors"]},
        {"id": 5, "type": "EmptyLatentImage", "widgets_values": [1024, 1024, 1]},
        {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a red fox in snow"]},
        {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["ugly"]},
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [4, 6, 0, 3, 1, "CONDITIONING"],
              [6, 7, 0, 3, 2, "CONDITIONING"]],
    "version": 0.4,
}


def test_reads_comfyui_prompt_graph(tmp_path):
    path = png_with_text(tmp_path, "comfy.png", {"prompt": json.dumps(COMFY_PROMPT),
                                                 "workflow": json.dumps(COMFY_WORKFLOW)})
    read = read_png_parameters(path)
    assert read["source"] == "comfyui"
    assert read["prompt"] == "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,"
    assert read["negative"] == "text, watermark"
    assert (read["seed"], read["steps"], read["cfg"], read["sampler"], read["schedule"]) == \
        (156680208700286, 20, 8.0, "dpmpp_2m_sde", "karras")
    assert (read["width"], read["height"]) == (512, 640)
    assert read["model"] == "v1-5-pruned-emaonly.safetensors"  # found through the LoRA loader


def test_reads_comfyui_workflow_when_the_prompt_chunk_is_missing(tmp_path):
    read = read_png_parameters(png_with_text(tmp_path, "wf.png", {"workflow": json.dumps(COMFY_WORKFLOW)}))
    assert read["source"] == "comfyui"
    assert (read["seed"], read["steps"], read["cfg"], read["sampler"], read["schedule"]) == (42, 25, 5.5, "euler_a", "normal")
    assert (read["prompt"], read["negative"], read["width"], read["height"]) == ("a red fox in snow", "ugly", 1024, 1024)
    assert read["model"] == "sd_xl_base_1.0.safetensors"


def test_hires_fix_graph_reads_the_first_pass_sampler():
    graph = json.loads(json.dumps(COMFY_PROMPT))
    graph["11"] = {"class_type": "KSampler", "inputs": {**graph["3"]["inputs"], "seed": 1, "denoise": 0.5,
                                                         "latent_image": ["12", 0]}}
    graph["12"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0]}}
    from studio.library.pngmeta import parse_comfy_prompt

    assert parse_comfy_prompt(graph)["seed"] == 156680208700286


def test_images_without_parameters_and_broken_files(tmp_path):
    plain = tmp_path / "plain.png"
    image().save(plain)
    assert read_png_parameters(plain) == {}
    broken = png_with_text(tmp_path, "broken.png", {"studio": "{not json", "prompt": "[1, 2"})
    assert read_png_parameters(broken) == {}
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        read_png_parameters(junk)


def test_unique_output_path_never_overwrites(tmp_path):
    first = unique_output_path(tmp_path, "cat")
    assert first.name == "cat.png" and first.exists()
    first.write_bytes(b"keep me")
    second = unique_output_path(tmp_path, "cat")
    third = unique_output_path(tmp_path, "cat")
    assert (second.name, third.name) == ("cat-00001.png", "cat-00002.png")
    assert first.read_bytes() == b"keep me"
    assert unique_output_path(tmp_path, 'a/b:c*"d').parent == tmp_path  # no path tricks from a prompt


def test_unique_output_path_with_concurrent_callers(tmp_path):
    barrier = threading.Barrier(2)
    results: list[list] = [[], []]

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(40):
            results[i].append(unique_output_path(tmp_path, "img"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = results[0] + results[1]
    assert len(set(paths)) == 80 and all(p.exists() for p in paths)
