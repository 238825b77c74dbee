#!/usr/bin/env bash
# Install Studio for this user: no root, nothing outside ~/.local, only Python 3.10+ and the package index.
#
#   bash install.sh --from studio-0.2.0-py3-none-any.whl
#   bash install.sh --from studio-0.2.0-py3-none-any.whl --torch-build cpu   # choose the torch build
#
# What it does:
#   1. puts uv (from PyPI) and Studio's updater in ROOT/tools (a small venv);
#   2. builds ROOT/envs/<version>-<n>: Studio's dependencies pinned by the lock file its wheel carries
#      (packaging/linux/requirements.lock), the torch build this machine needs (NVIDIA driver -> CUDA
#      build, ROCm -> ROCm build, else CPU; it says which and why), the bundled chat model; checks it with
#      `studio doctor --check`; points ROOT/current at it (studio/cli/update.py does this part);
#   3. adds the `studio` command (~/.local/bin), the desktop entry, icons and AppStream data;
#   4. writes ROOT/uninstall.sh, which keeps models, chats and outputs unless given --purge.
# Running it again installs into a new environment and keeps the previous one (like `studio update`).
# Models, chats and outputs live in Studio's data folders (`studio doctor` lists them), never in ROOT.
set -euo pipefail

UV_VERSION="0.13.9"  # the uv this installer is tested with
APP_ID="org.studioapp.Studio"
DATA_HOME="${XDG_DATA_HOME:-$HOME/.local/share}"
ROOT="$DATA_HOME/studio-app"
SOURCE=""
PYTHON=""
DESKTOP=1
UPDATE_ARGS=()

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF

Options:
  --from WHEEL               a Studio wheel file (required: Studio is not on the package index yet)
  --root DIR                where to install (default: $ROOT)
  --python PATH             the Python 3.10+ to build on (default: the newest python3.x found)
  --torch-build BUILD       cpu, cu126, cu128, cu130, rocm6.4 or pypi instead of detecting it
  --torch-find-links DIR    also look for torch wheels in DIR (offline installs, tests)
  --no-desktop              skip the desktop entry and icons
EOF
}

say() { printf 'studio install: %s\n' "$*"; }
die() { printf 'studio install: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --from) SOURCE="${2:?--from needs a wheel file or a version}"; shift 2 ;;
    --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --torch-build) UPDATE_ARGS+=(--torch --torch-build "${2:?--torch-build needs a build name}"); shift 2 ;;
    --torch-find-links) UPDATE_ARGS+=(--torch-find-links "${2:?--torch-find-links needs a folder}"); shift 2 ;;
    --no-desktop) DESKTOP=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# PyPI's project called "studio" is an unrelated program: Studio installs from its own wheel until it is
# published under a name of its own (studio/cli/update.py, INDEX_NAME).
[ -n "$SOURCE" ] || die "give Studio's wheel with --from (make one with \`pip wheel --no-deps -w dist .\` in the project)."
# A wheel given by a relative path must still be found after the `cd`s of the tools below.
if [ -f "$SOURCE" ]; then SOURCE="$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")"; fi
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"

find_python() {
  local candidate
  for candidate in ${PYTHON:-python3.13 python3.12 python3.11 python3.10 python3}; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}
PY="$(find_python)" || die "Studio needs Python 3.10 or newer. Install it (Debian/Ubuntu: sudo apt install python3 \
python3-venv; Fedora: sudo dnf install python3), or name one with --python."
say "building on $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# 1. tools/: uv and the updater. A venv, so nothing touches the system's Python packages.
TOOLS="$ROOT/tools"
if [ ! -x "$TOOLS/bin/uv" ]; then
  if ! "$PY" -m venv "$TOOLS" >/dev/null 2>&1; then
    rm -rf "$TOOLS"
    die "$PY cannot create virtual environments. Install the venv module (Debian/Ubuntu: sudo apt install \
python3-venv), then run this again."
  fi
  say "installing uv $UV_VERSION from the package index"
  "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" ||
    die "could not install uv from the package index: check the network connection, then run this again."
fi
# The updater is Studio itself, without dependencies: studio.cli.update uses the standard library only.
"$TOOLS/bin/uv" pip install --quiet --python "$TOOLS/bin/python" --no-deps --reinstall "$SOURCE" ||
  die "could not get Studio ($SOURCE) from the package index or that file."

# 2. the environment: built, checked, then made current (or nothing changes).
"$TOOLS/bin/python" -m studio.cli.update --root "$ROOT" --from "$SOURCE" --python "$PY" ${UPDATE_ARGS[@]+"${UPDATE_ARGS[@]}"} ||
  die "the install did not finish; nothing was switched. The lines above say what failed."
CURRENT="$ROOT/current"
ASSETS="$CURRENT/share/studio/assets"

# 3. the command, the desktop entry, icons.
mkdir -p "$ROOT/bin"
cat > "$ROOT/bin/studio" <<EOF
#!/bin/sh
# Studio's launcher: runs whichever environment is current (studio update / --rollback switch it).
exec "$CURRENT/bin/studio" "\$@"
EOF
chmod 755 "$ROOT/bin/studio"
mkdir -p "$HOME/.local/bin"
if [ ! -e "$HOME/.local/bin/studio" ] || [ "$(readlink "$HOME/.local/bin/studio")" = "$ROOT/bin/studio" ]; then
  ln -sfn "$ROOT/bin/studio" "$HOME/.local/bin/studio"
else
  say "kept the existing $HOME/.local/bin/studio (not ours); Studio's command is $ROOT/bin/studio"
fi

if [ "$DESKTOP" = 1 ]; then
  apps="$DATA_HOME/applications"; icons="$DATA_HOME/icons/hicolor"; meta="$DATA_HOME/metainfo"
  mkdir -p "$apps" "$meta" "$icons/scalable/apps"
  # Absolute, quoted paths: a desktop session's PATH often lacks ~/.local/bin.
  sed -e "s|^Exec=studio|Exec=\"$ROOT/bin/studio\"|" -e "s|^TryExec=studio|TryExec=$ROOT/bin/studio|" \
    "$ASSETS/linux/studio.desktop" > "$apps/studio.desktop"
  cp "$ASSETS/linux/$APP_ID.metainfo.xml" "$meta/"
  for size in 16 24 32 48 64 128 256 512; do
    mkdir -p "$icons/${size}x${size}/apps"
    cp "$ASSETS/icons/studio-$size.png" "$icons/${size}x${size}/apps/$APP_ID.png"
  done
  cp "$ASSETS/icon.svg" "$icons/scalable/apps/$APP_ID.svg"
  # Menus pick the entry up on their own; these only refresh caches where the tools exist.
  command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$apps" || true
  command -v gtk-update-icon-cache >/dev/null 2>&1 && gtk-update-icon-cache -q -t "$icons" 2>/dev/null || true
  say "added Studio to the applications menu ($apps/studio.desktop)"
fi

# 4. the uninstaller, from the version just installed.
cp "$CURRENT/share/studio/packaging/uninstall.sh" "$ROOT/uninstall.sh"
chmod 755 "$ROOT/uninstall.sh"

say "done. Start Studio from the applications menu or with: $HOME/.local/bin/studio"
say "update: studio update   back to the previous version: studio update --rollback"
say "remove: $ROOT/uninstall.sh   (keeps models, chats and outputs; --purge removes them too)"
case ":$PATH:" in *":$HOME/.local/bin:"*) ;; *) say "note: $HOME/.local/bin is not on PATH in this shell" ;; esac
