"""`studio generate image|video ...`: generation from the command line, through the engine."""

from __future__ import annotations

import argparse
import json
import sys

from studio import families
from studio.cli import batch, common
from studio.cli.video import add_video_parser
from studio.library.detect import detect
from studio.protocol import ImageJob


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate an image or a video")
    kinds = gen.add_subparsers(dest="kind", metavar="KIND", required=True)

    p = kinds.add_parser("image", help="Stable Diffusion 1.x / 2.x / SDXL: txt2img, img2img, inpainting")
    p.add_argument("--model", default="", help="checkpoint file, diffusers folder or library name "
                                                "(default: the one image model installed)")
    p.add_argument("--prompt", default="", help="the prompt (or --prompts FILE for many jobs)")
    p.add_argument("--negative", default="")
    p.add_argument("--width", type=int, default=0, help="default: the model family's native size")
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="default: the model family's")
    p.add_argument("--cfg", type=float, default=None, help="default: the model family's")
    p.add_argument("--sampler", default="", choices=["", *families.DIFFUSION_SAMPLERS],
                   help="default: the model family's")
    p.add_argument("--schedule", default="", choices=["", *families.SCHEDULES], help="default: the model family's")
    p.add_argument("--seed", type=int, default=-1, help="-1 picks one (printed, and stored in the PNG)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--batch-count", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--vae", default="", help="a VAE file that replaces the checkpoint's")
    p.add_argument("--text-encoder", action="append", default=[], metavar="FILE",
                   help="a CLIP text encoder file for a UNet-only model (clip_l, clip_g; repeatable); "
                        "by default taken from models/clip or models/text_encoders beside the model's folder")
    p.add_argument("--lora", action="append", default=[], metavar="FILE:WEIGHT", help="repeatable")
    p.add_argument("--init", default="", help="init image for img2img")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--mask", default="", help="white = repaint (needs --init)")
    p.add_argument("--prediction", default="auto", choices=["auto", "eps", "v"])
    p.add_argument("--quant", default="", choices=["", "int8", "int4", "fp8"],
                   help="weight-only quantization of the UNet (less VRAM, small quality cost)")
    p.add_argument("--out", default="", help="a .png path (numbered if taken, never overwritten) or a folder")
    p.add_argument("--no-previews", action="store_true")
    p.add_argument("--json", action="store_true")
    batch.add_batch_args(p)
    common.engine_args(p)
    p.set_defaults(func=cmd_image)

    add_video_parser(kinds, common.engine_args)


def parse_lora(spec: str) -> dict:
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        return {"path": spec, "weight": 1.0}
    try:
        return {"path": path, "weight": float(weight)}
    except ValueError:
        return {"path": spec, "weight": 1.0}  # a Windows drive letter or a colon in the name


def installed_model(kind: str) -> tuple[str, str]:
    """(library name, "") of the one installed image or video model, for a command given no --model;
    ("", what to do) when there is none or more than one."""
    from studio.library.detect import IMAGE_FAMILIES, VIDEO_FAMILIES
    from studio.library.library import Library, LibraryError

    families = IMAGE_FAMILIES if kind == "image" else VIDEO_FAMILIES
    try:
        with Library() as lib:
            names = [e.name for e in lib.list(include_missing=False)
                     if e.role in ("checkpoint", "diffusion_model") and e.effective_family in families]
    except LibraryError as exc:
        return "", f"{exc}; give the model file with --model FILE"
    if len(names) == 1:
        return names[0], ""
    if not names:
        return "", (f"no {kind} model installed; add one with `studio models add FILE` or pull one with "
                    f"`studio models pull REPO` (`studio models starters` lists good first ones), "
                    f"then run this again (or give a file with --model FILE)")
    return "", f"{len(names)} {kind} models are installed ({', '.join(names[:8])}); choose one with --model NAME"


def cmd_image(args: argparse.Namespace) -> int:
    if not args.model:
        args.model, why = installed_model("image")
        if why:
            return common.fail(why, 2)
        print(f"using {args.model}", file=sys.stderr)
    size = args.width or args.height or 0
    job = ImageJob(model=args.model, prompt=args.prompt, negative=args.negative,
                   width=args.width or size or 512, height=args.height or size or 512, seed=args.seed,
                   batch_size=args.batch_size, batch_count=args.batch_count, clip_skip=args.clip_skip, vae=args.vae,
                   text_encoders=args.text_encoder,
                   loras=[parse_lora(s) for s in args.lora], init_image=args.init, strength=args.strength,
                   mask=args.mask, prediction=args.prediction, out=args.out, previews=not args.no_previews,
                   quant=args.quant)
    job = _family_defaults(job, args)
    if batch.wants_batch(args):
        return batch.run_batch(args, job)
    if not args.prompt:
        return common.fail("give a prompt: --prompt TEXT, or --prompts FILE for one job per line", 2)
    tty = sys.stderr.isatty() and not args.json

    def on_event(msg) -> None:
        if msg.type == "progress" and tty:
            sys.stderr.write(f"\r{msg['stage']:<10} {msg['step']}/{msg['total']}   ")
            sys.stderr.flush()

    result, code = common.run_cli_job(args, job, on_event)
    if result is None:
        return code
    if tty:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(result))
    else:
        for image in result["images"]:
            print(f"{image['path']}  (seed {image['seed']}, {image['width']}x{image['height']})")
        for note in result.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
        print(f"{len(result['images'])} image(s) in {result['seconds']:.1f} s with {result['family']}", file=sys.stderr)
    return 0


def _family_defaults(job: ImageJob, args: argparse.Namespace) -> ImageJob:
    """What the command line left unset (size, steps, CFG, sampler, schedule) from the family
    catalog, for the family read from the file's headers."""
    from dataclasses import replace

    try:
        det = detect(job.model)
    except Exception:  # detection is a convenience here; the engine reports real problems
        det = None
    f = families.FAMILIES.get(det.family) if det is not None else None
    if f is None or f.kind is not families.Kind.IMAGE:
        f = families.FAMILIES[families.ids(families.Kind.IMAGE, runnable=True)[0]]
    changes: dict = {}
    if not (args.width or args.height):
        changes["width"], changes["height"] = families.size_presets(f.id, det.prediction if det else "")[0]
    changes["steps"] = args.steps or f.steps
    changes["cfg"] = f.cfg if args.cfg is None else args.cfg
    changes["sampler"] = args.sampler or f.sampler
    changes["schedule"] = args.schedule or f.schedule or job.schedule
    return replace(job, **changes)
