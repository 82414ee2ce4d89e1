"""Opening (or resuming) a run's Optuna study: names, setup and data checks, rounds, the study
lock, heartbeats, and re-runs of dead processes' trials (docs/optimizer-internals.md#study)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from step5.errors import Step5Error, StorageError, StudyMismatchError, UsageError
from step5.jsonio import dumps, loads
from step5.optimizer.storage import (
    ASK_TOKEN_PREFIX, OWNER_ATTR, TOKEN_ATTR, DatabaseRetry, RetryingStorage, database_error, describe, redact_storage
)
from step5.owner import ProcessIdentity, is_alive, is_local, this_process
from step5.policy import TrainingPolicy

logger = logging.getLogger(__name__)

DEFAULT_DB_NAME = "optuna_step5.db"
SETUP_ATTR = "step5_setup"
DATA_ATTR = "step5_data"
PROCESSES_ATTR = "step5_processes"
TARGET_ATTR = "step5_target_complete"
BUILT_ATTR = "step5_model_built_at"  # the round target whose final model was committed last (0: none yet)
MAX_RETRIES = 2  # re-runs of a trial whose process died; a trial that kills its process every time stops there
SQLITE_BUSY_TIMEOUT_S = 120
SCHEMA_RACE_ATTEMPTS = 5  # how long a SQLite writer waits for another process's write to end


def default_storage_url(output_dir: Path) -> str:
    """The SQLite URL of ``<output_dir>/optuna_step5.db``, escaped: a folder named with ``%20``, ``?`` or ``#``
    must not read as a space, a query or a fragment when the URL is parsed back."""
    from sqlalchemy.engine import URL

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    return URL.create("sqlite", database=str(output_dir / DEFAULT_DB_NAME)).render_as_string(hide_password=False)


def default_study_name(model_type: str, fingerprint: str, setup: Mapping[str, Any]) -> str:
    setup_hash = hashlib.sha256(dumps({k: setup[k] for k in sorted(setup)})).hexdigest()[:8]
    return f"step5_{model_type}_{fingerprint}_{setup_hash}"


@dataclass
class OpenedStudy:
    """A study ready to optimise, and what was in it before this run."""

    study: optuna.Study
    study_name: str
    storage_url: str
    resumed: bool  # the study existed before this run
    complete_before: int  # COMPLETE trials found when the study was opened
    trials_before: int  # trials of any state found when the study was opened
    sampler_seed: int
    storage: optuna.storages.BaseStorage | None = None  # the (retrying) RDB storage the study lives in
    process_index: int = 0  # 0 for the first process that ran this study, then 1, 2, ...
    target_complete: int = 0  # COMPLETE trials the study holds when this round ends
    joined_round: bool = False  # this process joined an unfinished round (its own --trials did not set the target)
    round_over: bool = False  # a helper found the study's last round complete, and started none

    @property
    def trials_left(self) -> int:
        """COMPLETE trials this round still needs (0: its search is over, its model may still need building)."""
        return max(0, self.target_complete - self.complete_before)


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    # Constant liar: a batch is asked before any of it is told, and must not all land on one configuration.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def count_states(study: optuna.Study) -> dict[str, int]:
    """Trials per state (``complete``, ``fail``, ...): on an RDB storage one ``GROUP BY`` query, since every
    ask of every process counts and loading thousands of trials each time would cost more than the ask."""
    counts = {s.name.lower(): 0 for s in TrialState}
    engine = _engine_of(study._storage)
    if engine is not None:
        from sqlalchemy import text

        def count() -> list[Any]:
            with engine.connect() as connection:
                return list(connection.execute(
                    text("SELECT state, COUNT(*) FROM trials WHERE study_id = :study_id GROUP BY state"),
                    {"study_id": study._study_id},
                ).all())

        rows = _retrying(study._storage, count, "counting the study's trials")
        for state, n in rows:
            counts[str(getattr(state, "name", state)).lower()] += int(n)
        return counts
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] += 1
    return counts


def _engine_of(storage: Any) -> Any:
    return getattr(storage, "engine", None) or getattr(getattr(storage, "_backend", None), "engine", None)


def _retrying(storage: Any, fn: Any, what: str) -> Any:
    retry = getattr(storage, "retry", None)
    return retry.call(fn, what) if retry is not None else fn()


def _diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: study has {stored.get(k)!r}, this run {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]


#: libpq: give up on a connection attempt after this long (a host that vanished would
#: otherwise hold each attempt for the OS's TCP timeout, minutes); the retry then waits on.
PG_CONNECT_TIMEOUT_S = 10


def _engine_kwargs(storage_url: str) -> dict[str, Any]:
    """SQLite: writers of several processes wait for each other. A server: a pooled connection the server
    dropped is found by a ping when checked out and replaced, instead of failing the call that gets it."""
    if storage_url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": 3600}
    if storage_url.startswith(("postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://")):  # libpq drivers
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    return kwargs


#: What losing the race to create Optuna's tables looks like, by database.
_SCHEMA_RACE_MARKERS = ("already exists", "duplicate key", "unique constraint failed")


def open_storage(storage_url: str, training: TrainingPolicy) -> RetryingStorage:
    """The study's RDB storage with heartbeats, dead processes' re-runs and retries; an unreachable database
    is waited for, one waiting cannot fix is a :class:`StorageError`, a malformed URL a :class:`UsageError`."""
    retry = DatabaseRetry(redact_storage(storage_url), training.storage_outage_s)

    def create() -> optuna.storages.RDBStorage:
        for attempt in range(1, SCHEMA_RACE_ATTEMPTS + 1):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat is "experimental"
                    return optuna.storages.RDBStorage(
                        storage_url, engine_kwargs=_engine_kwargs(storage_url),
                        heartbeat_interval=training.heartbeat_interval_s,  # type: ignore[arg-type] - seconds, floats work
                        grace_period=training.heartbeat_grace_s,  # type: ignore[arg-type]
                        heartbeat_stale_trial_callback=retry_failed_trial,
                    )
            except Exception as exc:  # noqa: BLE001 - sorted below
                # Processes that start together on an empty database race to create Optuna's tables;
                # the losers find them made on the next try.
                if attempt >= SCHEMA_RACE_ATTEMPTS or not any(m in str(exc).lower() for m in _SCHEMA_RACE_MARKERS):
                    raise
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    try:
        rdb = retry.call(create, "opening the study storage")
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/optuna raise many types for a bad URL
        raise UsageError(
            f"--storage {redact_storage(storage_url)!r} cannot be opened: {type(exc).__name__}: {exc}"
        ) from None
    return RetryingStorage(rdb, retry, owner=this_process().to_dict())


def open_study(*, study_name: str, storage_url: str, setup: Mapping[str, Any], data: Mapping[str, Any], seed: int,
               trials: int = 1, training: TrainingPolicy | None = None,
               first_trials: Sequence[Mapping[str, Any]] = (), helper: bool = False) -> OpenedStudy:
    """Create or join the study (its stored setup and data must match), and join its unfinished round or
    start one of ``trials``; ``first_trials`` are enqueued, under the lock, only into a study with no trial.
    ``helper`` (``--search-only``) starts only a study's first round: finding the last one complete, it starts
    none (``round_over``), since the process that builds the model had stopped counting on it."""
    storage = open_storage(storage_url, training or TrainingPolicy())
    try:
        return _join_study(storage, study_name=study_name, storage_url=storage_url, setup=setup, data=data, seed=seed,
                           trials=trials, first_trials=first_trials, helper=helper)
    except BaseException:
        release_storage(storage)
        raise


def release_storage(storage: Any) -> None:
    """Close the storage's pooled database connections (a later call through it connects again): a run
    that is over holds none, which matters to a server that others share, and to the four studies of
    --compare-models, which run one after another in one process."""
    engine = _engine_of(storage)
    if engine is not None:
        engine.dispose()


def _join_study(storage: Any, *, study_name: str, storage_url: str, setup: Mapping[str, Any],
                data: Mapping[str, Any], seed: int, trials: int, first_trials: Sequence[Mapping[str, Any]],
                helper: bool = False) -> OpenedStudy:
    resumed = study_name in optuna.get_all_study_names(storage)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
                                    sampler=make_sampler(seed))
    except Step5Error:  # a StorageError: the database is away or broken, said in one line
        raise
    except Exception as exc:  # noqa: BLE001
        raise Step5Error(f"cannot open Optuna study {study_name!r} in {redact_storage(storage_url)}: {exc}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UsageError(f"study {study_name!r} exists but minimises; Step 5 studies maximise the anti-overfit objective")

    with study_lock(storage, study_name):
        # Under the lock: two processes creating the study at once cannot both record theirs.
        _check_or_record(study, study_name, dict(setup), dict(data))
        process_index = int(study.user_attrs.get(PROCESSES_ATTR, 0))
        study.set_user_attr(PROCESSES_ATTR, process_index + 1)
        reclaim_dead_trials(study, nothing_in_flight=True)
        counts = count_states(study)
        if not sum(counts.values()):
            for params in first_trials:
                study.enqueue_trial(dict(params))
        attrs = study.user_attrs
        target = attrs.get(TARGET_ATTR)
        searching = isinstance(target, int) and counts["complete"] < target
        # The last round's search is over but its model was never committed (Ctrl-C or SIGTERM during the
        # final fit or the commit, a failed final fit): the same command again builds it, with no new trial.
        # A study from before the attribute has none, and starts a new round as it did.
        unbuilt = (not searching and not helper and isinstance(target, int)
                   and attrs.get(BUILT_ATTR, target) != target)
        joined_round = searching or unbuilt
        # A helper that finds the last round complete came late (the main process's search is over, or about
        # to be): a round it started would run on without the model's process, or be cut short by it, and a
        # re-run of the main command would then only finish that round instead of adding its --trials.
        round_over = helper and isinstance(target, int) and not searching
        if not joined_round and not round_over:
            target = counts["complete"] + int(trials)
            study.set_user_attr(TARGET_ATTR, target)
            if BUILT_ATTR not in attrs:
                study.set_user_attr(BUILT_ATTR, 0)

    trials_before = sum(counts.values())
    if process_index == 0:
        sampler_seed = int(seed) + trials_before
    else:
        # Another process runs (or ran) this study: draw a stream of our own, or two
        # processes started together would propose the same configurations.
        sampler_seed = int(np.random.SeedSequence([int(seed), trials_before, process_index]).generate_state(1)[0])
    study.sampler = make_sampler(sampler_seed)
    if resumed:
        logger.info("joined study %r as process %d (%d complete, %d failed, %d running, %d waiting trials) in %s",
                    study_name, process_index, counts["complete"], counts["fail"], counts["running"], counts["waiting"],
                    redact_storage(storage_url))
    else:
        logger.info("created study %r in %s", study_name, redact_storage(storage_url))
    return OpenedStudy(study=study, study_name=study_name, storage_url=storage_url, resumed=resumed,
                       complete_before=counts["complete"], trials_before=trials_before, sampler_seed=sampler_seed,
                       storage=storage, process_index=process_index, target_complete=int(target),
                       joined_round=joined_round, round_over=round_over)


def record_model_built(opened: OpenedStudy) -> None:
    """Mark the round ``opened`` joined or started as built: its model is committed, so the next run of the
    command starts a new round instead of building this one again."""
    opened.study.set_user_attr(BUILT_ATTR, opened.target_complete)


def _check_or_record(study: optuna.Study, study_name: str, setup: dict[str, Any], data: dict[str, Any]) -> None:
    attrs = study.user_attrs
    stored_setup = attrs.get(SETUP_ATTR)
    if stored_setup is None:
        if study.trials:
            raise UsageError(
                f"study {study_name!r} already has {len(study.trials)} trials but no Step 5 setup record; "
                "pick another --study-name"
            )
        study.set_user_attr(SETUP_ATTR, setup)
        study.set_user_attr(DATA_ATTR, data)
        return
    stored_data = attrs.get(DATA_ATTR)
    if stored_data is None:  # a study from before data records: record ours from now on
        study.set_user_attr(DATA_ATTR, data)
        stored_data = loads(dumps(data))
    # JSON round trip so that tuples/lists and ints/floats compare as stored.
    differences = _diff(stored_data, loads(dumps(data))) + _diff(stored_setup, loads(dumps(setup)))
    if differences:
        raise StudyMismatchError(
            f"study {study_name!r} was created with other data or another setup; this process's trials "
            "would not be comparable with its trials. Differences:\n  " + "\n  ".join(differences)
            + "\nRun every process of a shared study with the same input files and flags, or use another "
            "--study-name (or none: the default name follows the data and the setup)."
        )


_warned_no_lock: set[str] = set()


@dataclass
class StudyLock:
    """``lost``: the PostgreSQL connection that held the lock died while the block ran, so another process
    may have counted and asked since; the block's asks are checked against ``--trials`` again."""

    lost: bool = False


#: The file of each SQLite engine's database, as SQLite resolved it (found once per engine).
_sqlite_files: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def _sqlite_file(storage: Any, engine: Any) -> str:
    """The absolute path of the file a SQLite engine's database lives in ("" in memory), as SQLite itself
    resolved it: the URL's database is no path for a ``file:`` URI (``sqlite:///file:/d/s.db?uri=true``), and
    two names of one file (a symlink) must take one lock file, or their processes would not exclude each other."""
    path = _sqlite_files.get(engine)
    if path is None:
        def ask() -> str:
            with engine.connect() as connection:
                rows = connection.exec_driver_sql("PRAGMA database_list").all()
            return next((str(row[2] or "") for row in rows if row[1] == "main"), "")

        path = _sqlite_files[engine] = _retrying(storage, ask, "finding the study database's file")
    return path


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage | None, study_name: str) -> Iterator[StudyLock]:
    """The study's cross-process lock: a lock file beside a SQLite file, a PostgreSQL advisory lock; other
    databases get none (logged once), and processes racing for the last trials may overshoot by a batch."""
    held = StudyLock()
    engine = _engine_of(storage)
    kind = getattr(engine, "name", None)  # None: an in-memory storage, one process
    database = _sqlite_file(storage, engine) if kind == "sqlite" else ""
    if database:
        with open(f"{database}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield held
            finally:  # now: a child forked meanwhile shares the open file until its exec closes it
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if kind != "postgresql":
        if kind not in (None, "sqlite", *_warned_no_lock):
            _warned_no_lock.add(kind)
            logger.warning("no cross-process study lock for %s storages; only SQLite and PostgreSQL have one", kind)
        yield held
        return
    from sqlalchemy import text

    def take() -> Any:
        # A transaction-level lock: released when this transaction ends (below), or by the
        # server when the connection drops (this process died, the server restarted).
        connection = engine.connect()
        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        try:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        except BaseException:
            connection.close()
            raise
        return connection

    connection = _retrying(storage, take, "taking the study lock")
    try:
        yield held
    except BaseException:
        with contextlib.suppress(Exception):
            connection.rollback()
        raise
    else:
        try:
            connection.commit()  # succeeds only if the connection, hence the lock, lived through the block
        except Exception as exc:  # noqa: BLE001 - a dead connection; anything else is a bug
            if database_error(exc) is None:
                raise
            held.lost = True
            logger.warning("the study lock's database connection was lost while it was held (%s)", describe(exc))
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def retry_failed_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a re-run (WAITING, same params) of a trial whose process died, at most :data:`MAX_RETRIES`
    and once: Optuna's RetryHeartbeatStaleTrialCallback without the dead owner and its failure reason."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRIES:
        logger.warning("trial %d's process died; it was re-run %d times already and is not re-run again",
                       trial.number, MAX_RETRIES)
        return
    if any(t.system_attrs.get("retry_history") == history for t in study.get_trials(deepcopy=False)):
        return
    system_attrs = {"failed_trial": trial.system_attrs.get("failed_trial", trial.number), **trial.system_attrs,
                    "retry_history": history}
    system_attrs.pop(TOKEN_ATTR, None)
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (OWNER_ATTR, "fail_reason", "batch")}
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=user_attrs, system_attrs=system_attrs,
    ))
    logger.warning("trial %d's process died; its params are queued for a re-run", trial.number)


def reclaim_dead_trials(study: optuna.Study, *, nothing_in_flight: bool = False) -> int:
    """Fail the RUNNING trials of dead processes (stale heartbeat, any host; a dead owner on this host at
    once) and queue their re-runs; returns how many. ``nothing_in_flight``: this process runs no trial now,
    so a RUNNING trial it owns is an orphan of a retried write, failed too; so are same-token twins."""
    running_before = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    reclaimed = max(0, running_before - len(running))
    me = this_process()
    others: list[tuple[FrozenTrial, ProcessIdentity]] = []  # live, or not ours to judge by their pid
    for trial in running:
        owner = ProcessIdentity.from_dict(trial.user_attrs.get(OWNER_ATTR) or {})
        if owner is None:
            continue
        if owner == me:
            if not nothing_in_flight:
                continue
            reason = "this process lost track of it when a database write was retried"
        elif is_local(owner) and not is_alive(owner):
            reason = f"its process (pid {owner.pid} on {owner.host}) died"
        else:
            others.append((trial, owner))
            continue
        reclaimed += _fail_and_rerun(study, trial, reason, rerun=bool(trial.params))
    reclaimed += _fail_beatless(study, others)
    kept: dict[str, FrozenTrial] = {}
    for trial in trials:  # in number order; the kept trial of a token stays, its unfinished twins are failed
        token = trial.system_attrs.get(TOKEN_ATTR)
        # A fresh ask's copies are all RUNNING, and its caller runs the last (Optuna's own retry and
        # RetryingStorage's both return the last made); queued copies are asked first to last.
        if token is not None and (token not in kept or str(token).startswith(ASK_TOKEN_PREFIX)):
            kept[token] = trial
    for trial in trials:
        token = trial.system_attrs.get(TOKEN_ATTR)
        if token is not None and kept[token] is not trial and not trial.state.is_finished():
            reclaimed += _fail_and_rerun(study, trial, f"a copy of trial {kept[token].number} made by a retried "
                                         "database write", rerun=False)
    return reclaimed


def _fail_beatless(study: optuna.Study, trials: list[tuple[FrozenTrial, ProcessIdentity]]) -> int:
    """Fail the trials among ``trials`` (RUNNING, other processes') that this process has seen without any
    heartbeat for longer than the grace period: Optuna judges only a trial that has one, and a process that died
    (or gave up on the database) between asking a trial and claiming it left none, so on another host that trial
    stayed RUNNING for good and held the study short of --trials, every process waiting for it."""
    storage = study._storage
    since = getattr(storage, "beatless_since", None)  # a RetryingStorage's memory of such trials
    engine = _engine_of(storage)
    if since is None or engine is None or not storage.get_heartbeat_interval():
        return 0
    ids = {trial._trial_id: (trial, owner) for trial, owner in trials}
    beating: set[int] = set()
    if ids:
        from sqlalchemy import bindparam, text

        query = text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
            bindparam("ids", expanding=True))

        def read() -> set[int]:
            with engine.connect() as connection:
                return {int(row[0]) for row in connection.execute(query, {"ids": sorted(ids)})}

        beating = _retrying(storage, read, "reading the running trials' heartbeats")
    now = time.monotonic()
    for trial_id in [t for t in since if t not in ids or t in beating]:  # finished, or beating now
        del since[trial_id]
    grace = float(storage.rdb.grace_period or 2 * storage.get_heartbeat_interval())
    failed = 0
    for trial_id, (trial, owner) in ids.items():
        if trial_id in beating or now - since.setdefault(trial_id, now) <= grace:
            continue
        del since[trial_id]
        reason = (f"it stayed RUNNING for over {grace:g}s (training.heartbeat_grace_s) without a heartbeat: its "
                  f"process (pid {owner.pid} on {owner.host}) ended, or lost the database, between asking and claiming it")
        failed += _fail_and_rerun(study, trial, reason, rerun=bool(trial.params))
    return failed


def _fail_and_rerun(study: optuna.Study, trial: FrozenTrial, reason: str, *, rerun: bool) -> int:
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return 0
    except optuna.exceptions.UpdateFinishedTrialError:
        return 0  # another process got there first
    logger.warning("trial %d failed: %s", trial.number, reason)
    if rerun:
        retry_failed_trial(study, storage.get_trial(trial._trial_id))
    return 1


def claim_trial(opened: OpenedStudy, trial: optuna.Trial) -> None:
    """Mark a just-asked trial as this process's (again: another process's mark may have raced ours) and
    record its first heartbeat."""
    trial.set_user_attr(OWNER_ATTR, this_process().to_dict())
    storage = opened.storage
    if storage is not None and hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval():
        storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]


def best_complete_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


class TrialHeartbeats:
    """Optuna heartbeats, in one thread, for every trial this process holds, from its claim until it is
    told (a prefetched trial too, while it waits), as ``study.optimize`` would give each trial: otherwise a
    process killed mid-batch would leave its trials RUNNING for good. A no-op without storage heartbeats."""

    def __init__(self, opened: OpenedStudy) -> None:
        storage = opened.storage
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self._storage = storage if interval else None
        self._interval = float(interval or 0)
        self._trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._trial_ids.add(trial._trial_id)

    def discard(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._trial_ids.discard(trial._trial_id)

    def __enter__(self) -> "TrialHeartbeats":
        if self._storage is not None:
            self._thread = threading.Thread(target=self._beats, name="step5-trial-heartbeats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beats(self) -> None:
        # One try per beat: a missed beat is harmless (the next one retries), and a thread
        # waiting out an outage could not stop when the search ends.
        beat = getattr(self._storage, "record_heartbeat_once", None) or self._storage.record_heartbeat  # type: ignore[union-attr]
        while True:
            with self._lock:
                trial_ids = sorted(self._trial_ids)
            for trial_id in trial_ids:
                try:
                    beat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is harmless; the next one retries
                    logger.debug("recording a heartbeat for trial id %d failed", trial_id, exc_info=True)
            if self._stop.wait(timeout=self._interval):
                return
