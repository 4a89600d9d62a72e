"""Import rules of the source tree, checked on the syntax of every Python file in the repository.

1. Our modules are imported only as `pmdaemon.…`. The repository root is the package, so with the
   root on sys.path `import net.loop` would also work, and load a second copy of the module under a
   second name: two `IOLoop` classes, two `BackendState` enums whose members compare unequal, two
   sets of module globals. Nothing may import `net`, `actors`, `cli`, `config`, `control` or
   `states` without the prefix, nor start them with `python -m` or `importlib` by the old name.
   (ruff's TID251, configured in pyproject.toml, flags the same imports in an editor.)
2. The data plane stays below the control plane (ARCHITECTURE.md): nothing under net/ imports the
   actors, the control package or the config loader; from outside net/ it may use only the config
   model and the state enums.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
OLD_TOP_LEVEL_NAMES = frozenset({"net", "actors", "cli", "config", "control", "states"})
NOT_SOURCES = {"build", "dist", "__pycache__", ".venv"}
NET_MAY_IMPORT = ("pmdaemon.net", "pmdaemon.config.model", "pmdaemon.states")


def project_files() -> list[Path]:
    """Every .py file of the repository: package modules, tests, bench scripts, example apps."""
    return sorted(path for path in REPO.rglob("*.py")
                  if not any(part in NOT_SOURCES or part.startswith(".") or part.endswith(".egg-info")
                             for part in path.relative_to(REPO).parts[:-1]))


def imported_names(tree: ast.AST, package: str | None = None) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the tree, nested and conditional ones included.

    `from a.b import c` yields `a.b.c` (c may be a submodule). A relative import is resolved
    against `package` (the importing module's package), or skipped when that is not given.
    """
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if package is None:
                    continue
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return names


def module_name_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Module names given as text: `importlib.import_module("x")`, `runpy.run_module("x")`, `[..., "-m", "x"]`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in ("import_module", "run_module") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
        elif isinstance(node, (ast.List, ast.Tuple)):
            for flag, value in zip(node.elts, node.elts[1:]):
                if (isinstance(flag, ast.Constant) and flag.value == "-m"
                        and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                    found.append((value.lineno, value.value))
    return found


def old_name_uses(source: str) -> list[str]:
    """The imports (and module names run by text) of `source` that name our modules without `pmdaemon.`."""
    tree = ast.parse(source)
    return [f"line {line}: {name}" for line, name in imported_names(tree) + module_name_strings(tree)
            if name.split(".")[0] in OLD_TOP_LEVEL_NAMES]


@pytest.mark.parametrize("source", [
    "import net.loop", "import net", "from net.loop import IOLoop", "from actors import supervisor",
    "import cli", "from cli import main", "from config.model import Config", "import control.daemon as daemon",
    "import states", "from states import BackendState",
    "def lazy():\n    from control.runtime import Runtime",
    "importlib.import_module('actors.alb')", "subprocess.run([sys.executable, '-m', 'control.daemon'])",
])
def test_old_names_are_caught(source):
    assert old_name_uses(source)


@pytest.mark.parametrize("source", [
    "import pmdaemon.net.loop", "from pmdaemon.states import BackendState", "from pmdaemon import cli",
    "from . import loop", "from .model import Config",
    "from support.looprunner import RunningLoop", "import ioloop_http",  # test helpers, sibling bench scripts
    "import netaddr", "import configparser", "import controlled_vocabulary",
    "subprocess.run([sys.executable, '-m', 'pmdaemon.control.daemon'])",
])
def test_prefixed_and_unrelated_names_pass(source):
    assert not old_name_uses(source)


def test_the_walk_covers_the_whole_tree():
    relative = {path.relative_to(REPO).as_posix() for path in project_files()}
    for expected in ("cli.py", "states.py", "__main__.py", "net/loop.py", "actors/supervisor.py",
                     "config/loader.py", "control/daemon.py", "tests/unit/test_layout.py"):
        assert expected in relative
    assert any(name.startswith("bench/") for name in relative)
    assert not any(name.startswith("build/") for name in relative)


def test_no_module_imports_our_packages_without_the_pmdaemon_prefix():
    offenders = [f"{path.relative_to(REPO)} {use}"
                 for path in project_files() for use in old_name_uses(path.read_text())]
    assert not offenders, ("import these as pmdaemon.<name> (an unprefixed import loads a second copy of the "
                           "module):\n" + "\n".join(offenders))


def above_the_data_plane(source: str, package: str = "pmdaemon.net") -> list[str]:
    """The imports of a net/ module (in `package`) that reach pmdaemon modules net/ must not use."""
    return [f"line {line}: {name}" for line, name in imported_names(ast.parse(source), package)
            if name.split(".")[0] == "pmdaemon"
            and not any(name == allowed or name.startswith(f"{allowed}.") for allowed in NET_MAY_IMPORT)]


@pytest.mark.parametrize("source", [
    "from pmdaemon.actors.messages import Tick", "from pmdaemon.control.runtime import Runtime",
    "from pmdaemon.config.loader import load_config", "import pmdaemon.config.view", "from pmdaemon.config import diff",
    "from pmdaemon import control", "from ..actors import listener", "from ..config.loader import ConfigError",
])
def test_imports_above_the_data_plane_are_caught(source):
    assert above_the_data_plane(source)


@pytest.mark.parametrize("source", [
    "from pmdaemon.config.model import ListenerConfig", "from pmdaemon.states import BackendState",
    "import pmdaemon.states", "from pmdaemon.net.http1 import RequestReader", "from .http1 import RequestReader",
    "from ..config.model import Config", "import ssl",
])
def test_data_plane_imports_pass(source):
    assert not above_the_data_plane(source)


def test_net_imports_nothing_above_the_data_plane():
    offenders = []
    for path in sorted((REPO / "net").rglob("*.py")):
        package = ".".join(("pmdaemon", *path.relative_to(REPO).parts[:-1]))
        offenders.extend(f"{path.relative_to(REPO)} {use}" for use in above_the_data_plane(path.read_text(), package))
    assert not offenders, ("net/ is the data plane: it may import only pmdaemon.net, pmdaemon.config.model and "
                           "pmdaemon.states (ARCHITECTURE.md):\n" + "\n".join(offenders))
