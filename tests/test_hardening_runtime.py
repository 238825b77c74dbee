"""Regression tests for issue 15, part 2: jobs that cannot be sent, chat import and settings edge
cases, the engine handshake, full disks, and the CLI after an engine crash. Part 1
(tests/test_hardening.py) holds the hostile-file defects."""

from __future__ import annotations

import os
import sys

import pytest
from test_hardening import _run_with_timeout

# --- 6. a job that cannot be sent says why; long conversations go through -------------------------

@pytest.mark.parametrize("field,value,word", [("temperature", float("inf"), "temperature"),
                                              ("top_p", float("nan"), "top_p"),
                                              ("seed", 2**64, "seed")])
def test_a_job_with_an_unsendable_value_is_refused_before_any_engine_starts(tmp_path, monkeypatch, field, value,
                                                                               word):
    from studio.client import EngineClient
    from studio.paths import Paths
    from studio.protocol import ChatJob
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    client = EngineClient(Paths.default())
    monkeypatch.setattr(client, "start", lambda wait=True: pytest.fail("an engine was started for a bad job"))
    job = ChatJob(messages=[{"role": "user", "content": "hi"}], **{field: value})
    handle = client.submit(job)
    assert handle.done.is_set() and handle.error is not None
    assert handle.error.kind == "bad_input" and word in str(handle.error)
    assert "not running" not in str(handle.error)


def test_a_deeply_nested_job_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    from studio.client import EngineClient
    from studio.paths import Paths
    from studio.protocol import ChatJob
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    client = EngineClient(Paths.default())
    monkeypatch.setattr(client, "start", lambda wait=True: pytest.fail("an engine was started for a bad job"))
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    handle = client.submit(ChatJob(messages=[{"role": "user", "content": "hi", "extra": nested}]))
    assert handle.error is not None and handle.error.kind == "bad_input" and "nested" in str(handle.error)


def test_a_conversation_over_one_mib_encodes_and_decodes():
    from studio import protocol
    from studio.protocol import ChatJob
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "é" * 100_000} for i in range(30)]
    frame = protocol.encode(protocol.make("submit", job_id="j", job=protocol.job_to_dict(ChatJob(messages=msgs))))
    assert len(frame) > 4 << 20
    back = protocol.decode(frame, protocol.CLIENT_MESSAGES)
    assert protocol.job_from_dict(back["job"]).messages == msgs


def test_a_conversation_over_one_mib_reaches_the_real_engine(engine):
    from studio.client import EngineError
    from studio.protocol import ChatJob
    job = ChatJob(messages=[{"role": "user", "content": "w" * (3 << 20)}], model="/nonexistent/model.gguf")
    with pytest.raises(EngineError) as err:
        engine.submit(job).wait(120)
    assert err.value.kind in ("model_not_found", "bad_input"), err.value  # the engine read it and answered


# --- 8. chat import and settings edge cases --------------------------------------------------------

def _deep(n: int) -> str:
    return "[" * n + "]" * n


def test_importing_a_deeply_nested_chat_file_is_a_value_error(tmp_path):
    from studio.chatstore import ChatStore, load_export
    path = tmp_path / "chat.json"
    path.write_text('{"format": "studio-chat", "version": 1, "messages": ' + _deep(100_000) + "}")
    with pytest.raises(ValueError, match="nested"):
        load_export(path)
    store = ChatStore(tmp_path / "chats.db")
    deep: list = []
    for _ in range(500):
        deep = [deep]
    t = store.import_json({"format": "studio-chat", "version": 1, "settings": {"temperature": 0.5},
                           "messages": [{"role": "user", "content": "hi", "stats": {"x": deep}}]})
    assert store.messages(t.id)[0].stats == {}  # only flat stats are kept
    store.close()


@pytest.mark.parametrize("key,value", [("seed", 2**63), ("seed", -1), ("repetition_penalty", 2**63),
                                       ("repetition_penalty", 1e300), ("temperature", [[[1]]]),
                                       ("top_k", 1.5), ("max_tokens", 2**70), ("quant", {"a": 1})])
def test_an_imported_setting_out_of_range_is_refused_naming_it(tmp_path, key, value):
    from studio.chatstore import ChatStore
    store = ChatStore(tmp_path / "chats.db")
    with pytest.raises(ValueError, match=key):
        store.import_json({"format": "studio-chat", "version": 1, "settings": {key: value},
                           "messages": [{"role": "user", "content": "hi"}]})
    assert store.threads() == []
    store.close()


def test_the_engine_answers_a_seed_of_2_63_with_bad_input_not_internal(engine):
    import threading

    from studio import protocol
    got: dict = {}
    done = threading.Event()

    def listen(msg) -> None:
        if msg.get("job_id") == "huge-seed" and msg.type == "error":
            got.update(msg.fields)
            done.set()
    engine.add_listener(listen)
    try:
        job = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}], "seed": 2**63,
               "repetition_penalty": 2**63}
        engine.send_raw(protocol.encode(protocol.make("submit", job_id="huge-seed", job=job)))
        assert done.wait(60)
    finally:
        engine.remove_listener(listen)
    assert got["kind"] == "bad_input" and ("seed" in got["message"] or "repetition_penalty" in got["message"])


def test_a_deeply_nested_settings_file_is_moved_aside(tmp_path, monkeypatch):
    from studio.paths import Paths
    from studio.settings import Settings, settings_path
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    paths = Paths.default()
    path = settings_path(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"model_folders": ' + _deep(100_000) + "}")
    assert Settings.load(paths) == Settings()
    assert path.with_suffix(".json.broken").exists() and not path.exists()


def test_settings_with_wrongly_typed_list_items_fall_back_to_defaults(tmp_path, monkeypatch):
    from studio.paths import Paths
    from studio.settings import Settings, settings_path
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    paths = Paths.default()
    path = settings_path(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"model_folders": [["a"], 3, "/ok"], "last_tab": true, "device": "cpu"}')
    s = Settings.load(paths)
    assert s.model_folders == ["/ok"] and s.last_tab == Settings().last_tab and s.device == "cpu"


def test_chat_tab_import_of_a_deeply_nested_file_shows_a_notice(qtbot, tmp_path, monkeypatch):
    from studio.chatstore import ChatStore
    from studio.ui.chat import chat_tab
    path = tmp_path / "chat.json"
    path.write_text('{"format": "studio-chat", "version": 1, "messages": ' + _deep(100_000) + "}")
    shown = []
    fake = type("Tab", (), {"store": ChatStore(tmp_path / "c.db"), "show_notice": lambda self, t: shown.append(t)})()
    assert chat_tab.ChatTab.import_file.__wrapped__(fake, path) is None  # the method itself, no window needed
    assert shown and "nested" in shown[0]


# --- 10. the engine's handshake times out; a silent first connection does not block the client ----

@pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")
def test_accept_client_skips_a_silent_connection_and_takes_the_real_client(tmp_path):
    import secrets
    import socket
    import threading
    import time
    from multiprocessing.connection import Client, Listener

    from studio.engine.server import accept_client
    address = str(tmp_path / "e.sock")
    key = secrets.token_bytes(32)
    listener = Listener(address, family="AF_UNIX")
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(address)
    trickle = socket.socket(socket.AF_UNIX)  # answers one byte at a time, never finishing
    trickle.connect(address)

    def drip() -> None:
        for _ in range(40):
            try:
                trickle.send(b"\x00")
            except OSError:
                return
            time.sleep(0.1)
    threading.Thread(target=drip, daemon=True).start()
    got = {}
    threading.Thread(target=lambda: got.setdefault("conn", Client(address, family="AF_UNIX", authkey=key)),
                     daemon=True).start()
    t0 = time.monotonic()
    conn = _run_with_timeout(lambda: accept_client(listener, key, timeout=0.5), 10)
    assert time.monotonic() - t0 < 5
    conn.send_bytes(b"hello")
    deadline = time.monotonic() + 5
    while "conn" not in got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got["conn"].recv_bytes() == b"hello"
    for s in (silent, trickle):
        s.close()
    listener.close()


@pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")
def test_the_engine_process_serves_its_client_after_a_silent_squatter(tmp_path):
    import secrets
    import socket
    import subprocess
    import time
    from multiprocessing.connection import Client

    from studio import protocol
    from studio.client import engine_boot
    address = str(tmp_path / "engine.sock")
    key = secrets.token_bytes(32)
    proc = subprocess.Popen([sys.executable, "-c", engine_boot(), "engine", "--address", address, "--device", "cpu"],
                            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(key.hex().encode() + b"\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not os.path.exists(address) and time.monotonic() < deadline:
            time.sleep(0.02)
        squatter = socket.socket(socket.AF_UNIX)
        squatter.connect(address)  # first in line, and silent
        t0 = time.monotonic()
        conn = _run_with_timeout(lambda: Client(address, family="AF_UNIX", authkey=key), 30)
        welcome = protocol.decode(_run_with_timeout(conn.recv_bytes, 30), protocol.ENGINE_MESSAGES)
        assert welcome.type == "welcome" and time.monotonic() - t0 < 30
        conn.send_bytes(protocol.encode(protocol.make("shutdown")))
        squatter.close()
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()


# --- 11. a full disk never leaves a truncated or 0-byte file under a final name -------------------

def _enospc():
    import errno
    return OSError(errno.ENOSPC, "No space left on device")


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_full_disk_while_saving_an_image_leaves_no_file(tmp_path, monkeypatch):
    from PIL import Image

    from studio.engine.context import UserError
    from studio.engine.pipelines.diffusion.images import save_png

    def save_half(self, fp, *args, **kwargs):
        (open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp).write(b"\x89PNG half")
        raise _enospc()
    monkeypatch.setattr(Image.Image, "save", save_half)
    folder = tmp_path / "out"
    with pytest.raises(UserError, match="disk is full"):
        save_png(Image.new("RGB", (8, 8)), {"prompt": "x"}, folder, "img")
    assert _leftovers(folder) == []


def test_a_full_disk_while_writing_a_video_leaves_no_file(tmp_path, monkeypatch):
    import numpy as np

    from studio.media import video

    def ffmpeg_half(path, frames, fps):
        with open(path, "wb") as f:
            f.write(b"\x00\x00\x00\x18ftypisom")
        raise _enospc()
    monkeypatch.setattr(video, "_write_h264_ffmpeg", ffmpeg_half)
    folder = tmp_path / "out"
    path = video.unique_video_path(folder, "clip")
    with pytest.raises(OSError):
        video.write_mp4(path, np.zeros((2, 8, 8, 3), np.uint8), 8.0, encoder="ffmpeg")
    assert _leftovers(folder) == []


class _DiskFull:
    """A temporary file that takes `room` bytes, then fails like a full disk."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, b) -> int:
        if len(b) > self.room:
            self.fh.write(bytes(b[:self.room]))
            self.room = 0
            raise _enospc()
        self.room -= len(b)
        return self.fh.write(b)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


@pytest.fixture
def disk_full(monkeypatch):
    from studio import fsutil
    real = fsutil._temp_file
    monkeypatch.setattr(fsutil, "_temp_file", lambda *a, **k: (lambda fh, p: (_DiskFull(fh, 10), p))(*real(*a, **k)))


def test_a_full_disk_while_saving_settings_keeps_the_old_file(tmp_path, monkeypatch, disk_full):
    from studio.paths import Paths
    from studio.settings import Settings, settings_path
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    paths = Paths.default()
    path = settings_path(paths)
    path.parent.mkdir(parents=True)
    path.write_text('{"device": "cpu"}')
    with pytest.raises(OSError, match="disk is full"):
        Settings(device="cuda", model_folders=["/x" * 100]).save(paths)
    assert path.read_text() == '{"device": "cpu"}' and _leftovers(path.parent) == ["settings.json"]


def test_a_full_disk_while_exporting_a_chat_leaves_no_file(tmp_path, disk_full):
    from studio.chatstore import ChatStore
    store = ChatStore(tmp_path / "c.db")
    t = store.create_thread("t")
    store.add_message(t.id, "user", "hello " * 100)
    out = tmp_path / "exports"
    out.mkdir()
    for fmt in ("json", "md"):
        with pytest.raises(OSError):
            store.export_file(t.id, out / f"chat.{fmt}", fmt)
    assert _leftovers(out) == []
    store.close()


def test_a_full_disk_while_writing_a_sidecar_or_frames_leaves_no_file(tmp_path, disk_full):
    import numpy as np

    from studio.media import video
    with pytest.raises(OSError):
        video.write_sidecar(tmp_path / "v.mp4", {"prompt": "p" * 100})
    with pytest.raises(OSError):
        video.export_png_frames(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "frames", "f")
    assert _leftovers(tmp_path) == ["frames"] and _leftovers(tmp_path / "frames") == []


# --- 13. interactive `studio chat` starts a new engine after the old one is killed ----------------

def test_interactive_chat_starts_a_new_engine_after_a_crash_before_the_next_prompt(tmp_path, monkeypatch, capsys):
    import threading
    import time

    from studio.cli import chat as cli_chat
    from studio.client import EngineClient, EngineOptions
    from studio.paths import Paths
    from studio.protocol import SelfTestJob
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    client = EngineClient(Paths.default(), EngineOptions(device="cpu", auto_restart=False))  # as the CLI makes it
    client.start()
    first_pid = client.engine_pid
    seen: dict = {}
    prompts = iter(["go"])

    def fake_input(prompt: str = "") -> str:
        line = next(prompts, None)
        if line is not None:
            threading.Timer(1.5, client.kill_engine).start()  # killed mid-answer
            return line
        deadline = time.monotonic() + 60  # the second prompt: is a new engine there before it is typed?
        while time.monotonic() < deadline and not (client.state == "ready" and client.engine_pid != first_pid):
            time.sleep(0.1)
        seen["state"], seen["pid"] = client.state, client.engine_pid
        raise EOFError
    monkeypatch.setattr("builtins.input", fake_input)
    try:
        code = cli_chat._chat_repl(client, lambda messages: SelfTestJob(size=1024, iterations=10000),
                                   lambda msg: None, cli_chat.StatusLine(sys.stderr))
    finally:
        client.close()
    assert code == 0
    assert seen["state"] == "ready" and seen["pid"] not in (None, first_pid)
    err = capsys.readouterr().err
    assert "stopped unexpectedly" in err and "new engine" in err
