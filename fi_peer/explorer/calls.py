"""Decode transaction input (function calls and constructors) with our ABIs.

:class:`fi_peer.chain.abi.ContractCodec` decodes events and errors; this is
its counterpart for calls, which only the explorer needs. Values come back as
:class:`Arg` trees (structs and arrays keep their component names), so a page
can show a ``settleBatch`` item by item without knowing the ABI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak, to_checksum_address

from fi_peer.chain.abi import signature
from fi_peer.chain.artifacts import Artifact


@dataclass(frozen=True, slots=True, kw_only=True)
class Arg:
    """One decoded argument: a scalar (``value``) or a struct/array (``items``)."""

    name: str
    type: str
    value: Any = None
    items: tuple[Arg, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    contract: str
    function: str
    args: tuple[Arg, ...]

    def arg(self, name: str) -> Arg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(name)


def _canonical(param: Mapping[str, Any]) -> str:
    kind = str(param["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_canonical(c) for c in param["components"])
        return f"({inner}){kind[len('tuple') :]}"
    return kind


def _arg(param: Mapping[str, Any], value: Any, name: str | None = None) -> Arg:
    kind = str(param["type"])
    label = str(param.get("name") or "") if name is None else name
    if kind.endswith("]"):
        inner = dict(param)
        inner["type"] = kind[: kind.rindex("[")]
        items = tuple(_arg(inner, v, f"{label}[{i}]") for i, v in enumerate(value))
        return Arg(name=label, type=kind, items=items)
    if kind == "tuple":
        components: Sequence[Mapping[str, Any]] = param["components"]
        items = tuple(_arg(c, v) for c, v in zip(components, value, strict=True))
        return Arg(name=label, type=str(param.get("internalType", kind)), items=items)
    if kind == "address":
        value = to_checksum_address(value)
    return Arg(name=label, type=kind, value=value)


class CallCodec:
    """Function selectors and constructors of a set of artifacts."""

    def __init__(self, artifacts: Iterable[Artifact]) -> None:
        self._functions: dict[bytes, tuple[str, Mapping[str, Any]]] = {}
        self._constructors: list[tuple[Artifact, Mapping[str, Any] | None]] = []
        for artifact in artifacts:
            ctor = None
            for entry in artifact.abi:
                if entry.get("type") == "function":
                    selector = keccak(text=signature(entry))[:4]
                    self._functions[selector] = (artifact.name, entry)
                elif entry.get("type") == "constructor":
                    ctor = entry
            self._constructors.append((artifact, ctor))

    def names(self) -> dict[bytes, str]:
        """selector -> function name."""
        return {sel: str(entry["name"]) for sel, (_, entry) in self._functions.items()}

    def decode(self, data: bytes) -> Call | None:
        """The call ``data`` encodes, or None (unknown selector, bad encoding)."""
        found = self._functions.get(data[:4])
        if found is None:
            return None
        contract, entry = found
        return self._decode(contract, str(entry["name"]), entry["inputs"], data[4:])

    def decode_deployment(self, data: bytes) -> Call | None:
        """A contract creation: which of our contracts, with its constructor args."""
        for artifact, ctor in self._constructors:
            code = artifact.bytecode
            if code and data.startswith(code):
                inputs = [] if ctor is None else ctor["inputs"]
                return self._decode(artifact.name, "constructor", inputs, data[len(code) :])
        return None

    @staticmethod
    def _decode(
        contract: str, function: str, inputs: Sequence[Mapping[str, Any]], body: bytes
    ) -> Call | None:
        try:
            values = abi_decode([_canonical(p) for p in inputs], body)
        except (DecodingError, ValueError, TypeError, OverflowError):
            return None
        args = tuple(_arg(p, v) for p, v in zip(inputs, values, strict=True))
        return Call(contract=contract, function=function, args=args)


def batch_committees(call: Call) -> list[tuple[bytes, tuple[str, ...], int]]:
    """For a ``settleBatch`` call: (queryId, committee, delivered) per item, the
    committee rebuilt from the one-byte ``memberIndex`` entries."""
    members = [str(a.value) for a in call.arg("members").items]
    out = []
    for item in call.arg("items").items:
        fields = {a.name: a.value for a in item.items}
        size, packed = int(fields["size"]), int(fields["memberIndex"])
        committee = []
        for i in range(size):
            j = packed >> (8 * i) & 0xFF
            committee.append(members[j] if j < len(members) else f"(bad index {j})")
        out.append((bytes(fields["queryId"]), tuple(committee), int(fields["delivered"])))
    return out
