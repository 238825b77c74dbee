"""Read model file headers (safetensors JSON, GGUF metadata, pickle key names) without tensor data.

Everything here treats the file as hostile: every length and count is checked against the
file size before anything is allocated, and every failure is a HeaderError that says what
is wrong and what to do. Nothing is ever unpickled with real globals, and torch is never
imported (the GUI process uses this module).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MAX_SAFETENSORS_HEADER = 100 << 20  # real headers are a few MiB at most
MAX_GGUF_STRING = 64 << 20
MAX_GGUF_NDIMS = 8
MAX_GGUF_ARRAY_DEPTH = 4
MAX_GGUF_OBJECT_ARRAY = 1 << 24  # string arrays: the largest vocabularies are ~260k entries
MAX_PICKLE_BYTES = 64 << 20  # data.pkl holds only structure; real ones are < 10 MiB
MAX_TENSOR_DIMS = 16  # real tensors have at most 6; a product of 60,000 huge dims took 28 s
MAX_GGUF_INLINE_ARRAY = 1 << 16  # number arrays longer than this stay in the file (GGUFArray)
MAX_GGUF_STRING_ARRAY = 1 << 21  # strings: vocabularies and merges are < 1M entries


class HeaderError(ValueError):
    """A model file whose header cannot be read. The message says what is wrong and what to do."""


@dataclass
class TensorInfo:
    dtype: str  # safetensors dtype ("F16", "BF16", ...) or GGML type name ("Q4_K", ...)
    shape: tuple[int, ...]  # PyTorch order (GGUF dims are reversed on read)
    nbytes: int
    offset: int = 0  # byte offset of the data in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelHeader:
    """What a model file or folder declares about itself, without tensor data."""

    path: Path
    format: str  # safetensors | gguf | pytorch-pickle | diffusers | hf
    file_size: int
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)  # __metadata__ or GGUF kv pairs
    config: dict[str, Any] = field(default_factory=dict)  # config.json / model_index.json of a folder
    components: dict[str, ModelHeader] = field(default_factory=dict)  # diffusers sub-folders
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# safetensors: u64 little-endian header length, then a JSON object.

# dtype -> bits per element
SAFETENSORS_DTYPES = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64,
}


def parse_safetensors(f: BinaryIO, file_size: int, path: Path | str = "<memory>") -> ModelHeader:
    """Parse the header of a safetensors stream of `file_size` bytes; reads only the header."""
    name = str(path)
    if file_size < 8:
        raise HeaderError(f"{name}: file is {file_size} bytes, too short for a safetensors header; "
                          "the download is probably incomplete, download it again")
    raw = f.read(8)
    if len(raw) < 8:
        raise HeaderError(f"{name}: file ended inside the header length; download it again")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_SAFETENSORS_HEADER:
        raise HeaderError(f"{name}: header claims {n} bytes (limit {MAX_SAFETENSORS_HEADER >> 20} MiB); "
                          "this is not a valid safetensors file")
    if 8 + n > file_size:
        raise HeaderError(f"{name}: header claims {n} bytes but the file has only {file_size - 8} after "
                          "the length; the file is truncated or not safetensors, download it again")
    text = f.read(n)
    if len(text) < n:
        raise HeaderError(f"{name}: file ended inside the header; download it again")
    try:
        obj = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"{name}: header is not valid JSON ({type(e).__name__}); "
                          "the file is corrupt or not safetensors") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{name}: header is JSON but not an object; the file is not safetensors")
    data_start = 8 + n
    data_size = file_size - data_start
    metadata: dict[str, Any] = {}
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in obj.items():
        if key == "__metadata__":
            if not isinstance(entry, dict):
                raise HeaderError(f"{name}: __metadata__ is not an object; the file is corrupt")
            metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in entry.items()}
            continue
        tensors[key] = info = _safetensors_entry(name, key, entry)
        begin, end = info.offset, info.offset + info.nbytes
        if end > data_size:
            raise HeaderError(f"{name}: tensor {key!r} ends at byte {end} of the data but the file holds "
                              f"only {data_size}; the file is truncated, download it again")
        info.offset = data_start + begin
        if end > begin:
            spans.append((begin, end, key))
    spans.sort()
    for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise HeaderError(f"{name}: tensors {k0!r} and {k1!r} overlap; the file is corrupt")
    return ModelHeader(Path(path), "safetensors", file_size, tensors, metadata)


def _safetensors_entry(name: str, key: str, entry: Any) -> TensorInfo:
    bad = f"{name}: tensor {key!r} has a malformed entry"
    if not isinstance(entry, dict):
        raise HeaderError(f"{bad} (not an object); the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise HeaderError(f"{bad}: unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(
            type(d) is int and 0 <= d < 1 << 48 for d in shape):
        raise HeaderError(f"{bad}: shape must be a short list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and 0 <= o < 1 << 62 for o in offsets) or offsets[1] < offsets[0]):
        raise HeaderError(f"{bad}: data_offsets must be [begin, end] with 0 <= begin <= end")
    bits = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    nbytes = offsets[1] - offsets[0]
    if bits != nbytes * 8:
        raise HeaderError(f"{bad}: shape {shape} of {dtype} needs {bits / 8:g} bytes but the offsets "
                          f"span {nbytes}; the file is corrupt")
    return TensorInfo(dtype, tuple(shape), nbytes, offsets[0])


def read_safetensors(path: Path | str) -> ModelHeader:
    path = Path(path)
    with _open(path) as f:
        return parse_safetensors(f, os.fstat(f.fileno()).st_size, path)


# ---------------------------------------------------------------------------
# GGUF: magic, version, counts, key/value pairs, tensor infos, aligned data.

GGUF_MAGIC = b"GGUF"

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# value type id -> struct format for scalars (8 = string, 9 = array)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_MIN_SIZE = {**{t: struct.calcsize(f) for t, f in _GGUF_SCALARS.items()}, 8: 8, 9: 12}


@dataclass(frozen=True)
class GGUFArray:
    """A long GGUF metadata array left in the file: its element type, length and byte offset.

    Reading one into Python objects cost ~50 bytes per element (a 190 MB file took 2.4 GB), and
    nothing that reads headers needs the values of such arrays."""

    etype: int
    count: int
    offset: int

    def __len__(self) -> int:
        return self.count

    def __str__(self) -> str:
        return f"<array of {self.count} values of type {self.etype}, not loaded>"


class _Reader:
    """Bounded reads from a stream: never asks for more than the file has left."""

    def __init__(self, f: BinaryIO, size: int, name: str) -> None:
        self.f, self.size, self.name, self.pos = f, size, name, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def read(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise HeaderError(f"{self.name}: {what} needs {n} bytes but only {self.left} are left; "
                              "the file is truncated or corrupt, download it again")
        data = self.f.read(n)
        if len(data) < n:
            raise HeaderError(f"{self.name}: file ended while reading {what}; download it again")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.left:
            raise HeaderError(f"{self.name}: {what} needs {n} bytes but only {self.left} are left; "
                              "the file is truncated or corrupt, download it again")
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        if n > min(self.left, MAX_GGUF_STRING):
            raise HeaderError(f"{self.name}: {what} claims {n} bytes, more than the file holds; "
                              "the file is corrupt")
        return self.read(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            if depth >= MAX_GGUF_ARRAY_DEPTH:
                raise HeaderError(f"{self.name}: {what} nests arrays too deeply; the file is corrupt")
            etype = self.unpack("<I", f"element type of {what}")
            count = self.unpack("<Q", f"length of {what}")
            if etype not in _GGUF_MIN_SIZE:
                raise HeaderError(f"{self.name}: {what} has unknown element type {etype}; the file is "
                                  "corrupt or from a newer GGUF version")
            if count * _GGUF_MIN_SIZE[etype] > self.left:
                raise HeaderError(f"{self.name}: {what} claims {count} elements, more than the file can "
                                  "hold; the file is corrupt")
            if etype == 9 and count > MAX_GGUF_OBJECT_ARRAY or etype == 8 and count > MAX_GGUF_STRING_ARRAY:
                raise HeaderError(f"{self.name}: {what} claims {count} strings or arrays (limit "
                                  f"{MAX_GGUF_STRING_ARRAY if etype == 8 else MAX_GGUF_OBJECT_ARRAY}); "
                                  "the file is corrupt")
            if etype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[etype]
                nbytes = count * struct.calcsize(fmt)
                if count > MAX_GGUF_INLINE_ARRAY:
                    start = self.pos
                    self.skip(nbytes, what)
                    return GGUFArray(etype, count, start)
                raw = self.read(nbytes, what)  # one read for the whole array, not one per element
                return list(struct.unpack(f"<{count}{fmt[1]}", raw))
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise HeaderError(f"{self.name}: {what} has unknown value type {vtype}; the file is corrupt "
                          "or from a newer GGUF version")


def parse_gguf(f: BinaryIO, file_size: int, path: Path | str = "<memory>") -> ModelHeader:
    """Parse GGUF v2/v3 metadata and tensor infos; tensor data is never read."""
    name = str(path)
    r = _Reader(f, file_size, name)
    magic = r.read(4, "the GGUF magic") if file_size >= 4 else b""
    if magic != GGUF_MAGIC:
        raise HeaderError(f"{name}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = r.unpack("<I", "the GGUF version")
    if version not in (2, 3):
        raise HeaderError(f"{name}: GGUF version {version} is not supported (2 and 3 are); "
                          "convert it with a current llama.cpp")
    n_tensors = r.unpack("<Q", "the tensor count")
    n_kv = r.unpack("<Q", "the metadata count")
    # Smallest possible entries: kv = key length + type + 1-byte value; tensor info = 8+4+4+8.
    if n_kv * 13 + n_tensors * 24 > r.left:
        raise HeaderError(f"{name}: header claims {n_tensors} tensors and {n_kv} metadata entries, more "
                          "than the file can hold; the file is corrupt")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        vtype = r.unpack("<I", f"type of {key!r}")
        metadata[key] = r.value(vtype, f"metadata {key!r}")
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        tname = r.string(f"tensor name {i}")
        ndims = r.unpack("<I", f"dimension count of {tname!r}")
        if ndims > MAX_GGUF_NDIMS:
            raise HeaderError(f"{name}: tensor {tname!r} claims {ndims} dimensions; the file is corrupt")
        dims = struct.unpack(f"<{ndims}Q", r.read(8 * ndims, f"dimensions of {tname!r}"))
        gtype = r.unpack("<I", f"type of {tname!r}")
        offset = r.unpack("<Q", f"offset of {tname!r}")
        infos.append((tname, dims, gtype, offset))
    align = metadata.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise HeaderError(f"{name}: general.alignment {align!r} is not a power of two; the file is corrupt")
    data_start = -(-r.pos // align) * align
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for tname, dims, gtype, offset in infos:
        if gtype not in GGML_TYPES:
            raise HeaderError(f"{name}: tensor {tname!r} has unknown ggml type {gtype}; update Studio or "
                              "re-quantize the model with a common type")
        tname_type, block, bsize = GGML_TYPES[gtype]
        numel = math.prod(dims)
        if numel % block:
            raise HeaderError(f"{name}: tensor {tname!r} has {numel} elements, not a multiple of the "
                              f"{tname_type} block size {block}; the file is corrupt")
        nbytes = numel // block * bsize
        if offset % align or offset + nbytes > data_size:
            raise HeaderError(f"{name}: tensor {tname!r} lies outside the file's data (offset {offset}, "
                              f"{nbytes} bytes, {max(data_size, 0)} available); the file is truncated, "
                              "download it again")
        tensors[tname] = TensorInfo(tname_type, tuple(reversed(dims)), nbytes, data_start + offset)
        if nbytes:
            spans.append((offset, offset + nbytes, tname))
    spans.sort()
    for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise HeaderError(f"{name}: tensors {k0!r} and {k1!r} overlap; the file is corrupt")
    metadata["GGUF.version"] = version
    return ModelHeader(Path(path), "gguf", file_size, tensors, metadata)


def read_gguf(path: Path | str) -> ModelHeader:
    path = Path(path)
    with _open(path) as f:
        return parse_gguf(f, os.fstat(f.fileno()).st_size, path)


# ---------------------------------------------------------------------------
# PyTorch pickles: read tensor names and shapes from data.pkl without running anything.

class _Storage:
    def __init__(self, dtype: str, numel: int) -> None:
        self.dtype, self.numel = dtype, numel


class _BadTensor(Exception):
    """A tensor in a pickle that no real checkpoint has (caught and reported as HeaderError)."""


class _TensorStub:
    def __init__(self, storage: Any, size: Any) -> None:
        self.dtype = storage.dtype if isinstance(storage, _Storage) else "unknown"
        if isinstance(size, tuple) and len(size) > MAX_TENSOR_DIMS:
            raise _BadTensor(f"a tensor claims {len(size)} dimensions (real ones have at most "
                              f"{MAX_TENSOR_DIMS})")
        if isinstance(size, tuple) and not all(type(d) is int and 0 <= d < 1 << 48 for d in size):
            raise _BadTensor("a tensor's dimensions are not non-negative integers")
        self.shape = tuple(size) if isinstance(size, tuple) else ()


class _Opaque:
    """Stands in for any allowed object; swallows state so BUILD cannot run anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _rebuild_tensor(storage: Any, offset: Any = 0, size: Any = (), *args: Any) -> _TensorStub:
    return _TensorStub(storage, size)


def _rebuild_parameter(data: Any, *args: Any) -> Any:
    return data


_STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "UntypedStorage": "U8",
}
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): dict,
    ("torch", "Size"): tuple,
}


class _KeysOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except tensor-rebuild names, which map to harmless local stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage type, key, location, numel)
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            dtype = pid[1] if isinstance(pid[1], str) else "unknown"
            return _Storage(dtype, pid[4] if isinstance(pid[4], int) else 0)
        raise pickle.UnpicklingError("unexpected persistent id")


def read_pickle(path: Path | str) -> ModelHeader:
    """Tensor names and shapes of a zip-format torch.save file; legacy pickles are refused."""
    path = Path(path)
    size = path.stat().st_size
    convert = "convert it to .safetensors (for example with a trusted converter) and add that file"
    with _open(path) as f:
        head = f.read(4)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        raise HeaderError(f"{path}: this is a legacy PyTorch pickle; Studio never unpickles files for "
                          f"safety, {convert}")
    if head != b"PK\x03\x04":
        raise HeaderError(f"{path}: not a safetensors, GGUF or PyTorch file (starts with {head!r})")
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if not pkls:
                raise HeaderError(f"{path}: a zip file without data.pkl is not a PyTorch checkpoint")
            if pkls[0].file_size > MAX_PICKLE_BYTES:
                raise HeaderError(f"{path}: data.pkl is {pkls[0].file_size} bytes, too large to inspect; "
                                  f"{convert}")
            raw = z.read(pkls[0])
        obj = _KeysOnlyUnpickler(io.BytesIO(raw)).load()
    except HeaderError:
        raise
    except _BadTensor as e:
        raise HeaderError(f"{path}: {e}; the file is corrupt or hostile, {convert}") from None
    # Unpickling hostile bytes can fail in any way; every failure means "cannot inspect".
    except Exception as e:  # noqa: BLE001
        raise HeaderError(f"{path}: this is a PyTorch pickle that Studio cannot inspect safely "
                          f"({type(e).__name__}: {str(e)[:80]}); {convert}") from None
    tensors: dict[str, TensorInfo] = {}
    _collect_stubs(obj, "", tensors, 0)
    if not tensors:
        raise HeaderError(f"{path}: this PyTorch pickle holds no tensors Studio can see; {convert}")
    return ModelHeader(path, "pytorch-pickle", size, tensors, {}, notes=[
        "This is a PyTorch pickle; Studio read only its tensor names and never runs it. "
        f"The engine loads it only with weights_only=True; better: {convert}."])


def _collect_stubs(obj: Any, prefix: str, out: dict[str, TensorInfo], depth: int) -> None:
    if depth > 4 or not isinstance(obj, dict):
        return
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        if isinstance(v, _TensorStub):
            bits = SAFETENSORS_DTYPES.get(v.dtype, 16)
            out[prefix + k] = TensorInfo(v.dtype, v.shape, math.prod(v.shape) * bits // 8)
        elif isinstance(v, dict):
            # Lightning checkpoints wrap the weights in "state_dict"; keep the real key names.
            _collect_stubs(v, "" if k in ("state_dict", "model", "module") else f"{prefix}{k}.", out, depth + 1)


# ---------------------------------------------------------------------------
# Folders: diffusers pipelines / components and Hugging Face LLM repos.

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".ckpt", ".pt", ".pth", ".bin")


def read_json(path: Path, limit: int = 16 << 20) -> dict:
    try:
        if path.stat().st_size > limit:
            raise HeaderError(f"{path}: {path.stat().st_size} bytes is too large for a config file")
        with open_regular(path) as f:
            obj = json.loads(f.read(limit + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"{path}: cannot read this config ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: config is not a JSON object")
    return obj


def _weights_in(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if not files:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".bin", ".pt", ".pth"))
    return files


def _merge_shards(folder: Path, fmt: str, config: dict) -> ModelHeader:
    head = ModelHeader(folder, fmt, 0, config=config)
    for f in _weights_in(folder):
        part = read_header(f)
        head.tensors.update(part.tensors)
        head.metadata.update(part.metadata)
        head.file_size += part.file_size
        head.notes.extend(n for n in part.notes if n not in head.notes)
    return head


def read_folder(folder: Path | str) -> ModelHeader:
    """A diffusers pipeline (model_index.json), a diffusers component or an HF model folder."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json")
        head = ModelHeader(folder, "diffusers", 0, config=index)
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if (sub / "config.json").is_file():
                comp = _merge_shards(sub, "diffusers", read_json(sub / "config.json"))
                head.components[sub.name] = comp
                head.file_size += comp.file_size
            elif (sub / "scheduler_config.json").is_file():
                head.components[sub.name] = ModelHeader(sub, "diffusers", 0,
                                                        config=read_json(sub / "scheduler_config.json"))
        return head
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
        fmt = "diffusers" if "_class_name" in config else "hf"
        head = _merge_shards(folder, fmt, config)
        if not head.tensors:
            raise HeaderError(f"{folder}: has a config.json but no weight files next to it; "
                              "finish the download or pick the folder that holds the weights")
        return head
    raise HeaderError(f"{folder}: not a model folder (no model_index.json or config.json); drop a model "
                      "file or a diffusers / Hugging Face folder, or use `studio models scan` for a folder of models")


def read_header(path: Path | str) -> ModelHeader:
    """Dispatch on content (magic bytes), never on the file name."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
        f.seek(0)
        if head[:4] == GGUF_MAGIC:
            return parse_gguf(f, size, path)
        if head[8:9] == b"{":  # a safetensors JSON header starts right after the 8-byte length
            return parse_safetensors(f, size, path)
        if size < 8:
            raise HeaderError(f"{path}: file is {size} bytes, too short to be a model; download it again")
        if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
            raise HeaderError(f"{path}: not a safetensors, GGUF or PyTorch file (starts with {head[:8]!r}); "
                              "Studio reads .safetensors, .gguf and model folders")
    return read_pickle(path)


def open_regular(path: Path | str, buffering: int = -1) -> BinaryIO:
    """Open a regular file for reading; anything else (a FIFO named x.safetensors, a device) raises
    HeaderError. Opened non-blocking first: opening a FIFO for reading blocks until a writer comes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except IsADirectoryError:
        raise HeaderError(f"{path}: is a folder; drop the model file or a model folder") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise HeaderError(f"{path}: is a folder; drop the model file or a model folder")
        if not stat.S_ISREG(mode):
            raise HeaderError(f"{path}: not a regular file (a pipe, socket or device); Studio reads model files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _open(path: Path) -> BinaryIO:
    try:
        return open_regular(path, buffering=1 << 20)
    except FileNotFoundError:
        raise HeaderError(f"{path}: file not found") from None
    except PermissionError:
        raise HeaderError(f"{path}: permission denied; check the file's permissions") from None
    except OSError as e:
        raise HeaderError(f"{path}: cannot open ({e.strerror or e})") from None
