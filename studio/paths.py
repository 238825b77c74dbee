"""Where Studio keeps things. Every folder can be moved with STUDIO_HOME (tests use it)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP = "Studio"


@dataclass(frozen=True)
class Paths:
    config: Path  # settings.json
    data: Path  # SQLite databases (library, chats, gallery)
    cache: Path
    logs: Path
    models: Path  # where copied / installed models go
    outputs: Path  # generated images and videos
    runtime: Path  # private (0700) folder for the engine socket

    @classmethod
    def default(cls) -> Paths:
        home = os.environ.get("STUDIO_HOME")
        if home:
            root = Path(home)
            return cls(root / "config", root / "data", root / "cache", root / "logs",
                       root / "models", root / "outputs", root / "run")
        dirs = platformdirs.PlatformDirs(APP, appauthor=False)
        data = Path(dirs.user_data_dir)
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (ssh, containers)
            warnings.simplefilter("ignore")
            runtime = Path(dirs.user_runtime_dir) if os.name == "posix" else Path(dirs.user_cache_dir) / "run"
        return cls(Path(dirs.user_config_dir), data, Path(dirs.user_cache_dir), Path(dirs.user_log_dir),
                   data / "models", Path(platformdirs.user_pictures_dir()) / APP, runtime)

    def ensure(self) -> Paths:
        for p in (self.config, self.data, self.cache, self.logs):
            p.mkdir(parents=True, exist_ok=True)
        return self

    def runtime_dir(self) -> Path:
        """The socket folder, created private. Refuses one that others can read."""
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.name == "posix":
            os.chmod(self.runtime, 0o700)
        return self.runtime
