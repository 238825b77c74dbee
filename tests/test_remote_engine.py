"""A real remote engine (`studio engine serve`) on 127.0.0.1 with TLS and a token, driven by EngineClient:
jobs and their files, certificate pinning, wrong tokens, plain-text clients, a link dropped mid-job."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from studio import protocol
from studio.client import EngineClient, EngineError, EngineOptions
from studio.engine.remote import ensure_certificate
from studio.paths import Paths
from studio.protocol import ChatJob, ImageJob, Message, SelfTestJob, VideoJob
from studio.remote_link import save_outputs
from studio.remote_trust import KnownEngines, known_engines_path

TOKEN = "test-token-4f8a1c"
ROOT = Path(__file__).resolve().parent.parent


def desk_paths(root: Path) -> Paths:
    """A desk's own folders, apart from the server's, as on another machine."""
    return Paths(root / "config", root / "data", root / "cache", root / "logs", root / "models", root / "outputs",
                 root / "run")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("server-home")
    env = {**os.environ, "STUDIO_HOME": str(home), "STUDIO_ENGINE_TOKEN": ""}
    proc = subprocess.Popen([sys.executable, "-m", "studio", "engine", "serve", "--listen", "127.0.0.1:0",
                             "--token", TOKEN, "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    address, printed = "", []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        printed.append(line)
        if "listening on" in line:
            address = line.split("listening on ")[1].split()[0]
            break
    assert address, f"the remote engine did not start: {printed}"
    yield {"address": address, "home": home, "printed": "".join(printed), "proc": proc}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def make_client(server, root: Path, **kw) -> EngineClient:
    options = {"remote": server["address"], "token": TOKEN, "auto_restart": False,
               "settings": {"outputs": str(root / "outputs")}, **kw}
    return EngineClient(desk_paths(root), EngineOptions(**options))


def test_the_first_start_prints_the_certificate_fingerprint_and_keeps_the_key_private(server):
    cert, key, fp, created = ensure_certificate(server["home"] / "data" / "engine-tls")
    assert not created and fp in server["printed"]
    assert (key.stat().st_mode & 0o777) == 0o600 and (cert.stat().st_mode & 0o777) == 0o600


def test_a_job_runs_remotely_and_the_certificate_is_pinned_on_first_use(server, tmp_path):
    states = []
    with make_client(server, tmp_path) as client:
        client.add_listener(lambda m: states.append(m.get("detail", "")) if m.type == "state" else None)
        result = client.submit(SelfTestJob(size=64, iterations=3)).wait(60)
        assert result["ok"] and result["device"] == "cpu"
    pins = json.loads(known_engines_path(tmp_path / "data").read_text())
    _, _, fp, _ = ensure_certificate(server["home"] / "data" / "engine-tls")
    assert pins[server["address"]]["sha256"] == fp
    assert (known_engines_path(tmp_path / "data").stat().st_mode & 0o777) == 0o600


def test_chat_streams_tokens_from_the_bundled_model(server, tmp_path):
    pytest.importorskip("studio.models.bundled")
    with make_client(server, tmp_path) as client:
        handle = client.submit(ChatJob(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       temperature=0.0, max_tokens=16))
        result = handle.wait(180)
    tokens = "".join(e["text"] for e in handle.events if e.type == "token")
    assert "Paris" in result["text"] and tokens.strip() and result["text"].startswith(tokens.strip()[:5])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from sd_fixtures import tiny_sd1

    return tiny_sd1(tmp_path_factory.mktemp("sd") / "tiny-sd1.safetensors")


def test_an_image_comes_back_to_the_desk_with_previews(server, tmp_path, tiny_ckpt):
    from PIL import Image

    job = ImageJob(model=str(tiny_ckpt), prompt="a fox", width=64, height=64, steps=3, seed=11, batch_size=2,
                   out=str(tmp_path / "mine" / "fox.png"))
    with make_client(server, tmp_path) as client:
        handle = client.submit(job)
        result = handle.wait(180)
    assert [i["seed"] for i in result["images"]] == [11, 12]
    local = [Path(i["path"]) for i in result["images"]]
    assert local[0] == tmp_path / "mine" / "fox.png" and all(p.parent == tmp_path / "mine" for p in local)
    server_files = sorted((server["home"] / "outputs").rglob("*.png"))
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in server_files}
    for path in local:
        assert Image.open(path).size == (64, 64)
        assert hashlib.sha256(path.read_bytes()).hexdigest() in digests  # the server's bytes, PNG text included
    assert not list((tmp_path / "mine").glob(".*.part"))
    assert any(e.type == "preview" for e in handle.events) and any(e.type == "progress" for e in handle.events)


def test_a_second_image_with_the_same_name_is_numbered_not_overwritten(server, tmp_path, tiny_ckpt):
    job = ImageJob(model=str(tiny_ckpt), prompt="a fox", width=64, height=64, steps=2, seed=5,
                   out=str(tmp_path / "fox.png"))
    with make_client(server, tmp_path) as client:
        first = client.submit(job).wait(120)["images"][0]["path"]
        second = client.submit(job).wait(120)["images"][0]["path"]
    assert first != second and Path(first).read_bytes() == Path(second).read_bytes()


def test_a_video_and_its_sidecar_come_back_to_the_desk(server, tmp_path):
    pytest.importorskip("diffusers")
    from video_fixtures import build_wan_folder

    folder = build_wan_folder(tmp_path / "Wan-tiny-Diffusers")
    job = VideoJob(model=str(folder), prompt="a red fox runs in snow", width=32, height=32, frames=5, fps=8.0,
                   steps=2, cfg=4.0, shift=3.0, seed=11)
    with make_client(server, tmp_path) as client:
        result = client.submit(job).wait(300)
    video = result["videos"][0]
    assert Path(video["path"]).is_file() and Path(video["path"]).is_relative_to(tmp_path / "outputs")
    assert result["path"] == video["path"]
    if video["sidecar"]:
        assert Path(video["sidecar"]).is_file() and Path(video["sidecar"]).parent == Path(video["path"]).parent


def test_a_changed_certificate_is_refused_and_forget_re_trusts(server, tmp_path):
    # What a regenerated (or intercepted) certificate looks like to the desk: a pin that does not match.
    _, _, other, _ = ensure_certificate(tmp_path / "other-cert")
    store = KnownEngines(known_engines_path(tmp_path / "data"))
    store.path.parent.mkdir(parents=True)
    store.path.write_text(json.dumps({server["address"]: {"sha256": other, "pinned": "2026-12-01 10:00:00"}}))
    client = make_client(server, tmp_path)
    with pytest.raises(EngineError) as err:
        client.submit(SelfTestJob(size=32, iterations=1)).wait(30)
    assert err.value.kind == "engine_refused"
    assert "different certificate" in str(err.value) and f"studio engine forget {server['address']}" in str(err.value)
    client.close()
    assert store.forget(server["address"])
    with make_client(server, tmp_path) as client:
        assert client.submit(SelfTestJob(size=32, iterations=1)).wait(60)["ok"]


def test_a_wrong_token_is_refused_after_a_delay(server, tmp_path):
    client = make_client(server, tmp_path, token="not-the-token")
    start = time.monotonic()
    with pytest.raises(EngineError) as err:
        client.submit(SelfTestJob(size=32, iterations=1)).wait(30)
    assert err.value.kind == "engine_refused" and "refused the token" in str(err.value)
    assert time.monotonic() - start >= 0.4
    client.close()


def test_a_plain_text_client_is_told_to_use_tls(server):
    host, port = server["address"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        frame = protocol.encode(protocol.make("hello", client="plain", token=TOKEN))
        sock.sendall(len(frame).to_bytes(4, "big") + frame)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert b"TLS only" in reply and b"STU1" not in reply


def test_a_desk_cannot_choose_where_the_server_writes(server, tmp_path):
    errors = []
    with make_client(server, tmp_path) as client:
        client.add_listener(lambda m: errors.append(m) if m.type == "error" else None)
        job = ImageJob(model="x", prompt="p", out=str(tmp_path / "elsewhere.png"))
        client.send_raw(protocol.encode(protocol.make("submit", job_id="raw1", job=protocol.job_to_dict(job))))
        _wait_for(lambda: errors, 30)
    assert errors[0]["job_id"] == "raw1" and errors[0]["kind"] == "bad_input"
    assert "own outputs folder" in errors[0]["message"]


def test_listening_beyond_localhost_without_a_token_is_refused(tmp_path):
    env = {**os.environ, "STUDIO_HOME": str(tmp_path), "STUDIO_ENGINE_TOKEN": ""}
    run = subprocess.run([sys.executable, "-m", "studio", "engine", "serve", "--listen", "0.0.0.0:0"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--token" in run.stderr
    assert not (tmp_path / "data" / "engine-tls").exists()  # refused before anything was made


class Proxy:
    """A TCP relay between desk and server whose links can be cut, as a flaky network does."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.refuse = False
        self.links: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                desk, _ = self.sock.accept()
            except OSError:
                return
            if self.refuse:
                desk.close()
                continue
            up = socket.create_connection(self.upstream)
            self.links += [desk, up]
            for a, b in ((desk, up), (up, desk)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        for s in self.links:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.links = []

    def close(self) -> None:
        self.cut()
        self.sock.close()


def _wait_for(cond, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_link_dropped_mid_job_is_reported_and_the_finished_result_is_picked_up(server, tmp_path, tiny_ckpt):
    proxy = Proxy(server["address"])
    states: list[tuple[str, str]] = []
    client = make_client({"address": proxy.address}, tmp_path, reconnect_s=30)
    client.add_listener(lambda m: states.append((m["state"], m.get("detail", ""))) if m.type == "state" else None)
    try:
        client.start()
        handle = client.submit(ImageJob(model=str(tiny_ckpt), prompt="a fox", width=64, height=64, steps=12,
                                        seed=3))
        _wait_for(lambda: any(e.type == "progress" and e["stage"] == "sampling" for e in handle.events), 120)
        proxy.refuse = True  # the network stays down until the job has finished on the server
        proxy.cut()
        _wait_for(lambda: any(s == "restarting" for s, _ in states), 10)
        time.sleep(6)
        assert not handle.done.is_set()  # the desk waits: the job is not failed for a lost link
        proxy.refuse = False
        result = handle.wait(60)
    finally:
        client.close()
        proxy.close()
    lost = [d for s, d in states if s == "restarting"]
    assert "connection to the remote engine" in lost[0] and "lost" in lost[0]
    path = Path(result["images"][0]["path"])
    assert path.is_file() and path.is_relative_to(tmp_path / "outputs") and result["images"][0]["seed"] == 3
    assert [e.type for e in handle.events].count("result") == 1
    assert sum(1 for _ in (tmp_path / "outputs").rglob("*.png")) == 1


def test_a_job_lost_for_good_is_failed_as_such_and_can_be_resumed_later(server, tmp_path):
    proxy = Proxy(server["address"])
    client = make_client({"address": proxy.address}, tmp_path, reconnect_s=1)
    try:
        client.start()
        handle = client.submit(SelfTestJob(size=256, iterations=2000))
        _wait_for(lambda: any(e.type == "progress" for e in handle.events), 60)
        proxy.refuse = True
        proxy.cut()
        with pytest.raises(EngineError) as err:
            handle.wait(60)
        assert err.value.kind == "connection_lost" and "remote engine" in str(err.value)
        proxy.refuse = False
        again = client.resume(handle.job_id)
        assert again.wait(120)["ok"]
    finally:
        client.close()
        proxy.close()


def test_saving_is_all_or_nothing(tmp_path, monkeypatch):
    msg = Message("result", {"job_id": "j1", "files": [{"path": "/srv/a.png", "size": 3}, {"path": "/srv/a-1.png",
                                                                                           "size": 3}],
                             "result": {"images": [{"path": "/srv/a.png"}, {"path": "/srv/a-1.png"}], "notes": []}},
                  [b"one", b"two"])
    calls = []
    real_link = os.link

    def flaky_link(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", flaky_link)
    with pytest.raises(OSError):
        save_outputs(msg, str(tmp_path / "out" / "x.png"), tmp_path)
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(os, "link", real_link)
    saved = save_outputs(msg, str(tmp_path / "out" / "x.png"), tmp_path)
    assert [i["path"] for i in saved["result"]["images"]] == [str(tmp_path / "out" / "x.png"),
                                                              str(tmp_path / "out" / "x-1.png")]
    assert (tmp_path / "out" / "x-1.png").read_bytes() == b"two"
