"""What a new user meets in the first minutes: the engine starts from any folder, the bundled model is listed,
the CLI's messages say what to do."""

from __future__ import annotations

import os
import subprocess
import sys


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
