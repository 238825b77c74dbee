"""The model library (SQLite) and folder scanning, on header-only sparse files."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections import namedtuple
from pathlib import Path

import pytest
from library_fixtures import SAFETENSORS_CASES, STRING, write_gguf, write_safetensors

from studio.library.headers import HeaderError
from studio.library.library import Library, LibraryError
from studio.library.scan import ScanReport, scan
from studio.paths import Paths


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def lib(home):
    with Library() as library:
        yield library


def model(path: Path, case: str = "sd15_ldm") -> Path:
    return write_safetensors(path, SAFETENSORS_CASES[case][0])


def small(path: Path, case: str = "vae_sd", fill: bytes = b"") -> Path:
    """A real small file (hashing a sparse 4 GB file would read 4 GB of zeros)."""
    shapes = {"encoder.conv_in.weight": (8, 3, 3, 3), "encoder.conv_out.weight": (8, 8, 3, 3),
              "decoder.conv_out.weight": (3, 8, 3, 3)}
    p = write_safetensors(path, shapes)
    if fill:
        with open(p, "r+b") as f:
            f.seek(-len(fill), os.SEEK_END)
            f.write(fill)
    return p


# --- the database ------------------------------------------------------------------------------

def test_library_lives_in_the_data_folder_with_wal_and_a_schema_version(lib):
    assert lib.db_path == Paths.default().data / "library.db"
    db = sqlite3.connect(lib.db_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_library_persists_across_reopen(home):
    f = model(home / "a" / "sd15.safetensors")
    with Library() as lib:
        lib.add(f, family=None, tags=["fav"])
        lib.override_family("sd15", "sd2")
    with Library() as lib:
        (e,) = lib.list()
        assert (e.name, e.family, e.effective_family, e.role, e.tags) == ("sd15", "sd1", "sd2", "checkpoint", ["fav"])
        assert e.path == f.resolve() and e.size == f.stat().st_size and e.mode == "inplace"
        assert e.detection["markers"]


def test_list_by_role_get_and_resolve(lib, home):
    lib.add(model(home / "m" / "ckpt.safetensors"))
    lib.add(model(home / "m" / "lora.safetensors", "lora_kohya_sdxl"))
    assert [e.name for e in lib.list(role="lora")] == ["lora"]
    assert lib.get("ckpt").role == "checkpoint"
    assert lib.resolve("ckpt") == (home / "m" / "ckpt.safetensors").resolve()
    assert lib.resolve(str(home / "m" / "lora.safetensors")) == (home / "m" / "lora.safetensors").resolve()
    with pytest.raises(LibraryError, match="no model named 'nope'"):
        lib.resolve("nope")


def test_resolve_a_model_whose_file_is_gone_says_so(lib, home):
    f = model(home / "m" / "gone.safetensors")
    lib.add(f)
    f.unlink()
    with pytest.raises(LibraryError, match="is gone.*rescan"):
        lib.resolve("gone")


def test_adding_twice_is_refused_and_same_stem_gets_a_unique_name(lib, home):
    a = model(home / "x" / "model.safetensors")
    lib.add(a)
    with pytest.raises(LibraryError, match="already in the library as 'model'"):
        lib.add(a)
    assert lib.add(a, exist_ok=True).name == "model"
    b = lib.add(model(home / "y" / "model.safetensors"))
    assert b.name == "model-2"


def test_bad_file_raises_and_leaves_library_unchanged(lib, home):
    bad = home / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(HeaderError):
        lib.add(bad)
    assert lib.list() == []
    assert bad.read_bytes() == b"\xff" * 64


def test_unrecognised_file_can_be_added_with_a_family(lib, home):
    f = write_safetensors(home / "odd.safetensors", {"foo.weight": (2, 2)})
    e = lib.add(f, family="sdxl")
    assert (e.role, e.family, e.effective_family) == ("unknown", "unknown", "sdxl")


def test_odd_file_names_are_fine(lib, home):
    for name in ("with space.safetensors", "ünïcödé 模型.safetensors", "quote'\"and;semicolon.safetensors",
                 "new\nline.safetensors"):
        lib.add(model(home / "odd" / name))
    assert len(lib.list()) == 4
    assert lib.resolve("ünïcödé 模型").name == "ünïcödé 模型.safetensors"


def test_duplicates_are_found_by_sha256_in_the_background(lib, home):
    lib.add(small(home / "a" / "one.safetensors", fill=b"same"))
    lib.add(small(home / "b" / "two.safetensors", fill=b"same"))
    lib.add(small(home / "c" / "three.safetensors", fill=b"diff"))
    seen = []
    thread, _stop = lib.start_hashing(lambda name, frac: seen.append((name, frac)))
    thread.join(10)
    assert not thread.is_alive()
    assert {n for n, _ in seen} == {"one", "two", "three"} and all(f == 1.0 for n, f in seen if f == 1.0)
    (group,) = lib.find_duplicates()
    assert sorted(e.name for e in group) == ["one", "two"]
    import hashlib
    assert group[0].sha256 == hashlib.sha256((home / "a" / "one.safetensors").read_bytes()).hexdigest()


def test_remove_never_deletes_an_in_place_file_unless_asked(lib, home):
    f = model(home / "keep.safetensors")
    lib.add(f)
    lib.remove("keep")
    assert f.exists() and lib.list() == []
    lib.add(f)
    lib.remove("keep", delete_file=True)
    assert not f.exists()


def test_copy_is_atomic_never_overwrites_and_reports_progress(lib, home):
    src = small(home / "src" / "vae.safetensors", fill=b"abcd")
    dest_dir = Paths.default().models / "vae"
    dest_dir.mkdir(parents=True)
    (dest_dir / "vae.safetensors").write_bytes(b"someone else's file")
    stages = []
    e = lib.add(src, mode="copy", progress=lambda f, s: stages.append(s))
    assert e.path == dest_dir / "vae-2.safetensors" and e.path.read_bytes() == src.read_bytes()
    assert (dest_dir / "vae.safetensors").read_bytes() == b"someone else's file"
    assert "copying" in stages and stages[-1] == "added"
    assert not [p for p in dest_dir.iterdir() if ".partial" in p.name]
    assert src.exists()


def test_copy_to_a_full_disk_refuses_cleanly(lib, home, monkeypatch):
    shapes = {**SAFETENSORS_CASES["sd15_ldm"][0], "model_ema.big": (50000, 50000)}
    src = write_safetensors(home / "src" / "big.safetensors", shapes)  # 5 GB declared, sparse
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 << 30, 10 << 30, 1 << 30))
    with pytest.raises(LibraryError, match="not enough free space.*register the model in place"):
        lib.add(src, mode="copy")
    assert lib.list() == []
    assert not any(p.is_file() for p in Paths.default().models.rglob("*"))


def test_link_mode_links_and_remove_drops_only_the_link(lib, home):
    src = model(home / "src" / "l.safetensors", "lora_kohya_flux")
    e = lib.add(src, mode="link")
    assert e.path.is_symlink() and e.path.parent.name == "loras"
    lib.remove(e.name)
    assert not e.path.exists() and src.exists()


def test_read_only_library_folder_gives_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    target = Path("/proc") if os.geteuid() == 0 else ro  # root ignores permission bits; /proc refuses anyone
    try:
        with pytest.raises(LibraryError, match="cannot open the model library.*writable"):
            Library(target / "library.db", tmp_path / "models")
    finally:
        ro.chmod(0o755)


def test_copy_into_an_unwritable_models_folder_changes_nothing(home):
    src = small(home / "src" / "v.safetensors")
    with Library(home / "db" / "library.db", Path("/proc/studio-models")) as lib:
        with pytest.raises(LibraryError, match="register the model in place"):
            lib.add(src, mode="copy")
        assert lib.list() == []


# --- scanning ----------------------------------------------------------------------------------

def comfy_tree(root: Path) -> Path:
    m = root / "ComfyUI" / "models"
    model(m / "checkpoints" / "sd15.safetensors")
    model(m / "diffusion_models" / "flux1-dev.safetensors", "flux_dev")
    model(m / "vae" / "ae.safetensors", "vae_flux")
    model(m / "loras" / "style.safetensors", "lora_kohya_sdxl")
    model(m / "text_encoders" / "t5xxl_fp16.safetensors", "t5xxl")
    model(m / "clip" / "clip_l.safetensors", "clip_l")
    model(m / "controlnet" / "canny.safetensors", "controlnet_sd15_ldm")
    write_gguf(m / "unet" / "flux-q8.gguf", {"general.architecture": (STRING, "flux")},
               {"double_blocks.0.img_attn.norm.key_norm.scale": ((128,), "F32"), "img_in.weight": ((3072, 64), "F16")})
    (m / "configs").mkdir()
    (m / "configs" / "v1-inference.yaml").write_text("model: {}")
    return m


def test_scan_comfyui_tree_registers_in_place_and_notices_added_and_removed(lib, home):
    m = comfy_tree(home)
    r = scan(lib, [m])
    assert not r.errors, r.errors
    roles = {e.name: (e.role, e.effective_family) for e in lib.list()}
    assert roles == {"sd15": ("checkpoint", "sd1"), "flux1-dev": ("diffusion_model", "flux"),
                     "ae": ("vae", "vae-16ch"), "style": ("lora", "sdxl"), "t5xxl_fp16": ("text_encoder", "t5"),
                     "clip_l": ("text_encoder", "clip-l"), "canny": ("controlnet", "sd1"),
                     "flux-q8": ("diffusion_model", "flux")}
    assert all(e.mode == "inplace" for e in lib.list())

    (m / "loras" / "style.safetensors").unlink()
    model(m / "loras" / "new.safetensors", "lora_peft_flux")
    r = scan(lib, [m])
    assert (r.added, r.missing, r.unchanged) == (["new"], ["style"], 7)
    assert lib.get("style").missing and not lib.get("new").missing
    assert [e.name for e in lib.list(include_missing=False, role="lora")] == ["new"]

    model(m / "loras" / "style.safetensors", "lora_kohya_sdxl")
    r = scan(lib, [m])
    assert r.returned == ["style"] and not lib.get("style").missing


def test_scan_a1111_tree(lib, home):
    m = home / "stable-diffusion-webui" / "models"
    model(m / "Stable-diffusion" / "sdxl_base.safetensors", "sdxl_base_ldm")
    model(m / "Lora" / "detail.safetensors", "lora_kohya_sd15")
    model(m / "VAE" / "sdxl_vae.safetensors", "vae_sd")
    model(m / "ControlNet" / "cn.safetensors", "controlnet_sdxl_diffusers")
    r = scan(lib, [m])
    assert len(r.added) == 4 and not r.errors
    assert {(e.role, e.effective_family) for e in lib.list()} == {
        ("checkpoint", "sdxl"), ("lora", "sd1"), ("vae", "vae-kl-f8"), ("controlnet", "sdxl")}


def test_scan_hf_cache_lm_studio_and_ollama_folders(lib, home):
    snap = home / "hf" / "hub" / "models--Org--Tiny-LLM" / "snapshots" / "abc123"
    blobs = home / "hf" / "hub" / "models--Org--Tiny-LLM" / "blobs"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "cfg").write_text('{"model_type": "qwen3", "num_hidden_layers": 1}')
    write_safetensors(blobs / "w1", {"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4)})
    (snap / "config.json").symlink_to("../../blobs/cfg")
    (snap / "model.safetensors").symlink_to("../../blobs/w1")
    gguf = {"general.architecture": (STRING, "gemma3"), "general.name": (STRING, "Gemma Tiny")}
    tensors = {"token_embd.weight": ((2048, 512), "F16")}  # > 1 MiB so an extension-less blob is considered
    write_gguf(home / ".lmstudio" / "models" / "pub" / "repo" / "tiny-Q8_0.gguf", gguf, tensors)
    write_gguf(home / ".ollama" / "models" / "blobs" / "sha256-0123abcd", gguf, tensors)
    (home / ".ollama" / "models" / "manifests").mkdir(parents=True)
    (home / ".ollama" / "models" / "manifests" / "x").write_text("{}")
    r = scan(lib, [home / "hf" / "hub", home / ".lmstudio" / "models", home / ".ollama" / "models"])
    assert not r.errors, r.errors
    got = {e.name: (e.role, e.family, e.format) for e in lib.list()}
    assert got == {"Tiny-LLM": ("llm", "qwen3", "hf"), "tiny-Q8_0": ("llm", "gemma3", "gguf"),
                   "Gemma Tiny": ("llm", "gemma3", "gguf")}


def test_scan_survives_symlink_loops_unreadable_dirs_and_non_utf8_names(lib, home, monkeypatch):
    m = home / "models"
    model(m / "a" / "ok.safetensors")
    (m / "a" / "loop").symlink_to(m)
    (m / "locked").mkdir()
    os.makedirs(m, exist_ok=True)
    with open(os.fsencode(str(m)) + b"/bad\xff.safetensors", "wb") as f:
        f.write(b"x")
    real_scandir = os.scandir

    def scandir(path="."):  # root can read anything, so simulate a permission error
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    r = scan(lib, [m])
    assert r.added == ["ok"]
    msgs = " | ".join(msg for _, msg in r.errors)
    assert "symlink loop" in msgs and "cannot read this folder" in msgs and "not valid UTF-8" in msgs


def test_scan_of_a_folder_without_models_says_so(lib, home):
    (home / "empty" / "sub").mkdir(parents=True)
    (home / "empty" / "notes.txt").write_text("hi")
    r = scan(lib, [home / "empty", home / "does-not-exist"])
    assert isinstance(r, ScanReport) and lib.list() == []
    msgs = [m for _, m in r.errors]
    assert any("no model files found" in m for m in msgs) and any("not a folder" in m for m in msgs)


def test_rescan_notices_a_changed_file(lib, home):
    f = model(home / "m" / "x.safetensors")
    scan(lib, [home / "m"])
    model(f, "flux_dev")  # replaced in place by a different model
    os.utime(f, (1, 1))
    r = scan(lib, [home / "m"])
    assert r.updated == ["x"] and lib.get("x").family == "flux" and lib.get("x").sha256 is None


# --- the `studio models` command -----------------------------------------------------------------

def cli(*argv: str) -> int:
    from studio.cli.models import main
    return main(list(argv))


def test_cli_info_prints_family_role_params_estimates_and_markers(home, capsys):
    from library_fixtures import smollm2_gguf
    assert cli("info", str(smollm2_gguf())) == 0
    out = capsys.readouterr().out
    assert "family:      llama" in out and "role:        llm" in out and "dtype:       Q4_1" in out
    assert "parameters:  134.5M" in out and "VRAM to run" in out and "general.architecture=llama" in out


def test_cli_info_json_is_one_object(home, capsys):
    import json
    f = model(home / "flux.safetensors", "flux_dev")
    assert cli("info", str(f), "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["family"], d["variant"], d["role"]) == ("flux", "dev", "diffusion_model")


def test_cli_add_list_remove_round_trip(home, capsys):
    import json
    f = model(home / "m" / "sd.safetensors")
    assert cli("add", str(f), "--family", "sd2") == 0
    assert cli("list", "--json") == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    (entry,) = [e for e in json.loads(out)["models"] if e["source"] != "bundled"]  # the bundled chat model is listed too
    assert entry["name"] == "sd" and entry["effective_family"] == "sd2"
    assert cli("list", "--role", "lora") == 0
    assert "no models yet" in capsys.readouterr().out
    assert cli("list") == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:5] == ["NAME", "FAMILY", "VARIANT", "ROLE", "SIZE"] and "sd2" in table
    assert cli("remove", "sd") == 0
    assert f.exists() and "file kept" in capsys.readouterr().out


def test_cli_errors_are_one_line_on_stderr_with_exit_code_2(home, capsys):
    bad = home / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")  # header length larger than the file
    assert cli("info", str(bad)) == 2
    err = capsys.readouterr().err
    assert err.startswith("studio models: ") and err.count("\n") == 1
    assert cli("remove", "nothing") == 2
    assert "no model named 'nothing'" in capsys.readouterr().err
    assert cli("scan", str(home / "nope")) == 2
    assert cli("add", str(home / "missing.gguf")) == 2


def test_cli_scan_reports_what_it_found(home, capsys):
    m = comfy_tree(home)
    assert cli("scan", str(m)) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 added") and "  + sd15" in out


def test_scanning_a_diffusers_folder_registers_it_as_one_model(lib, home):
    import json
    root = home / "sdxl-diffusers"
    (root / "unet").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (root / "unet" / "config.json").write_text("{}")
    (root / "vae" / "config.json").write_text('{"scaling_factor": 0.13025}')
    model(root / "unet" / "diffusion_pytorch_model.safetensors", "sdxl_unet_diffusers")
    model(root / "vae" / "diffusion_pytorch_model.safetensors", "vae_sd")
    for folder in (root, home):
        r = scan(lib, [folder])
        assert not r.errors, r.errors
        assert [(e.name, e.role, e.format) for e in lib.list()] == [("sdxl-diffusers", "checkpoint", "diffusers")]
