"""Studio engines as Ray actors: batches, seed sweeps and prompt lists over many GPUs (or CPU slots).

Any job the engine runs can go (ImageJob, VideoJob, ...): the worker dispatches on the job's kind
through the engine's own pipeline table, so a video batch or sweep runs as an image one does.

Ray does the scheduling, placement and failure detection; this module only keeps one job in flight
per worker, puts results back in submission order and retries a dead worker's job on another.

Each worker is an actor that runs the engine's own pipelines (`server._pipelines`) in-process with
its own ModelCache and MemoryManager, so a model is loaded once per worker and reused. A worker
writes into a private temp folder and returns the files' bytes with the result; the driver saves
them here (all or nothing, never overwriting), as the remote engine's desk does.

Ray is optional (`pip install 'studio[cluster]'`); importing this module does not need it.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from studio import protocol
from studio.protocol import ImageJob, Message
from studio.remote_link import save_outputs

PROGRESS_MIN_INTERVAL_S = 0.1  # a progress message is a Ray call: a few per second per worker is plenty


class ClusterError(RuntimeError):
    pass


@dataclasses.dataclass
class ClusterResult:
    index: int  # position in the submitted list
    job: Any
    worker: int  # the worker that ran it
    result: dict | None = None  # the engine's result dict, paths pointing at files saved here
    error: tuple[str, str] | None = None  # (kind, message)
    seconds: float = 0.0  # on the worker
    attempts: int = 1


# -- the worker -------------------------------------------------------------------------------------------

class EngineWorker:
    """One engine in a Ray actor. Made a Ray actor class by `_actor_class()`, so Ray is imported lazily."""

    def __init__(self, index: int, device: str = "auto", threads: int = 1) -> None:
        import tempfile

        import torch

        from studio.engine.context import ModelCache
        from studio.engine.device import probe
        from studio.engine.memory import MemoryManager
        from studio.engine.server import _pipelines

        torch.set_num_threads(max(1, threads))
        self.index = index
        self.device = probe(device)
        self.models = ModelCache()
        self.memory = MemoryManager(self.device)
        self.pipelines = _pipelines()
        self.outputs = tempfile.mkdtemp(prefix=f"studio-worker{index}-")
        self.jobs = 0

    def ready(self) -> dict:
        import os

        return {"index": self.index, "pid": os.getpid(), "device": self.device.label()}

    def stats(self) -> dict:
        return {"index": self.index, "jobs": self.jobs, "models": [m["key"] for m in self.models.summary()]}

    def run(self, job_id: str, job_dict: dict, progress: Any = None) -> dict:
        """Run one job; a job's own failure comes back as {"error": ...}, so only a dead worker raises."""
        import os

        from studio.engine.context import CancelToken, JobContext, UserError

        job = protocol.job_from_dict(job_dict)
        last = [0.0, ""]

        def on_progress(step: int, total: int, stage: str) -> None:
            now = time.monotonic()
            if progress is not None and (stage != last[1] or step >= total or now - last[0] >= PROGRESS_MIN_INTERVAL_S):
                last[0], last[1] = now, stage
                try:
                    progress.put_nowait((self.index, job_id, int(step), int(total), stage))
                except Exception:  # a full or gone progress queue must not fail the job
                    pass

        ctx = JobContext(job_id=job_id, device=self.device, cancel=CancelToken(), models=self.models,
                         on_progress=on_progress, settings={"outputs": self.outputs}, memory=self.memory)
        start = time.monotonic()
        try:
            result = self.pipelines[job.kind](job, ctx).to_dict()
        except UserError as exc:
            return {"error": [exc.kind, exc.message], "worker": self.index, "seconds": time.monotonic() - start}
        finally:
            self.jobs += 1
        files, payloads = [], []
        for path in _result_files(result):
            data = Path(path).read_bytes()
            files.append({"path": path, "size": len(data)})
            payloads.append(data)
            os.unlink(path)  # the driver keeps the only copy
        return {"result": result, "files": files, "payloads": payloads, "worker": self.index,
                "seconds": time.monotonic() - start}


def _result_files(result: dict) -> list[str]:
    paths: list[str] = []
    for item in (result.get("images") or []) + (result.get("videos") or []):
        paths += [item.get("path") or "", item.get("sidecar") or ""]
    return [p for p in dict.fromkeys(paths) if p and Path(p).is_file()]


def _ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("Ray is not installed. Install it with `pip install 'studio[cluster]'` (or `pip install "
                           "ray`) on this machine and on every machine of the cluster.") from None
    return ray


# -- the driver -------------------------------------------------------------------------------------------

class Cluster:
    """Workers on a Ray cluster: `address` is "local" (start Ray here) or "ray://HEAD:10001" / "auto"."""

    def __init__(self, address: str = "local", workers: int = 0, device: str = "auto", cpus_per_worker: int = 1,
                 max_attempts: int = 3) -> None:
        ray = _ray()
        self.ray = ray
        self.max_attempts = max_attempts
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=max(workers, 1) * cpus_per_worker if workers else None, include_dashboard=False,
                         log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device in ("auto", "cuda") else 0
        count = workers or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_worker)
        actor = ray.remote(EngineWorker)
        options: dict[str, Any] = {"num_cpus": cpus_per_worker, "max_restarts": 0}
        if gpus:
            options["num_gpus"] = 1  # one engine per GPU: Ray sets CUDA_VISIBLE_DEVICES for it
        self.workers = [actor.options(**options).remote(i, "cuda" if gpus else "cpu" if device == "auto" else device,
                                                         cpus_per_worker) for i in range(count)]
        try:
            self.info = ray.get([w.ready.remote() for w in self.workers], timeout=300)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"{count} Studio workers did not start within 5 minutes: the cluster may not have "
                               f"{count} free slots of {cpus_per_worker} CPU{' and 1 GPU' if gpus else ''}.") from None
        self.alive = set(range(count))
        from ray.util.queue import Queue

        self.progress = Queue(maxsize=10000)

    def run(self, jobs: list, outputs: Path, on_progress: Callable[[int, int, int, int, str], None] | None = None,
            out: str = "") -> Iterator[ClusterResult]:
        """Run `jobs`, yielding a ClusterResult for each in submission order as soon as it and those before
        it are done. on_progress(worker, job index, step, total, stage) reports each worker's progress."""
        ray = self.ray
        ids = [protocol.new_job_id() for _ in jobs]
        index_of = {job_id: i for i, job_id in enumerate(ids)}
        pending = collections.deque(range(len(jobs)))
        attempts: collections.Counter[int] = collections.Counter()
        idle = sorted(self.alive)
        running: dict[Any, tuple[int, int]] = {}  # ray ref -> (worker, job index)
        done: dict[int, ClusterResult | tuple[int, dict]] = {}  # a result, or (worker, reply) to save in order
        next_out = 0
        while next_out < len(jobs):
            while idle and pending:
                w, i = idle.pop(0), pending.popleft()
                attempts[i] += 1
                ref = self.workers[w].run.remote(ids[i], protocol.job_to_dict(jobs[i]), self.progress)
                running[ref] = (w, i)
            if not running:
                raise ClusterError("Every Studio worker of the cluster has died; the batch cannot finish. See the Ray "
                                   "logs (`ray logs`), then start the cluster again.")
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.1)
            self._drain_progress(on_progress, index_of)
            for ref in ready:
                w, i = running.pop(ref)
                try:
                    reply = ray.get(ref)
                except ray.exceptions.RayActorError:
                    self.alive.discard(w)  # the worker died: its job goes to another one
                    if attempts[i] >= self.max_attempts:
                        done[i] = ClusterResult(i, jobs[i], w, error=("worker_died", f"Job {i + 1} killed "
                                                f"{attempts[i]} workers in a row; not trying again."), attempts=attempts[i])
                    else:
                        pending.appendleft(i)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    done[i] = ClusterResult(i, jobs[i], w, error=("internal", f"The job failed: {exc.cause!r}"),
                                            attempts=attempts[i])
                else:
                    done[i] = (w, reply)
                idle.append(w)
            while next_out in done:  # saved in submission order, so numbered names follow the list
                item = done.pop(next_out)
                if isinstance(item, tuple):
                    item = self._finish(next_out, jobs[next_out], ids[next_out], item[1], outputs, out,
                                        attempts[next_out])
                yield item
                next_out += 1

    def _finish(self, i: int, job: Any, job_id: str, reply: dict, outputs: Path, out: str, attempts: int
                ) -> ClusterResult:
        res = ClusterResult(i, job, reply["worker"], seconds=reply["seconds"], attempts=attempts)
        if "error" in reply:
            res.error = tuple(reply["error"])  # type: ignore[assignment]
            return res
        msg = Message("result", {"job_id": job_id, "result": reply["result"], "files": reply["files"]},
                      reply["payloads"])
        try:
            res.result = save_outputs(msg, out, outputs)["result"] if reply["files"] else reply["result"]
        except OSError as exc:
            res.error = ("save_failed", f"Job {i + 1} finished but its files could not be saved in {outputs}: {exc}")
        return res

    def _drain_progress(self, on_progress, index_of: dict[str, int]) -> None:
        while not self.progress.empty():
            try:
                worker, job_id, step, total, stage = self.progress.get_nowait()
            except Exception:  # Empty, or the queue actor went away
                return
            if on_progress is not None and job_id in index_of:
                on_progress(worker, index_of[job_id], step, total, stage)

    def stats(self) -> list[dict]:
        return self.ray.get([self.workers[w].stats.remote() for w in sorted(self.alive)])

    def kill_worker(self, index: int) -> None:
        """Kill one worker as a crash would (tests use it; so can an operator draining a node)."""
        self.ray.kill(self.workers[index], no_restart=True)

    def shutdown(self) -> None:
        for w in sorted(self.alive):
            self.ray.kill(self.workers[w], no_restart=True)
        self.alive.clear()
        self.ray.shutdown()


# -- job lists --------------------------------------------------------------------------------------------

def read_prompt_list(path: Path, job_type: type = ImageJob) -> list[dict]:
    """One job's overrides per line. A text file: one prompt a line (blank lines and `#` comments
    skipped). A .csv file: a header row naming fields of `job_type` (ImageJob or VideoJob; `prompt`
    required), one job a row."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read the prompt list {path}: {exc}") from None
    if Path(path).suffix.lower() != ".csv":
        rows = [{"prompt": line.strip()} for line in text.splitlines() if line.strip() and not line.startswith("#")]
    else:
        reader = csv.DictReader(text.splitlines())
        fields = {f.name: f for f in dataclasses.fields(job_type)}
        columns = reader.fieldnames or []
        unknown = [c for c in columns if c not in fields or c in ("version",)]
        if "prompt" not in columns or unknown:
            raise ValueError(f"{path}: the header must name `prompt` and other {job_type.kind} settings only "
                             f"({', '.join(sorted(set(fields) - {'version'}))}); "
                             + (f"unknown: {', '.join(unknown)}" if unknown else "no `prompt` column"))
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append({k: _convert(fields[k].type, v) for k, v in row.items() if v not in (None, "")})
            except ValueError as exc:
                raise ValueError(f"{path}, line {line}: {exc}") from None
    if not rows:
        raise ValueError(f"{path} holds no prompts.")
    return rows


def _convert(kind: Any, value: str) -> Any:
    kind = str(kind)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return value.strip().lower() in ("1", "true", "yes")
    if kind == "list":
        raise ValueError("list settings (loras, text encoders) cannot be set per row")
    return value


def expand_jobs(base: Any, rows: list[dict] | None = None, sweep: int = 1, rng: random.Random | None = None
                ) -> list[Any]:
    """Jobs for a prompt list and/or a seed sweep: each row `sweep` times with consecutive seeds. Seeds are
    fixed here (from the row, the base job, or picked once), so every result can be reproduced."""
    rng = rng or random.Random()
    jobs = []
    for row in rows or [{}]:
        job = dataclasses.replace(base, **row)
        first = job.seed if job.seed >= 0 else rng.randrange(2**32)
        jobs += [dataclasses.replace(job, seed=(first + k) % 2**32) for k in range(max(1, sweep))]
    return jobs
