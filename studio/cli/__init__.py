"""`studio` command line. With no sub-command it opens the window.

Every job goes through the engine process (EngineClient), exactly as the GUI's do.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

from studio import __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engine"]:  # internal: the engine process parses its own arguments
        return _engine(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        from studio.ui.app import run_gui

        return run_gui()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Studio: local image, video and chat generation.")
    parser.add_argument("--version", action="version", version=f"studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("gui", help="open the window (the default)")
    p.set_defaults(func=lambda a: _gui())

    p = sub.add_parser("doctor", help="what this machine has: torch, devices, memory, disk, folders")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("selftest", help="run a matrix multiply on the device through the engine")
    _engine_args(p)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("chat", help="chat with a language model (an interactive prompt without PROMPT)")
    p.add_argument("prompt", nargs="?", help="one message to answer; omit for an interactive session")
    p.add_argument("--model", default="", help="a .gguf file, a Hugging Face folder or a library name "
                                                "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--truncate", action="store_true", help="drop the oldest turns when the context is full")
    p.add_argument("--quant", choices=["int8", "int4"], default="",
                   help="quantize a full-precision model's weights at load (GGUF files keep their own)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the answer and its timings")
    _engine_args(p)
    p.set_defaults(func=cmd_chat)

    try:
        from studio.cli import models as cli_models
    except ImportError:
        cli_models = None
    if cli_models is not None:
        cli_models.add_parser(sub)

    try:
        from studio.cli import generate as cli_generate
    except ImportError:
        cli_generate = None
    if cli_generate is not None:
        cli_generate.add_parser(sub, _engine_args)
    return parser


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N, mps (default: from Settings)")
    p.add_argument("--vram-budget", default=None, help="cap the VRAM the engine may use, e.g. 4GiB")


def _gui() -> int:
    from studio.ui.app import run_gui

    return run_gui()


def _engine(rest: list[str]) -> int:
    from studio.engine.server import main as engine_main

    return engine_main(rest)


def make_client(args: argparse.Namespace):
    """An EngineClient configured from Settings, overridden by --device / --vram-budget."""
    from studio.client import EngineClient, EngineOptions
    from studio.paths import Paths
    from studio.settings import Settings

    paths = Paths.default()
    settings = Settings.load(paths)
    options = EngineOptions(
        device=getattr(args, "device", None) or settings.device,
        vram_budget=getattr(args, "vram_budget", None) or settings.vram_budget,
        reserve=settings.vram_reserve,
        auto_restart=False,
        settings={"outputs": str(settings.outputs_path(paths))},
    )
    return EngineClient(paths, options)


def run_job(client, job, on_event=None) -> dict:
    """Submit a job and wait; Ctrl+C cancels it (a second Ctrl+C quits)."""
    from studio.client import EngineError, JobCancelledError

    if on_event is not None:
        client.add_listener(on_event)
    handle = client.submit(job)
    try:
        while not handle.done.wait(0.1):
            pass
    except KeyboardInterrupt:
        client.cancel(handle.job_id)
        print("\ncancelling...", file=sys.stderr)
        handle.done.wait(10)
    finally:
        if on_event is not None:
            client.remove_listener(on_event)
    try:
        return handle.wait(0)
    except JobCancelledError:
        raise
    except EngineError:
        raise


def run_cli_job(args: argparse.Namespace, job, on_event=None) -> tuple[dict | None, int]:
    """One job on a fresh engine for a CLI command: (result, 0), or (None, exit code) with the error printed."""
    from studio.client import EngineError, JobCancelledError

    with make_client(args) as client:
        try:
            return run_job(client, job, on_event), 0
        except EngineError as exc:
            print(f"\nstudio: {exc}", file=sys.stderr)
            return None, 1
        except JobCancelledError:
            print("\nstudio: cancelled", file=sys.stderr)
            return None, 130


def _fail(message: str, code: int = 1) -> int:
    print(f"studio: {message}", file=sys.stderr)
    return code


def cmd_selftest(args: argparse.Namespace) -> int:
    from studio.protocol import SelfTestJob

    job = SelfTestJob(size=args.size, iterations=args.iterations, dtype=args.dtype)
    result, code = run_cli_job(args, job)
    if result is None:
        return code
    if args.json:
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    verdict = "correct" if result["ok"] else f"WRONG RESULTS: relative error {result['relative_error']:.2e}"
    print(f"{result['device_label']}: {result['tflops']:.3f} TFLOP/s ({result['dtype']}, {result['size']}², "
          f"{result['iterations']} runs in {result['seconds']:.2f} s), {verdict}")
    return 0 if result["ok"] else 1


def cmd_chat(args: argparse.Namespace) -> int:
    from studio.client import EngineError, JobCancelledError
    from studio.protocol import ChatJob

    def job_for(messages: list[dict]) -> ChatJob:
        return ChatJob(messages=messages, model=args.model, system=args.system, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                       stop=list(args.stop), overflow="truncate" if args.truncate else "error", quant=args.quant)

    stream = not args.json

    def on_event(msg) -> None:
        if msg.type == "token" and stream:
            sys.stdout.write(msg["text"])
            sys.stdout.flush()
        elif msg.type == "progress" and msg["stage"] == "loading" and stream and sys.stderr.isatty():
            sys.stderr.write(f"\rloading model {msg['step']}/{msg['total']}")
            sys.stderr.flush()

    with make_client(args) as client:
        if args.prompt is not None:
            try:
                result = run_job(client, job_for([{"role": "user", "content": args.prompt}]), on_event)
            except EngineError as exc:
                return _fail(str(exc))
            except JobCancelledError:
                print()
                return 130
            if args.json:
                keys = ("text", "prompt_tokens", "completion_tokens", "ttft_s", "tokens_per_s", "model",
                        "finish_reason", "context_length", "notes")
                print(json.dumps({k: result.get(k) for k in keys}, ensure_ascii=False))
            else:
                print()
                for note in result.get("notes") or []:
                    print(f"note: {note}", file=sys.stderr)
            return 0
        return _chat_repl(client, job_for, on_event)


def _chat_repl(client, job_for, on_event) -> int:
    from studio.client import EngineError, JobCancelledError

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print("Studio chat. /reset starts over, /exit or Ctrl+D quits, Ctrl+C stops an answer.", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            result = run_job(client, job_for(messages), on_event)
        except JobCancelledError:
            print("\n(stopped)", file=sys.stderr)
            messages.pop()
            continue
        except EngineError as exc:
            print(f"\nstudio: {exc}", file=sys.stderr)
            messages.pop()
            continue
        print(f"\n[{result.get('completion_tokens', 0)} tokens, {result.get('tokens_per_s', 0):.1f} tok/s]",
              file=sys.stderr)
        messages.append({"role": "assistant", "content": result.get("text", "")})


# -- doctor ------------------------------------------------------------------------

def chat_decode_path(torch) -> str:
    """How chat answers are decoded on this machine's first GPU (or CPU), for bug reports."""
    if not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None)
        return "eager PyTorch on Apple MPS" if mps is not None and mps.is_available() else "eager PyTorch on the CPU"
    from studio.models.llm_decode import gpu_unsupported, triton

    why = gpu_unsupported(torch.device("cuda", 0))
    if why is None:
        return (f"fused Triton step, one CUDA graph (Triton {triton.__version__}) for LLaMA, Mistral and Qwen2/3 "
                "layouts; torch.compile with CUDA graphs for the others")
    return f"torch.compile with CUDA graphs (the fused step is off: {why})"


def doctor_report() -> dict:
    from studio.paths import Paths
    from studio.settings import Settings
    from studio.units import GiB, ram_info

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

        report["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                           "hip": getattr(torch.version, "hip", None), "threads": torch.get_num_threads(),
                           "cuda_available": torch.cuda.is_available()}
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
        from studio.engine.device import probe

        report["selected_device"] = probe(settings.device).label()
    except ImportError:
        report["torch"] = None
        report["gpus"] = []
        report["problem"] = "PyTorch is not installed: run the setup command in README.md"
    except ValueError as exc:
        report["selected_device"] = f"unavailable: {exc}"
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
    try:
        from studio.media.video import ffmpeg_exe

        exe = ffmpeg_exe()
        report["video_encoder"] = (f"H.264 through ffmpeg ({exe})" if exe else
                                   "OpenCV only (MPEG-4 where it has no H.264): pip install imageio-ffmpeg for H.264")
    except ImportError:  # numpy / OpenCV missing: the install is broken anyway, and the torch line says so
        report["video_encoder"] = "unavailable (OpenCV is not installed)"
    report["_gib"] = GiB
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    gib = report.pop("_gib")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    t = report["torch"]
    print(f"Studio {report['studio']} · Python {report['python']} · {report['platform']}")
    if t:
        build = f"CUDA {t['cuda']}" if t["cuda"] else (f"ROCm {t['hip']}" if t["hip"] else "CPU only")
        print(f"PyTorch {t['version']} ({build}), {t['threads']} CPU threads")
    else:
        print(report["problem"])
    for g in report["gpus"]:
        mem = f", {g['total_bytes'] / gib:.1f} GiB ({g['free_bytes'] / gib:.1f} free)" if "total_bytes" in g else ""
        print(f"GPU {g.get('index', '')}: {g['name']}{mem}")
    if not report["gpus"]:
        print("GPU: none found (Studio runs on the CPU, slowly for images and video)")
    print(f"Engine device: {report.get('selected_device', '?')}")
    if report.get("chat_decode"):
        print(f"Chat decode: {report['chat_decode']}")
    print(f"RAM: {report['ram']['total_bytes'] / gib:.1f} GiB ({report['ram']['available_bytes'] / gib:.1f} available)")
    for name, d in report["disk"].items():
        print(f"Disk at {name}: {d['free_bytes'] / gib:.1f} GiB free of {d['total_bytes'] / gib:.1f} GiB")
    print(f"Video files: {report['video_encoder']}")
    for name, folder in report["folders"].items():
        print(f"{name:>8}: {folder}")
    return 0
