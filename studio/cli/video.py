"""`studio generate video ...`: Wan text- and image-to-video from the command line, through the engine."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from studio.cli import batch, common
from studio.protocol import VideoJob


def add_video_parser(generate_subparsers, engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = generate_subparsers.add_parser("video", help="Wan 2.1 / 2.2: text-to-video and image-to-video (MP4)")
    p.add_argument("--model", default="", help="a diffusers Wan folder, a Wan transformer file or a library "
                   "name (the VAE and umT5 text encoder are found next to it or in the library; default: "
                   "the one video model installed)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt (what CFG steers away from)")
    p.add_argument("--frames", type=int, default=81, help="1 + 4n; other counts are rounded (default 81)")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--width", type=int, default=832, help="a multiple of 16 (default 832)")
    p.add_argument("--height", type=int, default=480, help="a multiple of 16 (default 480)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=5.0, help="flow shift: about 3 for 480p, 5 for 720p")
    p.add_argument("--sampler", default="unipc", choices=["unipc", "euler"])
    p.add_argument("--seed", type=int, default=-1, help="-1 picks one (printed, and stored with the video)")
    p.add_argument("--image", default="", help="init image for image-to-video (I2V / TI2V models)")
    p.add_argument("--out", default="", help="an .mp4 path (numbered if taken, never overwritten) or a folder")
    p.add_argument("--vae", default="", help="the Wan VAE file (default: found beside the model or in the library)")
    p.add_argument("--text-encoder", default="", help="the umT5 text encoder (default: found like the VAE)")
    p.add_argument("--keep-partial", action="store_true", help="on Ctrl+C, save the video denoised so far")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    batch.add_batch_args(p)
    engine_args(p)
    p.set_defaults(func=cmd_video)


def _absolute(spec: str, must_exist: bool) -> str:
    """Paths as the engine process sees them (its working folder may differ); library names stay names."""
    if not spec:
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() or not must_exist else spec


def job_from_args(args: argparse.Namespace) -> VideoJob:
    return VideoJob(model=_absolute(args.model, True), prompt=args.prompt, negative=args.negative, width=args.width,
                    height=args.height, frames=args.frames, fps=args.fps, steps=args.steps, cfg=args.cfg,
                    shift=args.shift, sampler=args.sampler, seed=args.seed, image=_absolute(args.image, False),
                    out=_absolute(args.out, False), vae=_absolute(args.vae, True),
                    text_encoder=_absolute(args.text_encoder, True), keep_partial=args.keep_partial)


class ProgressLine:
    """One rewritten stderr line: stage, step/total and, while sampling, the time left."""

    def __init__(self, stream=sys.stderr, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.stage = ""
        self.since = 0.0
        self.shown = False

    def __call__(self, msg) -> None:
        if msg.type != "progress":
            return
        stage, step, total = msg["stage"], msg["step"], msg["total"]
        now = self.clock()
        if stage != self.stage:
            self.stage, self.since = stage, now
        eta = ""
        if stage == "sampling" and 0 < step < total:
            eta = f"  ~{(now - self.since) / step * (total - step):.0f} s left"
        self.stream.write(f"\r{stage:<10} {step}/{total}{eta}      ")
        self.stream.flush()
        self.shown = True


def cmd_video(args: argparse.Namespace) -> int:
    if not args.model:
        from studio.cli.generate import installed_model

        args.model, why = installed_model("video")
        if why:
            return common.fail(why, 2)
        print(f"using {args.model}", file=sys.stderr)
    job = job_from_args(args)
    if batch.wants_batch(args):
        return batch.run_batch(args, job)
    line = ProgressLine() if sys.stderr.isatty() and not args.json else None
    result, code = common.run_cli_job(args, job, line)
    if result is None:
        return code
    if line is not None and line.shown:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(result))
        return 0
    for video in result["videos"]:
        print(f"{video['path']}  (seed {video['seed']}, {video['width']}x{video['height']}, "
              f"{video['frames']} frames at {video['fps']:g} fps, {video['codec']})")
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    t = result.get("timings", {})
    steps = f" (sampling {t['sampling']:.1f} s, {t['per_step']:.2f} s/step)" if "per_step" in t else ""
    print(f"done in {result['seconds']:.1f} s{steps}", file=sys.stderr)
    return 0
