"""QueryEscrow on both chains: every function's happy path and every revert.

Each test runs on eth-tester and on anvil (``integration``), on a fresh
snapshot of one deployment (see conftest.py).
"""

from __future__ import annotations

import random

from eth_account import Account
from eth_utils import to_checksum_address

from fi_peer.chain.client import QueryStatus
from fi_peer.chain.receipts import PaymentReceipt, ReceiptDomain, receipt_digest, sign_receipt
from fi_peer.chain.terms import CLOSED_STATE, QueryTerms, Settlement
from tests.chain.helpers import DEADLINE_IN, GRACE_S, PRICE, Harness, qid, reverts

# ── openQuery ────────────────────────────────────────────────────────────────


async def test_open_escrows_k_times_price_and_commits_to_the_terms(chain: Harness) -> None:
    terms = await chain.terms(qid(1), k=3)
    before = await chain.querier.eth_balance(chain.deployment.escrow)
    result = await chain.querier.open_query(terms)

    assert await chain.querier.eth_balance(chain.deployment.escrow) == before + 3 * PRICE
    assert await chain.querier.state_word(terms.querier, terms.query_id) == terms.commitment()
    assert await chain.querier.verify_escrow(terms)
    assert await chain.querier.status(terms) is QueryStatus.OPEN
    on_chain = await chain.escrow.functions.commitmentOf(
        terms.querier, terms.price_wei, terms.deadline, list(terms.committee)
    ).call()
    assert bytes(on_chain) == terms.commitment()
    opened = result.event("QueryOpened").args
    assert opened["queryId"] == terms.query_id
    assert opened["querier"] == chain.querier.address
    assert opened["committee"] == terms.committee
    assert (opened["price"], opened["deadline"]) == (PRICE, terms.deadline)


async def test_query_ids_are_per_querier_so_nobody_can_squat_one(chain: Harness) -> None:
    """A query's id is gossiped before it is opened; opening it first elsewhere
    (with 1 wei) must not block the querier, nor mix the two escrows."""
    mine = await chain.terms(qid(1), k=3)
    squatter = await chain.terms(qid(1), k=1, price=1, querier=chain.outsider)
    await chain.outsider.open_query(squatter)
    await chain.querier.open_query(mine)
    assert await chain.querier.status(mine) is QueryStatus.OPEN
    assert await chain.querier.status(squatter) is QueryStatus.OPEN
    await chain.outsider.settle(squatter, [])  # held, not closed
    await chain.querier.settle(mine, mine.committee)
    assert await chain.querier.status(mine) is QueryStatus.CLOSED
    assert await chain.querier.status(squatter) is QueryStatus.HELD
    assert await chain.querier.settled_mask(mine) == 0b111  # the right settlement's log
    assert await chain.querier.settled_mask(squatter) == 0


async def test_the_contract_computes_the_same_commitments(chain: Harness) -> None:
    rng = random.Random(1)
    members = [m.address for m in (*chain.members, chain.outsider, chain.querier2)]
    for _ in range(25):
        terms = QueryTerms.create(
            query_id=rng.randbytes(16),
            querier=rng.choice(members),
            committee=rng.sample(members, rng.randint(1, len(members))),
            price_wei=rng.randint(1, 2**128 - 1),
            deadline=rng.randint(1, 2**64 - 1),
        )
        on_chain = await chain.escrow.functions.commitmentOf(
            terms.querier, terms.price_wei, terms.deadline, list(terms.committee)
        ).call()
        assert bytes(on_chain) == terms.commitment()


async def test_members_see_through_wrong_terms(chain: Harness) -> None:
    terms = await chain.opened(qid(1))
    cheaper = QueryTerms.create(
        query_id=terms.query_id,
        querier=terms.querier,
        committee=terms.committee,
        price_wei=PRICE - 1,
        deadline=terms.deadline,
    )
    assert not await chain.members[0].verify_escrow(cheaper)
    assert await chain.members[0].status(cheaper) is QueryStatus.MISMATCH
    unknown = await chain.terms(qid(2))
    assert await chain.members[0].status(unknown) is QueryStatus.UNKNOWN


async def test_open_reverts(chain: Harness) -> None:
    terms = await chain.opened(qid(1))
    await reverts("QueryExists", chain.querier.open_query(terms))

    account = chain.querier.account
    members = [m.address for m in chain.members]
    deadline = await chain.now() + DEADLINE_IN
    ordered = sorted(members[:3], key=lambda a: int(a, 16))
    escrow = chain.escrow
    empty = [qid(2), [], PRICE, deadline]
    await reverts("BadCommitteeSize", chain.send_raw(account, escrow, "openQuery", empty))
    too_many = [to_checksum_address(f"0x{i:040x}") for i in range(1, 34)]
    big = [qid(2), too_many, PRICE, deadline]
    await reverts("BadCommitteeSize", chain.send_raw(account, escrow, "openQuery", big, 33 * PRICE))
    await reverts(
        "CommitteeNotSorted",
        chain.send_raw(
            account, escrow, "openQuery", [qid(2), ordered[::-1], PRICE, deadline], 3 * PRICE
        ),
    )
    await reverts(
        "CommitteeNotSorted",
        chain.send_raw(
            account,
            escrow,
            "openQuery",
            [qid(2), [ordered[0], ordered[0]], PRICE, deadline],
            2 * PRICE,
        ),
    )
    await reverts(
        "ZeroPrice", chain.send_raw(account, escrow, "openQuery", [qid(2), ordered, 0, deadline])
    )
    past = await chain.now()
    await reverts(
        "DeadlineInPast",
        chain.send_raw(account, escrow, "openQuery", [qid(2), ordered, PRICE, past], 3 * PRICE),
    )
    error = await reverts(
        "WrongDeposit",
        chain.send_raw(account, escrow, "openQuery", [qid(2), ordered, PRICE, deadline], PRICE),
    )
    assert error.error_args == (qid(2), 3 * PRICE, PRICE)


# ── settle ───────────────────────────────────────────────────────────────────


async def test_settle_all_delivered_credits_each_member_and_closes(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3)
    result = await chain.querier.settle(terms, terms.committee)

    for member in terms.committee:
        assert await chain.querier.balance(member) == PRICE
    assert await chain.querier.state_word(terms.querier, terms.query_id) == CLOSED_STATE
    assert await chain.querier.status(terms) is QueryStatus.CLOSED
    settled = result.event("QuerySettled").args
    assert settled == {"queryId": terms.query_id, "delivered": 0b111, "paid": 3 * PRICE}
    credited = {e.args["member"]: e.args["amount"] for e in result.all("Credited")}
    assert credited == dict.fromkeys(terms.committee, PRICE)
    await reverts("QueryClosed", chain.querier.settle(terms, terms.committee))


async def test_settle_partial_holds_the_rest_until_refund(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3)
    delivered = terms.committee[:2]
    result = await chain.querier.settle(terms, delivered)
    assert result.event("QuerySettled").args["paid"] == 2 * PRICE
    assert await chain.querier.status(terms) is QueryStatus.HELD
    assert await chain.querier.status(terms, delivered=0b011) is QueryStatus.HELD
    assert await chain.querier.settled_mask(terms) == 0b011
    assert await chain.querier.balance(terms.committee[2]) == 0
    await reverts("AlreadySettled", chain.querier.settle(terms, terms.committee))

    await reverts("RefundTooEarly", chain.outsider.refund(terms))
    await chain.devchain.increase_time(DEADLINE_IN + GRACE_S + 1)
    refund = await chain.outsider.refund(terms)  # anyone may trigger it
    assert refund.event("Refunded").args["amount"] == PRICE
    assert await chain.querier.balance() == PRICE
    assert await chain.querier.status(terms) is QueryStatus.CLOSED


async def test_settle_reverts(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3)
    # wrong caller: a member tries to settle the querier's query
    member = chain.members[0]
    await reverts(
        "NotQuerier",
        chain.send_raw(member.account, chain.escrow, "settle", [qid(1), terms.as_abi(), 0b111]),
    )
    # the caller names itself as querier: query ids are per querier, it has no such query
    forged = (member.address, list(terms.committee), PRICE, terms.deadline)
    await reverts(
        "UnknownQuery",
        chain.send_raw(member.account, chain.escrow, "settle", [qid(1), forged, 0b111]),
    )
    # wrong price
    wrong = (terms.querier, list(terms.committee), PRICE + 1, terms.deadline)
    account = chain.querier.account
    await reverts(
        "TermsMismatch", chain.send_raw(account, chain.escrow, "settle", [qid(1), wrong, 0b111])
    )
    await reverts(
        "BadDelivered",
        chain.send_raw(account, chain.escrow, "settle", [qid(1), terms.as_abi(), 0b1000]),
    )
    unknown = await chain.terms(qid(2))
    await reverts("UnknownQuery", chain.querier.settle(unknown, []))
    await chain.devchain.increase_time(DEADLINE_IN + 1)
    await reverts("SettlementClosed", chain.querier.settle(terms, terms.committee))


async def test_settle_with_nobody_delivered_holds_everything(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=2)
    result = await chain.querier.settle(terms, [])
    assert result.event("QuerySettled").args["paid"] == 0
    assert result.all("Credited") == []
    await chain.devchain.increase_time(DEADLINE_IN + GRACE_S + 1)
    refund = await chain.querier.refund(terms)
    assert refund.event("Refunded").args["amount"] == 2 * PRICE


# ── settleBatch ──────────────────────────────────────────────────────────────


async def test_settle_batch_credits_each_member_once_per_batch(chain: Harness) -> None:
    members = [m.address for m in chain.members]
    committees = [members[0:3], members[1:4], members[2:6], members[0:1], members[3:6]]
    settlements = []
    for n, committee in enumerate(committees):
        terms = await chain.terms(qid(10 + n), committee=committee, price=PRICE + n)
        await chain.querier.open_query(terms)
        delivered = terms.full_mask if n % 2 == 0 else terms.full_mask >> 1
        settlements.append(Settlement(terms, delivered))

    result = await chain.querier.settle_batch(settlements)

    expected: dict[str, int] = {}
    for s in settlements:
        for member in s.terms.members_of(s.delivered):
            expected[member] = expected.get(member, 0) + s.terms.price_wei
    credited = [(e.args["member"], e.args["amount"]) for e in result.all("Credited")]
    assert len(credited) == len(expected)  # one credit (one SSTORE) per member per batch
    assert dict(credited) == expected
    for member, amount in expected.items():
        assert await chain.querier.balance(member) == amount
    assert len(result.all("QuerySettled")) == len(settlements)
    for s in settlements:
        status = await chain.querier.status(s.terms)
        full = s.delivered == s.terms.full_mask
        assert status is (QueryStatus.CLOSED if full else QueryStatus.HELD)


async def test_settle_batch_reverts(chain: Harness) -> None:
    a = await chain.opened(qid(1), k=3)
    b = await chain.opened(qid(2), k=2)
    # the same query twice in one batch: the second sees it closed
    await reverts(
        "QueryClosed",
        chain.querier.settle_batch([Settlement(a, a.full_mask), Settlement(a, a.full_mask)]),
    )
    # wrong caller: settleBatch settles the caller's own queries, and it has none
    members, items = _encode(a, b)
    await reverts(
        "UnknownQuery",
        chain.send_raw(chain.outsider.account, chain.escrow, "settleBatch", [members, items]),
    )
    account = chain.querier.account
    await reverts("BadBatch", chain.send_raw(account, chain.escrow, "settleBatch", [members, []]))
    await reverts("BadBatch", chain.send_raw(account, chain.escrow, "settleBatch", [[], items]))
    bad_index = [(*items[0][:4], 0xFF, items[0][5])]
    await reverts(
        "BadMemberIndex", chain.send_raw(account, chain.escrow, "settleBatch", [members, bad_index])
    )
    # a member list in another order rebuilds another committee
    await reverts(
        "TermsMismatch",
        chain.send_raw(account, chain.escrow, "settleBatch", [members[::-1], items]),
    )
    await chain.devchain.increase_time(DEADLINE_IN + 1)
    await reverts("SettlementClosed", chain.querier.settle_batch([Settlement(b, b.full_mask)]))


def _encode(*terms: QueryTerms) -> tuple[list[str], list[tuple[bytes, int, int, int, int, int]]]:
    from fi_peer.chain.terms import encode_batch

    members, items = encode_batch([Settlement(t, t.full_mask) for t in terms])
    return list(members), items


# ── claim ────────────────────────────────────────────────────────────────────


async def test_claim_unsettled_query_after_deadline_then_refund_the_rest(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3)
    member = terms.committee[1]
    receipt, sig = chain.receipt(terms, member)
    await reverts("ClaimTooEarly", chain.member(member).claim(terms, receipt, sig))

    await chain.devchain.increase_time(DEADLINE_IN + 1)
    result = await chain.member(member).claim(terms, receipt, sig)
    assert result.event("Claimed").args == {
        "queryId": terms.query_id,
        "member": member,
        "querier": terms.querier,
        "amount": PRICE,
    }
    assert await chain.querier.balance(member) == PRICE
    assert await chain.querier.claims_of(terms) == (PRICE, 0b010)
    await reverts("AlreadyClaimed", chain.member(member).claim(terms, receipt, sig))

    await reverts("RefundTooEarly", chain.querier.refund(terms))
    await chain.devchain.increase_time(GRACE_S + 1)
    refund = await chain.querier.refund(terms)
    assert refund.event("Refunded").args["amount"] == 2 * PRICE
    assert await chain.querier.balance() == 2 * PRICE
    assert await chain.querier.claims_of(terms) == (0, 0)
    await reverts("QueryClosed", chain.querier.refund(terms))
    # a receipt held by another member is worthless once the query is closed
    late, late_sig = chain.receipt(terms, terms.committee[0])
    await reverts("QueryClosed", chain.member(terms.committee[0]).claim(terms, late, late_sig))


async def test_member_left_out_of_a_settlement_claims_with_its_receipt(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3)
    left_out = terms.committee[2]
    await chain.querier.settle(terms, terms.committee[:2])
    receipt, sig = chain.receipt(terms, left_out)
    # no waiting: the settlement is final, the held share is claimable at once;
    # the client looks the settlement's bitmap up in the logs
    result = await chain.member(left_out).claim(terms, receipt, sig)
    assert result.event("Claimed").args["amount"] == PRICE
    paid, paid_sig = chain.receipt(terms, terms.committee[0])
    await reverts("AlreadyPaid", chain.member(terms.committee[0]).claim(terms, paid, paid_sig))
    await chain.devchain.increase_time(DEADLINE_IN + GRACE_S + 1)
    refund = await chain.querier.refund(terms)
    assert refund.event("Refunded").args["amount"] == 0


async def test_claim_of_a_smaller_receipt_refunds_the_difference(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=2)
    member = terms.committee[0]
    receipt, sig = chain.receipt(terms, member, amount=PRICE // 4)
    await chain.devchain.increase_time(DEADLINE_IN + 1)
    await chain.outsider.claim(terms, receipt, sig)  # a relayer sends it; the member is paid
    assert await chain.querier.balance(member) == PRICE // 4
    await chain.devchain.increase_time(GRACE_S + 1)
    refund = await chain.querier.refund(terms)
    assert refund.event("Refunded").args["amount"] == 2 * PRICE - PRICE // 4


async def test_claim_reverts(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=3)
    await chain.devchain.increase_time(DEADLINE_IN + 1)
    member = terms.committee[0]
    client = chain.member(member)
    receipt, sig = chain.receipt(terms, member)

    # claim without a receipt
    await reverts("InvalidReceipt", client.claim(terms, receipt, b""))
    # forged: signed by someone other than the querier
    forged = sign_receipt(chain.outsider.account, chain.querier.receipt_domain, receipt)
    await reverts("InvalidReceipt", client.claim(terms, receipt, forged))
    # the querier's signature, but over another amount
    _, cheap_sig = chain.receipt(terms, member, amount=1)
    await reverts("InvalidReceipt", client.claim(terms, receipt, cheap_sig))
    # signed for another chain, or another escrow
    for domain in (
        ReceiptDomain(chain_id=chain.deployment.chain_id + 1, escrow=chain.deployment.escrow),
        ReceiptDomain(chain_id=chain.deployment.chain_id, escrow=chain.deployment.registry),
    ):
        other = sign_receipt(chain.querier.account, domain, receipt)
        await reverts("InvalidReceipt", client.claim(terms, receipt, other))
    # malleated copy of a valid signature (s -> n - s, v flipped)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(sig[32:64], "big")
    malleated = sig[:32] + (n - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    await reverts("InvalidReceipt", client.claim(terms, receipt, malleated))
    # a receipt for an account outside the committee
    stranger = PaymentReceipt(
        query_id=terms.query_id, member=chain.outsider.address, amount_wei=PRICE
    )
    stranger_sig = chain.querier.sign_receipt(terms.query_id, chain.outsider.address, PRICE)
    await reverts("NotCommitteeMember", chain.outsider.claim(terms, stranger, stranger_sig))
    # more than the price per share, even if the querier signed it
    greedy, greedy_sig = chain.receipt(terms, member, amount=PRICE + 1)
    await reverts("BadAmount", client.claim(terms, greedy, greedy_sig))
    # wrong terms
    wrong = QueryTerms.create(
        query_id=terms.query_id,
        querier=terms.querier,
        committee=terms.committee,
        price_wei=PRICE,
        deadline=terms.deadline + 1,
    )
    await reverts("TermsMismatch", client.claim(wrong, receipt, sig))
    unknown = await chain.terms(qid(2))
    await reverts("UnknownQuery", client.claim(unknown, receipt, sig))
    # and the real one still works after all that
    await client.claim(terms, receipt, sig)


# ── refund ───────────────────────────────────────────────────────────────────


async def test_refund_of_an_abandoned_query(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=4)
    await reverts("RefundTooEarly", chain.querier.refund(terms))
    await chain.devchain.increase_time(DEADLINE_IN + 1)
    await reverts("RefundTooEarly", chain.querier.refund(terms))  # inside the claim grace
    await chain.devchain.increase_time(GRACE_S + 1)
    result = await chain.outsider.refund(terms)
    assert result.event("Refunded").args == {
        "queryId": terms.query_id,
        "querier": terms.querier,
        "amount": 4 * PRICE,
    }
    assert await chain.querier.balance() == 4 * PRICE
    assert await chain.outsider.balance() == 0
    await reverts("QueryClosed", chain.querier.refund(terms))


async def test_refund_of_a_fully_settled_query_reverts(chain: Harness) -> None:
    terms = await chain.opened(qid(1), k=2)
    await chain.querier.settle(terms, terms.committee)
    await chain.devchain.increase_time(DEADLINE_IN + GRACE_S + 1)
    await reverts("QueryClosed", chain.querier.refund(terms))


# ── withdraw ─────────────────────────────────────────────────────────────────


async def test_withdraw_pays_the_whole_balance_once(chain: Harness) -> None:
    a = await chain.opened(qid(1), k=2)
    b = await chain.opened(qid(2), k=2, price=3 * PRICE)
    await chain.querier.settle_batch([Settlement(a, a.full_mask), Settlement(b, b.full_mask)])
    member = chain.member(a.committee[0])
    assert await member.balance() == 4 * PRICE

    eth_before = await member.eth_balance()
    escrow_before = await member.eth_balance(chain.deployment.escrow)
    result = await member.withdraw()
    assert result.event("Withdrawn").args == {"account": member.address, "amount": 4 * PRICE}
    assert await member.eth_balance() == eth_before + 4 * PRICE - result.fee_wei
    assert await member.eth_balance(chain.deployment.escrow) == escrow_before - 4 * PRICE
    assert await member.balance() == 0
    await reverts("NothingToWithdraw", member.withdraw())


async def test_withdraw_of_zero_reverts(chain: Harness) -> None:
    await reverts("NothingToWithdraw", chain.outsider.withdraw())


# ── receipts: the contract and Python agree ──────────────────────────────────


async def test_receipt_digest_and_domain_match_the_contract(chain: Harness) -> None:
    domain = chain.querier.receipt_domain
    receipt = PaymentReceipt(query_id=qid(7), member=chain.members[0].address, amount_wei=12345)
    on_chain = await chain.escrow.functions.receiptDigest(
        receipt.query_id, receipt.member, receipt.amount_wei
    ).call()
    assert bytes(on_chain) == receipt_digest(domain, receipt)
    separator = await chain.escrow.functions.domainSeparator().call()
    assert bytes(separator) == domain.separator()
    assert await chain.escrow.functions.claimGrace().call() == GRACE_S


async def test_a_fresh_account_can_sign_receipts_the_contract_accepts(chain: Harness) -> None:
    """The querier's key need not be a dev account: any local key works."""
    key = Account.create()
    domain = chain.querier.receipt_domain
    receipt = PaymentReceipt(query_id=qid(8), member=chain.members[0].address, amount_wei=1)
    sig = sign_receipt(key, domain, receipt)
    digest = receipt_digest(domain, receipt)
    assert Account._recover_hash(digest, signature=sig) == key.address
