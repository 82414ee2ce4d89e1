"""A fake Step 5 for the WATCHER's tests: the real optimizer's CLI (its own parser), no
training; ``FAKE_STEP5_MODE`` chooses what it does (ok, fail, usage, no_sidecar, bad_sidecar,
not_json, degenerate, reject, reject_first, hang, leak) and ``FAKE_STEP5_CALLS``,
``FAKE_STEP5_PIDS`` and ``FAKE_STEP5_BAD_MODELS`` what it records and who fails a compare
run; docs/workers.md ("The fakes") describes each. :func:`make_sidecar` builds a SPEC
section 4 sidecar for the judge's tests.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from step5.artifacts import MODEL_REGISTRY, MODEL_TYPES, SIDECAR_NAME, checkpoint_filename, compare_summary_path
from step5.errors import UsageError
from step5.jsonio import write_json_atomic
from step5.optimizer.config import OptimizerConfig
from step5.testing.fake_worker import FAKE_CHECKPOINT

FAKE_CHECKPOINT_SHA256 = hashlib.sha256(FAKE_CHECKPOINT).hexdigest()
FEATURES = ["lane_agreement_8", "skip_max", "skip_min"]

GOOD_METRICS = {"cv_r2_mean": 0.42, "cv_r2_std": 0.03, "train_r2": 0.5, "val_r2": 0.41,
                "test_r2": 0.4, "train_mse": 0.010, "val_mse": 0.012, "test_mse": 0.012,
                "overfit_ratio": 1.2, "early_stop_ratio": 0.8}
BAD_METRICS = {"cv_r2_mean": -0.05, "cv_r2_std": 0.1, "train_r2": 0.9, "val_r2": -0.05,
               "test_r2": -0.1, "train_mse": 0.002, "val_mse": 0.02, "test_mse": 0.021,
               "overfit_ratio": 10.0, "early_stop_ratio": 0.5}


def make_sidecar(
    model_type: str = "neural_net",
    *,
    metrics: dict[str, float] | None = None,
    outcome: str = "SUCCESS",
    mode: str = "persistent_workers",
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """A sidecar as SPEC section 4 and :func:`step5.artifacts.validate_sidecar` want it, from the real builder."""
    from step5.artifacts import build_feature_schema
    from step5.execution.summary import RunnerStats, build_execution_summary
    from step5.sidecar import build_data_context, build_sidecar

    degenerate = outcome == "DEGENERATE_SIGNAL"
    training_metrics = dict.fromkeys(GOOD_METRICS) if degenerate else dict(metrics or GOOD_METRICS)
    if not degenerate:
        training_metrics["beats_mean"] = training_metrics["test_r2"] > 0
    variance = 0.0 if degenerate else 0.0025
    return build_sidecar(
        model_type=model_type, outcome=outcome,
        checkpoint_path=None if degenerate else checkpoint_filename(model_type),
        checkpoint_sha256=None if degenerate else FAKE_CHECKPOINT_SHA256,
        feature_schema=build_feature_schema(
            FEATURES, ["confidence", "holdout_hits", "holdout_quality", "score"], "survivors_with_scores.json"
        ),
        signal_quality={
            "signal_status": "degenerate" if degenerate else "healthy", "prediction_allowed": not degenerate,
            "target_mean": 0.27, "target_std": variance ** 0.5, "target_variance": variance,
            "unique_target_values": 1 if degenerate else 600, "sample_size": 600,
        },
        data_context=build_data_context(
            fingerprint="feedfacecafebeef", training_draws=100, holdout_draws=1000,
            survivors_file="survivors_with_scores.json", survivor_count=600, prng_type="java_lcg", mod=1000,
            target="holdout_quality", missing_feature_fills=0, lottery_data_file="train_history.json",
        ),
        training_metrics=training_metrics,
        hyperparameters={} if degenerate else {"hidden_layers": [64, 32], "learning_rate": 0.001},
        optuna={"study_name": "fake", "storage": "sqlite:///fake.db", "trials_run": 0 if degenerate else 2,
                "best_trial_number": None if degenerate else 0, "best_value": None if degenerate else 0.4},
        execution=build_execution_summary(None if degenerate else RunnerStats(mode=mode, devices=["cpu"])).to_dict(),
        provenance={"run_id": "fakerun", "parent_run_id": parent_run_id, "command_line": sys.argv,
                    "created_at": "2026-02-18T16:02:58Z", "versions": {}},
    )


def _write_model(out: Path, model_type: str, metrics: dict[str, float], args: argparse.Namespace,
                 mode: str = "persistent_workers") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / checkpoint_filename(model_type)).write_bytes(FAKE_CHECKPOINT)
    write_json_atomic(out / SIDECAR_NAME,
                      make_sidecar(model_type, metrics=metrics, mode=mode, parent_run_id=args.parent_run_id))


def _compare(args: argparse.Namespace, out: Path) -> int:
    """Like :func:`step5.optimizer.compare.run_compare`: skip what the registry rules out,
    keep the best, archive the others' sidecars, write the summary (in the working
    directory's diagnostics_outputs/, where the real step writes it)."""
    from step5.policy import load_policy
    from step5.watcher.registry import load_skip_registry, skipped_model_types

    skipped = skipped_model_types(load_skip_registry(), load_policy(args.policy).training_diagnostics)
    bad = {m for m in os.environ.get("FAKE_STEP5_BAD_MODELS", "").split(",") if m}
    metrics: dict[str, dict[str, float]] = {}
    for i, model_type in enumerate(MODEL_TYPES):
        if model_type not in skipped:
            metrics[model_type] = dict(BAD_METRICS if model_type in bad else GOOD_METRICS)
            metrics[model_type]["test_r2"] += 0.01 * i  # a strict order for "best"
    if not metrics:
        sys.stderr.write("fake_step5: every model type is skipped by the registry\n")
        return 1
    best = max(metrics, key=lambda m: metrics[m]["test_r2"])
    models: dict[str, Any] = {}
    for model_type in MODEL_TYPES:
        if model_type in skipped:
            models[model_type] = {"model_type": model_type, "status": "SKIPPED", "error": "skip registry",
                                  "sidecar_path": None}
            continue
        folder = out if model_type == best else out / "compare_archive" / model_type
        _write_model(folder, model_type, metrics[model_type], args,
                     "persistent_workers" if MODEL_REGISTRY[model_type].torch else "inline")
        models[model_type] = {"model_type": model_type, "status": "SUCCESS",
                              "test_r2": metrics[model_type]["test_r2"], "error": None,
                              "sidecar_path": str(folder / SIDECAR_NAME)}
    write_json_atomic(compare_summary_path(), {"schema_version": 1, "winner": best, "models": models})
    return 0


def _write_pids(*children: subprocess.Popen[bytes]) -> None:
    pids_file = os.environ.get("FAKE_STEP5_PIDS")
    if pids_file:
        write_json_atomic(pids_file, {"pid": os.getpid(), "pgid": os.getpgid(0), "children": [c.pid for c in children]})


def _hang() -> None:
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    stubborn = subprocess.Popen([sys.executable, "-c", ignore_term])
    escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    time.sleep(0.3)  # let the stubborn child install its handler before anyone signals it
    _write_pids(stubborn, escaped)
    sys.stderr.write("fake_step5: hanging\n")
    sys.stderr.flush()
    while True:
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    calls = os.environ.get("FAKE_STEP5_CALLS")
    if calls:
        with open(calls, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(argv) + "\n")
    from step5.optimizer.cli import build_parser  # the real parser: the fake accepts what step 5 accepts

    args = build_parser(prog="fake_step5").parse_args(argv)
    mode = os.environ.get("FAKE_STEP5_MODE", "ok")
    out = Path(args.output_dir)
    model_type = args.model_type or OptimizerConfig.model_type
    sys.stderr.write(f"fake_step5: mode={mode} trials={args.trials} seed={args.seed}\n")
    if mode == "fail":
        sys.stderr.write("fake_step5: error: survivors record 3 key 'features' is missing\n")
        return 1
    if mode == "usage":
        return UsageError.exit_code
    if mode == "hang":
        _hang()
    if mode == "no_sidecar":
        return 0
    if mode == "bad_sidecar":
        sidecar = make_sidecar(model_type, parent_run_id=args.parent_run_id)
        del sidecar["feature_schema"], sidecar["outcome"]
        write_json_atomic(out / SIDECAR_NAME, sidecar)
        return 0
    if mode == "not_json":
        out.mkdir(parents=True, exist_ok=True)
        (out / SIDECAR_NAME).write_text("{not json")
        return 0
    if mode == "degenerate":
        write_json_atomic(out / SIDECAR_NAME,
                          make_sidecar(model_type, outcome="DEGENERATE_SIGNAL", parent_run_id=args.parent_run_id))
        return 2
    if args.compare_models:
        return _compare(args, out)
    rejected = mode == "reject" or (mode == "reject_first" and args.seed == 42)
    _write_model(out, model_type, BAD_METRICS if rejected else GOOD_METRICS, args)
    if mode == "leak":
        _write_pids(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
