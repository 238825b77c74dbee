"""Generation settings: model, VAE and LoRA pickers, size, sampling, seed, batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.ui.image.options import (
    DEFAULT_FAMILY,
    FAMILY_LABELS,
    PREDICTIONS,
    QUANTIZATIONS,
    SAMPLERS,
    SCHEDULES,
    refuse_file_drops,
    runnable_image_families,
    size_presets,
    snap8,
)
from studio.ui.job_widgets import SeedField

CUSTOM = "custom"


@dataclass
class ModelChoice:
    """One pickable model, from a library entry (or from a loaded image that names one)."""

    name: str
    path: str
    family: str = ""
    prediction: str = ""
    compatible: list[str] = field(default_factory=list)
    sha256: str = ""

    @classmethod
    def from_entry(cls, e: Any) -> ModelChoice:
        det = e.detection if isinstance(getattr(e, "detection", None), dict) else {}
        family = getattr(e, "effective_family", None) or e.family
        return cls(e.name, str(e.path), family, str(det.get("prediction", "")), list(det.get("compatible", [])),
                   getattr(e, "sha256", None) or "")

    @property
    def label(self) -> str:
        return f"{self.name}  ·  {FAMILY_LABELS.get(self.family, self.family)}" if self.family else self.name


def _combo(items: list[tuple[str, str]]) -> QComboBox:
    box = QComboBox()
    for value, label in items:
        box.addItem(label, value)
    return box


def _select(box: QComboBox, value: Any) -> bool:
    i = box.findData(value)
    if i >= 0:
        box.setCurrentIndex(i)
    return i >= 0


class LoraRow(QWidget):
    """One LoRA of the stack: which file and how strongly."""

    removed = Signal(object)
    changed = Signal()

    def __init__(self, loras: list[ModelChoice], path: str = "", weight: float = 1.0,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setMinimumContentsLength(8)
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.weight = QDoubleSpinBox()
        self.weight.setRange(-4.0, 4.0)
        self.weight.setSingleStep(0.05)
        self.weight.setDecimals(2)
        self.weight.setValue(weight)
        self.weight.setToolTip("LoRA weight (1 = as trained, 0 = off, negative inverts it)")
        remove = QToolButton()
        remove.setText("✕")
        remove.setToolTip("Remove this LoRA")
        remove.clicked.connect(lambda: self.removed.emit(self))
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.weight)
        layout.addWidget(remove)
        self.set_choices(loras, path)
        self.combo.currentIndexChanged.connect(self.changed)
        self.weight.valueChanged.connect(self.changed)

    def set_choices(self, loras: list[ModelChoice], path: str | None = None) -> None:
        path = self.path() if path is None else path
        self.combo.blockSignals(True)
        self.combo.clear()
        for lora in loras:
            self.combo.addItem(lora.label, lora.path)
            self.combo.setItemData(self.combo.count() - 1, lora.path, Qt.ItemDataRole.ToolTipRole)
        if path and self.combo.findData(path) < 0:
            self.combo.addItem(f"{Path(path).stem} (not installed)", path)
        _select(self.combo, path)
        self.combo.blockSignals(False)

    def path(self) -> str:
        return self.combo.currentData() or ""

    def value(self) -> dict:
        return {"path": self.path(), "weight": round(self.weight.value(), 4)}


class ParamsPanel(QWidget):
    """Every setting of an ImageJob except the prompts and the init image."""

    changed = Signal()
    family_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.checkpoints: list[ModelChoice] = []
        self.vaes: list[ModelChoice] = []
        self.loras: list[ModelChoice] = []
        self._family = ""

        self.model_combo = QComboBox()
        self.model_combo.setMinimumContentsLength(10)
        self.model_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setPlaceholderText(f"No {runnable_image_families()} model installed")
        self.vae_combo = QComboBox()
        self.vae_combo.setMinimumContentsLength(10)
        self.vae_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.lora_rows: list[LoraRow] = []
        self.lora_box = QVBoxLayout()
        self.lora_box.setContentsMargins(0, 0, 0, 0)
        self.add_lora_button = QPushButton("Add LoRA")
        self.add_lora_button.setToolTip("Stack another LoRA; each has its own weight")
        self.add_lora_button.clicked.connect(lambda: self.add_lora())
        lora_widget = QWidget()
        lora_layout = QVBoxLayout(lora_widget)
        lora_layout.setContentsMargins(0, 0, 0, 0)
        lora_layout.addLayout(self.lora_box)
        lora_layout.addWidget(self.add_lora_button, 0, Qt.AlignmentFlag.AlignLeft)

        self.size_combo = QComboBox()
        self.width_spin = self._size_spin("Width in pixels (a multiple of 8)")
        self.height_spin = self._size_spin("Height in pixels (a multiple of 8)")
        swap = QToolButton()
        swap.setText("⇄")
        swap.setToolTip("Swap width and height")
        swap.clicked.connect(self.swap_size)
        size_row = QHBoxLayout()
        size_row.addWidget(self.width_spin, 1)
        size_row.addWidget(QLabel("×"))
        size_row.addWidget(self.height_spin, 1)
        size_row.addWidget(swap)

        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 150)
        self.steps_spin.setValue(25)
        self.cfg_spin = QDoubleSpinBox()
        self.cfg_spin.setRange(0.0, 30.0)
        self.cfg_spin.setSingleStep(0.5)
        self.cfg_spin.setDecimals(1)
        self.cfg_spin.setValue(7.0)
        self.cfg_spin.setToolTip("How closely to follow the prompt (1 turns the negative prompt off)")
        steps_row = QHBoxLayout()
        steps_row.addWidget(self.steps_spin, 1)
        steps_row.addWidget(QLabel("CFG"))
        steps_row.addWidget(self.cfg_spin, 1)
        self.sampler_combo = _combo(SAMPLERS)
        self.schedule_combo = _combo(SCHEDULES)
        sampler_row = QHBoxLayout()
        sampler_row.addWidget(self.sampler_combo, 1)
        sampler_row.addWidget(self.schedule_combo, 1)

        self.seed_field = SeedField()
        self.seed_edit = self.seed_field.edit
        self.dice_button = self.seed_field.dice_button
        self.lock_check = QCheckBox("Lock")
        self.lock_check.setToolTip("Keep this seed for the next images; unlocked, every Generate rolls a new one")
        seed_row = self.seed_field.row
        seed_row.addWidget(self.lock_check)

        self.batch_size_spin = QSpinBox()
        self.batch_size_spin.setRange(1, 16)
        self.batch_size_spin.setToolTip("Images made together in one pass (uses more memory)")
        self.batch_count_spin = QSpinBox()
        self.batch_count_spin.setRange(1, 100)
        self.batch_count_spin.setToolTip("Passes made one after the other (each with the next seed)")
        batch_row = QHBoxLayout()
        batch_row.addWidget(self.batch_size_spin, 1)
        batch_row.addWidget(QLabel("×"))
        batch_row.addWidget(self.batch_count_spin, 1)
        self.clip_skip_spin = QSpinBox()
        self.clip_skip_spin.setRange(1, 12)
        self.clip_skip_spin.setToolTip("Stop the text encoder this many layers early (2 suits many anime models)")
        self.prediction_combo = _combo(PREDICTIONS)
        self.prediction_combo.setToolTip("Override when SD 2.x images come out grey or noisy")
        self.quant_combo = _combo(QUANTIZATIONS)
        self.quant_combo.setToolTip("Store the UNet's weights in fewer bits: less VRAM, a small quality cost. "
                                    "`studio models info FILE --quant int8` measures both for a model.")

        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Model", self.model_combo)
        form.addRow("VAE", self.vae_combo)
        form.addRow("LoRA", lora_widget)
        form.addRow("Size", self.size_combo)
        form.addRow("", size_row)
        form.addRow("Steps", steps_row)
        form.addRow("Sampler", sampler_row)
        form.addRow("Seed", self.seed_field)
        form.addRow("Batch", batch_row)
        form.addRow("Clip skip", self.clip_skip_spin)
        form.addRow("Prediction", self.prediction_combo)
        form.addRow("Weights", self.quant_combo)

        self.model_combo.currentIndexChanged.connect(self._on_model)
        self.size_combo.currentIndexChanged.connect(self._on_preset)
        for spin in (self.width_spin, self.height_spin):
            spin.valueChanged.connect(self._sync_preset)
            spin.editingFinished.connect(lambda s=spin: s.setValue(snap8(s.value())))
        for w in (self.vae_combo, self.sampler_combo, self.schedule_combo, self.prediction_combo, self.quant_combo):
            w.currentIndexChanged.connect(self.changed)
        for w in (self.width_spin, self.height_spin, self.steps_spin, self.batch_size_spin, self.batch_count_spin,
                  self.clip_skip_spin, self.cfg_spin):
            w.valueChanged.connect(self.changed)
        self.seed_edit.textChanged.connect(self.changed)
        self.lock_check.toggled.connect(self.changed)
        self._fill_presets()

    @staticmethod
    def _size_spin(tip: str) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(64, 4096)
        spin.setSingleStep(8)
        spin.setValue(512)
        spin.setToolTip(tip)
        return spin

    # -- models ------------------------------------------------------------------------------------------
    def set_models(self, checkpoints: list[ModelChoice], vaes: list[ModelChoice], loras: list[ModelChoice]) -> None:
        """New library contents; the current choices stay selected when they are still there."""
        current, vae = self.model_path(), self.vae_path()
        self.checkpoints, self.vaes, self.loras = checkpoints, vaes, loras
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for m in checkpoints:
            self.model_combo.addItem(m.label, m.path)
            self.model_combo.setItemData(self.model_combo.count() - 1, m.path, Qt.ItemDataRole.ToolTipRole)
        # With a placeholder set, Qt leaves a refilled combo on "no selection": pick the first model.
        if not (current and self.set_model(current)) and checkpoints:
            self.model_combo.setCurrentIndex(0)
        self.model_combo.blockSignals(False)
        self._on_model(remember_vae=vae)

    def model(self) -> ModelChoice | None:
        path = self.model_path()
        return next((m for m in self.checkpoints if m.path == path), None)

    def model_path(self) -> str:
        return self.model_combo.currentData() or ""

    def vae_path(self) -> str:
        return self.vae_combo.currentData() or ""

    def family(self) -> str:
        m = self.model()
        return m.family if m else ""

    def set_model(self, name_or_path: str, sha256_prefix: str = "") -> bool:
        """Select an installed model by path, library name, file name (what other tools write) or hash.

        A1111 writes the first 10 hex digits of the file's sha256 ("Model hash"): that finds a
        model the user renamed.
        """
        key = str(name_or_path)
        stem = Path(key.replace("\\", "/")).stem.lower()
        prefix = sha256_prefix.lower()
        for match in (lambda m: m.path == key, lambda m: m.name == key,
                      lambda m: bool(prefix) and len(prefix) >= 8 and m.sha256.startswith(prefix),
                      lambda m: Path(m.path).stem.lower() == stem or m.name.lower() == stem):
            for i, m in enumerate(self.checkpoints):
                if match(m):
                    self.model_combo.setCurrentIndex(i)
                    return True
        return False

    def _on_model(self, *_: object, remember_vae: str | None = None) -> None:
        vae = self.vae_path() if remember_vae is None else remember_vae
        family = self.family()
        self.vae_combo.blockSignals(True)
        self.vae_combo.clear()
        self.vae_combo.addItem("The model's own VAE", "")
        for v in self.vaes:
            if not family or not v.compatible or family in v.compatible:
                self.vae_combo.addItem(v.name, v.path)
        _select(self.vae_combo, vae)
        self.vae_combo.blockSignals(False)
        fitting = self.loras_for(family)
        for row in self.lora_rows:
            row.set_choices(fitting)
        if family != self._family:
            self._family = family
            self._fill_presets()
            self.family_changed.emit(family)
        self.changed.emit()

    def loras_for(self, family: str) -> list[ModelChoice]:
        """LoRAs made for this family, plus those whose family could not be told."""
        return [x for x in self.loras if not family or x.family in (family, "unknown", "")]

    def add_lora(self, path: str = "", weight: float = 1.0) -> LoraRow:
        choices = self.loras_for(self.family())
        row = LoraRow(choices, path or (choices[0].path if choices else ""), weight)
        refuse_file_drops(row)
        row.removed.connect(self.remove_lora)
        row.changed.connect(self.changed)
        self.lora_rows.append(row)
        self.lora_box.addWidget(row)
        self.changed.emit()
        return row

    def remove_lora(self, row: LoraRow) -> None:
        self.lora_rows.remove(row)
        row.setParent(None)
        row.deleteLater()
        self.changed.emit()

    def set_loras(self, loras: list[dict]) -> None:
        for row in list(self.lora_rows):
            self.remove_lora(row)
        for item in loras:
            if isinstance(item, dict) and item.get("path"):
                self.add_lora(str(item["path"]), float(item.get("weight", 1.0)))

    # -- size ----------------------------------------------------------------------------------------------
    def presets(self) -> list[tuple[int, int]]:
        m = self.model()
        return size_presets(m.family, m.prediction) if m else size_presets(DEFAULT_FAMILY)

    def _fill_presets(self) -> None:
        """Offer the chosen family's sizes and move to its native size unless the current one fits it."""
        presets = self.presets()
        keep = (self.width_spin.value(), self.height_spin.value())
        self.size_combo.blockSignals(True)
        self.size_combo.clear()
        for w, h in presets:
            self.size_combo.addItem(f"{w} × {h}", f"{w}x{h}")  # a string: Qt does not round-trip tuples
        self.size_combo.addItem("Custom", CUSTOM)
        self.size_combo.blockSignals(False)
        self.set_size(*(keep if keep in presets else presets[0]))

    def offered_sizes(self) -> list[tuple[int, int]]:
        """The presets in the Size box now."""
        data = [self.size_combo.itemData(i) for i in range(self.size_combo.count())]
        return [tuple(map(int, d.split("x"))) for d in data if d != CUSTOM]

    def set_size(self, width: int, height: int) -> None:
        self.width_spin.setValue(snap8(width))
        self.height_spin.setValue(snap8(height))
        self._sync_preset()

    def swap_size(self) -> None:
        self.set_size(self.height_spin.value(), self.width_spin.value())

    def _on_preset(self, index: int) -> None:
        data = self.size_combo.itemData(index)
        if isinstance(data, str) and data != CUSTOM:
            self.set_size(*map(int, data.split("x")))

    def _sync_preset(self) -> None:
        i = self.size_combo.findData(f"{self.width_spin.value()}x{self.height_spin.value()}")
        self.size_combo.blockSignals(True)
        self.size_combo.setCurrentIndex(i if i >= 0 else self.size_combo.count() - 1)
        self.size_combo.blockSignals(False)

    # -- seed ----------------------------------------------------------------------------------------------
    def seed(self) -> int:
        """The seed shown, or -1 while the field says "random"."""
        return self.seed_field.value()

    def set_seed(self, seed: int, lock: bool | None = None) -> None:
        self.seed_field.setValue(int(seed))
        if lock is not None:
            self.lock_check.setChecked(lock)

    def roll_seed(self) -> int:
        return self.seed_field.roll()

    def next_seed(self) -> int:
        """The seed for the next job: the locked one, or a fresh one shown in the field (so it can be kept)."""
        if self.lock_check.isChecked() and self.seed() >= 0:
            return self.seed()
        return self.roll_seed()

    # -- all values --------------------------------------------------------------------------------------------
    def values(self) -> dict:
        """The ImageJob fields this panel owns (seed as shown; the tab rolls it before a job)."""
        return {
            "model": self.model_path(),
            "vae": self.vae_path(),
            "loras": [r.value() for r in self.lora_rows if r.path()],
            "width": self.width_spin.value(),
            "height": self.height_spin.value(),
            "steps": self.steps_spin.value(),
            "cfg": round(self.cfg_spin.value(), 2),
            "sampler": self.sampler_combo.currentData(),
            "schedule": self.schedule_combo.currentData(),
            "seed": self.seed(),
            "batch_size": self.batch_size_spin.value(),
            "batch_count": self.batch_count_spin.value(),
            "clip_skip": self.clip_skip_spin.value(),
            "prediction": self.prediction_combo.currentData(),
            "quant": self.quant_combo.currentData(),
        }

    def apply(self, params: dict) -> list[str]:
        """Set the controls from a job or from parameters read from an image. Returns what could not be used."""
        skipped: list[str] = []
        if params.get("model"):
            if not self.set_model(str(params["model"]), str(params.get("model_hash") or "")):
                skipped.append(f"model {Path(str(params['model']).replace(chr(92), '/')).name} is not installed")
        if "vae" in params:
            vae = str(params.get("vae") or "")
            if not _select(self.vae_combo, vae):
                found = next((v.path for v in self.vaes if v.name == vae or Path(v.path).name == vae), None)
                if found is None or not _select(self.vae_combo, found):
                    skipped.append(f"VAE {vae} is not installed")
        if isinstance(params.get("loras"), list):
            self.set_loras(params["loras"])
        if params.get("width") and params.get("height"):
            self.set_size(int(params["width"]), int(params["height"]))
        if params.get("steps"):
            self.steps_spin.setValue(int(params["steps"]))
        if params.get("cfg") is not None:
            self.cfg_spin.setValue(float(params["cfg"]))
        for key, box in (("sampler", self.sampler_combo), ("schedule", self.schedule_combo),
                         ("prediction", self.prediction_combo), ("quant", self.quant_combo)):
            if params.get(key) and not _select(box, params[key]):
                skipped.append(f"{key} {params[key]} is not available")
        if params.get("batch_size"):
            self.batch_size_spin.setValue(int(params["batch_size"]))
        if params.get("batch_count"):
            self.batch_count_spin.setValue(int(params["batch_count"]))
        if params.get("clip_skip"):
            self.clip_skip_spin.setValue(int(params["clip_skip"]))
        if isinstance(params.get("seed"), int) and params["seed"] >= 0:
            self.set_seed(params["seed"], lock=True)  # a loaded seed is kept, or the image could not be re-made
        return skipped
