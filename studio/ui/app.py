"""Start the GUI: application, theme, main window, engine."""

from __future__ import annotations

import logging
import sys


def run_gui(argv: list[str] | None = None) -> int:
    from PySide6.QtWidgets import QApplication

    from studio.paths import Paths
    from studio.settings import Settings
    from studio.ui.main_window import MainWindow
    from studio.ui.theme import app_icon, apply_theme

    logging.basicConfig(level=logging.INFO, format="studio %(levelname)s %(message)s")
    app = QApplication.instance() or QApplication(argv if argv is not None else sys.argv)
    app.setApplicationName("Studio")
    app.setOrganizationName("Studio")
    app.setDesktopFileName("studio")
    app.setWindowIcon(app_icon())
    paths = Paths.default().ensure()
    settings = Settings.load(paths)
    apply_theme(app, settings.theme)
    window = MainWindow(paths, settings)
    window.show()
    window.engine.start()
    return app.exec()
