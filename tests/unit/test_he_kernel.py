"""The polynomial-kernel evidence of the HE mode (fi_peer.privacy.he, KernelEvidenceModel).

What is checked: CKKS equals the plaintext evidence (stated tolerance 1e-4
absolute for evidence values up to ~50; measured ~1e-8), every readable slot
holds the noisy answer; the per-record sensitivity bound holds by brute force
(add/remove one record: <= 1, replace one: <= sqrt 2, for in-domain and
out-of-domain queries); unsupported shapes are ModelErrors; through the
protocol core, a member with a finite DP budget answers an input-private DP
query for the ``evidence`` rule and is charged in its ledger, while it refuses
DP for the ``support`` rule.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from fi_peer.agent import LedgerGuard
from fi_peer.errors import ModelError
from fi_peer.he_runtime import (
    HERuntime,
    kernel_model_path,
    load_kernel_model,
    runtime_for,
    save_kernel_model,
)
from fi_peer.identity import Identity
from fi_peer.privacy import he
from fi_peer.privacy.budget import BudgetLedger, BudgetLimits
from fi_peer.privacy.dp import calibrate_sigma
from fi_peer.protocol.effects import QueryOutcome
from fi_peer.protocol.he_effects import HEEvaluate
from fi_peer.protocol.he_messages import HERequest
from fi_peer.protocol.he_query import HEConfig
from fi_peer.protocol.messages import ModelCard, QueryRequest
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from tests.unit.he_wire import toy_request_fields
from tests.unit.test_he_protocol import HENet

TOL = 1e-4
SQRT2 = math.sqrt(2.0)


def _data(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, dim)), rng.integers(0, classes, n)


def _direct(X: np.ndarray, Xtr: np.ndarray, ytr: np.ndarray, classes: int) -> np.ndarray:
    """E_c(x) = sum over class-c points of (u(x).u(x_j))^2, computed point by point."""
    fmap = he.kernel_feature_map(X.shape[1])
    k = (fmap(X) @ fmap(Xtr).T) ** 2
    return np.stack([k[:, ytr == c].sum(axis=1) for c in range(classes)], axis=1)


@pytest.fixture(scope="module")
def secret() -> he.SecretContext:
    return he.create_secret_context()


@pytest.fixture(scope="module")
def member_ctx(secret: he.SecretContext) -> he.PublicContext:
    return he.load_public_context(secret.public_bytes(), require_galois=True)


def test_kernel_he_equals_plaintext_and_every_slot_is_noised(
    secret: he.SecretContext, member_ctx: he.PublicContext
) -> None:
    Xtr, ytr = _data(120, 64, 10, 0)
    model = he.kernel_evidence_model(Xtr, ytr, 10)
    x = np.random.default_rng(1).uniform(0, 1, (2, 64))
    np.testing.assert_allclose(model.forward(x), _direct(x, Xtr, ytr, 10), atol=1e-9)
    query = he.encrypt_kernel_inputs(secret, x, model.feature_map)
    assert query.layout is he.Layout.SINGLE and len(query.blobs) == 2
    clean = he.decrypt_outputs(secret, he.evaluate(member_ctx, model, query))
    np.testing.assert_allclose(clean, model.forward(x), atol=TOL)
    assert model.forward(x).max() > 1.0  # not trivially small values
    one = he.EncryptedQuery(layout=query.layout, n_inputs=1, input_dim=64, blobs=query.blobs[:1])
    noisy = he.evaluate(member_ctx, model, one, noise_std=3.0, rng=np.random.default_rng(2))
    answer = he.decrypt_outputs(secret, noisy)[0]
    assert np.abs(answer - model.forward(x)[0]).max() > 0.3
    # all 4096 slots: copies of the noisy answer with period 32, padding slots noised
    from tests.unit.test_he import _raw_slots

    copies = _raw_slots(secret, noisy.blobs[0], tensor=False).reshape(-1, he.KERNEL_PERIOD)
    np.testing.assert_allclose(copies[:, :10], np.tile(answer, (copies.shape[0], 1)), atol=TOL)
    np.testing.assert_allclose(copies, np.tile(copies[0], (copies.shape[0], 1)), atol=TOL)
    assert np.abs(copies[0, 10:]).min() > 1e-3


def test_kernel_values_are_in_0_1_for_any_input() -> None:
    fmap = he.kernel_feature_map(64)
    rng = np.random.default_rng(3)
    X = np.vstack(
        [
            rng.uniform(0, 1, (50, 64)),
            rng.normal(0, 1e6, (20, 64)),  # far out of the domain
            np.full((1, 64), he.KERNEL_CENTRE),  # the centre itself: z = 0
            np.zeros((1, 64)),
        ]
    )
    u = fmap(X)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-12)
    k = (u @ u.T) ** 2
    assert k.min() >= 0 and k.max() <= 1 + 1e-12


def test_per_record_sensitivity_bound_holds_by_brute_force() -> None:
    """Replace one record (any class, any point, even out of the domain): the member's
    vector moves by <= sqrt 2; add or remove one: by <= 1, for every query x."""
    classes = 10
    Xtr, ytr = _data(40, 64, classes, 4)
    rng = np.random.default_rng(5)
    queries = np.vstack([rng.uniform(0, 1, (150, 64)), rng.normal(0, 50, (50, 64)), Xtr[:20]])
    base = he.kernel_evidence_model(Xtr, ytr, classes).forward(queries)
    worst_replace = worst_remove = 0.0
    replacements = [Xtr[::-1], rng.uniform(0, 1, (40, 64)), queries[:40] * 1e3]
    for j in range(len(ytr)):
        for pool in replacements:
            X2, y2 = Xtr.copy(), ytr.copy()
            X2[j], y2[j] = pool[j], (ytr[j] + 1 + j) % classes
            moved = he.kernel_evidence_model(X2, y2, classes).forward(queries) - base
            worst_replace = max(worst_replace, float(np.linalg.norm(moved, axis=1).max()))
        keep = np.arange(len(ytr)) != j
        removed = he.kernel_evidence_model(Xtr[keep], ytr[keep], classes).forward(queries) - base
        worst_remove = max(worst_remove, float(np.linalg.norm(removed, axis=1).max()))
    assert worst_replace <= he.KERNEL_REPLACE_ONE_SENSITIVITY + 1e-9
    assert worst_remove <= he.KERNEL_L2_SENSITIVITY + 1e-9
    assert worst_replace > 0.9 and worst_remove > 0.5  # the brute force reaches near the bound


def test_unsupported_kernel_shapes_are_model_errors(
    secret: he.SecretContext, member_ctx: he.PublicContext
) -> None:
    with pytest.raises(ModelError):
        he.kernel_feature_map(65)
    with pytest.raises(ModelError):
        he.KernelFeatureMap(64, tuple(range(64)))  # 64 features + the constant > 64
    Xtr, ytr = _data(40, 8, 33, 6)
    with pytest.raises(ModelError, match="at most 32 classes"):
        he.kernel_evidence_model(Xtr, ytr, 33)
    with pytest.raises(ModelError):
        he.kernel_evidence_model(Xtr, ytr, 3)  # labels out of range
    model = he.kernel_evidence_model(*_data(40, 8, 3, 7), 3)
    batched = he.encrypt_inputs(secret, np.zeros((6, 8)), layout=he.Layout.BATCHED)
    with pytest.raises(ModelError, match="single layout"):
        he.evaluate(member_ctx, model, batched)
    with pytest.raises(ModelError):
        he.evaluate(
            member_ctx,
            model,
            he.encrypt_kernel_inputs(secret, np.zeros((1, 9)), he.kernel_feature_map(9)),
        )


def test_kernel_model_file_round_trip_and_foreign_feature_map(tmp_path: Path) -> None:
    model = he.kernel_evidence_model(*_data(30, 4, 3, 8), 3)
    owner = tmp_path / "owner.pt"
    save_kernel_model(kernel_model_path(owner), model)
    loaded = load_kernel_model(kernel_model_path(owner))
    x = np.random.default_rng(9).uniform(0, 1, (5, 4))
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    runtime = runtime_for(owner, input_dim=4, vector_len=6, n_classes=3)
    assert runtime.kernel is not None and runtime.model is None
    with pytest.raises(ModelError, match="support"):
        runtime.served("support")
    with pytest.raises(ModelError, match="needs 4 -> 5"):
        runtime_for(owner, input_dim=4, vector_len=6, n_classes=5)
    other = he.KernelFeatureMap(4, (0, 1, 2, 3), centre=0.5)
    save_kernel_model(kernel_model_path(owner), he.KernelEvidenceModel(other, model.moments))
    with pytest.raises(ModelError, match="public one"):
        load_kernel_model(kernel_model_path(owner))


# -- through the protocol core: DP and the budget ledger ----------------------------------

DIM, CLASSES = 4, 3
DELTA = 1e-5


def _card() -> ModelCard:
    return ModelCard(
        task="toy",
        n_classes=CLASSES,
        input_dim=DIM,
        arch="fn",
        model_hash=b"\x00" * 32,
        rules=("evidence", "support"),
        he=True,
    )


def test_member_with_a_finite_budget_answers_a_dp_evidence_query_and_is_charged(
    tmp_path: Path,
) -> None:
    net = HENet()
    config = CoreConfig(querier=QuerierConfig(offer_window_ms=500, include_self=False))
    runtime = HERuntime()
    querier = PeerCore(
        Identity.from_seed(b"querier"), _card(), config=config, rng=np.random.default_rng(7)
    )
    net.cores[querier.peer_id] = querier
    net.runtimes[querier.peer_id] = runtime
    ledgers: list[BudgetLedger] = []
    kernels: dict[str, he.KernelEvidenceModel] = {}
    shared = he.ContextCache(max_entries=2)
    limits = BudgetLimits(per_querier_epsilon=20.0, global_epsilon=200.0, delta=DELTA)
    for i in range(3):
        ledger = BudgetLedger.open(tmp_path / f"budget-{i}.sqlite", limits)
        ledgers.append(ledger)
        core = PeerCore(
            Identity.from_seed(f"kmember-{i}".encode()),
            _card(),
            config=config,
            guard=LedgerGuard(ledger),
            rng=np.random.default_rng(i),
        )
        kernels[core.peer_id] = he.kernel_evidence_model(*_data(40, DIM, CLASSES, 10 + i), CLASSES)
        net.cores[core.peer_id] = core
        net.runtimes[core.peer_id] = HERuntime(
            None, kernel=kernels[core.peer_id], rng=np.random.default_rng(i)
        )
        net.runtimes[core.peer_id].contexts = shared
    for core in net.cores.values():
        net.models[core.peer_id] = None
        for topic in core.topics():
            net.subs.setdefault(topic, set()).add(core.peer_id)
        net.queue.extend((core.peer_id, e) for e in core.start(net.now_ms))
    net.run()
    try:
        x = np.array([0.2, 0.9, 0.4, 0.6])
        sigma = calibrate_sigma(2.0, DELTA, he.KERNEL_L2_SENSITIVITY)

        def ask(rule: str, vector_len: int) -> QueryOutcome:
            blobs, public = runtime.encrypt(x, rule)
            qid, effects = querier.submit_he_query(
                blobs,
                public,
                rule=rule,
                vector_len=vector_len,
                k=3,
                max_price_wei=0,
                timeout_ms=20_000,
                now_ms=net.now_ms,
                epsilon=2.0,
                delta=DELTA,
                noise_sigma=sigma,
            )
            net._feed(querier.peer_id, effects)
            net.run()
            if qid not in net.done:
                net.advance(25_000)
            return net.done[qid]

        seen = len(net.he_log)
        outcome = ask("evidence", CLASSES)
        assert outcome.ok and outcome.total is not None, outcome.reason
        assert len(outcome.contributors) == 3
        evals = [e for _, e in net.he_log[seen:] if isinstance(e, HEEvaluate)]
        assert {e.rule for e in evals} == {"evidence"}
        assert len(evals) == 3
        # N(0, sigma^2 / t) per member, t = 2 for k = 3 (as test_he_protocol's DP test)
        assert all(e.noise_std == pytest.approx(sigma / math.sqrt(2)) for e in evals)
        plain = sum(kernels[m].forward(x[None, :])[0] for m in outcome.contributors)
        assert np.abs(outcome.total - plain).max() < 6 * sigma  # noisy, not garbage
        for ledger in ledgers:
            spent = ledger.spent(querier.peer_id, net.now_ms / 1000)
            assert 1.5 < spent <= 2.0 + 1e-6  # one (2, 1e-5) release, charged
        # the support vector has no bounded sensitivity: refused under DP, nobody charged
        refused = ask("support", 2 * CLASSES)
        assert not refused.ok
        assert querier.metrics["he.declined_by_member.dp_policy_refused"] == 3
        for ledger in ledgers:
            assert ledger.spent(querier.peer_id, net.now_ms / 1000) <= 2.0 + 1e-6
    finally:
        for ledger in ledgers:
            ledger.close()


def test_member_declines_an_he_rule_it_does_not_serve_at_once() -> None:
    """HEConfig.rules (the daemon sets it from HERuntime.rules): a member with only the
    kernel evidence declines a ``support`` request before offering."""
    runtime = HERuntime(None, kernel=he.kernel_evidence_model(*_data(20, DIM, CLASSES, 1), 3))
    assert runtime.rules == ("evidence",)
    assert HERuntime(None).rules == ()
    config = CoreConfig(he=HEConfig(rules=runtime.rules))
    member = PeerCore(Identity.from_seed(b"only-kernel"), _card(), config=config)
    request = HERequest(
        **toy_request_fields(b"q" * 16, now_ms=0, reply_key=b"r" * 32, epsilon=0.0, delta=0.0),
        context_digest="d" * 64,
        n_inputs=1,
        layout="single",
    )
    assert member.he.responder.can_serve(request, 0) == "rule_unsupported"
    evidence = dataclasses.replace(request, rule="evidence")
    assert member.he.responder.can_serve(evidence, 0) is None


def test_kernel_peers_on_the_zoo_partition_sum_to_the_pooled_estimate() -> None:
    """The members' kernel evidence sums to the pooled data's, whatever the split
    (why the collective equals one model on all the data), and the trace of M_c
    is the class count (u has unit norm)."""
    from fi_peer.models.data import load_digits_split
    from fi_peer.models.he_models import train_he_kernel_peer_models
    from fi_peer.models.zoo import peer_partition

    split = load_digits_split()
    peers = train_he_kernel_peer_models(5, 0.1, 0, split=split)
    _, parts = peer_partition(5, 0.1, 0, split)
    x = split.X_test[:20]
    total = sum(p.forward(x) for p in peers)
    pooled = he.kernel_evidence_model(split.X_train, split.y_train, 10).forward(x)
    np.testing.assert_allclose(total, pooled, rtol=1e-10, atol=1e-9)
    for peer, idx in zip(peers, parts, strict=True):
        counts = np.bincount(split.y_train[idx], minlength=10)
        np.testing.assert_allclose(np.einsum("caa->c", peer.moments), counts, atol=1e-9)


def test_he_rule_names_in_the_card_are_not_default_mode_rules() -> None:
    """A card announces its HE rules as "he:<rule>" in ``rules``; a default-mode
    QueryRequest naming one is declined before any offer (it is not a rule of
    that mode, whatever the card's list says)."""
    card = ModelCard(
        task="toy",
        n_classes=3,
        input_dim=4,
        arch="fn",
        model_hash=b"\x00" * 32,
        rules=("soft", "he:support"),
        he=True,
    )
    member = PeerCore(Identity.from_seed(b"he-tags"), card)
    fields = toy_request_fields(b"q" * 16, now_ms=0, reply_key=b"r" * 32, epsilon=0.0, delta=0.0)
    assert member.responder.can_serve(QueryRequest(**fields), 0) is None
    tagged = QueryRequest(**{**fields, "rule": "he:support"})
    assert member.responder.can_serve(tagged, 0) == "rule_unsupported"
