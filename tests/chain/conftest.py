"""Fixtures of the chain tests: each contract test runs on both chains.

``devchain`` is parametrized over the in-process eth-tester chain and an anvil
process (marked ``integration``). Each backend lives for the whole session with
one deployment; every test runs between a snapshot and a revert of it, so tests
see a fresh deployment and cannot leak state into each other.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from fi_peer.chain.anvil import AnvilChain, AnvilConfig, AnvilProcess, anvil_binary
from fi_peer.chain.client import Deployment, deploy_contracts
from fi_peer.chain.devchain import DevChain, eth_tester_chain
from tests.chain.helpers import GRACE_S, MIN_STAKE, UNBONDING_S, Harness, close_web3


def require_anvil() -> None:
    """Skip without the anvil binary; in CI (where 20-node.sh installs it), fail."""
    if not anvil_binary().is_file():
        message = f"anvil missing at {anvil_binary()}: run `npm ci`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def anvil_process() -> Iterator[AnvilProcess]:
    require_anvil()
    process = AnvilProcess(AnvilConfig(accounts=10))
    process.start()
    yield process
    assert process.stop() == 0


@pytest.fixture(
    scope="session",
    params=["eth-tester", pytest.param("anvil", marks=pytest.mark.integration)],
)
def devchain(request: pytest.FixtureRequest) -> DevChain:
    if request.param == "eth-tester":
        return eth_tester_chain()
    return AnvilChain.of(request.getfixturevalue("anvil_process"))


@pytest.fixture(scope="session")
def deployment(devchain: DevChain) -> Deployment:
    async def deploy() -> Deployment:
        w3 = devchain.web3()
        try:
            return await deploy_contracts(
                w3,
                devchain.accounts[0],
                claim_grace_s=GRACE_S,
                min_stake_wei=MIN_STAKE,
                unbonding_s=UNBONDING_S,
            )
        finally:
            await close_web3(w3)

    return asyncio.run(deploy())


@pytest.fixture
async def chain(devchain: DevChain, deployment: Deployment) -> AsyncIterator[Harness]:
    snapshot: Any = await devchain.snapshot()
    harness = Harness(devchain, deployment)
    try:
        yield harness
    finally:
        await harness.aclose()
        await devchain.revert(snapshot)
