"""The study's database behind retries, so a run survives restarts, dropped connections and
outages; why no retried call can apply twice: docs/optimizer-internals.md#storage."""
from __future__ import annotations

import abc
import copy
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Mapping, TypeVar

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from step5.errors import StorageError
from step5.interrupts import raise_if_interrupted

logger = logging.getLogger(__name__)

T = TypeVar("T")

TOKEN_ATTR = "step5_token"  # system attr: which create_new_trial call made the trial
ASK_TOKEN_PREFIX = "ask-"  # ... a fresh trial of study.ask's, whose caller holds the last copy the call made
OWNER_ATTR = "owner"  # user attr: the process that runs the trial (step5.owner)
FIRST_WAIT_S = 0.2  # the first retry comes this soon: most connection drops are over by then
MAX_WAIT_S = 5.0  # the backoff doubles up to this

#: PostgreSQL SQLSTATEs that mean "the server cannot serve you right now" (each: docs/optimizer-internals.md#storage).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53")
_TRANSIENT_SQLSTATES = ("57P01", "57P02", "57P03", "57P05", "57014", "40P01", "40001")
#: How libpq words a failed connection that waiting cannot fix (these come without a SQLSTATE).
_PERMANENT_CONNECT_WORDING = ("authentication failed", "does not exist", "no pg_hba.conf entry", "permission denied",
                              "no password supplied", "password is required", "certificate", "invalid")
#: SQLite result codes that mean "another writer holds the database": SQLITE_BUSY, SQLITE_LOCKED.
_SQLITE_BUSY_CODES = (5, 6)


def redact_storage(url: str) -> str:
    """The storage URL without its password, for logs, errors and the sidecar."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported when it is opened
        return url


def database_error(exc: BaseException) -> BaseException | None:
    """The error of talking to the database behind ``exc`` (a DBAPI error, a pool without a live connection), or
    None (``KeyError``, ``UpdateFinishedTrialError``, a malformed URL: docs/optimizer-internals.md#storage)."""
    from sqlalchemy import exc as sa_exc

    kinds = (sa_exc.DBAPIError, sa_exc.DisconnectionError, sa_exc.TimeoutError, sa_exc.PendingRollbackError)
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:  # what it was raised ``from``; not ``__context__``
        if isinstance(current, kinds):
            return current
        seen.append(current)
        current = current.__cause__
    return None


def _sqlite_code(orig: Any) -> int:
    """The primary SQLite result code of a driver error (its low byte; 0 for any other driver's error)."""
    return (getattr(orig, "sqlite_errorcode", 0) or 0) & 0xFF


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and trying again may cure database error ``exc``: SQLAlchemy's disconnect verdict, then the
    SQLSTATE, then libpq's wording of a failed connection (docs/optimizer-internals.md#storage)."""
    from sqlalchemy import exc as sa_exc

    error = database_error(exc)
    if error is None:
        return False
    if isinstance(error, (sa_exc.DisconnectionError, sa_exc.TimeoutError, sa_exc.PendingRollbackError)):
        return True  # a pool without a live connection, a pool exhausted, a session left by a dead connection
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate:
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES
    if type(orig).__module__.startswith("sqlite3"):  # a local file: only another writer's lock passes
        return _sqlite_code(orig) in _SQLITE_BUSY_CODES
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        text = str(orig).lower()
        return not any(wording in text for wording in _PERMANENT_CONNECT_WORDING)
    return False


#: SQLite result codes a user fixes on the file, not in the URL, and how.
_SQLITE_FILE_ADVICE = {
    13: "the disk holding the database file is full: free room there, then run the same command again to resume the "
        "study (its finished trials are kept)",  # SQLITE_FULL
    8: "the database file or its folder is read-only for this user",  # SQLITE_READONLY
    10: "the disk holding the database file failed a read or write (full, removed or failing)",  # SQLITE_IOERR
    11: "the database file is damaged",  # SQLITE_CORRUPT
    26: "the file at that path is not a SQLite database",  # SQLITE_NOTADB
}


def describe(exc: BaseException) -> str:
    """One line: the driver's error and the first line of its message (no SQL, no parameters)."""
    error = database_error(exc)
    orig = getattr(error, "orig", None) or error or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return f"{type(orig).__name__}: {lines[0] if lines else '(no message)'}"


class DatabaseRetry:
    """Run database calls, waiting out transient errors for up to ``outage_s`` seconds: one outage is one clock,
    whichever calls meet it; once given up, every later call gets one try, so the cleanup does not wait again."""

    def __init__(self, where: str, outage_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.where = where  # the database, password redacted
        self.outage_s = float(outage_s)
        self.first_wait_s = FIRST_WAIT_S  # tests shorten it
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self.outages = 0  # outages met so far (tests and the log)
        self.gave_up = False

    def call(self, first: Callable[[], T], what: str, again: Callable[[], T] | None = None) -> T:
        """``first()``; after a transient failure, ``again()`` (default: ``first``) until one
        succeeds. ``again`` is where a write that may already have been applied checks that
        before writing again. Non-database exceptions pass through untouched."""
        attempt = first
        wait = self.first_wait_s
        while True:
            try:
                result = attempt()
            except Exception as exc:  # noqa: BLE001 - sorted below; anything else is re-raised as it is
                if database_error(exc) is None:
                    raise
                if not is_transient(exc):
                    advice = _SQLITE_FILE_ADVICE.get(_sqlite_code(getattr(database_error(exc), "orig", None)),
                                                     "check the --storage URL (user, password, database) and that "
                                                     "the study's tables exist")
                    raise StorageError(f"the study database {self.where} failed while {what}: {describe(exc)}. "
                                       f"Waiting cannot fix this: {advice}") from None
                remaining = self._note_down(exc, what)
                if self.gave_up or remaining <= 0:
                    self.gave_up = True
                    raise StorageError(
                        f"the study database {self.where} has been unreachable for longer than "
                        f"training.storage_outage_s ({self.outage_s:g}s); last error: {describe(exc)}. The trials "
                        "this process had running are failed and re-run by the next process that looks at the "
                        "study (heartbeat rules, docs/cluster.md); run the same command again to resume it"
                    ) from None
                raise_if_interrupted()
                self._sleep(min(remaining, wait * random.uniform(0.75, 1.25)))  # jitter: hosts do not return in step
                wait = min(2 * wait, MAX_WAIT_S)
                attempt = again or first
                continue
            self._note_up()
            return result

    def _note_down(self, exc: BaseException, what: str) -> float:
        """Start (or continue) the outage clock; the seconds left before giving up."""
        now = self._clock()
        with self._lock:
            if self._down_since is None:
                self._down_since = now
                self.outages += 1
                logger.warning(
                    "waiting for the study database %s (%s while %s); retrying for up to %gs "
                    "(training.storage_outage_s)", self.where, describe(exc), what, self.outage_s,
                )
            return self._down_since + self.outage_s - now

    def _note_up(self) -> None:
        if self._down_since is None:  # the common case, without taking the lock
            return
        with self._lock:
            if self._down_since is not None:
                logger.warning("the study database %s is back after %.1fs", self.where,
                               self._clock() - self._down_since)
                self._down_since = None


def _forwarded(name: str, *, retried: bool) -> Callable[..., Any]:
    """A :class:`RetryingStorage` method that makes Optuna's call ``name`` as it is: through the retry, or once."""
    def method(self: "RetryingStorage", *args: Any, **kwargs: Any) -> Any:
        if retried:
            return self._call(name, *args, **kwargs)
        return getattr(self._inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Optuna's cached RDB storage, every call of it through a :class:`DatabaseRetry`
    (the module docstring says why each retry is safe). ``owner`` is this process's
    identity (:func:`step5.owner.this_process`): the trials it creates or takes from the
    queue carry it from the moment they are RUNNING."""

    def __init__(self, rdb: optuna.storages.RDBStorage, retry: DatabaseRetry, owner: Mapping[str, Any]) -> None:
        self.rdb = rdb
        self._inner = optuna.storages._CachedStorage(rdb)  # what optuna.create_study would wrap it in
        self.retry = retry
        self.owner = dict(owner)
        # Other processes' RUNNING trials seen without a heartbeat: since when, by this process's clock
        # (step5.optimizer.study.reclaim_dead_trials fails those past the grace period).
        self.beatless_since: dict[int, float] = {}

    @property
    def engine(self) -> Any:
        """The SQLAlchemy engine (the study lock and the trial count use it directly)."""
        return self.rdb.engine

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self._inner, name)
        return self.retry.call(lambda: method(*args, **kwargs), f"calling {name}")

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        def again() -> int:
            if study_name is not None:
                try:
                    return self._inner.get_study_id_from_name(study_name)
                except KeyError:
                    pass
            return self._inner.create_new_study(directions, study_name)

        return self.retry.call(lambda: self._inner.create_new_study(directions, study_name),
                               "creating the study", again=again)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        token = uuid.uuid4().hex
        if template_trial is None:  # study.ask: a fresh RUNNING trial, born with its owner
            token = ASK_TOKEN_PREFIX + token
            template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                                   datetime_complete=None, params={}, distributions={},
                                   user_attrs={OWNER_ATTR: self.owner}, system_attrs={TOKEN_ATTR: token},
                                   intermediate_values={}, trial_id=-1)
        else:  # study.add_trial / enqueue_trial (a re-run, a first trial): as given, plus the token
            template = copy.deepcopy(template_trial)
            template.system_attrs = {**template_trial.system_attrs, TOKEN_ATTR: token}

        def again() -> int:
            for trial in reversed(self._inner.get_all_trials(study_id, deepcopy=False)):
                if trial.system_attrs.get(TOKEN_ATTR) == token:  # the attempt that failed made it
                    return trial._trial_id
            return self._inner.create_new_trial(study_id, template)

        return self.retry.call(lambda: self._inner.create_new_trial(study_id, template),
                               "creating a trial", again=again)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        if state == TrialState.RUNNING:
            # study.ask is taking a queued trial: mark it ours first, so that a retry can tell
            # whether the first attempt took it.
            self._call("set_trial_user_attr", trial_id, OWNER_ATTR, self.owner)

        def again() -> bool:
            trial = self._inner.get_trial(trial_id)
            if state == TrialState.RUNNING:
                if trial.state == TrialState.WAITING:
                    return self._inner.set_trial_state_values(trial_id, state, values)
                return trial.state == TrialState.RUNNING and trial.user_attrs.get(OWNER_ATTR) == self.owner
            if not trial.state.is_finished():
                return self._inner.set_trial_state_values(trial_id, state, values)
            same_values = list(trial.values or []) == [float(v) for v in (values or [])]
            if trial.state == state and (state == TrialState.FAIL or same_values):
                return state != TrialState.FAIL
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"trial {trial.number} is already finished ({trial.state.name}); it cannot become {state.name}"
            )

        return self.retry.call(lambda: self._inner.set_trial_state_values(trial_id, state, values),
                               f"recording a trial as {state.name}", again=again)

    def record_heartbeat_once(self, trial_id: int) -> None:
        """One try, no waiting: the heartbeat thread's beat (the next beat is its retry, and
        a thread waiting out an outage could not be stopped when its batch ends)."""
        self._inner.record_heartbeat(trial_id)


# Reads and upserts: retried as they are (docs/optimizer-internals.md#storage says why that is safe); the
# rest of the interface passes straight through.
for _name in ("set_study_user_attr", "set_study_system_attr", "get_study_id_from_name", "get_study_name_from_id",
              "get_study_directions", "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
              "set_trial_param", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
              "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param", "get_trial",
              "get_all_trials", "get_n_trials", "get_best_trial", "get_trial_params", "get_trial_user_attrs",
              "get_trial_system_attrs", "record_heartbeat", "_get_stale_trial_ids"):
    setattr(RetryingStorage, _name, _forwarded(_name, retried=True))
for _name in ("delete_study", "remove_session", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"):
    setattr(RetryingStorage, _name, _forwarded(_name, retried=False))
abc.update_abstractmethods(RetryingStorage)
