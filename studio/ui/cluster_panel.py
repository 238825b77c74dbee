"""Send to cluster: a tab's job run as a batch on Studio engines in a Ray cluster.

The window never imports Ray, torch or the engine (tests/test_layering.py): the batch runs in a
`studio generate image|video --cluster ... --base-job FILE --json` subprocess, whose JSON lines
report each worker's progress and each result, in the order of the list. The option is offered only
where Ray is installed, found without importing it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QProcess, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.protocol import job_to_dict

STOP_GRACE_MS = 15000  # after Ctrl+C the driver stops its Ray workers; past this it is killed
STDERR_KEEP = 4000


def ray_available() -> bool:
    """Whether Ray is installed here, without importing it (it takes seconds and much memory)."""
    return importlib.util.find_spec("ray") is not None


def check_address(text: str) -> str:
    """The error for a cluster address, or "" for ray://HOST:PORT, auto or local."""
    text = text.strip()
    if text in ("local", "auto") or (text.startswith("ray://") and len(text) > len("ray://")):
        return ""
    return (f"Cluster address {text!r}: write ray://HEAD:10001 (the head node's Ray client port), 'auto' (the "
            "cluster this computer belongs to) or 'local' (start one on this computer).")


@dataclasses.dataclass
class ClusterOptions:
    address: str = "local"
    workers: int = 0  # 0 = one per GPU, else one per CPU core
    prompts: str = ""  # a text or CSV file, one job a line
    sweep: int = 1


def cluster_command(job: Any, options: ClusterOptions, job_file: Path, python: str = sys.executable) -> list[str]:
    """The CLI call that runs `job` (written to job_file) as a batch on the cluster."""
    # `--opt=value`: a prompt that starts with "-" must not read as an option
    cmd = [python, "-m", "studio", "generate", job.kind, f"--model={job.model}", f"--prompt={job.prompt}",
           f"--base-job={job_file}", f"--cluster={options.address}", f"--sweep={options.sweep}", "--json"]
    if options.workers:
        cmd.append(f"--workers={options.workers}")
    if options.prompts:
        cmd.append(f"--prompts={options.prompts}")
    return cmd


class ClusterRun(QObject):
    """One batch in a subprocess; its JSON lines become signals on the GUI thread."""

    workers_ready = Signal(list)  # [{"index", "pid", "device"}, ...]
    progress = Signal(int, int, int, int, str)  # worker, job index, step, total, stage
    result = Signal(int, object, str)  # job index, result dict (None on failure), error text ("" when fine)
    done = Signal(int, str)  # exit code, what went wrong ("" when every job finished)

    def __init__(self, command: list[str], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.command = command
        self.process = QProcess(self)
        self.process.readyReadStandardOutput.connect(self._read_stdout)
        self.process.readyReadStandardError.connect(self._read_stderr)
        self.process.finished.connect(self._on_finished)
        self.process.errorOccurred.connect(self._on_error)
        self._buffer = b""
        self.stderr = ""
        self.results = 0
        self.failures = 0
        self.stopping = False
        self._kill = QTimer(self)
        self._kill.setSingleShot(True)
        self._kill.timeout.connect(self.process.kill)

    def start(self) -> None:
        self.process.start(self.command[0], self.command[1:])

    @property
    def running(self) -> bool:
        return self.process.state() != QProcess.ProcessState.NotRunning

    def cancel(self) -> None:
        """Stop the batch as Ctrl+C would (the driver then shuts its workers down); kill it if it lingers."""
        if not self.running or self.stopping:
            return
        self.stopping = True
        pid = self.process.processId()
        if os.name == "posix" and pid:
            os.kill(pid, signal.SIGINT)
            self._kill.start(STOP_GRACE_MS)
        else:
            self.process.kill()

    def _read_stdout(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput().data())
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.handle_line(line.decode("utf-8", "replace"))

    def handle_line(self, line: str) -> None:
        try:
            data = json.loads(line)
        except ValueError:
            return  # not ours (a library printing to stdout)
        if not isinstance(data, dict):
            return
        event = data.get("event")
        if event == "cluster":
            self.workers_ready.emit(list(data.get("workers") or []))
        elif event == "progress":
            self.progress.emit(int(data["worker"]), int(data["index"]), int(data["step"]), int(data["total"]),
                               str(data["stage"]))
        elif "index" in data:
            error = str(data.get("error") or "")
            self.results += 1
            self.failures += bool(error)
            result = data.get("result")
            self.result.emit(int(data["index"]), result if isinstance(result, dict) and not error else None, error)

    def _read_stderr(self) -> None:
        self.stderr = (self.stderr + bytes(self.process.readAllStandardError().data()).decode("utf-8", "replace"))[
            -STDERR_KEEP:]

    def _on_finished(self, code: int, _status) -> None:
        self._kill.stop()
        self._read_stdout()
        if self._buffer:
            self.handle_line(self._buffer.decode("utf-8", "replace"))
            self._buffer = b""
        self.done.emit(code, "" if code == 0 else self._why(code))

    def _on_error(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self.done.emit(-1, f"Could not start {self.command[0]} for the cluster batch: "
                               f"{self.process.errorString()}")

    def _why(self, code: int) -> str:
        if self.stopping:
            return "Cancelled."
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip().startswith("studio:")]
        if lines:
            return lines[-1].removeprefix("studio:").strip()
        if self.failures:
            return f"{self.failures} job(s) failed; see each one's message."
        tail = self.stderr.strip().splitlines()[-1:] or [f"exit code {code}"]
        return f"The cluster batch stopped ({tail[0]})."


class ClusterPanel(QWidget):
    """"Run on a Ray cluster" and its settings; `run(job)` starts a batch and reports through the signals."""

    result = Signal(int, object, str)  # job index, result dict or None, error
    running_changed = Signal(bool)
    finished = Signal(str)  # "" or what went wrong
    status = Signal(str)  # one line: each worker's progress

    def __init__(self, work_dir: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.work_dir = work_dir
        self.run_: ClusterRun | None = None
        self.check = QCheckBox("Run on a Ray cluster")
        self.check.setToolTip("Send the job to Studio engines on a Ray cluster: a prompt list and/or a seed sweep "
                              "spread over its GPUs (docs/REMOTE.md).")
        self.address = QLineEdit("local")
        self.address.setPlaceholderText("ray://HEAD:10001, auto or local")
        self.workers = QSpinBox()
        self.workers.setRange(0, 4096)
        self.workers.setSpecialValueText("one per GPU")
        self.prompts = QLineEdit()
        self.prompts.setPlaceholderText("optional: a .txt (one prompt a line) or .csv file")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        prompts_row = QHBoxLayout()
        prompts_row.addWidget(self.prompts, 1)
        prompts_row.addWidget(browse)
        self.sweep = QSpinBox()
        self.sweep.setRange(1, 10000)
        self.sweep.setToolTip("Each prompt this many times, with consecutive seeds")
        self.progress_label = QLabel()
        self.progress_label.setWordWrap(True)
        self.settings_box = QWidget()
        form = QFormLayout(self.settings_box)
        form.setContentsMargins(18, 0, 0, 0)
        form.addRow("Address", self.address)
        form.addRow("Workers", self.workers)
        form.addRow("Prompt list", prompts_row)
        form.addRow("Seeds per prompt", self.sweep)
        form.addRow(self.progress_label)
        self.settings_box.setVisible(False)
        self.check.toggled.connect(self.settings_box.setVisible)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.check)
        layout.addWidget(self.settings_box)
        self._workers_progress: dict[int, str] = {}

    def enabled(self) -> bool:
        return self.check.isChecked()

    @property
    def busy(self) -> bool:
        return self.run_ is not None and self.run_.running

    def options(self) -> ClusterOptions:
        """The settings, or ValueError with what to fix."""
        error = check_address(self.address.text())
        if error:
            raise ValueError(error)
        prompts = self.prompts.text().strip()
        if prompts and not Path(prompts).expanduser().is_file():
            raise ValueError(f"The prompt list {prompts} does not exist: pick a .txt or .csv file, or leave it empty.")
        return ClusterOptions(self.address.text().strip(), self.workers.value(),
                              str(Path(prompts).expanduser().resolve()) if prompts else "", self.sweep.value())

    def run(self, job: Any) -> ClusterRun:
        """Start the batch for `job`; raises ValueError for bad settings or OSError if the job can't be written."""
        if self.busy:
            raise ValueError("A cluster batch is already running: wait for it or cancel it.")
        options = self.options()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        job_file = self.work_dir / f"cluster-job-{uuid.uuid4().hex[:12]}.json"
        job_file.write_text(json.dumps(job_to_dict(job)), encoding="utf-8")
        run = ClusterRun(cluster_command(job, options, job_file), self)
        run.workers_ready.connect(lambda info: self._say(f"{len(info)} worker(s): "
                                                         + ", ".join(str(i.get("device", "?")) for i in info)))
        run.progress.connect(self._on_progress)
        run.result.connect(self.result)
        run.done.connect(lambda _code, error: self._on_done(run, job_file, error))
        self.run_ = run
        self._workers_progress = {}
        self._say(f"Starting the cluster at {options.address}…")
        run.start()
        self.running_changed.emit(True)
        return run

    def cancel(self) -> None:
        if self.run_ is not None:
            self.run_.cancel()
            self._say("Stopping the cluster batch…")

    def _on_progress(self, worker: int, index: int, step: int, total: int, stage: str) -> None:
        self._workers_progress[worker] = f"worker {worker}: #{index + 1} {stage} {step}/{total}"
        self._say(" · ".join(self._workers_progress[w] for w in sorted(self._workers_progress)))

    def _on_done(self, run: ClusterRun, job_file: Path, error: str) -> None:
        job_file.unlink(missing_ok=True)
        if self.run_ is run:
            self.run_ = None
        self._say(error or f"Cluster batch done: {run.results} job(s).")
        self.running_changed.emit(False)
        self.finished.emit(error)

    def _say(self, text: str) -> None:
        self.progress_label.setText(text)
        self.status.emit(text)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Prompt list", "", "Prompt lists (*.txt *.csv);;All files (*)")
        if path:
            self.prompts.setText(path)
