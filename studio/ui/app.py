"""Start the GUI: application, theme, main window, engine."""

from __future__ import annotations

import logging
import os
import sys


def run_gui(argv: list[str] | None = None) -> int:
    from PySide6.QtWidgets import QApplication

    from studio.paths import Paths
    from studio.settings import Settings
    from studio.ui.main_window import MainWindow
    from studio.ui.pyside_fixes import guard_true_refcount
    from studio.ui.theme import app_icon, apply_theme

    logging.basicConfig(level=logging.INFO, format="studio %(levelname)s %(message)s")
    app = QApplication.instance() or QApplication(argv if argv is not None else sys.argv)
    guard_true_refcount()
    app.setApplicationName("Studio")
    app.setOrganizationName("Studio")
    app.setDesktopFileName("studio")
    app.setWindowIcon(app_icon())
    paths = Paths.default().ensure()
    settings = Settings.load(paths)
    apply_theme(app, settings.theme)
    window = MainWindow(paths, settings)
    window.show()
    window.maybe_show_welcome()
    if os.environ.get("STUDIO_EXIT_WHEN_READY"):
        _exit_when_ready(app, window)
    window.engine.start()
    return app.exec()


def _exit_when_ready(app, window) -> None:
    """For CI and packaging checks: close once the engine is ready (exit 0) or has failed (exit 1)."""
    from PySide6.QtCore import QTimer

    def on_state(state: str, detail: str) -> None:
        if state == "ready":
            print(f"studio: window open, engine ready on {window.engine.client.engine_pid}", flush=True)
            QTimer.singleShot(300, window.close)
        elif state == "stopped" and detail:
            print(f"studio: engine failed: {detail}", file=sys.stderr, flush=True)
            app.exit(1)

    window.engine.state_changed.connect(on_state)
