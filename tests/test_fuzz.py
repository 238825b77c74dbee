"""Fuzzing the parsers that read strangers' files: mutated inputs, fixed seeds, bounded time and memory.

Each target runs 1,000 cases (10,000 with --fuzz-long) in a worker process (tests/fuzz_worker.py)
whose address space is capped at its baseline + 512 MiB. Every case must end in a parsed result
or the module's documented error type, within 2 s. A hung case is killed and the worker restarted
after it, so one hang cannot hide the rest. A failure names (target, seed, case), which the worker
regenerates exactly: `python tests/fuzz_worker.py TARGET SEED CASE 1`.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzz_worker.py")
CASES = 1000
CASE_TIMEOUT_S = 2.0
START_TIMEOUT_S = 120.0  # importing torch (the engine's GGUF reader) on a busy CI machine
SEED = 15  # fixed: the same inputs every run; --fuzz-long adds new ones

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_AS and /proc are POSIX")


def run_fuzz(target: str, seed: int, count: int) -> tuple[list[str], dict[str, int]]:
    """(problems, outcome counts) for cases 0..count-1 of one target."""
    problems: list[str] = []
    counts = {"ok": 0, "err": 0}
    start = 0
    while start < count:
        with tempfile.TemporaryFile() as errfile:
            proc = subprocess.Popen([sys.executable, str(WORKER), target, str(seed), str(start), str(count - start)],
                                    stdout=subprocess.PIPE, stderr=errfile, env={**os.environ, "PYTHONHASHSEED": "0"})
            current, restart = _follow(proc, target, seed, problems, counts)
            errfile.seek(0)
            tail = errfile.read()[-400:].decode(errors="replace")
        if restart is None:
            if current is not None:
                problems.append(f"{target} seed {seed} case {current}: the worker died (exit {proc.returncode}) {tail}")
                start = current + 1
                continue
            if proc.returncode:
                problems.append(f"{target}: the worker failed (exit {proc.returncode}) {tail}")
            break
        start = restart
    return problems, counts


def _follow(proc: subprocess.Popen, target: str, seed: int, problems: list[str],
            counts: dict[str, int]) -> tuple[int | None, int | None]:
    """Read the worker's lines, timing each case. Returns (case running when it stopped, case to restart at)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    fd = proc.stdout.fileno()
    buf = b""
    current: int | None = None
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                proc.kill()
                proc.wait()
                if current is None:
                    problems.append(f"{target}: the worker did not start or stalled between cases")
                    return None, None
                problems.append(f"{target} seed {seed} case {current}: took over {CASE_TIMEOUT_S:g} s")
                return current, current + 1
            chunk = os.read(fd, 65536)
            if not chunk:
                proc.wait()
                return current, None
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                if line.startswith("S "):
                    current = int(line.split()[1])
                    deadline = time.monotonic() + CASE_TIMEOUT_S
                elif line.startswith("D "):
                    _, i, outcome = line.split(" ", 2)
                    if outcome.startswith("BAD"):
                        problems.append(f"{target} seed {seed} case {i}: {outcome[4:]}")
                    else:
                        counts[outcome] += 1
                    current = None
                    deadline = time.monotonic() + CASE_TIMEOUT_S
    finally:
        sel.close()
        proc.stdout.close()


@pytest.fixture
def fuzz_count(request) -> int:
    return CASES * (10 if request.config.getoption("--fuzz-long") else 1)


@pytest.mark.parametrize("target", ["safetensors", "gguf_library", "gguf_engine", "png", "chat_import"])
def test_mutated_inputs_end_in_a_result_or_the_documented_error(target, fuzz_count, request):
    seed = SEED if not request.config.getoption("--fuzz-long") else SEED + int(time.time()) % 1000
    problems, counts = run_fuzz(target, seed, fuzz_count)
    assert not problems, f"{len(problems)} failing cases:\n" + "\n".join(problems[:20])
    assert counts["ok"] + counts["err"] == fuzz_count
    # The mutators must reach past the first check: some inputs parse, many are refused.
    assert counts["ok"] > 0 and counts["err"] > 0, counts


def test_the_runner_reports_a_hang_and_goes_on(monkeypatch):
    """The harness itself: a case that sleeps past the timeout is reported, the later cases still run."""
    import fuzz_worker

    assert "sleep" not in fuzz_worker.TARGETS
    script = (f"import sys, time; sys.path.insert(0, {str(WORKER.parent)!r}); import fuzz_worker as w\n"
              "def target():\n"
              "    def case(rng):\n"
              "        if rng.random() < 0.2: time.sleep(30)\n"
              "        return {}\n"
              "    return case, (ValueError,), lambda r: isinstance(r, dict)\n"
              "w.TARGETS['sleep'] = target\n"
              "sys.exit(w.main(sys.argv[1:]))\n")
    wrapper = Path(tempfile.mkdtemp()) / "sleepy_worker.py"
    wrapper.write_text(script)
    monkeypatch.setattr(sys.modules[__name__], "WORKER", wrapper)
    monkeypatch.setattr(sys.modules[__name__], "CASE_TIMEOUT_S", 0.5)
    problems, counts = run_fuzz("sleep", 3, 12)
    assert problems and all("took over" in p for p in problems)
    assert counts["ok"] + len(problems) == 12
