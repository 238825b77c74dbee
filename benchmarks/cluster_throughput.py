"""Images per minute through the local engine and through Ray engine workers (1 and 2), on tiny SD1 weights.

    .venv/bin/python benchmarks/cluster_throughput.py [--jobs 8]

Each setting first runs one job per engine (model load, warm caches), then times `--jobs` queued jobs.
The overhead per job of Ray is (1-worker seconds per job) - (local engine seconds per job) on the
overhead-bound workload. Models are the random tiny checkpoints of tests/sd_fixtures.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

WORKLOADS = {"64x64, 3 steps": dict(width=64, height=64, steps=3), "256x256, 12 steps": dict(width=256, height=256,
                                                                                              steps=12)}


def local_engine(jobs, warm, out: Path) -> tuple[float, float]:
    """(wall seconds, seconds the engine reported computing)."""
    from studio.client import EngineClient, EngineOptions
    from studio.paths import Paths

    with EngineClient(Paths.default(), EngineOptions(device="cpu", settings={"outputs": str(out)})) as client:
        for job in warm:
            client.submit(job).wait(300)
        start = time.perf_counter()
        computed = sum(handle.wait(600)["seconds"] for handle in [client.submit(job) for job in jobs])
        return time.perf_counter() - start, computed


def ray_workers(n: int, jobs, warm, out: Path) -> tuple[float, float]:
    from studio.engine.cluster import Cluster

    cluster = Cluster("local", workers=n)
    try:
        list(cluster.run(warm * n, out))
        start = time.perf_counter()
        results = list(cluster.run(jobs, out))
        elapsed = time.perf_counter() - start
        assert all(r.error is None for r in results), [r.error for r in results]
        return elapsed, sum(r.seconds for r in results)
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("STUDIO_HOME", tempfile.mkdtemp(prefix="studio-bench-"))
    from sd_fixtures import tiny_sd1

    from studio.protocol import ImageJob

    tmp = Path(tempfile.mkdtemp(prefix="studio-cluster-bench-"))
    ckpt = tiny_sd1(tmp / "tiny-sd1.safetensors")
    print(f"{os.cpu_count()} CPU cores; {args.jobs} jobs per run\n")
    print("| Workload | Local engine | Ray, 1 worker | Ray, 2 workers | Overhead per job: local engine / Ray |")
    print("|---|---|---|---|---|")
    for name, size in WORKLOADS.items():
        base = ImageJob(model=str(ckpt), prompt="a fox in the snow", sampler="euler", previews=False, **size)
        jobs = [replace(base, seed=1000 + i) for i in range(args.jobs)]
        warm = [replace(base, seed=1)]
        t_local, c_local = local_engine(jobs, warm, tmp / "local")
        t1, c1 = ray_workers(1, jobs, warm, tmp / "ray1")
        t2, _ = ray_workers(2, jobs, warm, tmp / "ray2")
        per_min = [60 * args.jobs / t for t in (t_local, t1, t2)]
        # overhead: wall time per job beyond what the pipeline itself reported (queueing, transport, saving)
        o_local, o_ray = ((t - c) / args.jobs * 1000 for t, c in ((t_local, c_local), (t1, c1)))
        print(f"| {name} | {per_min[0]:.0f} img/min | {per_min[1]:.0f} img/min | {per_min[2]:.0f} img/min | "
              f"{o_local:.0f} ms / {o_ray:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
