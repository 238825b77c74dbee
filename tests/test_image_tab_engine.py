"""The Image tab against the real engine: Generate with a (tiny) installed checkpoint makes an image."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from sd_fixtures import tiny_sd1  # noqa: E402

from studio.client import EngineOptions  # noqa: E402
from studio.library.detect import detect  # noqa: E402
from studio.library.library import Library  # noqa: E402
from studio.library.pngmeta import read_png_parameters  # noqa: E402
from studio.paths import Paths  # noqa: E402
from studio.settings import Settings  # noqa: E402


@pytest.fixture
def setup(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    from studio.ui.engine_qt import QtEngine
    from studio.ui.image_tab import ImageTab

    paths = Paths.default().ensure()
    library = Library()
    ckpt = tiny_sd1(tmp_path / "tiny.safetensors")
    # toy shapes are not a released SD1 model, so detection rightly says "unknown": tell it what it is
    library.add(ckpt, detection=replace(detect(ckpt), family="sd1", role="checkpoint"))
    engine = QtEngine(paths, EngineOptions(device="cpu", settings={"outputs": str(tmp_path / "outputs")}))
    engine.start()
    tab = ImageTab(engine, paths, Settings(), library=library)
    qtbot.addWidget(tab)
    yield tab, engine
    tab.shutdown()
    engine.close()
    library.close()


def test_generate_in_the_tab_makes_a_png_through_the_engine(setup, qtbot, tmp_path):
    tab, engine = setup
    tab.prompt.setPlainText("a fox in the snow")
    p = tab.params
    p.set_size(64, 64)
    p.steps_spin.setValue(3)
    p.set_seed(11, lock=True)
    previews = []
    engine.message.connect(lambda m: previews.append(m) if m.type == "preview" else None)
    assert tab.generate() is not None
    qtbot.waitUntil(lambda: len(tab.gallery.items) == 1, timeout=120000)
    item = tab.gallery.items[0]
    assert Path(item.path).is_file() and item.seed == 11
    assert Path(item.path).parent.parent == tmp_path / "outputs"
    assert read_png_parameters(item.path)["prompt"] == "a fox in the snow"
    assert previews, "no live preview reached the tab"
