"""Typed job results: the dict on the wire keeps its keys, and a dict that does not fit is refused."""

import pytest

from studio.protocol import (
    ChatResult,
    ImageResult,
    ProtocolError,
    SelfTestResult,
    VideoResult,
    result_from_dict,
)

SAMPLES = [
    ImageResult(images=[{"path": "/o/a.png", "seed": 1, "width": 64, "height": 64}], seconds=1.5, model="/m.ckpt",
                family="sd1", prediction="eps", notes=["n"], job={"kind": "image", "seed": 1}),
    VideoResult(videos=[{"path": "/o/v.mp4", "frames": 5}], path="/o/v.mp4", seconds=2.0, model="/w",
                timings={"load": 0.1}, files={"transformer": "/w"}, notes=[], partial=True, job={"kind": "video"}),
    ChatResult(text="hi", prompt_tokens=3, completion_tokens=1, ttft_s=0.01, tokens_per_s=0.0, model="/s.gguf",
               finish_reason="stop", context_length=512, seed=None, dropped_turns=0, notes=[]),
    SelfTestResult(device="cpu", device_label="CPU", dtype="float32", size=16, iterations=1, seconds=0.1,
                   tflops=0.001, relative_error=0.0, ok=True),
]


@pytest.mark.parametrize("result", SAMPLES, ids=lambda r: r.kind)
def test_result_round_trips_through_its_wire_dict(result):
    data = result.to_dict()
    assert isinstance(data, dict) and "kind" not in data  # the wire keys are the fields, nothing added
    assert result_from_dict(data) == result
    assert result_from_dict(data, result.kind) == result


def test_result_keys_match_what_front_ends_read():
    image, video, chat, _ = (r.to_dict() for r in SAMPLES)
    assert set(image) == {"images", "seconds", "model", "family", "prediction", "notes", "job"}
    assert set(video) == {"videos", "path", "seconds", "timings", "model", "files", "notes", "partial", "job"}
    assert set(chat) == {"text", "prompt_tokens", "completion_tokens", "ttft_s", "tokens_per_s", "model",
                         "finish_reason", "context_length", "seed", "dropped_turns", "notes", "sampling"}


def test_result_reads_by_key_like_the_old_dicts():
    image = SAMPLES[0]
    assert image["images"] is image.images
    with pytest.raises(KeyError):
        image["nope"]


def test_result_with_wrong_type_missing_or_unknown_field_is_refused():
    good = SAMPLES[2].to_dict()
    with pytest.raises(ProtocolError, match="'text' has the wrong type"):
        result_from_dict({**good, "text": 3})
    with pytest.raises(ProtocolError, match="missing field"):
        result_from_dict({k: v for k, v in good.items() if k != "model"})
    with pytest.raises(ProtocolError, match="unknown field"):
        result_from_dict({**good, "extra": 1})
    with pytest.raises(ProtocolError, match="which kind"):
        result_from_dict({"seconds": 1.0})
    with pytest.raises(ProtocolError, match="unknown result kind"):
        result_from_dict(good, "audio")
