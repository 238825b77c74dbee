"""Find the models users already have and register them in place.

Knows the ComfyUI `models/` layout, A1111/Forge `models/Stable-diffusion` and friends, the
Hugging Face cache, LM Studio and Ollama-style GGUF folders, but only to know where to
look: what each file *is* always comes from its header. A rescan notices files added or
removed since the last one. Symlink loops, unreadable folders and odd names are reported,
never fatal.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from studio.library.detect import detect
from studio.library.headers import WEIGHT_SUFFIXES, HeaderError
from studio.library.library import Library, LibraryError, path_stat

COMFYUI_FOLDERS = ("checkpoints", "diffusion_models", "unet", "vae", "vae_approx", "loras", "text_encoders",
                   "clip", "clip_vision", "controlnet")
A1111_FOLDERS = ("Stable-diffusion", "Lora", "VAE", "VAE-approx", "ControlNet", "text_encoder")
_MIN_BLOB = 1 << 20  # extension-less files smaller than this are never models (Ollama manifests etc.)


@dataclass
class ScanReport:
    added: list[str] = field(default_factory=list)  # names
    updated: list[str] = field(default_factory=list)  # changed on disk since the last scan
    missing: list[str] = field(default_factory=list)  # registered from these folders, now gone
    returned: list[str] = field(default_factory=list)  # were missing, now back
    unchanged: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, message)

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.missing)} missing, "
                f"{len(self.returned)} back, {self.unchanged} unchanged, {len(self.errors)} problems")


def default_locations(home: Path | None = None) -> list[Path]:
    """Folders where other tools keep models, those that exist on this machine."""
    home = home or Path.home()
    hf = Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface")) / "hub"
    candidates = [home / "ComfyUI" / "models", home / "stable-diffusion-webui" / "models",
                  home / "stable-diffusion-webui-forge" / "models", hf, home / ".lmstudio" / "models",
                  home / ".cache" / "lm-studio" / "models", home / ".ollama" / "models" / "blobs"]
    return [p for p in candidates if p.is_dir()]


def _is_model_folder(d: Path, names: set[str]) -> bool:
    if "model_index.json" in names:
        return True
    return "config.json" in names and any(n.endswith((".safetensors", ".bin", ".gguf")) for n in names)


def _is_gguf_blob(p: Path) -> bool:
    try:
        if p.stat().st_size < _MIN_BLOB:
            return False
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def iter_models(root: Path, errors: list[tuple[str, str]]) -> Iterator[Path]:
    """Model files and model folders under root. Follows links once; loops and unreadable dirs go to errors."""
    seen: set[tuple[int, int]] = set()

    def onerror(e: OSError) -> None:
        errors.append((str(e.filename), f"cannot read this folder ({e.strerror}); check its permissions"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=onerror):
        d = Path(dirpath)
        try:
            st = d.stat()
        except OSError as e:
            errors.append((dirpath, f"cannot read this folder ({e.strerror})"))
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            errors.append((dirpath, "symlink loop: this folder was already scanned; skipped"))
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        names = set(filenames)
        # A Hugging Face snapshot or a diffusers / HF model folder is one model: don't look inside.
        if _is_model_folder(d, names):
            dirnames[:] = []
            yield d
            continue
        if d.name == "snapshots" and d.parent.name.startswith("models--"):
            snaps = sorted((Path(dirpath, n) for n in dirnames), key=_mtime, reverse=True)
            dirnames[:] = [snaps[0].name] if snaps else []  # only the newest snapshot of a repo
        # HF repos keep content in blobs/ under hash names: read them through snapshots/ instead.
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and n != "refs"
                             and not (n == "blobs" and d.name.startswith("models--")))
        for name in sorted(filenames):
            p = d / name
            if name.startswith(".") or not _is_regular(p):
                continue  # a FIFO named x.safetensors would block the scan (and the watcher) on open
            if p.suffix.lower() in WEIGHT_SUFFIXES or (not p.suffix and _is_gguf_blob(p)):
                if p.suffix.lower() == ".bin" and "config.json" not in names and not _is_torch_zip(p):
                    continue  # stray .bin files (tokenizers, optimizer state) are not models
                yield p


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return False


def _is_torch_zip(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def scan(library: Library, roots: list[Path | str],
         progress: Callable[[int, str], None] | None = None) -> ScanReport:
    """Register every model under roots in place; mark ones registered from there before but now gone."""
    report = ScanReport()
    for root in (Path(r).expanduser() for r in roots):
        if not root.is_dir():
            report.errors.append((str(root), "not a folder; pass the folder that holds your models"))
            continue
        source = str(root.resolve())
        found: set[str] = set()
        for i, p in enumerate(iter_models(root, report.errors)):
            if progress:
                progress(i, str(p))
            _register(library, p, source, found, report)
        for e in library.list():
            inside = e.source == source or str(e.path).startswith(source + os.sep)
            if not inside or str(e.path) in found:
                continue
            if not e.path.exists() and not e.missing:
                report.missing.append(e.name)
                library.set_missing([e.id], True)
        if not found and not report.errors:
            report.errors.append((str(root), "no model files found here (.safetensors, .gguf, .ckpt, .pt, "
                                             "model folders)"))
    return report


def _register(library: Library, p: Path, source: str, found: set[str], report: ScanReport) -> None:
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        report.errors.append((repr(str(p)), "file name is not valid UTF-8; rename it to register it"))
        return
    try:
        canonical = str(p.resolve())
    except (OSError, RuntimeError) as e:
        report.errors.append((str(p), f"cannot resolve this path ({e})"))
        return
    found.add(canonical)
    existing = library.get(canonical)
    try:
        if existing is None:
            det = detect(p)
            name = None
            if p.name.startswith("sha256") and det.format == "gguf":
                name = _gguf_name(p)  # Ollama blobs are named by hash; the GGUF says what it is
            e = library.add(p, "inplace", detection=det, source=source, name=name)
            report.added.append(e.name)
            return
        size, mtime = path_stat(existing.path)
        if existing.missing:
            library.set_missing([existing.id], False)
            report.returned.append(existing.name)
        if (size, mtime) != (existing.size, existing.mtime):
            library.update_detection(existing.id, detect(p))
            report.updated.append(existing.name)
        elif not existing.missing:
            report.unchanged += 1
    except (HeaderError, LibraryError) as err:
        report.errors.append((str(p), str(err)))
    except OSError as err:
        report.errors.append((str(p), f"cannot read ({err.strerror or err})"))


def _gguf_name(p: Path) -> str | None:
    from studio.library.headers import read_gguf

    try:
        name = read_gguf(p).metadata.get("general.name")
    except HeaderError:
        return None
    return name if isinstance(name, str) and name.strip() else None
