"""A malicious receiver contract re-enters the escrow and the registry while
being paid. It must be paid exactly once, and the contracts must keep every wei.

The receiver (contracts/test/ReentrantReceiver.sol) is a committee member (or
a peer with stake). When ether arrives it calls back into the target with the
configured data: ``bubble`` makes the whole payment fail with its re-entry,
otherwise it swallows the failure and records the revert data.
"""

from __future__ import annotations

from typing import Any

import pytest

from fi_peer.chain.abi import ContractCodec
from fi_peer.chain.artifacts import load_artifact
from fi_peer.chain.client import ESCROW, REGISTRY, deploy_artifact
from fi_peer.chain.terms import Settlement
from tests.chain.helpers import MIN_STAKE, PRICE, UNBONDING_S, Harness, qid, reverts

RECEIVER = "ReentrantReceiver"


async def _receiver(chain: Harness, target: str) -> Any:
    art = load_artifact(RECEIVER)
    result = await deploy_artifact(chain.w3, chain.outsider.account, art, [target])
    return chain.w3.eth.contract(address=result.contract_address, abi=art.abi_list())


def _selector_of(name: str) -> bytes:
    return ContractCodec([load_artifact(ESCROW)]).error_selector(name)


async def _credit(chain: Harness, payee: str, query: int) -> None:
    """Open a query with ``payee`` in the committee and settle it, crediting PRICE."""
    committee = [payee, chain.members[0].address]
    terms = await chain.terms(qid(query), committee=committee)
    await chain.querier.open_query(terms)
    await chain.querier.settle_batch([Settlement(terms, terms.full_mask)])


@pytest.mark.parametrize("reentry", ["withdraw", "settleBatch", "settleWeighted", "claim"])
async def test_reentrant_withdraw_is_paid_once(chain: Harness, reentry: str) -> None:
    receiver = await _receiver(chain, chain.deployment.escrow)
    await _credit(chain, receiver.address, 1)
    await _credit(chain, receiver.address, 2)
    assert await chain.querier.balance(receiver.address) == 2 * PRICE
    held = await chain.querier.eth_balance(chain.deployment.escrow)

    if reentry == "withdraw":
        data = chain.escrow.encode_abi("withdraw", args=[])
    elif reentry == "settleBatch":
        data = chain.escrow.encode_abi("settleBatch", args=[[receiver.address], []])
    elif reentry == "settleWeighted":
        terms = await chain.terms(qid(3), committee=[receiver.address])
        data = chain.escrow.encode_abi(
            "settleWeighted", args=[terms.query_id, terms.as_abi(), 1, [PRICE]]
        )
    else:
        terms = await chain.opened(qid(3), committee=[receiver.address])
        data = chain.escrow.encode_abi(
            "claim", args=[terms.query_id, terms.as_abi(), 0, receiver.address, 1, b""]
        )
    withdraw = chain.escrow.encode_abi("withdraw", args=[])
    sender = chain.sender(chain.outsider.account, RECEIVER)

    # bubble: the re-entry's revert fails the transfer, so the withdrawal fails whole
    await chain.send_raw(chain.outsider.account, receiver, "configure", [data, True])
    await reverts(
        "TransferFailed",
        sender.send(to=receiver.address, data=_call_data(receiver, withdraw)),
    )
    assert await chain.querier.balance(receiver.address) == 2 * PRICE

    # swallow: the withdrawal succeeds, the re-entry was refused by the guard
    await chain.send_raw(chain.outsider.account, receiver, "configure", [data, False])
    escrow_now = await chain.querier.eth_balance(chain.deployment.escrow)
    await sender.send(to=receiver.address, data=_call_data(receiver, withdraw))
    assert await receiver.functions.attempts().call() == 1
    assert bytes(await receiver.functions.lastError().call()) == _selector_of("Reentrancy")
    assert await chain.querier.eth_balance(receiver.address) == 2 * PRICE
    assert await chain.querier.balance(receiver.address) == 0
    assert await chain.querier.eth_balance(chain.deployment.escrow) == escrow_now - 2 * PRICE
    assert escrow_now - 2 * PRICE == held - 2 * PRICE + (PRICE if reentry == "claim" else 0)


async def test_reentrant_stake_withdrawal_is_paid_once(chain: Harness) -> None:
    registry_art = load_artifact(REGISTRY)
    receiver = await _receiver(chain, chain.deployment.registry)
    sender = chain.sender(chain.outsider.account, RECEIVER)
    register = chain.registry.encode_abi("register", args=[b"\x01" * 32, b"\x02" * 32])
    await sender.send(to=receiver.address, data=_call_data(receiver, register), value=5 * MIN_STAKE)
    deregister = chain.registry.encode_abi("deregister", args=[])
    await sender.send(to=receiver.address, data=_call_data(receiver, deregister))
    await chain.devchain.increase_time(UNBONDING_S + 1)

    withdraw = chain.registry.encode_abi("withdrawStake", args=[])
    await chain.send_raw(chain.outsider.account, receiver, "configure", [withdraw, False])
    registry_before = await chain.querier.eth_balance(chain.deployment.registry)
    await sender.send(to=receiver.address, data=_call_data(receiver, withdraw))
    assert await receiver.functions.attempts().call() == 1
    reentrancy = ContractCodec([registry_art]).revert(
        bytes(await receiver.functions.lastError().call())
    )
    assert reentrancy.name == "Reentrancy"
    assert await chain.querier.eth_balance(receiver.address) == 5 * MIN_STAKE
    assert await chain.querier.eth_balance(chain.deployment.registry) == (
        registry_before - 5 * MIN_STAKE
    )
    record = await chain.querier.peer(receiver.address)
    assert record.stake_wei == 0


def _call_data(receiver: Any, inner: str) -> bytes:
    """Calldata of ``receiver.call(inner)``: the receiver forwards ``inner`` to its target."""
    data = receiver.encode_abi("call", args=[bytes.fromhex(inner[2:])])
    return bytes.fromhex(data[2:])
