#!/usr/bin/env bash
# Remove Studio installed by packaging/linux/install.sh. The installer copies this file to ROOT/uninstall.sh.
#
#   ~/.local/share/studio-app/uninstall.sh           # keeps models, chats, settings and outputs
#   ~/.local/share/studio-app/uninstall.sh --purge   # removes those too (it lists them first)
set -euo pipefail

APP_ID="org.studioapp.Studio"
DATA_HOME="${XDG_DATA_HOME:-$HOME/.local/share}"
ROOT="$(cd "$(dirname "$0")" && pwd)"
PURGE=0
case "${1:-}" in
  --purge) PURGE=1 ;;
  "") ;;
  -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "studio uninstall: unknown option $1 (use --purge to remove models, chats and outputs too)" >&2; exit 1 ;;
esac
say() { printf 'studio uninstall: %s\n' "$*"; }

# Only ever delete a folder that looks like an installation: this script may have been copied elsewhere.
if [ ! -d "$ROOT/envs" ] || [ ! -d "$ROOT/tools" ]; then
  echo "studio uninstall: $ROOT is not a Studio installation (no envs/ and tools/); nothing removed." >&2
  exit 1
fi

# Studio says where its data folders are (they move with settings and STUDIO_HOME), as long as it runs.
FOLDERS=""
if [ -x "$ROOT/current/bin/python" ]; then
  FOLDERS="$("$ROOT/current/bin/python" -c '

from studio.cli.doctor import doctor_report
for name, path in doctor_report()["folders"].items():
    print(f"{name}\t{path}")' 2>/dev/null || true)"
fi

if [ "$PURGE" = 1 ]; then
  if [ -z "$FOLDERS" ]; then
    echo "studio uninstall: Studio no longer runs, so it cannot say where its data is; nothing was removed." >&2
    echo "Remove the folders that \`studio doctor\` listed by hand, then run this without --purge." >&2
    exit 1
  fi
  while IFS=$'\t' read -r name path; do
    [ -n "$path" ] && [ -e "$path" ] || continue
    say "removing $name: $path"
    rm -rf -- "$path"
  done <<< "$FOLDERS"
fi

rm -f "$DATA_HOME/applications/studio.desktop" "$DATA_HOME/metainfo/$APP_ID.metainfo.xml"
rm -f "$DATA_HOME"/icons/hicolor/*/apps/"$APP_ID".png "$DATA_HOME/icons/hicolor/scalable/apps/$APP_ID.svg"
if [ "$(readlink "$HOME/.local/bin/studio" 2>/dev/null)" = "$ROOT/bin/studio" ]; then
  rm -f "$HOME/.local/bin/studio"
fi
command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$DATA_HOME/applications" || true
rm -rf -- "$ROOT"
say "removed $ROOT, the desktop entry and the icons"
if [ "$PURGE" = 0 ] && [ -n "$FOLDERS" ]; then
  say "kept your models, chats and outputs (remove them with --purge next time, or by hand):"
  while IFS=$'\t' read -r name path; do say "  $name: $path"; done <<< "$FOLDERS"
fi
