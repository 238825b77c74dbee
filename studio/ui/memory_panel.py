"""The Memory panel: what is loaded where (VRAM / RAM), the VRAM budget, and an "Unload all" button.

Fed by `engine_status` events (`update_status(payload)`); never imports torch. Tolerates
partial payloads: older engines send models without "where"/"policy", and the memory dict may
carry the server's raw readings (vram_total / vram_free / rss / ram_total) instead of a budget.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

COLUMNS = ("Model", "Where", "Size", "Policy")
POLICY_TEXT = {
    "resident": "resident",
    "model_offload": "model offload",
    "block_stream": "block streaming",
    "sequential": "sequential",
}
WHERE_TIPS = {
    "VRAM": "on the GPU, ready to run",
    "RAM": "in system memory; moved (or streamed) to the GPU when used",
    "disk": "not loaded; read from disk when used",
}
_BAR_STEPS = 1000  # the bar counts in per-mille so byte counts above 2^31 still fit


def human_bytes(n: float) -> str:
    n = float(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _int(d: dict, key: str) -> int:
    value = d.get(key, 0)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class MemoryPanel(QWidget):
    """Models with their place and size, a usage bar against the budget, and Unload all."""

    unload_all_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.device_label = QLabel("Engine not started")
        self.device_label.setObjectName("MemoryDevice")
        self.usage_bar = QProgressBar()
        self.usage_bar.setRange(0, _BAR_STEPS)
        self.usage_bar.setTextVisible(True)
        self.usage_bar.setFormat("no data yet")
        self.usage_bar.setValue(0)
        self.ram_label = QLabel("")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in range(1, len(COLUMNS)):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.empty_label = QLabel("No models loaded")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.unload_button = QPushButton("Unload all")
        self.unload_button.setToolTip("Free the GPU and RAM held by loaded models; they load again when needed")
        self.unload_button.setEnabled(False)
        self.unload_button.clicked.connect(self.unload_all_requested)

        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.unload_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.device_label)
        layout.addWidget(self.usage_bar)
        layout.addWidget(self.ram_label)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.empty_label)
        layout.addLayout(buttons)
        self.update_status({})

    def update_status(self, status: dict[str, Any]) -> None:
        """Show one `engine_status` payload: {"device": {...}, "memory": {...}, "models": [...]}."""
        device = status.get("device") if isinstance(status.get("device"), dict) else {}
        memory = status.get("memory") if isinstance(status.get("memory"), dict) else {}
        models = [m for m in status.get("models") or [] if isinstance(m, dict)]
        if device:
            self.device_label.setText(str(device.get("label") or device.get("name") or device.get("kind", "?")))
        self._show_usage(device, memory)
        self._show_models(models)

    def _show_usage(self, device: dict, memory: dict) -> None:
        budget, used = _int(memory, "budget"), _int(memory, "used")
        if not budget and _int(memory, "vram_total"):  # the server's raw reading: the whole card
            budget = _int(memory, "vram_total")
            used = budget - _int(memory, "vram_free")
        if budget:
            free = _int(memory, "free") if "free" in memory else budget - used
            self.usage_bar.setValue(min(_BAR_STEPS, round(_BAR_STEPS * used / budget)))
            self.usage_bar.setFormat(f"{human_bytes(used)} of {human_bytes(budget)} VRAM budget "
                                     f"· {human_bytes(max(0, free))} free")
            self.usage_bar.setToolTip("VRAM the engine accounts to loaded models against its budget")
        else:
            total_ram = _int(memory, "ram_total") or _int(device, "total_ram")
            held = _int(memory, "ram_used") or _int(memory, "rss")
            if total_ram:
                self.usage_bar.setValue(min(_BAR_STEPS, round(_BAR_STEPS * held / total_ram)))
                self.usage_bar.setFormat(f"{human_bytes(held)} of {human_bytes(total_ram)} RAM · no GPU budget")
            else:
                self.usage_bar.setValue(0)
                self.usage_bar.setFormat("no memory data yet" if not device else "no GPU budget")
        parts = []
        if _int(memory, "ram_used"):
            parts.append(f"models in RAM: {human_bytes(_int(memory, 'ram_used'))}")
        if _int(memory, "rss"):
            parts.append(f"engine RAM: {human_bytes(_int(memory, 'rss'))}")
        self.ram_label.setText(" · ".join(parts))

    def _show_models(self, models: list[dict]) -> None:
        self.table.setRowCount(len(models))
        for row, m in enumerate(models):
            where = str(m.get("where") or "—")
            policy = str(m.get("policy") or "")
            cells = (str(m.get("key", "?")), where, human_bytes(_int(m, "bytes")), POLICY_TEXT.get(policy, policy))
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col == 1 and where in WHERE_TIPS:
                    item.setToolTip(WHERE_TIPS[where])
                if col == 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, col, item)
        self.table.setVisible(bool(models))
        self.empty_label.setVisible(not models)
        self.unload_button.setEnabled(bool(models))
