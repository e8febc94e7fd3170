"""Data partitions, deterministic training, and the model runtime (save/load/validate)."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fi_peer.errors import ModelError
from fi_peer.models import RULES, Evidence, member_vector
from fi_peer.models.data import DigitsSplit, dirichlet_partition, load_digits_split
from fi_peer.models.runtime import ModelRuntime, export_torchscript, save_owner_model
from fi_peer.models.zoo import (
    ARCHITECTURES,
    DEFAULT_ARCH,
    OwnerModel,
    build_network,
    train_classifier,
    train_owner_model,
    train_peer_models,
)

SMALL = "mlp-64-32-10"


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


@pytest.fixture(scope="module")
def tiny(split: DigitsSplit) -> OwnerModel:
    return train_owner_model(split.X_train[:150], split.y_train[:150], arch=SMALL, epochs=3, seed=0)


# --- data ---------------------------------------------------------------------


def test_digits_split_shapes_and_scaling(split: DigitsSplit) -> None:
    assert split.X_train.shape == (1347, 64) and split.X_test.shape == (450, 64)
    assert split.X_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert split.X_train.min() >= 0.0 and split.X_train.max() <= 1.0
    assert (split.input_dim, split.n_classes) == (64, 10)
    train_share = np.bincount(split.y_train) / split.y_train.size
    test_share = np.bincount(split.y_test) / split.y_test.size
    np.testing.assert_allclose(train_share, test_share, atol=0.01)  # stratified


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_partition_is_a_partition(split: DigitsSplit, alpha: float) -> None:
    parts = dirichlet_partition(split.y_train, 10, alpha, np.random.default_rng(3))
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert joined.size == split.y_train.size  # disjoint ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(split.y_train.size))  # ... cover
    assert min(p.size for p in parts) >= 10
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_partition_is_deterministic_given_the_rng(split: DigitsSplit) -> None:
    def draw(seed: int) -> list[np.ndarray]:
        return dirichlet_partition(split.y_train, 10, 0.1, np.random.default_rng(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_small_alpha_skews_labels(split: DigitsSplit) -> None:
    def dominance(alpha: float) -> float:
        parts = dirichlet_partition(split.y_train, 10, alpha, np.random.default_rng(0))
        shares = [np.bincount(split.y_train[p], minlength=10).max() / p.size for p in parts]
        return float(np.mean(shares))

    assert dominance(0.1) > 0.4 > 0.2 > dominance(100.0)


def test_partition_rejects_impossible_requests() -> None:
    y = np.repeat(np.arange(3), 5)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least"):
        dirichlet_partition(y, 4, 1.0, rng, min_size=4)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(y, 2, 0.0, rng)
    with pytest.raises(ValueError, match="integer labels"):
        dirichlet_partition(y.astype(float), 2, 1.0, rng)
    with pytest.raises(ValueError, match="draws"):
        dirichlet_partition(y, 3, 0.01, rng, min_size=5, max_tries=3)


# --- zoo / training ---------------------------------------------------------------


def test_registry_names_match_shapes() -> None:
    assert DEFAULT_ARCH == "mlp-64-128-10"
    for name, spec in ARCHITECTURES.items():
        net = spec.build()
        out = net(torch.zeros(2, spec.input_dim))
        assert out.shape == (2, spec.n_classes), name
    with pytest.raises(ModelError, match="unknown architecture"):
        build_network("resnet-50")


def test_training_is_deterministic_by_seed(split: DigitsSplit) -> None:
    X, y = split.X_train[:100], split.y_train[:100]
    global_state = torch.get_rng_state()
    nets = [train_classifier(X, y, arch=SMALL, epochs=2, seed=s) for s in (5, 5, 6)]
    assert torch.equal(torch.get_rng_state(), global_state)  # no global RNG use
    a, b, c = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_learns(split: DigitsSplit) -> None:
    net = train_classifier(split.X_train[:400], split.y_train[:400], arch=SMALL, epochs=20, seed=0)
    with torch.inference_mode():
        pred = net(torch.from_numpy(split.X_test)).argmax(dim=1).numpy()
    assert (pred == split.y_test).mean() > 0.85


def test_train_classifier_rejects_bad_data(split: DigitsSplit) -> None:
    with pytest.raises(ModelError, match="shape"):
        train_classifier(split.X_train[:10, :60], split.y_train[:10], arch=SMALL, seed=0)
    with pytest.raises(ModelError, match="labels"):
        train_classifier(split.X_train[:10], split.y_train[:10] + 10, arch=SMALL, seed=0)


def test_train_peer_models_uses_each_partition_once(split: DigitsSplit) -> None:
    calls: list[tuple[int, int]] = []
    models = train_peer_models(
        3, 0.5, 1, split=split, arch=SMALL, epochs=1, on_progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    sizes = [int(m.support_y.numel()) for m in models]
    assert sum(sizes) == split.y_train.size
    counts = torch.stack([m.class_counts() for m in models]).sum(dim=0)
    np.testing.assert_array_equal(counts.numpy(), np.bincount(split.y_train))


def test_parzen_evidence_matches_definition(tiny: OwnerModel, split: DigitsSplit) -> None:
    x = split.X_test[:3]
    with torch.inference_mode():
        got = tiny.parzen_evidence(torch.from_numpy(x)).numpy()
    support, labels = tiny.support_x.numpy(), tiny.support_y.numpy()
    d2 = ((x[:, None, :].astype(np.float64) - support[None, :, :]) ** 2).sum(-1)
    kernel = np.exp(-d2 / (2 * 1.25**2))
    want = np.stack([kernel[:, labels == c].sum(1) for c in range(10)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Bounded: each training record adds at most 1.
    assert np.all(got <= tiny.class_counts().numpy()[None, :] + 1e-6)


# --- runtime -------------------------------------------------------------------------


def _reference(model: OwnerModel, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        probs, parzen = model(torch.from_numpy(X))
    return probs.double().numpy(), parzen.double().numpy()


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_roundtrip_gives_identical_outputs(
    tiny: OwnerModel, split: DigitsSplit, tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / f"model.{fmt}"
    save = save_owner_model if fmt == "state_dict" else export_torchscript
    digest = save(tiny, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    runtime = ModelRuntime.load(path, input_dim=64, n_classes=10)
    card = runtime.card
    assert (card.task, card.arch, card.format, card.sha256) == ("digits", SMALL, fmt, digest)
    assert (card.input_dim, card.n_classes, card.bandwidth) == (64, 10, 1.25)
    assert card.rules == tuple(RULES) and len(card.digest) == 32
    probs, parzen = _reference(tiny, split.X_test)
    np.testing.assert_array_equal(runtime.predict_proba(split.X_test), probs)
    np.testing.assert_array_equal(runtime.parzen_evidence(split.X_test), parzen)
    np.testing.assert_array_equal(runtime.class_counts, tiny.class_counts().numpy())


def test_from_module_hash_equals_saved_file_hash(tiny: OwnerModel, tmp_path: Path) -> None:
    digest = save_owner_model(tiny, tmp_path / "m.pt")
    assert ModelRuntime.from_module(tiny).card.sha256 == digest
    assert save_owner_model(tiny, tmp_path / "other-name.pt") == digest  # path-free bytes


def test_small_batches_give_the_same_answers(tiny: OwnerModel, split: DigitsSplit) -> None:
    whole = ModelRuntime.from_module(tiny)
    batched = ModelRuntime(tiny, fmt="state_dict", sha256=whole.card.sha256, batch_size=7)
    np.testing.assert_allclose(
        batched.predict_proba(split.X_test[:50]), whole.predict_proba(split.X_test[:50]), 1e-6
    )


@pytest.mark.parametrize("rule", list(RULES))
def test_contribution_is_the_member_vector(tiny: OwnerModel, split: DigitsSplit, rule: str) -> None:
    runtime = ModelRuntime.from_module(tiny)
    X = split.X_test[:5]
    got = runtime.contribution(X, rule)
    probs, parzen = _reference(tiny, X)
    evidence = Evidence(parzen=parzen, class_counts=tiny.class_counts().numpy())
    np.testing.assert_array_equal(got, member_vector(probs, evidence, rule))
    assert got.shape == (5, RULES[rule].vector_length(10))


def test_bare_state_dict_needs_arch_and_has_no_evidence(
    tiny: OwnerModel, split: DigitsSplit, tmp_path: Path
) -> None:
    path = tmp_path / "bare.pt"
    torch.save(tiny.net.state_dict(), path)
    with pytest.raises(ModelError, match="needs arch"):
        ModelRuntime.load(path)
    runtime = ModelRuntime.load(path, arch=SMALL)
    assert runtime.card.rules == ("vote", "soft", "entropy") and runtime.card.bandwidth is None
    np.testing.assert_array_equal(
        runtime.predict_proba(split.X_test), _reference(tiny, split.X_test)[0]
    )
    with pytest.raises(ModelError, match="evidence head"):
        runtime.contribution(split.X_test[:2], "evidence")
    with pytest.raises(ModelError, match="fit architecture"):
        ModelRuntime.load(path, arch=DEFAULT_ARCH)


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_wrong_arch_or_shape_expectations(tiny: OwnerModel, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "m"
    (save_owner_model if fmt == "state_dict" else export_torchscript)(tiny, path)
    with pytest.raises(ModelError, match="expected 'mlp-64-128-10'"):
        ModelRuntime.load(path, arch=DEFAULT_ARCH)
    with pytest.raises(ModelError, match="input width"):
        ModelRuntime.load(path, input_dim=784)
    with pytest.raises(ModelError, match="classes"):
        ModelRuntime.load(path, n_classes=2)


def test_file_with_foreign_weights_is_rejected(tiny: OwnerModel, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_owner_model(tiny, path)
    payload = torch.load(path, weights_only=True)
    payload["arch"] = DEFAULT_ARCH  # metadata lies about the weights
    torch.save(payload, path)
    with pytest.raises(ModelError, match="fit architecture"):
        ModelRuntime.load(path)
    payload["arch"] = "mlp-64-999-10"
    torch.save(payload, path)
    with pytest.raises(ModelError, match="unknown architecture"):
        ModelRuntime.load(path)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: b"definitely not a model",
        lambda data: data[: len(data) // 2],
        lambda data: data[:-300] + bytes(300),  # zip directory wiped
    ],
    ids=["garbage", "truncated", "no-directory"],
)
@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_corrupt_files_raise_model_error(
    tiny: OwnerModel, tmp_path: Path, fmt: str, corrupt: Callable[[bytes], bytes]
) -> None:
    path = tmp_path / "m"
    (save_owner_model if fmt == "state_dict" else export_torchscript)(tiny, path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ModelError):
        ModelRuntime.load(path)


def test_pinned_hash_catches_silent_corruption(tiny: OwnerModel, tmp_path: Path) -> None:
    path = tmp_path / "m"
    digest = export_torchscript(tiny, path)
    assert ModelRuntime.load(path, expected_sha256=digest).card.sha256 == digest
    data = path.read_bytes()
    # Zero some weight bytes: the archive still loads, only the hash can tell.
    offset = data.index(b"archive/data/0") + 200
    path.write_bytes(data[:offset] + bytes(64) + data[offset + 64 :])
    assert ModelRuntime.load(path).card.sha256 != digest
    with pytest.raises(ModelError, match="sha256"):
        ModelRuntime.load(path, expected_sha256=digest)


def test_missing_file_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        ModelRuntime.load(tmp_path / "nope.pt")


def test_bad_inputs_raise_model_error(tiny: OwnerModel, split: DigitsSplit) -> None:
    runtime = ModelRuntime.from_module(tiny)
    with pytest.raises(ModelError, match=r"shape \(n, 64\)"):
        runtime.predict_proba(split.X_test[:3, :63])
    with pytest.raises(ModelError, match=r"shape \(n, 64\)"):
        runtime.predict_proba(split.X_test[0])
    bad = split.X_test[:3].copy()
    bad[1, 5] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        runtime.contribution(bad, "soft")
    with pytest.raises(ModelError, match="not a numeric array"):
        runtime.predict_proba([["a"] * 64])
    with pytest.raises(ModelError, match="unknown aggregation rule"):
        runtime.contribution(split.X_test[:1], "median")
    assert runtime.predict_proba(np.zeros((0, 64))).shape == (0, 10)
