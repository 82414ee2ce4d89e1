#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite on every core (pytest-xdist;
# work stealing, so that a core that runs out of tests takes some of the other's queue).
# Extra arguments go to pytest: `-m "not slow"` is the fast tier, `-n 0` runs in one
# process (for pdb), a path or `-k` picks tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check --quiet .
exec .venv/bin/python -m pytest -n auto --dist worksteal "$@"
