"""Regression tests of the querier's batched settlement (Settler.flush).

The intermittent revert of the networked demo (~1 run in 8: "settleBatch ...
reverted when mined"): the gas of settleBatch was estimated while the members
still had a credited balance, and a member's auto-withdraw mined in between set
that balance back to 0, so the settlement's balance write cost 22,100 gas
instead of 5,000 per member, more than the estimate's margin: out of gas. The
batch was then dropped, and with it what the querier owed (the members had to
claim, the undelivered deposits stayed in the escrow). Fixed twice over: the
settlement carries gas for every member's balance write from zero, and a
failed batch never loses a query: each is looked up on chain, those still open
are sent again, those settled meanwhile are not paid twice, and what cannot be
settled any more is refunded after the claim grace.
"""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from fi_peer.chain.client import ChainClient
from fi_peer.chain.errors import TransactionFailed
from fi_peer.chain.store import ReceiptStore
from fi_peer.chain.terms import Settlement
from fi_peer.settlement import EscrowState, Settler
from tests.chain.helpers import GRACE_S, PRICE, Harness, qid


def _settler(client: ChainClient, every: int = 100, book: Path | str = ":memory:") -> Settler:
    store = ReceiptStore(":memory:", client.receipt_domain)
    return Settler(client, store, every_queries=every, book_path=book)


async def _balances(chain: Harness, clients: list[ChainClient]) -> list[int]:
    return [await chain.querier.balance(c.address) for c in clients]


async def test_members_withdrawing_between_estimate_and_mining_do_not_revert_the_batch(
    chain: Harness,
) -> None:
    members = chain.members[:4]
    first = [await chain.opened(qid(i), 4) for i in range(1, 5)]
    await chain.querier.settle_batch([Settlement(t, t.full_mask) for t in first])
    assert await _balances(chain, members) == [4 * PRICE] * 4  # credited, not withdrawn
    second = [await chain.opened(qid(i), 4) for i in range(5, 9)]

    # The race, made deterministic: right after the querier's gas estimate of the
    # batch, every member withdraws (its balance slot goes back to zero).
    sender = chain.querier.sender
    real_read = sender.read
    raced = []

    async def estimate_then_withdraw(awaitable: Awaitable[Any]) -> Any:
        result = await real_read(awaitable)
        if not raced and isinstance(result, int):
            raced.append(result)
            for m in members:
                await m.withdraw()
        return result

    sender.read = estimate_then_withdraw  # type: ignore[method-assign]
    settler = _settler(chain.querier)
    for t in second:
        await settler.add(t, t.committee)
    assert await settler.flush() == 4
    assert raced, "the estimate was not raced"
    assert settler.metrics["settle.failed_batches"] == 0  # mined at the first attempt
    assert settler.metrics["settle.queries"] == 4 and not settler.pending
    assert await _balances(chain, members) == [4 * PRICE] * 4  # the second batch, once
    assert all(st is EscrowState.CLOSED for _, _, st in settler.book.entries())


async def test_a_failed_batch_is_looked_up_and_nothing_is_lost_or_paid_twice(
    chain: Harness,
) -> None:
    members = chain.members[:3]
    a, b, c = [await chain.opened(qid(i), 3) for i in (11, 12, 13)]
    # b was settled behind the batcher's back (the batch would revert: AlreadySettled)
    await chain.querier.settle(b, b.committee[:2])
    settler = _settler(chain.querier)
    await settler.add(a, a.committee)
    await settler.add(b, b.committee[:2])
    await settler.add(c, c.committee[1:])
    assert await settler.flush() == 3
    assert settler.metrics["settle.failed_batches"] == 1 and settler.metrics["settle.failed"] == 0
    paid = [*a.committee, *b.committee[:2], *c.committee[1:]]  # b once, not twice
    owed = [PRICE * paid.count(m.address) for m in members]
    assert sorted(owed) == [2 * PRICE, 2 * PRICE, 3 * PRICE]
    assert await _balances(chain, members) == owed

    # A batch whose transaction was mined although its sender saw a failure (a
    # receipt timeout): the lookup finds the query settled and does not send it again.
    d = await chain.opened(qid(14), 3)
    real = chain.querier.settle_batch
    calls = []

    async def mined_but_reported_failed(settlements: list[Settlement]) -> Any:
        calls.append(len(settlements))
        await real(settlements)
        if len(calls) == 1:
            raise TransactionFailed("no receipt before the timeout")

    chain.querier.settle_batch = mined_but_reported_failed  # type: ignore[method-assign]
    await settler.add(d, d.committee)
    assert await settler.flush() == 1
    assert calls == [1] and not settler.pending
    assert await _balances(chain, members) == [x + PRICE for x in owed]


async def test_a_query_too_late_to_settle_is_refunded_after_the_grace(chain: Harness) -> None:
    late = await chain.opened(qid(21), 3, deadline_in=300)
    settler = _settler(chain.querier)
    await settler.add(late, late.committee[:1])
    await chain.devchain.increase_time(late.deadline - await chain.now() + 1)
    assert await settler.flush() == 0 and settler.metrics["settle.too_late"] == 1
    assert await settler.refund_due() == 0  # not before the grace is over
    # the one member who delivered claims with its receipt; the rest goes back
    member = chain.member(late.committee[0])
    receipt, signature = chain.receipt(late, member.address)
    await member.claim(late, receipt, signature)
    await chain.devchain.increase_time(GRACE_S + 1)
    before = await chain.querier.balance()
    assert await settler.refund_due() == 2 * PRICE
    assert await chain.querier.balance() - before == 2 * PRICE
    assert await settler.refund_due() == 0  # closed: never refunded twice
    _, claimed_bits = await chain.querier.claims_of(late)
    assert claimed_bits == 0  # refund clears the claims word; the member was paid once
    assert await chain.querier.balance(member.address) == PRICE


async def test_a_restarted_querier_settles_what_it_owed_and_refunds_the_rest(
    chain: Harness, tmp_path: Path
) -> None:
    book = tmp_path / "receipts.sqlite"
    owed, abandoned = await chain.opened(qid(31), 3), await chain.opened(qid(32), 3)
    first = _settler(chain.querier, book=book)
    first.book.opened(abandoned)  # escrowed; the querier died before the query ended
    await first.add(owed, owed.committee)  # ended; the querier died before settling
    first.close()

    second = _settler(chain.querier, book=book)
    assert second.resume() == 1
    assert await second.flush() == 1
    assert await _balances(chain, chain.members[:3]) == [PRICE] * 3
    await chain.devchain.increase_time(abandoned.deadline - await chain.now() + GRACE_S + 2)
    assert await second.refund_due() == abandoned.escrow_wei
    states = {t.query_id: st for t, _, st in second.book.entries()}
    assert states == {owed.query_id: EscrowState.CLOSED, abandoned.query_id: EscrowState.CLOSED}
