"""settleWeighted on both chains: a querier's reward rule at settlement.

The delivered shares' money is split among the members who delivered as the
querier says, within the contract's bounds (a floor of MIN_SHARE_BPS of the
price per delivered member, 0 for the others, an exact sum); undelivered
shares stay held for receipt claims as with ``settle``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable
from typing import Any

import numpy as np
import pytest

from fi_peer.chain.client import QueryStatus
from fi_peer.chain.store import ReceiptStore
from fi_peer.chain.terms import CLOSED_STATE, MIN_SHARE_BPS, QueryTerms, WeightedSettlement
from fi_peer.chain.txsender import TxResult
from fi_peer.incentives.rewards import settlement_amounts
from fi_peer.protocol.audit import AuditBook
from fi_peer.settlement import RewardPolicy, Settler
from tests.chain.helpers import DEADLINE_IN, GRACE_S, PRICE, Harness, qid, reverts

FLOOR = PRICE * MIN_SHARE_BPS // 10_000


def _weighted(terms: QueryTerms, delivered: int, weights: list[float]) -> WeightedSettlement:
    seats = [bool(delivered >> i & 1) for i in range(terms.size)]
    amounts = settlement_amounts(terms.price_wei, seats, weights, min_share_wei=terms.min_share_wei)
    return WeightedSettlement(terms, delivered, tuple(amounts))


async def test_the_floor_constant_matches_the_contract(chain: Harness) -> None:
    assert await chain.escrow.functions.MIN_SHARE_BPS().call() == MIN_SHARE_BPS


async def test_weighted_settlement_pays_each_member_its_amount_to_the_wei(
    chain: Harness,
) -> None:
    terms = await chain.opened(qid(1), k=4)
    # merit 3 : 1 : 0 : 2 over four delivered members
    weighted = _weighted(terms, 0b1111, [3.0, 1.0, 0.0, 2.0])
    rest = 4 * (PRICE - FLOOR)
    expected = [FLOOR + rest * 3 // 6, FLOOR + rest // 6, FLOOR, FLOOR + rest * 2 // 6]
    assert sum(expected) == 4 * PRICE  # (rest divides by 6 here: no remainder wei)
    assert list(weighted.amounts) == expected
    escrow_before = await chain.querier.eth_balance(chain.deployment.escrow)

    result = await chain.querier.settle_weighted(weighted)

    for member, amount in zip(terms.committee, expected, strict=True):
        assert await chain.querier.balance(member) == amount
    assert result.event("QuerySettled").args == {
        "queryId": terms.query_id,
        "delivered": 0b1111,
        "paid": 4 * PRICE,
    }
    credited = {e.args["member"]: e.args["amount"] for e in result.all("Credited")}
    assert credited == dict(zip(terms.committee, expected, strict=True))
    assert tuple(result.event("WeightedSettled").args["amounts"]) == tuple(expected)
    assert await chain.querier.state_word(terms.querier, terms.query_id) == CLOSED_STATE
    # conservation: the escrow still holds exactly what it credited
    assert await chain.querier.eth_balance(chain.deployment.escrow) == escrow_before
    assert await chain.querier.balance() == 0  # the querier got nothing back
    await reverts("QueryClosed", chain.querier.settle_weighted(weighted))


async def test_uneven_weights_leave_no_wei_behind(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3, price=1_000_003)
    weighted = _weighted(terms, 0b111, [1 / 3, 1 / 7, 0.5])
    assert sum(weighted.amounts) == 3 * 1_000_003
    assert min(weighted.amounts) >= terms.min_share_wei
    await chain.querier.settle_weighted(weighted)
    balances = [await chain.querier.balance(m) for m in terms.committee]
    assert balances == list(weighted.amounts)


async def test_partial_weighted_settlement_holds_the_rest_for_claims(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3)
    weighted = _weighted(terms, 0b011, [1.0, 4.0, 9.0])  # seat 2 did not deliver
    assert weighted.amounts[2] == 0 and sum(weighted.amounts) == 2 * PRICE
    await chain.querier.settle_weighted(weighted)
    assert await chain.querier.status(terms) is QueryStatus.HELD
    assert await chain.querier.settled_mask(terms) == 0b011
    # the member left out still claims its receipt, the full price
    left_out = terms.committee[2]
    receipt, sig = chain.receipt(terms, left_out)
    claim = await chain.member(left_out).claim(terms, receipt, sig)
    assert claim.event("Claimed").args["amount"] == PRICE
    # a delivered member cannot claim on top of its weighted pay
    paid, paid_sig = chain.receipt(terms, terms.committee[0])
    await reverts("AlreadyPaid", chain.member(terms.committee[0]).claim(terms, paid, paid_sig))
    await chain.devchain.increase_time(DEADLINE_IN + GRACE_S + 1)
    refund = await chain.querier.refund(terms)
    assert refund.event("Refunded").args["amount"] == 0


def _raw(
    chain: Harness, terms: QueryTerms, delivered: int, amounts: list[int]
) -> Awaitable[TxResult]:
    return chain.send_raw(
        chain.querier.account,
        chain.escrow,
        "settleWeighted",
        [terms.query_id, terms.as_abi(), delivered, amounts],
    )


async def test_weighted_settlement_reverts_on_bad_weights(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3)
    # the querier tries to give everything to one member (below the floor for the others)
    await reverts("BadWeight", _raw(chain, terms, 0b111, [3 * PRICE, 0, 0]))
    # one wei under the floor
    low = [FLOOR - 1, PRICE, 2 * PRICE - FLOOR + 1]
    await reverts("BadWeight", _raw(chain, terms, 0b111, low))
    # paying a member that did not deliver
    await reverts("BadWeight", _raw(chain, terms, 0b011, [PRICE, PRICE - 1, 1]))
    # keeping part of the delivered money (the querier would pocket it)
    await reverts("NotConserved", _raw(chain, terms, 0b111, [PRICE, PRICE, PRICE - 1]))
    # paying more than was delivered
    await reverts("NotConserved", _raw(chain, terms, 0b011, [PRICE, PRICE + 1, 0]))
    # one amount per seat
    await reverts("BadAmounts", _raw(chain, terms, 0b111, [PRICE, PRICE]))
    # only the querier, only before the deadline, only once
    member = chain.members[0]
    await reverts(
        "NotQuerier",
        chain.send_raw(
            member.account,
            chain.escrow,
            "settleWeighted",
            [terms.query_id, terms.as_abi(), 0b111, [PRICE] * 3],
        ),
    )
    await chain.querier.settle_weighted(_weighted(terms, 0b111, [1.0, 1.0, 1.0]))
    await reverts("QueryClosed", _raw(chain, terms, 0b111, [PRICE] * 3))
    late = await chain.opened(qid(2), k=2)
    await chain.devchain.increase_time(DEADLINE_IN + 1)
    await reverts("SettlementClosed", chain.querier.settle_weighted(_weighted(late, 0b11, [1, 1])))
    for member_address in terms.committee:
        assert await chain.querier.balance(member_address) == PRICE


def test_the_python_checks_match_the_contract_bounds() -> None:
    terms = QueryTerms.create(
        query_id=qid(1),
        querier="0x" + "11" * 20,
        committee=["0x" + "22" * 20, "0x" + "33" * 20],
        price_wei=PRICE,
        deadline=10**9,
    )
    WeightedSettlement(terms, 0b11, (FLOOR, 2 * PRICE - FLOOR))
    for delivered, amounts in [
        (0b11, (FLOOR - 1, 2 * PRICE - FLOOR + 1)),
        (0b11, (PRICE, PRICE - 1)),
        (0b01, (PRICE, 1)),
        (0b11, (PRICE,)),
    ]:
        with pytest.raises(ValueError):
            WeightedSettlement(terms, delivered, amounts)


# ── the Settler with a reward rule ───────────────────────────────────────────


def _policy(rule: str, peers_of: dict[str, str], hits: dict[str, int], audits: int) -> Any:
    """A RewardPolicy whose AuditBook says each peer got ``hits`` of ``audits`` right."""
    book = AuditBook(lambda s: np.argmax(s, axis=1), n_classes=10)
    for peer, h in hits.items():
        book.opened[peer] = audits
        book.hits[peer] = h
    policy = RewardPolicy(rule, book, decide=book.decide)
    for address, peer in peers_of.items():
        policy.learn(peer, address)
    return policy


@pytest.mark.parametrize("rule", ["merit", "equal"])
async def test_the_settler_pays_by_the_querier_rule(chain: Harness, rule: str) -> None:
    terms = [await chain.opened(qid(n), k=3) for n in (1, 2)]
    committee = terms[0].committee
    peers_of = {address: f"peer-{i}" for i, address in enumerate(committee)}
    # peer-0 right on all 20 audits, peer-1 on 12, peer-2 (lazy) on 2: at chance, gated out
    policy = _policy(rule, peers_of, {"peer-0": 20, "peer-1": 12, "peer-2": 2}, 20)
    settler = Settler(
        chain.querier, ReceiptStore(":memory:", chain.querier.receipt_domain), rewards=policy
    )
    await settler.add(terms[0], committee)  # all delivered
    await settler.add(terms[1], committee[:2])  # peer-2 did not deliver
    assert await settler.flush() == 2

    balances = [await chain.querier.balance(m) for m in committee]
    if rule == "equal":
        assert balances == [2 * PRICE, 2 * PRICE, PRICE]
        assert settler.metrics["settle.batches"] == 1 and policy.recent == deque()
        return
    assert settler.metrics["settle.weighted"] == 2
    weights = policy.weights(["peer-0", "peer-1", "peer-2"])
    assert weights is not None and weights[2] == 0.0 and weights[0] > weights[1] > 0
    expected = [0, 0, 0]
    for t, seats in ((terms[0], [True] * 3), (terms[1], [True, True, False])):
        amounts = settlement_amounts(PRICE, seats, weights, min_share_wei=t.min_share_wei)
        expected = [e + a for e, a in zip(expected, amounts, strict=True)]
    assert balances == expected  # to the wei
    assert balances[2] == FLOOR  # the lazy member gets the floor of the one share it delivered
    assert sum(balances) == 5 * PRICE  # conservation: everything delivered is paid
    assert [r["amounts"] for r in policy.recent] == [
        settlement_amounts(PRICE, [True] * 3, weights, min_share_wei=FLOOR),
        settlement_amounts(PRICE, [True, True, False], weights, min_share_wei=FLOOR),
    ]
