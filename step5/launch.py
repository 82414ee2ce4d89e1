"""How one Step 5 process starts another: ``python -P -m <module>``, with this same step5.

Children start from the package, never from a script beside the repository, so an
installed step5 runs from any directory; ``-P`` keeps the working directory (an old
checkout's ``step5/``) off the child's ``sys.path``, and :func:`child_environment` makes a
checkout that was never installed importable. Torch-free: the parent imports this.
"""
from __future__ import annotations

import os
import site
import sys
from pathlib import Path
from typing import Mapping

#: The directory that holds the ``step5`` package this process imported.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

#: The entry modules children are started with; pyproject.toml's console scripts call their ``main``.
WORKER_MODULE = "step5.nn.worker"
ONESHOT_MODULE = "step5.nn.oneshot"
OPTIMIZER_MODULE = "step5.optimizer"


def module_command(module: str, python: str = sys.executable) -> list[str]:
    """The argv prefix that runs ``module`` (``python -m``) in a child interpreter."""
    return [python, "-P", "-m", module]


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ours) with this process's step5 first on ``PYTHONPATH``.

    An installed step5 sits in a site directory the child finds by itself; adding that
    directory would put every installed package ahead of the standard library, so only a
    checkout (any non-site location) is added.
    """
    env = dict(os.environ if base is None else base)
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    if PACKAGE_ROOT in {Path(d).resolve() for d in site_dirs}:
        return env
    parts = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def missing_dependency(exc: ModuleNotFoundError) -> str:
    """One line for a door whose Python lacks a package Step 5 needs. The pipeline's WATCHER runs
    the step with whatever ``python3`` is on its PATH and keeps only the first 500 characters of
    its stderr: a traceback's top, never its last line, the one that names the package."""
    return (f"error: {sys.executable} cannot import {exc.name!r}, which Step 5 needs: install Step 5 into this "
            f"Python ({sys.executable} -m pip install -e {PACKAGE_ROOT}) or run it with the Python it is installed in")
