"""Regression tests for issue 15, part 1: hostile files and odd names (defects 1-5, 7, 9, 12)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from library_fixtures import SAFETENSORS_CASES, write_safetensors  # noqa: E402

from studio.library.library import Library, LibraryError  # noqa: E402


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def lib(home):
    with Library() as library:
        yield library


def _model(path):
    return write_safetensors(path, SAFETENSORS_CASES["vae_sd"][0])


# --- 1. digit-only names are never taken for ids ------------------------------------------------

def test_remove_by_a_digit_name_deletes_that_file_not_the_entry_with_that_id(lib, home):
    alpha = _model(home / "m" / "alpha.safetensors")
    one = _model(home / "m" / "1.safetensors")
    a = lib.add(alpha)
    b = lib.add(one)
    assert a.id == 1 and b.name == "1"
    removed = lib.remove("1", delete_file=True)
    assert removed.path == one.resolve()
    assert alpha.exists() and not one.exists()
    assert lib.get("alpha") is not None


def test_ids_are_given_as_int_or_hash_form(lib, home):
    a = lib.add(_model(home / "m" / "alpha.safetensors"))
    assert lib.get(a.id).name == "alpha"
    assert lib.get(f"#{a.id}").name == "alpha"
    assert lib.get(str(a.id)) is None  # "1" is a name, and there is no model named "1"
    with pytest.raises(LibraryError, match="no model named '1'"):
        lib.remove("1", delete_file=True)
    assert (home / "m" / "alpha.safetensors").exists()


def test_a_file_named_like_an_id_gets_a_name_that_is_not_one(lib, home):
    e = lib.add(_model(home / "m" / "#1.safetensors"))
    assert not e.name.startswith("#")


def test_cli_remove_takes_a_name_or_hash_id(home, capsys):
    from studio.cli import main
    alpha = _model(home / "m" / "alpha.safetensors")
    one = _model(home / "m" / "1.safetensors")
    with Library() as lib:
        lib.add(alpha)
        lib.add(one)
    assert main(["models", "remove", "1", "--delete-file"]) == 0
    assert alpha.exists() and not one.exists()
    assert main(["models", "remove", "#1"]) == 0
    assert alpha.exists() and "'alpha'" in capsys.readouterr().out


def test_models_panel_removes_the_selected_entry_even_when_its_name_is_digits(qtbot, lib, home, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    from studio.ui import models_panel
    alpha = _model(home / "m" / "alpha.safetensors")
    lib.add(alpha)
    lib.add(_model(home / "m" / "1.safetensors"))
    panel = models_panel.ModelsPanel(lib, models_panel.DropInstaller(lib, hash_files=False))
    qtbot.addWidget(panel)
    panel.refresh()
    monkeypatch.setattr(models_panel.QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    assert panel.select("1")
    panel.remove_button.click()
    assert [e.name for e in lib.list()] == ["alpha"]
    panel.installer.wait()


# --- 2. chat templates are bounded in time, size and loops, and cancel stops them ---------------

HOSTILE_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ (messages[0]['content'] ~ 'x') * 100000000 }}",
    "{{ 'a' * 10000000000 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 'x'.center(10000000000) }}",
    "{{ 'x'|center(10000000000) }}",
    "{{ range(100000)|join('y' * 1000000) }}",
    "{{ '%9999999999d' % 1 }}",
    "{{ lipsum(100000000) }}",
    "{{ messages|tojson(indent=10000000000) }}",
    "{{ 'ab'.replace('', 'x' * 1000000) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_chat_template_is_refused_quickly_with_a_clear_message(template):
    import resource
    import time

    from studio.errors import UserError
    from studio.models.chat_template import render_chat
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(UserError) as info:
        render_chat(template, [{"role": "user", "content": "hi"}], time_limit=1.0)
    assert time.monotonic() - t0 < 3.0
    assert info.value.kind == "bad_model" and "chat template" in info.value.message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 400_000  # KiB


def test_cancel_stops_a_slow_chat_template():
    import time

    from studio.models.chat_template import render_chat

    class Stop(Exception):
        pass

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 1000:
            raise Stop

    t0 = time.monotonic()
    with pytest.raises(Stop):
        render_chat(HOSTILE_TEMPLATES[1], [{"role": "user", "content": "hi"}], cancel_check=check)
    assert time.monotonic() - t0 < 1.0


def test_long_conversations_still_render_through_the_bounds():
    from studio.models.chat_template import CHATML_TEMPLATE, render_chat
    msgs = [{"role": "user", "content": "w" * 3_000_000}]
    assert len(render_chat(CHATML_TEMPLATE, msgs)) > 3_000_000


def test_engine_prompt_rendering_passes_the_jobs_cancel_into_the_template():
    from types import SimpleNamespace

    from studio.engine.context import CancelToken, JobCancelled
    from studio.engine.pipelines.chat import render_prompt
    cm = SimpleNamespace(chat_template=HOSTILE_TEMPLATES[1], bos_token="", eos_token="")
    token = CancelToken()
    token.set()
    with pytest.raises(JobCancelled):
        render_prompt(cm, [{"role": "user", "content": "hi"}], token.check)


# --- 3. A1111 parameters parse in linear time; dropped PNGs parse off the GUI thread ------------

def test_a_long_a1111_line_without_colons_parses_in_linear_time():
    import time

    from studio.library.pngmeta import parse_a1111
    for line in ("a " * 20_000, "a" * 40_000 + ")" + "b" * 40_000 + ": 1", ('Key: "' + "\\\\" * 20_000) * 2,
                 "k, " * 30_000 + ": x"):
        t0 = time.monotonic()
        parse_a1111("a cat\n" + line)
        assert time.monotonic() - t0 < 0.5, line[:20]


def test_a1111_settings_line_is_read_like_before():
    from studio.library.pngmeta import parse_a1111
    out = parse_a1111('cat\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, '
                      'Seed: 5, Size: 512x768, Lora hashes: "a: 1, b: 2", Model: m')
    assert (out["prompt"], out["negative"], out["steps"], out["sampler"], out["schedule"], out["cfg"],
            out["seed"], out["width"], out["height"], out["model"]) == (
        "cat", "dog", 20, "dpmpp_2m", "karras", 7.0, 5, 512, 768, "m")
    assert out["settings"]["Lora hashes"] == "a: 1, b: 2"
    assert parse_a1111("just a prompt, with: commas")["prompt"] == "just a prompt, with: commas"


def test_a_compressed_parameters_chunk_that_expands_hugely_is_quick(tmp_path):
    import time

    from PIL import Image, PngImagePlugin

    from studio.library.pngmeta import read_png_parameters
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a " * 400_000, zip=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "z.png", pnginfo=info)
    t0 = time.monotonic()
    try:
        read_png_parameters(tmp_path / "z.png")
    except ValueError:
        pass
    assert time.monotonic() - t0 < 1.0


def test_dropping_a_png_does_not_parse_it_on_the_gui_thread(qtbot, tmp_path, monkeypatch):
    import threading
    import time

    from test_image_tab import MockEngine, drag_events, make_paths, png

    from studio.settings import Settings
    from studio.ui import image_tab
    threads = []

    def slow_read(path):
        threads.append(threading.current_thread())
        time.sleep(0.3)
        return {"prompt": "from the png", "source": "a1111"}

    monkeypatch.setattr(image_tab, "read_png_parameters", slow_read)
    tab = image_tab.ImageTab(MockEngine(), make_paths(tmp_path), Settings())
    qtbot.addWidget(tab)
    mime, enter, drop = drag_events(png(tmp_path / "a.png"))
    t0 = time.monotonic()
    tab.dropEvent(drop)
    assert time.monotonic() - t0 < 0.2
    qtbot.waitUntil(lambda: tab.prompt.text() == "from the png", timeout=3000)
    assert threads and threads[0] is not threading.main_thread()


# --- 4. header readers cap dimensions, counts and arrays ------------------------------------------

def _ckpt_with_shape(path, shape: list[int]):
    """A zip torch.save layout whose data.pkl gives tensor 'w' this shape (pickle opcodes by hand)."""
    import struct
    import zipfile

    def uni(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s)) + s.encode()

    def tup(xs) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"
    pid = b"(" + uni("storage") + b"ctorch\nFloatStorage\n" + uni("0") + uni("cpu") + b"K\x01tQ"
    pkl = (b"\x80\x02}" + uni("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00" + tup(shape)
           + tup(shape) + b"\x89}tRs.")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
    return path


def test_a_pickle_tensor_with_60000_dimensions_is_refused_quickly(tmp_path):
    import time

    from studio.library.detect import detect
    from studio.library.headers import HeaderError
    path = _ckpt_with_shape(tmp_path / "x.ckpt", [2**31 - 1] * 60_000)
    t0 = time.monotonic()
    with pytest.raises(HeaderError, match="dimensions"):
        detect(path)
    assert time.monotonic() - t0 < 2.0


def test_a_normal_pickle_shape_still_reads(tmp_path):
    from studio.library.headers import read_pickle
    h = read_pickle(_ckpt_with_shape(tmp_path / "x.ckpt", [4, 3]))
    assert h.tensors["w"].shape == (4, 3)


def test_a_large_gguf_metadata_array_is_not_turned_into_python_objects(tmp_path):
    import struct
    import tracemalloc

    from library_fixtures import ARRAY, STRING, U32, gguf_bytes

    from studio.library.headers import read_gguf
    count = 4_000_000
    head, _ = gguf_bytes({"general.architecture": (STRING, "llama")}, {})
    key = b"big.array"  # a second kv appended by hand: a u32 array of 4M elements (16 MB)
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", ARRAY, U32, count) + bytes(4 * count)
    prefix = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    rest = head[len(prefix):].rstrip(b"\0")
    (tmp_path / "big.gguf").write_bytes(prefix + rest + kv)
    tracemalloc.start()
    h = read_gguf(tmp_path / "big.gguf")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(h.metadata["big.array"]) == count and "not loaded" in str(h.metadata["big.array"])
    assert peak < 20_000_000, peak


# --- 5. one wrongly typed GGUF is a per-file error; scans register the good files ------------------

def _bad_llm_gguf(path, **override):
    from library_fixtures import STRING, U32, write_gguf
    kv = {"general.architecture": (STRING, "llama"), "llama.block_count": (STRING, "thirty"),
          "llama.attention.head_count": (U32, 8), "llama.embedding_length": (U32, 64),
          "llama.context_length": (U32, 2048)}
    kv.update(override)
    return write_gguf(path, kv, {"token_embd.weight": ((32, 64), "F16"), "blk.0.attn_q.weight": ((64, 64), "F16")})


@pytest.mark.parametrize("key", ["llama.block_count", "llama.attention.head_count", "llama.context_length",
                                 "llama.embedding_length"])
def test_wrongly_typed_gguf_metadata_is_a_header_error_naming_the_key(tmp_path, key):
    from library_fixtures import STRING, U32

    from studio.library.detect import detect
    from studio.library.headers import HeaderError
    over = {"llama.block_count": (U32, 2), key: (STRING, "x")}
    with pytest.raises(HeaderError, match=key.replace(".", r"\.")):
        detect(_bad_llm_gguf(tmp_path / "bad.gguf", **over))


def test_cli_info_on_a_wrongly_typed_gguf_is_one_line(home, capsys):
    from studio.cli import main
    bad = _bad_llm_gguf(home / "bad.gguf")
    assert main(["models", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "block_count" in err and err.count("\n") == 1


def test_scan_reports_a_bad_gguf_and_registers_the_good_files(lib, home):
    from studio.library.scan import scan
    folder = home / "models"
    _bad_llm_gguf(folder / "bad.gguf")
    _model(folder / "good.safetensors")
    report = scan(lib, [folder])
    assert report.added == ["good"]
    assert [p for p, _ in report.errors] == [str(folder / "bad.gguf")]
    assert "block_count" in report.errors[0][1]


# --- 7. every unreadable PNG gives one error type, PngMetadataError --------------------------------

def _png_with_text(path, text: dict):
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _png_claiming_size(path, width: int, height: int):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


CRAFTED_PNG_TEXT = {
    "comfy_inputs_not_a_dict": {"prompt": '{"1": {"class_type": "KSampler", "inputs": []}}'},
    "comfy_no_inputs": {"prompt": '{"1": {"class_type": "KSampler"}}'},
    "comfy_link_to_list": {"prompt": '{"1": {"class_type": "KSampler", "inputs": {"seed": [[1], 0]}}}'},
    "workflow_list_sampler": {"workflow": '{"nodes": [{"id": 1, "type": "KSampler", '
                                          '"widgets_values": [1, 0, 2, 3, [1], "x"]}]}'},
    "workflow_list_link": {"workflow": '{"nodes": [{"id": 1, "type": "KSampler", "inputs": '
                                       '[{"name": "positive", "link": [1]}]}], "links": [[[1], 2]]}'},
    "workflow_nodes_not_dicts": {"workflow": '{"nodes": [{"id": [], "type": "KSampler"}], "links": 5}'},
    "deep_prompt": {"prompt": "[" * 100_000 + "]" * 100_000},
    "deep_studio": {"studio": '{"a":' * 100_000 + "1" + "}" * 100_000},
}


@pytest.mark.parametrize("case", sorted(CRAFTED_PNG_TEXT))
def test_crafted_png_parameters_give_png_metadata_error_or_a_result(tmp_path, case):
    from studio.library.pngmeta import PngMetadataError, read_png_parameters
    path = _png_with_text(tmp_path / "x.png", CRAFTED_PNG_TEXT[case])
    try:
        out = read_png_parameters(path)
    except PngMetadataError as e:
        assert "parameters" in str(e) or "image" in str(e)
    else:
        assert isinstance(out, dict)


def test_a_decompression_bomb_png_is_a_png_metadata_error(tmp_path):
    from studio.library.pngmeta import PngMetadataError, read_png_parameters
    with pytest.raises(PngMetadataError, match="pixels"):
        read_png_parameters(_png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000))


def test_png_metadata_error_is_a_value_error():
    from studio.library.pngmeta import PngMetadataError
    assert issubclass(PngMetadataError, ValueError)


def test_image_tab_shows_why_a_crafted_png_cannot_be_read(qtbot, tmp_path):
    from test_image_tab import MockEngine, drag_events, make_paths

    from studio.settings import Settings
    from studio.ui import image_tab
    tab = image_tab.ImageTab(MockEngine(), make_paths(tmp_path), Settings())
    qtbot.addWidget(tab)
    path = _png_with_text(tmp_path / "c.png", CRAFTED_PNG_TEXT["comfy_no_inputs"])
    mime, _, drop = drag_events(str(path))  # the event does not own its mime data: keep it alive
    tab.dropEvent(drop)
    qtbot.waitUntil(lambda: "c.png" in tab.notice.text() or "cannot" in tab.notice.text(), timeout=3000)


# --- 9. FIFOs and other non-regular files are skipped, never opened -------------------------------

def _run_with_timeout(fn, seconds: float):
    import threading
    box = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still running after {seconds} s (blocked opening a FIFO?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_scan_skips_a_fifo_named_like_a_model(lib, home):
    from studio.library.scan import scan
    folder = home / "models"
    _model(folder / "good.safetensors")
    os.mkfifo(folder / "x.safetensors")
    os.mkfifo(folder / "blob")  # no suffix: would be sniffed for the GGUF magic
    report = _run_with_timeout(lambda: scan(lib, [folder]), 5)
    assert report.added == ["good"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_detecting_a_fifo_is_a_header_error_not_a_hang(home):
    from studio.library.detect import detect
    from studio.library.headers import HeaderError
    os.mkfifo(home / "x.gguf")
    with pytest.raises(HeaderError, match="not a regular file"):
        _run_with_timeout(lambda: detect(home / "x.gguf"), 5)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_hashing_skips_a_model_file_replaced_by_a_fifo(lib, home):
    path = _model(home / "m" / "a.safetensors")
    lib.add(path)
    path.unlink()
    os.mkfifo(path)
    _run_with_timeout(lambda: lib.hash_pending(), 5)
    assert lib.get("a").sha256 is None


# --- 12. GGUF problems in the engine are bad-model errors naming what is wrong --------------------

@pytest.fixture(scope="module")
def tiny_llama_sd():
    pytest.importorskip("gguf")
    from test_gguf import hf_llama
    return hf_llama().state_dict()


def _tiny_gguf(path, sd, *, block_count=None, extra=None, merges=None):
    """test_gguf's tiny llama file, with one thing changed."""
    import gguf
    import test_gguf as tg
    real = gguf.GGUFWriter

    class Writer(real):
        def add_block_count(self, n):
            super().add_block_count(block_count if block_count is not None else n)

        def add_token_merges(self, m):
            if merges is None:
                super().add_token_merges(m)
            else:
                self.add_array("tokenizer.ggml.merges", merges)

        def write_header_to_file(self, *a, **k):
            for key, value in (extra or {}).items():
                self.add_key_value(key, value[0], value[1])
            super().write_header_to_file(*a, **k)
    try:
        gguf.GGUFWriter = Writer
        tg.write_gguf(path, sd)
    finally:
        gguf.GGUFWriter = real
    return path


def _bad_model(path, *words):
    from studio.errors import UserError
    from studio.models.gguf_llm import load_gguf_llm
    with pytest.raises(UserError) as err:
        load_gguf_llm(path)
    assert err.value.kind == "bad_model", err.value.message
    for w in words:
        assert w in err.value.message, err.value.message


def test_a_gguf_missing_a_tensor_is_a_bad_model_naming_it(tmp_path, tiny_llama_sd):
    sd = {k: v for k, v in tiny_llama_sd.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    _bad_model(_tiny_gguf(tmp_path / "m.gguf", sd), "k_proj")


def test_a_huge_block_count_is_a_bad_model_naming_it(tmp_path, tiny_llama_sd):
    _bad_model(_tiny_gguf(tmp_path / "m.gguf", tiny_llama_sd, block_count=4_000_000_000), "block_count")


@pytest.mark.parametrize("value", ["32", 32.5])
def test_a_non_integer_alignment_is_a_bad_model(tmp_path, tiny_llama_sd, value):
    import gguf
    vtype = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.FLOAT32
    _bad_model(_tiny_gguf(tmp_path / "m.gguf", tiny_llama_sd, extra={"general.alignment": (value, vtype)}),
               "alignment")


def test_nested_arrays_where_text_belongs_are_a_bad_model(tmp_path, tiny_llama_sd):
    _bad_model(_tiny_gguf(tmp_path / "m.gguf", tiny_llama_sd, merges=[["Ġ", "t"], ["h", "e"]]), "tokenizer")


def test_arrays_nested_thousands_deep_are_a_bad_model(tmp_path, tiny_llama_sd):
    import struct
    path = _tiny_gguf(tmp_path / "m.gguf", tiny_llama_sd)
    data = bytearray(path.read_bytes())
    depth = 5000
    key = b"x.nested"
    value = struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)  # array of array ... of u32[0]
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + value
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    data[16:24] = struct.pack("<Q", n_kv + 1)
    pad = -len(kv) % 32  # keep the data section aligned: lengthen the key
    key = b"x.nested" + b"_" * pad
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + value
    path.write_bytes(bytes(data[:24]) + kv + bytes(data[24:]))
    _bad_model(path, "nest")
