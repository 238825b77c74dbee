"""Studio engines as Ray actors on a local Ray cluster of 2 CPU workers: a batch of tiny-model images
arrives complete, once each, in order, identical to the local engine's; a worker killed mid-batch costs
nothing but time. Skipped without Ray (`pip install 'studio[cluster]'`)."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from sd_fixtures import tiny_sd1  # noqa: E402

from studio.client import EngineClient, EngineOptions  # noqa: E402
from studio.engine.cluster import Cluster, expand_jobs, read_prompt_list  # noqa: E402
from studio.paths import Paths  # noqa: E402
from studio.protocol import ImageJob  # noqa: E402

SEEDS = list(range(100, 108))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> list[ImageJob]:
    ckpt = tiny_sd1(tmp_path_factory.mktemp("sd") / "tiny-sd1.safetensors")
    base = ImageJob(model=str(ckpt), prompt="a fox", width=64, height=64, steps=3, sampler="euler", previews=False)
    return [replace(base, seed=s, prompt=f"a fox, take {i}") for i, s in enumerate(SEEDS)]


@pytest.fixture(scope="module")
def reference(jobs, tmp_path_factory) -> dict[int, np.ndarray]:
    """The same jobs through the local engine process, on one thread as each worker (cpus_per_worker=1): a
    CPU matmul split over another number of threads sums in another order, so its last bits may differ."""
    out = tmp_path_factory.mktemp("local")
    client = EngineClient(Paths.default(), EngineOptions(device="cpu", auto_restart=False,
                                                         settings={"outputs": str(out)}))
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the engine's thread count for image jobs comes from torch's default
    try:
        with client:
            handles = [client.submit(job) for job in jobs]
            return {h.job.seed: pixels(h.wait(120)["images"][0]["path"]) for h in handles}
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("local", workers=2)
    yield c
    c.shutdown()


def pixels(path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_a_batch_arrives_once_in_order_identical_to_the_local_engine(cluster, jobs, reference, tmp_path):
    progress: dict[int, int] = {}

    def on_progress(worker, index, step, total, stage):
        progress[worker] = progress.get(worker, 0) + 1

    results = list(cluster.run(jobs, tmp_path, on_progress=on_progress))
    assert [r.index for r in results] == list(range(8))
    assert all(r.error is None for r in results), [r.error for r in results]
    assert {r.worker for r in results} == {0, 1} and set(progress) == {0, 1}
    paths = [Path(r.result["images"][0]["path"]) for r in results]
    assert len(set(paths)) == 8 and all(p.is_file() and p.is_relative_to(tmp_path) for p in paths)
    for r, path in zip(results, paths, strict=True):
        assert r.result["images"][0]["seed"] == r.job.seed
        assert np.array_equal(pixels(str(path)), reference[r.job.seed])
    # each worker loaded the model once and reused it for all its jobs
    for stats in cluster.stats():
        assert stats["jobs"] >= 1 and len(stats["models"]) == 1, stats


def test_a_worker_killed_mid_batch_does_not_lose_a_job(cluster, jobs, reference, tmp_path):
    killed = []

    def on_progress(worker, index, step, total, stage):
        if worker == 0 and stage == "sampling" and not killed:
            killed.append(index)
            cluster.kill_worker(0)

    results = list(cluster.run(jobs, tmp_path, on_progress=on_progress))
    assert killed and [r.index for r in results] == list(range(8))
    assert all(r.error is None for r in results), [r.error for r in results]
    # the job worker 0 held when it died (progress may lag, so not necessarily `killed[0]`) ran again on worker 1
    retried = [r for r in results if r.attempts == 2]
    assert len(retried) == 1 and retried[0].worker == 1, [(r.index, r.worker, r.attempts) for r in results]
    assert {r.worker for r in results if r.index > retried[0].index} == {1}
    for r in results:
        assert np.array_equal(pixels(r.result["images"][0]["path"]), reference[r.job.seed])


def test_prompt_lists_and_seed_sweeps_expand_to_reproducible_jobs(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# studio batch\na fox\n\na cat in the rain\n")
    csv_file = tmp_path / "prompts.csv"
    csv_file.write_text("prompt,seed,steps\na fox,7,4\na cat,,\n")
    base = ImageJob(model="m", seed=-1)
    jobs = expand_jobs(base, read_prompt_list(text), sweep=2, rng=random.Random(1))
    assert [j.prompt for j in jobs] == ["a fox", "a fox", "a cat in the rain", "a cat in the rain"]
    assert jobs[1].seed == jobs[0].seed + 1 and all(j.seed >= 0 for j in jobs)
    rows = read_prompt_list(csv_file)
    assert rows == [{"prompt": "a fox", "seed": 7, "steps": 4}, {"prompt": "a cat"}]
    assert [j.seed for j in expand_jobs(replace(base, seed=50), rows)] == [7, 50]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,colour\nx,red\n")
    with pytest.raises(ValueError, match="unknown: colour"):
        read_prompt_list(bad)


def test_video_jobs_run_on_the_cluster_in_order_and_a_seed_gives_the_same_clip(cluster, tmp_path_factory, tmp_path):
    from video_fixtures import build_wan_folder, make_job

    from studio.media.video import read_frames, read_job

    folder = build_wan_folder(tmp_path_factory.mktemp("wan"))
    base = make_job(folder, tmp_path, out="")  # out="": each worker writes to its own folder, the files come here
    jobs = expand_jobs(base, [{"prompt": "a red fox runs in snow"}, {"prompt": "a cat"}], sweep=1)
    jobs.append(replace(jobs[0]))  # the first clip again: whichever worker runs it, the frames must match
    results = list(cluster.run(jobs, tmp_path))
    assert [r.index for r in results] == [0, 1, 2]
    assert all(r.error is None for r in results), [r.error for r in results]
    paths = [Path(r.result["videos"][0]["path"]) for r in results]
    assert len(set(paths)) == 3 and all(p.is_file() and p.is_relative_to(tmp_path) for p in paths)
    clips = [np.stack(list(read_frames(p))) for p in paths]
    assert clips[0].shape[0] == base.frames
    assert np.array_equal(clips[0], clips[2]) and not np.array_equal(clips[0], clips[1])
    assert read_job(paths[1])["prompt"] == "a cat"
