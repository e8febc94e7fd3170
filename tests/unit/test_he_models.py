"""HE-ready models (fi_peer.models.he_models): export, determinism, the zoo's partition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fi_peer.errors import ModelError
from fi_peer.models.data import dirichlet_partition, load_digits_split
from fi_peer.models.he_models import (
    Square,
    build_he_network,
    export_he_model,
    train_he_network,
    train_he_peer_models,
)
from fi_peer.models.zoo import derive_seed


def test_export_matches_torch_forward() -> None:
    net = build_he_network((64, 32, 10), torch.Generator().manual_seed(3))
    x = np.random.default_rng(0).uniform(0, 1, (7, 64)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(export_he_model(net).forward(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "net, match",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "relu"),
        (
            nn.Sequential(nn.Linear(4, 4), Square(), nn.Linear(4, 4), Square(), nn.Linear(4, 2)),
            "levels",
        ),
        (nn.Sequential(nn.Linear(300, 4), Square(), nn.Linear(4, 2)), "limit"),
    ],
)
def test_export_refuses_what_ckks_cannot_run(net: nn.Module, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        export_he_model(net)


def test_training_is_deterministic_by_seed() -> None:
    split = load_digits_split()
    X, y = split.X_train[:200], split.y_train[:200]
    a = export_he_model(train_he_network(X, y, epochs=2, seed=5))
    b = export_he_model(train_he_network(X, y, epochs=2, seed=5))
    c = export_he_model(train_he_network(X, y, epochs=2, seed=6))
    assert all(np.array_equal(p.weight, q.weight) for p, q in zip(a.layers, b.layers, strict=True))
    assert not np.array_equal(a.layers[0].weight, c.layers[0].weight)


def test_peers_use_the_zoo_partition_and_serve_support_vectors() -> None:
    split = load_digits_split()
    peers = train_he_peer_models(4, 0.5, seed=2, split=split, epochs=1)
    rng = np.random.default_rng(derive_seed(2, 0))
    parts = dirichlet_partition(split.y_train, 4, 0.5, rng, min_size=10)
    for peer, idx in zip(peers, parts, strict=True):
        assert np.array_equal(peer.indices, idx)
        assert peer.class_counts.sum() == idx.size
        answer = peer.answer_model.forward(split.X_test[:3])
        assert answer.shape == (3, 20)
        np.testing.assert_allclose(answer[:, 10:], np.broadcast_to(peer.class_counts, (3, 10)))
