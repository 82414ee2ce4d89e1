"""The fixed-shape epoch loop (step5.nn.device_loop) trains exactly what the host loop trains.

On the CPU it runs uncaptured and must be bit-identical to the host loop; on a GPU it is
captured as a CUDA graph and must match the host loop within 1e-3 relative.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from step5.devices import TRAIN_LOOP_ENV
from step5.nn import device_loop
from step5.nn.device_loop import resolve_train_loop
from step5.nn.trainer import Fold, ModelSpec, TrainConfig, TrainedModel, train_models

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def fold(seed: int, n_train: int, n_val: int, n_stop: int = 0, d: int = 8) -> Fold:
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n_train + n_val + n_stop, d)) * 3 + 5).astype(np.float32)
    z = (X - 5) / 3
    y = (0.5 + 0.1 * (z[:, 0] + 0.6 * np.tanh(2 * z[:, 1]) + 0.3 * rng.normal(size=len(X)))).astype(np.float32)
    a, b = n_train, n_train + n_val
    if n_stop:
        return Fold(X[:a], y[:a], X[a:b], y[a:b], X_stop=X[b:], y_stop=y[b:])
    return Fold(X[:a], y[:a], X[a:b], y[a:b])


def three_models(optimizer: str) -> tuple[list[ModelSpec], list[Fold]]:
    """Models that stop at different epochs (patience 2 / restore_best off / never), with
    dropout, input dropout and input sparsity, on folds of unequal length; under SGD the
    third diverges."""
    specs = [
        ModelSpec(learning_rate=2e-2, weight_decay=1e-2, dropout=0.2, input_dropout=0.1, input_sparsity=0.05,
                  seed=1, patience=2),
        ModelSpec(learning_rate=4e-2, dropout=0.0, seed=2, patience=4, gradient_clip=0.5, restore_best=False),
        ModelSpec(learning_rate=5e-3 if optimizer != "sgd" else 1e30, weight_decay=1e-3, dropout=0.4,
                  input_dropout=0.25, seed=3, patience=0, gradient_clip=0.0),
    ]
    folds = [fold(1, 230, 50, 30), fold(2, 197, 61, 25), fold(3, 161, 40, 20)]
    return specs, folds


def assert_identical(a: TrainedModel, b: TrainedModel, what: str) -> None:
    assert (a.epochs_run, a.best_epoch, a.error) == (b.epochs_run, b.best_epoch, b.error), what
    assert a.metrics == b.metrics, what
    assert (a.state_dict is None) == (b.state_dict is None), what
    for k, v in (a.state_dict or {}).items():
        assert torch.equal(v, b.state_dict[k]), f"{what}: {k}"


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("batch_mode", ["full", "mini"])
@pytest.mark.parametrize("hidden", [(16, 8), ()])
def test_the_fixed_shape_loop_is_bit_identical_to_the_host_loop_on_cpu(optimizer, batch_mode, hidden):
    specs, folds = three_models(optimizer)
    cfg = TrainConfig(hidden_layers=hidden, optimizer=optimizer, epochs=25, batch_mode=batch_mode, batch_size=48)
    host = train_models(cfg, specs, folds, device=CPU, loop="host")
    fixed = train_models(cfg, specs, folds, device=CPU, loop="graph")
    for m, (a, b) in enumerate(zip(fixed, host)):
        assert_identical(a, b, f"model {m}")
    if hidden:  # the case is not trivial: the models stop at different epochs (or diverge)
        assert len({r.epochs_run for r in host}) > 1 or any(r.error for r in host)
    if optimizer == "sgd":
        assert fixed[2].error is not None and "diverged" in fixed[2].error


def test_a_lone_model_stops_at_the_same_epoch_in_both_loops():
    cfg = TrainConfig(hidden_layers=(8,), epochs=200, batch_mode="mini", batch_size=32)
    spec = ModelSpec(learning_rate=3e-2, dropout=0.1, seed=5, patience=3)
    (host,) = train_models(cfg, [spec], [fold(7, 150, 40)], device=CPU, loop="host")
    (fixed,) = train_models(cfg, [spec], [fold(7, 150, 40)], device=CPU, loop="graph")
    assert host.epochs_run < 200, "early stopping should end this run"
    assert_identical(fixed, host, "lone model")


def test_the_loop_comes_from_the_argument_then_the_environment():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_train_loop(None, cuda, {}) == "graph"
    assert resolve_train_loop(None, cpu, {}) == "host"
    assert resolve_train_loop(None, cpu, {TRAIN_LOOP_ENV: "graph"}) == "graph"
    assert resolve_train_loop(None, cuda, {TRAIN_LOOP_ENV: "host"}) == "host"  # the kill switch
    assert resolve_train_loop("host", cuda, {TRAIN_LOOP_ENV: "graph"}) == "host"
    with pytest.raises(ValueError, match=f"{TRAIN_LOOP_ENV} must be one of .*'fast'"):
        resolve_train_loop(None, cpu, {TRAIN_LOOP_ENV: "fast"})
    with pytest.raises(ValueError, match="loop must be one of"):
        resolve_train_loop("eager", cpu, {})


@pytest.mark.parametrize("device, hip, backend", [
    ("cuda", None, "cuda"), ("cuda", "6.2.41133", "rocm"), ("cpu", None, "cpu"), ("cpu", "6.2.41133", "cpu"),
])
def test_the_backend_comes_from_the_build_not_the_device_name(device, hip, backend):
    # A ROCm build of torch calls its AMD GPUs "cuda" too; only torch.version.hip tells.
    assert device_loop.device_backend(torch.device(device), hip) == backend


def test_on_rocm_the_graph_loops_fall_back_to_the_host_loop_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(device_loop, "_warned_blocked_capture", False)
    rocm, cpu, hip = torch.device("cuda"), torch.device("cpu"), "6.2.41133"
    with caplog.at_level("WARNING", logger="step5.nn.device_loop"):
        assert resolve_train_loop(None, rocm, {}, hip_version=hip) == "host"  # auto
        assert resolve_train_loop("graph", rocm, {}, hip_version=hip) == "host"  # asked for
        assert resolve_train_loop(None, rocm, {TRAIN_LOOP_ENV: "graph"}, hip_version=hip) == "host"
        assert resolve_train_loop("host", rocm, {}, hip_version=hip) == "host"
        assert resolve_train_loop("graph", cpu, {}, hip_version=hip) == "graph"  # the CPU never captures anyway
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "ROCm build (HIP 6.2.41133)" in warnings[0] and "host loop" in warnings[0]
    assert resolve_train_loop("graph", torch.device("cuda"), {}, hip_version=None) == "graph"  # CUDA keeps its graphs


def test_a_bad_loop_in_the_environment_fails_the_job_naming_the_variable(monkeypatch):
    monkeypatch.setenv(TRAIN_LOOP_ENV, "fast")
    with pytest.raises(ValueError, match=TRAIN_LOOP_ENV):
        train_models(TrainConfig(hidden_layers=(4,), epochs=1), [ModelSpec()], [fold(1, 20, 5)], device=CPU)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@needs_cuda
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("batch_mode", ["full", "mini"])
def test_the_captured_graph_matches_the_host_loop_on_a_gpu(optimizer, batch_mode):
    gpu = torch.device("cuda:0")
    specs, folds = three_models(optimizer)
    cfg = TrainConfig(hidden_layers=(16, 8), optimizer=optimizer, epochs=25, batch_mode=batch_mode, batch_size=48)
    host = train_models(cfg, specs, folds, device=gpu, loop="host")
    graph = train_models(cfg, specs, folds, device=gpu, loop="graph")
    # The process has captured on this device now, so this pass skips the eager warm-up
    # epoch and replays epoch 1 too: the same models either way.
    assert str(gpu) in device_loop._WARM_DEVICES
    again = train_models(cfg, specs, folds, device=gpu, loop="graph")
    for m, (a, b, c) in enumerate(zip(graph, host, again)):
        assert (a.error is None) == (b.error is None), f"model {m}"
        assert (a.error is None) == (c.error is None), f"model {m}"
        if a.error is None:
            assert a.epochs_run == b.epochs_run == c.epochs_run, f"model {m}"
            for k in a.metrics:
                assert _rel(a.metrics[k], b.metrics[k]) <= 1e-3, f"model {m} {k}: {a.metrics[k]} vs {b.metrics[k]}"
                assert _rel(c.metrics[k], b.metrics[k]) <= 1e-3, f"model {m} {k} (warm): {c.metrics[k]} vs {b.metrics[k]}"
            assert all(math.isfinite(v) for v in a.metrics.values())
