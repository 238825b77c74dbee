"""The wheel over a combo or spin box in a scrolling settings column scrolls the column, unless the box has focus."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QPoint, QPointF, Qt  # noqa: E402
from PySide6.QtGui import QWheelEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402
from test_image_tab import MockEngine, make_paths  # noqa: E402

from studio.settings import Settings  # noqa: E402


def wheel(widget, notches: int = -1) -> None:
    """Turn the wheel over the middle of `widget` (negative: towards the user, i.e. scroll down)."""
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(pos, QPointF(widget.mapToGlobal(pos.toPoint())), QPoint(0, 0), QPoint(0, 120 * notches),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, event)


def test_wheel_scrolls_the_image_settings_instead_of_changing_values(qtbot, tmp_path):
    from studio.ui.image_tab import ImageTab

    tab = ImageTab(MockEngine(), make_paths(tmp_path), Settings())
    qtbot.addWidget(tab)
    tab.resize(1000, 420)  # short: the settings column scrolls
    tab.show()
    qtbot.waitExposed(tab)
    bar = tab.scroll.verticalScrollBar()
    assert bar.maximum() > 0
    steps, sampler = tab.params.steps_spin, tab.params.sampler_combo
    before = (steps.value(), sampler.currentIndex())
    for box in (steps, sampler):
        start = bar.value()
        wheel(box)
        assert bar.value() > start  # the column scrolled
    assert (steps.value(), sampler.currentIndex()) == before  # and nothing changed
    assert steps.focusPolicy() == Qt.FocusPolicy.StrongFocus  # the wheel does not give focus either

    steps.setFocus()
    qtbot.waitUntil(steps.hasFocus)
    wheel(steps, +1)
    assert steps.value() == before[0] + 1  # focused: the wheel changes it as usual

    row = tab.params.add_lora()  # a box added later is guarded too
    QApplication.processEvents()  # Qt polishes new children on the next turn
    weight = row.weight.value()
    start = bar.value()
    wheel(row.weight, +1)
    assert row.weight.value() == weight
    assert bar.value() <= start  # the event went to the column (already at the top or scrolled up)


def test_wheel_guard_covers_the_video_settings(qtbot, tmp_path):
    from studio.ui.video_tab import VideoTab

    tab = VideoTab(MockEngine(), make_paths(tmp_path), Settings())
    qtbot.addWidget(tab)
    tab.resize(1000, 420)
    tab.show()
    qtbot.waitExposed(tab)
    from PySide6.QtWidgets import QAbstractSpinBox

    spin = next(s for s in tab.scroll.widget().findChildren(QAbstractSpinBox) if s.isVisible() and s.isEnabled())
    value = spin.value()
    wheel(spin)
    assert spin.value() == value
    assert tab.scroll.verticalScrollBar().value() > 0
