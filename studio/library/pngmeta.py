"""PNG parameters: write ours, read ours, A1111's and ComfyUI's. No torch, so the GUI uses it directly.

We write two text chunks:
- `parameters`: the A1111 infotext (prompt, "Negative prompt: ...", "Steps: 20, Sampler: ..."),
  so other tools and image sites read our images;
- `studio`: JSON of the full job, so a dropped image re-runs exactly.

`read_png_parameters` returns one flat dict in ImageJob's vocabulary (prompt, negative, steps,
sampler, schedule, cfg, seed, width, height, model, ...) plus `source` ("studio", "a1111",
"comfyui") and `raw` (what the file held), whichever tool wrote it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO, Any

from PIL import Image, PngImagePlugin

from studio import families
from studio.fsutil import atomic_write

# Our sampler / schedule names <-> A1111 labels.
A1111_SAMPLERS = families.SAMPLER_LABELS
A1111_SCHEDULES = families.SCHEDULE_LABELS
_SAMPLER_FROM_A1111 = {v.lower(): k for k, v in A1111_SAMPLERS.items()}
_SCHEDULE_FROM_A1111 = {v.lower(): k for k, v in A1111_SCHEDULES.items()} | {"uniform": "normal", "automatic": ""}
# ComfyUI uses k-diffusion names; the ones that differ from ours.
_SAMPLER_FROM_COMFY = families.COMFY_SAMPLER_NAMES


# ---------------------------------------------------------------- writing


def _number(value: float) -> str:
    """A1111 writes 7 and 7.5, never 7.0."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _quote(text: str) -> str:
    """A1111's rule: values holding a comma, colon or newline are written as JSON strings."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(job: dict) -> str:
    """The A1111 infotext for a job dict (ImageJob fields; `model_hash` and `model_name` if known)."""
    lines = [str(job.get("prompt", ""))]
    if job.get("negative"):
        lines.append(f"Negative prompt: {job['negative']}")
    fields: list[tuple[str, Any]] = []
    fields.append(("Steps", job.get("steps")))
    sampler = job.get("sampler")
    if sampler:
        fields.append(("Sampler", A1111_SAMPLERS.get(sampler, sampler)))
    schedule = job.get("schedule")
    if schedule:
        fields.append(("Schedule type", A1111_SCHEDULES.get(schedule, schedule)))
    if job.get("cfg") is not None:
        fields.append(("CFG scale", _number(job["cfg"])))
    fields.append(("Seed", job.get("seed")))
    if job.get("width") and job.get("height"):
        fields.append(("Size", f"{job['width']}x{job['height']}"))
    if job.get("model_hash"):
        fields.append(("Model hash", str(job["model_hash"])[:10]))  # A1111's short sha256 ("AutoV2")
    model = job.get("model_name") or (Path(str(job["model"])).stem if job.get("model") else "")
    if model:
        fields.append(("Model", model))
    if job.get("vae"):
        fields.append(("VAE", Path(str(job["vae"])).name))
    if job.get("init_image"):
        fields.append(("Denoising strength", _number(job.get("strength", 0.75))))
    if job.get("clip_skip", 1) and int(job.get("clip_skip", 1)) > 1:
        fields.append(("Clip skip", job["clip_skip"]))
    loras = job.get("loras") or []
    if loras:
        fields.append(("Lora weights", ", ".join(f"{Path(str(x.get('path', ''))).stem}: {_number(x.get('weight', 1.0))}"
                                                 for x in loras)))
    fields.append(("Version", "Studio"))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None and v != ""))
    return "\n".join(lines)


def write_png(path_or_buffer: str | os.PathLike | IO[bytes], image: Image.Image, job: dict,
              parameters_text: str | None = None) -> None:
    """Save `image` as PNG with the A1111 `parameters` chunk and the `studio` JSON chunk.

    A path is written to a temporary file beside it and renamed over it, so a crash or a full disk
    never leaves a half-written or empty image under the final name (studio.fsutil.atomic_write).
    """
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text if parameters_text is not None else a1111_parameters(job))
    info.add_text("studio", json.dumps(job, ensure_ascii=True, sort_keys=True))
    if hasattr(path_or_buffer, "write"):
        image.save(path_or_buffer, format="PNG", pnginfo=info)
        return
    atomic_write(path_or_buffer, lambda fh: image.save(fh, format="PNG", pnginfo=info))


def unique_output_path(folder: str | os.PathLike, stem: str, ext: str = ".png") -> Path:
    """Create and return `folder/stem.png`, or `stem-00001.png`, ... whichever does not exist yet.

    The file is created empty with O_EXCL, so two callers (threads or processes) never get the
    same name and an existing file is never overwritten; the caller then writes into it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", stem).strip(" .") or "image"
    # Start after the highest number already used so a full folder is not probed from 1.
    pattern = re.compile(re.escape(stem) + r"-(\d+)" + re.escape(ext) + "$")
    used = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    candidates = [f"{stem}{ext}"] if not used else []
    number = max(used, default=0)
    while True:
        name = candidates.pop(0) if candidates else f"{stem}-{number:05d}{ext}"
        try:
            fd = os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            number += 1
            continue
        os.close(fd)
        return folder / name


# ---------------------------------------------------------------- reading


class PngMetadataError(ValueError):
    """This file's image or its generation parameters cannot be read. The only error
    read_png_parameters raises, whatever the file holds."""


# What crafted chunks make the parsers below raise (a list where a dict belongs, JSON nested
# 100,000 deep, a header claiming 10^10 pixels); all mean "these parameters cannot be read".
_PARSE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError, OverflowError,
                 Image.DecompressionBombError, EOFError, SyntaxError, OSError)


def read_png_parameters(path: str | os.PathLike | IO[bytes]) -> dict:
    """Parameters of an image made by Studio, A1111/Forge or ComfyUI; {} when it holds none.

    Raises PngMetadataError (a ValueError) when the file is not an image Pillow can open or its
    parameters cannot be read.
    """
    try:
        with Image.open(path) as img:
            text = {**getattr(img, "text", {}), **{k: v for k, v in img.info.items() if isinstance(v, str)}}
    except Image.DecompressionBombError as exc:
        raise PngMetadataError(f"this image claims too many pixels to open safely ({exc}); drop a PNG made by "
                               "Studio, A1111 or ComfyUI") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PngMetadataError(f"cannot read this file as an image ({exc}); drop a PNG made by Studio, "
                               "A1111 or ComfyUI") from None
    try:
        return _parameters_from_text(text)
    except PngMetadataError:
        raise
    except _PARSE_ERRORS as exc:
        raise PngMetadataError(f"this image's generation parameters cannot be read ({type(exc).__name__}: "
                               f"{str(exc)[:120]}); they are damaged or were written by an unknown tool") from None


def _parameters_from_text(text: dict[str, str]) -> dict:
    if "studio" in text:
        try:
            job = json.loads(text["studio"])
        except json.JSONDecodeError:
            job = None
        if isinstance(job, dict):
            return {**job, "source": "studio", "raw": text["studio"]}
    if text.get("parameters"):
        return {**parse_a1111(text["parameters"]), "source": "a1111", "raw": text["parameters"]}
    for key in ("prompt", "workflow"):
        if text.get(key):
            try:
                graph = json.loads(text[key])
            except json.JSONDecodeError:
                continue
            parsed = parse_comfy_prompt(graph) if key == "prompt" else parse_comfy_workflow(graph)
            if parsed:
                return {**parsed, "source": "comfyui", "raw": text[key]}
    return {}


MAX_PARAMETERS_CHARS = 256 * 1024  # A1111 infotext is a few kB; a longer one is not parsed
_KEY_CHARS = re.compile(r"[\w \-/]")
_QUOTED = re.compile(r'"(?:\\.|[^\\"])+"')  # unambiguous: linear from a given start


def _settings_pairs(line: str) -> list[tuple[str, str]]:
    """The `Key: value, Key: "quoted, value", ...` pairs of A1111's last line, in one pass.

    A1111's own regex backtracks quadratically on a long line without colons (40 kB took 8 s,
    on the GUI thread); this scans each character a bounded number of times."""
    pairs: list[tuple[str, str]] = []
    i, n, colon = 0, len(line), -1
    while i < n:
        if colon < i:
            colon = line.find(":", i)
            if colon < 0:
                break
        comma = line.find(",", i, colon)
        if comma >= 0:  # a piece without a colon: not a setting
            i = comma + 1
            continue
        raw = line[i:colon]
        start = len(raw)
        while start > 0 and _KEY_CHARS.match(raw[start - 1]):
            start -= 1
        key = raw[start:].lstrip(" -/").strip()
        v = colon + 1
        while v < n and line[v].isspace():
            v += 1
        m = _QUOTED.match(line, v) if v < n and line[v] == '"' else None
        if m and (m.end() == n or line[m.end()] == ","):
            value, i = m.group(), m.end() + 1
        else:
            end = line.find(",", v)
            end = n if end < 0 else end
            value, i = line[v:end], end + 1
        if len(key) >= 2:
            pairs.append((key, value))
    return pairs


def parse_a1111(text: str) -> dict:
    """Parse A1111 infotext: prompt lines, "Negative prompt:" lines, then the `Key: value, ...` line."""
    if len(text) > MAX_PARAMETERS_CHARS:
        raise PngMetadataError(f"this image's parameters text is {len(text):,} characters, more than any tool writes "
                         f"(limit {MAX_PARAMETERS_CHARS:,}); it was not read")
    *lines, last = text.strip().split("\n")
    pairs = _settings_pairs(last)
    if len(pairs) < 3:  # no settings line: everything is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    settings: dict[str, str] = {}
    for key, value in pairs:
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value[1:-1]
        settings[key.strip()] = value
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative": "\n".join(negative).strip()}
    _put_int(out, "steps", settings.get("Steps"))
    _put_int(out, "seed", settings.get("Seed"))
    _put_float(out, "cfg", settings.get("CFG scale"))
    _put_float(out, "strength", settings.get("Denoising strength"))
    _put_int(out, "clip_skip", settings.get("Clip skip"))
    if m := re.fullmatch(r"(\d+)x(\d+)", settings.get("Size", "")):
        out["width"], out["height"] = int(m[1]), int(m[2])
    sampler = settings.get("Sampler", "")
    schedule = settings.get("Schedule type", "")
    # A1111 before 1.9 folded the schedule into the sampler name: "DPM++ 2M Karras".
    for label, name in (("Karras", "karras"), ("Exponential", "exponential")):
        if sampler.endswith(" " + label):
            sampler, schedule = sampler[: -len(label) - 1], schedule or name
    if sampler:
        out["sampler"] = _SAMPLER_FROM_A1111.get(sampler.lower(), sampler)
    if schedule:
        mapped = _SCHEDULE_FROM_A1111.get(schedule.lower(), schedule.lower())
        if mapped:
            out["schedule"] = mapped
    if settings.get("Model"):
        out["model"] = settings["Model"]
    if settings.get("Model hash"):
        out["model_hash"] = settings["Model hash"]
    if settings.get("VAE"):
        out["vae"] = settings["VAE"]
    out["settings"] = settings
    return out


def _put_int(out: dict, key: str, value: Any) -> None:
    try:
        out[key] = int(str(value).strip())
    except (TypeError, ValueError):
        pass


def _put_float(out: dict, key: str, value: Any) -> None:
    try:
        out[key] = float(str(value).strip())
    except (TypeError, ValueError):
        pass


# ComfyUI API-format graph ("prompt" chunk): {"3": {"class_type": "KSampler", "inputs": {...}}, ...};
# an input that is a list [node_id, output_index] is a link.

_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_TEXT_KEYS = ("text", "text_g", "text_l", "string", "value", "prompt")


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))


def _follow(graph: dict, value: Any, keys: tuple[str, ...], depth: int = 0) -> Any:
    """Resolve a value that may be a link, looking for the first of `keys` in upstream nodes."""
    if not _is_link(value):
        return value
    if depth > 20:
        return None
    node = graph.get(str(value[0]))
    if not isinstance(node, dict):
        return None
    inputs = node.get("inputs", {})
    for key in keys:
        if key in inputs:
            return _follow(graph, inputs[key], keys, depth + 1)
    # pass-through nodes (reroutes, conditioning combiners): follow their first linked input
    for v in inputs.values():
        if _is_link(v):
            return _follow(graph, v, keys, depth + 1)
    return None


def _upstream(graph: dict, value: Any, class_types: tuple[str, ...], via: tuple[str, ...], depth: int = 0) -> dict | None:
    """The first upstream node of one of `class_types`, walking links through the inputs named in `via`."""
    if not _is_link(value) or depth > 20:
        return None
    node = graph.get(str(value[0]))
    if not isinstance(node, dict):
        return None
    if node.get("class_type") in class_types:
        return node
    for key in via:
        found = _upstream(graph, node.get("inputs", {}).get(key), class_types, via, depth + 1)
        if found:
            return found
    return None


def parse_comfy_prompt(graph: dict) -> dict:
    """Seed, steps, cfg, sampler, schedule, prompts, size and checkpoint from a ComfyUI API graph."""
    if not isinstance(graph, dict):
        return {}
    samplers = [(k, n) for k, n in graph.items() if isinstance(n, dict) and n.get("class_type") in _SAMPLER_NODES]
    if not samplers:
        return {}

    def starts_from_empty(node: dict) -> bool:
        return _upstream(graph, node["inputs"].get("latent_image"), ("EmptyLatentImage", "EmptySD3LatentImage"),
                         ()) is not None

    samplers.sort(key=lambda kn: (not starts_from_empty(kn[1]), int(kn[0]) if str(kn[0]).isdigit() else 0))
    node = samplers[0][1]
    inputs = node.get("inputs", {})
    out: dict[str, Any] = {}
    seed = _follow(graph, inputs.get("seed", inputs.get("noise_seed")), ("seed", "noise_seed", "value", "int"))
    _put_int(out, "seed", seed)
    _put_int(out, "steps", _follow(graph, inputs.get("steps"), ("steps", "value", "int")))
    _put_float(out, "cfg", _follow(graph, inputs.get("cfg"), ("cfg", "value", "float")))
    sampler = _follow(graph, inputs.get("sampler_name"), ("sampler_name", "value"))
    if isinstance(sampler, str):
        out["sampler"] = _SAMPLER_FROM_COMFY.get(sampler, sampler)
    scheduler = _follow(graph, inputs.get("scheduler"), ("scheduler", "value"))
    if isinstance(scheduler, str):
        out["schedule"] = scheduler
    denoise = inputs.get("denoise")
    if isinstance(denoise, (int, float)) and denoise < 1:
        out["strength"] = float(denoise)
    for key, name in (("positive", "prompt"), ("negative", "negative")):
        text = _follow(graph, inputs.get(key), _TEXT_KEYS)
        if isinstance(text, str):
            out[name] = text
    latent = _upstream(graph, inputs.get("latent_image"), ("EmptyLatentImage", "EmptySD3LatentImage"), ())
    if latent:
        _put_int(out, "width", _follow(graph, latent["inputs"].get("width"), ("value", "int")))
        _put_int(out, "height", _follow(graph, latent["inputs"].get("height"), ("value", "int")))
    model = _follow(graph, inputs.get("model"), ("ckpt_name", "unet_name", "model"))
    if isinstance(model, str):
        out["model"] = model
    return out


def parse_comfy_workflow(workflow: dict) -> dict:
    """The same from a ComfyUI UI workflow (`workflow` chunk), reading widget values by position."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        return {}
    nodes = {n.get("id"): n for n in workflow["nodes"] if isinstance(n, dict)}
    link_source = {link[0]: link[1] for link in workflow.get("links", []) if isinstance(link, list) and len(link) >= 2}

    def source(node: dict, name: str) -> dict | None:
        for inp in node.get("inputs", []) or []:
            if isinstance(inp, dict) and inp.get("name") == name and inp.get("link") is not None:
                return nodes.get(link_source.get(inp["link"]))
        return None

    sampler = next((n for n in nodes.values() if n.get("type") in _SAMPLER_NODES), None)
    if sampler is None:
        return {}
    w = sampler.get("widgets_values") or []
    out: dict[str, Any] = {}
    # KSampler: [seed, control, steps, cfg, sampler, scheduler, denoise];
    # KSamplerAdvanced: [add_noise, seed, control, steps, cfg, sampler, scheduler, start, end, leftover]
    offset = 1 if sampler.get("type") == "KSamplerAdvanced" else 0
    if len(w) >= 6 + offset:
        _put_int(out, "seed", w[offset])
        _put_int(out, "steps", w[offset + 2])
        _put_float(out, "cfg", w[offset + 3])
        out["sampler"] = _SAMPLER_FROM_COMFY.get(w[offset + 4], w[offset + 4])
        out["schedule"] = w[offset + 5]
    for key, name in (("positive", "prompt"), ("negative", "negative")):
        node = source(sampler, key)
        if node and node.get("widgets_values") and isinstance(node["widgets_values"][0], str):
            out[name] = node["widgets_values"][0]
    latent = source(sampler, "latent_image")
    if latent and latent.get("type") in ("EmptyLatentImage", "EmptySD3LatentImage"):
        lw = latent.get("widgets_values") or []
        if len(lw) >= 2:
            _put_int(out, "width", lw[0])
            _put_int(out, "height", lw[1])
    node, seen = source(sampler, "model"), 0
    while node is not None and seen < 20:
        if node.get("type") in ("CheckpointLoaderSimple", "UNETLoader") and node.get("widgets_values"):
            out["model"] = node["widgets_values"][0]
            break
        node, seen = source(node, "model"), seen + 1
    return out
