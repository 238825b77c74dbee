"""`studio generate image|video --prompts FILE / --sweep N / --cluster ADDRESS`: many jobs at once.

With --cluster the jobs go to Studio engines on a Ray cluster (studio.engine.cluster); without it,
one after another to the engine (local or --engine). Results print in the order of the list; with
--json one JSON object a line: {"event": "cluster" | "progress", ...} while a cluster runs, and
{"index", "prompt", "seed", "result", "error"} for each job, in order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.cli import common


def add_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default="", metavar="FILE",
                   help="one job per line: a text file of prompts, or a CSV whose header names image settings "
                        "(prompt, negative, seed, steps, cfg, width, height, ...)")
    p.add_argument("--sweep", type=int, default=1, metavar="N",
                   help="run each prompt N times with consecutive seeds (from --seed, or one picked and printed)")
    p.add_argument("--cluster", default="", metavar="ray://HEAD:10001|local",
                   help="run the jobs on Studio engines in a Ray cluster ('local' starts one on this machine); "
                        "needs `pip install 'studio[cluster]'`")
    p.add_argument("--workers", type=int, default=0,
                   help="with --cluster: engines to start (default: one per GPU, else one per CPU core)")
    p.add_argument("--base-job", default="", metavar="FILE",
                   help="a JSON job (as the window builds it) whose settings every job of the batch starts from, "
                        "instead of the other options; the window's Send to cluster uses it")


def wants_batch(args: argparse.Namespace) -> bool:
    return bool(args.prompts or args.cluster or args.sweep > 1 or args.base_job)


def read_base_job(path: Path, kind: type):
    """The job the window wrote for a batch, checked like any job the engine receives."""
    from studio import protocol

    try:
        job = protocol.job_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, protocol.ProtocolError) as exc:
        raise ValueError(f"--base-job {path}: not a readable Studio job ({exc})") from None
    if not isinstance(job, kind):
        raise ValueError(f"--base-job {path} holds a {type(job).__name__}; this command runs {kind.__name__}s")
    return job


def run_batch(args: argparse.Namespace, base) -> int:
    from studio.engine.cluster import ClusterError, expand_jobs, read_prompt_list

    if args.sweep < 1:
        return common.fail("--sweep must be 1 or more", 2)
    try:
        if args.base_job:
            base = read_base_job(Path(args.base_job), type(base))
        rows = read_prompt_list(Path(args.prompts), type(base)) if args.prompts else None
    except ValueError as exc:
        return common.fail(str(exc), 2)
    if not rows and not base.prompt:
        return common.fail("give a prompt: --prompt TEXT, or --prompts FILE for one job per line", 2)
    jobs = expand_jobs(base, rows, args.sweep)
    seeds = sorted({j.seed for j in jobs})
    print(f"{len(jobs)} job(s), seed(s) {', '.join(map(str, seeds[:8]))}{', ...' if len(seeds) > 8 else ''}",
          file=sys.stderr)
    try:
        results = _on_cluster(args, jobs) if args.cluster else _on_engine(args, jobs)
        failed = 0
        for index, result, error in results:
            failed += _report(args, jobs[index], index, len(jobs), result, error)
    except ClusterError as exc:
        return common.fail(str(exc))
    return 1 if failed else 0


def _on_cluster(args: argparse.Namespace, jobs: list):
    from studio.engine.cluster import Cluster, ClusterError
    from studio.paths import Paths
    from studio.settings import Settings

    address = args.cluster
    if address not in ("local", "auto") and not address.startswith("ray://"):
        raise ClusterError(f"--cluster {address!r}: give ray://HEAD:10001 (a Ray cluster's client address), 'auto' "
                           "(the cluster this machine belongs to) or 'local' (start one here)")
    paths = Paths.default()
    outputs = Settings.load(paths).outputs_path(paths)
    tty = sys.stderr.isatty() and not args.json
    status: dict[int, str] = {}

    def on_progress(worker: int, index: int, step: int, total: int, stage: str) -> None:
        if args.json:  # one line per report, so a front end (the window) can show each worker's progress
            print(json.dumps({"event": "progress", "worker": worker, "index": index, "step": step, "total": total,
                              "stage": stage}), flush=True)
        elif tty:
            status[worker] = f"w{worker}: #{index + 1} {stage} {step}/{total}"
            sys.stderr.write("\r" + " | ".join(status[w] for w in sorted(status)) + "   ")
            sys.stderr.flush()

    cluster = Cluster(address, workers=args.workers, device=args.device or "auto")
    print(f"cluster: {len(cluster.workers)} worker(s): " + ", ".join(i["device"] for i in cluster.info),
          file=sys.stderr)
    if args.json:
        print(json.dumps({"event": "cluster", "workers": cluster.info, "jobs": len(jobs)}), flush=True)
    try:
        for r in cluster.run(jobs, outputs, on_progress=on_progress, out=args.out):
            if tty:
                sys.stderr.write("\r\033[K")
            yield r.index, r.result, (None if r.error is None else r.error[1])
    finally:
        cluster.shutdown()


def _on_engine(args: argparse.Namespace, jobs: list):
    from studio.client import EngineError, JobCancelledError

    with common.make_client(args) as client:
        handles = [client.submit(job) for job in jobs]  # the engine queues them in order
        try:
            for index, handle in enumerate(handles):
                try:
                    yield index, handle.wait(None), None
                except (EngineError, JobCancelledError) as exc:
                    yield index, None, str(exc) or "cancelled"
        except KeyboardInterrupt:
            for handle in handles:
                client.cancel(handle.job_id)
            raise


def _report(args: argparse.Namespace, job, index: int, total: int, result: dict | None, error: str | None) -> int:
    if args.json:
        print(json.dumps({"index": index, "prompt": job.prompt, "seed": job.seed, "result": result, "error": error}),
              flush=True)  # read line by line by the window while the batch runs
    elif error is not None:
        print(f"studio: job {index + 1}/{total} ({job.prompt[:40]!r}, seed {job.seed}) failed: {error}",
              file=sys.stderr)
    else:
        for item in result.get("images", []) + result.get("videos", []):
            print(f"{item['path']}  (seed {item['seed']}, {item['width']}x{item['height']})")
    return 1 if error is not None else 0
