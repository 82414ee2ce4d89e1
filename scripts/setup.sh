#!/usr/bin/env bash
# Create .venv and install this checkout into it, editable, with the locked versions
# (idempotent; fast when already done).
#
# Editable (-e): the venv's step5 IS this checkout. The tests import step5 from here and
# start workers with `python -m step5.nn.worker`, and the console scripts (step5-optimize,
# ...) run the code being edited, with no reinstall after each change. What is installed
# only changes with pyproject.toml (dependencies, entry points) or the lock, so those two
# files make the stamp. tests/test_install.py installs a clean clone NON-editable into a
# fresh venv, which is what a user gets.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.install.sha256
want=$(cat pyproject.toml requirements.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c requirements.txt -e ".[trees,postgres,test]"
    echo "$want" > "$stamp"
fi
# Byte-compile the checkout (only what changed; a fraction of a second). An editable install
# leaves that to the first import, and where PYTHONDONTWRITEBYTECODE is set, as on this
# machine kind, every process (each worker, each CLI run, the ~400 a test run starts) would
# compile step5 again: 0.13 s of CPU per optimizer start, 0.08 s per torch worker.
.venv/bin/python -m compileall -q step5 bench
