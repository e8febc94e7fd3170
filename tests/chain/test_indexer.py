"""EventIndexer on both chains: idempotent, resumable, and it follows a chain
that changed under it (a revert to a snapshot stands in for a reorg)."""

from __future__ import annotations

from pathlib import Path

from fi_peer.chain.indexer import indexer_for
from fi_peer.chain.terms import Settlement
from tests.chain.helpers import PRICE, Harness, qid


async def _activity(chain: Harness, first: int, count: int) -> int:
    """Open and settle ``count`` queries; returns how many events that emitted."""
    events = 0
    settlements = []
    for n in range(first, first + count):
        terms = await chain.opened(qid(n), k=2)
        events += 1
        settlements.append(Settlement(terms, terms.full_mask))
    result = await chain.querier.settle_batch(settlements)
    return events + len(result.events)


async def test_sync_is_idempotent_and_resumes(chain: Harness, tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    indexer = indexer_for(chain.w3, db, chain.deployment)
    emitted = await _activity(chain, 1, 3)
    assert await indexer.sync() == emitted
    assert await indexer.sync() == 0
    assert indexer.count() == emitted
    indexer.close()

    again = indexer_for(chain.w3, db, chain.deployment)  # a restart: same file
    assert again.next_block > chain.deployment.block
    assert await again.sync() == 0
    more = await _activity(chain, 10, 2)
    assert await again.sync() == more
    assert again.count() == emitted + more

    opened = again.events(event="QueryOpened")
    assert [e.query_id for e in opened] == [qid(n) for n in (1, 2, 3, 10, 11)]
    member = chain.members[0].address
    assert again.total("Credited", member) == 5 * PRICE
    assert {e.event for e in again.events(query_id=qid(2))} == {"QueryOpened", "QuerySettled"}
    settled = again.events(event="QuerySettled", query_id=qid(2))[0]
    assert settled.amount == 2 * PRICE and settled.args["delivered"] == 0b11
    again.close()


async def test_a_changed_chain_is_reindexed(chain: Harness, tmp_path: Path) -> None:
    indexer = indexer_for(chain.w3, tmp_path / "index.sqlite", chain.deployment)
    base = await _activity(chain, 1, 1)
    snapshot = await chain.devchain.snapshot()
    await _activity(chain, 2, 2)  # these will vanish
    await indexer.sync()
    await chain.devchain.revert(snapshot)
    chain.querier.sender.forget_nonce()
    replacement = await _activity(chain, 7, 1)
    await chain.devchain.increase_time(1)  # anvil: a block at the old height, another hash
    await chain.devchain.increase_time(1)
    await indexer.sync()
    ids = {e.query_id for e in indexer.events(event="QueryOpened")}
    assert ids == {qid(1), qid(7)}
    assert indexer.count() == base + replacement
    indexer.close()
