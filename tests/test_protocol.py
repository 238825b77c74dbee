"""Frames and messages: every type round-trips; malformed input is a clean ProtocolError."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studio import protocol
from studio.protocol import ChatJob, ImageJob, Message, ProtocolError, SelfTestJob, VideoJob

SAMPLES = {
    "hello": {"client": "cli"},
    "submit": {"job_id": "abc", "job": protocol.job_to_dict(SelfTestJob())},
    "cancel": {"job_id": "abc"},
    "unload": {"model": None},
    "status": {},
    "ping": {"seq": 3},
    "shutdown": {},
    "welcome": {"engine_version": "0.1.0", "pid": 42},
    "accepted": {"job_id": "abc", "position": 0},
    "started": {"job_id": "abc"},
    "progress": {"job_id": "abc", "step": 1, "total": 20, "stage": "sampling"},
    "preview": {"job_id": "abc", "mime": "image/jpeg", "width": 64, "height": 64},
    "token": {"job_id": "abc", "text": "Héllo 🙂"},
    "result": {"job_id": "abc", "result": {"text": "Paris", "n": 1.5}},
    "error": {"job_id": None, "kind": "bad_input", "message": "no", "detail": ""},
    "cancelled": {"job_id": "abc"},
    "engine_status": {"device": {"kind": "cpu"}, "memory": {}, "models": [], "queue": [], "running": None},
    "pong": {"seq": 3},
    "unloaded": {"models": ["a"]},
}


def test_samples_cover_every_message_type():
    assert set(SAMPLES) == set(protocol.ALL_MESSAGES)


@pytest.mark.parametrize("type_", sorted(SAMPLES))
def test_every_message_type_round_trips(type_):
    payloads = [b"\x89PNG...", b""] if type_ == "preview" else []
    msg = protocol.make(type_, payloads, **SAMPLES[type_])
    back = protocol.decode(protocol.encode(msg))
    assert back.type == type_ and back.fields == SAMPLES[type_] and back.payloads == payloads


@pytest.mark.parametrize("job", [SelfTestJob(size=64), ChatJob(messages=[{"role": "user", "content": "hi"}], seed=3),
                                 ImageJob(prompt="a cat", loras=[{"path": "x", "weight": 0.5}]), VideoJob()])
def test_every_job_type_round_trips(job):
    data = json.loads(json.dumps(protocol.job_to_dict(job)))
    assert protocol.job_from_dict(data) == job


def test_job_with_wrong_field_type_is_refused():
    data = protocol.job_to_dict(ChatJob())
    data["max_tokens"] = "many"
    with pytest.raises(ProtocolError, match="max_tokens"):
        protocol.job_from_dict(data)


def test_job_bool_is_not_an_int():
    data = protocol.job_to_dict(SelfTestJob())
    data["size"] = True
    with pytest.raises(ProtocolError):
        protocol.job_from_dict(data)


def test_unknown_job_kind_and_field_and_version_are_refused():
    with pytest.raises(ProtocolError, match="unknown job kind"):
        protocol.job_from_dict({"kind": "teleport"})
    with pytest.raises(ProtocolError, match="unknown field"):
        protocol.job_from_dict({"kind": "selftest", "warp": 9})
    with pytest.raises(ProtocolError, match="version"):
        protocol.job_from_dict({"kind": "selftest", "version": 99})


def _frame(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<4sI", protocol.MAGIC, len(head)) + head + payload


def test_unknown_version_is_rejected():
    with pytest.raises(ProtocolError, match="version"):
        protocol.decode(_frame({"v": 2, "type": "status", "payloads": []}))


def test_unknown_type_is_rejected():
    with pytest.raises(ProtocolError, match="unknown message type"):
        protocol.decode(_frame({"v": 1, "type": "format_disk", "payloads": []}))


def test_engine_messages_are_refused_from_a_client():
    frame = protocol.encode(protocol.make("pong", seq=1))
    with pytest.raises(ProtocolError):
        protocol.decode(frame, protocol.CLIENT_MESSAGES)


def test_oversized_header_length_is_rejected_before_reading():
    frame = struct.pack("<4sI", protocol.MAGIC, protocol.MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(frame)


def test_payload_sizes_must_match_the_frame():
    with pytest.raises(ProtocolError, match="payload"):
        protocol.decode(_frame({"v": 1, "type": "status", "payloads": [10]}, b"short"))


def test_encode_refuses_a_frame_over_the_limit():
    big = b"\0" * (protocol.MAX_FRAME_BYTES + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.encode(Message("preview", dict(SAMPLES["preview"]), [big]))


def test_nan_is_not_valid_json_on_the_wire():
    frame = struct.pack("<4sI", protocol.MAGIC, 44) + b'{"v":1,"type":"ping","seq":NaN,"payloads":[]}'[:44]
    with pytest.raises(ProtocolError):
        protocol.decode(frame)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        protocol.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(SAMPLES)), st.integers(min_value=0, max_value=400), st.binary(max_size=8))
def test_truncated_or_corrupted_valid_frames_give_clean_errors(type_, cut, junk):
    frame = protocol.encode(protocol.make(type_, **SAMPLES[type_]))
    for mutated in (frame[:cut], frame[:cut] + junk + frame[cut + len(junk):], frame + junk):
        try:
            protocol.decode(mutated)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20), max_size=8), st.sampled_from(sorted(SAMPLES) + ["bogus"]))
def test_arbitrary_json_headers_give_clean_errors(fields, type_):
    header = {**fields, "v": 1, "type": type_, "payloads": []}
    try:
        msg = protocol.decode(_frame(header))
    except ProtocolError:
        return
    protocol.validate(msg)  # anything accepted must really be valid


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["size", "iterations", "device", "dtype", "version", "seed", "x"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.floats(allow_nan=False)))
def test_arbitrary_job_fields_give_clean_errors(fields):
    try:
        protocol.job_from_dict({"kind": "selftest", **fields})
    except ProtocolError:
        pass
