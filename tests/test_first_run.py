"""What a new user meets in the first minutes: the engine starts from any folder, the bundled model is listed,
the CLI's messages say what to do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_engine_starts_from_a_folder_that_holds_a_studio_directory(tmp_path, monkeypatch):
    from studio.client import EngineClient, EngineOptions
    from studio.paths import Paths
    from studio.protocol import SelfTestJob

    shadow = tmp_path / "studio"  # a user's own "studio" folder, as the issue saw it
    shadow.mkdir()
    (shadow / "notes.txt").write_text("my drawings")
    monkeypatch.chdir(tmp_path)
    client = EngineClient(Paths.default(), EngineOptions(device="cpu", hang_timeout_s=60))
    try:
        client.start()
        assert client.state == "ready", client.state
        result = client.submit(SelfTestJob()).wait(timeout=120)
        assert result["device"]
    finally:
        client.close()


def test_engine_boot_code_ignores_the_working_directory(tmp_path):
    """The shadowing package here even imports: without the fix the engine would run *it*."""
    from studio.client import engine_boot

    (tmp_path / "studio").mkdir()
    (tmp_path / "studio" / "__init__.py").write_text("raise SystemExit('the wrong studio')\n")
    (tmp_path / "studio" / "__main__.py").write_text("raise SystemExit('the wrong studio')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain = subprocess.run([sys.executable, "-m", "studio", "--version"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert "the wrong studio" in plain.stderr  # what `python -m studio` does here
    booted = subprocess.run([sys.executable, "-c", engine_boot(), "--version"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert booted.returncode == 0 and "the wrong studio" not in booted.stderr, booted.stderr


def _bundled_or_skip():
    from studio.library.bundled import find_bundled

    path, why = find_bundled()
    if path is None:
        pytest.skip(f"bundled model {why}")
    return path


def test_models_list_shows_the_bundled_chat_model(tmp_path):
    _bundled_or_skip()
    env = {**os.environ, "STUDIO_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "studio", "models", "list"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no models yet" not in out.stdout
    line = next(line for line in out.stdout.splitlines() if line.startswith("SmolLM2-135M-Instruct"))
    assert "(bundled)" in line and "llm" in line


def test_bundled_entry_is_registered_once_and_follows_the_file(tmp_path):
    from studio.library.library import Library

    path = _bundled_or_skip()
    stale = tmp_path / "old-venv.gguf"
    stale.write_bytes(path.read_bytes()[: 1 << 20])  # where the bundled file was before a venv moved
    with Library(tmp_path / "library.db", tmp_path / "models") as lib:
        first = lib.ensure_bundled()
        assert lib.ensure_bundled().id == first.id and len(lib.list()) == 1
        assert first.source == "bundled" and "bundled" in first.tags and first.role == "llm"
        assert lib.resolve("SmolLM2-135M-Instruct") == first.path
        # an entry left from an older location is dropped (the file itself stays)
        with lib._tx() as db:
            db.execute("UPDATE models SET path = ? WHERE id = ?", (str(stale), first.id))
        again = lib.ensure_bundled()
        assert [e.path for e in lib.list()] == [again.path] and stale.exists()


def test_models_panel_lists_the_bundled_model(qtbot, tmp_path, monkeypatch):
    _bundled_or_skip()
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    from studio.paths import Paths
    from studio.settings import Settings
    from studio.ui.main_window import MainWindow

    paths = Paths.default().ensure()
    settings = Settings.load(paths)
    settings.device = "cpu"
    win = MainWindow(paths, settings)
    qtbot.addWidget(win)
    try:
        model = win.models_panel.model
        names = [model.item(r).child(c).text() for r in range(model.rowCount())
                 for c in range(model.item(r).rowCount())]
        assert "SmolLM2-135M-Instruct" in names
    finally:
        win.close()


def test_models_panel_add_and_scan_buttons_register_models(qtbot, tmp_path, monkeypatch):
    from library_fixtures import SAFETENSORS_CASES, write_safetensors
    from PySide6.QtWidgets import QFileDialog

    from studio.library.library import Library
    from studio.ui.models_panel import DropInstaller, ModelsPanel

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    one = write_safetensors(tmp_path / "picked" / "flux.safetensors", SAFETENSORS_CASES["flux_dev"][0])
    write_safetensors(tmp_path / "comfy" / "loras" / "style.safetensors", SAFETENSORS_CASES["lora_kohya_sdxl"][0])
    with Library() as lib:
        panel = ModelsPanel(lib, DropInstaller(lib, hash_files=False))
        qtbot.addWidget(panel)
        assert panel.add_button.isVisibleTo(panel) and panel.scan_button.isVisibleTo(panel)
        monkeypatch.setattr(QFileDialog, "getOpenFileNames", lambda *a, **k: ([str(one)], ""))
        panel.add_button.click()
        qtbot.waitUntil(lambda: lib.get("flux") is not None, timeout=20000)
        monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path / "comfy"))
        with qtbot.waitSignal(panel.scanned, timeout=20000):
            panel.scan_button.click()
        assert lib.get("style") is not None and "1 added" in panel.hint.text()
        assert {r["Name"] for r in panel.rows()} >= {"flux", "style"}
        panel.installer.wait()


class Terminal:
    """Both of a CLI's streams on one terminal line: \\r goes to column 0, ESC[2K erases the line."""

    def __init__(self) -> None:
        self.lines = [""]
        self.col = 0

    def stream(self):
        term = self

        class Stream:
            def isatty(self) -> bool:
                return True

            def write(self, text: str) -> None:
                term.write(text)

            def flush(self) -> None:
                pass

        return Stream()

    def write(self, text: str) -> None:
        while text:
            if text.startswith("\x1b[2K"):
                self.lines[-1], text = "", text[4:]
                continue
            ch, text = text[0], text[1:]
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.lines.append("")
                self.col = 0
            else:
                line = self.lines[-1]
                self.lines[-1] = line[:self.col] + ch + line[self.col + 1:]
                self.col += 1


def test_cli_chat_progress_is_erased_before_the_answer():
    from studio.cli.chat import StatusLine, answer_printer
    from studio.protocol import Message

    term = Terminal()
    status = StatusLine(term.stream())
    on_event = answer_printer(status, term.stream())
    status.show("starting the engine…")
    for step in range(4):
        on_event(Message("progress", {"job_id": "j", "step": step, "total": 3, "stage": "loading"}))
    assert term.lines[-1] == "loading model (3/3)…"
    for text in ("The capital", " of France is Paris."):
        on_event(Message("token", {"job_id": "j", "text": text}))
    assert term.lines == ["The capital of France is Paris."]


def test_cli_chat_status_line_stays_off_pipes():
    import io

    from studio.cli.chat import StatusLine, answer_printer
    from studio.protocol import Message

    err, out = io.StringIO(), io.StringIO()
    on_event = answer_printer(StatusLine(err), out)
    on_event(Message("progress", {"job_id": "j", "step": 1, "total": 3, "stage": "loading"}))
    on_event(Message("token", {"job_id": "j", "text": "Paris"}))
    assert (err.getvalue(), out.getvalue()) == ("", "Paris")


def test_generate_image_without_a_model_says_how_to_get_one(tmp_path):
    env = {**os.environ, "STUDIO_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "studio", "generate", "image", "--prompt", "cat"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "usage:" not in out.stderr
    assert "no image model installed" in out.stderr and "studio models add FILE" in out.stderr
    assert "studio models pull" in out.stderr


def test_generate_uses_the_one_installed_image_model_and_asks_among_several(tmp_path, monkeypatch):
    from library_fixtures import SAFETENSORS_CASES, write_safetensors

    from studio.cli.generate import installed_model
    from studio.library.library import Library

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    with Library() as lib:
        lib.ensure_bundled()  # a chat model is no image model
        lib.add(write_safetensors(tmp_path / "a.safetensors", SAFETENSORS_CASES["sd15_ldm"][0]))
    assert installed_model("image") == ("a", "")
    assert "no video model installed" in installed_model("video")[1]
    with Library() as lib:
        lib.add(write_safetensors(tmp_path / "b.safetensors", SAFETENSORS_CASES["sdxl_base_ldm"][0]))
    name, why = installed_model("image")
    assert name == "" and "2 image models" in why and "--model NAME" in why


def test_a_chat_model_given_as_image_model_is_named_as_one(engine):
    from studio.client import EngineError
    from studio.protocol import ImageJob

    path = _bundled_or_skip()
    handle = engine.submit(ImageJob(model=str(path), prompt="cat", steps=1, width=64, height=64))
    try:
        handle.wait(timeout=120)
    except EngineError as exc:
        message = str(exc)
    else:
        raise AssertionError("a chat model made an image")
    assert "is a chat model" in message and "studio chat --model" in message and "LoRA" not in message


def test_a_missing_model_tells_the_cli_way_to_add_one(engine, tmp_path):
    from studio.client import EngineError
    from studio.protocol import ImageJob

    handle = engine.submit(ImageJob(model=str(tmp_path / "nothing.safetensors"), prompt="cat"))
    try:
        handle.wait(timeout=120)
    except EngineError as exc:
        assert "studio models add FILE" in str(exc)
    else:
        raise AssertionError("a missing model made an image")


def test_doctor_reports_the_thread_count_the_engine_uses(engine, tmp_path):
    import json
    import time

    env = {**os.environ, "STUDIO_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "studio", "doctor", "--json"], env=env, capture_output=True,
                         text=True, timeout=180)
    report = json.loads(out.stdout)
    engine.last_status = None
    engine.request_status()
    deadline = time.monotonic() + 30
    while engine.last_status is None and time.monotonic() < deadline:
        time.sleep(0.05)
    device = engine.last_status["device"]
    if device["kind"] != "cpu":
        pytest.skip("the thread rule is the CPU's; a GPU machine's label names the GPU")
    assert report["engine_threads"] == device["threads"]
    assert report["selected_device"] == device["label"]
