"""The project as a user gets it: built and installed (not editable) into a clean virtualenv.

The repository root is the package (pyproject's `package-dir = {pmdaemon = "."}`), so a packaging
mistake would not show in the editable install the other tests run against: a subpackage missing
from the wheel, or `net`, `actors`, `cli`, ... landing at the top of site-packages where they
shadow or collide with other distributions. These tests install a copy of the working tree into a
virtualenv without system site-packages (so nothing from the development environment leaks in),
run Python from an empty directory (so the current directory cannot stand in for the install), and
look only at what the wheel put there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
OLD_TOP_LEVEL_NAMES = ["net", "actors", "cli", "config", "control", "states"]
# Build leftovers and caches of the working tree: copying them could smuggle stale modules into the wheel.
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                     ".hypothesis", ".venv")


class InstalledVenv:
    """A virtualenv holding the installed project; commands run from an empty directory."""

    def __init__(self, root: Path, workdir: Path):
        self.root = root
        self.workdir = workdir
        self.python = root / "bin" / "python"
        self.site_packages = Path(self.run_python("import sysconfig; print(sysconfig.get_path('purelib'))")
                                  .stdout.strip())

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.root)
        return env

    def run(self, *argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(arg) for arg in argv], cwd=self.workdir, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def run_python(self, code: str) -> subprocess.CompletedProcess:
        return self.run(self.python, "-c", code)

    def dist_info(self) -> Path:
        (path,) = self.site_packages.glob("pmdaemon-*.dist-info")
        return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> InstalledVenv:
    """Build and install the working tree once for the module (a few seconds with a warm pip cache)."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    root = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    workdir = base / "cwd"
    workdir.mkdir()
    installed = InstalledVenv(root, workdir)
    # The venv's own setuptools may be older than the build requires: let pip's build isolation fetch it.
    result = installed.run(installed.python, "-m", "pip", "install", "--no-input", source, timeout=240)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return installed


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_the_only_top_level_name_installed_is_pmdaemon(venv):
    top_level = (venv.dist_info() / "top_level.txt").read_text().split()
    assert top_level == ["pmdaemon"]
    record = (venv.dist_info() / "RECORD").read_text().splitlines()
    in_site_packages = {line.split(",")[0].split("/")[0] for line in record if not line.startswith("../")}
    assert in_site_packages == {"pmdaemon", venv.dist_info().name}


def test_every_subpackage_is_installed(venv):
    result = venv.run_python("import pmdaemon.actors, pmdaemon.net, pmdaemon.config, pmdaemon.control, "
                             "pmdaemon.cli, pmdaemon.states, pmdaemon.control.daemon, pmdaemon.net.loop; "
                             "print(pmdaemon.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(venv.site_packages)


@pytest.mark.parametrize("name", OLD_TOP_LEVEL_NAMES)
def test_old_top_level_names_are_not_importable(venv, name):
    result = venv.run_python(f"import {name}")
    assert result.returncode != 0
    assert f"No module named '{name}'" in result.stderr


def test_version_prints_the_installed_version(venv):
    result = venv.run(venv.root / "bin" / "pmdaemon", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == project_version()


def test_python_dash_m_help(venv):
    result = venv.run(venv.python, "-m", "pmdaemon", "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "pmdaemon start <config>" in result.stdout
