"""Settings: model folders, outputs folder, device, VRAM budget and reserve, theme."""

from __future__ import annotations

import dataclasses

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.paths import Paths
from studio.settings import Settings
from studio.ui.remote_settings import RemoteEngineGroup
from studio.units import parse_size

DEVICES = ["auto", "cpu", "cuda", "cuda:1", "mps", "xpu"]
THEMES = ["system", "light", "dark"]


def offered_devices(status: dict | None, current: str) -> tuple[list[str], str, bool]:
    """The devices worth offering, from the engine's last engine_status: (devices, why others are missing,
    whether a GPU exists). Before the engine has reported, everything is offered."""
    device = (status or {}).get("device") or {}
    kind = device.get("kind")
    if not kind:
        return DEVICES, "The engine has not reported its hardware yet, so every device is listed.", True
    build = device.get("torch_build") or "this torch build"
    if kind == "cpu":
        if current not in ("auto", ""):
            return ["auto", "cpu"], f"Device is set to {current}; choose auto to let the engine look for a GPU.", False
        return ["auto", "cpu"], f"No GPU was found ({build}), so cuda, mps and xpu are not offered.", False
    gpu = "cuda" if kind == "rocm" else kind
    count = int(device.get("extra", {}).get("device_count", 1) or 1)
    gpus = [gpu] + ([f"{gpu}:{i}" for i in range(1, count)] if gpu == "cuda" else [])
    return ["auto", "cpu", *gpus], f"The engine found {device.get('label', gpu)}; other kinds of GPU are not offered.", True


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, parent: QWidget | None = None, status: dict | None = None,
                 paths: Paths | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.setMinimumWidth(520)
        self._original = settings

        self.folders = QListWidget()
        self.folders.addItems(settings.model_folders)
        self.folders.setToolTip("Folders Studio scans for models: a ComfyUI or A1111 models folder, "
                                "the Hugging Face cache, LM Studio's models folder...")
        add = QPushButton("Add folder…")
        add.clicked.connect(self._add_folder)
        remove = QPushButton("Remove")
        remove.clicked.connect(self._remove_folders)
        folder_buttons = QHBoxLayout()
        folder_buttons.addWidget(add)
        folder_buttons.addWidget(remove)
        folder_buttons.addStretch()
        folder_box = QVBoxLayout()
        folder_box.addWidget(self.folders)
        folder_box.addLayout(folder_buttons)

        self.outputs = QLineEdit(settings.outputs_folder)
        self.outputs.setPlaceholderText("Pictures/Studio")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_outputs)
        outputs_row = QHBoxLayout()
        outputs_row.addWidget(self.outputs)
        outputs_row.addWidget(browse)

        devices, why, has_gpu = offered_devices(status, settings.device)
        self.device = QComboBox()
        self.device.addItems(devices)
        if settings.device not in devices:  # keep what the user saved visible, even if not found now
            self.device.addItem(settings.device)
        self.device.setCurrentText(settings.device)
        self.device_note = QLabel(why)
        self.device_note.setWordWrap(True)
        self.device_note.setEnabled(False)
        self.budget = QLineEdit(settings.vram_budget)
        self.budget.setPlaceholderText("all of it, e.g. 6GiB")
        self.reserve = QLineEdit(settings.vram_reserve)
        self.reserve.setPlaceholderText("e.g. 1GiB")
        for field in (self.budget, self.reserve):
            field.setEnabled(has_gpu)
            if not has_gpu:
                field.setToolTip("No GPU: the engine runs on the CPU and uses RAM, so there is no VRAM to budget.")
                field.setPlaceholderText("no GPU found")
        self.theme = QComboBox()
        self.theme.addItems(THEMES)
        self.theme.setCurrentText(settings.theme)
        self.api_serve = QCheckBox("Serve the OpenAI-compatible API on 127.0.0.1, port")
        self.api_serve.setChecked(settings.api_serve)
        self.api_serve.setToolTip("Editors, scripts and agents on this computer can use Studio's models through "
                                  "/v1/chat/completions and the rest; the status bar shows the address.")
        self.api_port = QSpinBox()
        self.api_port.setRange(1024, 65535)
        self.api_port.setValue(settings.api_port)
        api_row = QHBoxLayout()
        api_row.addWidget(self.api_serve)
        api_row.addWidget(self.api_port)
        api_row.addStretch()

        self.error = QLabel()
        self.error.setStyleSheet("color: #d9534f;")
        self.error.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Model folders", folder_box)
        form.addRow("Outputs folder", outputs_row)
        form.addRow("Device", self.device)
        form.addRow("", self.device_note)
        form.addRow("VRAM budget", self.budget)
        form.addRow("VRAM reserve", self.reserve)
        form.addRow("Theme", self.theme)
        form.addRow("API", api_row)
        hint = QLabel("Changing the device, memory or remote engine settings restarts the engine.")
        hint.setEnabled(False)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(hint)
        self.remote = RemoteEngineGroup(settings.engine_address, settings.engine_token,
                                        (paths or Paths.default()).data)
        layout.addWidget(self.remote)
        layout.addWidget(self.error)
        layout.addWidget(buttons)

    def _remove_folders(self) -> None:
        # A method, not a lambda over self: the lambda kept the dialog alive past the window (a crash on quit).
        for item in self.folders.selectedItems():
            self.folders.takeItem(self.folders.row(item))

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a model folder")
        if folder and not self.folders.findItems(folder, _exact()):
            self.folders.addItem(folder)

    def _browse_outputs(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Outputs folder", self.outputs.text())
        if folder:
            self.outputs.setText(folder)

    def result_settings(self) -> Settings | None:
        """The edited settings, or None with the error shown when a field is invalid."""
        for name, field in (("VRAM budget", self.budget), ("VRAM reserve", self.reserve)):
            text = field.text().strip()
            if text:
                try:
                    parse_size(text)
                except ValueError as exc:
                    self.error.setText(f"{name}: {exc}")
                    field.setFocus()
                    return None
        device = self.device.currentText().strip() or "auto"
        if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
            self.error.setText(f"Device {device!r} is not one of auto, cpu, cuda, cuda:N, mps, xpu.")
            return None
        remote_error = self.remote.validate()
        if remote_error:
            self.error.setText(remote_error)
            self.remote.address.setFocus()
            return None
        return dataclasses.replace(
            self._original,
            model_folders=[self.folders.item(i).text() for i in range(self.folders.count())],
            outputs_folder=self.outputs.text().strip(),
            device=device,
            vram_budget=self.budget.text().strip(),
            vram_reserve=self.reserve.text().strip(),
            theme=self.theme.currentText(),
            engine_address=self.remote.address_text(),
            engine_token=self.remote.token.text().strip(),
            api_serve=self.api_serve.isChecked(),
            api_port=self.api_port.value(),
        )

    def _accept(self) -> None:
        if self.result_settings() is not None:
            self.accept()


def _exact():
    from PySide6.QtCore import Qt

    return Qt.MatchFlag.MatchExactly
