"""The default task's data: scikit-learn digits, and Dirichlet non-IID partitions.

Digits (1,797 8x8 images, 10 classes) ships inside scikit-learn, so everything
here works offline. Pixels are scaled to [0, 1] (X / 16) as float32; labels are
int64.

:func:`dirichlet_partition` is the classic label-skew split used across the
federated-learning literature: for every class, draw the shares of the peers
from Dirichlet(alpha, ..., alpha) and deal that class's (shuffled) examples out
in those proportions. Small alpha (0.1) gives each peer a few dominant classes;
alpha = 100 is close to IID.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["DigitsSplit", "dirichlet_partition", "load_digits_split"]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, kw_only=True)
class DigitsSplit:
    """A stratified train/test split of digits: X in [0, 1] (float32), y int64."""

    X_train: FloatArray
    y_train: IntArray
    X_test: FloatArray
    y_test: IntArray

    @property
    def input_dim(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits_split(test_size: float = 0.25, random_state: int = 0) -> DigitsSplit:
    """Load scikit-learn's bundled digits and split it, stratified by label.

    With the defaults: 1,347 training and 450 test examples, 64 features.
    """
    bunch = load_digits()
    X = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=test_size, random_state=random_state, stratify=y
    )
    return DigitsSplit(
        X_train=np.ascontiguousarray(X_tr, dtype=np.float32),
        y_train=np.ascontiguousarray(y_tr, dtype=np.int64),
        X_test=np.ascontiguousarray(X_te, dtype=np.float32),
        y_test=np.ascontiguousarray(y_te, dtype=np.int64),
    )


def dirichlet_partition(
    y: npt.ArrayLike,
    n_parts: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[IntArray]:
    """Split the indices of ``y`` into ``n_parts`` label-skewed parts.

    For each class (in sorted label order) the class's indices are shuffled and
    cut into ``n_parts`` runs whose lengths follow proportions drawn from
    Dirichlet(alpha * 1). The parts are disjoint and together cover every index.

    Minimum size: a whole partition is drawn again, from the same ``rng``, until
    every part holds at least ``min_size`` indices (the rejection sampling of
    the reference non-IID benchmarks; 10 by default, enough to train on). The
    result is therefore fully determined by the state of ``rng``. The
    resampling conditions the draw on "no tiny part", which slightly softens
    the skew at very small alpha. After ``max_tries`` draws a ``ValueError`` is
    raised (``min_size`` too large for ``alpha``).

    Returns one sorted int64 index array per part.
    """
    labels = np.asarray(y)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("y must be a 1-D array of integer labels")
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if n_parts * min_size > labels.size:
        raise ValueError(
            f"cannot give {n_parts} parts at least {min_size} of {labels.size} examples each"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(n_parts, float(alpha))
    for _ in range(max_tries):
        parts: list[list[IntArray]] = [[] for _ in range(n_parts)]
        for members in by_class:
            shuffled = rng.permutation(members)
            shares = rng.dirichlet(concentration)
            cuts = (np.cumsum(shares)[:-1] * shuffled.size).astype(np.int64)
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.append(chunk)
        result = [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
        if min(r.size for r in result) >= min_size:
            return result
    raise ValueError(
        f"no partition with every part >= {min_size} after {max_tries} draws "
        f"(alpha={alpha}, n_parts={n_parts}); lower min_size or raise alpha"
    )
