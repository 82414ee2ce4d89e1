"""The one-shot trainer (S96A path, SPEC section 5): one fold, one process, one JSON line.

::

    train_single_trial.py --model-type neural_net --data-path split.npz --params '<json>'
        [--trial-number N] [--fold-idx F] [--normalize-features] [--use-leaky-relu]
        [--batch-mode auto|full|mini] [--dropout X] [--seed S]
        [--save-model --model-output-dir D] [--output-path result.json]

Stdout carries exactly one JSON line: the ``complete`` object :func:`run_train_job`
returns (exit 0), or an ``error`` object (exit 1, as SPEC section 5 says for any failure:
a failed job, or a usage error such as bad flags or ``--params`` that is not valid JSON or
not valid params, which is answered with ``error_type`` ``bad_request``). Everything else --
logs, warnings, a library's banner -- goes to stderr: stdout is claimed before torch is
imported. ``STEP5_TORCH_THREADS`` sets torch's thread count (see docs/training.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn, Sequence

from step5.stdout_guard import claim_stdout

logger = logging.getLogger("step5.oneshot")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = EXIT_FAILED  # SPEC section 5: every failure exits 1; bad_request tells usage apart
CHECKPOINT_NAME = "best_model.pth"


class _UsageFailure(Exception):
    """Raised instead of argparse's exit(2): usage errors must still print one JSON line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _UsageFailure(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        # The name it was started by: train_single_trial.py, or step5-train-fold when installed.
        prog=Path(sys.argv[0]).name or "train_single_trial.py",
        description="Train one neural-net fold and print one JSON result line on stdout.",
    )
    p.add_argument("--model-type", required=True, help="must be neural_net (tree models run in the optimizer)")
    p.add_argument("--data-path", required=True, help="fold NPZ with X_train, y_train, X_val, y_val")
    p.add_argument("--params", required=True, help="JSON object of NN hyperparameters (step5.protocol.NNParams)")
    p.add_argument("--trial-number", type=int, default=None, help="echoed in the result")
    p.add_argument("--fold-idx", type=int, default=None, help="echoed in the result")
    p.add_argument("--normalize-features", action="store_true", help="standardise X with train-fold statistics")
    p.add_argument("--use-leaky-relu", action="store_true", help="LeakyReLU instead of ReLU")
    p.add_argument("--batch-mode", choices=("auto", "full", "mini"), default="auto")
    p.add_argument("--dropout", type=float, default=None, help="overrides params.dropout")
    p.add_argument("--seed", type=int, default=0, help="seeds init, dropout masks and batch order")
    p.add_argument("--save-model", action="store_true", help=f"write <model-output-dir>/{CHECKPOINT_NAME}")
    p.add_argument("--model-output-dir", default=None, help="where --save-model writes the checkpoint")
    p.add_argument("--output-path", default=None, help="also write the result JSON to this file")
    return p


def request_from_args(args: argparse.Namespace) -> Any:
    """The validated :class:`~step5.protocol.TrainRequest` these flags describe.

    Raises :class:`_UsageFailure` for a wrong model type or flag combination and
    :class:`~step5.errors.BadRequest` for invalid ``--params`` values.
    """
    from step5.errors import BadRequest
    from step5.jsonio import loads
    from step5.protocol import TrainRequest

    if args.model_type != "neural_net":
        raise _UsageFailure(
            f"--model-type {args.model_type!r} is not trained here: train_single_trial.py trains only "
            "neural_net folds (xgboost, lightgbm and catboost run inside the optimizer process)"
        )
    if args.save_model and not args.model_output_dir:
        raise _UsageFailure("--save-model needs --model-output-dir DIR (the checkpoint goes to DIR/best_model.pth)")
    try:
        params = loads(args.params)
    except ValueError as exc:
        raise _UsageFailure(f"--params is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise _UsageFailure(f"--params must be a JSON object, got {type(params).__name__}")
    if args.dropout is not None:
        params["dropout"] = args.dropout
    raw: dict[str, Any] = {
        "X_train_path": args.data_path,
        "params": params,
        "trial_number": args.trial_number,
        "fold_idx": args.fold_idx,
        "normalize_features": args.normalize_features,
        "use_leaky_relu": args.use_leaky_relu,
        "batch_mode": args.batch_mode,
        "seed": args.seed,
    }
    if args.save_model:
        raw["save_model_path"] = os.path.join(args.model_output_dir, CHECKPOINT_NAME)
    try:
        return TrainRequest.from_dict(raw)
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - anything else in validation is still a bad request
        raise BadRequest(str(exc)) from None


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    from step5.errors import BadRequest, JobError

    try:
        request = request_from_args(args)
    except _UsageFailure as exc:
        return BadRequest(str(exc), trial_number=args.trial_number, fold_idx=args.fold_idx).to_dict(), EXIT_USAGE
    except BadRequest as exc:
        return exc.to_dict(), EXIT_USAGE

    import torch  # only now: stdout is already claimed

    from step5.nn.job import run_train_job
    from step5.nn.trainer import configure_torch_threads

    try:
        threads = configure_torch_threads()
    except ValueError as exc:
        return BadRequest(str(exc), trial_number=request.trial_number, fold_idx=request.fold_idx).to_dict(), EXIT_USAGE
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    logger.info(
        "trial %s fold %s: %s on %s (%d torch threads)",
        request.trial_number, request.fold_idx, request.data_path, device, threads,
    )
    try:
        return run_train_job(request, device=device), EXIT_OK
    except JobError as exc:
        logger.error("trial %s fold %s failed (%s): %s", request.trial_number, request.fold_idx,
                     exc.error_type, exc.message)
        return exc.to_dict(), EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Always prints exactly one JSON line on stdout
    (except for ``--help``)."""
    wire = claim_stdout()
    from step5.lifeline import expected_parent_pid, install_lifeline

    if expected_parent_pid() is not None:
        # Started by Step 5 (which records its pid): die with it rather than finish a fold
        # nobody will read. Run by hand, the trainer has no such parent to watch.
        install_lifeline()
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from step5.errors import BadRequest, JobError
    from step5.jsonio import dumps_line, write_json_atomic

    args: argparse.Namespace | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except _UsageFailure as exc:
            payload, code = BadRequest(str(exc)).to_dict(), EXIT_USAGE
        else:
            payload, code = _run(args)
    except SystemExit as exc:  # --help / --version: argparse printed to (claimed) stdout -> stderr
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - the parent must still get one JSON line
        logger.exception("one-shot trainer failed unexpectedly")
        payload = JobError(
            f"{type(exc).__name__}: {exc}", "train_error",
            trial_number=getattr(args, "trial_number", None), fold_idx=getattr(args, "fold_idx", None),
            traceback=traceback.format_exc(),
        ).to_dict()
        code = EXIT_FAILED
    if args is not None and args.output_path:
        try:
            write_json_atomic(args.output_path, payload)
        except OSError as exc:
            logger.error("cannot write --output-path %s: %s", args.output_path, exc)
            payload = JobError(
                f"cannot write --output-path {args.output_path}: {exc}", "train_error",
                trial_number=payload.get("trial_number"), fold_idx=payload.get("fold_idx"),
            ).to_dict()
            code = EXIT_FAILED
    wire.write(dumps_line(payload))
    wire.flush()
    return code


if __name__ == "__main__":  # python -m step5.nn.oneshot (what the runner starts)
    sys.exit(main())
