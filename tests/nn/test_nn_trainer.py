"""The training core: determinism, learning, and fused (M-model) runs equal to lone runs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from step5.nn.model import FusedMLP, ReferenceMLP
from step5.nn.trainer import (
    THREADS_ENV, Fold, ModelSpec, TrainConfig, configure_torch_threads, make_generator, regression_metrics,
    train_models,
)
from step5.protocol import AUTO_FULL_BATCH_MAX_ROWS, resolve_batch_mode

CPU = torch.device("cpu")
REL = 1e-5  # the contract: a fused model's metrics equal its lone run within 1e-5 relative


def synthetic_fold(seed: int, n_train: int, n_val: int, d: int = 8, noise: float = 0.3) -> Fold:
    """A fold with a planted nonlinear signal in the first four columns."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_train + n_val, d)).astype(np.float32) * 3.0 + 5.0  # unstandardised
    z = (X - 5.0) / 3.0
    y = z[:, 0] + 0.6 * np.tanh(2 * z[:, 1]) + 0.4 * z[:, 2] * z[:, 3] + noise * rng.normal(size=len(X))
    y = (0.5 + 0.1 * y).astype(np.float32)  # a small-scale target like holdout_quality
    return Fold(X[:n_train], y[:n_train], X[n_train:], y[n_train:])


def assert_close(a: float, b: float, what: str) -> None:
    assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-9), f"{what}: {a!r} vs {b!r}"


def _metric_cases():
    rng = np.random.default_rng(3)
    for n in (2, 3, 7, 64, 129, 1000, 4097, 20_000):  # sizes on both sides of numpy's pairwise-sum blocks
        y = (0.5 + 0.1 * rng.normal(size=n)).astype(np.float32)
        yield f"n{n}-float32", y, (y + 0.05 * rng.normal(size=n)).astype(np.float32)
        yield f"n{n}-float64-pred", y, y.astype(np.float64) + 0.05 * rng.normal(size=n)
        yield f"n{n}-worse-than-mean", y, rng.normal(size=n).astype(np.float32)
    constant = np.full(50, 0.25, dtype=np.float32)
    yield "constant-exact", constant, constant.copy()
    yield "constant-missed", constant, constant + np.float32(0.01)
    yield "exact", y, y.copy()


@pytest.mark.parametrize("name", [case[0] for case in _metric_cases()])
def test_regression_metrics_are_sklearns_bit_for_bit(name):
    """The worker computes R^2 and MSE without importing scikit-learn (its import was ~1 s
    of every boot); the numbers must be scikit-learn's, to the bit."""
    from sklearn.metrics import mean_squared_error, r2_score

    (y_true, y_pred), = [(t, p) for case, t, p in _metric_cases() if case == name]
    r2, mse = regression_metrics(y_true, y_pred)
    expected_r2 = r2_score(y_true.astype(np.float64), y_pred)
    assert (r2, mse) == (expected_r2, mean_squared_error(y_true.astype(np.float64), y_pred)), name
    assert type(r2) is float and type(mse) is float


def test_regression_metrics_of_one_row_are_nan_as_in_sklearn():
    r2, mse = regression_metrics(np.array([0.5], dtype=np.float32), np.array([0.4], dtype=np.float32))
    assert math.isnan(r2) and mse == pytest.approx(0.01)


def test_same_seed_is_bit_identical_and_seed_matters():
    fold = synthetic_fold(0, 200, 60)
    cfg = TrainConfig(hidden_layers=(16, 8), epochs=8, batch_mode="mini", batch_size=32)
    spec = ModelSpec(learning_rate=3e-3, dropout=0.2, seed=11)
    a, b = (train_models(cfg, [spec], [fold], device=CPU)[0] for _ in range(2))
    assert a.metrics == b.metrics
    assert (a.epochs_run, a.best_epoch) == (b.epochs_run, b.best_epoch)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    c = train_models(cfg, [ModelSpec(learning_rate=3e-3, dropout=0.2, seed=12)], [fold], device=CPU)[0]
    assert c.metrics["r2"] != a.metrics["r2"]


def test_learns_a_planted_signal_and_not_noise():
    fold = synthetic_fold(1, 400, 150, noise=0.2)
    cfg = TrainConfig(hidden_layers=(32, 16), epochs=40, batch_mode="mini", batch_size=64)
    spec = ModelSpec(learning_rate=5e-3, dropout=0.1, seed=0, patience=8)
    good = train_models(cfg, [spec], [fold], device=CPU)[0]
    assert good.metrics["r2"] > 0.6, good.metrics
    assert good.metrics["train_r2"] > 0.6
    # The same features with the targets shuffled carry nothing to learn.
    rng = np.random.default_rng(0)
    noise = Fold(fold.X_train, rng.permutation(fold.y_train), fold.X_val, rng.permutation(fold.y_val))
    bad = train_models(cfg, [spec], [noise], device=CPU)[0]
    assert bad.metrics["r2"] < 0.1, bad.metrics


def test_metrics_are_on_the_original_target_scale():
    fold = synthetic_fold(2, 150, 50)
    res = train_models(TrainConfig(hidden_layers=(8,), epochs=5), [ModelSpec(seed=1)], [fold], device=CPU)[0]
    y = fold.y_val.astype(np.float64)
    assert res.val_pred is not None and res.val_pred.shape == (50,)
    assert res.metrics["val_mse"] == pytest.approx(np.mean((y - res.val_pred) ** 2), rel=1e-12)
    r2 = 1 - np.sum((y - res.val_pred) ** 2) / np.sum((y - y.mean()) ** 2)
    assert res.metrics["r2"] == pytest.approx(r2, rel=1e-9)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("batch_mode", ["full", "mini"])
def test_fused_models_equal_their_lone_runs(optimizer, batch_mode):
    """Three folds of unequal length, each with its own lr / weight decay / dropout / input
    dropout / input sparsity / seed / patience / clip, trained as one pass, equal three M=1 runs; early stopping fires at
    different epochs, so frozen models must stay frozen while the others go on."""
    folds = [synthetic_fold(10, 230, 50), synthetic_fold(11, 197, 61), synthetic_fold(12, 161, 40)]
    lr = {"adam": (2e-2, 4e-2, 5e-3), "adamw": (2e-2, 4e-2, 5e-3), "sgd": (5e-2, 1e-1, 2e-2)}[optimizer]
    specs = [
        ModelSpec(learning_rate=lr[0], weight_decay=1e-2, dropout=0.2, input_dropout=0.1, input_sparsity=0.05,
                  seed=1, patience=2, gradient_clip=1.0),
        ModelSpec(learning_rate=lr[1], weight_decay=0.0, dropout=0.0, seed=2, patience=4, gradient_clip=0.5),
        ModelSpec(learning_rate=lr[2], weight_decay=1e-3, dropout=0.4, input_dropout=0.25, seed=3, patience=0,
                  gradient_clip=0.0),
    ]
    cfg = TrainConfig(hidden_layers=(16, 8), optimizer=optimizer, epochs=30, batch_mode=batch_mode, batch_size=48)
    fused = train_models(cfg, specs, folds, device=CPU)
    alone = [train_models(cfg, [s], [f], device=CPU)[0] for s, f in zip(specs, folds)]
    for m, (a, b) in enumerate(zip(fused, alone)):
        assert a.error is None and b.error is None
        assert (a.epochs_run, a.best_epoch) == (b.epochs_run, b.best_epoch), f"model {m}"
        assert a.metrics.keys() == b.metrics.keys()
        for k in a.metrics:
            assert_close(a.metrics[k], b.metrics[k], f"model {m} {k}")
    assert fused[2].epochs_run == 30  # patience 0 never stops
    assert min(r.epochs_run for r in fused) < 30, "early stopping should fire for some model"


@pytest.mark.parametrize("group", [[0, 1], [0, 1, 2], [0, 1, 2, 3, 4]])
def test_fused_models_are_bit_identical_to_lone_runs_on_cpu_over_long_runs(group):
    """Rounding must not depend on how many models share a pass: a tiny per-op difference
    (a matrix-vector kernel for one model, a reordered reduction) grows over epochs until
    early stopping flips. Groups of 2, 3 and 5 hit different vector/tail paths."""
    folds = [synthetic_fold(40 + i, 180 + (i % 2), 45) for i in range(5)]
    specs = [ModelSpec(learning_rate=1e-2 * (1 + i), dropout=0.1 * i, input_dropout=0.05 * (i % 3),
                       input_sparsity=0.01 * (i % 2), seed=7 + i, patience=0, gradient_clip=1.0) for i in range(5)]
    cfg = TrainConfig(hidden_layers=(32, 16), optimizer="adam", epochs=60, batch_mode="full")
    fused = train_models(cfg, [specs[i] for i in group], [folds[i] for i in group], device=CPU)
    for i, got in zip(group, fused):
        (alone,) = train_models(cfg, [specs[i]], [folds[i]], device=CPU)
        assert got.metrics == alone.metrics, f"model {i} in group {group}"
        for name, tensor in alone.state_dict.items():
            assert torch.equal(got.state_dict[name], tensor), f"model {i}: {name}"


def test_weight_decay_and_dropout_are_applied_per_model():
    fold = synthetic_fold(3, 120, 40)
    cfg = TrainConfig(hidden_layers=(8,), optimizer="adamw", epochs=5, batch_mode="full")
    base = ModelSpec(learning_rate=1e-2, dropout=0.0, seed=4, patience=0)
    runs = [
        base,
        ModelSpec(learning_rate=1e-2, dropout=0.0, seed=4, patience=0, weight_decay=5.0),
        ModelSpec(learning_rate=1e-2, dropout=0.5, seed=4, patience=0),
    ]
    out = train_models(cfg, runs, [fold] * 3, device=CPU)
    assert out[1].metrics["train_mse"] != out[0].metrics["train_mse"]
    assert out[2].metrics["train_mse"] != out[0].metrics["train_mse"]


def test_input_dropout_acts_in_training_only_and_keeps_the_checkpoint_layout():
    fold = synthetic_fold(6, 160, 50)
    cfg = TrainConfig(hidden_layers=(8, 4), epochs=6, batch_mode="full")
    plain, dropped = train_models(
        cfg, [ModelSpec(learning_rate=1e-2, dropout=0.1, seed=4, patience=0),
              ModelSpec(learning_rate=1e-2, dropout=0.1, input_dropout=0.3, seed=4, patience=0)],
        [fold] * 2, device=CPU)
    assert dropped.metrics["train_mse"] != plain.metrics["train_mse"]  # it changed what was learned
    # The same keys, shapes and indices: input dropout has no module in the stored layout.
    assert {k: v.shape for k, v in dropped.state_dict.items()} == {k: v.shape for k, v in plain.state_dict.items()}
    # Inference ignores it: an eval-mode forward with a mask equals one without.
    model = FusedMLP(5, (7,), use_leaky_relu=True, generators=[make_generator(1, CPU)], device=CPU).eval()
    x = torch.randn(1, 9, 5)
    torch.testing.assert_close(model(x, input_mask=torch.zeros(1, 9, 5)), model(x), rtol=0, atol=0)


def test_input_sparsity_shrinks_the_weights_of_uninformative_features_more():
    """Group lasso on the first layer: the columns of features the target does not use
    lose weight relative to the informative ones, most of them down to exactly zero (the
    proximal step), while the informative ones keep the fit."""
    rng = np.random.default_rng(8)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    y = X[:, 0] * 2.0 - X[:, 1] + 0.1 * rng.normal(size=300)  # features 2..11 are noise
    fold = Fold(X[:240], y[:240], X[240:], y[240:])
    cfg = TrainConfig(hidden_layers=(16,), optimizer="adam", epochs=80, batch_mode="full")
    runs = train_models(cfg, [ModelSpec(learning_rate=1e-2, dropout=0.0, input_sparsity=lam, seed=3, patience=0)
                              for lam in (0.0, 0.01)], [fold] * 2, device=CPU)

    def noise_share(res) -> float:
        norms = res.state_dict["network.0.weight"].norm(dim=0)  # (D,): one per input feature
        return float(norms[2:].sum() / norms.sum())

    plain, sparse = runs
    assert noise_share(sparse) < 0.5 * noise_share(plain)
    zeroed = sparse.state_dict["network.0.weight"].norm(dim=0) == 0
    assert not zeroed[:2].any() and zeroed[2:].sum() >= 5, zeroed
    assert sparse.metrics["r2"] > 0.9  # the informative features still carry the fit


def test_input_sparsity_under_batchnorm_drops_noise_columns_without_starving_the_fit():
    """The first layer feeds BatchNorm, so each hidden unit's incoming weight norm is free:
    the shrink keeps it and moves only the direction. At strengths where the norms used to
    shrink away with the fit (R² 0.80 at 0.05, 0.56 at 0.1 on this data), every noise
    column is exactly zero and the fit stays whole."""
    rng = np.random.default_rng(8)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    y = X[:, 0] * 2.0 - X[:, 1] + 0.1 * rng.normal(size=300)  # features 2..11 are noise
    fold = Fold(X[:240], y[:240], X[240:], y[240:])
    cfg = TrainConfig(hidden_layers=(16,), optimizer="adam", epochs=80, batch_mode="full")
    strengths = (0.05, 0.1)
    runs = train_models(cfg, [ModelSpec(learning_rate=1e-2, dropout=0.0, input_sparsity=lam, seed=3, patience=0)
                              for lam in strengths], [fold] * 2, device=CPU)
    for lam, res in zip(strengths, runs):
        zeroed = (res.state_dict["network.0.weight"].norm(dim=0) == 0).tolist()
        assert zeroed == [False] * 2 + [True] * 10, (lam, zeroed)
        assert res.metrics["r2"] > 0.98, (lam, res.metrics)


def test_the_shrink_under_batchnorm_keeps_each_hidden_units_incoming_norm():
    from step5.nn.trainer import FunctionalOptimizer

    w = torch.tensor([[[3.0, 0.0], [0.1, 4.0], [0.0, 0.05]]])  # (M=1, D=3, W=2): feature 2 is weak
    before = w.norm(dim=1)  # (1, 2): each hidden unit's incoming norm
    opt = FunctionalOptimizer("sgd", [w], lr=torch.full((1, 1, 1), 1.0), weight_decay=torch.zeros(1, 1, 1))
    opt.shrink_input_groups(0, torch.full((1, 1, 1), 0.1), torch.ones(1, 1, 1, dtype=torch.bool), feeds_batchnorm=True)
    assert w[0, 2].abs().sum() == 0  # its group (norm 0.05) was shorter than the step: exactly zero
    torch.testing.assert_close(w.norm(dim=1), before)  # the rest scaled back up, unit by unit
    plain = torch.tensor([[[3.0, 0.0], [0.1, 4.0], [0.0, 0.05]]])
    opt = FunctionalOptimizer("sgd", [plain], lr=torch.full((1, 1, 1), 1.0), weight_decay=torch.zeros(1, 1, 1))
    opt.shrink_input_groups(0, torch.full((1, 1, 1), 0.1), torch.ones(1, 1, 1, dtype=torch.bool))
    assert (plain.norm(dim=1) < before).all()  # a linear model's lasso shrinks for real


def test_a_model_without_hidden_layers_is_linear_and_its_sparsity_is_a_lasso():
    """No hidden layer: the head reads the inputs, so input sparsity acts on it (an L1
    penalty, one weight per feature). Fused linear models equal their lone runs too."""
    rng = np.random.default_rng(9)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    y = (X[:, 0] * 2.0 - X[:, 1] + 0.1 * rng.normal(size=300)).astype(np.float32)  # 2..11 are noise
    fold = Fold(X[:240], y[:240], X[240:], y[240:])
    cfg = TrainConfig(hidden_layers=(), optimizer="adam", epochs=150, batch_mode="full")
    specs = [ModelSpec(learning_rate=3e-2, dropout=0.0, input_sparsity=lam, seed=3, patience=0) for lam in (0.0, 0.05)]
    plain, sparse = train_models(cfg, specs, [fold] * 2, device=CPU)
    assert set(plain.state_dict) == {"network.0.weight", "network.0.bias"}
    assert plain.state_dict["network.0.weight"].shape == (1, 12)
    assert plain.metrics["r2"] > 0.99 and sparse.metrics["r2"] > 0.95

    def noise_share(res) -> float:
        w = res.state_dict["network.0.weight"][0].abs()
        return float(w[2:].sum() / w.sum())

    assert noise_share(sparse) < 0.5 * noise_share(plain)
    assert (sparse.state_dict["network.0.weight"][0, 2:] == 0).sum() >= 5  # a lasso's exact zeros
    for got, spec in zip((plain, sparse), specs):
        (alone,) = train_models(cfg, [spec], [fold], device=CPU)
        for k in got.metrics:
            assert_close(got.metrics[k], alone.metrics[k], k)


def test_a_diverging_model_fails_alone():
    folds = [synthetic_fold(4, 100, 30), synthetic_fold(5, 100, 30)]
    cfg = TrainConfig(hidden_layers=(8,), optimizer="sgd", epochs=6, batch_mode="full")
    specs = [ModelSpec(learning_rate=1e-2, seed=1), ModelSpec(learning_rate=1e30, gradient_clip=0.0, seed=2)]
    ok, diverged = train_models(cfg, specs, folds, device=CPU)
    assert diverged.error is not None and "diverged" in diverged.error and diverged.metrics == {}
    alone = train_models(cfg, specs[:1], folds[:1], device=CPU)[0]
    assert ok.error is None
    for k in ok.metrics:
        assert_close(ok.metrics[k], alone.metrics[k], k)


@pytest.mark.parametrize("hidden", [(7, 3), (), (1,)])
def test_exported_weights_reproduce_the_fused_forward(hidden):
    gens = [make_generator(s, CPU) for s in (1, 2)]
    fused = FusedMLP(5, hidden, use_leaky_relu=True, generators=gens, device=CPU)
    with torch.no_grad():  # non-trivial BatchNorm state
        for t in fused.running_stats():
            t.uniform_(0.5, 1.5)
    x = torch.randn(2, 11, 5)
    want = fused.eval()(x)[..., 0]
    for m in range(2):
        ref = ReferenceMLP(5, hidden, use_leaky_relu=True, dropout=0.3)
        exported = fused.export_model(m)
        for name, t in exported.items():
            # its own storage (torch.save writes a view's whole storage: every model of the
            # group), contiguous, and no longer part of the training graph
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
            assert t.is_contiguous() and not t.requires_grad, name
        ref.load_state_dict(exported)
        got = ref.eval()(x[m])[:, 0]
        torch.testing.assert_close(got, want[m], rtol=1e-5, atol=1e-6)


def test_batch_mode_resolution():
    assert resolve_batch_mode("auto", AUTO_FULL_BATCH_MAX_ROWS) == "full"
    assert resolve_batch_mode("auto", AUTO_FULL_BATCH_MAX_ROWS + 1) == "mini"
    assert resolve_batch_mode("mini", 10) == "mini"
    with pytest.raises(ValueError, match="batch_mode"):
        resolve_batch_mode("huge", 10)


def test_inconsistent_inputs_are_value_errors():
    cfg = TrainConfig(hidden_layers=(4,), epochs=1)
    with pytest.raises(ValueError, match="features"):
        train_models(cfg, [ModelSpec(), ModelSpec()], [synthetic_fold(0, 20, 5, d=4), synthetic_fold(0, 20, 5, d=5)],
                     device=CPU)
    with pytest.raises(ValueError, match="one fold per model"):
        train_models(cfg, [ModelSpec()], [], device=CPU)


def test_thread_count_comes_from_the_environment():
    before = torch.get_num_threads()
    try:
        assert configure_torch_threads({THREADS_ENV: "1"}) == 1
        assert torch.get_num_threads() == 1
        assert configure_torch_threads({}) == 1  # unset: leave torch's setting alone
        for bad in ("0", "two", "-3"):
            with pytest.raises(ValueError, match=THREADS_ENV):
                configure_torch_threads({THREADS_ENV: bad})
    finally:
        torch.set_num_threads(before)
