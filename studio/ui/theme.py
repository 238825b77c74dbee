"""One coherent look: Fusion style with a light or dark palette and a warm accent."""

from __future__ import annotations

import logging

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QPalette
from PySide6.QtWidgets import QApplication

from studio.resources import assets_dir

ACCENT = QColor("#e8704f")
ICON_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)


def app_icon() -> QIcon:
    """Every shipped size, so each place Qt shows the icon gets a sharp one."""
    icon = QIcon()
    try:
        folder = assets_dir() / "icons"
    except FileNotFoundError as exc:  # a window without its icon still works; say what is wrong
        logging.getLogger(__name__).warning("%s", exc)
        return icon
    for size in ICON_SIZES:
        icon.addFile(str(folder / f"studio-{size}.png"))
    return icon


def is_dark(theme: str) -> bool:
    if theme == "dark":
        return True
    if theme == "light":
        return False
    hints = QGuiApplication.styleHints()
    scheme = getattr(hints, "colorScheme", None)
    return scheme is not None and scheme() == Qt.ColorScheme.Dark


def apply_theme(app: QApplication, theme: str = "system") -> bool:
    """Apply the palette; returns True when dark."""
    app.setStyle("Fusion")
    dark = is_dark(theme)
    p = QPalette()
    if dark:
        base, window, text, mid = QColor("#1e1f22"), QColor("#2b2d31"), QColor("#e6e6e6"), QColor("#3a3c42")
        p.setColor(QPalette.ColorRole.Window, window)
        p.setColor(QPalette.ColorRole.WindowText, text)
        p.setColor(QPalette.ColorRole.Base, base)
        p.setColor(QPalette.ColorRole.AlternateBase, QColor("#26282c"))
        p.setColor(QPalette.ColorRole.ToolTipBase, window)
        p.setColor(QPalette.ColorRole.ToolTipText, text)
        p.setColor(QPalette.ColorRole.Text, text)
        p.setColor(QPalette.ColorRole.Button, mid)
        p.setColor(QPalette.ColorRole.ButtonText, text)
        p.setColor(QPalette.ColorRole.BrightText, QColor("#ff6b6b"))
        p.setColor(QPalette.ColorRole.PlaceholderText, QColor("#8a8d93"))
        p.setColor(QPalette.ColorRole.Mid, QColor("#44474e"))
        for role in (QPalette.ColorRole.Text, QPalette.ColorRole.WindowText, QPalette.ColorRole.ButtonText):
            p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#72757c"))
    else:
        p = app.style().standardPalette()
        p.setColor(QPalette.ColorRole.Window, QColor("#f4f4f6"))
        p.setColor(QPalette.ColorRole.Base, QColor("#ffffff"))
        p.setColor(QPalette.ColorRole.AlternateBase, QColor("#f0f0f3"))
        p.setColor(QPalette.ColorRole.PlaceholderText, QColor("#8a8d93"))
    p.setColor(QPalette.ColorRole.Highlight, ACCENT)
    p.setColor(QPalette.ColorRole.HighlightedText, QColor("#ffffff"))
    p.setColor(QPalette.ColorRole.Link, ACCENT)
    app.setPalette(p)
    app.setProperty("studio_dark", dark)
    app.setStyleSheet(
        "QTabBar::tab { padding: 7px 18px; }"
        "QStatusBar QLabel { padding: 0 6px; }"
        "QLabel#EmptyTitle { font-size: 18pt; font-weight: 600; }"
        "QLabel#EmptyBody { font-size: 11pt; }"
        "QPushButton#GenerateButton { background: #e8704f; color: white; font-weight: 600; padding: 7px 14px;"
        " border: none; border-radius: 4px; }"
        "QPushButton#GenerateButton:hover { background: #f0805f; }"
        "QPushButton#GenerateButton:disabled { background: palette(mid); color: palette(base); }"
        "QLabel#VideoNotice { background: rgba(232, 112, 79, 28); border-radius: 4px; padding: 6px; }"
    )
    return dark
