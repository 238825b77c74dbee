"""The Memory panel shows engine_status payloads and asks for Unload all; it never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt  # noqa: E402

from studio.ui.memory_panel import MemoryPanel  # noqa: E402

GiB = 1 << 30

STATUS = {
    "device": {"kind": "cuda", "name": "NVIDIA RTX 3060", "label": "CUDA · NVIDIA RTX 3060 · 12 GiB",
               "total_vram": 12 * GiB},
    "memory": {"budget": 4 * GiB, "used": 3 * GiB, "free": 1 * GiB, "ram_used": 2 * GiB},
    "models": [
        {"key": "sdxl/unet", "bytes": int(4.8 * GiB), "where": "RAM", "policy": "block_stream"},
        {"key": "sdxl/vae", "bytes": 160 << 20, "where": "VRAM", "policy": "model_offload"},
    ],
}


def cells(panel: MemoryPanel) -> list[list[str]]:
    t = panel.table
    return [[t.item(r, c).text() for c in range(t.columnCount())] for r in range(t.rowCount())]


def test_panel_lists_models_with_where_size_and_policy(qtbot):
    panel = MemoryPanel()
    qtbot.addWidget(panel)
    panel.update_status(STATUS)
    assert cells(panel) == [
        ["sdxl/unet", "RAM", "4.8 GiB", "block streaming"],
        ["sdxl/vae", "VRAM", "160.0 MiB", "model offload"],
    ]
    assert panel.device_label.text() == "CUDA · NVIDIA RTX 3060 · 12 GiB"
    assert panel.table.item(1, 1).toolTip().startswith("on the GPU")
    assert panel.unload_button.isEnabled() and not panel.table.isHidden() and panel.empty_label.isHidden()


def test_usage_bar_shows_used_of_budget(qtbot):
    panel = MemoryPanel()
    qtbot.addWidget(panel)
    panel.update_status(STATUS)
    assert panel.usage_bar.value() == 750  # 3 of 4 GiB, in per-mille
    assert panel.usage_bar.format() == "3.0 GiB of 4.0 GiB VRAM budget · 1.0 GiB free"
    assert "models in RAM: 2.0 GiB" in panel.ram_label.text()


def test_unload_all_button_emits_the_request(qtbot):
    panel = MemoryPanel()
    qtbot.addWidget(panel)
    panel.update_status(STATUS)
    with qtbot.waitSignal(panel.unload_all_requested, timeout=1000):
        qtbot.mouseClick(panel.unload_button, Qt.MouseButton.LeftButton)


def test_nothing_loaded_disables_unload_and_says_so(qtbot):
    panel = MemoryPanel()
    qtbot.addWidget(panel)
    panel.update_status(STATUS)
    panel.update_status({**STATUS, "models": []})
    assert panel.table.rowCount() == 0 and panel.table.isHidden()
    assert not panel.empty_label.isHidden() and not panel.unload_button.isEnabled()


def test_server_raw_readings_and_partial_payloads_are_shown_without_errors(qtbot):
    panel = MemoryPanel()
    qtbot.addWidget(panel)
    # The engine server's own memory readings: the whole card, no accounted budget; models without places.
    panel.update_status({"device": {"kind": "cuda", "label": "CUDA · H100"},
                         "memory": {"vram_total": 80 * GiB, "vram_free": 60 * GiB, "rss": 3 * GiB},
                         "models": [{"key": "chat/smollm2", "bytes": 100 << 20}]})
    assert panel.usage_bar.format() == "20.0 GiB of 80.0 GiB VRAM budget · 60.0 GiB free"
    assert cells(panel) == [["chat/smollm2", "—", "100.0 MiB", ""]]
    # A CPU engine: RAM instead of a budget. Garbage values are ignored, not raised.
    panel.update_status({"device": {"kind": "cpu", "label": "CPU · 2 threads", "total_ram": 16 * GiB},
                         "memory": {"budget": 0, "used": "lots", "rss": 4 * GiB}, "models": [None, {"key": "x"}]})
    assert panel.usage_bar.format() == "4.0 GiB of 16.0 GiB RAM · no GPU budget"
    assert cells(panel) == [["x", "—", "0 B", ""]]
    panel.update_status({"models": "not a list", "memory": None})
    assert panel.device_label.text() == "CPU · 2 threads" and panel.table.rowCount() == 0


def test_the_panel_module_does_not_import_torch():
    code = "import sys, studio.ui.memory_panel; sys.exit('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr or "torch was imported"
