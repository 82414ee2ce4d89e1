"""step5.testing.postgres: a server whose test run was killed before teardown does not outlive it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from step5.launch import child_environment
from step5.testing.postgres import TemporaryPostgres

KILLED_RUN = """
import os, signal, sys
from step5.testing.postgres import TemporaryPostgres
pg = TemporaryPostgres().start()
print(pg.root, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a test run killed before its teardown
"""


def test_the_server_of_a_killed_run_is_stopped_and_removed_by_the_next_start(postgres_server):
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN], capture_output=True, text=True,
                          env=child_environment(), timeout=120)
    assert proc.returncode == -9, proc.stderr
    root = Path(proc.stdout.strip())
    postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
    assert psutil.pid_exists(postmaster)  # the killed run left its server running

    stopped = TemporaryPostgres().stop_orphaned()

    assert root in stopped and not root.exists()
    assert not psutil.pid_exists(postmaster) or psutil.Process(postmaster).status() == psutil.STATUS_ZOMBIE
    # The session's own server belongs to a live process: left alone.
    assert postgres_server.root is not None and postgres_server.root.exists()
    assert postgres_server.root not in stopped
