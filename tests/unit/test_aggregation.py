"""Aggregation rules on hand-made vectors, plus order-invariance properties."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fi_peer.models.aggregation import (
    ABSTAIN,
    DEFAULT_PRIVATE_RULE,
    RULES,
    Evidence,
    decide,
    decide_confident,
    get_rule,
    member_vector,
    private_member_vector,
    sum_member_vectors,
)
from fi_peer.privacy.dp import add_member_noise, calibrate_sigma


def total(
    rule: str, probs: list[list[float]], evidence: list[Evidence] | None = None
) -> np.ndarray:
    """Sum of the members' vectors for one query (one row of probs per member)."""
    ev = evidence or [Evidence()] * len(probs)
    vectors = [member_vector(np.array([p]), e, rule)[0] for p, e in zip(probs, ev, strict=True)]
    return sum_member_vectors(vectors)


def test_registry_and_vector_lengths() -> None:
    assert set(RULES) == {"vote", "soft", "entropy", "evidence", "gated", "support"}
    lengths = {name: rule.vector_length(10) for name, rule in RULES.items()}
    assert lengths == {
        "vote": 10,
        "soft": 10,
        "entropy": 11,
        "evidence": 10,
        "gated": 11,
        "support": 20,
    }
    for rule in RULES.values():
        assert rule.n_classes(rule.vector_length(7)) == 7
    assert get_rule(RULES["vote"]) is RULES["vote"]


def test_dp_bounded_rules() -> None:
    bounded = {name for name, rule in RULES.items() if rule.dp_bounded}
    assert bounded == {"vote", "soft", "entropy", "evidence"}
    assert RULES["evidence"].l2_sensitivity == 1.0


def test_vote_histogram_and_label() -> None:
    probs = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]]
    s = total("vote", probs)
    np.testing.assert_array_equal(s, [2.0, 1.0, 0.0])
    label, dist = decide(s, "vote")
    assert label == 0
    np.testing.assert_allclose(dist, [2 / 3, 1 / 3, 0.0])


def test_vote_tie_goes_to_lowest_index() -> None:
    s = total("vote", [[0.1, 0.9], [0.9, 0.1]])
    assert decide(s, "vote")[0] == 0


def test_soft_is_mean_posterior() -> None:
    probs = [[0.6, 0.4], [0.0, 1.0], [0.7, 0.3]]
    label, dist = decide(total("soft", probs), "soft")
    assert label == 1
    np.testing.assert_allclose(dist, [1.3 / 3, 1.7 / 3])


def test_entropy_lets_one_confident_member_beat_three_unsure_ones() -> None:
    sure, unsure = [1.0, 0.0, 0.0], [0.1, 0.5, 0.4]
    probs = [sure, unsure, unsure, unsure]
    assert decide(total("soft", probs), "soft")[0] == 1
    label, dist = decide(total("entropy", probs), "entropy")
    assert label == 0
    w = math.exp(0.1 * math.log(0.1) + 0.5 * math.log(0.5) + 0.4 * math.log(0.4))
    expected = np.array(sure) + 3 * w * np.array(unsure)
    np.testing.assert_allclose(dist, expected / (1 + 3 * w))


def test_evidence_sums_parzen_and_ignores_probabilities() -> None:
    probs = [[0.9, 0.1, 0.0], [0.9, 0.1, 0.0]]
    ev = [Evidence(parzen=[[0.0, 0.5, 0.0]]), Evidence(parzen=[[0.2, 0.4, 0.1]])]
    s = total("evidence", probs, ev)
    np.testing.assert_allclose(s, [0.2, 0.9, 0.1])
    label, dist = decide(s, "evidence")
    assert label == 1
    np.testing.assert_allclose(dist, [0.2 / 1.2, 0.9 / 1.2, 0.1 / 1.2])


def test_gated_member_without_evidence_has_no_say() -> None:
    probs = [[0.0, 1.0], [0.8, 0.2]]
    ev = [Evidence(parzen=[[0.0, 0.0]]), Evidence(parzen=[[1.5, 0.5]])]
    s = total("gated", probs, ev)
    np.testing.assert_allclose(s, [1.6, 0.4, 2.0])
    label, dist = decide(s, "gated")
    assert label == 0
    np.testing.assert_allclose(dist, [0.8, 0.2])


def test_support_weights_by_class_counts() -> None:
    # Member A saw only class 1 (and is confident about it), B saw mostly class 0.
    probs = [[0.1, 0.9], [0.6, 0.4]]
    ev = [Evidence(class_counts=[0, 10]), Evidence(class_counts=[30, 5])]
    s = total("support", probs, ev)
    np.testing.assert_allclose(s, [18.0, 11.0, 30.0, 15.0])
    label, dist = decide(s, "support")
    # scores: class 0 -> 18/30 = 0.6, class 1 -> 11/15
    assert label == 1
    np.testing.assert_allclose(dist, np.array([0.6, 11 / 15]) / (0.6 + 11 / 15))


def test_noisy_sums_still_give_a_distribution() -> None:
    label, dist = decide([-0.5, 2.0, -3.0], "vote")
    assert label == 1
    np.testing.assert_allclose(dist, [0.0, 1.0, 0.0])
    label, dist = decide([-0.5, -0.2, -3.0], "evidence")
    assert label == 1
    np.testing.assert_allclose(dist, [1 / 3] * 3)
    # Non-positive total weight: fall back to the unnormalised numerator.
    label, dist = decide([0.3, 0.1, -0.01], "entropy")
    assert label == 0
    np.testing.assert_allclose(dist, [0.75, 0.25])


def test_decide_batch_matches_decide() -> None:
    rng = np.random.default_rng(0)
    sums = rng.random((5, 11))
    rule = RULES["gated"]
    labels, dists = rule.decide_batch(sums)
    for row, label, dist in zip(sums, labels, dists, strict=True):
        single = rule.decide(row)
        assert single[0] == label
        np.testing.assert_array_equal(single[1], dist)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: get_rule("median"), "unknown aggregation rule"),
        (lambda: member_vector([[0.5, 0.5]], None, "evidence"), "needs Parzen evidence"),
        (lambda: member_vector([[0.5, 0.5]], Evidence(), "support"), "needs class counts"),
        (lambda: member_vector([0.5, 0.5], None, "vote"), "2-D"),
        (lambda: member_vector([[np.nan, 0.5]], None, "soft"), "NaN"),
        (lambda: member_vector([[-0.1, 1.1]], None, "soft"), "non-negative"),
        (
            lambda: member_vector([[0.5, 0.5]], Evidence(parzen=[[1.0, 2.0, 3.0]]), "evidence"),
            "must have 2 columns",
        ),
        (lambda: decide([1.0, 2.0, 3.0], "support"), "no class count"),
        (lambda: decide([[1.0, 2.0]], "vote"), "1-D"),
        (lambda: decide([np.nan, 1.0], "vote"), "NaN"),
        (lambda: sum_member_vectors([]), "at least one"),
        (lambda: sum_member_vectors([[1.0], [1.0, 2.0]]), "same shape"),
    ],
)
def test_misuse_raises_value_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- properties ---------------------------------------------------------------


@st.composite
def committees(draw: st.DrawFn) -> tuple[list[np.ndarray], list[Evidence]]:
    n_members = draw(st.integers(1, 8))
    n_classes = draw(st.integers(2, 6))
    raw = draw(
        hnp.arrays(np.float64, (n_members, n_classes), elements=st.floats(0.0, 1.0, width=32))
    )
    raw = raw + 1e-3
    probs = raw / raw.sum(axis=1, keepdims=True)
    parzen = draw(
        hnp.arrays(np.float64, (n_members, n_classes), elements=st.floats(0.0, 50.0, width=32))
    )
    counts = draw(hnp.arrays(np.int64, (n_members, n_classes), elements=st.integers(0, 200)))
    evidence = [
        Evidence(parzen=parzen[i : i + 1], class_counts=counts[i]) for i in range(n_members)
    ]
    return [probs[i : i + 1] for i in range(n_members)], evidence


@settings(max_examples=60, deadline=None)
@given(committee=committees(), data=st.data())
def test_decide_is_invariant_to_member_order(
    committee: tuple[list[np.ndarray], list[Evidence]], data: st.DataObject
) -> None:
    probs, evidence = committee
    order = data.draw(st.permutations(range(len(probs))))
    for name, rule in RULES.items():
        vectors = [rule.member_vector(p, e) for p, e in zip(probs, evidence, strict=True)]
        label_a, dist_a = rule.decide(sum_member_vectors(vectors)[0])
        label_b, dist_b = rule.decide(sum_member_vectors([vectors[i] for i in order])[0])
        assert label_a == label_b, name
        np.testing.assert_array_equal(dist_a, dist_b)
        assert dist_a.shape == (probs[0].shape[1],)
        assert np.all(dist_a >= 0)
        assert math.isclose(float(dist_a.sum()), 1.0, rel_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(committee=committees())
def test_vote_histogram_counts_every_member_once(
    committee: tuple[list[np.ndarray], list[Evidence]],
) -> None:
    probs, _ = committee
    histogram = sum_member_vectors([member_vector(p, None, "vote") for p in probs])[0]
    assert histogram.sum() == len(probs)
    np.testing.assert_array_equal(histogram, np.round(histogram))
    assert np.all(histogram >= 0)
    label, _ = decide(histogram, "vote")
    assert histogram[label] == histogram.max()


# --- rules under DP noise ---------------------------------------------------------

BOUNDED_NETWORK_RULES = ("vote", "soft", "entropy")


def test_sensitivities_and_privacy_units() -> None:
    table = {
        name: (rule.l2_sensitivity, rule.replace_one_sensitivity, rule.privacy_unit)
        for name, rule in RULES.items()
    }
    root2 = math.sqrt(2.0)
    assert table == {
        "vote": (root2, root2, "owner"),
        "soft": (root2, root2, "owner"),
        "entropy": (root2, root2, "owner"),
        "evidence": (1.0, root2, "record"),
        "gated": (None, None, None),
        "support": (None, None, None),
    }
    assert RULES[DEFAULT_PRIVATE_RULE].dp_bounded


@pytest.mark.parametrize("name", ["gated", "support"])
def test_unbounded_rules_are_refused_under_dp(name: str) -> None:
    ev = Evidence(parzen=[[1.0, 2.0]], class_counts=[3, 4])
    with pytest.raises(ValueError, match="unbounded sensitivity"):
        private_member_vector([[0.5, 0.5]], ev, name)


score_rows = hnp.arrays(
    np.float64,
    st.tuples(st.just(2), st.integers(2, 7)),
    elements=st.floats(0.0, 1e4, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=100, deadline=None)
@given(scores=score_rows)
def test_private_vectors_of_any_two_outputs_are_within_the_sensitivity(
    scores: np.ndarray,
) -> None:
    # Owner-level bound: whatever two training sets produce (even unnormalised
    # scores), the member's DP vectors differ by at most l2_sensitivity.
    for name in BOUNDED_NETWORK_RULES:
        rule = RULES[name]
        assert rule.l2_sensitivity is not None
        a, b = rule.private_vector(scores)
        assert float(np.linalg.norm(a - b)) <= rule.l2_sensitivity * (1 + 1e-12), name
        assert np.all(rule.private_vector(scores) >= 0)


def test_worst_case_pairs_reach_the_stated_sensitivity() -> None:
    one_hots = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for name in BOUNDED_NETWORK_RULES:
        a, b = RULES[name].private_vector(one_hots)
        assert float(np.linalg.norm(a - b)) == pytest.approx(math.sqrt(2.0)), name


def test_private_soft_vector_is_the_normalised_distribution() -> None:
    out = private_member_vector([[2.0, 6.0], [0.0, 0.0]], None, "soft")
    np.testing.assert_allclose(out, [[0.25, 0.75], [0.5, 0.5]])
    # A well-formed distribution is untouched (the plaintext rule and the DP rule agree).
    probs = np.array([[0.2, 0.5, 0.3]])
    for name in ("vote", "soft", "entropy"):
        np.testing.assert_allclose(
            private_member_vector(probs, None, name), member_vector(probs, None, name)
        )


def test_parzen_evidence_moves_by_at_most_one_per_record() -> None:
    # The real evidence head (torch): add, remove or replace one training record.
    torch = pytest.importorskip("torch")
    from fi_peer.models.zoo import OwnerModel, build_network

    gen = np.random.default_rng(3)
    X = gen.random((40, 64)).astype(np.float32)
    y = gen.integers(0, 10, 40)
    queries = np.vstack([X[:5], gen.random((15, 64)).astype(np.float32)])

    def evidence(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        model = OwnerModel(
            build_network("mlp-64-32-10"),
            arch="mlp-64-32-10",
            support_x=torch.from_numpy(xs),
            support_y=torch.from_numpy(ys.astype(np.int64)),
            bandwidth=1.25,
        )
        with torch.inference_mode():
            ev = model.parzen_evidence(torch.from_numpy(queries)).double().numpy()
        return RULES["evidence"].private_vector(np.full((len(queries), 10), 0.1), Evidence(ev))

    base = evidence(X, y)
    removed = evidence(X[1:], y[1:])
    replaced = evidence(np.vstack([X[1:], X[:1] * 0.5]), np.append(y[1:], (y[0] + 1) % 10))
    add_remove = np.linalg.norm(base - removed, axis=1)
    replace = np.linalg.norm(base - replaced, axis=1)
    assert np.all(add_remove <= 1.0 + 1e-6) and RULES["evidence"].l2_sensitivity == 1.0
    assert np.all(replace <= math.sqrt(2.0) + 1e-6)
    assert add_remove.max() == pytest.approx(1.0, abs=1e-6)  # the query at the removed point
    assert replace.max() > 1.0  # replace-one really needs more than 1


def test_decide_confident_abstains_below_the_threshold() -> None:
    assert decide_confident([1.0, 6.0, 3.0], "vote", 5.0) == 1
    assert decide_confident([1.0, 4.9, 3.0], "vote", 5.0) is None
    assert decide_confident([1.0, 5.0, 3.0], "vote", 5.0) == 1  # at T: answers
    # Entropy: the threshold applies to the weighted mean probability.
    assert decide_confident([0.8, 0.2, 1.0], "entropy", 0.7) == 0
    assert decide_confident([0.6, 0.4, 1.0], "entropy", 0.7) is None
    labels = RULES["evidence"].decide_confident_batch([[0.1, 9.0], [0.2, 0.3]], 1.0)
    np.testing.assert_array_equal(labels, [1, ABSTAIN])
    with pytest.raises(ValueError, match="NaN"):
        decide_confident([1.0, 2.0], "vote", math.nan)
    with pytest.raises(ValueError, match="1-D"):
        decide_confident([[1.0, 2.0]], "vote", 1.0)


def test_confident_gnmax_with_distributed_noise() -> None:
    """ε = 4, 10 members, t = 10, each adds N(0, σ²/t), threshold T = 5 votes: a
    consensus is answered, a split committee mostly is not (post-processing of
    one noisy histogram; fixed seed)."""
    n_members = 10
    sigma = calibrate_sigma(4.0, 1e-5, RULES["vote"].l2_sensitivity or 0.0)
    rng = np.random.default_rng(2024)

    def noisy_histogram(labels: list[int]) -> np.ndarray:
        one_hot = np.eye(4)[labels]
        vectors = [private_member_vector(row[None, :], None, "vote")[0] for row in one_hot]
        noised = [add_member_noise(v, sigma, n_members, rng) for v in vectors]
        return sum_member_vectors(noised)

    consensus = [2] * 9 + [0]
    split = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    answers = [decide_confident(noisy_histogram(consensus), "vote", 5.0) for _ in range(200)]
    abstains = [decide_confident(noisy_histogram(split), "vote", 5.0) for _ in range(200)]
    assert sum(a == 2 for a in answers) >= 190
    assert sum(a is None for a in abstains) >= 120
