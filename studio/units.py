"""Byte sizes as users write and read them, and the machine's RAM. Torch-free: the window uses these too."""

from __future__ import annotations

import os

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SIZE_UNITS = {"gib": GiB, "gb": 10**9, "g": GiB, "mib": MiB, "mb": 10**6,
               "m": MiB, "kib": KiB, "kb": 1000, "k": KiB, "b": 1, "": 1}


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '6G', '1.5GB', '123' -> bytes. Raises ValueError with a usable message."""
    s = text.strip().lower().replace(" ", "")
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            number = s[: len(s) - len(unit)] if unit else s
            try:
                value = float(number)
            except ValueError:
                break
            if value < 0:
                break
            return int(value * _SIZE_UNITS[unit])
    raise ValueError(f"cannot read {text!r} as a size: write it like 4GiB or 512MiB")


def fmt_bytes(n: int | float) -> str:
    """2.0 TiB / 4.8 GiB / 300.0 MiB / 12.0 KiB / 512 B: the binary units users see in messages and panels."""
    n = float(n)
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def ram_info() -> tuple[int, int]:
    """(total, available) system RAM in bytes, without psutil; 0 where the system does not say."""
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if ":" in line}
        return info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return pages * size, 0
    except (ValueError, OSError, AttributeError):
        return 0, 0
