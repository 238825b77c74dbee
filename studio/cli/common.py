"""What every engine-backed sub-command shares: the engine options, the client, running one job."""

from __future__ import annotations

import argparse
import os
import sys

from studio.client import EngineClient, EngineError, EngineOptions, JobCancelledError
from studio.paths import Paths
from studio.settings import Settings


def engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N, mps (default: from Settings)")
    p.add_argument("--vram-budget", default=None, help="cap the VRAM the engine may use, e.g. 4GiB")


def make_client(args: argparse.Namespace) -> EngineClient:
    """An EngineClient configured from Settings, overridden by --device / --vram-budget."""
    paths = Paths.default()
    settings = Settings.load(paths)
    options = EngineOptions(
        device=getattr(args, "device", None) or settings.device,
        vram_budget=getattr(args, "vram_budget", None) or settings.vram_budget,
        reserve=settings.vram_reserve,
        auto_restart=False,
        settings={"outputs": str(settings.outputs_path(paths))},
        **remote_options(args, settings),
    )
    client = EngineClient(paths, options)
    if options.remote:
        client.add_listener(_print_trust_notice)
    return client


def remote_options(args: argparse.Namespace, settings: Settings) -> dict:
    """--engine / --engine-token, else $STUDIO_ENGINE_TOKEN, else Settings; {} for the local engine."""
    address = getattr(args, "engine", None) or settings.engine_address
    if not address:
        return {}
    token = getattr(args, "engine_token", None) or os.environ.get("STUDIO_ENGINE_TOKEN") or settings.engine_token
    return {"remote": address, "token": token}


def _print_trust_notice(msg) -> None:
    # First use of a remote engine pins its certificate: show the fingerprint so it can be compared.
    if msg.type == "state" and "first use" in msg.get("detail", ""):
        print(f"studio: {msg['detail']}", file=sys.stderr)


def run_job(client, job, on_event=None) -> dict:
    """Submit a job and wait; Ctrl+C cancels it (a second Ctrl+C quits)."""
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
    return handle.wait(0)


def run_cli_job(args: argparse.Namespace, job, on_event=None) -> tuple[dict | None, int]:
    """One job on a fresh engine for a CLI command: (result, 0), or (None, exit code) with the error printed."""
    with make_client(args) as client:
        try:
            return run_job(client, job, on_event), 0
        except EngineError as exc:
            print(f"\nstudio: {exc}", file=sys.stderr)
            return None, 1
        except JobCancelledError:
            print("\nstudio: cancelled", file=sys.stderr)
            return None, 130


def fail(message: str, code: int = 1) -> int:
    print(f"studio: {message}", file=sys.stderr)
    return code
