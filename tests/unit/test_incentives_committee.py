"""Committee choice by reputation with exploration (fi_peer.protocol.reputation)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from fi_peer.protocol.messages import Offer, Result
from fi_peer.protocol.reputation import ReputationSelector, SelectorWeights
from tests.unit.test_protocol_flow import Tap, done, world
from tests.unit.test_protocol_private import body


def offer(price: int = 10, latency: int = 50) -> Offer:
    return Offer(
        query_id=b"q" * 16, price_wei=price, box_key=b"k" * 32, expected_latency_ms=latency
    )


def run_rounds(
    selector: ReputationSelector,
    skill: dict[str, float],
    rounds: int,
    k: int,
    rng: np.random.Generator,
) -> Counter[str]:
    """Each round: every peer offers, k are chosen, chosen peers answer an audit that is
    right with probability ``skill``; the querier's merit score is the running accuracy."""
    hits: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    picks: Counter[str] = Counter()
    for _ in range(rounds):
        chosen = selector.choose({p: offer() for p in skill}, k)
        selector.observe(chosen, chosen)
        for p in chosen:
            picks[p] += 1
            seen[p] += 1
            hits[p] += bool(rng.random() < skill[p])
        # shrunk accuracy on audits (AuditBook.accuracy): a lazy peer's is chance, 0.1
        selector.set_contributions({p: (hits[p] + 5 * 0.5) / (seen[p] + 5) for p in seen})
    return picks


def test_new_peers_get_work_and_lazy_peers_less() -> None:
    rng = np.random.default_rng(0)
    selector = ReputationSelector(np.random.default_rng(1))
    skill = {f"honest{i}": 0.6 + 0.05 * i for i in range(5)} | {"lazy": 0.1}
    picks = run_rounds(selector, skill, 300, 3, rng)
    honest = [picks[p] for p in skill if p != "lazy"]
    assert min(honest) > 3 * picks["lazy"] > 0  # explored, then chosen much less
    # A newcomer is chosen at its first offer (never tried: infinite bonus) ...
    skill["newcomer"] = 0.7
    first = selector.choose({p: offer() for p in skill}, 3)
    assert "newcomer" in first
    # ... and keeps getting work when it is good.
    later = run_rounds(selector, skill, 100, 3, rng)
    assert later["newcomer"] > later["lazy"]


def test_price_and_latency_count_when_contributions_tie() -> None:
    selector = ReputationSelector(np.random.default_rng(0), SelectorWeights(exploration=0.0))
    offers = {"cheap": offer(price=1), "dear": offer(price=100), "slow": offer(latency=5000)}
    assert sorted(selector.choose(offers, 3)) == sorted(offers)  # everyone tried once
    selector.observe(offers, offers)
    assert selector.choose(offers, 1) == ["cheap"]


def test_querier_collects_a_pool_of_offers_and_tells_the_others() -> None:
    w = world(5)
    # Offers are waited for until ceil(k * 2.5) = 5 have come (or the offer window ends).
    weights = SelectorWeights(oversample=2.5)
    w.querier.committee_selector = ReputationSelector(np.random.default_rng(0), weights)
    tap = Tap()
    w.net.drop = tap
    qid = w.submit(k=2)
    out = done(w, qid)
    assert out.ok and len(out.contributors) == 2
    results = [body(d, Result) for src, _, kind, d in tap.seen if kind == "result"]
    not_selected = [r for r in results if r.reason == "not_selected"]
    assert len(not_selected) == 3  # the three offers not chosen are told at once
    chosen: Counter[str] = Counter(out.contributors)
    for _ in range(4):
        chosen.update(done(w, w.submit(k=2)).contributors)
    # Exploration: within five queries every member has answered at least once.
    assert set(chosen) == {m.peer_id for m in w.members}
