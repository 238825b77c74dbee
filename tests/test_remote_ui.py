"""The window's side of a remote engine and of a Ray cluster: Settings > Remote engine (address, token,
pinned certificate, Forget), the engine options, the status while reconnecting and the first-use notice,
Fetch result after a lost link, and Send to cluster (hidden without Ray; a real batch through the CLI)."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PySide6.QtCore import QObject, Signal  # noqa: E402

from studio.paths import Paths  # noqa: E402
from studio.protocol import ImageJob, make  # noqa: E402
from studio.remote_trust import KnownEngines, known_engines_path  # noqa: E402
from studio.settings import Settings  # noqa: E402
from studio.ui import cluster_panel  # noqa: E402
from studio.ui.cluster_panel import ClusterOptions, ClusterRun, check_address, cluster_command  # noqa: E402
from studio.ui.job_runner import FETCH_ACTION, JobRunner, failure_text  # noqa: E402
from studio.ui.settings_dialog import SettingsDialog  # noqa: E402

PIN = "AB:" * 31 + "CD"


class MockEngine(QObject):
    """QtEngine's face for tabs and runners: submit, cancel, resume, and a `message` signal to replay on."""

    message = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[str] = []
        self.resumed: list[str] = []

    def submit(self, job, job_id=None) -> str:
        job_id = job_id or f"job{len(self.submitted) + 1}"
        self.submitted.append(job_id)
        return job_id

    def cancel(self, job_id: str) -> None:
        pass

    def resume(self, job_id: str) -> None:
        self.resumed.append(job_id)

    def send(self, type_: str, **fields) -> None:
        self.message.emit(make(type_, None, **fields))


@pytest.fixture
def paths(tmp_path) -> Paths:
    return Paths(tmp_path / "config", tmp_path / "data", tmp_path / "cache", tmp_path / "logs", tmp_path / "models",
                 tmp_path / "outputs", tmp_path / "run").ensure()


def test_the_remote_engine_group_validates_and_saves_the_address_and_token(qtbot, paths):
    dialog = SettingsDialog(Settings(), paths=paths)
    qtbot.addWidget(dialog)
    group = dialog.remote
    assert group.token.echoMode() == group.token.EchoMode.Password
    group.address.setText("gpu-box")  # no port
    assert dialog.result_settings() is None and "HOST:PORT" in dialog.error.text()
    group.address.setText(" gpu-box:7862 ")
    group.token.setText("s3cret")
    new = dialog.result_settings()
    assert (new.engine_address, new.engine_token) == ("gpu-box:7862", "s3cret")
    group.address.setText("")  # empty: back to the local engine
    assert dialog.result_settings().engine_address == ""


def test_forget_certificate_removes_the_pin_through_known_engines(qtbot, paths, monkeypatch):
    KnownEngines(known_engines_path(paths.data)).check("gpu-box:7862", PIN)
    calls = []
    real_forget = KnownEngines.forget
    monkeypatch.setattr(KnownEngines, "forget", lambda self, addr: calls.append(addr) or real_forget(self, addr))
    dialog = SettingsDialog(Settings(engine_address="gpu-box:7862", engine_token="t"), paths=paths)
    qtbot.addWidget(dialog)
    group = dialog.remote
    assert PIN in group.fingerprint.text() and group.forget_button.isEnabled()
    group.forget_button.click()
    assert calls == ["gpu-box:7862"]
    assert "gpu-box:7862" not in KnownEngines(known_engines_path(paths.data)).load()
    assert not group.forget_button.isEnabled() and "None pinned" in group.fingerprint.text()


def test_engine_options_carry_the_remote_address_and_token(paths):
    from studio.ui.main_window import engine_options

    opts = engine_options(Settings(engine_address="gpu-box:7862", engine_token="s3cret"), paths)
    assert (opts.remote, opts.token) == ("gpu-box:7862", "s3cret")
    assert engine_options(Settings(), paths).remote == ""


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    from studio.ui.main_window import MainWindow

    paths = Paths.default().ensure()
    win = MainWindow(paths, Settings(device="cpu", engine_address="gpu-box:7862", engine_token="t"))
    qtbot.addWidget(win)
    yield win
    win.close()


def test_the_status_shows_the_lost_link_message_and_the_first_use_fingerprint_once(window):
    lost = "The connection to the remote engine at gpu-box:7862 was lost (timed out). Reconnecting..."
    window._on_state("restarting", lost)
    assert lost in window.state_label.text() and "crash" not in window.state_label.text()
    window._on_state("starting", "")
    assert "Connecting to the remote engine at gpu-box:7862" in window.state_label.text()
    trusted = f"Trusted the remote engine at gpu-box:7862 on first use; its certificate's SHA-256 fingerprint is {PIN}"
    window._on_state("starting", trusted)
    notice = window.trust_notice
    assert notice is not None and PIN in notice.text() and notice.isVisible() and not notice.isModal()
    window._on_state("starting", trusted)  # the same server again: no second notice
    assert window.trust_notice is notice


def test_a_lost_link_offers_to_fetch_the_result_and_fetching_follows_the_same_job(qapp):
    engine = MockEngine()
    runner = JobRunner(engine)
    failures, results = [], []
    runner.failed.connect(lambda *a: failures.append(a))
    runner.finished.connect(results.append)
    job_id = runner.submit(ImageJob(model="m", prompt="a fox"))
    engine.send("error", job_id=job_id, kind="connection_lost", message="The connection was lost.", detail="")
    assert failures[0][0] == "connection_lost" and runner.can_resume
    assert FETCH_ACTION in failure_text(failures[0][1], failures[0][2], "Retry", failures[0][0])
    assert runner.resume() == job_id and engine.resumed == [job_id] and runner.busy
    engine.send("result", job_id=job_id, result={"images": []})
    assert results == [{"images": []}] and not runner.busy and not runner.can_resume
    # any other failure is not resumable: the button stays Retry
    job_id = runner.submit(ImageJob(model="m", prompt="a fox"))
    engine.send("error", job_id=job_id, kind="internal", message="boom", detail="")
    assert not runner.can_resume and runner.resume() is None


def test_the_image_tab_fetches_after_a_lost_link(qtbot, paths):
    from studio.ui.image_tab import ImageTab

    engine = MockEngine()
    tab = ImageTab(engine, paths, Settings())
    qtbot.addWidget(tab)
    job_id = tab.submit(ImageJob(model="m", prompt="a fox"))
    engine.send("error", job_id=job_id, kind="connection_lost", message="The connection was lost.", detail="")
    assert tab.preview.retry_button.text() == FETCH_ACTION
    tab.preview.retry_button.click()
    assert engine.resumed == [job_id] and engine.submitted == [job_id]  # fetched, not run again
    tab.gallery.shutdown()


def test_the_cluster_choice_is_hidden_without_ray(qtbot, paths, monkeypatch):
    from studio.ui.image_tab import ImageTab

    real = cluster_panel.importlib.util.find_spec
    monkeypatch.setattr(cluster_panel.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    tab = ImageTab(MockEngine(), paths, Settings())
    qtbot.addWidget(tab)
    assert tab.cluster is None and not cluster_panel.ray_available()
    tab.gallery.shutdown()


def test_the_cluster_choice_is_offered_with_ray_and_builds_the_cli_call(qtbot, paths, monkeypatch, tmp_path):
    from studio.ui.image_tab import ImageTab

    monkeypatch.setattr(cluster_panel, "ray_available", lambda: True)
    monkeypatch.setattr("studio.ui.image_tab.ray_available", lambda: True)
    tab = ImageTab(MockEngine(), paths, Settings())
    qtbot.addWidget(tab)
    assert tab.cluster is not None and not tab.cluster.settings_box.isVisibleTo(tab.cluster)
    tab.cluster.check.setChecked(True)
    tab.cluster.address.setText("head:10001")
    with pytest.raises(ValueError, match="ray://HEAD:10001"):
        tab.cluster.options()
    assert check_address("ray://head:10001") == "" and check_address("local") == ""
    job = ImageJob(model="/m/sd.safetensors", prompt="-dash first", seed=5)
    cmd = cluster_command(job, ClusterOptions("ray://head:10001", 2, "", 3), tmp_path / "job.json", "py")
    assert cmd[:5] == ["py", "-m", "studio", "generate", "image"]
    assert "--prompt=-dash first" in cmd and "--workers=2" in cmd and "--sweep=3" in cmd and "--json" in cmd
    tab.gallery.shutdown()


def test_a_cluster_run_turns_json_lines_into_progress_and_ordered_results(qtbot, tmp_path):
    lines = [{"event": "cluster", "workers": [{"index": 0, "device": "CPU"}, {"index": 1, "device": "CPU"}], "jobs": 2},
             {"event": "progress", "worker": 1, "index": 1, "step": 2, "total": 3, "stage": "sampling"},
             {"index": 0, "prompt": "a", "seed": 1, "result": {"images": [{"path": "/x/0.png"}]}, "error": None},
             {"index": 1, "prompt": "a", "seed": 2, "result": None, "error": "out of memory"}]
    script = tmp_path / "fake_cli.py"
    script.write_text("import json, sys\nprint('a library says hi')\n"
                      + "".join(f"print({json.dumps(json.dumps(x))}, flush=True)\n" for x in lines)
                      + "print('studio: 1 job failed', file=sys.stderr)\nsys.exit(1)\n")
    run = ClusterRun([sys.executable, str(script)])
    seen: dict[str, list] = {"workers": [], "progress": [], "result": []}
    run.workers_ready.connect(seen["workers"].append)
    run.progress.connect(lambda *a: seen["progress"].append(a))
    run.result.connect(lambda *a: seen["result"].append(a))
    with qtbot.waitSignal(run.done, timeout=20000) as done:
        run.start()
    assert len(seen["workers"][0]) == 2 and seen["progress"] == [(1, 1, 2, 3, "sampling")]
    assert seen["result"] == [(0, {"images": [{"path": "/x/0.png"}]}, ""), (1, None, "out of memory")]
    assert done.args == [1, "1 job failed"]


def test_send_to_cluster_runs_a_real_batch_in_order(qtbot, tmp_path):
    pytest.importorskip("ray")
    from sd_fixtures import tiny_sd1

    ckpt = tiny_sd1(tmp_path / "tiny-sd1.safetensors")
    panel = cluster_panel.ClusterPanel(tmp_path / "work")
    qtbot.addWidget(panel)
    panel.check.setChecked(True)
    panel.workers.setValue(2)
    panel.sweep.setValue(3)
    results, status = [], []
    panel.result.connect(lambda i, r, e: results.append((i, r, e)))
    panel.status.connect(status.append)
    job = ImageJob(model=str(ckpt), prompt="a fox", width=64, height=64, steps=2, sampler="euler", seed=40,
                   previews=False)
    with qtbot.waitSignal(panel.finished, timeout=240000) as finished:
        run = panel.run(job)
        assert panel.busy
    assert finished.args == [""], run.stderr
    assert [i for i, _, _ in results] == [0, 1, 2] and all(e == "" for _, _, e in results)
    assert [r["images"][0]["seed"] for _, r, _ in results] == [40, 41, 42]
    assert all(os.path.isfile(r["images"][0]["path"]) for _, r, _ in results)
    assert any("worker" in s for s in status) and not panel.busy
    assert not list((tmp_path / "work").glob("*.json"))  # the job file is removed after the batch


def test_the_video_tab_sends_to_the_cluster_only_where_ray_is(qtbot, paths, monkeypatch):
    from studio.protocol import VideoJob
    from studio.ui.video_tab import VideoTab

    monkeypatch.setattr("studio.ui.video_tab.ray_available", lambda: False)
    assert VideoTab(MockEngine(), paths, Settings()).cluster is None
    monkeypatch.setattr("studio.ui.video_tab.ray_available", lambda: True)
    engine = MockEngine()
    tab = VideoTab(engine, paths, Settings())
    qtbot.addWidget(tab)
    sent = []
    monkeypatch.setattr(tab.cluster, "run", sent.append)
    job = VideoJob(model="/m/wan", prompt="a fox")
    assert tab._send_to_cluster(job) == "cluster" and sent == [job] and engine.submitted == []
    tab.cluster.result.emit(0, {"videos": [], "seconds": 1.0}, "")
    assert "Done" in tab.status.text()
    tab.cluster.result.emit(1, None, "out of memory")
    assert "Cluster job 2 failed: out of memory" in tab.notice.text()


def test_cluster_results_reach_the_image_gallery_in_order_and_the_preview(qtbot, paths, monkeypatch, tmp_path):
    from PIL import Image

    from studio.ui.image_tab import ImageTab

    monkeypatch.setattr("studio.ui.image_tab.ray_available", lambda: True)
    tab = ImageTab(MockEngine(), paths, Settings())
    qtbot.addWidget(tab)
    monkeypatch.setattr(cluster_panel.ClusterPanel, "busy", property(lambda self: True))  # the batch runs on
    files = []
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (16, 8), colour).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    for i, path in enumerate(files):
        tab.cluster.result.emit(i, {"images": [{"path": path, "seed": 40 + i, "width": 16, "height": 8}],
                                    "seconds": 1.0}, "")
    assert [item.seed for item in tab.gallery.items] == [41, 40]  # the newest first, as the runner's results
    assert tab.preview.view.image is not None and tab.preview.view.image.pixelColor(0, 0).name() == "#0000ff"
    tab.gallery.shutdown()
