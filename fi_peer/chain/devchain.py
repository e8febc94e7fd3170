"""Development chains: one small interface, an in-process implementation first.

:class:`DevChain` is what tests, benchmarks and single-process demos need from
a throwaway chain beyond plain JSON-RPC: funded accounts with known keys,
moving time forward, and snapshots. :class:`EthTesterChain` runs py-evm in
this process (no ports, deterministic, the unit tests' chain);
:class:`fi_peer.chain.anvil.AnvilChain` is the same interface over an anvil
process (anything with more than one process). Both give a fresh
:class:`~web3.AsyncWeb3` per event loop through :meth:`DevChain.web3`.

py-evm estimates gas by a binary search (about 13 executions per estimate,
80 % of a test's time); :func:`_one_shot_estimate` runs the transaction once
at the block gas limit and returns the gross gas it consumed, which is never
below the real need except for the 1/64 rule of calls, covered by the
:class:`~fi_peer.chain.txsender.GasPolicy` margin.

eth-tester reports a revert as a Python exception; :class:`_RevertingProvider`
turns it into the JSON-RPC error a real node sends (code 3, ``data`` = the
revert bytes), so web3 raises the same exception for both chains and
:class:`fi_peer.chain.txsender.TxSender` decodes custom errors the same way.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol, runtime_checkable

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3
from web3.providers.async_base import AsyncBaseProvider
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import RPCEndpoint, RPCResponse

#: Private keys 0x01..0x0a: eth-tester's default funded accounts (1,000,000 ETH each).
_ETH_TESTER_ACCOUNTS = 10


@runtime_checkable
class DevChain(Protocol):
    """A local chain for tests and demos."""

    @property
    def chain_id(self) -> int: ...

    @property
    def accounts(self) -> tuple[LocalAccount, ...]:
        """Funded accounts whose private keys we hold."""
        ...

    def web3(self) -> AsyncWeb3[Any]:
        """A new AsyncWeb3 bound to this chain (one per event loop)."""
        ...

    async def increase_time(self, seconds: int) -> int:
        """Mine a block at least ``seconds`` after the latest one; return its timestamp."""
        ...

    async def snapshot(self) -> Any:
        """Save the chain state; pass the result to :meth:`revert`."""
        ...

    async def revert(self, snapshot: Any) -> None:
        """Go back to a snapshot (each snapshot may be used once)."""
        ...


class _RevertingProvider(AsyncEthereumTesterProvider):
    """AsyncEthereumTesterProvider over a shared tester, reporting reverts as
    JSON-RPC errors with the revert bytes in ``data`` (as geth and anvil do)."""

    def __init__(self, tester: Any) -> None:
        # Not super().__init__(): that would build a whole new EthereumTester.
        AsyncBaseProvider.__init__(self)
        from web3.providers.eth_tester.defaults import API_ENDPOINTS

        self.ethereum_tester = tester
        self.api_endpoints = API_ENDPOINTS
        self._ids = itertools.count()

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        from eth_tester.exceptions import TransactionFailed  # type: ignore[import-untyped]

        request_id = next(self._ids)
        namespace, _, endpoint = method.partition("_")
        try:
            delegator = self.api_endpoints[namespace][endpoint]
        except KeyError:
            return _error(request_id, -32601, f"unknown RPC method {method}")
        try:
            result = delegator(self.ethereum_tester, params)
        except NotImplementedError:
            return _error(request_id, -32601, f"RPC method not implemented: {method}")
        except TransactionFailed as exc:
            raw = exc.args[0] if exc.args else b""
            if isinstance(raw, Exception) and raw.args:
                raw = raw.args[0]
            data = "0x" + raw.hex() if isinstance(raw, bytes) else None
            message = "execution reverted" if data is not None else f"execution reverted: {raw!r}"
            return _error(request_id, 3, message, data)
        except Exception as exc:  # validation errors (bad nonce, funds, ...): as a node would
            return _error(request_id, -32000, f"{type(exc).__name__}: {exc}")
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _one_shot_estimate(state: Any, transaction: Any) -> int:
    """py-evm gas estimator: one execution at the block gas limit (see module doc)."""
    from eth.vm.spoof import SpoofTransaction

    trial = SpoofTransaction(transaction, gas=state.gas_limit, gas_price=0)
    snapshot = state.snapshot()
    try:
        computation = state.apply_transaction(trial)
        if computation.is_error:
            raise computation.error
        return int(state.gas_limit - computation.get_gas_remaining())
    finally:
        state.revert(snapshot)


def _error(request_id: int, code: int, message: str, data: str | None = None) -> RPCResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}  # type: ignore[typeddict-item]


class EthTesterChain:
    """An in-process py-evm chain (eth-tester). Chain id 131277322940537."""

    def __init__(self) -> None:
        from eth_tester import EthereumTester, PyEVMBackend  # type: ignore[import-untyped]

        self._backend = PyEVMBackend()
        # On the instance, and on its class for when eth-tester re-creates the chain.
        type(self._backend.chain).gas_estimator = staticmethod(_one_shot_estimate)
        self._backend.chain.gas_estimator = _one_shot_estimate
        self.tester = EthereumTester(self._backend)
        self._accounts = tuple(
            Account.from_key(i.to_bytes(32, "big")) for i in range(1, _ETH_TESTER_ACCOUNTS + 1)
        )
        self._chain_id = int(self.tester.backend.chain.chain_id)

    @property
    def chain_id(self) -> int:
        return self._chain_id

    @property
    def accounts(self) -> tuple[LocalAccount, ...]:
        return self._accounts

    def web3(self) -> AsyncWeb3[Any]:
        return AsyncWeb3(_RevertingProvider(self.tester))

    async def increase_time(self, seconds: int) -> int:
        latest = int(self.tester.get_block_by_number("latest")["timestamp"])
        pending = int(self.tester.get_block_by_number("pending")["timestamp"])
        target = max(latest + max(0, seconds), pending)
        if target > pending:
            self.tester.time_travel(target)
        else:
            self.tester.mine_blocks()
        return int(self.tester.get_block_by_number("latest")["timestamp"])

    async def snapshot(self) -> Any:
        return self.tester.take_snapshot()

    async def revert(self, snapshot: Any) -> None:
        self.tester.revert_to_snapshot(snapshot)


def eth_tester_chain() -> EthTesterChain:
    """Factory for tests and single-process demos: a fresh in-process chain."""
    return EthTesterChain()
