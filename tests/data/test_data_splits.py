"""Seeded splits and fold NPZ files: disjoint, covering, reproducible, cleaned up."""
from __future__ import annotations

import os

import numpy as np
import pytest

from step5.errors import Step5Error
from step5.data.splits import (
    FOLD_DIR_PREFIX, FoldFiles, holdout_split, kfold_splits, renumbered, row_groups, rows_of, write_fold_npz,
)
from step5.owner import OWNER_FILE


@pytest.mark.parametrize("n,frac", [(10, 0.2), (101, 0.25), (2, 0.5), (1000, 0.01)])
def test_holdout_split_disjoint_covering(n, frac):
    dev, test = holdout_split(n, frac, seed=3)
    assert len(np.intersect1d(dev, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([dev, test])), np.arange(n))
    assert len(test) == int(np.ceil(n * frac))
    assert len(dev) > 0 and len(test) > 0


def test_holdout_split_seeded():
    a = holdout_split(200, 0.2, seed=1)
    b = holdout_split(200, 0.2, seed=1)
    c = holdout_split(200, 0.2, seed=2)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5, "0.2", True, None])
def test_holdout_split_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match="`test_fraction`"):
        holdout_split(100, frac, seed=0)


def test_holdout_split_rejects_too_few_rows():
    with pytest.raises(ValueError, match="`n`"):
        holdout_split(1, 0.5, seed=0)
    with pytest.raises(ValueError, match="no rows for development"):
        holdout_split(3, 0.9, seed=0)


@pytest.mark.parametrize("n,k", [(10, 2), (23, 5), (5, 5)])
def test_kfold_disjoint_covering(n, k):
    folds = kfold_splits(n, k, seed=4)
    assert len(folds) == k
    vals = np.concatenate([v for _, v in folds])
    np.testing.assert_array_equal(np.sort(vals), np.arange(n))  # each row validated exactly once
    for train, val in folds:
        assert len(np.intersect1d(train, val)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
        assert abs(len(val) - n / k) < 1


def test_kfold_seeded_and_shuffled():
    a = kfold_splits(50, 5, seed=9)
    b = kfold_splits(50, 5, seed=9)
    c = kfold_splits(50, 5, seed=10)
    for (ta, va), (tb, vb) in zip(a, b):
        np.testing.assert_array_equal(va, vb)
        np.testing.assert_array_equal(ta, tb)
    assert any(not np.array_equal(va, vc) for (_, va), (_, vc) in zip(a, c))
    assert not np.array_equal(a[0][1], np.arange(10))  # shuffled, not contiguous blocks


@pytest.mark.parametrize("n,k,match", [(10, 1, "`k`"), (4, 5, "at least 5 rows"), (10, 2.5, "`k`"), (1, 2, "`n`")])
def test_kfold_rejects_bad_k(n, k, match):
    with pytest.raises(ValueError, match=match):
        kfold_splits(n, k, seed=0)


def _arrays(n=8, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal(n)


def test_write_fold_npz_round_trip(tmp_path):
    X, y = _arrays()
    Xt, yt = _arrays(4, seed=1)
    p = write_fold_npz(
        tmp_path / "fold", X[:6], y[:6], X[6:], y[6:], X_test=Xt, y_test=yt, feature_names=["a", "bb", "c"]
    )
    assert p == tmp_path / "fold" and p.exists()  # exactly the path given, no ".npz" appended
    with np.load(p, allow_pickle=False) as z:
        assert set(z.files) == {"X_train", "y_train", "X_val", "y_val", "X_test", "y_test", "feature_names"}
        assert z["X_train"].dtype == np.float32 and z["y_train"].dtype == np.float64
        np.testing.assert_allclose(z["X_val"], X[6:].astype(np.float32))
        np.testing.assert_array_equal(z["y_test"], yt)
        assert z["feature_names"].tolist() == ["a", "bb", "c"]


def test_write_fold_npz_is_uncompressed_and_keeps_nan(tmp_path):
    import zipfile

    X, y = _arrays()
    X[0, 0] = np.nan  # the trainer, not the writer, judges the data
    p = write_fold_npz(tmp_path / "f.npz", X, y, X, y)
    with zipfile.ZipFile(p) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    with np.load(p, allow_pickle=False) as z:
        assert np.isnan(z["X_train"][0, 0])
        assert "X_test" not in z.files and "feature_names" not in z.files


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"X_train": np.zeros(3)}, "`X_train` must be 2-D"),
        ({"y_val": np.zeros((2, 1))}, "`y_val` must be 1-D"),
        ({"y_train": np.zeros(5)}, "`X_train` has 8 rows but `y_train` has 5"),
        ({"X_val": np.zeros((2, 4))}, "`X_val` has 4 features"),
        ({"X_test": np.zeros((2, 3))}, "given together"),
        ({"X_test": np.zeros((2, 2)), "y_test": np.zeros(2)}, "`X_test` has 2 features"),
        ({"feature_names": ["a"]}, "`feature_names` must be 3 strings"),
        ({"X_train": np.zeros((0, 3)), "y_train": np.zeros(0)}, "`X_train` has no rows"),
    ],
)
def test_write_fold_npz_rejects_inconsistent_arrays(tmp_path, kwargs, match):
    X, y = _arrays()
    args = {"X_train": X, "y_train": y, "X_val": X[:2], "y_val": y[:2]}
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("X_test", "y_test", "feature_names") if k in args}
    with pytest.raises(ValueError, match=match):
        write_fold_npz(tmp_path / "bad.npz", args["X_train"], args["y_train"], args["X_val"], args["y_val"], **extra)


def test_fold_files_lifecycle():
    X, y = _arrays()
    with FoldFiles() as folds:
        root = folds.path
        assert root.name.startswith(FOLD_DIR_PREFIX) and root.is_dir()
        p = folds.write("t0_f0", X, y, X, y)
        assert p == root / "t0_f0.npz" and p.exists()
        assert folds.write("t0_f1.npz", X, y, X, y) == root / "t0_f1.npz"
    assert not root.exists()
    assert folds.closed
    folds.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        folds.write("late", X, y, X, y)


def test_fold_files_removed_when_an_exception_escapes():
    X, y = _arrays()
    with pytest.raises(KeyError):
        with FoldFiles() as folds:
            root = folds.path
            folds.write("t1_f0", X, y, X, y)
            raise KeyError("trial blew up")
    assert not root.exists()


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".."])
def test_fold_files_rejects_path_like_names(name):
    X, y = _arrays()
    with FoldFiles() as folds:
        with pytest.raises(ValueError, match="plain file name"):
            folds.write(name, X, y, X, y)
        assert os.listdir(folds.path) == [OWNER_FILE]  # only the record of who owns the folder


def test_fold_files_custom_base_dir(tmp_path):
    with FoldFiles(dir=tmp_path) as folds:
        assert folds.path.parent == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_a_fold_file_the_filesystem_refuses_is_one_error_naming_it_and_leaves_no_partial_fold(tmp_path,
                                                                                              file_size_limit):
    X, y = _arrays()
    with FoldFiles(dir=tmp_path) as folds:
        with file_size_limit(64), pytest.raises(Step5Error) as caught:
            folds.write("fold_0", X, y, X, y)
        assert str(caught.value) == (f"cannot write fold files to {folds.path / 'fold_0.npz'}: file too large (a file "
                                     "size limit); the workers read each fold from there: free room in that folder or "
                                     "point TMPDIR at one that has it")
        assert not (folds.path / "fold_0.npz").exists()


def test_a_temp_folder_that_cannot_hold_the_fold_folder_is_one_error_naming_it(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(Step5Error, match=f"cannot write fold files to {not_a_folder}: "):
        FoldFiles(dir=not_a_folder)


def test_row_groups_number_equal_rows_together_in_order_of_first_appearance():
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert row_groups(X) is None and row_groups(X[:1]) is None and row_groups(X[:0]) is None
    np.testing.assert_array_equal(row_groups(np.vstack([X[2], X, X[1], X[2]])), [0, 1, 2, 0, 3, 2, 0])
    np.testing.assert_array_equal(row_groups(np.asfortranarray(np.vstack([X, X]))), [0, 1, 2, 3] * 2)  # any layout
    np.testing.assert_array_equal(renumbered(np.array([5, 2, 5, 7])), [0, 1, 0, 2])


def test_rows_of_puts_every_copy_on_its_groups_side():
    groups = np.array([0, 1, 0, 2, 1, 0])
    dev, test = rows_of((np.array([0, 2]), np.array([1])), groups)
    np.testing.assert_array_equal(dev, [0, 2, 3, 5])
    np.testing.assert_array_equal(test, [1, 4])
    pair = (np.array([3, 1]), np.array([0, 2]))
    assert rows_of(pair, None) is pair  # no repeated rows: the split itself, order kept
