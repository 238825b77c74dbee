"""Settings > Remote engine: the address and token of `studio engine serve` on another machine, and the
certificate fingerprint pinned for it on first use (with a way to forget it when the server's certificate
was regenerated on purpose). Torch-free, like all of studio.ui."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QWidget

from studio.remote_trust import KnownEngines, UntrustedCertificate, known_engines_path, parse_address


class RemoteEngineGroup(QGroupBox):
    """Address (HOST:PORT, empty = the local engine), token, the pinned fingerprint and "Forget certificate"."""

    def __init__(self, address: str, token: str, data_dir: Path, parent: QWidget | None = None) -> None:
        super().__init__("Remote engine", parent)
        self.known = KnownEngines(known_engines_path(data_dir))
        self.address = QLineEdit(address)
        self.address.setPlaceholderText("empty: the engine on this computer; or HOST:PORT, e.g. gpu-box:7862")
        self.address.setToolTip("The address `studio engine serve --listen` prints on the GPU machine. "
                                "Jobs, models and the outputs' first copy are then on that machine.")
        self.token = QLineEdit(token)
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("the server's STUDIO_ENGINE_TOKEN")
        self.token.setToolTip("Stored in settings.json, which only your user account can read. A server listening "
                              "beyond localhost always needs one.")
        self.fingerprint = QLabel()
        self.fingerprint.setWordWrap(True)
        self.fingerprint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)  # to compare it
        self.forget_button = QPushButton("Forget certificate")
        self.forget_button.setToolTip("Only after the server's certificate was regenerated on purpose: the next "
                                      "connection trusts whatever certificate the server presents, and shows it.")
        self.forget_button.clicked.connect(self.forget)
        self.address.textChanged.connect(self.refresh)
        row = QHBoxLayout()
        row.addWidget(self.fingerprint, 1)
        row.addWidget(self.forget_button)
        form = QFormLayout(self)
        form.addRow("Address", self.address)
        form.addRow("Token", self.token)
        form.addRow("Certificate", row)
        self.refresh()

    def address_text(self) -> str:
        return self.address.text().strip()

    def validate(self) -> str:
        """The error to show for the address, or "" when it is empty (local engine) or HOST:PORT."""
        text = self.address_text()
        if not text:
            return ""
        try:
            parse_address(text)
        except ValueError as exc:
            return f"Remote engine: {exc}, or leave it empty to use the engine on this computer."
        return ""

    def pinned(self) -> dict | None:
        """The pin stored for the address ({"sha256", "pinned"}), or None."""
        entry = self.known.load().get(self.address_text())
        return entry if isinstance(entry, dict) and entry.get("sha256") else None

    def refresh(self) -> None:
        text = self.address_text()
        try:
            entry = self.pinned() if text else None
        except UntrustedCertificate as exc:  # the pin file is damaged: say so rather than show "none"
            self.fingerprint.setText(str(exc))
            self.forget_button.setEnabled(False)
            return
        if not text:
            self.fingerprint.setText("Not used: the engine runs on this computer.")
        elif entry is None:
            self.fingerprint.setText("None pinned yet: the first connection trusts the server's certificate and "
                                     "shows its fingerprint; compare it with what the server printed.")
        else:
            self.fingerprint.setText(f"SHA-256 {entry['sha256']}\n(trusted on {entry.get('pinned', 'first use')})")
        self.forget_button.setEnabled(entry is not None)

    def forget(self) -> bool:
        try:
            forgotten = self.known.forget(self.address_text())
        except (OSError, UntrustedCertificate) as exc:
            self.fingerprint.setText(f"Could not forget the certificate: {exc}")
            return False
        self.refresh()
        return forgotten
