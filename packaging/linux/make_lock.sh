#!/usr/bin/env bash
# Regenerate packaging/linux/requirements.lock: every dependency of Studio pinned, for every platform
# and Python >= 3.10 (uv's universal resolution), resolved against the torch release Studio is tested
# with but without torch itself and its CUDA-only wheels (the installer picks the torch build for the
# machine, from its own index). Run it after changing dependencies in pyproject.toml, then commit the lock.
#
#   bash packaging/linux/make_lock.sh            # needs uv (pip install uv) and the package index
set -euo pipefail
cd "$(dirname "$0")/../.."
UV="${UV:-$(command -v uv || echo .venv/bin/uv)}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
TORCH=$(PYTHONPATH=. "$PY" -c "from studio.cli.update import TORCH_VERSION; print(TORCH_VERSION)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH" > "$constraints"
"$UV" pip compile pyproject.toml --universal --python-version 3.10 --no-header --quiet \
  -c "$constraints" --no-emit-package torch |
  grep -v -E '^(nvidia-|cuda-|triton==)' |
  { echo "# Studio's dependencies, pinned (packaging/linux/make_lock.sh; torch $TORCH excluded: the installer"
    echo "# picks its build). Shipped in the wheel as share/studio/packaging/requirements.lock."
    cat; } > packaging/linux/requirements.lock
echo "wrote packaging/linux/requirements.lock ($(grep -c '==' packaging/linux/requirements.lock) pins, torch $TORCH)"
