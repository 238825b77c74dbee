#!/usr/bin/env bash
# Install Studio for this user on macOS. NOT YET VERIFIED ON macOS: written and reviewed against the Linux
# installer (packaging/linux/install.sh, which is tested), following the same rules; please report what
# breaks. Needs only Python 3.10+ (python.org or Homebrew) and the package index.
#
#   bash install.sh --from studio-X.Y.Z-py3-none-any.whl [--root DIR] [--python PATH] [--torch-build pypi|cpu]
#
# ROOT (default ~/Library/Application Support/studio-app) holds tools/ (uv and the updater), envs/<version>-<n>
# and the `current` / `previous` links, exactly as on Linux; `studio update` and `studio update --rollback`
# work the same. Torch comes from the standard wheels, which include Apple's Metal (MPS) backend.
# ~/Applications/Studio.app is a small wrapper that runs ROOT/current, so updates need no new app.
# Models, chats and outputs live in ~/Library/Application Support/Studio and ~/Pictures/Studio, never in ROOT.
set -euo pipefail

UV_VERSION="0.13.9"
APP_ID="org.studioapp.Studio"
ROOT="$HOME/Library/Application Support/studio-app"
APPS="$HOME/Applications"
SOURCE=""
PYTHON=""
UPDATE_ARGS=()

say() { printf 'studio install: %s\n' "$*"; }
die() { printf 'studio install: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --from) SOURCE="${2:?--from needs a wheel file or a version}"; shift 2 ;;
    --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --torch-build) UPDATE_ARGS+=(--torch --torch-build "${2:?--torch-build needs a build name}"); shift 2 ;;
    --torch-find-links) UPDATE_ARGS+=(--torch-find-links "${2:?--torch-find-links needs a folder}"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
# PyPI's project called "studio" is an unrelated program: Studio installs from its own wheel until it is
# published under a name of its own (studio/cli/update.py, INDEX_NAME).
[ -n "$SOURCE" ] || die "give Studio's wheel with --from (make one with \`pip wheel --no-deps -w dist .\` in the project)."
[ "$(uname -s)" = Darwin ] || die "this is the macOS installer; on Linux use packaging/linux/install.sh"
if [ -f "$SOURCE" ]; then SOURCE="$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")"; fi
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"

PY=""
for candidate in ${PYTHON:-python3.13 python3.12 python3.11 python3.10 python3}; do
  # /usr/bin/python3 may be Xcode's 3.9 stub: the version check skips it.
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    PY="$(command -v "$candidate")"; break
  fi
done
[ -n "$PY" ] || die "Studio needs Python 3.10 or newer: install it from python.org or with \`brew install python@3.12\`, \
or name one with --python."

TOOLS="$ROOT/tools"
if [ ! -x "$TOOLS/bin/uv" ]; then
  "$PY" -m venv "$TOOLS" || die "$PY cannot create virtual environments."
  say "installing uv $UV_VERSION from the package index"
  "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" ||
    die "could not install uv from the package index: check the network connection, then run this again."
fi
"$TOOLS/bin/uv" pip install --quiet --python "$TOOLS/bin/python" --no-deps --reinstall "$SOURCE" ||
  die "could not get Studio ($SOURCE) from the package index or that file."
"$TOOLS/bin/python" -m studio.cli.update --root "$ROOT" --from "$SOURCE" --python "$PY" \
  ${UPDATE_ARGS[@]+"${UPDATE_ARGS[@]}"} || die "the install did not finish; nothing was switched (see above)."
ASSETS="$ROOT/current/share/studio/assets"

mkdir -p "$ROOT/bin" "$HOME/.local/bin"
printf '#!/bin/sh\nexec "%s/current/bin/studio" "$@"\n' "$ROOT" > "$ROOT/bin/studio"
chmod 755 "$ROOT/bin/studio"
ln -sfn "$ROOT/bin/studio" "$HOME/.local/bin/studio"

# A minimal app bundle: Finder and the Dock start it like any other app.
APP="$APPS/Studio.app"
rm -rf "$APP"
mkdir -p "$APP/Contents/MacOS" "$APP/Contents/Resources"
cp "$ASSETS/icons/studio.icns" "$APP/Contents/Resources/studio.icns"
printf '#!/bin/sh\nexec "%s/current/bin/studio" "$@"\n' "$ROOT" > "$APP/Contents/MacOS/Studio"
chmod 755 "$APP/Contents/MacOS/Studio"
VERSION="$("$ROOT/current/bin/python" -c 'import studio; print(studio.__version__)')"
cat > "$APP/Contents/Info.plist" <<PLIST
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0"><dict>
  <key>CFBundleName</key><string>Studio</string>
  <key>CFBundleIdentifier</key><string>$APP_ID</string>
  <key>CFBundleExecutable</key><string>Studio</string>
  <key>CFBundleIconFile</key><string>studio.icns</string>
  <key>CFBundlePackageType</key><string>APPL</string>
  <key>CFBundleShortVersionString</key><string>$VERSION</string>
  <key>LSMinimumSystemVersion</key><string>12.0</string>
  <key>NSHighResolutionCapable</key><true/>
</dict></plist>
PLIST

# The uninstaller: the Linux one, plus the app bundle.
{ cat "$ROOT/current/share/studio/packaging/uninstall.sh"; printf '\nrm -rf "%s"\n' "$APP"; } > "$ROOT/uninstall.sh"
chmod 755 "$ROOT/uninstall.sh"

say "done: open Studio from $APPS, or run $HOME/.local/bin/studio"
say "update: studio update   back to the previous version: studio update --rollback"
say "remove: \"$ROOT/uninstall.sh\"   (keeps models, chats and outputs; --purge removes them too)"
