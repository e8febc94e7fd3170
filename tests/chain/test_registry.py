"""PeerRegistry on both chains: register, rotate keys, stake, leave, withdraw."""

from __future__ import annotations

from tests.chain.helpers import MIN_STAKE, UNBONDING_S, Harness, reverts

ED = bytes(range(1, 33))
X = bytes(range(33, 65))


async def test_register_binds_keys_and_stake(chain: Harness) -> None:
    peer = chain.members[0]
    assert not await peer.is_active(peer.address)
    result = await peer.register(ED, X, stake_wei=MIN_STAKE)
    assert result.event("Registered").args == {
        "account": peer.address,
        "ed25519": ED,
        "x25519": X,
        "stake": MIN_STAKE,
    }
    record = await chain.outsider.peer(peer.address)
    assert (record.ed25519, record.x25519, record.stake_wei) == (ED, X, MIN_STAKE)
    assert record.registered
    assert await chain.outsider.is_active(peer.address)
    await reverts("AlreadyRegistered", peer.register(ED, X, stake_wei=MIN_STAKE))


async def test_register_reverts(chain: Harness) -> None:
    peer = chain.members[0]
    error = await reverts("StakeTooLow", peer.register(ED, X, stake_wei=MIN_STAKE - 1))
    assert error.error_args == (MIN_STAKE - 1, MIN_STAKE)
    await reverts("ZeroKey", peer.register(bytes(32), X, stake_wei=MIN_STAKE))
    await reverts("ZeroKey", peer.register(ED, bytes(32), stake_wei=MIN_STAKE))


async def test_update_keys_and_add_stake(chain: Harness) -> None:
    peer = chain.members[1]
    await reverts("NotRegistered", peer.update_keys(ED, X))
    await reverts("NotRegistered", peer.add_stake(1))
    await peer.register(ED, X, stake_wei=MIN_STAKE)
    new_ed, new_x = b"\x07" * 32, b"\x08" * 32
    result = await peer.update_keys(new_ed, new_x)
    assert result.event("KeysUpdated").args["ed25519"] == new_ed
    await reverts("ZeroKey", peer.update_keys(new_ed, bytes(32)))
    added = await peer.add_stake(5)
    assert added.event("StakeAdded").args == {
        "account": peer.address,
        "amount": 5,
        "stake": MIN_STAKE + 5,
    }
    await reverts("StakeTooLow", peer.add_stake(0))
    record = await peer.peer(peer.address)
    assert (record.ed25519, record.x25519, record.stake_wei) == (new_ed, new_x, MIN_STAKE + 5)


async def test_deregister_unbond_and_withdraw_stake(chain: Harness) -> None:
    peer = chain.members[2]
    await reverts("NotRegistered", peer.deregister())
    await peer.register(ED, X, stake_wei=3 * MIN_STAKE)
    await reverts("StillRegistered", peer.withdraw_stake())
    result = await peer.deregister()
    ends = result.event("Deregistered").args["unbondingEnds"]
    assert ends >= await chain.now() + UNBONDING_S - 1
    assert not await peer.is_active(peer.address)
    record = await peer.peer(peer.address)
    assert not record.registered and record.stake_wei == 3 * MIN_STAKE
    await reverts("StillBonded", peer.withdraw_stake())

    await chain.devchain.increase_time(UNBONDING_S + 1)
    before = await peer.eth_balance()
    out = await peer.withdraw_stake()
    assert out.event("StakeWithdrawn").args["amount"] == 3 * MIN_STAKE
    assert await peer.eth_balance() == before + 3 * MIN_STAKE - out.fee_wei
    await reverts("NothingToWithdraw", peer.withdraw_stake())


async def test_register_again_while_unbonding_keeps_the_stake(chain: Harness) -> None:
    peer = chain.members[3]
    await peer.register(ED, X, stake_wei=MIN_STAKE)
    await peer.deregister()
    await peer.register(X, ED)  # no new stake needed: the old one is still there
    record = await peer.peer(peer.address)
    assert (record.ed25519, record.stake_wei, record.unbonding_ends) == (X, MIN_STAKE, 0)
    assert await peer.is_active(peer.address)
