"""`studio doctor`: what this machine has (torch, devices, memory, disk, folders), for bug reports."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

from studio import __version__
from studio.paths import Paths
from studio.settings import Settings
from studio.units import GiB, ram_info


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine has: torch, devices, memory, disk, folders")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true",
                   help="only check that this install works (exit 0) or say what is broken (exit 1)")
    p.set_defaults(func=cmd_doctor)


def health_problems() -> list[str]:
    """What keeps this install from working; empty when healthy. The updater switches only on an empty list."""
    import importlib

    problems = []
    for name in ("studio.client", "studio.ui.main_window", "studio.engine.server", "studio.models.llm"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is what this check exists to report
            problems.append(f"{name} does not import: {type(exc).__name__}: {exc}")
    try:
        import torch

        if float((torch.ones(4) * 2).sum()) != 8.0:
            problems.append("torch computes wrong results on the CPU")
    except Exception as exc:  # noqa: BLE001 - a torch build whose libraries are absent raises OSError and others
        problems.append(f"torch does not work: {type(exc).__name__}: {exc}")
    from studio.errors import UserError
    from studio.models.bundled import default_chat_model
    from studio.resources import asset_path

    try:
        default_chat_model()
        asset_path("clip", "bpe_simple_vocab_16e6.txt.gz")
    except (UserError, FileNotFoundError) as exc:
        problems.append(str(exc))
    return problems


def chat_decode_path(torch) -> str:
    """How chat answers are decoded on this machine's first GPU (or CPU), for bug reports."""
    if not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None)
        return "eager PyTorch on Apple MPS" if mps is not None and mps.is_available() else "eager PyTorch on the CPU"
    # The doctor reports what the engine would do, so it asks the engine's own code, in this process
    # (imported here: only with torch present, and never for the other commands).
    from studio.nn.kernels.decode import gpu_unsupported, triton

    why = gpu_unsupported(torch.device("cuda", 0))
    if why is None:
        return (f"fused Triton step, one CUDA graph (Triton {triton.__version__}) for LLaMA, Mistral and Qwen2/3 "
                "layouts; torch.compile with CUDA graphs for the others")
    return f"torch.compile with CUDA graphs (the fused step is off: {why})"


def _torch_report(torch, settings: Settings) -> dict:
    report: dict = {"torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                              "hip": getattr(torch.version, "hip", None), "threads": torch.get_num_threads(),
                              "cuda_available": torch.cuda.is_available()}}
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"index": i, "name": props.name, "total_bytes": total, "free_bytes": free,
                            "capability": f"{props.major}.{props.minor}"})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"name": "Apple MPS"})
    report["gpus"] = devices
    report["chat_decode"] = chat_decode_path(torch)
    # The device the engine would pick comes from the engine's own probe, run here rather than in an
    # engine process: the doctor must answer even where starting the engine is what fails.
    from studio.engine.device import probe, worker_threads

    try:
        device = probe(settings.device)
        # the thread count the engine's worker computes with, not torch's default (engine/server.py sets it)
        device.extra["all_threads"] = int(device.threads)  # image and video jobs use every core
        device.threads = worker_threads(int(device.threads), os.cpu_count() or 1)
        report["engine_threads"] = device.threads
        report["selected_device"] = device.label()
    except ValueError as exc:
        report["selected_device"] = f"unavailable: {exc}"
    return report


def doctor_report() -> dict:
    paths = Paths.default()
    settings = Settings.load(paths)
    report: dict = {
        "studio": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    try:
        import torch
    except ImportError:  # missing, or a build whose libraries are absent: the report says so instead of failing
        report.update(torch=None, gpus=[], problem="PyTorch is not installed: run the setup command in README.md")
    else:
        report.update(_torch_report(torch, settings))
    total, free = ram_info()
    report["ram"] = {"total_bytes": total, "available_bytes": free}
    outputs = settings.outputs_path(paths)
    folders = {"config": paths.config, "data": paths.data, "models": paths.models, "outputs": outputs,
               "cache": paths.cache, "logs": paths.logs}
    report["folders"] = {k: str(v) for k, v in folders.items()}
    report["model_folders"] = settings.model_folders
    disk = {}
    for name in ("models", "outputs"):
        probe_path = Path(folders[name])
        while not probe_path.exists() and probe_path != probe_path.parent:
            probe_path = probe_path.parent
        usage = shutil.disk_usage(probe_path)
        disk[name] = {"free_bytes": usage.free, "total_bytes": usage.total}
    report["disk"] = disk
    report["settings"] = {"device": settings.device, "vram_budget": settings.vram_budget,
                          "vram_reserve": settings.vram_reserve}
    from studio.media.video import ffmpeg_exe  # here: numpy comes with it, and `studio --help` needs none

    exe = ffmpeg_exe()
    report["video_encoder"] = (f"H.264 through ffmpeg ({exe})" if exe else
                               "OpenCV only (MPEG-4 where it has no H.264): pip install imageio-ffmpeg for H.264")
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.check:
        problems = health_problems()
        for p in problems:
            print(f"problem: {p}")
        print("studio doctor --check: " + ("healthy" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    t = report["torch"]
    print(f"Studio {report['studio']} · Python {report['python']} · {report['platform']}")
    if t:
        build = f"CUDA {t['cuda']}" if t["cuda"] else (f"ROCm {t['hip']}" if t["hip"] else "CPU only")
        print(f"PyTorch {t['version']} ({build}), {os.cpu_count() or 1} CPU cores")
    else:
        print(report["problem"])
    for g in report["gpus"]:
        mem = f", {g['total_bytes'] / GiB:.1f} GiB ({g['free_bytes'] / GiB:.1f} free)" if "total_bytes" in g else ""
        print(f"GPU {g.get('index', '')}: {g['name']}{mem}")
    if not report["gpus"]:
        print("GPU: none found (Studio runs on the CPU, slowly for images and video)")
    print(f"Engine device: {report.get('selected_device', '?')}")
    if report.get("chat_decode"):
        print(f"Chat decode: {report['chat_decode']}")
    print(f"RAM: {report['ram']['total_bytes'] / GiB:.1f} GiB ({report['ram']['available_bytes'] / GiB:.1f} available)")
    for name, d in report["disk"].items():
        print(f"Disk at {name}: {d['free_bytes'] / GiB:.1f} GiB free of {d['total_bytes'] / GiB:.1f} GiB")
    print(f"Video files: {report['video_encoder']}")
    for name, folder in report["folders"].items():
        print(f"{name:>8}: {folder}")
    return 0
