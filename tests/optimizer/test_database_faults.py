"""A shared study survives its database (docs/cluster.md, "When the database goes away").

The real optimizer CLI with a fake trainer (``python -m step5.testing.fake_search``) runs a
PostgreSQL study of this module's own throwaway server, and disturbs it at a chosen moment
(``--fault-at``): ``pg_ctl restart -m fast`` (started in the background, so that it races
the calls that follow, as a real restart would), an outage (stopped, started again 3 s
later: longer than the first retries), or every connection to the study's database killed
on the server (``pg_terminate_backend``). With one process and with two (the second a
``--search-only`` helper that meets the same fault wherever it is), the run ends with exit
0, exactly ``--trials`` COMPLETE trials, no configuration twice and no traceback. An
outage longer than ``training.storage_outage_s`` or an error waiting cannot fix (a role
that does not exist, a dropped table) ends every process with one error line and exit 1,
and the same command run again resumes the study.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import FrozenTrial, TrialState

from step5.testing import stored_trials

TRIALS = 6
OUTAGE_S = 3


def _restart(pg: Any, database: str) -> str:
    return f"({shlex.join(pg.ctl_command('restart'))}) >/dev/null 2>&1 &"


def _outage(pg: Any, database: str) -> str:
    return f"{shlex.join(pg.ctl_command('stop'))}; (sleep {OUTAGE_S}; {shlex.join(pg.ctl_command('start'))}) >/dev/null 2>&1 &"


def _terminate(pg: Any, database: str) -> str:
    return shlex.join(pg.sql_command("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                                 f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"))


FAULTS = {"restart": _restart, "outage": _outage, "terminate": _terminate}


class Study:
    """One study on the module's server, and the optimizer processes run on it."""

    def __init__(self, pg: Any, tmp_path: Path, sample_inputs: Any, repo_root: Path, python: str, name: str,
                 *, policy: dict[str, Any] | None = None) -> None:
        self.pg, self.tmp, self.python = pg, tmp_path, python
        self.database = name
        self.url = pg.create_database(self.database)
        self.inputs = sample_inputs
        self.policy = tmp_path / "policy.json"
        self.policy.write_text(json.dumps(policy or {}))
        tmp = tmp_path / "tmpdir"
        tmp.mkdir(exist_ok=True)
        self.env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(repo_root)}

    def command(self, index: int, *, fault_at: str | None = None, fault: str | None = None,
                url: str | None = None) -> list[str]:
        survivors, history = self.inputs
        cmd = [self.python, "-m", "step5.testing.fake_search", "--job-sleep-s", "0.05",
               # Processes start searching together (run): one that came up late on a loaded
               # machine would find the study already asked to the end by the others, and the
               # first process's fault point (its second ask or tell) would never come.
               "--ready-file", str(self.tmp / f"ready{index}"), "--go-file", str(self.tmp / "go")]
        if fault_at:
            cmd += ["--fault-at", fault_at, "--fault", fault or ""]
        cmd += ["--", "--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "neural_net",
                "--k-folds", "2", "--cpu-workers", "1", "--seed", "3", "--trials", str(TRIALS),
                "--policy", str(self.policy), "--storage", url or self.url, "--study-name", "shared",
                "--output-dir", str(self.tmp / f"out{index}")]
        return cmd + (["--search-only"] if index else [])

    def run(self, processes: int, *, fault_at: str | None = None, fault: str | None = None,
            url: str | None = None, server_back: bool = True) -> list[tuple[int, str]]:
        """Start ``processes`` optimizers at once (the first one injects the fault); their exit
        codes and stderr. ``server_back``: wait until the server takes connections again."""
        go = self.tmp / "go"
        go.unlink(missing_ok=True)
        for i in range(processes):
            (self.tmp / f"ready{i}").unlink(missing_ok=True)
        procs = [subprocess.Popen(self.command(i, fault_at=fault_at if i == 0 else None, fault=fault, url=url),
                                  cwd=self.tmp, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for i in range(processes)]
        try:
            deadline = time.monotonic() + 120
            while not all((self.tmp / f"ready{i}").exists() or p.poll() is not None for i, p in enumerate(procs)):
                assert time.monotonic() < deadline, "the optimizer processes did not come up"
                time.sleep(0.05)
            go.touch()
            done = [(p.wait(timeout=240), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                p.stderr.close()  # type: ignore[union-attr]
        if server_back:
            self.pg.wait_ready()  # a background restart may still be under way
        return done

    def trials(self) -> list[FrozenTrial]:
        return stored_trials(self.url, "shared")

    def assert_complete(self) -> Counter:
        trials = self.trials()
        states = Counter(t.state.name for t in trials)
        assert states["COMPLETE"] == TRIALS and not states["RUNNING"] and not states["WAITING"], states
        params = [tuple(sorted(t.params.items())) for t in trials if t.state == TrialState.COMPLETE]
        assert len(set(params)) == TRIALS, "a configuration was run twice"
        return states


@pytest.fixture
def study(own_postgres_server, tmp_path, sample_inputs, repo_root, python, request):
    own_postgres_server.wait_ready()
    name = "f_" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]  # one database per test case
    return Study(own_postgres_server, tmp_path, sample_inputs, repo_root, python, name)


def _no_traceback(runs: list[tuple[int, str]]) -> None:
    for _code, err in runs:
        assert "Traceback" not in err, err[-3000:]


CASES = [
    # (fault, where, processes); where: ask:N / tell:N as the N-th ask / tell of the first
    # process starts (N = 2: its first batch, which it has whatever the other process takes),
    # final, commit
    ("restart", "ask:2", 1),
    ("restart", "tell:2", 1),
    ("restart", "final", 1),
    ("restart", "commit", 1),
    ("outage", "tell:2", 1),
    ("terminate", "ask:2", 1),
    pytest.param("restart", "ask:2", 2, marks=pytest.mark.slow),
    pytest.param("restart", "tell:2", 2, marks=pytest.mark.slow),
    pytest.param("restart", "final", 2, marks=pytest.mark.slow),
    pytest.param("restart", "commit", 2, marks=pytest.mark.slow),
    ("outage", "ask:2", 2),
    pytest.param("terminate", "tell:2", 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fault, where, processes", CASES)
def test_a_run_rides_out_a_database_fault(study, fault, where, processes):
    runs = study.run(processes, fault_at=where, fault=FAULTS[fault](study.pg, study.database))
    assert f"fake_search: fault at {where} exited 0" in runs[0][1]
    assert [code for code, _ in runs] == [0] * processes, "\n\n".join(err[-3000:] for _, err in runs)
    _no_traceback(runs)
    study.assert_complete()
    assert (study.tmp / "out0" / "best_model.meta.json").exists()
    if fault == "terminate" and where.startswith("ask"):  # the lock's connection, in use as the ask starts
        assert "the study lock's database connection was lost" in runs[0][1], runs[0][1][-3000:]
    if fault == "outage":  # every process met it: one line when it started waiting, one when the database was back
        for _, err in runs:
            assert err.count("waiting for the study database") == 1, err[-3000:]
            assert err.count("is back after") == 1, err[-3000:]


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_an_outage_past_the_limit_ends_each_process_in_one_line_and_a_rerun_resumes(
    own_postgres_server, tmp_path, sample_inputs, repo_root, python, processes,
):
    pg = own_postgres_server
    pg.wait_ready()
    study = Study(pg, tmp_path, sample_inputs, repo_root, python, f"f_past_limit_{processes}",
                  policy={"training": {"storage_outage_s": 2}})
    try:
        runs = study.run(processes, fault_at="tell:2", fault=shlex.join(pg.ctl_command("stop")), server_back=False)
    finally:
        if not pg.is_running():
            pg.start_server()
        pg.wait_ready()
    assert [code for code, _ in runs] == [1] * processes, "\n\n".join(err[-3000:] for _, err in runs)
    _no_traceback(runs)
    for _, err in runs:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err[-3000:]
        assert "the study database postgresql+psycopg://step5@127.0.0.1:" in errors[0]
        assert "training.storage_outage_s (2s)" in errors[0] and "run the same command again" in errors[0]
    left = Counter(t.state.name for t in study.trials())
    assert left["COMPLETE"] < TRIALS
    # The same command again: the dead run's trials are failed at once (their owner died on
    # this host) and re-run; the study ends with exactly --trials complete ones.
    again = study.run(processes)
    assert [code for code, _ in again] == [0] * processes, "\n\n".join(err[-3000:] for _, err in again)
    _no_traceback(again)
    states = study.assert_complete()
    if left["RUNNING"]:
        assert states["FAIL"] >= left["RUNNING"]
        assert any("failed_trial" in t.system_attrs for t in study.trials() if t.state == TrialState.COMPLETE)


def test_bad_credentials_end_the_run_at_once_in_one_line_without_the_password(study):
    url = study.url.replace("step5@", "nobody:hunter2@")
    start = time.monotonic()
    ((code, err),) = study.run(1, url=url)
    assert code == 1, err[-3000:]
    assert time.monotonic() - start < 60  # no waiting for an outage that is not one
    _no_traceback([(code, err)])
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: the study database postgresql+psycopg://nobody:***@127.0.0.1:")
    assert 'role "nobody" does not exist' in line and "hunter2" not in err
    assert "waiting for the study database" not in err


def test_a_dropped_table_ends_the_run_in_one_line(study):
    drop = shlex.join(study.pg.sql_command(study.database, "DROP TABLE trial_user_attributes CASCADE"))
    ((code, err),) = study.run(1, fault_at="tell:2", fault=drop)
    assert code == 1, err[-3000:]
    _no_traceback([(code, err)])
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"/{study.database} failed while" in line and "UndefinedTable" in line
