"""Fuzz worker: runs mutated inputs through one parser, under a memory cap; driven by test_fuzz.py.

    python tests/fuzz_worker.py TARGET SEED START COUNT

Case i's input is made from Random(SEED, i) alone, so a failure is re-run by its (target, seed, i).
Each case prints "S i" before it runs and "D i outcome" after, so the parent can time every case
and kill the worker if one hangs. A case ends "ok" (a parsed result of the documented type), "err"
(the module's documented error) or "BAD <type>: <message>" (anything else: a bug).
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # library_fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # studio

MEMORY_CAP = 512 << 20  # bytes of address space a case may add to the worker's baseline
INTERESTING = [0, 1, 2, 7, 8, 9, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 40, 60_000]


# ---------------------------------------------------------------- mutators

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """1-4 random edits: bit flips, interesting bytes and integers, cuts, copies, inserts, long repeats."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b = bytearray(rng.randbytes(rng.randint(1, 32)))
            continue
        i = rng.randrange(len(b))
        op = rng.randrange(8)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x20, 0x22, 0x5B, 0x7B, 0x3A, 0x2C, 0x5C])
        elif op == 2:
            width = rng.choice([4, 8])
            b[i:i + width] = (rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif op == 3:
            del b[i:i + rng.randint(1, 64)]
        elif op == 4:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 64)]
        elif op == 5:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 6:
            del b[rng.randrange(len(b)):]
        else:
            n = rng.randint(1, 3)
            b[i:i] = b[i:i + n] * rng.randint(2, 2000)
    return bytes(b)


def _nested(rng: random.Random) -> Any:
    out: Any = rng.choice([0, "x", None])
    for _ in range(rng.choice([2, 40, 900, 3000])):
        out = [out] if rng.random() < 0.5 else {"a": out}
    return out


def _odd_value(rng: random.Random) -> Any:
    return rng.choice([
        lambda: rng.choice([-1, 0, 1 << 63, 1 << 70, -(1 << 70), 2**31, 60_000]),
        lambda: rng.choice([1e308, -1e308, 5e-324, float("nan"), float("inf")]),
        lambda: rng.choice(["", "x" * rng.choice([10, 10_000, 300_000]), "\ud800", "a, b: c", '"q"', "\x00"]),
        lambda: rng.choice([None, True, [], {}, [1, 2], {"a": 1}]),
        lambda: _nested(rng),
    ])()


def mutate_json(obj: Any, rng: random.Random) -> Any:
    """Replace, delete or retype 1-3 nodes of a JSON value."""
    obj = json.loads(json.dumps(obj))
    for _ in range(rng.randint(1, 3)):
        paths: list[tuple[Any, Any]] = []
        stack = [obj]
        while stack:
            node = stack.pop()
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for k, v in items:
                paths.append((node, k))
                if len(paths) < 5000:
                    stack.append(v)
        if not paths:
            return _odd_value(rng)
        parent, key = rng.choice(paths)
        r = rng.random()
        if r < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif r < 0.25 and isinstance(parent, dict):
            parent[rng.choice(["__metadata__", "x" * 5, "seed", "inputs", "class_type"])] = _odd_value(rng)
        else:
            parent[key] = _odd_value(rng)
    return obj


def _dumps(obj: Any) -> str:
    try:
        return json.dumps(obj)
    except RecursionError:
        return "[" * 5000 + "]" * 5000


# ---------------------------------------------------------------- targets

def _safetensors_seed() -> tuple[dict, int]:
    from library_fixtures import SAFETENSORS_CASES, safetensors_bytes

    head, size = safetensors_bytes(SAFETENSORS_CASES["sd15_ldm"][0], metadata={"format": "pt", "ss_x": "1"})
    return json.loads(head[8:]), size - len(head)


def target_safetensors() -> tuple[Callable[[random.Random], Any], tuple, Callable[[Any], bool]]:
    from studio.library.headers import HeaderError, ModelHeader, parse_safetensors

    header, data_len = _safetensors_seed()
    raw = json.dumps(header).encode()

    def case(rng: random.Random) -> Any:
        if rng.random() < 0.5:
            body = _dumps(mutate_json(header, rng)).encode()
            blob = struct.pack("<Q", len(body) if rng.random() < 0.9 else rng.choice(INTERESTING)) + body
        else:
            blob = mutate_bytes(struct.pack("<Q", len(raw)) + raw, rng)
        return parse_safetensors(io.BytesIO(blob), len(blob) + data_len)
    return case, (HeaderError,), lambda r: isinstance(r, ModelHeader)


def _gguf_seed() -> tuple[bytes, int]:
    from library_fixtures import ARRAY, STRING, U32, gguf_bytes

    kv = {"general.architecture": (STRING, "llama"), "general.name": (STRING, "tiny"),
          "llama.block_count": (U32, 2), "llama.context_length": (U32, 256), "llama.embedding_length": (U32, 64),
          "llama.attention.head_count": (U32, 4), "tokenizer.ggml.tokens": (ARRAY, (STRING, ["a", "b", "<s>"])),
          "tokenizer.ggml.token_type": (ARRAY, (U32, [1, 1, 3]))}
    tensors = {"token_embd.weight": ((3, 64), "F32"), "blk.0.attn_q.weight": ((64, 64), "Q8_0"),
               "blk.1.ffn_down.weight": ((64, 64), "Q4_1"), "output_norm.weight": ((64,), "F16")}
    return gguf_bytes(kv, tensors)


def target_gguf_library() -> tuple[Callable[[random.Random], Any], tuple, Callable[[Any], bool]]:
    from studio.library.headers import HeaderError, ModelHeader, parse_gguf

    head, size = _gguf_seed()

    def case(rng: random.Random) -> Any:
        blob = mutate_bytes(head, rng)
        return parse_gguf(io.BytesIO(blob), len(blob) + (size - len(head)))
    return case, (HeaderError,), lambda r: isinstance(r, ModelHeader)


def target_gguf_engine() -> tuple[Callable[[random.Random], Any], tuple, Callable[[Any], bool]]:
    from studio.errors import UserError
    from studio.models.gguf_llm import GGUFFile, read_gguf

    head, size = _gguf_seed()
    seed_file = head + bytes(range(256)) * ((size - len(head)) // 256 + 1)
    seed_file = seed_file[:size]
    folder = Path(tempfile.mkdtemp(prefix="fuzz-gguf-"))

    def case(rng: random.Random) -> Any:
        path = folder / "case.gguf"
        path.write_bytes(mutate_bytes(seed_file[:len(head) + 64], rng) + seed_file[len(head) + 64:])
        return read_gguf(path)
    return case, (UserError,), lambda r: isinstance(r, GGUFFile)


def _png(chunks: list[tuple[bytes, bytes]], width: int = 4, height: int = 4) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pixels = zlib.compress(b"\x00" + b"\x80" * 12)  # one 4-pixel row whatever size IHDR claims
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + b"".join(chunk(k, d) for k, d in chunks) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


_COMFY = {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                                       "scheduler": "karras", "positive": ["6", 0],
                                                       "negative": ["7", 0], "latent_image": ["5", 0],
                                                       "model": ["4", 0], "denoise": 1.0}},
          "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
          "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512}},
          "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}},
          "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry"}}}
_WORKFLOW = {"nodes": [{"id": 1, "type": "KSampler", "widgets_values": [5, "fixed", 20, 7, "euler", "karras", 1],
                        "inputs": [{"name": "positive", "link": 1}, {"name": "latent_image", "link": 2}]},
                       {"id": 2, "type": "CLIPTextEncode", "widgets_values": ["a cat"]},
                       {"id": 3, "type": "EmptyLatentImage", "widgets_values": [512, 512, 1]}],
             "links": [[1, 2, 0, 1, 0, "CONDITIONING"], [2, 3, 0, 1, 3, "LATENT"]]}
_A1111 = ("a cat, masterpiece\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, "
          'Seed: 5, Size: 512x768, Model hash: abc, Model: m, Lora hashes: "a: 1, b: 2"')
_STUDIO = {"prompt": "a cat", "steps": 20, "seed": 5, "cfg": 7.0, "width": 512, "height": 512}


def _text_chunk(key: str, value: str, kind: int) -> tuple[bytes, bytes]:
    raw = value.encode("latin-1", errors="replace")
    if kind == 0:
        return b"tEXt", key.encode() + b"\x00" + raw
    if kind == 1:
        return b"zTXt", key.encode() + b"\x00\x00" + zlib.compress(raw)
    return b"iTXt", key.encode() + b"\x00\x01\x00\x00\x00" + zlib.compress(value.encode("utf-8", "surrogatepass"))


def target_png() -> tuple[Callable[[random.Random], Any], tuple, Callable[[Any], bool]]:
    from studio.library.pngmeta import PngMetadataError, read_png_parameters

    def case(rng: random.Random) -> Any:
        texts = {"parameters": _A1111, "studio": json.dumps(_STUDIO), "prompt": json.dumps(_COMFY),
                 "workflow": json.dumps(_WORKFLOW)}
        keys = rng.sample(sorted(texts), rng.randint(1, 4))
        chunks = []
        for key in keys:
            value = texts[key]
            r = rng.random()
            if key != "parameters" and r < 0.6:
                value = _dumps(mutate_json(json.loads(value), rng))
            elif r < 0.8:
                value = mutate_bytes(value.encode(), rng).decode("latin-1")
            chunks.append(_text_chunk(key, value, rng.randrange(3)))
        size = (rng.choice([4, 1, 0, 1 << 16, 1 << 31]), rng.choice([4, 1, 0, 1 << 16])) if rng.random() < 0.1 else (4, 4)
        blob = _png(chunks, *size)
        if rng.random() < 0.3:
            blob = mutate_bytes(blob, rng)
        return read_png_parameters(io.BytesIO(blob))
    return case, (PngMetadataError,), lambda r: isinstance(r, dict)


_EXPORT = {"format": "studio-chat", "version": 1, "title": "t", "created": 1.0, "system": "be brief", "model": "",
           "settings": {"temperature": 0.7, "top_p": None, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
                        "presence_penalty": 0.0, "seed": 5, "max_tokens": 256, "quant": ""},
           "messages": [{"role": "user", "content": "hi", "status": "done", "created": 1.0, "stats": {}},
                        {"role": "assistant", "content": "hello", "status": "done", "created": 2.0,
                         "stats": {"completion_tokens": 3, "tokens_per_s": 12.5}}]}


def target_chat_import() -> tuple[Callable[[random.Random], Any], tuple, Callable[[Any], bool]]:
    from studio.chatstore import ChatStore, Thread, load_export

    folder = Path(tempfile.mkdtemp(prefix="fuzz-chat-"))
    store = ChatStore(folder / "chats.db")
    raw = json.dumps(_EXPORT).encode()

    def case(rng: random.Random) -> Any:
        path = folder / "export.json"
        if rng.random() < 0.7:
            path.write_text(_dumps(mutate_json(_EXPORT, rng)), encoding="utf-8", errors="surrogatepass")
        else:
            path.write_bytes(mutate_bytes(raw, rng))
        return store.import_json(load_export(path))
    return case, (ValueError,), lambda r: isinstance(r, Thread)


TARGETS = {"safetensors": target_safetensors, "gguf_library": target_gguf_library,
           "gguf_engine": target_gguf_engine, "png": target_png, "chat_import": target_chat_import}


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str]) -> int:
    name, seed, start, count = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    case, errors, is_result = TARGETS[name]()
    # The cap is on what a case adds: torch alone maps more than 512 MiB of address space.
    limit = _vm_size() + MEMORY_CAP
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    for i in range(start, start + count):
        out.write(f"S {i}\n")
        out.flush()
        rng = random.Random(seed * 1_000_003 + i)
        try:
            result = case(rng)
            outcome = "ok" if is_result(result) else f"BAD unexpected result {type(result).__name__}"
        except errors:
            outcome = "err"
        except MemoryError:
            outcome = "BAD MemoryError: over the memory cap"
        except Exception as exc:  # noqa: BLE001 (reported to the parent as a bug)
            outcome = f"BAD {type(exc).__name__}: {str(exc)[:200]}".replace("\n", " ")
        out.write(f"D {i} {outcome}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.exit(main(sys.argv[1:]))
