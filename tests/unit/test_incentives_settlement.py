"""Reward rules at settlement: exact per-seat amounts, per-audit scores, and the
querier's RewardPolicy (scores from opened audits, persistence, weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fi_peer.chain.terms import MIN_SHARE_BPS, QueryTerms
from fi_peer.config import REWARD_RULES as CONFIG_RULES
from fi_peer.config import ChainConfig
from fi_peer.errors import ConfigError
from fi_peer.incentives.rewards import REWARD_RULES, audit_rule_shares, settlement_amounts
from fi_peer.incentives.scores import audit_contributions
from fi_peer.protocol import fixedpoint
from fi_peer.protocol.audit import AuditBook, commit
from fi_peer.protocol.messages import Opening
from fi_peer.settlement import RewardPolicy

PRICE = 10**15
FLOOR = PRICE * MIN_SHARE_BPS // 10_000


def argmax(sums: np.ndarray) -> np.ndarray:
    return np.argmax(sums, axis=1)


def softmax(sums: np.ndarray) -> np.ndarray:
    e = np.exp(sums - sums.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


# ── settlement_amounts ──────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("delivered", "weights"),
    [
        ([True, True, True], [3.0, 1.0, 0.0]),
        ([True, False, True, True], [0.2, 9.0, 0.7, 1 / 3]),
        ([True] * 7, [1, 2, 3, 4, 5, 6, 7]),
        ([False, True], [5.0, 0.0]),
    ],
)
def test_settlement_amounts_are_exact_bounded_and_conserving(
    delivered: list[bool], weights: list[float]
) -> None:
    amounts = settlement_amounts(PRICE, delivered, weights, min_share_wei=FLOOR)
    n = sum(delivered)
    assert sum(amounts) == n * PRICE
    for a, d in zip(amounts, delivered, strict=True):
        assert (a >= FLOOR) if d else (a == 0)


def test_settlement_amounts_follow_the_weights_above_the_floor() -> None:
    amounts = settlement_amounts(1_000, [True, True, True], [2, 1, 1], min_share_wei=100)
    assert amounts == [100 + 1350, 100 + 675, 100 + 675]
    # all-zero weights (nobody scored yet): the equal split
    assert settlement_amounts(1_000, [True, True], [0, 0], min_share_wei=100) == [1_000, 1_000]
    # the remainder wei go to the largest fractional parts, ties to the lowest seat
    assert settlement_amounts(10, [True] * 3, [1, 1, 1], min_share_wei=1) == [10, 10, 10]
    assert settlement_amounts(11, [True] * 3, [1, 1, 0], min_share_wei=1) == [16, 16, 1]
    assert settlement_amounts(5, [False, False], [1, 1], min_share_wei=0) == [0, 0]


def test_settlement_amounts_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        settlement_amounts(0, [True], [1], min_share_wei=0)
    with pytest.raises(ValueError):
        settlement_amounts(10, [True], [1], min_share_wei=11)
    with pytest.raises(ValueError):
        settlement_amounts(10, [True, True], [1], min_share_wei=0)
    with pytest.raises(ValueError):
        settlement_amounts(10, [True, True], [1, -1], min_share_wei=0)


# ── per-audit scores ──────────────────────────────────────────────────────────


def test_audit_contributions_credit_the_member_that_carries_the_answer() -> None:
    label = 2
    vectors = {
        "right": np.array([0.0, 0.0, 3.0]),
        "wrong": np.array([1.0, 0.0, 0.0]),
        "null": np.zeros(3),
    }
    loo, phi = audit_contributions(vectors, label, argmax, n_classes=3, proba=softmax)
    assert phi["right"] > 0 > phi["wrong"] and phi["null"] == pytest.approx(0.0, abs=1e-12)
    assert loo["right"] > 0 > loo["wrong"]
    # efficiency (no truncation): Shapley values sum to v(N) - v(empty)
    _, exact = audit_contributions(
        vectors, label, argmax, n_classes=3, proba=softmax, tolerance=0.0, permutations=6
    )
    total = softmax(sum(vectors.values())[None, :])[0, label] - 1 / 3
    assert sum(exact.values()) == pytest.approx(total)
    assert audit_contributions({}, 0, argmax, n_classes=3) == ({}, {})


def test_label_free_rule_shares_of_one_audit() -> None:
    dists = {
        "a": np.array([0.9, 0.05, 0.05]),
        "b": np.array([0.6, 0.3, 0.1]),
        "c": np.array([0.1, 0.8, 0.1]),
    }
    agree = audit_rule_shares("agreement", dists, collective=0)
    assert agree == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert audit_rule_shares("agreement", dists, collective=2) == {"a": 0.0, "b": 0.0, "c": 0.0}
    entropy = audit_rule_shares("entropy", dists, collective=0)
    assert sum(entropy.values()) == pytest.approx(1.0)
    assert entropy["a"] > entropy["c"] > entropy["b"]  # confidence, not accuracy
    with pytest.raises(ValueError):
        audit_rule_shares("merit", dists, collective=0)


# ── RewardPolicy ──────────────────────────────────────────────────────────────


def _open(book: AuditBook, qid: bytes, label: int, vectors: dict[str, np.ndarray]) -> None:
    book.mark(qid, label)
    for n, (name, v) in enumerate(vectors.items()):
        nonce = bytes([n + 1]) * 32
        data = fixedpoint.to_bytes(fixedpoint.encode(v))
        book.on_share(qid, name, commit(qid, name, data, nonce))
        assert book.on_opening(name, Opening(query_id=qid, vector=data, nonce=nonce))


def _audited_policy(rule: str, path: Path | None = None, audits: int = 30) -> RewardPolicy:
    book = AuditBook(argmax, n_classes=3)
    policy = RewardPolicy(rule, book, decide=argmax, proba=softmax, path=path)
    rng = np.random.default_rng(1)
    for i in range(audits):
        qid = i.to_bytes(16, "big")
        label = i % 3
        _open(
            book,
            qid,
            label,
            {
                "good": 2.0 * np.eye(3)[label],
                "ok": np.eye(3)[label if i % 3 else (label + 1) % 3],
                "lazy": np.eye(3)[rng.integers(3)] * 0.5,
            },
        )
        assert policy.on_audit(qid)
    return policy


def test_policy_merit_weights_pay_the_accurate_and_starve_the_lazy() -> None:
    policy = _audited_policy("merit")
    good, ok, lazy = policy.weights(["good", "ok", "lazy"]) or []
    assert good > ok > lazy == 0.0
    # a member never audited weighs the mean of its audited committee members
    w = policy.weights(["good", "new"])
    assert w is not None and w[1] == pytest.approx(w[0])
    # nobody audited: the equal split
    assert policy.weights(["x", "y"]) is None
    table = {row["peer_id"]: row for row in policy.table()}
    assert table["good"]["audits"] == 30 and table["good"]["hits"] == 30
    assert table["good"]["shapley"] > table["lazy"]["shapley"]
    assert table["good"]["loo"] is not None and table["lazy"]["merit"] == 0.0


def test_policy_amounts_map_committee_addresses_to_peers() -> None:
    policy = _audited_policy("merit")
    committee = ["0x" + "aa" * 20, "0x" + "bb" * 20, "0x" + "cc" * 20]
    for peer, address in zip(["good", "ok", "lazy"], committee, strict=True):
        policy.learn(peer, address)
    terms = QueryTerms.create(
        query_id=b"\x01" * 16, querier="0x" + "11" * 20, committee=committee, price_wei=PRICE,
        deadline=10**9,
    )  # fmt: skip
    amounts = policy.amounts(terms, 0b111)
    assert amounts is not None and sum(amounts) == 3 * PRICE
    by_address = dict(zip(terms.committee, amounts, strict=True))
    good, ok, lazy = (by_address[terms.committee[terms.position(a)]] for a in committee)
    assert good > ok > lazy == FLOOR
    assert policy.recent[-1]["amounts"] == list(amounts)
    assert policy.amounts(terms, 0) is None  # nothing delivered: nothing to split
    equal = RewardPolicy("equal", policy.book, decide=argmax)
    assert equal.amounts(terms, 0b111) is None


@pytest.mark.parametrize("rule", ["agreement", "entropy"])
def test_label_free_rules_weight_from_opened_vectors(rule: str) -> None:
    policy = _audited_policy(rule)
    weights = policy.weights(["good", "ok", "lazy"])
    assert weights is not None and all(w >= 0 for w in weights)
    assert weights[0] > weights[2]


def test_a_member_caught_opening_badly_weighs_nothing() -> None:
    policy = _audited_policy("merit", audits=12)
    book = policy.book
    qid = (99).to_bytes(16, "big")
    book.mark(qid, 0)
    data = fixedpoint.to_bytes(fixedpoint.encode(np.eye(3)[0]))
    book.on_share(qid, "good", commit(qid, "good", data, b"\x01" * 32))
    other = fixedpoint.to_bytes(fixedpoint.encode(np.eye(3)[1]))
    assert not book.on_opening("good", Opening(query_id=qid, vector=other, nonce=b"\x01" * 32))
    assert book.answered(qid) == {"good"}
    weights = policy.weights(["good", "ok"])
    assert weights is not None and weights[0] == 0.0 and weights[1] > 0


def test_policy_scores_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "scores.json"
    policy = _audited_policy("merit", path=path, audits=9)
    policy.learn("good", "0x" + "aa" * 20)
    policy.save()
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["members"]["good"]["audits"] == 9
    again = RewardPolicy("merit", AuditBook(argmax, n_classes=3), decide=argmax, path=path)
    assert again.table() == policy.table()
    assert again.weights(["good", "ok", "lazy"]) == policy.weights(["good", "ok", "lazy"])
    path.write_text("{not json")
    with pytest.raises(ValueError, match="scores"):
        RewardPolicy("merit", AuditBook(argmax, n_classes=3), decide=argmax, path=path)


def test_audit_book_retry_and_refusals() -> None:
    book = AuditBook(argmax, n_classes=3)
    qid = b"\x05" * 16
    book.mark(qid, 1)
    book.on_share(qid, "m", b"\x00" * 32)
    seen: list[tuple[bytes, str, bool]] = []
    book.listener = lambda q, m, ok: seen.append((q, m, ok))
    assert not book.on_opening("m", Opening(query_id=qid, refused="not_over"))
    assert book.refused(qid) == {"m": "not_over"} and book.refusals["m"] == 1
    assert seen == [(qid, "m", False)] and book.answered(qid) == {"m"}
    (again,) = book.retry(qid, ["m"])
    assert again[0] == "m" and book.refused(qid) == {} and book.refusals["m"] == 0
    assert book.committed(qid) == ["m"] and book.label(qid) == 1


def test_reward_rule_config_is_validated() -> None:
    assert CONFIG_RULES == REWARD_RULES
    base = {"rpc_url": "http://127.0.0.1:8545", "deployment": Path("d.json")}
    assert ChainConfig(**base).reward_rule == "equal"  # type: ignore[arg-type]
    assert ChainConfig(**base, reward_rule="merit").to_toml()["reward_rule"] == "merit"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="reward_rule must be one of equal, merit"):
        ChainConfig(**base, reward_rule="shapley")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown reward rule"):
        RewardPolicy("bogus", AuditBook(argmax, n_classes=3), decide=argmax)
