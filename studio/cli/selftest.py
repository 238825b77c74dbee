"""`studio selftest`: a matrix multiply on the device through the engine, checked against the CPU."""

from __future__ import annotations

import argparse
import json

from studio.cli import common
from studio.protocol import SelfTestJob


def add_parser(sub) -> None:
    p = sub.add_parser("selftest", help="run a matrix multiply on the device through the engine")
    common.engine_args(p)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_selftest)


def cmd_selftest(args: argparse.Namespace) -> int:
    job = SelfTestJob(size=args.size, iterations=args.iterations, dtype=args.dtype)
    result, code = common.run_cli_job(args, job)
    if result is None:
        return code
    if args.json:
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    verdict = "correct" if result["ok"] else f"WRONG RESULTS: relative error {result['relative_error']:.2e}"
    print(f"{result['device_label']}: {result['tflops']:.3f} TFLOP/s ({result['dtype']}, {result['size']}², "
          f"{result['iterations']} runs in {result['seconds']:.2f} s), {verdict}")
    return 0 if result["ok"] else 1
