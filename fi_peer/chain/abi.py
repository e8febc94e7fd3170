"""ABI lookup tables: decode custom errors and event logs of our contracts.

Small and explicit on purpose: web3's own decoders are tied to contract objects
and raise web3 exceptions; these take plain bytes and return plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak, to_checksum_address

from fi_peer.chain.artifacts import Artifact
from fi_peer.chain.errors import ContractRevert

_ERROR_STRING = bytes.fromhex("08c379a0")  # Error(string)
_PANIC = bytes.fromhex("4e487b71")  # Panic(uint256)


def _type_of(param: Mapping[str, Any]) -> str:
    """Canonical ABI type, expanding tuples (structs)."""
    kind = str(param["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_type_of(c) for c in param["components"])
        return f"({inner}){kind[len('tuple') :]}"
    return kind


def signature(entry: Mapping[str, Any]) -> str:
    """``Name(type,type)`` of an ABI error/event/function entry."""
    return f"{entry['name']}({','.join(_type_of(p) for p in entry['inputs'])})"


def _plain(value: Any, kind: str) -> Any:
    """eth_abi output -> plain Python: checksummed addresses, tuples for arrays."""
    if kind == "address":
        return to_checksum_address(value)
    if kind.endswith("[]") and isinstance(value, list | tuple):
        return tuple(_plain(v, kind[:-2]) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    types: tuple[str, ...]
    names: tuple[str, ...]
    indexed: tuple[bool, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodedEvent:
    """One log of ours, decoded."""

    name: str
    address: str
    args: Mapping[str, Any]
    block_number: int
    block_hash: bytes
    tx_hash: bytes
    log_index: int


class ContractCodec:
    """Selectors of custom errors and topics of events, for a set of artifacts."""

    def __init__(self, artifacts: Iterable[Artifact]) -> None:
        self._errors: dict[bytes, _Entry] = {}
        self._events: dict[bytes, _Entry] = {}
        for artifact in artifacts:
            for entry in artifact.abi:
                if entry.get("type") not in ("error", "event"):
                    continue
                inputs: Sequence[Mapping[str, Any]] = entry["inputs"]
                parsed = _Entry(
                    name=str(entry["name"]),
                    types=tuple(_type_of(p) for p in inputs),
                    names=tuple(str(p["name"]) for p in inputs),
                    indexed=tuple(bool(p.get("indexed", False)) for p in inputs),
                )
                digest = keccak(text=signature(entry))
                if entry["type"] == "error":
                    self._errors[digest[:4]] = parsed
                else:
                    self._events[digest] = parsed

    def event_topic(self, name: str) -> bytes:
        """topic0 of the event ``name``."""
        for topic, entry in self._events.items():
            if entry.name == name:
                return topic
        raise KeyError(name)

    def error_selector(self, name: str) -> bytes:
        """4-byte selector of the custom error ``name``."""
        for selector, entry in self._errors.items():
            if entry.name == name:
                return selector
        raise KeyError(name)

    def revert(self, data: bytes) -> ContractRevert:
        """The :class:`ContractRevert` for revert ``data`` (selector + ABI args)."""
        selector, body = data[:4], data[4:]
        try:
            if selector == _ERROR_STRING:
                return ContractRevert("Error", tuple(abi_decode(["string"], body)), data)
            if selector == _PANIC:
                return ContractRevert("Panic", tuple(abi_decode(["uint256"], body)), data)
            entry = self._errors.get(selector)
            if entry is None:
                return ContractRevert("Unknown", (), data)
            values = abi_decode(list(entry.types), body)
            args = tuple(_plain(v, t) for v, t in zip(values, entry.types, strict=True))
            return ContractRevert(entry.name, args, data)
        except DecodingError:
            return ContractRevert("Unknown", (), data)

    def decode_log(self, log: Mapping[str, Any]) -> DecodedEvent | None:
        """Decode a raw log (as from ``eth_getLogs`` or a receipt); None if not ours."""
        topics = [bytes(t) for t in log["topics"]]
        if not topics or topics[0] not in self._events:
            return None
        entry = self._events[topics[0]]
        data_types = [t for t, ix in zip(entry.types, entry.indexed, strict=True) if not ix]
        try:
            data_values = iter(abi_decode(data_types, bytes(log["data"])))
            indexed_topics = iter(topics[1:])
            args: dict[str, Any] = {}
            for name, kind, is_indexed in zip(entry.names, entry.types, entry.indexed, strict=True):
                if is_indexed:
                    (value,) = abi_decode([kind], next(indexed_topics))
                else:
                    value = next(data_values)
                args[name] = _plain(value, kind)
        except (DecodingError, StopIteration):
            return None
        return DecodedEvent(
            name=entry.name,
            address=to_checksum_address(log["address"]),
            args=args,
            block_number=int(log["blockNumber"]),
            block_hash=bytes(log["blockHash"]),
            tx_hash=bytes(log["transactionHash"]),
            log_index=int(log["logIndex"]),
        )
