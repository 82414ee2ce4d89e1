"""Opening (or resuming) the Optuna study of a run.

Resume semantics, in one place:

* The default storage is a SQLite file, ``sqlite:///<output_dir>/optuna_step5.db``, so a
  re-run of the same command finds its study again.
* The default study name is ``step5_<model_type>_<data fingerprint>_<setup hash>``: the
  same data and the same evaluation setup (seed, folds, holdout, target, training flags)
  resume the same study; changing any of them starts a new one, because objective values
  measured on different splits are not comparable.
* The setup is stored in the study (``user_attrs["step5_setup"]``). Resuming a study whose
  stored setup differs (possible only with an explicit ``--study-name``) is a usage error
  naming the differences, rather than a silent mix of incomparable trials.
* ``--trials N`` means "N COMPLETE trials in the study": a run adds ``N - complete`` new
  trials (0 when the study already has N), and failed trials do not count.
* The TPE sampler is seeded with ``seed + len(study.trials)``: a fresh study is
  reproducible from ``--seed``, and a resumed one does not replay the random start-up
  configurations its first run already tried.
* The RDB storage runs Optuna's heartbeat, so a trial left RUNNING by a killed process is
  marked FAILED by a later run once its heartbeat is stale. The search loop's trials get
  their heartbeats from :func:`trial_heartbeats`.
* The trials of a batch (``--trials-in-flight B``) are asked before any of them is told.
  TPE runs with ``constant_liar=True`` (explicitly, whatever the Optuna default), which
  keeps them from all landing on the same configuration; its random start-up trials (the
  first 10 complete ones) are the same configurations, with the same fold seeds, for
  every B.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from step5.errors import Step5Error, UsageError
from step5.jsonio import dumps

logger = logging.getLogger(__name__)

DEFAULT_DB_NAME = "optuna_step5.db"
SETUP_ATTR = "step5_setup"
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120


def default_storage_url(output_dir: Path) -> str:
    """``sqlite:///<absolute output_dir>/optuna_step5.db`` (the folder is created)."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{output_dir / DEFAULT_DB_NAME}"


def setup_hash(setup: Mapping[str, Any]) -> str:
    """8 hex characters identifying an evaluation setup (sorted-key JSON, sha256)."""
    canonical = dumps({k: setup[k] for k in sorted(setup)})
    return hashlib.sha256(canonical).hexdigest()[:8]


def default_study_name(model_type: str, fingerprint: str, setup: Mapping[str, Any]) -> str:
    """``step5_<model_type>_<fingerprint>_<setup hash>``."""
    return f"step5_{model_type}_{fingerprint}_{setup_hash(setup)}"


def redact_storage(url: str) -> str:
    """The storage URL without its password, for logs and the sidecar."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported when it is opened
        return url


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
    storage: optuna.storages.BaseStorage | None = None  # the RDB storage the study lives in


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    """Seeded TPE that knows about pending trials (constant liar): the search loop asks a
    batch of trials before telling any, and they must not all land on one configuration."""
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def count_states(study: optuna.Study) -> dict[str, int]:
    """Trials per state (``complete``, ``fail``, ``running``, ``pruned``, ``waiting``)."""
    counts = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] += 1
    return counts


def _diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: study has {stored.get(k)!r}, this run {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]


def open_study(
    *,
    study_name: str,
    storage_url: str,
    setup: Mapping[str, Any],
    seed: int,
) -> OpenedStudy:
    """Create the study, or load it when it exists and its stored setup matches ``setup``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat is "experimental"
            storage = optuna.storages.RDBStorage(
                storage_url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=HEARTBEAT_GRACE_S,
            )
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/optuna raise many types for a bad URL
        raise UsageError(f"--storage {redact_storage(storage_url)!r} cannot be opened: {type(exc).__name__}: {exc}") from None
    existing = set(optuna.get_all_study_names(storage))
    resumed = study_name in existing
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
            sampler=make_sampler(seed),
        )
    except Exception as exc:  # noqa: BLE001
        raise Step5Error(f"cannot open Optuna study {study_name!r} in {redact_storage(storage_url)}: {exc}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UsageError(f"study {study_name!r} exists but minimises; Step 5 studies maximise the anti-overfit objective")

    wanted = dict(setup)
    stored = study.user_attrs.get(SETUP_ATTR)
    if stored is None:
        if resumed and study.trials:
            raise UsageError(
                f"study {study_name!r} already has {len(study.trials)} trials but no Step 5 setup record; "
                "pick another --study-name"
            )
        study.set_user_attr(SETUP_ATTR, wanted)
    else:
        # JSON round trip so that tuples/lists and ints/floats compare as stored.
        differences = _diff(stored, optuna_json(wanted))
        if differences:
            raise UsageError(
                f"study {study_name!r} was run with a different setup; its trials are not comparable with "
                "this run's. Differences:\n  " + "\n  ".join(differences)
                + "\nUse another --study-name (or none: the default name follows the setup)."
            )

    # Trials left RUNNING by a killed process whose heartbeat is stale become FAILED now.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)

    counts = count_states(study)
    trials_before = sum(counts.values())
    sampler_seed = int(seed) + trials_before
    study.sampler = make_sampler(sampler_seed)
    if resumed:
        logger.info(
            "resuming study %r (%d complete, %d failed, %d running trials) from %s",
            study_name, counts["complete"], counts["fail"], counts["running"], redact_storage(storage_url),
        )
    else:
        logger.info("created study %r in %s", study_name, redact_storage(storage_url))
    return OpenedStudy(
        study=study, study_name=study_name, storage_url=storage_url, resumed=resumed,
        complete_before=counts["complete"], trials_before=trials_before, sampler_seed=sampler_seed,
        storage=storage,
    )


def optuna_json(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` as it reads back from Optuna's JSON attribute storage."""
    from step5.jsonio import loads

    return loads(dumps(dict(obj)))


def best_complete_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial, or None when the study has none."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return study.best_trial


@contextlib.contextmanager
def trial_heartbeats(opened: OpenedStudy, trial_numbers: Sequence[int]) -> Iterator[None]:
    """Record Optuna heartbeats for several RUNNING trials while the block runs.

    ``study.optimize`` runs one heartbeat thread per trial; trials asked in a batch need
    the same, or a process killed with SIGKILL mid-batch would leave them RUNNING for good
    (a later run fails only trials whose heartbeat went stale). Uses only the storage's
    public heartbeat methods; a storage without heartbeats makes this a no-op.
    """
    storage = opened.storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if storage is None or not interval or not trial_numbers:
        yield
        return
    study_id = storage.get_study_id_from_name(opened.study_name)
    trial_ids = [storage.get_trial_id_from_study_id_trial_number(study_id, n) for n in trial_numbers]
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
                except Exception:  # noqa: BLE001 - a missed beat is harmless; the next one retries
                    logger.debug("recording a heartbeat for trial id %d failed", trial_id, exc_info=True)
            if stop.wait(timeout=interval):
                return

    thread = threading.Thread(target=beat, name="step5-trial-heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
