"""Where a job's files go: `out` names a file (its stem is used, numbered if taken) or a folder;
empty means the outputs folder from Settings, one subfolder per day."""

from __future__ import annotations

import time
from pathlib import Path

from studio.engine.context import JobContext


def output_target(out: str, suffix: str, ctx: JobContext, fallback: Path) -> tuple[Path, str]:
    """(folder, file stem) for a job. The caller creates the file without overwriting anything."""
    if out:
        path = Path(out).expanduser()
        if path.suffix.lower() == suffix:
            return path.parent, path.stem
        return path, time.strftime("%Y%m%d-%H%M%S")
    folder = ctx.settings.get("outputs") or str(fallback)
    return Path(folder) / time.strftime("%Y-%m-%d"), time.strftime("%H%M%S")
