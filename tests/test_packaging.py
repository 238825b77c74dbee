"""Packaging: shipped assets, the torch-build picker, environment switching and rollback, the frozen spawn.

The fast tests run in the normal suite. The installer and bundle tests take minutes and need the
package index; they are marked `packaging` and run only with `--packaging`:

    .venv/bin/python -m pytest -q --packaging tests/test_packaging.py
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from studio.cli import update
from studio.cli.update import InstallRoot, UpdateError, pick_torch
from studio.resources import asset_path, assets_dir

ROOT = Path(__file__).resolve().parent.parent
APP_ID = "org.studioapp.Studio"


# ---------------------------------------------------------------------------------------- assets
def test_assets_are_found_in_the_checkout() -> None:
    assert assets_dir() == ROOT / "assets"
    assert asset_path("clip", "bpe_simple_vocab_16e6.txt.gz").is_file()


def test_studio_assets_overrides_and_a_missing_file_names_what_to_do(tmp_path, monkeypatch) -> None:
    (tmp_path / "README.md").write_text("copy")
    monkeypatch.setenv("STUDIO_ASSETS", str(tmp_path))
    assert assets_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="reinstall Studio"):
        asset_path("clip", "nothing.gz")


def test_no_assets_anywhere_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("studio.resources.asset_roots", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(FileNotFoundError, match="STUDIO_ASSETS"):
        assets_dir()


def test_icons_match_their_generator() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "packaging" / "make_icons.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"stale icons, rerun packaging/make_icons.py:\n{done.stdout}{done.stderr}"


def test_desktop_entry_and_metainfo_name_the_same_app() -> None:
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # keys are case-sensitive in desktop files
    entry.read(ROOT / "assets" / "linux" / "studio.desktop")
    desktop = entry["Desktop Entry"]
    meta = ET.parse(ROOT / "assets" / "linux" / f"{APP_ID}.metainfo.xml").getroot()
    assert meta.findtext("id") == APP_ID == desktop["Icon"]
    assert meta.findtext("launchable") == "studio.desktop"
    assert desktop["Exec"].split()[0] == "studio"  # install.sh rewrites exactly this to an absolute path
    for size in (16, 24, 32, 48, 64, 128, 256, 512):
        assert (ROOT / "assets" / "icons" / f"studio-{size}.png").is_file()


@pytest.mark.skipif(shutil.which("desktop-file-validate") is None or shutil.which("appstreamcli") is None,
                    reason="needs desktop-file-utils and appstream (apt-get install desktop-file-utils appstream)")
def test_desktop_entry_and_metainfo_validate() -> None:
    linux = ROOT / "assets" / "linux"
    for cmd in (["desktop-file-validate", str(linux / "studio.desktop")],
                ["appstreamcli", "validate", "--no-net", str(linux / f"{APP_ID}.metainfo.xml")]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_lock_pins_everything_but_torch() -> None:
    lines = [x for x in (ROOT / "packaging" / "linux" / "requirements.lock").read_text().splitlines()
             if x and not x.lstrip().startswith("#")]
    names = {x.split("==")[0].strip().lower() for x in lines}
    assert all("==" in x for x in lines)
    assert {"pyside6-essentials", "safetensors", "tokenizers", "platformdirs"} <= names
    assert "torch" not in names and not any(n.startswith("nvidia-") for n in names)


def test_installer_scripts_parse() -> None:
    for script in ("install.sh", "uninstall.sh", "make_lock.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "packaging" / "linux" / script)], capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


# ---------------------------------------------------------------------------------- torch picker
@pytest.mark.parametrize(("smi", "build"), [
    ("580.95.05\n", "cu130"),
    ("575.57.08\n", "cu128"),
    ("570.86.15\n570.86.15\n", "cu128"),  # one line per GPU
    ("535.104.05\n", "cu126"),
    ("525.60.13\n", "cu126"),
])
def test_nvidia_driver_picks_the_newest_cuda_build_it_runs(smi: str, build: str) -> None:
    picked = pick_torch(smi, None, "Linux", "x86_64")
    assert picked.build == build
    assert picked.index_url == f"https://download.pytorch.org/whl/{build}"
    assert smi.split()[0] in picked.reason


def test_old_nvidia_driver_falls_back_to_cpu_and_says_to_update_it() -> None:
    picked = pick_torch("470.82.01\n", None, "Linux", "x86_64")
    assert picked.build == "cpu" and "Update the NVIDIA driver" in picked.reason


def test_nvidia_smi_without_a_version_falls_back_to_cpu() -> None:
    picked = pick_torch("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", None,
                        "Linux", "x86_64")
    assert picked.build == "cpu" and "no driver version" in picked.reason


def test_rocm_gpu_picks_the_rocm_build() -> None:
    rocminfo = "Agent 2\n  Name:                    gfx1100\n  Marketing Name:          Radeon RX 7900 XTX\n"
    picked = pick_torch(None, rocminfo, "Linux", "x86_64")
    assert picked.build == update.ROCM_BUILD and "gfx1100" in picked.reason


def test_rocminfo_with_only_a_cpu_agent_is_cpu() -> None:
    assert pick_torch(None, "Agent 1\n  Name:  AMD Ryzen 9 7950X\n", "Linux", "x86_64").build == "cpu"


def test_no_gpu_picks_cpu_and_other_systems_the_default_wheels() -> None:
    assert pick_torch(None, None, "Linux", "x86_64").build == "cpu"
    assert pick_torch(None, None, "Darwin", "arm64").build == "pypi"
    assert pick_torch(None, None, "Linux", "aarch64").build == "pypi"
    assert pick_torch("560.94\n", None, "Windows", "AMD64").build == "cu126"


def test_probe_runs_nvidia_smi_from_path(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 572.16\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert update.probe_torch_build().build == "cu128"
    fake.write_text("#!/bin/sh\nexit 9\n")  # a driver that is not loaded: the tool fails
    assert update.probe_torch_build().build == "cpu"


# ------------------------------------------------------------------------ switching and rollback
def _env(root: InstallRoot, name: str) -> Path:
    env = root.envs / name
    (env / "bin").mkdir(parents=True)
    return env


def test_switch_keeps_the_previous_env_and_rollback_swaps_back(tmp_path) -> None:
    root = InstallRoot(tmp_path)
    first, second = _env(root, "0.1.0-1"), _env(root, "0.2.0-2")
    root.switch_to(first)
    assert root.current() == first.resolve() and root.previous() is None
    root.switch_to(second)
    assert (root.current(), root.previous()) == (second.resolve(), first.resolve())
    assert root.rollback() == first.resolve()
    assert (root.current(), root.previous()) == (first.resolve(), second.resolve())
    root.rollback()
    assert root.current() == second.resolve()
    assert os.readlink(tmp_path / "current") == "envs/0.2.0-2"  # relative: the root can move


def test_rollback_without_a_previous_env_says_so(tmp_path) -> None:
    root = InstallRoot(tmp_path)
    root.switch_to(_env(root, "0.1.0-1"))
    with pytest.raises(UpdateError, match="no previous environment"):
        root.rollback()


def test_switch_refuses_a_folder_outside_envs(tmp_path) -> None:
    root = InstallRoot(tmp_path / "root")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UpdateError, match="not an environment"):
        root.switch_to(tmp_path / "elsewhere")


def test_prune_keeps_current_and_previous_only(tmp_path) -> None:
    root = InstallRoot(tmp_path)
    envs = [_env(root, f"0.{i}.0-{i}") for i in range(1, 5)]
    root.switch_to(envs[1])
    root.switch_to(envs[3])
    removed = root.prune()
    assert sorted(p.name for p in removed) == ["0.1.0-1", "0.3.0-3"]
    assert root.env_names() == ["0.2.0-2", "0.4.0-4"]


def test_env_numbers_never_repeat_and_staging_is_not_an_env(tmp_path) -> None:
    root = InstallRoot(tmp_path)
    assert root.next_number() == 1
    _env(root, "0.1.0-1")
    (root.envs / ".staging-2").mkdir()
    assert root.next_number() == 3
    assert root.env_names() == ["0.1.0-1"]


def _fake_build(root: InstallRoot, name: str):
    def build(*args, **kwargs) -> Path:
        return _env(root, name)
    return build


def test_update_switches_only_after_the_health_check_passes(tmp_path, monkeypatch) -> None:
    root = InstallRoot(tmp_path)
    old = _env(root, "0.1.0-1")
    root.switch_to(old)
    monkeypatch.setattr(update, "build_env", _fake_build(root, "0.2.0-2"))
    monkeypatch.setattr(update, "health_check", lambda env: (False, "problem: torch does not work"))
    with pytest.raises(UpdateError, match="stays on"):
        update.update(root, None)
    assert root.current() == old.resolve() and root.env_names() == ["0.1.0-1"]

    monkeypatch.setattr(update, "build_env", _fake_build(root, "0.2.0-3"))
    monkeypatch.setattr(update, "health_check", lambda env: (True, "healthy"))
    new = update.update(root, None)
    assert root.current() == new.resolve() and root.previous() == old.resolve()


def test_an_update_keeps_the_current_torch_unless_asked(tmp_path, monkeypatch) -> None:
    root = InstallRoot(tmp_path)
    env = _env(root, "0.1.0-1")
    record = {"torch": {"version": "2.13.0+cu128", "build": "cu128", "find_links": "",
                        "index_url": "https://download.pytorch.org/whl/cu128", "reason": "driver 570"}}
    (env / update.INSTALL_RECORD).write_text(__import__("json").dumps(record))
    root.switch_to(env)
    kept = update._torch_plan(root, repick=False, build=None, find_links=None)
    assert (kept["version"], kept["build"]) == ("2.13.0+cu128", "cu128") and "never changes torch" in kept["reason"]
    monkeypatch.setattr(update, "probe_torch_build", lambda: pick_torch(None, None, "Linux", "x86_64"))
    repicked = update._torch_plan(root, repick=True, build=None, find_links=None)
    assert (repicked["version"], repicked["build"]) == (update.TORCH_VERSION, "cpu")
    asked = update._torch_plan(root, repick=True, build="cu128", find_links=None)
    assert asked["index_url"].endswith("/cu128")
    with pytest.raises(UpdateError, match="Unknown torch build"):
        update._torch_plan(root, repick=True, build="cu999", find_links=None)


def test_sources_are_wheels_until_studio_has_an_index_name(tmp_path, monkeypatch) -> None:
    wheel = tmp_path / "studio-0.2.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert update._spec(str(wheel)) == str(wheel)
    with pytest.raises(UpdateError, match="does not exist"):
        update._spec(str(tmp_path / "missing-0.3.0-py3-none-any.whl"))
    # PyPI's "studio" is another program: a version or no --from must never install it by name
    for source in ("0.2.0", None, "studio"):
        with pytest.raises(UpdateError, match="different program"):
            update._spec(source)
    monkeypatch.setattr(update, "INDEX_NAME", "studio-desktop")
    assert update._spec("0.2.0") == update._spec("studio-desktop==0.2.0") == "studio-desktop==0.2.0"
    assert update._spec(None) == "studio-desktop"
    with pytest.raises(UpdateError, match="neither a wheel"):
        update._spec("the newest please")


def test_find_root_from_an_env_and_a_clear_error_elsewhere(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("STUDIO_INSTALL_ROOT", raising=False)
    env = _env(InstallRoot(tmp_path), "0.1.0-1")
    assert update.find_root(env).root == tmp_path.resolve()
    (tmp_path / "tools").mkdir()
    assert update.find_root(tmp_path / "tools").root == tmp_path.resolve()
    with pytest.raises(UpdateError, match="install.sh"):
        update.find_root(tmp_path / "envs" / "0.1.0-1" / "lib")


def test_rollback_from_the_command_line(tmp_path, capsys) -> None:
    root = InstallRoot(tmp_path)
    first, second = _env(root, "0.1.0-1"), _env(root, "0.2.0-2")
    root.switch_to(first)
    root.switch_to(second)
    assert update.main(["--root", str(tmp_path), "--rollback"]) == 0
    assert "0.1.0-1" in capsys.readouterr().out and root.current() == first.resolve()
    assert update.main(["--root", str(tmp_path / "nothing"), "--rollback"]) == 1
    assert "no previous environment" in capsys.readouterr().err


# ------------------------------------------------------------------------------- doctor, spawning
def test_doctor_check_passes_here_and_names_a_missing_model(monkeypatch) -> None:
    from studio.cli import doctor
    from studio.errors import UserError

    assert doctor.health_problems() == []

    def missing():
        raise UserError("model_not_found", "The bundled chat model is not installed.")

    monkeypatch.setattr("studio.models.bundled.default_chat_model", missing)
    assert doctor.health_problems() == ["The bundled chat model is not installed."]


def test_a_frozen_app_starts_its_engine_from_its_own_executable(monkeypatch) -> None:
    from studio.client import engine_command

    assert engine_command()[:2] == [sys.executable, "-c"] and engine_command()[-1] == "engine"
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert engine_command() == [sys.executable, "engine"]
    assert engine_command("/opt/python3")[:2] == ["/opt/python3", "-c"]  # an explicit Python still wins


# ------------------------------------------------------------------ slow: installer and bundle
def _torch_wheels() -> Path | None:
    """A folder holding a torch wheel for this machine (the test may reach PyPI only, not PyTorch's index)."""
    for folder in (os.environ.get("STUDIO_TEST_TORCH_FIND_LINKS"), "/opt/wheels"):
        if folder and any(Path(folder).glob("torch-*.whl")):
            return Path(folder)
    return None


def _build_wheel(src: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, timeout=600)
    return max(out.glob("studio-*.whl"), key=lambda p: p.stat().st_mtime)


def _next_version_tree(tmp: Path) -> tuple[Path, str]:
    """A copy of the project whose version is one step newer, to update to."""
    import studio

    src = tmp / "next"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "__pycache__",
                                                             "*.egg-info", "tests", "benchmarks", "docs"))
    new = f"{studio.__version__}.post1"
    for rel, old_text, new_text in (("pyproject.toml", f'version = "{studio.__version__}"', f'version = "{new}"'),
                                    ("studio/__init__.py", f'__version__ = "{studio.__version__}"',
                                     f'__version__ = "{new}"')):
        text = (src / rel).read_text()
        assert old_text in text, f"{rel} no longer holds {old_text!r}"
        (src / rel).write_text(text.replace(old_text, new_text))
    return src, new


@pytest.mark.packaging
@pytest.mark.timeout(1800)
def test_linux_installer_installs_updates_rolls_back_and_uninstalls(tmp_path) -> None:
    import studio

    torch_wheels = _torch_wheels()
    if torch_wheels is None:
        pytest.skip("no local torch wheel: set STUDIO_TEST_TORCH_FIND_LINKS to a folder holding one")
    for tool in ("desktop-file-validate", "appstreamcli", "xvfb-run"):
        assert shutil.which(tool), f"{tool} is missing: apt-get install desktop-file-utils appstream xvfb"
    wheel = _build_wheel(ROOT, tmp_path / "wheels")
    next_src, next_version = _next_version_tree(tmp_path)
    next_wheel = _build_wheel(next_src, tmp_path / "wheels-next")

    home = tmp_path / "home"
    home.mkdir()
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "STUDIO_HOME", "PYTHONPATH", "STUDIO_INSTALL_ROOT", "STUDIO_ASSETS")
           and not k.startswith("XDG_")}
    env.update(HOME=str(home), PATH=os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin),
               UV_CACHE_DIR=os.environ.get("UV_CACHE_DIR", str(Path("/tmp") / "studio-packaging-uv-cache")))

    def run(*cmd: str | Path, timeout: int = 900) -> str:
        done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=tmp_path)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{out[-4000:]}"
        return out

    base_python = getattr(sys, "_base_executable", sys.executable)
    out = run("bash", ROOT / "packaging" / "linux" / "install.sh", "--from", wheel, "--python", base_python,
              "--torch-find-links", torch_wheels)
    assert "torch 2." in out and "doctor --check: healthy" in out
    share = home / ".local" / "share"
    root, studio_cmd = share / "studio-app", home / ".local" / "bin" / "studio"
    assert os.readlink(root / "current") == f"envs/{studio.__version__}-1"
    run("desktop-file-validate", share / "applications" / "studio.desktop")
    run("appstreamcli", "validate", "--no-net", share / "metainfo" / f"{APP_ID}.metainfo.xml")
    assert (share / "icons" / "hicolor" / "256x256" / "apps" / f"{APP_ID}.png").is_file()

    out = run("xvfb-run", "-a", "env", "STUDIO_EXIT_WHEN_READY=1", studio_cmd, timeout=300)
    assert "engine ready" in out

    models = Path(run(root / "current" / "bin" / "python", "-c",
                      "from studio.paths import Paths; print(Paths.default().models)").strip().splitlines()[-1])
    assert home in models.parents  # the user's data folder, not the install root
    models.mkdir(parents=True, exist_ok=True)
    (models / "my-model.gguf").write_bytes(b"GGUF keep me")

    out = run(studio_cmd, "update", "--from", next_wheel)
    assert "kept from the current environment" in out  # torch untouched without --torch
    assert run(studio_cmd, "--version").strip() == f"studio {next_version}"
    assert os.readlink(root / "previous") == f"envs/{studio.__version__}-1"

    run(studio_cmd, "update", "--rollback")
    assert run(studio_cmd, "--version").strip() == f"studio {studio.__version__}"
    assert os.readlink(root / "current") == f"envs/{studio.__version__}-1"

    out = run(root / "uninstall.sh")
    assert not root.exists() and not studio_cmd.exists()
    assert not (share / "applications" / "studio.desktop").exists()
    assert (models / "my-model.gguf").read_bytes() == b"GGUF keep me"
    assert str(models) in out  # it says what it kept


@pytest.mark.packaging
@pytest.mark.timeout(3600)
def test_pyinstaller_bundle_answers_a_chat_with_no_python_on_path(tmp_path) -> None:
    done = subprocess.run(["bash", str(ROOT / "packaging" / "pyinstaller" / "build_and_test.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=3500)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "Paris" in out and "build_and_test: PASS" in out
