"""How one Step 5 process starts another: ``python -P -m <module>``, with this same step5.

::

    parent (optimizer, pool, WATCHER)            child
    ─────────────────────────────────            ─────────────────────────────────────
    module_command(WORKER)          ──argv──▶  python -P -m step5.nn.worker
    child_environment(env)          ──env───▶  PYTHONPATH=<dir holding this step5>:...

Children start from the *package*, never from a path next to the repository
(``nn_gpu_worker.py``), so a pip-installed step5 runs from any directory. Each child
imports exactly the step5 its parent imported:

* ``-P`` keeps the working directory off the child's ``sys.path``: a folder that happens
  to hold another ``step5/`` (an old checkout) cannot shadow the parent's code;
* :func:`child_environment` puts the directory holding the parent's ``step5`` first on
  ``PYTHONPATH`` unless it is already a site directory (an installed package), so a
  checkout that was never installed works too.

Torch-free: the parent imports this.
"""
from __future__ import annotations

import os
import site
import sys
from pathlib import Path
from typing import Mapping

#: The directory that holds the ``step5`` package this process imported.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

#: The entry modules children are started with (``python -m``). Their console scripts in
#: pyproject.toml call the same modules' ``main``.
WORKER_MODULE = "step5.nn.worker"
ONESHOT_MODULE = "step5.nn.oneshot"
OPTIMIZER_MODULE = "step5.optimizer"


def module_command(module: str, python: str = sys.executable) -> list[str]:
    """The argv prefix that runs ``module`` (``python -m``) in a child interpreter."""
    return [python, "-P", "-m", module]


def _site_directories() -> set[Path]:
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    dirs.append(site.getusersitepackages())
    return {Path(d).resolve() for d in dirs}


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ours) with this process's step5 importable in a child.

    An installed step5 sits in a site directory the child finds by itself; adding that
    directory to ``PYTHONPATH`` would put every installed package ahead of the standard
    library, so it is added only for a checkout (or any other non-site location).
    """
    env = dict(os.environ if base is None else base)
    if PACKAGE_ROOT in _site_directories():
        return env
    parts = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env
