"""The retrying study storage (step5.optimizer.storage), in-process on SQLite.

The hard case of a retried write is a commit that reached the database but whose answer
was lost: these tests put a fault in front of the real storage that fails a call either
before it reaches the database or right after it was applied, and check that every
retried call has the effect of exactly one.
"""
from __future__ import annotations

import logging
import sqlite3
from typing import Any

import optuna
import psycopg
import pytest
import sqlalchemy
import sqlalchemy.exc as sa_exc
from optuna.trial import TrialState

from step5.errors import StorageError
from step5.optimizer import search
from step5.optimizer.storage import (
    OWNER_ATTR,
    TOKEN_ATTR,
    DatabaseRetry,
    RetryingStorage,
    describe,
    is_transient,
    redact_storage,
)
from step5.optimizer.study import (
    StudyLock,
    open_storage,
    open_study,
    reclaim_dead_trials,
    retry_failed_trial,
)
from step5.owner import this_process
from step5.policy import TrainingPolicy

SETUP = {"model_type": "neural_net", "seed": 1, "k_folds": 2}
DATA = {"fingerprint_hash": "abc", "survivor_count": 10, "training_window_draws": 5}


def _dropped() -> Exception:
    """What Optuna raises when the server cut the connection under a call."""
    cut = sa_exc.OperationalError("COMMIT", {}, psycopg.errors.AdminShutdown("terminating connection due to "
                                                                             "administrator command"),
                                  connection_invalidated=True)
    try:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cut
    except optuna.exceptions.StorageInternalError as exc:
        return exc


def _refused() -> Exception:
    return sa_exc.OperationalError("connect", {}, psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?"))


# ---------------------------------------------------------------- what is transient


@pytest.mark.parametrize("error, transient", [
    (_dropped(), True),
    (_refused(), True),
    (sa_exc.OperationalError("connect", {}, psycopg.OperationalError(
        "connection failed: ... failed: FATAL:  the database system is starting up")), True),
    (sa_exc.OperationalError("x", {}, psycopg.errors.CannotConnectNow("the database system is starting up")), True),
    (sa_exc.OperationalError("x", {}, psycopg.errors.TooManyConnections("sorry, too many clients")), True),
    (sa_exc.OperationalError("x", {}, psycopg.errors.DeadlockDetected("deadlock detected")), True),
    (sa_exc.OperationalError("connect", {}, psycopg.OperationalError(
        'connection failed: ... failed: FATAL:  password authentication failed for user "step5"')), False),
    (sa_exc.OperationalError("connect", {}, psycopg.OperationalError(
        'connection failed: ... failed: FATAL:  role "nobody" does not exist')), False),
    (sa_exc.OperationalError("connect", {}, psycopg.OperationalError(
        'connection failed: ... failed: FATAL:  database "nodb" does not exist')), False),
    (sa_exc.ProgrammingError("SELECT", {}, psycopg.errors.UndefinedTable('relation "trials" does not exist')), False),
    (sa_exc.OperationalError("x", {}, sqlite3.OperationalError("disk I/O error")), False),
    (sa_exc.ArgumentError("Could not parse SQLAlchemy URL"), False),  # a usage error, not a database one
    (optuna.exceptions.UpdateFinishedTrialError("finished"), False),
    (KeyError("no study"), False),
])
def test_transient_errors_are_told_from_the_rest(error, transient):
    assert is_transient(error) is transient


def test_sqlite_busy_is_transient():
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5  # type: ignore[attr-defined] - what sqlite3 sets on a real SQLITE_BUSY
    assert is_transient(sa_exc.OperationalError("x", {}, busy))


def test_an_error_is_described_in_one_line_without_sql():
    assert describe(_refused()) == ('OperationalError: connection failed: connection to server at "127.0.0.1", '
                                    "port 5432 failed: Connection refused")
    assert describe(_dropped()) == "AdminShutdown: terminating connection due to administrator command"
    assert redact_storage("postgresql+psycopg://step5:hunter2@db/x") == "postgresql+psycopg://step5:***@db/x"


# ---------------------------------------------------------------- the outage clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_an_outage_is_waited_out_with_backoff_and_logged_once_each_way(caplog):
    clock = FakeClock()
    retry = DatabaseRetry("db://x", outage_s=60, clock=clock, sleep=clock.sleep)
    failures = iter([_refused()] * 6)

    def call() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    with caplog.at_level(logging.WARNING, logger="step5.optimizer.storage"):
        assert retry.call(call, "testing") == "ok"
    assert len(clock.slept) == 6
    assert clock.slept[0] < 0.3 and all(b > a for a, b in zip(clock.slept[:4], clock.slept[1:5]))  # doubles
    assert max(clock.slept) <= 5.0 * 1.25
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("waiting for the study database db://x (OperationalError")
    assert lines[1].startswith("the study database db://x is back after")
    assert retry.outages == 1


def test_past_the_limit_the_process_gives_up_in_one_line_and_later_calls_do_not_wait():
    clock = FakeClock()
    retry = DatabaseRetry("postgresql+psycopg://step5:***@db/x", outage_s=10, clock=clock, sleep=clock.sleep)

    def down() -> None:
        raise _refused()

    with pytest.raises(StorageError) as info:
        retry.call(down, "testing")
    message = str(info.value)
    assert "\n" not in message and "postgresql+psycopg://step5:***@db/x" in message
    assert "training.storage_outage_s (10s)" in message and "Connection refused" in message
    assert 10 <= clock.now <= 10.5
    slept = len(clock.slept)
    with pytest.raises(StorageError):
        retry.call(down, "cleaning up")
    assert len(clock.slept) == slept  # the way out does not wait again


def test_an_error_waiting_cannot_fix_stops_at_once():
    clock = FakeClock()
    retry = DatabaseRetry("db://x", outage_s=60, clock=clock, sleep=clock.sleep)

    def missing_table() -> None:
        raise sa_exc.ProgrammingError("SELECT", {}, psycopg.errors.UndefinedTable('relation "trials" does not exist'))

    with pytest.raises(StorageError, match='failed while testing: UndefinedTable: relation "trials" does not exist. '
                                           r"Waiting cannot fix this: check the --storage URL \(user, password, "):
        retry.call(missing_table, "testing")
    assert clock.slept == []


@pytest.mark.parametrize("fault, said, advice", [
    ("full", "database or disk is full", "the disk holding the database file is full: free room there, then run the "
                                         "same command again to resume the study (its finished trials are kept)"),
    ("read-only", "attempt to write a readonly database", "the database file or its folder is read-only for this user"),
])
def test_a_sqlite_file_that_refuses_a_write_is_advised_on_the_file_not_the_url(tmp_path, fault, said, advice):
    """Real SQLite refusals: a database at its page limit fails as a full disk does (SQLITE_FULL)."""
    path = tmp_path / "optuna_step5.db"
    sqlalchemy.create_engine(f"sqlite:///{path}").connect().close()  # the file exists
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x BLOB)")
    engine = sqlalchemy.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true" if fault == "read-only"
                                      else f"sqlite:///{path}")
    if fault == "full":
        sqlalchemy.event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA max_page_count = 3"))

    def write() -> None:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (zeroblob(100000))"))

    with pytest.raises(StorageError) as info:
        DatabaseRetry("sqlite:///x.db", outage_s=60).call(write, "recording a trial")
    assert str(info.value) == (f"the study database sqlite:///x.db failed while recording a trial: OperationalError: "
                               f"{said}. Waiting cannot fix this: {advice}")
    engine.dispose()


# ---------------------------------------------------------------- retried writes apply once


class Flaky:
    """Stands in front of the real (cached) storage: the chosen call fails once, either
    before it reaches the database (``applied=False``) or right after (``applied=True``,
    the lost answer of a commit that landed)."""

    def __init__(self, inner: Any, method: str, *, applied: bool, when: Any = None) -> None:
        self.inner, self.method, self.applied, self.when = inner, method, applied, when
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.inner, name)
        if name != self.method:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.failed or (self.when is not None and not self.when(*args, **kwargs)):
                return real(*args, **kwargs)
            self.failed += 1
            if self.applied:
                real(*args, **kwargs)
            raise _dropped()

        return call


def _storage(tmp_path, name="s") -> tuple[RetryingStorage, optuna.Study]:
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", TrainingPolicy(storage_outage_s=30))
    storage.retry.first_wait_s = 0.01
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    return storage, study


@pytest.mark.parametrize("applied", [False, True])
def test_an_ask_whose_creation_failed_makes_exactly_one_trial_born_with_its_owner(tmp_path, applied):
    storage, study = _storage(tmp_path)
    storage._inner = flaky = Flaky(storage._inner, "create_new_trial", applied=applied)
    trial = study.ask()
    assert flaky.failed == 1
    (only,) = study.trials
    assert only.number == trial.number and only.state == TrialState.RUNNING
    assert only.user_attrs[OWNER_ATTR] == this_process().to_dict() and TOKEN_ATTR in only.system_attrs


@pytest.mark.parametrize("applied", [False, True])
def test_a_tell_whose_write_failed_completes_the_trial_once(tmp_path, applied):
    storage, study = _storage(tmp_path)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    storage._inner = flaky = Flaky(storage._inner, "set_trial_state_values", applied=applied)
    frozen = study.tell(trial, 0.5)
    assert flaky.failed == 1 and frozen.state == TrialState.COMPLETE and frozen.value == 0.5
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_a_tell_meeting_a_trial_another_process_failed_keeps_that_verdict(tmp_path):
    storage, study = _storage(tmp_path)
    trial = study.ask()
    storage._inner.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # failed elsewhere meanwhile
    storage._inner = Flaky(storage._inner, "set_trial_state_values", applied=False)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [0.5])
    assert study.trials[0].state == TrialState.FAIL


@pytest.mark.parametrize("applied, returned", [(False, True), (True, False)])
def test_a_failed_fail_reports_false_when_it_may_have_been_another_process(tmp_path, applied, returned):
    # True only when this call's own write is known to be the one that failed the trial:
    # a caller queues a re-run on True, and two re-runs of one trial would run it twice.
    storage, study = _storage(tmp_path)
    trial = study.ask()
    storage._inner = Flaky(storage._inner, "set_trial_state_values", applied=applied)
    assert storage.set_trial_state_values(trial._trial_id, TrialState.FAIL) is returned
    assert study.trials[0].state == TrialState.FAIL


@pytest.mark.parametrize("applied", [False, True])
def test_taking_a_queued_trial_whose_write_failed_takes_it_once(tmp_path, applied):
    storage, study = _storage(tmp_path)
    study.enqueue_trial({"x": 0.25})
    storage._inner = flaky = Flaky(storage._inner, "set_trial_state_values", applied=applied,
                                   when=lambda trial_id, state, values=None: state == TrialState.RUNNING)
    trial = study.ask()
    assert flaky.failed == 1
    assert trial.suggest_float("x", 0.0, 1.0) == 0.25
    (only,) = study.trials
    assert only.state == TrialState.RUNNING and only.user_attrs[OWNER_ATTR] == this_process().to_dict()


def test_a_queued_trial_another_process_took_is_not_taken_again(tmp_path):
    storage, study = _storage(tmp_path)
    study.enqueue_trial({"x": 0.25})
    (queued,) = study.trials
    other = {**this_process().to_dict(), "pid": 1}

    def taken_by_another(trial_id: int, state: TrialState, values: Any = None) -> bool:
        # The first attempt dies before it reaches the database; meanwhile another process takes the trial.
        storage._inner = real
        real.set_trial_user_attr(trial_id, OWNER_ATTR, other)
        real.set_trial_state_values(trial_id, TrialState.RUNNING)
        raise _dropped()

    real = storage._inner
    storage._inner = type("Once", (), {"__getattr__": lambda self, n: getattr(real, n),
                                       "set_trial_state_values": staticmethod(taken_by_another)})()
    assert storage.set_trial_state_values(queued._trial_id, TrialState.RUNNING) is False
    assert study.trials[0].user_attrs[OWNER_ATTR] == other


@pytest.mark.parametrize("method, call", [
    ("set_trial_user_attr", lambda t: t.set_user_attr("k", [1, 2])),
    ("set_trial_param", lambda t: t.suggest_float("x", 0.0, 1.0)),
    ("set_trial_intermediate_value", lambda t: t.report(0.3, 0)),
])
def test_upserts_retried_after_a_landed_commit_store_one_value(tmp_path, method, call):
    storage, study = _storage(tmp_path)
    trial = study.ask()
    storage._inner = flaky = Flaky(storage._inner, method, applied=True)
    call(trial)
    assert flaky.failed == 1
    (frozen,) = study.trials
    assert frozen.user_attrs.get("k", [1, 2]) == [1, 2]
    assert len(frozen.params) == (method == "set_trial_param")
    assert frozen.intermediate_values == ({0: 0.3} if method == "set_trial_intermediate_value" else {})


def test_creating_the_study_after_a_landed_commit_finds_it(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", TrainingPolicy())
    storage.retry.first_wait_s = 0.01
    storage._inner = Flaky(storage._inner, "create_new_study", applied=True)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s"]
    assert study._study_id == storage.get_study_id_from_name("s")


# ---------------------------------------------------------------- what a retried write can leave behind


def test_an_orphan_of_this_process_is_failed_between_batches_and_rerun_when_it_had_params(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    orphan = opened.study.ask()  # owned by this process, but no batch runs it
    orphan.suggest_float("x", 0.0, 1.0)
    bare = opened.study.ask()  # left before it had params: nothing to re-run
    assert reclaim_dead_trials(opened.study) == 0  # a caller that may have trials in flight: untouched
    assert reclaim_dead_trials(opened.study, nothing_in_flight=True) == 2
    states = [t.state for t in opened.study.trials]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert opened.study.trials[2].params == orphan.params and "lost track" in opened.study.trials[0].user_attrs[
        "fail_reason"]
    assert bare.number == 1


def test_twins_made_by_one_creation_are_failed_but_the_first(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    template = optuna.trial.create_trial(state=TrialState.WAITING, params={"x": 0.5},
                                         distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                                         system_attrs={TOKEN_ATTR: "same"})
    inner = opened.storage._inner  # the cached storage, as Optuna's own retry loop would call it twice
    for _ in range(2):
        inner.create_new_trial(opened.study._study_id, template)
    assert reclaim_dead_trials(opened.study) == 1
    assert [t.state for t in opened.study.trials] == [TrialState.WAITING, TrialState.FAIL]


def test_twins_of_an_ask_keep_the_one_the_ask_returned(tmp_path):
    # The commit of an ask's trial lands but its answer is lost: Optuna's own retry makes a second copy and
    # returns it, so the caller runs the last copy. Keeping the first failed the trial being trained (its
    # result dropped as "failed by another process") and left the copy nobody runs RUNNING.
    storage, study = _storage(tmp_path)
    rdb = storage.rdb
    real_session, real_prepare = rdb.scoped_session, rdb._get_prepared_new_trial
    lost = []

    class LosesTheFirstAnswer:
        def __init__(self, session: Any) -> None:
            self._session = session

        def __getattr__(self, name: str) -> Any:
            return getattr(self._session, name)

        def commit(self) -> None:
            self._session.commit()
            if creating and not lost:
                lost.append(True)
                raise sa_exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    creating = False

    def prepare(*args: Any, **kwargs: Any) -> Any:
        nonlocal creating
        creating = True
        return real_prepare(*args, **kwargs)

    rdb.scoped_session, rdb._get_prepared_new_trial = (lambda: LosesTheFirstAnswer(real_session())), prepare
    try:
        held = study.ask()
    finally:
        rdb.scoped_session, rdb._get_prepared_new_trial = real_session, real_prepare
    copy, mine = study.trials
    assert lost and mine.number == held.number and copy.system_attrs[TOKEN_ATTR] == mine.system_attrs[TOKEN_ATTR]
    assert reclaim_dead_trials(study) == 1  # any process's look, this one's trials in flight or not
    copy, mine = study.trials
    assert copy.state == TrialState.FAIL and "a copy of trial 1" in copy.user_attrs["fail_reason"]
    assert mine.state == TrialState.RUNNING
    held.suggest_float("x", 0.0, 1.0)  # the caller goes on with its trial
    study.tell(held, 0.5)


def test_a_failed_trial_is_queued_for_a_rerun_once(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    trial = opened.study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    opened.study.tell(trial, state=TrialState.FAIL)
    failed = opened.study.trials[0]
    retry_failed_trial(opened.study, failed)
    retry_failed_trial(opened.study, failed)  # a second verdict on the same death
    assert [t.state for t in opened.study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert opened.study.trials[1].system_attrs[TOKEN_ATTR] != failed.system_attrs.get(TOKEN_ATTR)


def test_asks_made_while_the_lock_was_lost_give_back_what_overshoots(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    for _ in range(2):  # another process's: 2 complete
        t = opened.study.ask()
        opened.study.tell(t, 0.1)
    other = opened.study.ask()  # another process's, running
    mine = [opened.study.ask() for _ in range(2)]  # this ask counted 3 places free, but another took one meanwhile
    kept = search.keep_within_goal(opened, mine, complete=4)
    assert [t.number for t in kept] == [mine[0].number]
    states = {t.number: t.state for t in opened.study.trials}
    assert states[other.number] == TrialState.RUNNING and states[mine[1].number] == TrialState.FAIL
    assert "released unrun" in opened.study.trials[mine[1].number].user_attrs["fail_reason"]
    assert StudyLock().lost is False
