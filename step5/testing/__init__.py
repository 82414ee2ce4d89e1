"""Test helpers that ship with the package (like ``optuna.testing``).

:mod:`step5.testing.fake_worker` is a torch-free stand-in for ``nn_gpu_worker.py`` and
``train_single_trial.py`` that can answer, hang, print garbage, exit with a code or kill
itself, so the pool's fault handling can be tested as a table of cases.
"""
from __future__ import annotations

import sys
from pathlib import Path

FAKE_WORKER = Path(__file__).resolve().with_name("fake_worker.py")


def fake_worker_command(*options: str, python: str = sys.executable) -> list[str]:
    """The command line that starts a fake worker with ``options`` (see its ``--help``)."""
    return [python, str(FAKE_WORKER), *options]

