"""The one-shot trainer (S96A path, SPEC section 5; docs/training.md, "One-shot trainer"): one
job (``--request FILE|-``, or the SPEC's flags building the same request), answered by the
worker's dispatcher and backend as one JSON line on stdout: exit 0, or 1 with an ``error``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Sequence

from step5.cliutil import UsageErrorParser
from step5.errors import BadRequest, JobError, UsageError
from step5.jsonio import dumps_line, loads, write_json_atomic
from step5.lifeline import expected_parent_pid, install_lifeline
from step5.protocol import MergeRequest, TrainRequest, decode_request, echo, identity
from step5.stdout_guard import claim_stdout

logger = logging.getLogger("step5.oneshot")

#: The file ``--save-model`` writes in ``--model-output-dir``.
CHECKPOINT_NAME = "best_model.pth"
#: The flags a ``--request`` replaces (SPEC section 5's way in).
_FLAGS = ("model_type", "data_path", "params")


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(
        # The name it was started by: train_single_trial.py, or step5-train-fold when installed.
        prog=Path(sys.argv[0]).name or "train_single_trial.py",
        description="Train one neural-net fold (or merge fold models) and print one JSON reply line on stdout.",
        exit_on_error=False,
    )
    p.add_argument("--request", metavar="FILE", default=None,
                   help="a worker protocol request (`train` or `merge`) as JSON, from FILE or - for stdin; "
                        "replaces --model-type, --data-path and --params")
    p.add_argument("--model-type", help="must be neural_net (tree models run in the optimizer)")
    p.add_argument("--data-path", help="fold NPZ with X_train, y_train, X_val, y_val")
    p.add_argument("--params", help="JSON object of NN hyperparameters (step5.protocol.NNParams)")
    p.add_argument("--trial-number", type=int, default=None, help="echoed in the result")
    p.add_argument("--fold-idx", type=int, default=None, help="echoed in the result")
    p.add_argument("--normalize-features", action="store_true", help="standardise X with train-fold statistics")
    p.add_argument("--use-leaky-relu", action="store_true", help="LeakyReLU instead of ReLU")
    p.add_argument("--batch-mode", choices=("auto", "full", "mini"), default="auto")
    p.add_argument("--dropout", type=float, default=None, help="overrides params.dropout")
    p.add_argument("--seed", type=int, default=0, help="seeds init, dropout masks and batch order")
    p.add_argument("--save-model", action="store_true", help=f"write <model-output-dir>/{CHECKPOINT_NAME}")
    p.add_argument("--model-output-dir", default=None, help="where --save-model writes the checkpoint")
    p.add_argument("--output-path", default=None, help="also write the reply JSON to this file")
    p.add_argument("--ready-line", action="store_true",
                   help="first print the worker's `ready` line once torch and the device are set up (the pool "
                        "bounds that by training.worker_ready_timeout_s, the training by the job timeout)")
    return p


def request_from_args(args: argparse.Namespace) -> Any:
    """The validated ``TrainRequest`` or ``MergeRequest`` these arguments describe; raises
    :class:`~step5.errors.UsageError` (flags) or :class:`~step5.errors.BadRequest` (the request)."""
    if args.request is not None:
        given = [f"--{name.replace('_', '-')}" for name in _FLAGS if getattr(args, name) is not None]
        if given:
            raise UsageError(f"--request replaces {', '.join(given)}: give one or the other")
        try:
            text = sys.stdin.buffer.read() if args.request == "-" else Path(args.request).read_bytes()
            raw = loads(text)
        except OSError as exc:
            raise UsageError(f"cannot read --request {args.request}: {exc}") from None
        except ValueError as exc:
            raise UsageError(f"--request is not valid JSON: {exc}") from None
        request = decode_request(raw)
        if not isinstance(request, (TrainRequest, MergeRequest)):
            raise BadRequest(f"the one-shot trainer runs one `train` or `merge` job, got `{request.command}`")
        return request
    missing = [f"--{name.replace('_', '-')}" for name in _FLAGS if getattr(args, name) is None]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (or --request)")
    if args.model_type != "neural_net":
        raise UsageError(
            f"--model-type {args.model_type!r} is not trained here: train_single_trial.py trains only "
            "neural_net folds (xgboost, lightgbm and catboost run inside the optimizer process)"
        )
    if args.save_model and not args.model_output_dir:
        raise UsageError(f"--save-model needs --model-output-dir DIR (the checkpoint goes to DIR/{CHECKPOINT_NAME})")
    try:
        params = loads(args.params)
    except ValueError as exc:
        raise UsageError(f"--params is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise UsageError(f"--params must be a JSON object, got {type(params).__name__}")
    if args.dropout is not None:
        params["dropout"] = args.dropout
    raw = {
        "X_train_path": args.data_path, "params": params, "trial_number": args.trial_number,
        "fold_idx": args.fold_idx, "normalize_features": args.normalize_features,
        "use_leaky_relu": args.use_leaky_relu, "batch_mode": args.batch_mode, "seed": args.seed,
    }
    if args.save_model:
        raw["save_model_path"] = os.path.join(args.model_output_dir, CHECKPOINT_NAME)
    return TrainRequest.from_dict(raw)


def _answer(args: argparse.Namespace, wire: BinaryIO) -> dict[str, Any]:
    """The reply to the job these arguments describe (with ``--ready-line``, ``ready`` goes to
    ``wire`` first); raises UsageError or BadRequest."""
    request = request_from_args(args)
    from step5.nn.worker import Dispatcher, TorchBackend, ready_message  # imports torch: only now, stdout is claimed

    try:
        backend = TorchBackend()
    except ValueError as exc:  # STEP5_TORCH_THREADS is not a thread count
        raise BadRequest(str(exc), **echo(request)) from None
    except Exception as exc:  # noqa: BLE001 - torch or the device cannot be set up: not this job's fault
        logger.exception("cannot set up torch")
        raise JobError(f"cannot set up torch here: {type(exc).__name__}: {exc}", "startup_error",
                       **echo(request)) from None
    if args.ready_line:
        wire.write(dumps_line(ready_message(backend)))
        wire.flush()
    logger.info("trial %s fold %s: %s on %s (%d torch threads)", request.trial_number, request.fold_idx,
                request.command, backend.device, backend.threads)
    (reply,) = Dispatcher(backend).handle(request)
    if reply["status"] == "error":
        logger.error("trial %s fold %s failed (%s): %s", request.trial_number, request.fold_idx,
                     reply["error_type"], reply["error"])
    return reply


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The command (``-m``, ``train_single_trial.py``, ``step5-train-fold``): exactly one JSON
    line on stdout (but for ``--help``), then leave at once, as the worker does: no torch
    teardown for the parent to wait on once the reply is out."""
    from step5.nn.worker import exit_now

    wire = claim_stdout()
    if expected_parent_pid() is not None:
        # Started by Step 5 (which records its pid): die with it rather than finish a fold
        # nobody will read. Run by hand, the trainer has no such parent to watch.
        install_lifeline()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        reply = _answer(args, wire)
    except SystemExit as exc:  # --help: argparse printed to (claimed) stdout -> stderr
        exit_now(int(exc.code or 0), wire)
    except UsageError as exc:
        reply = BadRequest(str(exc), **identity(vars(args) if args else None)).to_dict()
    except JobError as exc:  # a bad request, or torch that cannot be set up
        reply = exc.to_dict()
    except Exception as exc:  # noqa: BLE001 - the parent must still get one JSON line
        logger.exception("one-shot trainer failed unexpectedly")
        reply = JobError(f"{type(exc).__name__}: {exc}", "train_error", traceback=traceback.format_exc(),
                         **identity(vars(args) if args else None)).to_dict()
    if args is not None and args.output_path:
        try:
            write_json_atomic(args.output_path, reply)
        except OSError as exc:
            logger.error("cannot write --output-path %s: %s", args.output_path, exc)
            reply = JobError(f"cannot write --output-path {args.output_path}: {exc}", "train_error",
                             **identity(reply)).to_dict()
    wire.write(dumps_line(reply))
    wire.flush()
    exit_now(0 if reply["status"] == "complete" else JobError.exit_code, wire)


if __name__ == "__main__":  # python -m step5.nn.oneshot (what the fold runner starts)
    main()
