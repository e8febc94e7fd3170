"""The querier's committee choice, on the sans-io network: ``[query] committee_choice``.

"reputation" (a ReputationSelector on the core): a choice window after the k-th
offer, then price, observed latency, delivery and audit accuracy with UCB
exploration. "first" (no selector): the first k offers, as before.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fi_peer import config as config_module
from fi_peer.cli import status_tables
from fi_peer.errors import ConfigError
from fi_peer.identity import Identity
from fi_peer.models.data import load_digits_split
from fi_peer.protocol import reputation
from fi_peer.protocol.effects import QueryOutcome
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.messages import Accept, Decline, Result
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.reputation import ReputationSelector
from tests.unit.test_daemon import Running, models, trio_of_daemons  # noqa: F401
from tests.unit.test_protocol_flow import Tap, World, done, model_for, world
from tests.unit.test_protocol_private import body

GRACE = 100
SLOW_MS = 600  # a slow member's answers come this much later than the others'


def reputation_world(
    n: int, *, seed: int = 0, prices: list[int] | None = None, grace: int = GRACE
) -> World:
    qconf = QuerierConfig(secure_aggregation=False, choice_grace_ms=grace)
    w = world(n, prices=prices, querier_config=qconf, plaintext=True)
    w.querier.committee_selector = ReputationSelector(np.random.default_rng(seed))
    return w


def ask(w: World, tap: Tap, *, k: int = 3, max_price_wei: int = 100) -> QueryOutcome:
    """One query; answers ``tap`` holds back (a slow member's) arrive SLOW_MS later."""
    qid = w.submit(k=k, max_price_wei=max_price_wei)
    w.net.advance(GRACE)  # the choice window closes (if it was still open)
    if tap.held:
        w.net.advance(SLOW_MS)
        held, tap.held = tap.held, []
        for _, dst, _, data in held:
            w.net.deliver(dst, data)
        w.net.run()
    return done(w, qid)


def chosen_counts(w: World, tap: Tap, queries: int, **kw: int) -> Counter[str]:
    picks: Counter[str] = Counter()
    for _ in range(queries):
        out = ask(w, tap, **kw)
        assert out.ok, out.reason
        picks.update(out.contributors)
    return picks


def test_a_slow_member_is_chosen_less_but_not_never() -> None:
    w = reputation_world(6)
    slow = w.members[0].peer_id
    tap = Tap(hold=lambda src, dst, kind: src == slow and kind == "share")
    w.net.drop = tap
    picks = chosen_counts(w, tap, 60)
    others = [picks[m.peer_id] for m in w.members[1:]]
    assert picks[slow] > 0 and 2 * picks[slow] < min(others), picks
    stats = w.querier.committee_selector.stats(slow)  # type: ignore[union-attr]
    assert stats.answer_ms is not None and stats.answer_ms >= SLOW_MS
    assert stats.delivered == picks[slow] and stats.dropped == 0


def test_a_lazy_member_is_chosen_less_but_not_never() -> None:
    w = reputation_world(6)
    selector = w.querier.committee_selector
    assert selector is not None
    lazy = w.members[0].peer_id
    # audit accuracies as the core feeds them (AuditBook.accuracy): the lazy one near chance
    selector.set_contributions({m.peer_id: 0.8 for m in w.members} | {lazy: 0.1})
    tap = Tap()
    w.net.drop = tap
    picks = chosen_counts(w, tap, 60)
    others = [picks[m.peer_id] for m in w.members[1:]]
    assert picks[lazy] > 0 and 2 * picks[lazy] < min(others), picks


def test_a_member_that_stays_silent_loses_its_seat() -> None:
    w = reputation_world(5)
    silent = w.members[0].peer_id
    tap = Tap(hold=lambda src, dst, kind: src == silent and kind == "share")
    w.net.drop = tap
    picks: Counter[str] = Counter()
    for _ in range(30):
        qid = w.submit(k=3)
        w.net.advance(5_000)  # past the deadline: the silent member never answers
        tap.held.clear()
        out = done(w, qid)
        assert out.ok  # plaintext: the others' shares are enough
        picks.update(out.contributors)
    stats = w.querier.committee_selector.stats(silent)  # type: ignore[union-attr]
    assert stats.chosen > 0 and stats.dropped == stats.chosen and stats.delivered == 0
    others = [picks[m.peer_id] for m in w.members[1:]]
    assert 2 * stats.chosen < min(others)


def test_a_new_peer_is_chosen_within_a_few_queries() -> None:
    w = reputation_world(5)
    tap = Tap()
    w.net.drop = tap
    chosen_counts(w, tap, 30)
    newcomer = w.net.add("newcomer", model_for(7), w.members[0].config).peer_id
    w.net.run()
    w.net.advance(2_000)  # one heartbeat: everyone has heard everyone
    first = [ask(w, tap) for _ in range(2)]
    assert any(newcomer in out.contributors for out in first)


def test_price_matters() -> None:
    w = reputation_world(6, prices=[0, 0, 0, 90, 90, 90])
    tap = Tap()
    w.net.drop = tap
    picks = chosen_counts(w, tap, 40)
    cheap = [picks[m.peer_id] for m in w.members[:3]]
    dear = [picks[m.peer_id] for m in w.members[3:]]
    assert sum(cheap) > 2 * sum(dear) and min(dear) > 0, picks


def test_the_choice_is_deterministic_given_the_seed() -> None:
    def run(seed: int) -> list[tuple[str, ...]]:
        w = reputation_world(6, seed=seed)
        tap = Tap()
        w.net.drop = tap
        return [ask(w, tap).contributors for _ in range(15)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_the_choice_window_waits_a_grace_after_the_kth_offer() -> None:
    w = reputation_world(5)
    late_ones = {w.members[3].peer_id, w.members[4].peer_id}
    tap = Tap(hold=lambda src, dst, kind: src in late_ones and kind == "offer")
    w.net.drop = tap
    qid = w.submit(k=3)
    assert not tap.of("accept")  # three offers in: the window is open
    in_time, too_late = sorted(tap.held, key=lambda h: h[0])
    tap.held.clear()
    w.net.advance(GRACE // 2)
    w.net.deliver(in_time[1], in_time[3])
    w.net.run()
    assert not tap.of("accept")
    w.net.advance(GRACE // 2)  # the grace ends: choose among four
    accepts = [body(d, Accept) for d in tap.of("accept")]
    assert len(accepts) == 3
    pool = {m.peer_id for m in w.members[:3]} | {in_time[0]}
    committee = {m.peer_id for m in accepts[0].committee}
    assert committee < pool
    (passed,) = pool - committee
    told = [body(d, Result) for d in tap.of("result", dst=passed)]
    assert [r.reason for r in told] == ["not_selected"]  # frees the capacity it reserved
    assert not tap.of("accept", dst=too_late[0])  # its offer never came in the window
    assert done(w, qid).ok


def test_first_keeps_the_first_k_offers_in_arrival_order() -> None:
    qconf = QuerierConfig(secure_aggregation=False, choice_grace_ms=GRACE)
    w = world(5, querier_config=qconf, plaintext=True)
    assert w.querier.committee_selector is None  # committee_choice = "first"
    tap = Tap()
    w.net.drop = tap
    for _ in range(3):
        tap.seen.clear()
        qid = w.submit(k=3)
        offers = [s for s, _, kind, _ in tap.seen if kind == "offer"]
        accepts = [body(d, Accept) for d in tap.of("accept")]
        assert len(offers) == 5 and len(accepts) == 3
        assert [m.peer_id for m in accepts[0].committee] == offers[:3]
        out = done(w, qid)
        assert out.ok and out.elapsed_ms == 0  # no choice window
        results = [body(d, Result) for d in tap.of("result")]
        assert sorted(r.reason for r in results if not r.ok) == ["not_selected"] * 2


def test_config_committee_choice(tmp_path: Path) -> None:
    assert config_module.COMMITTEE_CHOICES == reputation.COMMITTEE_CHOICES
    base = {"version": config_module.CONFIG_VERSION}
    cfg = config_module.parse_config(base, tmp_path)
    assert (cfg.committee_choice, cfg.choice_grace_ms) == ("reputation", 100)
    doc = base | {"query": {"committee_choice": "first", "choice_grace_ms": 0}}
    cfg = config_module.parse_config(doc, tmp_path)
    assert (cfg.committee_choice, cfg.choice_grace_ms) == ("first", 0)
    assert config_module.parse_config(cfg.to_toml(), tmp_path).committee_choice == "first"
    with pytest.raises(ConfigError, match="committee_choice must be one of reputation, first"):
        config_module.parse_config(base | {"query": {"committee_choice": "best"}}, tmp_path)
    with pytest.raises(ConfigError, match="choice_grace_ms"):
        config_module.parse_config(base | {"query": {"choice_grace_ms": -1}}, tmp_path)


async def test_the_daemon_feeds_and_shows_reputation(trio_of_daemons: list[Running]) -> None:  # noqa: F811
    a, b, c = trio_of_daemons
    assert a.daemon.core.committee_selector is not None  # the default: "reputation"
    split = load_digits_split()
    x, y = split.X_test[:4].tolist(), [int(v) for v in split.y_test[:4]]
    plain = await a.post("/v1/query", {"input": x[:3], "k": 2, "epsilon": 0})
    assert all(r["ok"] for r in plain["results"])
    audit = await a.post("/v1/query", {"input": [x[3]], "k": 2, "epsilon": 0, "audit_label": y[3]})
    assert audit["results"][0]["audit"]["opened"] == 2

    status: dict[str, Any] = await a.get("/v1/status")
    rep = status["reputation"]
    assert (rep["committee_choice"], rep["choice_grace_ms"]) == ("reputation", 100)
    rows = {row["peer_id"]: row for row in rep["peers"]}
    assert set(rows) == {b.daemon.peer_id, c.daemon.peer_id} and rep["seats"] == 8
    accuracy = {m["peer_id"]: m["accuracy"] for m in status["audits"]["members"]}
    for peer, row in rows.items():
        assert (row["chosen"], row["delivered"], row["dropped"], row["declined"]) == (4, 4, 0, 0)
        assert row["offers"] == 4 and row["answer_ms"] is not None and row["answer_ms"] >= 0
        assert row["contribution"] == pytest.approx(accuracy[peer], abs=1e-4)
    status["peers"] = []
    titles = [str(t.title) for t in status_tables(status)]
    assert any(t.startswith("committee choice: reputation") for t in titles)
    # kept across restarts (written at shutdown), contributions again from scores.json
    a.daemon._save_reputation()
    again = a.daemon._selector()
    assert again.table() == a.daemon.core.committee_selector.table()
    assert again.seats == 8


def test_the_reputation_file_round_trips_and_bad_ones_are_refused() -> None:
    selector = ReputationSelector(np.random.default_rng(0), max_peers=2)
    selector.observe_offer("a", 5)
    selector.observe_answer("a", 120)
    selector.observe_outcome(delivered=["a"], declined=["b"], dropped=["c"])
    assert list(selector.peers) == ["b", "c"]  # bounded: the least recently seen went
    doc = json.loads(json.dumps(selector.to_json()))
    restored = ReputationSelector(np.random.default_rng(0))
    restored.load_json(doc)
    assert restored.table() == selector.table()
    for bad in ({}, {"version": 1, "seats": 0, "peers": {"x": [1, 2]}},
                {"version": 1, "seats": 0, "peers": {"x": [1, 1, 0, 0, 1, -5.0, None]}}):
        with pytest.raises(ValueError):
            restored.load_json(bad)
    assert restored.table() == selector.table()  # unchanged by a bad file


def test_a_withdrawn_offer_reopens_the_offer_window() -> None:
    w = reputation_world(5)
    held = {w.members[3].peer_id, w.members[4].peer_id}
    tap = Tap(hold=lambda src, dst, kind: src in held and kind == "offer")
    w.net.drop = tap
    qid = w.submit(k=3)  # three offers: the choice window is open
    withdrawn = seal(
        Identity.from_seed(b"member0"), Decline(query_id=qid, reason="busy"), w.net.now_ms
    )
    w.net.deliver(w.querier.peer_id, withdrawn)
    w.net.run()
    w.net.advance(GRACE)  # the grace ends with two offers: wait on, as without it
    assert not tap.of("accept")
    late = sorted(tap.held, key=lambda h: h[0])[0]
    w.net.deliver(late[1], late[3])
    w.net.run()
    w.net.advance(GRACE)  # three offers again: a new grace, then the choice
    committee = {m.peer_id for m in body(tap.of("accept")[0], Accept).committee}
    assert committee == {w.members[i].peer_id for i in (1, 2)} | {late[0]}
    assert done(w, qid).ok
