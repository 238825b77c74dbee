"""Where Studio's shipped data files (the top-level `assets/` folder) are, however Studio was installed.

One function for every reader, so the layouts are handled in one place:
- a checkout or an editable install (`pip install -e .`): `assets/` beside the `studio` package;
- a wheel: the data files it installs under `<prefix>/share/studio/assets` (a venv, `--user` or system);
- a PyInstaller bundle: `assets/` in the bundle's data folder (`sys._MEIPASS`);
- `STUDIO_ASSETS`, when set, wins (packagers and tests point it at a copy).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

MARKER = "README.md"  # assets/README.md: a folder without it is some other `assets`


def asset_roots() -> list[Path]:
    """The folders looked in, in order."""
    roots: list[Path] = []
    override = os.environ.get("STUDIO_ASSETS")
    if override:
        roots.append(Path(override))
    bundle = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and bundle:
        roots.append(Path(bundle) / "assets")
    roots.append(Path(__file__).resolve().parent.parent / "assets")
    schemes = [None, f"{os.name}_user"] if os.name != "nt" else [None, "nt_user"]
    for scheme in schemes:
        try:
            data = sysconfig.get_path("data", scheme) if scheme else sysconfig.get_path("data")
        except KeyError:  # a Python built without that scheme
            continue
        roots.append(Path(data) / "share" / "studio" / "assets")
    roots.append(Path(sys.prefix) / "share" / "studio" / "assets")
    return list(dict.fromkeys(roots))


def assets_dir() -> Path:
    """The folder holding Studio's data files. Raises FileNotFoundError naming where it looked."""
    roots = asset_roots()
    for root in roots:
        if (root / MARKER).is_file():
            return root
    looked = ", ".join(str(r) for r in roots)
    raise FileNotFoundError(f"Studio's data files (icons, tokenizer vocabulary) are missing; looked in {looked}. "
                            "Reinstall Studio (packaging/linux/install.sh, or `pip install --force-reinstall` of "
                            "its wheel), or set STUDIO_ASSETS to a copy of the project's assets/ folder.")


def asset_path(*parts: str) -> Path:
    """A shipped file, e.g. asset_path("clip", "bpe_simple_vocab_16e6.txt.gz"). Raises FileNotFoundError."""
    path = assets_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"Studio's data file {'/'.join(parts)} is missing from {path.parent}: "
                                "reinstall Studio to restore it.")
    return path
