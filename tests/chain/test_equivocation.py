"""PeerRegistry.reportEquivocation: two signed commitments for one query slash the stake."""

from __future__ import annotations

import pytest

from fi_peer.chain.commitments import (
    CommitmentStatement,
    commitment_digest,
    recover_commitment_signer,
)
from fi_peer.chain.errors import InvalidReceipt
from fi_peer.protocol.audit import commit
from tests.chain.helpers import MIN_STAKE, Harness, reverts

ED = bytes(range(1, 33))
X = bytes(range(33, 65))
QID = bytes(range(16))
OTHER_QID = bytes(range(16, 32))
# Gas of one report (two ecrecovers, three SSTOREs, one value transfer); measured
# 91,072 on eth-tester, bounded here so a regression shows.
MAX_REPORT_GAS = 120_000


def commitments(member_id: str) -> tuple[bytes, bytes]:
    a = commit(QID, member_id, b"\x01" * 80, b"\xaa" * 32)
    b = commit(QID, member_id, b"\x02" * 80, b"\xaa" * 32)
    return a, b


async def test_digest_matches_the_contract_and_recovers(chain: Harness) -> None:
    member = chain.members[0]
    c, _ = commitments("ab" * 32)
    statement = CommitmentStatement(querier=chain.querier.address, query_id=QID, commitment=c)
    expected = commitment_digest(member.registry_domain, statement)
    on_chain = await chain.registry.functions.commitmentDigest(chain.querier.address, QID, c).call()
    assert bytes(on_chain) == expected
    sig = member.sign_commitment(chain.querier.address, QID, c)
    assert recover_commitment_signer(member.registry_domain, statement, sig) == member.address
    with pytest.raises(InvalidReceipt):
        recover_commitment_signer(member.registry_domain, statement, sig[:64])


async def test_equivocation_slashes_the_stake(chain: Harness) -> None:
    member, reporter = chain.members[0], chain.outsider
    stake = 4 * MIN_STAKE
    await member.register(ED, X, stake_wei=stake)
    a, b = commitments("ab" * 32)
    q = chain.querier.address
    sig_a = member.sign_commitment(q, QID, a)
    sig_b = member.sign_commitment(q, QID, b)
    before = await reporter.eth_balance()
    result = await reporter.report_equivocation(member.address, q, QID, (a, sig_a), (b, sig_b))
    assert result.event("Equivocated").args == {
        "member": member.address,
        "reporter": reporter.address,
        "querier": q,
        "queryId": QID,
        "slashed": stake,
        "reward": stake // 2,
    }
    assert await reporter.eth_balance() == before - result.fee_wei + stake // 2
    record = await reporter.peer(member.address)
    assert record.stake_wei == 0 and not record.registered
    assert not await reporter.is_active(member.address)
    assert await chain.registry.functions.burned().call() == stake - stake // 2
    assert result.gas_used < MAX_REPORT_GAS
    # One equivocation is punished once, even after the member stakes again.
    await member.register(ED, X, stake_wei=MIN_STAKE)
    await reverts(
        "AlreadyReported",
        reporter.report_equivocation(member.address, q, QID, (a, sig_a), (b, sig_b)),
    )
    assert (await reporter.peer(member.address)).stake_wei == MIN_STAKE


async def test_no_equivocation_no_slash(chain: Harness) -> None:
    member, reporter = chain.members[1], chain.outsider
    await member.register(ED, X, stake_wei=MIN_STAKE)
    q = chain.querier.address
    a, b = commitments("cd" * 32)
    sig_a = member.sign_commitment(q, QID, a)
    # The same commitment twice (e.g. a Share resent) is no equivocation.
    await reverts(
        "NotEquivocation",
        reporter.report_equivocation(member.address, q, QID, (a, sig_a), (a, sig_a)),
    )
    # Two commitments for two different queries: honest; as one query's evidence the
    # second signature does not recover to the member.
    sig_other = member.sign_commitment(q, OTHER_QID, b)
    await reverts(
        "BadSignature",
        reporter.report_equivocation(member.address, q, QID, (a, sig_a), (b, sig_other)),
    )
    # Another querier's query with the same id is another query.
    sig_q2 = member.sign_commitment(chain.querier2.address, QID, b)
    await reverts(
        "BadSignature",
        reporter.report_equivocation(member.address, q, QID, (a, sig_a), (b, sig_q2)),
    )
    # Someone else's signature does not count against the member.
    forged = chain.members[2].sign_commitment(q, QID, b)
    await reverts(
        "BadSignature",
        reporter.report_equivocation(member.address, q, QID, (a, sig_a), (b, forged)),
    )
    record = await reporter.peer(member.address)
    assert record.stake_wei == MIN_STAKE and record.registered


async def test_querier_publishes_merit_scores_as_events(chain: Harness) -> None:
    a, b = chain.members[0].address, chain.members[1].address
    result = await chain.querier.publish_scores({a: 0.25, b: 1.5})
    events = result.all("ScorePublished")
    assert [e.args for e in events] == [
        {"querier": chain.querier.address, "member": a, "scorePpm": 250_000},
        {"querier": chain.querier.address, "member": b, "scorePpm": 1_000_000},  # clipped
    ]
    await reverts(
        "LengthMismatch",
        chain.querier.sender.send(
            to=chain.deployment.registry,
            data=bytes.fromhex(chain.registry.encode_abi("publishScores", args=[[a], [1, 2]])[2:]),
        ),
    )
