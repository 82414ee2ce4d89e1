"""The package's doors: pyproject.toml's console scripts and ranges, the lock, ``python -m``.

The slow counterpart, tests/test_install.py, installs a clean copy into a fresh venv; these
checks are the cheap ones that keep pyproject.toml, the lock and the code in step.
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from step5 import launch
from step5.policy import PROJECT_POLICY_PATH

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _name(requirement: str) -> str:
    """PEP 503 normalised distribution name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _declared(*extras: str) -> set[str]:
    names = {_name(r) for r in PROJECT["dependencies"]}
    for extra in extras:
        names |= {_name(r) for r in PROJECT["optional-dependencies"][extra]}
    return names


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the step5 files importing it, for every non-stdlib import."""
    found: dict[str, set[str]] = {}
    for path in (REPO_ROOT / "step5").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top not in ("step5", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_every_door_has_a_console_script():
    scripts = PROJECT["scripts"]
    targets = {name: target.split(":") for name, target in scripts.items()}
    modules = {module for module, _ in targets.values()}
    # the optimizer, the predictor, the WATCHER, the worker and the one-shot trainer
    assert {"step5.optimizer.cli", "step5.predictor", "step5.watcher.cli", launch.WORKER_MODULE,
            launch.ONESHOT_MODULE} <= modules
    for name, (module, func) in targets.items():
        if module in (launch.WORKER_MODULE, launch.ONESHOT_MODULE):
            continue  # torch side: not imported into the test process just to find `main`
        assert callable(getattr(importlib.import_module(module), func)), name


def test_every_third_party_import_is_a_declared_dependency():
    to_dist = importlib.metadata.packages_distributions()
    declared = _declared(*PROJECT["optional-dependencies"])
    undeclared = {
        module: sorted(files) for module, files in _third_party_imports().items()
        if not {_name(d) for d in to_dist.get(module, [module])} & declared
    }
    assert not undeclared, f"imported by step5 but not in pyproject.toml: {undeclared}"


def test_every_required_dependency_is_used():
    to_dist = importlib.metadata.packages_distributions()
    used = {_name(d) for module in _third_party_imports() for d in to_dist.get(module, [module])}
    assert not _declared() - used, "pyproject.toml requires packages step5 never imports"


def test_the_lock_pins_every_declared_dependency_exactly():
    lock = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and "+" not in version, f"the lock pins exact public versions, got {line!r}"
            lock[_name(name)] = version
    missing = _declared(*PROJECT["optional-dependencies"]) - set(lock)
    assert not missing, f"declared in pyproject.toml but not pinned in requirements.txt: {sorted(missing)}"


def test_the_projects_policy_ships_in_the_package():
    assert PROJECT_POLICY_PATH.parent == REPO_ROOT / "step5"
    assert PROJECT_POLICY_PATH.read_bytes() == (REPO_ROOT / "watcher_policies.json").read_bytes()
    assert PROJECT_POLICY_PATH.name in PYPROJECT["tool"]["setuptools"]["package-data"]["step5"]


@pytest.mark.parametrize("module", [
    "step5.data.sample", launch.OPTIMIZER_MODULE, "step5.predictor", launch.ONESHOT_MODULE, launch.WORKER_MODULE,
])
def test_python_m_runs_without_a_runpy_warning(module):
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-P", "-m", module, "--help"],
                          capture_output=True, text=True, timeout=120, env=launch.child_environment())
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    assert "usage:" in proc.stdout + proc.stderr


_DATA = ["--survivors", "s.json", "--lottery-data", "h.json"]


@pytest.mark.parametrize("module, argv, flag", [
    ("step5.optimizer.cli", [*_DATA, "--output-dir", ""], "--output-dir"),
    ("step5.optimizer.cli", ["--survivors", "", "--lottery-data", "h.json"], "--survivors"),
    ("step5.optimizer.cli", [*_DATA, "--policy", " "], "--policy"),
    ("step5.optimizer.cli", [*_DATA, "--cluster-config", ""], "--cluster-config"),
    ("step5.predictor", ["--model-dir", "", "--survivors", "s.json"], "--model-dir"),
    ("step5.predictor", ["--model-dir", "m", "--survivors", "s.json", "--output", ""], "--output"),
    ("step5.data.sample", ["--out", ""], "--out"),
    ("step5.watcher.cli", ["--status", "--decision-log", ""], "--decision-log"),
    ("step5.watcher.cli", ["--run-pipeline", "--dry-run", "--policy", ""], "--policy"),
])
def test_an_empty_path_is_a_usage_error_not_the_working_directory(module, argv, flag, tmp_path, monkeypatch, capsys):
    """``--output-dir "$OUT"`` with OUT unset once trained into the working directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main(argv)
    assert stopped.value.code == 64
    assert f"argument {flag}: expected a path, got an empty value" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("door", ["meta_prediction_optimizer_anti_overfit.py", "agents/watcher_agent.py",
                                  "train_single_trial.py"])
def test_a_python_without_a_dependency_gets_one_line_naming_it(door):
    # The pipeline's WATCHER runs the step with whatever `python3` is on its PATH and keeps
    # the first 500 characters of stderr: a traceback's top, not the line naming the package.
    hide = "import runpy, sys; sys.modules['msgspec'] = sys.modules['orjson'] = None; "
    done = subprocess.run(
        [sys.executable, "-c", hide + f"sys.argv = [{door!r}, '--help']; runpy.run_path({door!r}, run_name='__main__')"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {sys.executable} cannot import "), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr) < 500
    assert f"-m pip install -e {REPO_ROOT}" in done.stderr
