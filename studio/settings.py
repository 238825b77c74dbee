"""User settings: one JSON file, written atomically, with defaults for anything missing."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from studio.fsutil import atomic_write
from studio.paths import Paths

log = logging.getLogger("studio.settings")


@dataclass
class Settings:
    model_folders: list[str] = field(default_factory=list)  # scanned for models (ComfyUI, A1111, HF cache...)
    outputs_folder: str = ""  # "" = the platform's Pictures/Studio
    models_folder: str = ""  # where added and downloaded models go; "" = Paths.models
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps, xpu
    vram_budget: str = ""  # "" = all of it (minus the reserve); e.g. "6GiB"
    vram_reserve: str = "1GiB"  # left free for the desktop and other apps
    theme: str = "system"  # system, light, dark
    window_geometry: str = ""  # hex of QWidget.saveGeometry()
    window_state: str = ""
    last_tab: int = 2  # Chat: the one thing that works with no model installed
    engine_address: str = ""  # HOST:PORT of `studio engine serve` on another machine; "" = the local engine
    engine_token: str = ""  # that engine's token (this file is written 0600)
    first_run_done: bool = False  # the welcome card was shown (Help > Welcome shows it again)
    chat_servers: list[str] = field(default_factory=list)  # OpenAI-compatible base URLs (keys: OS keychain)
    api_serve: bool = False  # serve the window's engine over the OpenAI-compatible API
    api_port: int = 8420

    @classmethod
    def load(cls, paths: Paths) -> Settings:
        path = settings_path(paths)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested 100,000 deep
            # Keep the damaged file for the user; start from defaults rather than refuse to open.
            log.warning("settings file %s is unreadable (%s); using defaults", path, exc)
            try:
                path.replace(path.with_suffix(".json.broken"))
            except OSError:
                pass
            return cls()
        known = {f.name: f for f in fields(cls)}
        clean = {}
        for key, value in data.items() if isinstance(data, dict) else ():
            default = getattr(cls(), key) if key in known else None
            if key not in known or type(value) is not type(default):  # bool is not an int here
                continue
            if isinstance(value, list):
                value = [v for v in value if isinstance(v, str)]  # folders are text; drop anything else
            clean[key] = value
        return cls(**clean)

    def save(self, paths: Paths) -> None:
        path = settings_path(paths)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(self), indent=2))

    def outputs_path(self, paths: Paths) -> Path:
        return Path(self.outputs_folder).expanduser() if self.outputs_folder else paths.outputs

    def models_path(self, paths: Paths) -> Path:
        return Path(self.models_folder).expanduser() if self.models_folder else paths.models


def settings_path(paths: Paths) -> Path:
    return paths.config / "settings.json"
