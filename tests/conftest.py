"""Shared fixtures. One engine process for the whole session; every test gets a private STUDIO_HOME."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Tests never touch the user's real folders: everything lives under one temp home per session.
_SESSION_HOME = tempfile.mkdtemp(prefix="studio-test-home-")
os.environ["STUDIO_HOME"] = _SESSION_HOME
atexit.register(shutil.rmtree, _SESSION_HOME, True)


# Without a GPU, the fused decode step's Triton kernels run in Triton's interpreter
# (tests/test_llm_decode.py). The choice must be made before anything imports Triton: torch's
# compiler does, and Triton's own language helpers are defined for one mode at their import.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# The GUI tests need PySide6, which setup.sh always installs. A bare GPU machine running only the
# `gpu`-marked tests has torch but no Qt: there the GUI modules are not collected at all.
collect_ignore = [] if importlib.util.find_spec("PySide6") else [
    "test_chat_tab.py", "test_gui.py", "test_image_tab.py", "test_image_tab_engine.py", "test_memory_panel.py",
    "test_models_panel.py", "test_video_tab.py"]


def pytest_addoption(parser):
    parser.addoption("--packaging", action="store_true",
                     help="run the slow installer and bundle tests (tests/test_packaging.py, marked `packaging`)")
    parser.addoption("--fuzz-long", action="store_true",
                     help="fuzz with 10x the cases and a new seed each run (tests/test_fuzz.py)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--packaging"):
        skip_packaging = pytest.mark.skip(reason="installer/bundle test: run with --packaging")
        for item in items:
            if "packaging" in item.keywords:
                item.add_marker(skip_packaging)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def studio_home() -> str:
    return _SESSION_HOME


@pytest.fixture(scope="session")
def engine():
    """One real engine subprocess over the real socket, shared by the session's engine tests."""
    from studio.client import EngineClient, EngineOptions
    from studio.paths import Paths

    client = EngineClient(Paths.default(), EngineOptions(device="cpu", hang_timeout_s=60))
    client.start()
    yield client
    client.close()
