"""WATCHER pipeline runner (SPEC section 9); the code lives in :mod:`step5.watcher`.

    PYTHONPATH=. python3 agents/watcher_agent.py --run-pipeline --start-step 5 --end-step 5 \\
        --params '{"compare_models": true, "trials": 20}'
"""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a script from anywhere, not only with PYTHONPATH=. from the repository root.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from step5.launch import missing_dependency  # noqa: E402 (standard library only)

try:
    from step5.watcher.cli import main
except ModuleNotFoundError as exc:
    sys.exit(missing_dependency(exc))

if __name__ == "__main__":
    sys.exit(main())
