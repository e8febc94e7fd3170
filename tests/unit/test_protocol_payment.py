"""Paid queries through PeerCores in a SansIoNet (DESIGN.md steps 4-8, "Incentives").

The escrow is opened before any Accept (hence any input) leaves; members check
it before they evaluate; receipts carry the querier's EIP-712 signature, which
members verify and keep. The chain is an in-memory escrow book in the net;
signatures are real (eth_account), with fixed keys. Deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from eth_account import Account
from eth_utils import keccak

from fi_peer.chain.errors import InvalidReceipt
from fi_peer.chain.receipts import PaymentReceipt, ReceiptDomain, verify_receipt
from fi_peer.chain.terms import checksum
from fi_peer.identity import Identity
from fi_peer.protocol.effects import OpenEscrow, VerifyEscrow
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.messages import Accept, Member, Offer, Receipt
from fi_peer.protocol.payment import EscrowTerms
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.responder import ResponderConfig
from fi_peer.settlement import EthPayments, chain_terms
from tests.unit.sansio_net import SansIoNet, _kind
from tests.unit.test_protocol_flow import T0, TIMEOUT, X, model_for

QUERIER = Identity.from_seed(b"querier")
DOMAIN = ReceiptDomain(chain_id=31337, escrow=checksum("0x" + "11" * 20))


def account(name: str) -> Any:
    return Account.from_key(keccak(text=name))


def payments(name: str, domain: ReceiptDomain = DOMAIN) -> EthPayments:
    return EthPayments(account(name), domain, settle_window_s=30)


class WrongSigner(EthPayments):
    """A querier whose receipts are signed by another account."""

    def sign_receipt(self, query_id: bytes, member: str, amount_wei: int) -> bytes:
        other = EthPayments(account("mallory"), self.domain)
        return other.sign_receipt(query_id, member, amount_wei)


class Forgetful(dict[Any, Any]):
    """An escrow book that never holds anything (the querier's 'opened' is a lie)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def paid_world(
    n: int = 3,
    *,
    prices: tuple[int, ...] = (10, 20, 30),
    querier_payments: EthPayments | None = None,
    member_payments: bool = True,
    shared_account: bool = False,
    secagg: bool = True,
) -> tuple[SansIoNet, PeerCore, list[PeerCore], dict[str, int]]:
    net = SansIoNet(now_ms=T0)
    qconf = CoreConfig(querier=QuerierConfig(secure_aggregation=secagg))
    querier = net.add("querier", model_for(100), qconf, payments=querier_payments)
    calls: dict[str, int] = {}
    members = []
    for i in range(n):
        conf = CoreConfig(
            responder=ResponderConfig(price_wei=prices[i], allow_plaintext=not secagg)
        )
        inner = model_for(i)
        name = f"member{i}"

        def model(x: np.ndarray, rule: str, inner: Any = inner, name: str = name) -> np.ndarray:
            calls[name] = calls.get(name, 0) + 1
            return np.asarray(inner(x, rule))

        pay = payments("shared" if shared_account else name) if member_payments else None
        members.append(net.add(name, model, conf, payments=pay))
    net.run()
    return net, querier, members, calls


def submit(net: SansIoNet, querier: PeerCore, *, k: int = 3, max_price_wei: int = 100) -> bytes:
    qid, effects = querier.submit_query(
        X, rule="soft", vector_len=3, k=k, max_price_wei=max_price_wei,
        timeout_ms=TIMEOUT, now_ms=net.now_ms,
    )
    net._feed(querier.peer_id, effects)
    net.run()
    net.advance(TIMEOUT)
    return qid


@pytest.mark.parametrize("secagg", [True, False])
def test_escrow_is_opened_before_any_accept_leaves(secagg: bool) -> None:
    net, q, members, calls = paid_world(querier_payments=payments("querier"), secagg=secagg)
    qid = submit(net, q)
    out = net.done[qid]
    assert out.ok, out.reason
    kinds = [k for peer, k in net.trace if peer == q.peer_id]
    assert kinds.count("open_escrow") == 1
    assert "accept" in kinds and kinds.index("open_escrow") < kinds.index("accept")
    # the escrow: every member's address, one price (the highest offer), deadline after answers
    assert out.escrow is not None
    assert out.escrow.querier == account("querier").address
    assert sorted(out.escrow.committee) == sorted(account(f"member{i}").address for i in range(3))
    assert out.escrow.price_wei == 30 and out.escrow.escrow_wei == 90
    assert out.escrow.deadline_s * 1000 >= T0 + TIMEOUT
    assert sorted(out.delivered) == sorted(out.escrow.committee)
    assert (out.escrow.querier.lower(), qid) in net.escrows
    # every member checked the escrow before its model ran, and answered
    for m in members:
        mk = [k for peer, k in net.trace if peer == m.peer_id]
        assert mk.index("verify_escrow") < mk.index("share")
    assert calls == {"member0": 1, "member1": 1, "member2": 1}
    assert chain_terms(out.escrow).commitment()  # the chain accepts these terms


def test_receipts_carry_a_valid_signature_and_are_kept() -> None:
    net, q, members, _ = paid_world(querier_payments=payments("querier"))
    qid = submit(net, q)
    assert net.done[qid].ok
    assert sorted(p for p, _ in net.paid) == sorted(m.peer_id for m in members)
    for peer, paid in net.paid:
        member = next(m for m in members if m.peer_id == peer)
        receipt = paid.receipt
        assert receipt.price_wei == 30 and len(receipt.payment_sig) == 65
        assert paid.terms == net.done[qid].escrow
        assert paid.querier == q.peer_id
        pr = PaymentReceipt(
            query_id=qid, member=checksum(member.eth_address), amount_wei=receipt.price_wei
        )
        verify_receipt(DOMAIN, pr, receipt.payment_sig, account("querier").address)
        with pytest.raises(InvalidReceipt):
            verify_receipt(DOMAIN, pr, receipt.payment_sig, account("member0").address)
        assert member.responder.receipts == [receipt]


def test_escrow_failure_fails_the_query_cleanly_before_any_input_leaves() -> None:
    net, q, members, calls = paid_world(querier_payments=payments("querier"))
    net.escrow_fails = lambda terms: True
    qid = submit(net, q)
    out = net.done[qid]
    assert not out.ok and out.reason == "escrow_failed"
    assert out.escrow is None and out.delivered == ()
    assert all(k != "accept" for _, k in net.trace)
    assert calls == {}
    assert q.metrics["escrow.failed"] == 1 and not q.queries
    for m in members:  # told at once (Result), so their reserved capacity is free
        assert not m.responder.sessions


def test_a_query_past_its_deadline_while_escrowing_fails() -> None:
    net, q, _members, _ = paid_world(querier_payments=payments("querier"))
    pending: list[OpenEscrow] = []
    apply = net._apply

    def hold_escrow(origin: str, effect: Any) -> None:
        if isinstance(effect, OpenEscrow):
            pending.append(effect)  # the chain never answers
        else:
            apply(origin, effect)

    net._apply = hold_escrow  # type: ignore[method-assign]
    qid = submit(net, q)
    assert len(pending) == 1
    assert net.done[qid].reason == "deadline_before_escrow"
    assert q.escrow_opened(qid, True, net.now_ms) == []  # too late: nothing happens


def test_a_member_does_not_answer_when_the_escrow_is_not_on_chain() -> None:
    net, q, members, calls = paid_world(querier_payments=payments("querier"))
    net.escrows = Forgetful()
    qid = submit(net, q)
    out = net.done[qid]
    assert not out.ok
    assert calls == {}  # no model ran
    sent = {k for peer, k in net.trace if peer != q.peer_id}
    assert "share" not in sent and "key_shares" not in sent
    assert q.metrics["declined.escrow_not_found"] >= 2  # the last may come after the end
    for m in members:
        assert m.metrics["escrow.not_found"] == 1 and not m.responder.sessions


def test_a_bad_receipt_signature_is_rejected() -> None:
    net, q, members, _ = paid_world(querier_payments=WrongSigner(account("querier"), DOMAIN))
    qid = submit(net, q)
    assert net.done[qid].ok  # the answer is the querier's; the members are not paid by it
    assert net.paid == []
    for m in members:
        assert m.responder.receipts == []
        assert m.metrics["rejected.unexpected"] == 1
        assert m.metrics["responder.bad_payment_sig"] == 1


def test_a_receipt_without_signature_is_rejected_for_a_paid_query() -> None:
    net, q, members, _ = paid_world(querier_payments=payments("querier"), secagg=False)
    m = members[0]
    held: list[bytes] = []

    def hold(src: str, dst: str, data: bytes) -> bool:
        if src == q.peer_id and dst == m.peer_id and _kind(data) in ("receipt", "result"):
            held.append(data)
            return True
        return False

    net.drop = hold
    qid = submit(net, q)
    assert net.done[qid].ok and len(held) == 2
    session = m.responder.sessions[(q.peer_id, qid)]
    unsigned = Receipt(query_id=qid, member=m.peer_id, share_digest=session.share_digest,
                       price_wei=30)
    net.deliver(m.peer_id, seal(QUERIER, unsigned, net.now_ms))
    assert m.metrics["responder.bad_payment_sig"] == 1 and m.responder.receipts == []
    net.deliver(m.peer_id, held[0])  # the real, signed one still counts
    net.run()
    assert len(m.responder.receipts) == 1
    assert sorted(p for p, _ in net.paid) == sorted(x.peer_id for x in members)


def test_without_payments_nothing_changes() -> None:
    net, q, _members, _ = paid_world(member_payments=False)
    qid = submit(net, q)
    out = net.done[qid]
    assert out.ok and out.escrow is None and out.delivered == ()
    assert all(k not in ("open_escrow", "verify_escrow") for _, k in net.trace)
    assert net.paid == []


def test_a_priced_member_declines_an_accept_without_escrow() -> None:
    # the querier has no chain; members want to be paid
    net, q, _members, calls = paid_world()
    qid = submit(net, q)
    out = net.done[qid]
    assert not out.ok
    assert q.metrics["declined.escrow_missing"] >= 2 and calls == {}


def test_a_free_member_with_a_chain_answers_an_unpaid_query() -> None:
    net, q, _members, _ = paid_world(prices=(0, 0, 0))
    qid = submit(net, q)
    assert net.done[qid].ok
    assert all(k != "verify_escrow" for _, k in net.trace)


def test_a_paid_querier_rejects_offers_without_an_address() -> None:
    net, q, _, _ = paid_world(querier_payments=payments("querier"), member_payments=False)
    qid = submit(net, q)
    out = net.done[qid]
    assert not out.ok and out.reason.startswith("too_few_offers")
    assert q.metrics["rejected.unexpected"] == 3


def test_a_paid_querier_rejects_offers_with_another_members_address() -> None:
    net, q, _, _ = paid_world(querier_payments=payments("querier"), shared_account=True)
    qid = submit(net, q)
    out = net.done[qid]
    assert out.reason == "too_few_offers_1"
    assert q.metrics["rejected.unexpected"] == 2


def test_paid_messages_validate_addresses_and_signature_length() -> None:
    eth = account("a").address
    assert Offer(query_id=b"q" * 16, price_wei=1, box_key=b"k" * 32, expected_latency_ms=0,
                 eth_address=eth).eth_address == eth
    with pytest.raises(ValueError):
        Offer(query_id=b"q" * 16, price_wei=1, box_key=b"k" * 32, expected_latency_ms=0,
              eth_address="0x123")
    with pytest.raises(ValueError):
        Receipt(query_id=b"q" * 16, member="a" * 64, share_digest=b"d" * 32, price_wei=1,
                payment_sig=b"s" * 64)
    m = Member(peer_id="a" * 64, box_key=b"k" * 32, eth_address=eth)
    base: dict[str, Any] = dict(query_id=b"q" * 16, committee=(m,), threshold=1, price_wei=1,
                                answer_deadline_ms=0, escrow_ref=b"", noise_sigma=0.0,
                                sealed_input=b"x")
    Accept(**base, querier_eth=eth, escrow_deadline_s=5)
    with pytest.raises(ValueError):  # addresses for the members but none for the querier
        Accept(**base)
    with pytest.raises(ValueError):
        Accept(**base, querier_eth=eth, escrow_deadline_s=0)
    with pytest.raises(ValueError):
        EscrowTerms(query_id=b"q" * 16, querier=eth, committee=(eth, eth.lower()),
                    price_wei=1, deadline_s=1)


def test_effects_name_the_terms() -> None:
    eth = account("a").address
    terms = EscrowTerms(query_id=b"q" * 16, querier=eth, committee=(eth,), price_wei=2,
                        deadline_s=9)
    assert OpenEscrow(terms).terms.escrow_wei == 2
    assert VerifyEscrow("a" * 64, terms).querier == "a" * 64


class EarlyDeadline(EthPayments):
    """A querier whose escrow ends before the answers are due (members could not claim)."""

    def escrow_deadline_s(self, answer_deadline_ms: int) -> int:
        return answer_deadline_ms // 1000 - 1


def test_members_decline_an_escrow_that_ends_before_the_answers_are_due() -> None:
    net, q, _members, calls = paid_world(querier_payments=EarlyDeadline(account("querier"), DOMAIN))
    qid = submit(net, q)
    assert not net.done[qid].ok
    assert q.metrics["declined.escrow_deadline_too_early"] >= 2 and calls == {}
    assert all(k != "verify_escrow" for _, k in net.trace)
