"""`studio models pull` against a local imitation of the Hugging Face hub's file endpoints (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from library_fixtures import SAFETENSORS_CASES, write_safetensors

from studio.library import download
from studio.library.download import DownloadError, pull
from studio.library.library import Library

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GOOD_TOKEN = "hf_goodtoken"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class Hub:
    """Repositories of files, served the way huggingface.co serves them, with faults on request."""

    def __init__(self, tmp: Path) -> None:
        lora = write_safetensors(tmp / "src" / "style.safetensors", SAFETENSORS_CASES["lora_kohya_sdxl"][0]).read_bytes()
        self.repos: dict[str, dict[str, bytes]] = {
            "acme/tiny-lora": {"style.safetensors": lora, "README.md": b"# a style\n"},
            "acme/gated": {"style.safetensors": lora},
            "acme/corrupt": {"style.safetensors": lora},
            "acme/many": {"a-Q4_K_M.gguf": b"GGUF" + b"\0" * 60, "a-Q8_0.gguf": b"GGUF" + b"\1" * 60},
        }
        self.lfs = {"style.safetensors", "a-Q4_K_M.gguf", "a-Q8_0.gguf"}
        self.gated = {"acme/gated"}
        self.drop_once: set[str] = set()  # paths whose next GET stops halfway
        self.down = 0  # this many GETs of files answer 500 (an outage)
        self.down_after_drop = 0  # an outage of this many GETs begins when a connection drops
        self.stall: threading.Event | None = None  # file bodies stop halfway until this is set
        self.log: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path_end: str) -> list[str]:
        return [r for m, p, r in self.log if m == "GET" and p.endswith(path_end)]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                hub.log.append((self.command, path, self.headers.get("Range", "")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                    return self._info("/".join(parts[2:4]))
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file("/".join(parts[:2]), "/".join(parts[4:]))
                if parts == ["api", "download", "models", "1234"]:  # a Civitai-style link: redirect to the CDN
                    return self._send(302, headers={"Location": "/cdn/blob?sig=abc"})
                if parts == ["cdn", "blob"]:
                    data = hub.repos["acme/tiny-lora"]["style.safetensors"]
                    return self._bytes("cdn/blob", data, {"Content-Disposition": 'attachment; filename="cyber.safetensors"'})
                self._send(404, b"not found")

            def _info(self, repo: str) -> None:
                files = hub.repos.get(repo)
                if files is None:
                    return self._send(401, b'{"error": "Repository not found"}',
                                      {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                siblings = []
                for name, data in files.items():
                    s = {"rfilename": name, "size": len(data), "blobId": git_sha1(data)}
                    if name in hub.lfs:
                        s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    siblings.append(s)
                body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                   "gated": "manual" if repo in hub.gated else False, "siblings": siblings}).encode()
                self._send(200, body, {"Content-Type": "application/json"})

            def _file(self, repo: str, name: str) -> None:
                data = hub.repos.get(repo, {}).get(name)
                if data is None:
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
                if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
                    return self._send(401, b"", {"X-Error-Code": "GatedRepo",
                                                 "X-Error-Message": "Access to model acme/gated is restricted."})
                etag = hashlib.sha256(data).hexdigest() if name in hub.lfs else git_sha1(data)
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
                if name in hub.lfs:
                    headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
                if repo == "acme/corrupt":
                    data = data[:-1] + bytes([data[-1] ^ 1])  # damaged on the way
                self._bytes(f"{repo}/{name}", data, headers)

            def _bytes(self, key: str, data: bytes, headers: dict) -> None:
                if self.command == "GET" and hub.down > 0:
                    hub.down -= 1
                    return self._send(500, b"outage")
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                body = data[start:]
                self.send_response(206 if start else 200)
                for k, v in {**headers, "Accept-Ranges": "bytes"}.items():
                    self.send_header(k, v)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if key in hub.drop_once:
                    hub.drop_once.discard(key)
                    hub.down, hub.down_after_drop = hub.down_after_drop, 0
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection drops mid-file
                    return
                if hub.stall is not None:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    hub.stall.wait(20)
                    body = body[len(body) // 2:]
                self.wfile.write(body)

        return Handler


@pytest.fixture
def hub(tmp_path, monkeypatch):
    h = Hub(tmp_path)
    from huggingface_hub import constants

    # what HF_ENDPOINT does when set before huggingface_hub is imported (the CLI test sets it for real)
    monkeypatch.setattr(constants, "ENDPOINT", h.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # The hub reads in 10 MB chunks and keeps what whole chunks brought; 16 KiB here, so a test file is many.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 << 10)
    yield h
    h.close()


@pytest.fixture
def lib(tmp_path):
    with Library(tmp_path / "lib.db", tmp_path / "models") as library:
        yield library


def resumed_at(range_header: str) -> int:
    assert range_header.startswith("bytes=") and range_header.endswith("-"), range_header
    return int(range_header[6:-1])


def staged(lib) -> list[Path]:
    root = Path(lib.models_dir) / download.STAGING
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_pull_downloads_verifies_and_installs_a_repos_model_file(hub, lib):
    seen = []
    entry = pull("acme/tiny-lora", lib, progress=seen.append)
    data = hub.repos["acme/tiny-lora"]["style.safetensors"]
    assert entry.role == "lora" and entry.source == f"hf:acme/tiny-lora@{COMMIT}"
    assert entry.path == Path(lib.models_dir) / "style.safetensors" and entry.path.read_bytes() == data
    assert seen[-1].stage == "installing" and seen[-1].done == len(data) == seen[-1].total
    assert staged(lib) == []  # nothing half-done left behind


def test_a_connection_dropped_mid_file_resumes_with_a_range_request(hub, lib):
    hub.drop_once.add("acme/tiny-lora/style.safetensors")
    entry = pull("acme/tiny-lora/style.safetensors", lib)
    data = hub.repos["acme/tiny-lora"]["style.safetensors"]
    assert entry.path.read_bytes() == data
    first, second = hub.gets("style.safetensors")
    assert first == "" and 0 < resumed_at(second) <= len(data) // 2  # not from the start


def test_an_interrupted_pull_resumes_where_it_stopped_the_next_time(hub, lib):
    hub.drop_once.add("acme/tiny-lora/style.safetensors")
    hub.down_after_drop = 99  # after the drop the hub is down: this pull gives up
    with pytest.raises(DownloadError) as err:
        pull("acme/tiny-lora/style.safetensors", lib)
    assert err.value.kind == "network" and "again to resume" in str(err.value)
    data = hub.repos["acme/tiny-lora"]["style.safetensors"]
    (part,) = [p for p in staged(lib) if p.suffix == ".part"]
    kept = part.stat().st_size
    assert 0 < kept <= len(data) // 2 and lib.list() == []
    hub.down = 0
    hub.log.clear()
    entry = pull("acme/tiny-lora/style.safetensors", lib)
    assert entry.path.read_bytes() == data and hub.gets("style.safetensors") == [f"bytes={kept}-"]


def test_a_gated_repo_says_what_to_accept_and_how_to_give_a_token(hub, lib):
    with pytest.raises(DownloadError) as err:
        pull("acme/gated", lib)
    message = str(err.value)
    assert err.value.kind == "gated" and f"{hub.url}/acme/gated" in message
    assert "accept" in message and "HF_TOKEN" in message and "--token" in message
    assert lib.list() == [] and not [p for p in staged(lib) if p.suffix != ".json"]
    entry = pull("acme/gated", lib, token=GOOD_TOKEN)
    assert entry.role == "lora"


def test_a_damaged_file_fails_its_checksum_and_is_not_installed(hub, lib):
    with pytest.raises(DownloadError) as err:
        pull("acme/corrupt", lib)
    assert err.value.kind == "checksum" and "Pull again" in str(err.value)
    assert lib.list() == [] and not [p for p in staged(lib) if p.suffix == ".part"]


def test_disk_space_is_checked_before_anything_is_fetched(hub, lib, monkeypatch):
    import shutil as real

    usage = real.disk_usage(lib.models_dir if Path(lib.models_dir).exists() else "/")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage._replace(free=100 << 20))
    with pytest.raises(DownloadError) as err:
        pull("acme/tiny-lora", lib)
    assert err.value.kind == "disk_full" and "Free some space" in str(err.value)
    assert hub.gets("style.safetensors") == []


def test_cancel_can_discard_what_was_fetched(hub, lib):
    cancel = threading.Event()
    hub.drop_once.add("acme/tiny-lora/style.safetensors")  # the first half arrives, then the cancel lands

    def on_progress(p):
        cancel.set()

    with pytest.raises(DownloadError) as err:
        pull("acme/tiny-lora", lib, progress=on_progress, cancel=cancel, discard_on_cancel=True)
    assert err.value.kind == "cancelled"
    assert lib.list() == [] and staged(lib) == []
    assert not any(Path(lib.models_dir).glob("*.safetensors"))


def test_a_direct_url_follows_redirects_names_the_file_and_resumes(hub, lib):
    hub.drop_once.add("cdn/blob")
    entry = pull(f"{hub.url}/api/download/models/1234", lib)
    data = hub.repos["acme/tiny-lora"]["style.safetensors"]
    assert entry.path.name == "cyber.safetensors" and entry.path.read_bytes() == data
    assert entry.role == "lora" and 0 < resumed_at(hub.gets("/cdn/blob")[-1]) <= len(data) // 2


def test_a_repo_of_several_models_asks_which_one(hub, lib):
    with pytest.raises(DownloadError) as err:
        pull("acme/many", lib)
    assert err.value.kind == "choose" and "acme/many/a-Q4_K_M.gguf" in str(err.value)


def test_an_unknown_repo_is_named(hub, lib):
    with pytest.raises(DownloadError) as err:
        pull("acme/nothing", lib)
    assert err.value.kind == "not_found" and "acme/nothing" in str(err.value)


def test_hub_file_links_and_repo_ids_are_understood(hub):
    assert download.parse_source("acme/tiny-lora") == ("hf", "acme/tiny-lora", "")
    assert download.parse_source("acme/wan/split/vae.safetensors") == ("hf", "acme/wan", "split/vae.safetensors")
    assert download.parse_source(f"{hub.url}/acme/x/resolve/main/a/b.gguf") == ("hf", "acme/x", "a/b.gguf")
    assert download.parse_source("https://civitai.com/api/download/models/1") == (
        "url", "https://civitai.com/api/download/models/1", "")
    with pytest.raises(DownloadError):
        download.parse_source("justaname")


def test_cli_pull_installs_from_the_endpoint_in_hf_endpoint(hub, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "STUDIO_HOME": str(tmp_path / "home")}
    env.pop("HF_TOKEN", None)
    out = subprocess.run([sys.executable, "-m", "studio", "models", "pull", "acme/tiny-lora"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "installed 'style'" in out.stdout
    listed = subprocess.run([sys.executable, "-m", "studio", "models", "list"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert "style" in listed.stdout
    gated = subprocess.run([sys.executable, "-m", "studio", "models", "pull", "acme/gated"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert gated.returncode == 2 and "HF_TOKEN" in gated.stderr


def test_starters_name_size_licence_and_hardware():
    from studio.families import STARTERS, starters_for

    assert {"qwen3-1.7b", "qwen3-8b", "sdxl", "flux-schnell", "wan-1.3b"} <= {s.id for s in STARTERS}
    assert all(s.size > 0 and s.licence and s.repo.count("/") == 1 and s.file for s in STARTERS)
    cpu_only = starters_for(ram=16 * 10**9, vram=0)
    assert cpu_only and all(s.min_vram == 0 and s.runs for s in cpu_only)
    offered = {s.id for s in starters_for(ram=10**12, vram=10**12)}
    assert offered == {s.id for s in STARTERS if s.runs}  # only families Studio runs are offered


# -- the Download view -------------------------------------------------------------------------

@pytest.fixture
def panel(qtbot, lib):
    from studio.ui.models_panel import DropInstaller, ModelsPanel

    p = ModelsPanel(lib, DropInstaller(lib, hash_files=False))
    qtbot.addWidget(p)
    yield p
    if p.download_dialog is not None:
        p.download_dialog.cancel()
        p.download_dialog.wait(10)


def test_download_view_shows_progress_and_installs_into_the_panel(qtbot, hub, lib, panel):
    hub.stall = threading.Event()
    dialog = panel.open_download()
    dialog.source.setText("acme/tiny-lora")
    dialog.download_button.click()
    qtbot.waitUntil(lambda: " of " in dialog.status.text() and dialog.bar.value() > 0, timeout=20000)
    assert "style.safetensors" in dialog.status.text() and not dialog.download_button.isEnabled()
    hub.stall.set()
    qtbot.waitUntil(lambda: dialog.status.text().startswith("Installed style"), timeout=20000)
    qtbot.waitUntil(lambda: dialog.download_button.isEnabled(), timeout=5000)
    assert dialog.bar.value() == 1000 and "style" in {r["Name"] for r in panel.rows()}


def test_download_view_cancel_leaves_no_partial_files(qtbot, hub, lib, panel):
    hub.stall = threading.Event()
    dialog = panel.open_download()
    dialog.source.setText("acme/tiny-lora")
    dialog.download_button.click()
    qtbot.waitUntil(lambda: dialog.bar.value() > 0, timeout=20000)
    dialog.cancel_button.click()
    hub.stall.set()  # the next bytes meet the cancel
    qtbot.waitUntil(lambda: "Cancelled" in dialog.status.text(), timeout=20000)
    assert lib.list() == [] and staged(lib) == []
    assert not [p for p in Path(lib.models_dir).rglob("*") if p.is_file()]


def test_download_view_offers_the_starters_and_shows_hub_errors(qtbot, hub, lib, panel):
    dialog = panel.open_download()
    assert dialog.starters.count() == 1 + len(__import__("studio.families").families.STARTERS)
    dialog.starters.setCurrentIndex(1)
    assert dialog.source.text() == dialog.starters.currentData()
    dialog.source.setText("acme/gated")
    dialog.download_button.click()
    qtbot.waitUntil(lambda: "HF_TOKEN" in dialog.status.text(), timeout=20000)
    assert dialog.download_button.isEnabled()
