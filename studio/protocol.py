"""Messages between the front ends (GUI, CLI) and the engine process.

Imports neither torch nor Qt. A frame on the wire is:

    b"STU1" | u32 header length | header (UTF-8 JSON object) | payload bytes ...

The header holds `v` (protocol version), `type`, the message fields and
`payloads`: the byte lengths of the binary payloads that follow (previews, frames).
Nothing is ever pickled. Every limit is checked before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
MAGIC = b"STU1"
# The job JSON rides in the header. A conversation filling a 1M-token context is ~4 MiB of text;
# 32 MiB leaves room for JSON escapes. (1 MiB made long chats fail as "engine not running".)
MAX_HEADER_BYTES = 32 << 20
MAX_JSON_DEPTH = 32  # jobs nest 3 levels; deeper is a crafted import
_INT64 = 1 << 63
MAX_PAYLOADS = 16
MAX_FRAME_BYTES = 64 << 20  # a 4K PNG preview or a batch of video frames fits

_PREFIX = struct.Struct("<4sI")


class ProtocolError(ValueError):
    """A frame or message that must be rejected. The connection stays usable."""


# ---------------------------------------------------------------------------
# Message catalogue: type -> required fields with their JSON types.

_STR, _INT, _NUM, _BOOL, _DICT, _LIST = (str,), (int,), (int, float), (bool,), (dict,), (list,)
_OPT_STR = (str, type(None))

CLIENT_MESSAGES: dict[str, dict[str, tuple]] = {
    "hello": {"client": _STR},
    "submit": {"job_id": _STR, "job": _DICT},
    "cancel": {"job_id": _STR},
    "unload": {"model": _OPT_STR},
    "status": {},
    "ping": {"seq": _INT},
    "shutdown": {},
}

ENGINE_MESSAGES: dict[str, dict[str, tuple]] = {
    "welcome": {"engine_version": _STR, "pid": _INT},
    "accepted": {"job_id": _STR, "position": _INT},
    "started": {"job_id": _STR},
    "progress": {"job_id": _STR, "step": _INT, "total": _INT, "stage": _STR},
    "preview": {"job_id": _STR, "mime": _STR, "width": _INT, "height": _INT},
    "token": {"job_id": _STR, "text": _STR},
    "result": {"job_id": _STR, "result": _DICT},
    "error": {"job_id": _OPT_STR, "kind": _STR, "message": _STR, "detail": _STR},
    "cancelled": {"job_id": _STR},
    "engine_status": {"device": _DICT, "memory": _DICT, "models": _LIST, "queue": _LIST, "running": _OPT_STR},
    "pong": {"seq": _INT},
    "unloaded": {"models": _LIST},
}

ALL_MESSAGES = {**CLIENT_MESSAGES, **ENGINE_MESSAGES}


@dataclass
class Message:
    """One protocol message: a type, its JSON fields and optional binary payloads."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    payloads: list[bytes] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def make(type_: str, payloads: list[bytes] | None = None, **fields: Any) -> Message:
    """Build a message and validate it, so a bad message fails at the sender."""
    msg = Message(type_, fields, list(payloads or []))
    validate(msg)
    return msg


def validate(msg: Message, allowed: dict[str, dict[str, tuple]] | None = None) -> None:
    catalogue = ALL_MESSAGES if allowed is None else allowed
    spec = catalogue.get(msg.type)
    if spec is None:
        raise ProtocolError(f"unknown message type {msg.type!r}")
    for name, kinds in spec.items():
        if name not in msg.fields:
            raise ProtocolError(f"{msg.type}: missing field {name!r}")
        value = msg.fields[name]
        # bool is an int in Python; keep them apart on the wire.
        if isinstance(value, bool) and bool not in kinds:
            raise ProtocolError(f"{msg.type}: field {name!r} must be {_kind_names(kinds)}, got bool")
        if not isinstance(value, kinds):
            raise ProtocolError(f"{msg.type}: field {name!r} must be {_kind_names(kinds)}, got {type(value).__name__}")
    if len(msg.payloads) > MAX_PAYLOADS:
        raise ProtocolError(f"{msg.type}: too many payloads ({len(msg.payloads)} > {MAX_PAYLOADS})")


def check_values(value: Any, where: str = "") -> None:
    """Refuse what JSON or the engine cannot take, naming the field: inf and NaN, integers outside
    64 bits (seeds), nesting deeper than MAX_JSON_DEPTH. Iterative, so depth cannot overflow it."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        v, path, depth = stack.pop()
        name = path or "the value"
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"{name} is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(v, float) and not math.isfinite(v):
            raise ProtocolError(f"{name} is {v}; use a finite number")
        if isinstance(v, int) and not isinstance(v, bool) and not -_INT64 <= v < _INT64:
            raise ProtocolError(f"{name} is {v}, outside the 64-bit range; use a smaller number")
        if isinstance(v, dict):
            stack.extend((x, f"{path}.{k}" if path else str(k), depth + 1) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def _kind_names(kinds: tuple) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def encode(msg: Message) -> bytes:
    validate(msg)
    header = {"v": PROTOCOL_VERSION, "type": msg.type, **msg.fields, "payloads": [len(p) for p in msg.payloads]}
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.type}: header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    total = _PREFIX.size + len(head) + sum(len(p) for p in msg.payloads)
    if total > MAX_FRAME_BYTES:
        raise ProtocolError(f"{msg.type}: frame of {total} bytes exceeds {MAX_FRAME_BYTES}")
    return b"".join([_PREFIX.pack(MAGIC, len(head)), head, *msg.payloads])


def decode(frame: bytes, allowed: dict[str, dict[str, tuple]] | None = None) -> Message:
    """Parse one frame. Any malformation raises ProtocolError, never anything else."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame must be bytes")
    frame = bytes(frame)
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    if len(frame) < _PREFIX.size:
        raise ProtocolError("truncated frame: shorter than its prefix")
    magic, head_len = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a Studio frame")
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {head_len} exceeds {MAX_HEADER_BYTES}")
    end = _PREFIX.size + head_len
    if end > len(frame):
        raise ProtocolError("truncated frame: header runs past the end")
    try:
        header = json.loads(frame[_PREFIX.size:end].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    version = header.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})")
    type_ = header.pop("type", None)
    if not isinstance(type_, str):
        raise ProtocolError("header has no message type")
    sizes = header.pop("payloads", [])
    if not isinstance(sizes, list) or len(sizes) > MAX_PAYLOADS:
        raise ProtocolError(f"payloads must be a list of at most {MAX_PAYLOADS} sizes")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
        raise ProtocolError("payload sizes must be non-negative integers")
    if end + sum(sizes) != len(frame):
        raise ProtocolError(f"payload sizes add up to {sum(sizes)} but the frame holds {len(frame) - end} bytes")
    payloads, offset = [], end
    for size in sizes:
        payloads.append(frame[offset:offset + size])
        offset += size
    msg = Message(type_, header, payloads)
    validate(msg, allowed)
    return msg


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------------------
# Jobs: typed, versioned, and complete enough to reproduce the result.

JOB_VERSION = 1


@dataclass
class SelfTestJob:
    """A matrix multiply on the chosen device: proves the whole path and reports throughput."""

    kind: typing.ClassVar[str] = "selftest"
    size: int = 1024
    iterations: int = 20
    device: str = "auto"
    dtype: str = "auto"
    version: int = JOB_VERSION


@dataclass
class ChatJob:
    """One assistant answer to a conversation. `model` is a path or library name; "" is the bundled default."""

    kind: typing.ClassVar[str] = "chat"
    messages: list = field(default_factory=list)  # [{"role": "user"|"assistant"|"system", "content": str}]
    model: str = ""
    system: str = ""
    # Sampling: None = the model's own recommendation (its file, else its authors', else Studio's)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 512
    stop: list = field(default_factory=list)
    overflow: str = "error"  # "error" or "truncate" (drop the oldest turns)
    dtype: str = "auto"  # "auto", "float32", "bfloat16", "float16", or keep quantized as loaded
    quant: str = ""  # "", "int8", "int4": weight-only quantization of full-precision weights at load
    version: int = JOB_VERSION


@dataclass
class ImageJob:
    """txt2img / img2img / inpaint. Paths are local files the engine reads directly."""

    kind: typing.ClassVar[str] = "image"
    model: str = ""
    prompt: str = ""
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 25
    cfg: float = 7.0
    sampler: str = "euler"
    schedule: str = "normal"
    seed: int = -1
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    vae: str = ""
    text_encoders: list = field(default_factory=list)  # CLIP text encoder files for a UNet-only model
    loras: list = field(default_factory=list)  # [{"path": str, "weight": float}]
    init_image: str = ""
    strength: float = 0.75
    mask: str = ""
    prediction: str = "auto"  # "auto", "eps", "v"
    out: str = ""
    previews: bool = True
    quant: str = ""  # "", "int8", "int4", "fp8": weight-only quantization of the UNet's linear layers
    version: int = JOB_VERSION


@dataclass
class VideoJob:
    kind: typing.ClassVar[str] = "video"
    model: str = ""
    prompt: str = ""
    negative: str = ""
    width: int = 832
    height: int = 480
    frames: int = 81
    fps: float = 16.0
    steps: int = 30
    cfg: float = 5.0
    shift: float = 5.0
    sampler: str = "unipc"
    seed: int = -1
    image: str = ""
    out: str = ""
    vae: str = ""  # "" = inside the model folder, next to the model file, or from the library
    text_encoder: str = ""
    keep_partial: bool = False  # on cancel, decode and save what was denoised so far
    version: int = JOB_VERSION


@dataclass
class CompletionJob:
    """Text continuation for the HTTP API: a raw `prompt`, or `messages` (OpenAI shape, tool turns
    included) rendered with the model's own chat template together with `tools`."""

    kind: typing.ClassVar[str] = "completion"
    prompt: str = ""
    messages: list = field(default_factory=list)
    tools: list = field(default_factory=list)  # OpenAI function specs, passed to the template as `tools`
    model: str = ""
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list = field(default_factory=list)
    version: int = JOB_VERSION


@dataclass
class EmbedJob:
    """Embeddings: each text's mean-pooled, L2-normalised last hidden state of an LLM."""

    kind: typing.ClassVar[str] = "embed"
    texts: list = field(default_factory=list)  # [str]
    model: str = ""  # as ChatJob.model; "" is the bundled chat model
    version: int = JOB_VERSION


JOB_TYPES: dict[str, type] = {cls.kind: cls for cls in (SelfTestJob, ChatJob, ImageJob, VideoJob, CompletionJob,
                                                         EmbedJob)}


def job_to_dict(job: Any) -> dict:
    return {"kind": job.kind, **dataclasses.asdict(job)}


def job_from_dict(data: dict) -> Any:
    """Build a typed job, checking every field's type. Unknown fields are refused, not ignored."""
    if not isinstance(data, dict):
        raise ProtocolError("job must be an object")
    check_values(data)
    data = dict(data)
    kind = data.pop("kind", None)
    cls = JOB_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown job kind {kind!r}; known: {', '.join(sorted(JOB_TYPES))}")
    version = data.get("version", JOB_VERSION)
    if version != JOB_VERSION:
        raise ProtocolError(f"{kind} job version {version!r} is not supported (expected {JOB_VERSION})")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ProtocolError(f"{kind} job: unknown field(s) {', '.join(sorted(unknown))}")
    for name, value in data.items():
        if not _matches(value, hints[name]):
            raise ProtocolError(f"{kind} job: field {name!r} has the wrong type ({type(value).__name__})")
    return cls(**data)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        hint = origin
    return isinstance(value, hint)


# ---------------------------------------------------------------------------
# Results: what a finished job sends back. On the wire a result stays a plain dict with these
# keys (`to_dict()`), so front ends that read dicts keep working; `result_from_dict` validates one.


@dataclass
class _Result:
    kind: typing.ClassVar[str] = ""
    marker: typing.ClassVar[str] = ""  # the key that tells this kind apart in a dict without "kind"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        # Read access by key, as when results were dicts: in-process callers (tests, benchmarks)
        # that index `result["images"]` keep working while they move to attributes.
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class SelfTestResult(_Result):
    kind: typing.ClassVar[str] = "selftest"
    marker: typing.ClassVar[str] = "tflops"
    device: str
    device_label: str
    dtype: str
    size: int
    iterations: int
    seconds: float
    tflops: float
    relative_error: float
    ok: bool


@dataclass
class ChatResult(_Result):
    kind: typing.ClassVar[str] = "chat"
    marker: typing.ClassVar[str] = "finish_reason"
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tokens_per_s: float
    model: str
    finish_reason: str  # "stop", "length", or "repetition" (ended in a loop of the same phrase)
    context_length: int
    seed: int | None
    dropped_turns: int = 0
    notes: list = field(default_factory=list)
    sampling: dict = field(default_factory=dict)  # the settings used, after the model's defaults


@dataclass
class ImageResult(_Result):
    kind: typing.ClassVar[str] = "image"
    marker: typing.ClassVar[str] = "images"
    images: list  # [{"path": str, "seed": int, "width": int, "height": int}]
    seconds: float
    model: str
    family: str
    prediction: str
    notes: list = field(default_factory=list)
    job: dict = field(default_factory=dict)  # the job as run (seed fixed), with "kind"


@dataclass
class VideoResult(_Result):
    kind: typing.ClassVar[str] = "video"
    marker: typing.ClassVar[str] = "videos"
    videos: list  # [{"path", "sidecar", "frames", "width", "height", "fps", "seed", "codec"}]
    path: str
    seconds: float
    model: str
    timings: dict = field(default_factory=dict)  # seconds per stage: load, encode, sampling, decode, save, per_step
    files: dict = field(default_factory=dict)  # part -> file it was loaded from
    notes: list = field(default_factory=list)
    partial: bool = False  # cancelled and kept: the estimate at the last step, not a finished video
    job: dict = field(default_factory=dict)


@dataclass
class EmbedResult(_Result):
    kind: typing.ClassVar[str] = "embed"
    marker: typing.ClassVar[str] = "embeddings"
    embeddings: list  # one list of floats per text, in order
    token_counts: list  # tokens per text
    model: str
    dimensions: int


RESULT_TYPES: dict[str, type] = {cls.kind: cls for cls in (SelfTestResult, ChatResult, ImageResult, VideoResult,
                                                           EmbedResult)}


def result_from_dict(data: dict, kind: str | None = None) -> Any:
    """Build a typed result from its wire dict, checking every field's type. `kind` may be left out:
    each kind has a key no other has ("images", "videos", "finish_reason", "tflops")."""
    if not isinstance(data, dict):
        raise ProtocolError("result must be an object")
    if kind is None:
        found = [k for k, cls in RESULT_TYPES.items() if cls.marker in data]
        if len(found) != 1:
            raise ProtocolError("cannot tell which kind of result this is: expected exactly one of the keys "
                                + ", ".join(cls.marker for cls in RESULT_TYPES.values()))
        kind = found[0]
    cls = RESULT_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown result kind {kind!r}; known: {', '.join(sorted(RESULT_TYPES))}")
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields_)
    if unknown:
        raise ProtocolError(f"{kind} result: unknown field(s) {', '.join(sorted(unknown))}")
    missing = [n for n, f in fields_.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProtocolError(f"{kind} result: missing field(s) {', '.join(missing)}")
    for name, value in data.items():
        if not _matches(value, hints[name]):
            raise ProtocolError(f"{kind} result: field {name!r} has the wrong type ({type(value).__name__})")
    return cls(**data)
