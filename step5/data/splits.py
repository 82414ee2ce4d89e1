"""Seeded row splits and the uncompressed NPZ files that carry one fold to a trainer process, in
a private temp folder (docs/data.md, "Splits and fold files"). sklearn is imported inside the
split functions, so a process that only writes or reads NPZ files does not pay for it."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from step5.errors import Step5Error
from step5.fsutil import os_error_reason
from step5.owner import claim_folder, orphaned_folders

logger = logging.getLogger(__name__)

FOLD_DIR_PREFIX = "step5_nn_"


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}, got {value!r}")
    return int(value)


def dev_rows(n: int, test_fraction: float) -> int:
    """Rows :func:`holdout_split` leaves for development (sklearn rounds the test part up)."""
    return n - int(np.ceil(n * test_fraction))


def holdout_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted (dev, test) row indices, both non-empty; the same seed,
    the same split."""
    from sklearn.model_selection import train_test_split

    n = _check_int("n", n, 2)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be a number in (0, 1), got {test_fraction!r}")
    if dev_rows(n, test_fraction) <= 0:
        raise ValueError(f"`test_fraction`={test_fraction} of {n} rows leaves no rows for development")
    dev_idx, test_idx = train_test_split(np.arange(n), test_size=float(test_fraction), random_state=seed, shuffle=True)
    return np.sort(dev_idx), np.sort(test_idx)


def kfold_splits(n: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` shuffled folds over ``range(n)`` as (train_idx, val_idx) pairs (sklearn ``KFold``)."""
    from sklearn.model_selection import KFold

    n = _check_int("n", n, 2)
    k = _check_int("k", k, 2)
    if k > n:
        raise ValueError(f"`k`={k} folds need at least {k} rows, got n={n}")
    return list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.arange(n)))


def as_xy(name: str, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``X_<name>``/``y_<name>`` as float32 (rows, features) and float64 (rows,), shapes checked."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"`X_{name}` must be 2-D (rows, features), got shape {X.shape}")
    if y.ndim != 1:
        raise ValueError(f"`y_{name}` must be 1-D, got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"`X_{name}` has {X.shape[0]} rows but `y_{name}` has {y.shape[0]}")
    if X.shape[0] == 0:
        raise ValueError(f"`X_{name}` has no rows")
    return X, y


def row_groups(X: np.ndarray) -> np.ndarray | None:
    """Each row's group, rows with equal features in one, numbered in order of first appearance; None when no
    row repeats another. Wherever two copies of a row fall on both sides of a split, the model is scored on a
    row it trained on, so the splits keep each group on one side (:func:`rows_of`)."""
    rows = np.ascontiguousarray(X)
    if rows.shape[0] < 2:
        return None
    keys = rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize))).ravel()
    _, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    return None if inverse.max() + 1 == len(keys) else renumbered(inverse)


def rows_of(split: tuple[np.ndarray, np.ndarray], groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A split of group ids as a split of rows, every copy on its group's side (unchanged: no groups)."""
    if groups is None:
        return split
    second = np.isin(groups, split[1])
    return np.flatnonzero(~second), np.flatnonzero(second)


def renumbered(groups: np.ndarray) -> np.ndarray:
    """``groups`` (of a subset of rows, say) numbered again from 0 in order of first appearance."""
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.intp)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def write_fold_npz(
    path: str | os.PathLike[str], X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
    *, X_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
    feature_names: Sequence[str] | None = None,
) -> Path:
    """Write one fold as an uncompressed NPZ at exactly ``path`` (no ``.npz`` appended): X as
    float32, y as float64, values as given (NaN included: judging data is the trainer's job).
    Inconsistent shapes are a ``ValueError`` naming the array, so a bad fold fails in the parent."""
    arrays: dict[str, np.ndarray] = {}
    arrays["X_train"], arrays["y_train"] = as_xy("train", X_train, y_train)
    arrays["X_val"], arrays["y_val"] = as_xy("val", X_val, y_val)
    if (X_test is None) != (y_test is None):
        raise ValueError("`X_test` and `y_test` must be given together")
    if X_test is not None:
        arrays["X_test"], arrays["y_test"] = as_xy("test", X_test, y_test)
    d = arrays["X_train"].shape[1]
    for key in ("X_val", "X_test"):
        if key in arrays and arrays[key].shape[1] != d:
            raise ValueError(f"`{key}` has {arrays[key].shape[1]} features but `X_train` has {d}")
    if feature_names is not None:
        names = list(feature_names)
        if len(names) != d or not all(isinstance(s, str) for s in names):
            raise ValueError(f"`feature_names` must be {d} strings (one per column), got {len(names)} items")
        arrays["feature_names"] = np.array(names, dtype=np.str_)
    p = Path(path)
    with open(p, "wb") as fh:  # a file object keeps np.savez from renaming the file
        np.savez(fh, **arrays)
    return p


class FoldFiles:
    """A private temp folder of fold NPZ files (``dir``: e.g. a RAM disk; default $TMPDIR),
    removed on exit, exception or not; first it removes those of runs that died on this host."""

    def __init__(self, *, dir: str | os.PathLike[str] | None = None) -> None:
        parent = Path(dir if dir is not None else tempfile.gettempdir())
        for path, owner in orphaned_folders(parent, FOLD_DIR_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed fold folder %s of a dead run (pid %d)", path, owner.pid)
        self.closed = False
        try:
            self.path = Path(tempfile.mkdtemp(prefix=FOLD_DIR_PREFIX, dir=parent))
        except OSError as exc:
            raise self._cannot_write(parent, exc) from None
        try:
            claim_folder(self.path)
        except OSError as exc:
            self.close()
            raise self._cannot_write(self.path, exc) from None

    def write(self, name: str, *arrays: Any, **options: Any) -> Path:
        """:func:`write_fold_npz` to ``<dir>/<name>.npz`` (``.npz`` added when missing)."""
        if self.closed:
            raise RuntimeError(f"FoldFiles {self.path} is closed; cannot write {name!r}")
        if not isinstance(name, str) or not name or os.sep in name or "/" in name or name in (".", ".."):
            raise ValueError(f"`name` must be a plain file name, got {name!r}")
        path = self.path / (name if name.endswith(".npz") else f"{name}.npz")
        try:
            return write_fold_npz(path, *arrays, **options)
        except OSError as exc:
            path.unlink(missing_ok=True)  # a partial fold must not be read
            raise self._cannot_write(path, exc) from None

    @staticmethod
    def _cannot_write(where: Path, exc: OSError) -> Step5Error:
        """One line for a temp folder that cannot take the fold files (full, read-only, missing)."""
        return Step5Error(f"cannot write fold files to {where}: {os_error_reason(exc)}; the workers read each fold "
                          "from there: free room in that folder or point TMPDIR at one that has it")

    def close(self) -> None:
        """Remove the folder and its files; safe to call more than once."""
        if not self.closed:
            self.closed = True
            shutil.rmtree(self.path, ignore_errors=True)
            if self.path.exists():  # pragma: no cover - only if something holds files open on odd filesystems
                logger.warning("could not fully remove fold directory %s", self.path)

    def __enter__(self) -> "FoldFiles":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
