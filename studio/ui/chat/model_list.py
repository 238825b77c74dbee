"""The Chat tab's model list: the bundled model, installed LLMs, the servers' models and "Add server…"."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox

from studio.ui.chat.servers import ChatServers, model_label

BUNDLED_LABEL = "SmolLM2 135M (bundled)"


def fill_models(combo: QComboBox, library: Any, servers: ChatServers, current: str) -> None:
    """Refill the list and keep `current` selected (shown as not installed/connected when it is gone)."""
    combo.clear()
    combo.addItem(BUNDLED_LABEL, "")
    if library is not None:
        for e in library.list(role="llm"):
            combo.addItem(e.name + (" (missing)" if e.missing else ""), str(e.path))
            combo.setItemData(combo.count() - 1, str(e.path), Qt.ItemDataRole.ToolTipRole)
    servers.add_items(combo)
    select_model(combo, current)


def select_model(combo: QComboBox, model: str) -> None:
    i = combo.findData(model)
    if i < 0:  # the thread's model is no longer installed: say so rather than silently switch
        combo.addItem(model_label(model), model)
        i = combo.count() - 1
    combo.setCurrentIndex(i)
