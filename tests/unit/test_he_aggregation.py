"""HE aggregation (fi_peer.privacy.he): the querier decrypts only a sum over >= t members.

The scheme is homomorphic summation among members along a tree. The curious
querier holds the secret key, so what it must never get is a ciphertext of
one member's answer, or of a sum over fewer than ``threshold`` members; with
all-but-one members colluding it learns the remaining member's answer only
up to that member's DP noise (std sigma / sqrt(t)), the bound stated in
docs/he.md.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tenseal as ts

from fi_peer.errors import LocalProtocolError, UnexpectedMessage
from fi_peer.privacy import he

TOL = 1e-3
IN = 8  # narrow inputs: the single layout costs one rotation per input dimension
OUT = 64  # a wide linear answer: many coordinates per evaluation


@pytest.fixture(scope="module")
def secret() -> he.SecretContext:
    return he.create_secret_context()


@pytest.fixture(scope="module")
def member_ctx(secret: he.SecretContext) -> he.PublicContext:
    return he.load_public_context(secret.public_bytes(), require_galois=True)


def _models(names: list[str]) -> dict[str, he.HEModel]:
    rng = np.random.default_rng(11)
    return {
        name: he.build_he_model([he.LinearLayer(rng.normal(size=(IN, OUT)), rng.normal(size=OUT))])
        for name in names
    }


def _aggregate(
    ctx: he.PublicContext,
    tree: he.AggregationTree,
    own: dict[str, he.Partial],
    alive: set[str],
) -> he.Partial:
    """Run the tree bottom-up: each live member sums its children's partials and its own."""
    done: dict[str, he.Partial] = {}

    def partial_of(member: str) -> he.Partial:
        if member not in done:
            kids = [partial_of(c) for c in tree.children(member, alive)]
            done[member] = he.combine(ctx, [own[member], *kids])
        return done[member]

    root = next(m for m in tree.order if m in alive)
    assert tree.parent(root, alive) is None
    return partial_of(root)


@pytest.mark.parametrize("fan_in", [1, 2, 3, 9])
def test_tree_routes_every_live_member_once_to_the_root(fan_in: int) -> None:
    order = tuple(f"m{i}" for i in range(9))
    tree = he.AggregationTree(order, fan_in)
    rng = np.random.default_rng(fan_in)
    for _ in range(20):
        alive = {m for m in order if rng.random() < 0.7} or {order[-1]}
        roots = [m for m in alive if tree.parent(m, alive) is None]
        assert len(roots) == 1
        for member in alive:
            seen = {member}
            node = tree.parent(member, alive)
            while node is not None:  # reaches the root, no cycle
                assert node in alive and node not in seen
                seen.add(node)
                node = tree.parent(node, alive)
            for child in tree.children(member, alive):
                assert tree.parent(child, alive) == member
        covered = list(itertools.chain.from_iterable(tree.children(m, alive) for m in alive))
        assert sorted(covered + roots) == sorted(alive)


def test_tree_rejects_bad_plans() -> None:
    with pytest.raises(LocalProtocolError):
        he.AggregationTree(("a", "a"))
    with pytest.raises(LocalProtocolError):
        he.AggregationTree(("a", "b"), fan_in=0)
    with pytest.raises(LocalProtocolError):
        he.AggregationTree(("a", "b")).parent("c")


def test_dropouts_below_the_threshold_still_answer(
    secret: he.SecretContext, member_ctx: he.PublicContext
) -> None:
    names = [f"m{i}" for i in range(5)]
    models = _models(names)
    tree = he.AggregationTree(tuple(names), fan_in=2)
    alive = set(names) - {"m1"}  # an inner node (parent of m3, m4) drops out
    x = np.random.default_rng(0).uniform(0, 1, (1, IN))
    query = he.encrypt_inputs(secret, x)
    rng = np.random.default_rng(1)
    own = {
        m: he.contribute(member_ctx, models[m], query, member=m, noise_std=0.0, rng=rng)
        for m in sorted(alive)
    }
    total = _aggregate(member_ctx, tree, own, alive)
    assert total.members == frozenset(alive)
    final = he.finalize(total, committee=names, threshold=3)
    got = he.open_aggregate(secret, final, committee=names, threshold=3)
    expected = sum(models[m].forward(x) for m in alive)
    np.testing.assert_allclose(got, expected, atol=TOL * len(alive))


def test_sums_over_too_few_or_foreign_members_are_refused(
    secret: he.SecretContext, member_ctx: he.PublicContext
) -> None:
    names = ["a", "b", "c"]
    models = _models(names)
    query = he.encrypt_inputs(secret, np.zeros((1, IN)))
    rng = np.random.default_rng(2)
    parts = {
        m: he.contribute(member_ctx, models[m], query, member=m, noise_std=0.0, rng=rng)
        for m in names
    }
    two = he.combine(member_ctx, [parts["a"], parts["b"]])
    with pytest.raises(LocalProtocolError, match="threshold"):
        he.finalize(two, committee=names, threshold=3)
    # The curious querier holding one member's partial (e.g. handed over by a
    # relaying member) gets no decryption through the API.
    for lone in (parts["a"], two):
        with pytest.raises(UnexpectedMessage, match="threshold"):
            he.open_aggregate(secret, lone, committee=names, threshold=3)
    with pytest.raises(UnexpectedMessage, match="non-members"):
        he.open_aggregate(secret, two, committee=["a", "c", "d"], threshold=2)
    with pytest.raises(UnexpectedMessage, match="twice"):
        he.combine(member_ctx, [two, parts["b"]])
    with pytest.raises(LocalProtocolError):
        he.finalize(two, committee=names, threshold=1)
    # A relaying member cannot read what passes through it either.
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(member_ctx._ctx, two.output.blobs[0]).decrypt()


def test_curious_querier_with_all_but_one_colluders_learns_only_up_to_the_noise(
    secret: he.SecretContext, member_ctx: he.PublicContext
) -> None:
    names = ["honest", "colluder-1", "colluder-2"]
    models = _models(names)
    sigma, threshold = 6.0, 3
    std = he.dp_noise_std(sigma, threshold)
    x = np.random.default_rng(3).uniform(0, 1, (1, IN))
    query = he.encrypt_inputs(secret, x)
    seeds = {"honest": 100, "colluder-1": 101, "colluder-2": 102}
    own = {
        m: he.contribute(
            member_ctx,
            models[m],
            query,
            member=m,
            noise_std=std,
            rng=np.random.default_rng(seeds[m]),
        )
        for m in names
    }
    total = he.combine(member_ctx, list(own.values()))
    aggregate = he.open_aggregate(secret, total, committee=names, threshold=threshold)
    # Colluders reveal their exact answers, noise included (they replay their RNGs).
    revealed = sum(
        models[m].forward(x) + np.random.default_rng(seeds[m]).normal(0, std, size=(1, OUT))
        for m in names[1:]
    )
    recovered = aggregate - revealed
    error = (recovered - models["honest"].forward(x)).ravel()
    # What is left is the honest member's own noise, nothing less:
    assert 0.6 * std < float(np.std(error)) < 1.4 * std
    assert float(np.mean(np.abs(error))) > 0.5 * std
