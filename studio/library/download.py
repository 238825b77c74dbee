"""Getting models: Hugging Face repositories and direct URLs, resumable, checked, installed into the library.

The hub is spoken to through huggingface_hub (so HF_ENDPOINT, HF_TOKEN and its retries apply): the
repository's file list with sizes and LFS sha256 (HfApi.model_info), each file's location
(get_hf_file_metadata) and the transfer itself (http_get, which resumes with a Range request after a
dropped connection). Files grow as `<name>.part` in a staging folder inside the models folder, so an
interrupted pull (Ctrl+C, a crash, a network gone for good) resumes from there the next time; a
cancelled one can discard them. Only a complete, verified file is moved into place and registered.
Torch-free: the window and the CLI both use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from studio.library.library import Library, LibraryError, ModelEntry, sha256_of

STAGING = ".downloads"  # inside the models folder: same disk, so finishing is a rename
DISK_MARGIN = 512 << 20  # left free after a download: a full disk breaks more than the download
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".ot", ".gguf", ".mlmodel")
FOLDER_MARKERS = ("config.json", "model_index.json")
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth")


class DownloadError(Exception):
    """A pull that cannot go on. `kind`: gated, not_found, choose, disk_full, checksum, network, cancelled."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class RemoteFile:
    path: str  # in the repository (or the file name of a URL)
    size: int | None
    sha256: str | None = None  # LFS files: the hub's checksum
    git_sha1: str | None = None  # small (non-LFS) files: their git blob id
    url: str = ""  # direct URLs only


@dataclass
class PullPlan:
    """What one pull fetches and where it goes (`name`: folder or file name under the models folder)."""

    source: str  # "hf" or "url"
    repo: str
    revision: str
    files: list[RemoteFile]
    folder: bool  # a whole model folder (diffusers, HF LLM) rather than one file
    name: str
    gated: bool = False

    @property
    def total(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass
class Progress:
    """One progress report: bytes done of total (None: unknown), speed in bytes/s, seconds left, current file."""

    done: int
    total: int | None
    speed: float
    eta: float | None
    file: str
    stage: str = "downloading"  # or "verifying", "installing"


@dataclass
class _Meter:
    """Speed over the last few seconds (a sliding window), so a stall shows at once."""

    total: int | None
    callback: Callable[[Progress], None] | None
    cancel: threading.Event | None
    done: int = 0
    samples: list = field(default_factory=list)
    file: str = ""

    def add(self, n: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadError("cancelled", "download cancelled")
        self.done += n
        now = time.monotonic()
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5.0:
            self.samples.pop(0)
        t0, d0 = self.samples[0]
        speed = (self.done - d0) / (now - t0) if now > t0 else 0.0
        eta = (self.total - self.done) / speed if self.total and speed > 0 else None
        if self.callback is not None:
            self.callback(Progress(self.done, self.total, speed, eta, self.file))


class _Bar:
    """What http_get needs of a tqdm bar: it counts bytes into the meter (and raises there on cancel)."""

    def __init__(self, meter: _Meter, **_: Any) -> None:
        self.meter = meter

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int | float = 1) -> None:
        self.meter.add(int(n))


# ---------------------------------------------------------------------------------------------
# Planning

def parse_source(spec: str) -> tuple[str, str, str]:
    """"owner/name", "owner/name/path/to/file", an https URL of a hub file, or any URL ->
    ("hf", repo, file or "") or ("url", url, "")."""
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        u = urlparse(spec)
        endpoint = urlparse(hub_endpoint())
        parts = [unquote(p) for p in u.path.strip("/").split("/")]
        if u.netloc == endpoint.netloc:  # a repository page or a file link on the hub itself
            if len(parts) >= 5 and parts[2] in ("resolve", "blob"):
                return "hf", "/".join(parts[:2]), "/".join(parts[4:])
            if len(parts) == 2 or (len(parts) > 2 and parts[2] == "tree"):
                return "hf", "/".join(parts[:2]), ""
        return "url", spec, ""
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise DownloadError("not_found", f"{spec!r} is neither a Hugging Face repository (owner/name, or "
                            "owner/name/FILE) nor a URL")
    return "hf", "/".join(parts[:2]), "/".join(parts[2:])


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed request raises: huggingface_hub's HTTP errors and its HTTP client's (httpx, or the
    httpx2 of newer hub releases), OSError for the socket and the file, ValueError for a bad size."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    out: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError]
    for name in ("httpx", "httpx2"):
        try:
            out.append(importlib.import_module(name).HTTPError)
        except ModuleNotFoundError:
            continue
    return tuple(out)


def _hub_error(exc: BaseException, repo: str, token: str | None) -> DownloadError:
    """huggingface_hub's errors -> what the user does about them."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{hub_endpoint()}/{repo}"
    how_token = (f"give a token with read access: set HF_TOKEN or pass --token (make one at "
                 f"{hub_endpoint()}/settings/tokens)")
    if isinstance(exc, GatedRepoError):
        if token:
            return DownloadError("gated", f"{repo} is gated and this token has no access yet: open {page}, log in "
                                 "as the token's owner and accept the licence conditions (some need the authors' "
                                 "approval), then pull again.")
        return DownloadError("gated", f"{repo} is gated: open {page}, log in and accept its licence conditions, "
                             f"then {how_token}.")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError("not_found", f"No repository {repo} on {hub_endpoint()} (or it is private: {how_token}).")
    if isinstance(exc, (EntryNotFoundError, RevisionNotFoundError)):
        return DownloadError("not_found", f"{repo} has no such file or revision ({exc}). Its files are listed at "
                             f"{page}/tree/main.")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return DownloadError("gated", f"{hub_endpoint()} refused access to {repo} ({status}): accept its licence at "
                             f"{page} and {how_token}.")
    return DownloadError("network", f"Could not reach {hub_endpoint()} for {repo}: {exc}. Check the connection; "
                         "pull again to resume.")


def plan_hub(repo: str, file: str = "", revision: str = "main", token: str | None = None) -> PullPlan:
    """List the repository (sizes and checksums) and decide what to fetch: `file`, the repository's only
    weight file, or the whole model folder; a repository of several single-file models asks for a choice."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=hub_endpoint(), token=token or None).model_info(repo, revision=revision,
                                                                            files_metadata=True)
    except _transport_errors() as exc:
        raise _hub_error(exc, repo, token) from None
    files = {s.rfilename: RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None,
                                     None if s.lfs else s.blob_id) for s in info.siblings or []}
    commit = info.sha or revision
    gated = bool(getattr(info, "gated", False))
    if file:
        wanted = [f for p, f in files.items() if p == file or p.startswith(file.rstrip("/") + "/")]
        if not wanted:
            raise DownloadError("not_found", f"{repo} has no file {file!r}. Its files: "
                                f"{', '.join(sorted(files)[:12])}{' ...' if len(files) > 12 else ''}")
        folder = len(wanted) > 1
        name = repo.replace("/", "--") + ("--" + file.strip("/").replace("/", "--") if folder else "")
        if not folder:
            name = Path(wanted[0].path).name
        return PullPlan("hf", repo, commit, wanted, folder, name, gated)
    if any(m in files for m in FOLDER_MARKERS):
        has_safetensors = any(p.endswith(".safetensors") for p in files)
        keep = [f for p, f in files.items() if "/" not in p or p.split("/")[0] not in ("onnx", "flax", "openvino")]
        if has_safetensors:
            keep = [f for f in keep if not f.path.endswith(SKIP_SUFFIXES)]
        keep = [f for f in keep if not f.path.endswith((".md", ".png", ".jpg", ".gitattributes"))]
        return PullPlan("hf", repo, commit, keep, True, repo.replace("/", "--"), gated)
    weights = [f for p, f in files.items() if p.endswith(WEIGHT_SUFFIXES)]
    if len(weights) == 1:
        return PullPlan("hf", repo, commit, weights, False, Path(weights[0].path).name, gated)
    if not weights:
        raise DownloadError("not_found", f"{repo} holds no model files Studio knows (.safetensors, .gguf).")
    listing = "\n".join(f"  {repo}/{f.path}  ({_gb(f.size)})" for f in sorted(weights, key=lambda f: f.path)[:30])
    raise DownloadError("choose", f"{repo} holds {len(weights)} model files; pull one of them:\n{listing}")


def plan_url(url: str, token: str | None = None) -> PullPlan:
    """A direct link (Civitai and others): its size and file name from a HEAD request, following redirects."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.head(url, headers=headers, follow_redirects=True, timeout=30)
    except httpx.HTTPError as exc:
        raise DownloadError("network", f"Could not reach {url}: {exc}") from None
    if r.status_code in (401, 403):
        raise DownloadError("gated", f"{urlparse(url).netloc} refused the download ({r.status_code}): the file needs "
                            "an account or accepted terms. Log in on the site, then give its API token with --token.")
    if r.status_code == 404:
        raise DownloadError("not_found", f"Nothing at {url} (404).")
    if r.status_code >= 400:
        raise DownloadError("network", f"{url} answered {r.status_code}; try again later.")
    size = int(r.headers["Content-Length"]) if r.headers.get("Content-Length", "").isdigit() else None
    name = _disposition_name(r.headers.get("Content-Disposition", "")) or Path(unquote(urlparse(str(r.url)).path)).name
    if not name or name in (".", "/"):
        raise DownloadError("not_found", f"{url} does not name a file; give the link of the file itself.")
    return PullPlan("url", url, "", [RemoteFile(name, size, url=url)], False, Path(name).name)


def _disposition_name(value: str) -> str:
    for part in value.split(";"):
        key, _, v = part.strip().partition("=")
        if key.lower() in ("filename", "filename*"):
            v = v.strip().strip('"')
            return unquote(v.split("''", 1)[-1]) if key.lower() == "filename*" else v
    return ""


def _gb(size: int | None) -> str:
    from studio.units import fmt_bytes

    return fmt_bytes(size) if size is not None else "size unknown"


# ---------------------------------------------------------------------------------------------
# Fetching

def check_disk(plan: PullPlan, models_dir: Path, already: int = 0) -> None:
    """Refuse before downloading when the disk cannot hold what is left to fetch (plus a margin)."""
    need = max(0, plan.total - already)
    models_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(models_dir).free
    if need + DISK_MARGIN > free:
        raise DownloadError("disk_full", f"{plan.name} needs {_gb(need)} more but {models_dir} has {_gb(free)} free "
                            f"(and {_gb(DISK_MARGIN)} should stay free). Free some space or choose another "
                            "models folder in Settings.")


def staging_dir(models_dir: Path, plan: PullPlan) -> Path:
    key = hashlib.sha256(f"{plan.source}:{plan.repo}:{plan.revision}:{plan.name}".encode()).hexdigest()[:16]
    return models_dir / STAGING / f"{plan.name}-{key}"


def pull(spec: str, library: Library, token: str | None = None, progress: Callable[[Progress], None] | None = None,
         cancel: threading.Event | None = None, discard_on_cancel: bool = False) -> ModelEntry:
    """Download `spec` (see parse_source) into the library's models folder and register it.

    Resumes what an earlier pull of the same thing left. On cancel (`cancel` set) the partial files stay
    for the next pull unless `discard_on_cancel`. Raises DownloadError with what to do."""
    token = token or os.environ.get("HF_TOKEN") or None
    kind, what, file = parse_source(spec)
    plan = plan_hub(what, file, token=token) if kind == "hf" else plan_url(what, token)
    return fetch(plan, library, token, progress, cancel, discard_on_cancel)


def fetch(plan: PullPlan, library: Library, token: str | None = None,
          progress: Callable[[Progress], None] | None = None, cancel: threading.Event | None = None,
          discard_on_cancel: bool = False) -> ModelEntry:
    models_dir = Path(library.models_dir)
    stage = staging_dir(models_dir, plan)
    stage.mkdir(parents=True, exist_ok=True)
    _check_stage(stage, plan)
    parts = {f.path: stage / (f.path + ".part") for f in plan.files}
    have = sum(p.stat().st_size for p in parts.values() if p.exists())
    have += sum(f.size or 0 for f in plan.files if (stage / f.path).exists())
    check_disk(plan, models_dir, have)
    meter = _Meter(plan.total or None, progress, cancel)
    try:
        for f in plan.files:
            meter.file = f.path
            _fetch_file(plan, f, stage, meter, token)
    except DownloadError as exc:
        if exc.kind == "cancelled" and discard_on_cancel:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    if progress is not None:
        progress(Progress(meter.done, meter.total, 0.0, 0.0, plan.name, "installing"))
    dest = _free_dest(models_dir / plan.name)
    if plan.folder:
        (stage / "plan.json").unlink(missing_ok=True)
        stage.rename(dest)
    else:
        (stage / plan.files[0].path).rename(dest)
        shutil.rmtree(stage, ignore_errors=True)
    source = f"hf:{plan.repo}@{plan.revision}" if plan.source == "hf" else plan.repo
    return library.add(dest, source=source, exist_ok=True)


def _check_stage(stage: Path, plan: PullPlan) -> None:
    """Parts of a different remote file (same name, new upload) are not resumed."""
    record = stage / "plan.json"
    now = {f.path: [f.size, f.sha256 or f.git_sha1] for f in plan.files}
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError):
        before = None
    if before is not None and before != now:
        for p in stage.rglob("*.part"):
            p.unlink()
    record.write_text(json.dumps(now))


def _fetch_file(plan: PullPlan, f: RemoteFile, stage: Path, meter: _Meter, token: str | None) -> None:
    from huggingface_hub.file_download import http_get

    final = stage / f.path
    if final.exists():  # finished and verified in an earlier run
        meter.add(final.stat().st_size)
        return
    part = stage / (f.path + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    resume = part.stat().st_size if part.exists() else 0
    if f.size is not None and resume > f.size:
        part.unlink()
        resume = 0
    if resume:
        meter.add(resume)
    try:
        if plan.source == "hf":
            from huggingface_hub import get_hf_file_metadata, hf_hub_url
            from huggingface_hub.utils import build_hf_headers

            headers = build_hf_headers(token=token or None)
            url = hf_hub_url(plan.repo, f.path, revision=plan.revision, endpoint=hub_endpoint())
            meta = get_hf_file_metadata(url, token=token or None, endpoint=hub_endpoint())
            url = meta.location or url
            size = f.size if f.size is not None else meta.size
        else:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            url, size = f.url, f.size
        if size is None or resume < size:
            with open(part, "ab") as fh:
                http_get(url, fh, resume_size=resume, headers=headers, expected_size=size,
                         displayed_filename=f.path, tqdm_class=functools.partial(_Bar, meter))  # type: ignore[arg-type]
    except DownloadError:
        raise
    except _transport_errors() as exc:
        if plan.source == "hf":
            raise _hub_error(exc, plan.repo, token) from None
        raise DownloadError("network", f"Download of {f.path} stopped: {exc}. Pull again to resume.") from None
    _verify(part, f, meter)
    part.rename(final)


def _verify(part: Path, f: RemoteFile, meter: _Meter) -> None:
    """The hub's checksum (LFS sha256, or the git blob id of a small file) against what arrived."""
    if f.size is not None and part.stat().st_size != f.size:
        part.unlink()
        raise DownloadError("checksum", f"{f.path} arrived with {part.stat().st_size if part.exists() else 0} bytes "
                            f"instead of {f.size}; pull again.")
    if f.sha256:
        if meter.callback is not None:
            meter.callback(Progress(meter.done, meter.total, 0.0, None, f.path, "verifying"))
        try:
            got = sha256_of(part, stop=meter.cancel)
        except LibraryError:  # stopped by the cancel event
            raise DownloadError("cancelled", "download cancelled") from None
        want = f.sha256.lower()
    elif f.git_sha1:
        h = hashlib.sha1(f"blob {part.stat().st_size}\0".encode())
        h.update(part.read_bytes())
        got, want = h.hexdigest(), f.git_sha1.lower()
    else:
        return
    if got != want:
        part.unlink()
        raise DownloadError("checksum", f"{f.path} does not match the checksum the hub gives ({want[:12]}…, got "
                            f"{got[:12]}…): it was damaged on the way and has been deleted. Pull again.")


def _free_dest(dest: Path) -> Path:
    n = 2
    candidate = dest
    while candidate.exists():
        candidate = dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
        n += 1
    return candidate
