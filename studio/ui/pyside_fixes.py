"""Work around a reference-counting bug in PySide6's Signal.emit (seen in 6.12.0 on CPython 3.11).

`SignalInstance.emit()` returns `True` without taking a reference to it, so every emit from Python takes
one reference away from the `True` object. After some thousands of emits (a few long chat answers: one
per token through QtEngine, one more through the tab's JobRunner) `True` is freed while still in use and
the app aborts, typically on quit: "Fatal Python error: bool_dealloc: deallocating True or False".

The fix below is measured, not assumed from a version number: one emit on a private signal shows whether
`True` loses a reference. Only then is `True` given a very large number of spare references, once, so it
can never reach zero in any real session. On CPython 3.12+ `True` is immortal and the probe sees no loss.
"""

from __future__ import annotations

import ctypes
import sys

from PySide6.QtCore import QObject, Signal

SPARE_REFERENCES = 1 << 40  # a million emits a second for over a week


class _Probe(QObject):
    ping = Signal()


def emit_steals_true() -> bool:
    """Whether one Signal.emit() from Python leaves `True` with one reference fewer."""
    probe = _Probe()
    before = sys.getrefcount(True)
    probe.ping.emit()
    return sys.getrefcount(True) < before


def guard_true_refcount() -> bool:
    """Apply the workaround when this PySide6 needs it (once per process); returns whether it was applied now."""
    if sys.getrefcount(True) > SPARE_REFERENCES // 2:  # applied already
        return False
    if not emit_steals_true():
        return False
    # ob_refcnt is the first field of every CPython object; only CPython has this layout and this bug here.
    ctypes.c_ssize_t.from_address(id(True)).value += SPARE_REFERENCES
    return True
