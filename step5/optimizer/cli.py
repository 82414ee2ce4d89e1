"""The Step 5 command line (SPEC section 3): parse, configure logging, run, map to an exit code
(exit codes: docs/optimizer-internals.md#cli)."""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from step5.artifacts import HISTORY_PNG_NAME, MODEL_TYPES, SIDECAR_NAME, checkpoint_filename
from step5.devices import parse_gpu_list
from step5.cliutil import (
    UsageErrorParser, add_log_level, fraction, non_empty_path, non_negative_int, number, positive_int,
)
from step5.fsutil import DIR_MODE, create_temp_file, file_in_the_way, os_error_reason
from step5.errors import EXIT_INTERRUPTED, EXIT_OK, DegenerateSignalError, Step5Error, Terminated, UsageError
from step5.interrupts import delivered, latched_interrupts
from step5.lifeline import install_stdin_lifeline, install_supervisor_lifeline
from step5.model_set import SETS_DIRNAME
from step5.optimizer.config import DEFAULT_MOD, DEFAULT_PRNG_TYPE, OptimizerConfig, sqlite_database, validate_config
from step5.policy import PRUNER_NAMES, find_policy

logger = logging.getLogger("step5.optimizer")

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's real default once, as a closing ``[value]`` (SPEC section 3's notation): a help text that
    names its default keeps it, a real value (not None, not a store_true's False) is appended, ``[on]``/``[off]``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = text.rstrip().endswith("]") or default is None or default is argparse.SUPPRESS or action.nargs == 0
        if isinstance(action, argparse.BooleanOptionalAction) and isinstance(default, bool):
            text += " [on]" if default else " [off]"
        elif not shown:
            text += " [" + str(default).replace("%", "%%") + "]"
        return text


#: --help's closing lines: an example command and the input format, one line each.
_EPILOG = """\
example:
  %(prog)s --survivors survivors_with_scores.json --lottery-data train_history.json --model-type neural_net --trials 20

input: --survivors is a JSON array of {"seed": 1, "features": {"name": 0.12, ...}, "holdout_quality": 0.27} \
records (features numeric; target from features[--target] or the record's own key); --lottery-data a JSON \
array of draws, [978, 123] or [{"draw": 978}, ...]. Sample files: python -m step5.data.sample --out sample_data
"""


def _gpus(text: str) -> list[str]:
    if text.strip().lower() in ("none", "cpu"):
        return []  # explicit "no GPU": CPU workers only
    try:
        return parse_gpu_list(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(text: str) -> list[str]:
    value = text.strip().lower()
    if value == "cpu":
        return []
    if value == "cuda":
        return ["0"]
    if value.startswith("cuda:") and value[5:].isdigit():
        return [str(int(value[5:]))]
    raise argparse.ArgumentTypeError(f"expected 'cpu', 'cuda' or 'cuda:N', got {text!r}")


def build_parser(prog: str = "meta_prediction_optimizer_anti_overfit.py") -> argparse.ArgumentParser:
    """The SPEC section 3 parser; a flag stores into the :class:`OptimizerConfig` field of its name, whose
    default is the flag's."""
    p = UsageErrorParser(
        prog=prog,
        description=(
            "Step 5: Optuna search for a regressor of each survivor's holdout quality, with an\n"
            "anti-overfit objective; saves best_model.* and best_model.meta.json."
        ),
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    data = p.add_argument_group("inputs")
    data.add_argument("--survivors", type=non_empty_path, required=True, help="survivors_with_scores.json")
    data.add_argument("--lottery-data", type=non_empty_path, required=True, help="train_history.json (draw history)")
    data.add_argument("--target", help="target column (features[NAME] or the record's NAME)")
    data.add_argument("--prng-type",
                      help=f"recorded in data_context [from the survivors' metadata, else {DEFAULT_PRNG_TYPE}]")
    data.add_argument("--mod", type=positive_int,
                      help=f"recorded in data_context [from the survivors' metadata, else {DEFAULT_MOD}]")
    data.add_argument("--holdout-draws", type=non_negative_int,
                      help="draws held out upstream, recorded in data_context")

    search = p.add_argument_group("search")
    search.add_argument("--model-type", choices=MODEL_TYPES, default=None, help=f"model family [{OptimizerConfig.model_type}]")
    search.add_argument("--compare-models", action="store_true",
                        help="run all four model types and keep the best (--model-type is then ignored)")
    search.add_argument("--trials", type=positive_int,
                        help="complete trials this call adds to the study; a call that finds the study's last "
                             "round unfinished (an interrupted run, a shared study's other processes) completes "
                             "that round instead")
    search.add_argument("--k-folds", type=positive_int, help="CV folds per trial (>= 2)")
    search.add_argument("--cv-repeats", type=positive_int,
                        help="repeated CV: score every trial on N K-fold partitions of the development rows "
                             "(N x K fits; the objective over all of them), for a less noisy choice on flat "
                             "objective surfaces [1 for neural_net; for the tree model types "
                             "ceil(1000 / development rows), at most 3]")
    search.add_argument("--test-holdout", type=fraction, help="fraction of rows held out as the test set")
    search.add_argument("--seed", type=non_negative_int, help="seeds the splits, the sampler and training")
    search.add_argument("--study-name", help="Optuna study name [derived from model type, data and setup]")
    search.add_argument("--storage",
                        help="Optuna storage URL [sqlite:///<output-dir>/optuna_step5.db, so a re-run resumes]; "
                             "several processes or hosts share a study through one URL such as "
                             "postgresql+psycopg://user:pw@host/db (docs/cluster.md)")
    search.add_argument("--rescore-partitions", type=non_negative_int,
                        help="after the search, train and score the best trial again on N fresh K-fold "
                             "partitions of the development rows (other shuffles and seeds): an estimate "
                             "free of the search's own selection, recorded in the sidecar; --compare-models "
                             "chooses by it [3 with --compare-models, else 0: none]")
    search.add_argument("--cluster-config", type=non_empty_path,
                        help="the pipeline's distributed_config.json: also start a --search-only helper over ssh on "
                             "each of its nodes other than this host (its python_env, in its script_path), stream "
                             "their logs, stop them when the study is full; needs a shared --storage (docs/cluster.md)")
    search.add_argument("--search-only", action="store_true",
                        help="helper role for a shared study (--storage, --study-name): train trials until the "
                             "study holds --trials complete ones, exit 0, write no model; the process without "
                             "this flag builds the final model")

    nn = p.add_argument_group("neural net")
    nn.add_argument("--normalize-features", action=argparse.BooleanOptionalAction,
                    help="standardise features with training-fold statistics")
    nn.add_argument("--use-leaky-relu", action=argparse.BooleanOptionalAction,
                    help="LeakyReLU instead of ReLU")
    nn.add_argument("--dropout", "--dropout-override", type=number,
                    help="fix the hidden layers' dropout instead of searching it; input dropout is still searched "
                         "(--dropout-override: the existing optimizer's name)")
    nn.add_argument("--nn-max-epochs", type=positive_int,
                    help="epoch cap of every NN trial and of the final model (early stopping ends sooner)")

    ex = p.add_argument_group("execution")
    ex.add_argument("--persistent-workers", action=argparse.BooleanOptionalAction,
                    help="persistent NN workers (S96B) or one subprocess per fold (S96A) [policy decides]")
    ex.add_argument("--policy", type=non_empty_path,
                    help="policy file [./watcher_policies.json if there is one, else the project's own]")
    ex.add_argument("--gpus", type=_gpus,
                    help="NVIDIA GPU indices like 0,1 (or cuda:0,cuda:1), AMD GPUs like rocm:0,rocm:1 (a list may "
                         "mix both), 'cuda' / 'rocm' (every GPU of that kind found here), 'all' (both kinds), or "
                         "'none' [detected without torch: the NVIDIA GPUs, else the AMD GPUs; a host with both "
                         "uses both only when asked]")
    ex.add_argument("--cpu-workers", type=positive_int,
                    help="NN workers when there is no GPU [one per core, max 8]; for tree models, the "
                         "library's thread count [library default]")
    ex.add_argument("--fuse-folds", action=argparse.BooleanOptionalAction,
                    help="train a trial's K folds in one batched pass on one worker (same results within "
                         "1e-5; one-shot subprocesses cannot fuse and run them fold by fold) [policy decides]")
    ex.add_argument("--fuse-trials", "--batch-size-nn", type=positive_int,
                    help="run N trials at a time and train same-shape trials' folds in one batched pass; N > 1 implies "
                         "--fuse-folds and --trials-in-flight N (--batch-size-nn: the existing optimizer's name)")
    ex.add_argument("--trials-in-flight", type=positive_int,
                    help="trials asked from Optuna and trained together per batch (the sampler knows the "
                         "pending ones); same seed and value give the same study [policy's "
                         "training.trials_in_flight; 0 there: two per device slot]")
    ex.add_argument("--pruner", choices=PRUNER_NAMES,
                    help="stop a trial whose running objective over its first folds is hopeless (Optuna pruning on "
                         "fold-level values; its remaining folds are not trained) [policy's training.pruner]")

    compat = p.add_argument_group(
        "compatibility", "flags of the optimizer this one replaces, so its scripts run unchanged (docs/compatibility.md)")
    compat.add_argument("--device", type=_device,
                        help="cpu, or cuda:N to train on the N-th visible GPU only (like --gpus; without that GPU "
                             "the run trains on the CPU, with a warning)")
    compat.add_argument("--enable-vmap", dest="fuse_folds", action="store_const", const=True,
                        help="the same as --fuse-folds")
    compat.add_argument("--allow-inline-nn-fallback", action="store_true",
                        help="accepted and logged as not applying: the parent never trains; a dead worker "
                             "already falls back to one-shot subprocesses")

    out = p.add_argument_group("outputs")
    out.add_argument("--output-dir", type=non_empty_path, help="where the model and sidecar go")
    out.add_argument("--enable-diagnostics", action="store_true", help="per-trial/per-fold diagnostics under diagnostics_outputs/")
    out.add_argument("--parent-run-id", help="pipeline run id, recorded in provenance")
    add_log_level(out)
    # Every flag's default is its config field's; --model-type's is None, so that "not given" shows for
    # --compare-models (the config's default applies after parsing).
    p.set_defaults(**{f.name: f.default for f in dataclasses.fields(OptimizerConfig)
                      if f.default is not dataclasses.MISSING and f.name != "model_type"})
    return p


@functools.cache
def flag_spellings() -> dict[str, frozenset[str]]:
    """Every spelling of the flags that set each config field (``fuse_folds``: ``--no-fuse-folds``, ...)."""
    spellings: dict[str, frozenset[str]] = collections.defaultdict(frozenset)
    for action in build_parser()._actions:  # argparse offers no public walk over its actions
        spellings[action.dest] |= frozenset(action.option_strings)
    return spellings


def config_from_args(args: argparse.Namespace, command_line: Sequence[str]) -> OptimizerConfig:
    if args.compare_models and args.model_type is not None:
        # The existing optimizer takes the pair (its WATCHER manifest passes both) and compares.
        logger.info("--model-type %s is ignored: --compare-models runs every model type", args.model_type)
    if args.device is not None and args.gpus is not None:
        raise UsageError("--device and --gpus both choose the GPUs; give one of them")
    gpus = args.device if args.device is not None else args.gpus
    policy_path = args.policy
    if policy_path is None:
        policy_path, why = find_policy()
        logger.info("policy: %s (%s)", policy_path, why)
    # Flags store into the config's field names; the rest is resolved here.
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptimizerConfig) if hasattr(args, f.name)}
    given.update(
        model_type=OptimizerConfig.model_type if args.compare_models else args.model_type or OptimizerConfig.model_type,
        gpus=gpus, policy_path=policy_path, command_line=list(command_line),
    )
    config = OptimizerConfig(**given)
    validate_config(config)
    return config


def apply_compatibility_flags(args: argparse.Namespace) -> None:
    """Give the existing optimizer's flags their meaning here; none is silently ignored. ``--device cuda:N``
    is the N-th visible GPU, as CUDA counts; without it the run trains on the CPU, with a warning."""
    if args.allow_inline_nn_fallback:
        logger.warning(
            "--allow-inline-nn-fallback does not apply: this optimizer never trains in the parent; a worker that "
            "dies is restarted and then replaced by one-shot subprocesses (train_single_trial.py)"
        )
    if args.device:
        from step5.devices import detect_gpus

        ordinal = int(args.device[0])
        visible = detect_gpus()
        if ordinal < len(visible):
            args.device = [visible[ordinal]]
        else:
            logger.warning("--device cuda:%d: %d GPU(s) visible here, so this run trains on the CPU",
                           ordinal, len(visible))
            args.device = []


def configure_logging(level: str) -> None:
    import optuna

    logging.basicConfig(stream=sys.stderr, level=level, force=True,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    # Our per-trial progress line replaces Optuna's "Trial N finished"; its warnings
    # ("Trial N failed with parameters ... because ...") stay.
    optuna.logging.set_verbosity(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog or Path(sys.argv[0]).name or "meta_prediction_optimizer_anti_overfit.py")
    args = parser.parse_args(argv)  # exits 64 on a usage error, 0 for --help
    configure_logging(args.log_level)
    apply_compatibility_flags(args)
    with latched_interrupts() as handled:
        if handled:
            install_supervisor_lifeline()  # run by the WATCHER: stop as on SIGTERM if it dies
        stdin_lifeline = install_stdin_lifeline()  # a helper started over ssh: stop when the channel closes
        try:
            return _run_main(parser, args, argv)
        finally:
            if stdin_lifeline is not None:
                stdin_lifeline.disarm()


def _run_main(parser: UsageErrorParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Every way a run can end becomes an exit code and one line."""
    try:
        config = config_from_args(args, [sys.argv[0], *argv])
        # argparse stores the default object itself when a flag is not given.
        preflight(config.output_dir, config.storage,
                  output_dir_given=args.output_dir is not parser.get_default("output_dir"),
                  summary_dir=config.diagnostics_folder if config.compare_models else None,
                  model_types=() if config.search_only else MODEL_TYPES if config.compare_models else (config.model_type,))
        if config.compare_models:
            from step5.optimizer.compare import run_compare

            return run_compare(config)
        from step5.optimizer.optimizer import AntiOverfitMetaOptimizer

        AntiOverfitMetaOptimizer(config).run()
        return EXIT_OK
    except DegenerateSignalError as exc:
        print(f"degenerate signal: {exc}", file=sys.stderr)
        return exc.exit_code
    except UsageError as exc:
        return parser.usage_error(exc)
    except Step5Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as caught:
        exc = delivered(caught)  # a SIGTERM that a library (catboost) re-raised as a plain KeyboardInterrupt
        if isinstance(exc, Terminated):
            logger.error("terminated by %s; workers and temporary files were cleaned up", exc.signal_name)
            return exc.exit_code
        logger.error("interrupted (Ctrl-C); workers and temporary files were cleaned up")
        return EXIT_INTERRUPTED


def check_writable_dir(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and prove a file can be written in it; ``what`` names it in the error."""
    path = Path(folder)
    blocker = file_in_the_way(path)
    if blocker is not None:
        where = "it is a file, not a folder" if blocker == path else f"{blocker} is a file, not a folder"
        raise Step5Error(f"{what}: {where}")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except OSError as exc:
        raise Step5Error(f"{what}: cannot create the folder: {os_error_reason(exc)}") from None
    try:
        create_temp_file(path, ".step5-preflight-", "").unlink()
    except OSError as exc:
        raise Step5Error(f"{what}: cannot write files in {path}: {os_error_reason(exc)}") from None


def check_sqlite_storage(storage_url: str, what: str) -> None:
    database = sqlite_database(storage_url)
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    db = Path(database)
    folder = db.parent
    blocker = file_in_the_way(folder)
    if blocker is not None:
        raise Step5Error(f"{what}: {blocker} is a file, not a folder")
    if not folder.is_dir():
        raise Step5Error(f"{what}: the folder {folder} does not exist")
    if db.exists() and not db.is_file():
        raise Step5Error(f"{what}: {db} is not a file")
    try:
        create_temp_file(folder, ".step5-preflight-", "").unlink()  # SQLite writes its journal here
        if db.exists():
            with open(db, "r+b"):
                pass
    except OSError as exc:
        raise Step5Error(f"{what}: cannot write the study database {db}: {os_error_reason(exc)}") from None


def check_model_names(output_dir: Path, model_types: Sequence[str], what: str, folders: Sequence[str] = ()) -> None:
    """Can the commit put the model set of one of ``model_types`` into ``output_dir``? It replaces a file
    (or link) under a name it shows, not a folder: a folder there failed the run after its whole search.
    ``folders``: more folders (in ``output_dir``) the run makes or writes after its search."""
    for folder in (SETS_DIRNAME, *folders):
        path = output_dir / folder
        if os.path.lexists(path):  # made when needed if missing
            check_writable_dir(path, f"{what}: {path}")
    for name in sorted({*map(checkpoint_filename, model_types), SIDECAR_NAME, HISTORY_PNG_NAME}):
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            raise Step5Error(f"{what}: {path} is a folder, where this run saves its {name}; move or remove it")


def preflight(output_dir: Path, storage: str | None, *, output_dir_given: bool, summary_dir: Path | None = None,
              model_types: Sequence[str] = ()) -> None:
    """Before any data is loaded: can this run write its outputs? (docs/optimizer-internals.md#preflight)
    ``summary_dir``: where a compare run writes the summary the WATCHER judges it by. ``model_types``: those
    whose model set the run may commit into ``output_dir`` (none for a --search-only run)."""
    what = f"--output-dir {output_dir}" if output_dir_given else (
        f"the default output dir {output_dir} (choose another with --output-dir)"
    )
    check_writable_dir(output_dir, what)
    if model_types:
        folders: tuple[str, ...] = ()
        if summary_dir is not None:  # a compare run: its sub-runs commit into its staging folder, the losers are archived
            from step5.optimizer.compare import ARCHIVE_DIRNAME, STAGING_DIRNAME

            folders = (STAGING_DIRNAME, ARCHIVE_DIRNAME)
        check_model_names(output_dir, model_types, what, folders)
    if summary_dir is not None:
        check_writable_dir(summary_dir, f"the compare summary's folder {summary_dir} (in the working directory)")
    if storage is not None:
        check_sqlite_storage(storage, f"--storage {storage}")
