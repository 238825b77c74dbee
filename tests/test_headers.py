"""Header readers: real files parse, every kind of bad input is a HeaderError with a useful message."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from library_fixtures import (
    ARRAY,
    STRING,
    U32,
    gguf_bytes,
    safetensors_bytes,
    smollm2_gguf,
    write_gguf,
    write_safetensors,
)

from studio.library.headers import (
    MAX_SAFETENSORS_HEADER,
    HeaderError,
    parse_gguf,
    parse_safetensors,
    read_folder,
    read_header,
    read_pickle,
)


def _st(raw: bytes, size: int | None = None):
    return parse_safetensors(io.BytesIO(raw), len(raw) if size is None else size)


def _gg(raw: bytes, size: int | None = None):
    return parse_gguf(io.BytesIO(raw), len(raw) if size is None else size)


def _header_json(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


# --- safetensors ----------------------------------------------------------------------------

def test_safetensors_header_reads_shapes_dtypes_offsets_and_metadata(tmp_path):
    p = write_safetensors(tmp_path / "m.safetensors", {"a.weight": (4, 8), "b": (3,)}, "BF16", {"k": "v"})
    h = read_header(p)
    assert h.format == "safetensors"
    assert h.tensors["a.weight"].shape == (4, 8) and h.tensors["a.weight"].dtype == "BF16"
    assert h.tensors["a.weight"].nbytes == 64 and h.tensors["b"].nbytes == 6
    assert h.metadata == {"k": "v"}
    assert h.file_size == p.stat().st_size


def test_sparse_multi_gigabyte_file_costs_no_disk_and_parses_fast(tmp_path):
    p = write_safetensors(tmp_path / "big.safetensors", {"w": (50000, 50000)}, "F32")  # 10 GB declared
    assert p.stat().st_size > 9 << 30
    assert p.stat().st_blocks * 512 < 1 << 20
    assert read_header(p).tensors["w"].nbytes == 10_000_000_000


def test_truncated_safetensors_says_download_again(tmp_path):
    head, size = safetensors_bytes({"w": (100, 100)})
    with pytest.raises(HeaderError, match="truncated"):
        _st(head, size - 10)
    with pytest.raises(HeaderError, match="too short"):
        _st(b"\x01\x02")


def test_header_length_larger_than_file_is_refused():
    raw = struct.pack("<Q", 5000) + b'{"a": 1}'
    with pytest.raises(HeaderError, match="claims 5000 bytes"):
        _st(raw)


def test_gigabyte_header_is_refused_before_reading_it():
    raw = struct.pack("<Q", 3 << 30) + b"{"
    with pytest.raises(HeaderError, match="limit"):
        _st(raw, 4 << 30)
    assert MAX_SAFETENSORS_HEADER <= 100 << 20


@pytest.mark.parametrize("body", [b"not json at all", b"[1, 2, 3]", b"\xff\xfe{", b"[" * 100000])
def test_non_json_header_is_refused(body):
    with pytest.raises(HeaderError, match="JSON"):
        _st(struct.pack("<Q", len(body)) + body)


def test_overlapping_tensors_are_refused():
    raw = _header_json({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})
    with pytest.raises(HeaderError, match="overlap"):
        _st(raw + b"\0" * 24)


def test_tensor_reaching_outside_the_file_is_refused():
    raw = _header_json({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
    with pytest.raises(HeaderError, match="ends at byte 4000"):
        _st(raw + b"\0" * 100)


@pytest.mark.parametrize("entry", [
    {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
    "just a string",
])
def test_malformed_tensor_entries_are_refused(entry):
    with pytest.raises(HeaderError, match="malformed"):
        _st(_header_json({"a": entry}) + b"\0" * 16)


# --- GGUF -----------------------------------------------------------------------------------

def test_gguf_reader_matches_the_gguf_package_on_smollm2():
    gguf = pytest.importorskip("gguf")
    path = smollm2_gguf()
    ours = read_header(path)
    ref = gguf.GGUFReader(path)
    assert len(ours.tensors) == len(ref.tensors) == 272
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
    assert ours.metadata["general.architecture"] == "llama"
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152


def test_gguf_every_value_type_and_nested_arrays_parse(tmp_path):
    kv = {"general.architecture": (STRING, "llama"), "u8": (0, 7), "i8": (1, -7), "u16": (2, 700),
          "i16": (3, -700), "u32": (U32, 70000), "i32": (5, -70000), "f32": (6, 1.5), "b": (7, True),
          "u64": (10, 1 << 40), "i64": (11, -(1 << 40)), "f64": (12, 2.25),
          "strs": (ARRAY, (STRING, ["a", "bc"])), "nested": (ARRAY, (ARRAY, [(U32, [1, 2]), (U32, [3])]))}
    # the fixture writer only knows a few scalar formats; add the rest here
    import library_fixtures as lf
    fmts = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 11: "<q", 12: "<d"}
    orig = lf._gguf_value

    def value(vtype, v):
        return struct.pack(fmts[vtype], v) if vtype in fmts else orig(vtype, v)
    lf._gguf_value = value
    try:
        p = write_gguf(tmp_path / "t.gguf", kv, {"w": ((64, 32), "Q8_0")})
    finally:
        lf._gguf_value = orig
    h = read_header(p)
    assert h.metadata["i64"] == -(1 << 40) and h.metadata["f64"] == 2.25 and h.metadata["b"] is True
    assert h.metadata["strs"] == ["a", "bc"] and h.metadata["nested"] == [[1, 2], [3]]
    assert h.tensors["w"].shape == (64, 32) and h.tensors["w"].dtype == "Q8_0"


def test_gguf_bad_magic_and_version_are_refused():
    head, size = gguf_bytes({}, {})
    with pytest.raises(HeaderError, match="magic"):
        _gg(b"GGML" + head[4:])
    with pytest.raises(HeaderError, match="version 1"):
        _gg(head[:4] + struct.pack("<I", 1) + head[8:])


def test_gguf_absurd_counts_are_refused_without_allocating():
    raw = b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 1 << 60)
    with pytest.raises(HeaderError, match="more than the file can hold"):
        _gg(raw)
    kv = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 1 << 50)
    with pytest.raises(HeaderError, match="claims 1125899906842624 elements"):
        _gg(kv + b"\0" * 64)


def test_gguf_string_longer_than_the_file_is_refused():
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40) + b"x" * 32
    with pytest.raises(HeaderError, match="more than the file holds"):
        _gg(raw)


def test_gguf_tensor_outside_the_file_is_refused():
    head, size = gguf_bytes({}, {"w": ((256, 256), "F32")})
    with pytest.raises(HeaderError, match="outside the file"):
        _gg(head + b"\0" * 100)


def test_gguf_truncated_metadata_is_refused():
    head, _ = gguf_bytes({"general.name": (STRING, "hello world")}, {})
    with pytest.raises(HeaderError):
        _gg(head[:30])


# --- fuzzing: only HeaderError, never another exception, never a hang ------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_safetensors_random_bytes_only_raise_header_error(data):
    try:
        _st(data)
    except HeaderError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_gguf_random_bytes_only_raise_header_error(data):
    try:
        _gg(b"GGUF" + data)
    except HeaderError:
        pass


_VALID_ST = safetensors_bytes({"a": (2, 3), "b.c": (4,)}, "F32", {"format": "pt"})
_VALID_GG = gguf_bytes({"general.architecture": (STRING, "llama"), "n": (U32, 3),
                        "toks": (ARRAY, (STRING, ["x", "yz"]))}, {"w": ((32, 2), "Q8_0"), "n": ((4,), "F32")})


def _mutate(raw: bytes, size: int, edits, cut: int) -> tuple[bytes, int]:
    buf = bytearray(raw)
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    return bytes(buf[:max(0, len(buf) - cut)]), size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6), st.integers(0, 40),
       st.integers(-64, 64))
def test_fuzz_safetensors_mutated_valid_headers_only_raise_header_error(edits, cut, pad):
    raw, size = _mutate(*_VALID_ST, edits, cut)
    try:
        _st(raw + b"\0" * max(0, size - len(raw) + pad))
    except HeaderError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6), st.integers(0, 40),
       st.integers(-64, 64))
def test_fuzz_gguf_mutated_valid_headers_only_raise_header_error(edits, cut, pad):
    raw, size = _mutate(*_VALID_GG, edits, cut)
    try:
        _gg(raw + b"\0" * max(0, size - len(raw) + pad))
    except HeaderError:
        pass


# --- pickles and folders ---------------------------------------------------------------------

def test_legacy_pickle_is_refused_with_convert_advice(tmp_path):
    p = tmp_path / "old.ckpt"
    import pickle
    p.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(HeaderError, match="PyTorch pickle.*convert it to .safetensors"):
        read_header(p)


def test_zip_pickle_with_a_forbidden_global_is_refused_and_never_runs(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    p = tmp_path / "evil.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}))
    with pytest.raises(HeaderError, match="cannot inspect safely.*refused global builtins.print"):
        read_pickle(p)


def test_torch_zip_checkpoint_keys_and_shapes_are_read_without_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3,
                                                                                            dtype=torch.float16),
                               "x": torch.zeros(2, dtype=torch.bfloat16)}}, p)
    h = read_header(p)
    assert h.format == "pytorch-pickle"
    assert h.tensors["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert h.tensors["model.diffusion_model.input_blocks.0.0.weight"].dtype == "F16"
    assert h.tensors["x"].dtype == "BF16"
    assert "never runs it" in h.notes[0]


def test_folder_without_a_model_says_so(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(HeaderError, match="not a model folder.*studio models scan"):
        read_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(HeaderError, match="no weight files"):
        read_folder(tmp_path)


def test_unknown_file_type_says_what_studio_reads(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_bytes(b"hello, this is not a model at all")
    with pytest.raises(HeaderError, match="not a safetensors, GGUF or PyTorch file"):
        read_header(p)


def test_gguf_string_array_of_absurd_length_is_refused_before_looping():
    kv = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 1 << 30)
    with pytest.raises(HeaderError, match="limit"):
        _gg(kv + b"\0" * 64, size=1 << 40)  # the file claims to be big enough; the count is still refused
