"""The real engine subprocess over the real socket: lifecycle, jobs, cancel, crashes, bad frames."""

from __future__ import annotations

import os
import secrets
import stat
import struct
import time
from multiprocessing.connection import Client

import pytest

from studio import protocol
from studio.client import EngineClient, EngineError, EngineOptions, JobCancelledError
from studio.paths import Paths
from studio.protocol import ChatJob, SelfTestJob


def test_selftest_runs_on_the_engine_device(engine):
    result = engine.submit(SelfTestJob(size=128, iterations=3)).wait(60)
    assert result["ok"] and result["device"] == "cpu" and result["tflops"] > 0


def test_progress_events_stream_before_the_result(engine):
    seen = []
    handle = engine.submit(SelfTestJob(size=64, iterations=5))
    handle.wait(60)
    seen = [e.type for e in handle.events]
    assert seen[0] == "accepted" and "started" in seen and seen.count("progress") == 5


def test_status_answers_while_a_job_runs(engine):
    statuses = []

    def listen(msg):
        if msg.type == "engine_status":
            statuses.append(msg.fields)

    engine.add_listener(listen)
    try:
        handle = engine.submit(SelfTestJob(size=512, iterations=10000))
        _wait_for(lambda: any(e.type == "progress" for e in handle.events))
        statuses.clear()
        engine.request_status()
        _wait_for(lambda: any(s["running"] == handle.job_id for s in statuses), 10)
        assert statuses[-1]["device"]["kind"] == "cpu"
    finally:
        engine.remove_listener(listen)
        engine.cancel(handle.job_id)
    with pytest.raises(JobCancelledError):
        handle.wait(30)


def test_cancel_stops_a_running_job_promptly(engine):
    handle = engine.submit(SelfTestJob(size=512, iterations=10000))
    _wait_for(lambda: any(e.type == "progress" for e in handle.events))
    start = time.monotonic()
    engine.cancel(handle.job_id)
    with pytest.raises(JobCancelledError):
        handle.wait(30)
    assert time.monotonic() - start < 2.0
    steps = [e["step"] for e in handle.events if e.type == "progress"]
    assert steps[-1] < 10000


def test_cancel_of_a_queued_job_never_runs_it(engine):
    first = engine.submit(SelfTestJob(size=512, iterations=10000))
    second = engine.submit(SelfTestJob(size=64, iterations=1))
    _wait_for(lambda: any(e.type == "accepted" for e in second.events))
    engine.cancel(second.job_id)
    with pytest.raises(JobCancelledError):
        second.wait(10)
    assert not any(e.type == "started" for e in second.events)
    engine.cancel(first.job_id)
    with pytest.raises(JobCancelledError):
        first.wait(30)


def test_jobs_run_in_submission_order(engine):
    started = []
    listener = lambda m: started.append(m["job_id"]) if m.type == "started" else None  # noqa: E731
    engine.add_listener(listener)
    try:
        handles = [engine.submit(SelfTestJob(size=32, iterations=1)) for _ in range(4)]
        for h in handles:
            assert h.wait(60)["ok"]
    finally:
        engine.remove_listener(listener)
    assert started == [h.job_id for h in handles]


def test_a_failing_job_becomes_an_error_and_the_engine_keeps_serving(engine):
    with pytest.raises(EngineError) as err:
        engine.submit(SelfTestJob(size=1)).wait(30)
    assert err.value.kind == "bad_input" and "16 to 16384" in str(err.value)
    with pytest.raises(EngineError) as err:
        engine.submit(SelfTestJob(dtype="float77")).wait(30)
    assert "Unknown dtype" in str(err.value)
    assert engine.submit(SelfTestJob(size=32, iterations=1)).wait(30)["ok"]


def test_a_chat_job_with_a_missing_model_is_a_clear_error(engine):
    with pytest.raises(EngineError) as err:
        engine.submit(ChatJob(messages=[{"role": "user", "content": "hi"}], model="/nonexistent/model.gguf")).wait(60)
    assert err.value.kind in ("model_not_found", "bad_input")
    assert engine.submit(SelfTestJob(size=32, iterations=1)).wait(30)["ok"]


def test_malformed_frames_are_rejected_and_the_engine_keeps_serving(engine):
    errors = []
    engine.add_listener(lambda m: errors.append(m) if m.type == "error" and m["job_id"] is None else None)
    engine.send_raw(b"garbage that is not a frame")
    engine.send_raw(struct.pack("<4sI", protocol.MAGIC, 9) + b'{"v":9}  ')
    engine.send_raw(protocol.encode(protocol.make("pong", seq=1)))  # engine-only type from a client
    _wait_for(lambda: len(errors) >= 3)
    assert all(e["kind"] == "protocol" for e in errors)
    assert engine.submit(SelfTestJob(size=32, iterations=1)).wait(30)["ok"]


def test_unknown_job_kind_is_an_error_not_a_crash(engine):
    handle = protocol.new_job_id()
    errors = []
    engine.add_listener(lambda m: errors.append(m) if m.type == "error" and m["job_id"] == handle else None)
    engine.send_raw(protocol.encode(protocol.make("submit", job_id=handle, job={"kind": "teleport"})))
    _wait_for(lambda: errors)
    assert errors[0]["kind"] == "bad_input"


def test_socket_folder_is_private():
    mode = stat.S_IMODE(os.stat(Paths.default().runtime_dir()).st_mode)
    assert mode == 0o700


def test_wrong_authkey_is_refused_and_the_engine_still_accepts_its_client(tmp_path):
    """Start an engine by hand, knock with a wrong key, then connect with the right one."""
    import subprocess
    import sys

    address = str(Paths.default().runtime_dir() / f"authtest-{secrets.token_hex(4)}.sock")
    key = secrets.token_bytes(32)
    proc = subprocess.Popen([sys.executable, "-m", "studio", "engine", "--address", address, "--device", "cpu"],
                            stdin=subprocess.PIPE)
    try:
        proc.stdin.write(key.hex().encode() + b"\n")
        proc.stdin.flush()
        _wait_for(lambda: os.path.exists(address), 60)
        assert stat.S_IMODE(os.stat(address).st_mode) == 0o600
        from multiprocessing import AuthenticationError

        with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
            Client(address, family="AF_UNIX", authkey=secrets.token_bytes(32))
        conn = Client(address, family="AF_UNIX", authkey=key)
        welcome = protocol.decode(conn.recv_bytes())
        assert welcome.type == "welcome"
        conn.send_bytes(protocol.encode(protocol.make("ping", seq=7)))
        assert protocol.decode(conn.recv_bytes()).fields == {"seq": 7}
        conn.send_bytes(protocol.encode(protocol.make("shutdown")))
        conn.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_engine_exits_when_its_parent_goes_away():
    import subprocess
    import sys

    address = str(Paths.default().runtime_dir() / f"orphan-{secrets.token_hex(4)}.sock")
    proc = subprocess.Popen([sys.executable, "-m", "studio", "engine", "--address", address, "--device", "cpu"],
                            stdin=subprocess.PIPE)
    proc.stdin.write(secrets.token_bytes(32).hex().encode() + b"\n")
    proc.stdin.flush()
    _wait_for(lambda: os.path.exists(address), 60)
    proc.stdin.close()  # what the OS does when the GUI dies
    assert proc.wait(20) == 0


def test_sigkill_mid_job_fails_the_job_and_the_next_job_runs_on_a_new_engine():
    client = EngineClient(Paths.default(), EngineOptions(device="cpu"))
    states = []
    client.add_listener(lambda m: states.append(m["state"]) if m.type == "state" else None)
    client.start()
    try:
        first_pid = client.engine_pid
        handle = client.submit(SelfTestJob(size=512, iterations=10000))
        _wait_for(lambda: any(e.type == "progress" for e in handle.events))
        client.kill_engine()
        with pytest.raises(EngineError) as err:
            handle.wait(30)
        assert err.value.kind == "engine_crashed" and "stopped unexpectedly" in str(err.value)
        result = client.submit(SelfTestJob(size=32, iterations=1)).wait(90)
        assert result["ok"]
        assert client.engine_pid != first_pid
        assert "restarting" in states and states[-1] == "ready"
    finally:
        client.close()


def test_a_hung_engine_is_detected_by_the_heartbeat_and_replaced():
    client = EngineClient(Paths.default(), EngineOptions(device="cpu", heartbeat_s=0.2, hang_timeout_s=1.5))
    client.start()
    try:
        first_pid = client.engine_pid
        handle = client.submit(SelfTestJob(size=512, iterations=10000))
        _wait_for(lambda: any(e.type == "progress" for e in handle.events))
        os.kill(first_pid, 19)  # SIGSTOP: alive but silent, like a hung driver call
        with pytest.raises(EngineError) as err:
            handle.wait(30)
        assert err.value.kind == "engine_hung"
        assert client.submit(SelfTestJob(size=32, iterations=1)).wait(90)["ok"]
        assert client.engine_pid != first_pid
    finally:
        client.close()


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_a_large_engine_log_is_rotated_at_start(tmp_path):
    import dataclasses

    paths = dataclasses.replace(Paths.default(), logs=tmp_path / "logs")
    paths.logs.mkdir()
    (paths.logs / "engine.log").write_bytes(b"x" * (6 << 20))
    client = EngineClient(paths, EngineOptions(device="cpu"))
    client.start()
    try:
        assert (paths.logs / "engine.log.1").stat().st_size == 6 << 20
        assert (paths.logs / "engine.log").stat().st_size < 1 << 20
    finally:
        client.close()
