"""The architecture's one hard line: only the torch side (step5/nn, and Step 6's predictor)
imports torch; everything the parent optimizer, the pool and the WATCHER load stays
torch-free, so the parent never creates a CUDA context."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "step5"
TORCH_SIDE = {PACKAGE / "nn", PACKAGE / "predictor.py"}


def _torch_free_modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py")
        if not any(p == side or side in p.parents for side in TORCH_SIDE)
    )


def _imports_torch(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            lines.append(node.lineno)
    return lines


def test_no_torch_free_module_imports_torch_even_lazily():
    offenders = {str(p.relative_to(REPO_ROOT)): _imports_torch(p) for p in _torch_free_modules()}
    assert {k: v for k, v in offenders.items() if v} == {}


def _packages_loaded_by_importing(paths: list[Path], watched: set[str]) -> list[str]:
    """Which of the ``watched`` top-level packages a fresh interpreter has loaded once it has
    imported the modules at ``paths``."""
    modules = [".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__") for p in paths]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(watched)!r}))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_importing_every_torch_free_module_loads_no_torch():
    assert _packages_loaded_by_importing(_torch_free_modules(), {"torch"}) == []


def test_the_worker_and_the_one_shot_trainer_boot_without_scipy_or_sklearn():
    """Booting is what the persistent workers save and what every one-shot fold still pays:
    the torch side loads torch and numpy, not scikit-learn (about 1 s more with scipy). The
    entry modules import the training core lazily, so every module of the package is
    imported, a new one included."""
    booted = sorted((PACKAGE / "nn").glob("*.py"))
    assert _packages_loaded_by_importing(booted, {"sklearn", "scipy", "optuna"}) == []
