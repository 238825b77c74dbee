"""Per-thread settings: the system prompt and the sampling parameters, saved as they change."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.chatstore import DEFAULT_SETTINGS, MODEL_DEFAULT_KEYS

# name -> (label, minimum, maximum, step, decimals or None for an int, tooltip)
FIELDS: dict[str, tuple[str, float, float, float, int | None, str]] = {
    "temperature": ("Temperature", 0.0, 2.0, 0.05, 2, "0 always picks the likeliest word; higher is more varied"),
    "top_p": ("Top P", 0.0, 1.0, 0.05, 2, "Sample only from the words that make up this much probability"),
    "top_k": ("Top K", 0, 500, 1, None, "Sample only from this many likeliest words (0 = no limit)"),
    "min_p": ("Min P", 0.0, 1.0, 0.01, 2, "Skip words less likely than this fraction of the likeliest"),
    "repetition_penalty": ("Repetition penalty", 1.0, 2.0, 0.05, 2, "Above 1 discourages repeating words"),
    "presence_penalty": ("Presence penalty", 0.0, 2.0, 0.1, 2, "Above 0 encourages new topics"),
    "max_tokens": ("Max answer length", 16, 32768, 64, None, "The most tokens one answer may have"),
}


QUANT_CHOICES = (("As stored", ""), ("int8 (half the memory)", "int8"), ("int4 (a quarter)", "int4"))


class SettingsPanel(QFrame):
    changed = Signal(str, dict)  # system prompt, sampling settings

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("SettingsPanel")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 12, 12, 12)
        title = QLabel("This chat's settings")
        title.setObjectName("PanelTitle")
        layout.addWidget(title)
        layout.addWidget(QLabel("System prompt"))
        self.system = QPlainTextEdit()
        self.system.setPlaceholderText("e.g. You are a concise assistant. Answer in English.")
        self.system.setMaximumHeight(110)
        layout.addWidget(self.system)
        form = QFormLayout()
        form.setContentsMargins(0, 6, 0, 0)
        self.fields: dict[str, QSpinBox | QDoubleSpinBox] = {}
        for name, (label, lo, hi, step, decimals, tip) in FIELDS.items():
            box: QSpinBox | QDoubleSpinBox
            if decimals is None:
                box = QSpinBox()
                box.setRange(int(lo), int(hi))
                box.setSingleStep(int(step))
            else:
                box = QDoubleSpinBox()
                box.setRange(lo, hi)
                box.setSingleStep(step)
                box.setDecimals(decimals)
            if name in MODEL_DEFAULT_KEYS:  # one step below the range reads "model default" (None)
                box.setMinimum(box.minimum() - box.singleStep())
                box.setSpecialValueText("model default")
                tip += ". \"model default\" uses what the model recommends"
            box.setToolTip(tip)
            box.valueChanged.connect(self._schedule)
            self.fields[name] = box
            form.addRow(label, box)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setSpecialValueText("random")
        self.seed.setToolTip("A fixed seed repeats the same answer for the same chat")
        self.seed.valueChanged.connect(self._schedule)
        form.addRow("Seed", self.seed)
        self.quant = QComboBox()
        for text, value in QUANT_CHOICES:
            self.quant.addItem(text, value)
        self.quant.setToolTip("Pack a full-precision (safetensors) model's weights when it loads: int8 halves "
                              "the memory, int4 quarters it, at some cost in quality. GGUF files keep their own.")
        self.quant.currentIndexChanged.connect(self._schedule)
        form.addRow("Weights", self.quant)
        layout.addLayout(form)
        reset = QPushButton("Reset to defaults")
        reset.clicked.connect(self.reset)
        layout.addWidget(reset)
        layout.addStretch()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(400)  # typing a system prompt saves once, not per key
        self._timer.timeout.connect(self.flush)
        self.system.textChanged.connect(self._schedule)
        self._loading = False

    def load(self, system: str, settings: dict[str, Any]) -> None:
        self._loading = True
        self.system.setPlainText(system)
        for name, box in self.fields.items():
            value = settings.get(name, DEFAULT_SETTINGS[name])
            box.setValue(box.minimum() if value is None else value)
        seed = settings.get("seed")
        self.seed.setValue(-1 if seed is None else int(seed))
        index = self.quant.findData(settings.get("quant", ""))
        self.quant.setCurrentIndex(max(index, 0))
        self._loading = False
        self._timer.stop()

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: None if name in MODEL_DEFAULT_KEYS and box.value() == box.minimum()
                               else box.value() for name, box in self.fields.items()}
        out["seed"] = None if self.seed.value() < 0 else self.seed.value()
        out["quant"] = self.quant.currentData() or ""
        return out

    def reset(self) -> None:
        self.load(self.system.toPlainText(), DEFAULT_SETTINGS)
        self.flush()

    def _schedule(self, *_: object) -> None:
        if not self._loading:
            self._timer.start()

    def flush(self) -> None:
        """Save now (before sending, switching threads, or closing)."""
        self._timer.stop()
        self.changed.emit(self.system.toPlainText(), self.values())
