"""``--compare-models``: one study per model type, the best held-out model kept
(docs/models.md, docs/optimizer-internals.md#compare)."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from step5 import artifacts, model_set
from step5.artifacts import MODEL_TYPES
from step5.errors import EXIT_OK, DegenerateSignalError, Step5Error, StorageError
from step5.fsutil import os_error_reason, write_all
from step5.jsonio import read_json_file, write_json_atomic
from step5.optimizer.optimizer import AntiOverfitMetaOptimizer, load_inputs
from step5.optimizer.config import OptimizerConfig, RunOutcome, rescore_partitions, validate_config
from step5.optimizer.diagnostics import (
    HEALTH_FILE, compare_health_report, drawing, model_health_report, retire, save_figure, write_health_report
)
from step5.values import finite_or_none, utc_timestamp

logger = logging.getLogger(__name__)

SUMMARY_NAME = artifacts.COMPARE_SUMMARY_NAME
PLOT_NAME = "compare_models_summary.png"
STAGING_DIRNAME = "compare_runs"
ARCHIVE_DIRNAME = "compare_archive"
LOCK_NAME = "compare_runs.lock"  # held by the compare run writing to the output dir
SUMMARY_SCHEMA_VERSION = 1

#: The selection rule, as it is written into the summary and the winner's sidecar.
CRITERION: dict[str, Any] = {
    "primary": "cv_rescored",
    "tie_break": ["cv_score", "model_type_order"],
    "description": (
        "highest rescored CV objective: each model type's best trial trained and scored again "
        "on fresh K-fold partitions of the development rows (the same partitions for every "
        "model type, other shuffles and training seeds than the search's), the mean of the "
        "anti-overfit objective over them. A type without a finite rescored objective ranks "
        "after those with one. Ties go to the higher CV objective of the search's best trial "
        "(cv_score), then to the earlier model type in "
        f"{list(MODEL_TYPES)}. Only SUCCESS runs can win. The held-out test R^2 of every "
        "model is reported but never used to choose, so the winner's test R^2 is an unbiased "
        "estimate."
    ),
}

#: Statuses a candidate can end with (RunOutcome's three, plus SKIPPED by the registry).
STATUSES = ("SUCCESS", "DEGENERATE_SIGNAL", "FAILED", "SKIPPED")

OptimizerFactory = Callable[[OptimizerConfig], Any]  # returns an object with .run() -> RunOutcome


@dataclasses.dataclass
class Candidate:
    """One model type's part in a compare run."""

    model_type: str
    status: str  # one of STATUSES
    cv_score: float | None = None  # best trial's anti-overfit objective
    cv_rescored: float | None = None  # its mean objective on fresh partitions (the criterion)
    test_r2: float | None = None  # final model on the held-out test rows
    wall_s: float = 0.0  # the sub-run's wall time, as measured here
    trials_run: int = 0  # COMPLETE trials in its study
    rank: int | None = None  # 1 = winner, among SUCCESS runs
    error: str | None = None  # why it failed / was skipped / was degenerate
    checkpoint_path: Path | None = None  # where its checkpoint is now (after promotion/archiving)
    sidecar_path: Path | None = None  # where its sidecar is now
    staging_dir: Path | None = None  # the sub-run's output_dir (not in the summary)
    outcome: RunOutcome | None = None  # what the sub-run returned (not in the summary)

    def to_dict(self, brief: bool = False) -> dict[str, Any]:
        """The summary's record (``brief``: the sidecar's, without rank and paths)."""
        internal = ("staging_dir", "outcome")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in internal}
        out["wall_s"] = round(self.wall_s, 3)
        for key in ("checkpoint_path", "sidecar_path"):
            out[key] = str(out[key]) if out[key] else None
        if brief:
            for key in ("model_type", "rank", "checkpoint_path", "sidecar_path"):
                del out[key]
        return out


def select_winner(candidates: Iterable[Candidate]) -> Candidate | None:
    """The candidate :data:`CRITERION` picks (None: no SUCCESS run with a finite CV objective and test R^2);
    sets ``rank`` on every eligible one. ``test_r2`` never orders them: it reports the choice, unbiased."""
    order = {mt: i for i, mt in enumerate(MODEL_TYPES)}
    eligible = [
        c for c in candidates
        if c.status == "SUCCESS" and finite_or_none(c.cv_score) is not None and finite_or_none(c.test_r2) is not None
    ]
    eligible.sort(key=lambda c: (
        c.cv_rescored is None, -(c.cv_rescored or 0.0), -float(c.cv_score),  # type: ignore[arg-type]
        order.get(c.model_type, len(order)),
    ))
    for i, c in enumerate(eligible, start=1):
        c.rank = i
    return eligible[0] if eligible else None


def sub_config(config: OptimizerConfig, model_type: str) -> OptimizerConfig:
    """One model type's config: the user's, with the storage pinned to the compare run's default and the
    rescore count resolved (a single run's default is none)."""
    from step5.optimizer.study import default_storage_url

    return dataclasses.replace(
        config,
        model_type=model_type,
        compare_models=False,
        output_dir=Path(config.output_dir) / STAGING_DIRNAME / model_type,
        # None: the optimizer's default name, step5_<model type>_<data>_<setup>, per type
        study_name=f"{config.study_name}_{model_type}" if config.study_name else None,
        storage=config.storage or default_storage_url(Path(config.output_dir)),
        rescore_partitions=rescore_partitions(config),
    )


def skipped_by_registry(config: OptimizerConfig) -> dict[str, str]:
    """Model types the skip registry rules out now (the policy's ``model_skip_rules``), with the reason; a
    malformed registry or policy is an error, not "skip nothing"."""
    from step5.policy import load_policy
    from step5.watcher.registry import load_skip_registry, skipped_model_types

    path = config.skip_registry_path
    rules = load_policy(config.policy_path).training_diagnostics
    skipped = skipped_model_types(load_skip_registry(path), rules)
    return {mt: f"skip registry {path}: {why}" for mt, why in sorted(skipped.items()) if mt in MODEL_TYPES}


def _read_sidecar(candidate: Candidate) -> dict[str, Any] | None:
    if candidate.sidecar_path is not None and candidate.sidecar_path.is_file():
        obj = read_json_file(candidate.sidecar_path, "sidecar")
        if isinstance(obj, dict):
            return obj
    if candidate.outcome is not None and candidate.outcome.sidecar:
        return dict(candidate.outcome.sidecar)
    return None


def _commit_set(folder: Path, files: dict[str, Path], sidecar: dict[str, Any] | None, role: str,
                block: dict[str, Any]) -> None:
    with model_set.stage(folder) as staged:
        model_set.copy_files(staged, {n: p for n, p in files.items() if sidecar is None or n != artifacts.SIDECAR_NAME})
        if sidecar is not None:
            # The compare block added; the checkpoint path becomes the one in the set it is committed with.
            annotated = {**sidecar, "compare_models": {**block, "role": role}}
            if sidecar.get("checkpoint_path"):
                annotated["checkpoint_path"] = str(staged.final_dir / Path(sidecar["checkpoint_path"]).name)
            try:
                artifacts.write_sidecar(staged.path / artifacts.SIDECAR_NAME, annotated)
            except ValueError as exc:
                if role != "archived":
                    raise
                # An archived sidecar is a record, not an input: keep it as it was.
                logger.warning("compare: left the archived %s sidecar unannotated: %s", sidecar.get("model_type"), exc)
                model_set.copy_files(staged, {artifacts.SIDECAR_NAME: files[artifacts.SIDECAR_NAME]})
        staged.commit()


def _run_one(factory: OptimizerFactory, config: OptimizerConfig) -> Candidate:
    mt = config.model_type
    staging = Path(config.output_dir)
    start = time.perf_counter()
    try:
        if staging.exists():
            shutil.rmtree(staging)  # a fresh folder: nothing stale can pass for this run's output
    except OSError as exc:  # the types before this one are trained: this one fails alone, the run files them
        logger.error("compare: %s failed: cannot clear its staging folder %s: %s", mt, staging, os_error_reason(exc))
        return Candidate(mt, "FAILED", error=f"cannot clear its staging folder {staging}: {os_error_reason(exc)}")
    outcome: RunOutcome | None = None
    try:
        outcome = factory(config).run()
    except DegenerateSignalError as exc:
        outcome = getattr(exc, "outcome", None) or RunOutcome(model_type=mt, status="DEGENERATE_SIGNAL")
        outcome.error = outcome.error or str(exc)
    except StorageError:  # every type's study is in that database: the next would wait as long for it
        logger.error("compare: stopped at %s: the study database is every model type's; nothing is promoted "
                     "or archived", mt)
        raise
    except Exception as exc:  # noqa: BLE001 - one model type's failure must not stop the others
        # A Step5Error says what went wrong in its one line, as the CLI prints it; anything else is a bug's trace.
        logger.error("compare: %s failed: %s: %s", mt, type(exc).__name__, exc, exc_info=not isinstance(exc, Step5Error))
        return Candidate(mt, "FAILED", error=f"{type(exc).__name__}: {exc}", staging_dir=staging,
                         wall_s=time.perf_counter() - start)
    wall = time.perf_counter() - start

    status = outcome.status if outcome.status in ("SUCCESS", "DEGENERATE_SIGNAL", "FAILED") else "FAILED"
    cand = Candidate(mt, status, cv_score=finite_or_none(outcome.cv_score),
                     cv_rescored=finite_or_none(outcome.cv_rescored), test_r2=finite_or_none(outcome.test_r2),
                     wall_s=wall, trials_run=int(outcome.trials_run or 0), error=outcome.error, staging_dir=staging,
                     checkpoint_path=Path(outcome.checkpoint_path) if outcome.checkpoint_path else None,
                     sidecar_path=Path(outcome.sidecar_path) if outcome.sidecar_path else None, outcome=outcome)
    if outcome.status not in STATUSES:
        cand.error = f"run returned an unknown status {outcome.status!r}"
    if cand.status == "SUCCESS":
        problem = None
        if cand.checkpoint_path is None or not cand.checkpoint_path.is_file():
            problem = f"its checkpoint {cand.checkpoint_path} does not exist"
        elif cand.sidecar_path is None or not cand.sidecar_path.is_file():
            problem = f"its sidecar {cand.sidecar_path} does not exist"
        elif cand.test_r2 is None:
            problem = f"it reported no finite test R^2 ({outcome.test_r2!r})"
        elif cand.cv_score is None:
            problem = f"it reported no finite CV objective ({outcome.cv_score!r})"
        if problem:
            logger.error("compare: %s reported SUCCESS but %s; it cannot win", mt, problem)
            cand.status, cand.error = "FAILED", f"reported SUCCESS but {problem}"
    return cand


@contextlib.contextmanager
def only_compare_run_in(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s compare lock for the whole run, or raise naming the run that holds it: two compare
    runs in one folder delete each other's staged runs and archives, and can leave a sidecar without its
    checkpoint. The kernel lets go of it when the process ends, however it ends."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_NAME, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip() or "holder unknown"
            raise Step5Error(f"another --compare-models run ({holder}) is writing to {out_dir}; wait for it to end "
                             "or give this one another --output-dir") from None
        except OSError as exc:  # a filesystem without locks (some NFS mounts): a guard lost, not a reason to stop
            logger.warning("compare: cannot lock %s (%s); a second compare run into this folder at the same time "
                           "would not be stopped", handle.name, os_error_reason(exc))
        try:  # who holds it, for the message a second run prints; a full disk costs only that
            handle.truncate(0)
            write_all(handle.fileno(), f"pid {os.getpid()} on {socket.gethostname()}, since {utc_timestamp()}\n".encode())
        except OSError as exc:
            logger.warning("compare: cannot record this run in %s (%s)", handle.name, os_error_reason(exc))
        yield


def run_compare(config: OptimizerConfig, *, optimizer_factory: OptimizerFactory | None = None) -> int:
    """Run every model type not skipped, keep the winner; the exit code: 0 a winner, 2 no winner and a
    degenerate target (its sidecar is left), 1 otherwise. ``optimizer_factory``: tests inject a fake.
    Unreadable data raises its :class:`DataError` before any model type runs, leaving the output folder as it was."""
    with only_compare_run_in(Path(config.output_dir)):
        return _compare(config, optimizer_factory)


def _compare(config: OptimizerConfig, optimizer_factory: OptimizerFactory | None) -> int:
    # Absolute: the summary and the sidecars record these paths for readers in other working directories
    # (the WATCHER reads a loser's metrics through its sidecar_path; Step 6 runs from its own directory).
    out_dir, diag = Path(config.output_dir).absolute(), config.diagnostics_folder.absolute()
    started = time.perf_counter()
    created_at = utc_timestamp()

    skipped = skipped_by_registry(config)
    configs = {mt: sub_config(config, mt) for mt in MODEL_TYPES}
    for sub in configs.values():
        validate_config(sub)  # a usage error shows before any model trains (exit 64)

    to_run = [mt for mt in MODEL_TYPES if mt not in skipped]
    for mt in to_run:  # before any model trains: a model type's folder is cleared only when its turn comes
        staging = Path(configs[mt].output_dir)
        if os.path.lexists(staging) and (staging.is_symlink() or not staging.is_dir()):
            raise Step5Error(f"{staging} is in the way of the {mt} run: it must be a folder (the compare run "
                             "clears and fills it), not a file or a link; move or remove it")
    logger.info("compare: running %s%s; winner by %s", ", ".join(to_run) or "nothing",
                f" (skipped by the registry: {', '.join(sorted(skipped))})" if skipped else "", CRITERION["primary"])
    factory = optimizer_factory
    if factory is None:  # read the data once: every model type sees the same snapshot of the files
        inputs = load_inputs(config) if to_run else None
        factory = functools.partial(AntiOverfitMetaOptimizer, inputs=inputs)
    candidates: dict[str, Candidate] = {}
    for i, mt in enumerate(MODEL_TYPES, start=1):
        if mt in skipped:
            logger.warning("compare: skipping %s: %s", mt, skipped[mt])
            candidates[mt] = Candidate(mt, "SKIPPED", error=skipped[mt])
            continue
        logger.info("compare: [%d/%d] %s -> %s", i, len(MODEL_TYPES), mt, configs[mt].output_dir)
        c = candidates[mt] = _run_one(factory, configs[mt])
        logger.info("compare: %s %s in %.1fs (CV %s, rescored %s, test R^2 %s)%s", mt, c.status, c.wall_s,
                    _fmt(c.cv_score), _fmt(c.cv_rescored), _fmt(c.test_r2), f": {c.error}" if c.error else "")

    winner = select_winner(candidates.values())
    degenerate = [c for c in candidates.values() if c.status == "DEGENERATE_SIGNAL"]
    exit_code = EXIT_OK if winner is not None else (
        DegenerateSignalError.exit_code if degenerate else Step5Error.exit_code)
    block = {
        "criterion": CRITERION,
        "winner": winner.model_type if winner else None,
        "candidates": {mt: c.to_dict(brief=True) for mt, c in candidates.items()},
        "summary_path": str(diag / SUMMARY_NAME),
    }

    # Promote the winner (or, with no winner, the degenerate sidecar that says why), then
    # archive everything else; stale files from earlier runs are removed first.
    keep = winner or (degenerate[0] if degenerate else None)
    archive_root = out_dir / ARCHIVE_DIRNAME
    promoted = None
    try:
        # An earlier run's summary and picture go before the winner is promoted: a run stopped between the
        # promotion and its own summary must not leave them naming an earlier winner beside the new model.
        for name in (SUMMARY_NAME, PLOT_NAME):
            retire(diag, name)
        if any(c.staging_dir is not None for c in candidates.values()) and archive_root.is_dir():
            _clear(archive_root)  # the archive records this compare run, not an older one
        if keep is not None:
            _promote(keep, out_dir, block)
            promoted = keep.model_type
        for c in candidates.values():
            if c is not keep:
                _archive(c, out_dir, block)
    except OSError as exc:  # a disk filled since the preflight, a folder turned read-only
        shows = (f"the output dir holds the winner, {promoted}" if promoted
                 else "the output dir still shows the model set it showed before")
        raise Step5Error(
            f"cannot file this comparison's models in {out_dir}: {os_error_reason(exc)}"
            f"{f' ({exc.filename})' if exc.filename else ''}; {shows}; the models not filed are in "
            f"{out_dir / STAGING_DIRNAME}") from None
    with contextlib.suppress(OSError):  # absent, or something unexpected was left: kept for inspection
        (out_dir / STAGING_DIRNAME).rmdir()

    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "created_at": created_at,
        "criterion": CRITERION,
        "winner": winner.model_type if winner else None,
        "exit_code": exit_code,
        "output_dir": str(out_dir),
        "wall_s": round(time.perf_counter() - started, 3),
        "settings": {
            "trials": config.trials, "k_folds": config.k_folds, "test_holdout": config.test_holdout,
            "seed": config.seed, "target": config.target, "study_name": config.study_name,
            "rescore_partitions": rescore_partitions(config),
            "survivors": str(Path(config.survivors).absolute()), "lottery_data": str(Path(config.lottery_data).absolute()),
        },
        "models": {mt: candidates[mt].to_dict() for mt in MODEL_TYPES},
        "plot": None,
    }
    plot = plot_comparison(list(candidates.values()), diag / PLOT_NAME, winner=summary["winner"])
    summary["plot"] = str(plot) if plot else None
    if config.enable_diagnostics:  # before the summary: its winner is read as the model of the report beside it
        _write_compare_health(config, candidates, winner)
    try:
        if not config.enable_diagnostics:  # an earlier single run's report must not pass for this winner's
            retire(diag, HEALTH_FILE)
        write_json_atomic(diag / SUMMARY_NAME, summary)
    except OSError as exc:  # preflight tried the folder; a disk can still fill up since
        kept = f"the output dir holds the winner, {winner.model_type}" if winner else "no model was promoted"
        raise Step5Error(f"cannot write the compare summary {diag / SUMMARY_NAME}: {os_error_reason(exc)} ({kept})"
                         ) from None
    table = [f"{'model':<11} {'status':<17} {'CV score':>9} {'rescored':>9} {'test R^2':>9} {'wall s':>8} {'trials':>6}"]
    for c in candidates.values():
        table.append(f"{c.model_type:<11} {c.status:<17} {_fmt(c.cv_score):>9} {_fmt(c.cv_rescored):>9} "
                     f"{_fmt(c.test_r2):>9} {c.wall_s:>8.1f} {c.trials_run:>6}{'  <- winner' if winner is c else ''}")
    logger.info("compare-models results:\n  %s", "\n  ".join(table))
    if winner is not None:
        logger.info(
            "compare: winner %s by rescored CV objective %s (search's %.4f; test R^2 %.4f, reported, not used "
            "to choose); saved as %s; summary %s",
            winner.model_type, _fmt(winner.cv_rescored), winner.cv_score, winner.test_r2, winner.checkpoint_path,
            diag / SUMMARY_NAME,
        )
    elif degenerate:
        logger.error("compare: no model: the target signal is degenerate (%s)", degenerate[0].error)
    else:
        logger.error("compare: no model type produced a model; see %s", diag / SUMMARY_NAME)
    return exit_code


def _write_compare_health(config: OptimizerConfig, candidates: dict[str, Candidate], winner: Candidate | None) -> None:
    """The health check's view of a compare run: every trained model's report, the winner named."""
    from step5.policy import load_policy

    rules = load_policy(config.policy_path).training_diagnostics
    reports = {mt: model_health_report(mt, c.outcome.sidecar.get("training_metrics") or {}, rules)
               for mt, c in candidates.items() if c.outcome is not None and c.status == "SUCCESS"}
    ranking = sorted((c for c in candidates.values() if c.rank is not None), key=lambda c: c.rank)
    write_health_report(config.diagnostics_folder, compare_health_report(
        reports, winner=winner.model_type if winner else None, criterion=CRITERION["primary"],
        winner_value=winner.cv_rescored if winner else None, ranking=[c.model_type for c in ranking],
    ), model_type=None)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _promote(c: Candidate, out_dir: Path, block: dict[str, Any]) -> None:
    assert c.staging_dir is not None, "only a run candidate can be promoted"
    files = model_set.current_files(c.staging_dir)
    _commit_set(out_dir, files, _read_sidecar(c), "winner" if c.status == "SUCCESS" else "degenerate", block)
    c.sidecar_path = out_dir / artifacts.SIDECAR_NAME
    if c.checkpoint_path is not None:
        c.checkpoint_path = out_dir / c.checkpoint_path.name
    _move_rest(c, out_dir / ARCHIVE_DIRNAME / c.model_type, committed=set(files))


def _archive(c: Candidate, out_dir: Path, block: dict[str, Any]) -> None:
    target = out_dir / ARCHIVE_DIRNAME / c.model_type
    if c.staging_dir is None or not c.staging_dir.is_dir():
        c.checkpoint_path = c.sidecar_path = None
        return
    files: dict[str, Path] = {}
    if c.status in ("SUCCESS", "DEGENERATE_SIGNAL"):
        files = model_set.current_files(c.staging_dir)
        if files:
            _commit_set(target, files, _read_sidecar(c), "archived", block)
    _move_rest(c, target, committed=set(files))
    c.sidecar_path = target / artifacts.SIDECAR_NAME if (target / artifacts.SIDECAR_NAME).is_file() else None
    c.checkpoint_path = target / c.checkpoint_path.name if c.checkpoint_path and c.status == "SUCCESS" else None


def _clear(folder: Path) -> None:
    """Empty ``folder`` of everything; a link to a folder (an archive kept on a bigger disk) stays a link,
    and only what is in the folder it points to goes (``shutil.rmtree`` refuses a link outright)."""
    if not folder.is_symlink():
        shutil.rmtree(folder)
        return
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _move_rest(c: Candidate, target: Path, committed: set[str]) -> None:
    """Move what a sub-run left besides its model set to ``target``, then remove its folder."""
    if c.staging_dir is None or not c.staging_dir.is_dir():
        return
    left = [
        p for p in c.staging_dir.iterdir()
        if p.name != model_set.SETS_DIRNAME and p.name not in committed and not p.is_symlink()
    ]
    if left:
        target.mkdir(parents=True, exist_ok=True)
        for p in left:
            os.replace(p, target / p.name)
    shutil.rmtree(c.staging_dir)


def plot_comparison(candidates: list[Candidate], path: Path, *, winner: str | None) -> Path | None:
    """Per model type: test R^2, the search's and the rescored CV objective; wall time. None if it fails."""
    with drawing("the comparison", path, figsize=(11, 1.2 + 0.8 * len(candidates))) as fig:
        ys = list(range(len(candidates)))
        ax_score, ax_time = fig.subplots(1, 2, sharey=True)
        h = 0.27
        for offset, key, color, label in ((-h, "test_r2", "tab:blue", "test R² (reported)"),
                                          (0, "cv_score", "tab:gray", "search's best CV objective"),
                                          (h, "cv_rescored", "tab:purple", "rescored CV objective (criterion)")):
            values = [getattr(c, key) if getattr(c, key) is not None else 0.0 for c in candidates]
            ax_score.barh([y + offset for y in ys], values, height=h, color=color, label=label)
        for y, c in zip(ys, candidates):
            if c.status != "SUCCESS":
                ax_score.text(0, y, f"  {c.status}", va="center", ha="left", color="tab:red", fontsize=9)
            elif c.test_r2 is not None:
                ax_score.text(c.test_r2, y - h, f" {c.test_r2:.3f}", va="center", fontsize=8)
            if c.cv_rescored is not None:
                ax_score.text(c.cv_rescored, y + h, f" {c.cv_rescored:.3f}", va="center", fontsize=8)
            label = "skipped" if c.status == "SKIPPED" else f"{c.wall_s:.1f}s, {c.trials_run} trials"
            ax_time.text(c.wall_s, y, f" {label}", va="center", fontsize=8)
        ax_score.axvline(0, color="black", linewidth=0.8)
        ax_score.set(xlabel="score (higher is better)", title="held-out test R² and CV objective")
        # Below the panel: inside it, the legend would cover the last model's bars.
        ax_score.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8, frameon=False)
        ax_time.barh(ys, [c.wall_s for c in candidates],
                     color=["tab:green" if c.model_type == winner else "tab:orange" for c in candidates])
        ax_time.set(xlabel="wall time (s)", title="time per model type")
        ax_score.set_yticks(ys, [f"{c.model_type} (winner)" if c.model_type == winner else c.model_type
                                 for c in candidates])
        ax_score.invert_yaxis()
        for ax in (ax_score, ax_time):
            ax.grid(axis="x", alpha=0.3)
            ax.margins(x=0.18)  # room for the value labels at the bars' ends
        fig.suptitle(f"Step 5 --compare-models: winner {winner or 'none'}")
        return save_figure(fig, path)
    return None
