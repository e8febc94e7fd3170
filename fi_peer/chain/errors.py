"""Errors of the chain layer, one family under :class:`fi_peer.errors.FiPeerError`.

::

    FiPeerError
    └── ChainError                   anything the chain layer raises on purpose
        ├── ArtifactError            contracts/build missing, malformed or stale
        ├── ChainUnavailable         RPC unreachable, anvil would not start, timed out
        ├── ContractRevert           the contract rejected a call (custom error decoded)
        ├── TransactionFailed        sent, but not mined successfully (status 0, timeout)
        ├── InvalidReceipt           an EIP-712 payment receipt is malformed or not the querier's
        └── BatchTooLarge            a settlement batch names more members than one call takes

Adapters in this package translate web3, eth-tester, eth-account, sqlite and
subprocess exceptions into this tree with ``raise ... from exc``. A
:class:`ContractRevert` carries the Solidity error's ``name`` and decoded
``args``, so callers branch on ``exc.name == "AlreadyClaimed"`` and never on
library exception types or message strings.
"""

from __future__ import annotations

from typing import Any

from fi_peer.errors import FiPeerError


class ChainError(FiPeerError):
    """Base class of the chain layer's errors."""


class ArtifactError(ChainError):
    """A contract artifact in contracts/build is missing, malformed or stale."""


class ChainUnavailable(ChainError):
    """The chain cannot be reached (RPC down, node not started, request timed out)."""


class ContractRevert(ChainError):
    """The contract reverted with a custom error (or a panic / reason string).

    ``name`` is the Solidity error name (``"AlreadyClaimed"``), or ``"Panic"`` /
    ``"Error"`` / ``"Unknown"``; ``error_args`` are its decoded arguments and
    ``data`` the raw revert data.
    """

    def __init__(self, name: str, args: tuple[Any, ...] = (), data: bytes = b"") -> None:
        self.name = name
        self.error_args = args
        self.data = data
        shown = ", ".join(_show(a) for a in args)
        super().__init__(f"contract reverted: {name}({shown})")


class TransactionFailed(ChainError):
    """A transaction was sent but did not succeed (reverted when mined, or no receipt)."""

    def __init__(self, message: str, tx_hash: bytes | None = None) -> None:
        self.tx_hash = tx_hash
        super().__init__(message if tx_hash is None else f"{message} (tx 0x{tx_hash.hex()})")


class InvalidReceipt(ChainError):
    """A payment receipt's signature is malformed or was not made by the querier."""


class BatchTooLarge(ChainError):
    """A settlement batch names more distinct members than settleBatch accepts."""


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return repr(value) if isinstance(value, str) else str(value)
