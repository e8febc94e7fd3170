"""Typed messages of the query flow (see DESIGN.md, "One query, step by step").

Every message is a frozen dataclass validated in ``__post_init__``: an invalid
message cannot be constructed, so one that decodes is one the state machines
may trust structurally (not semantically: that is their job). ``KIND`` is the
envelope kind; ``MAX_ENVELOPE`` the size cap, in bytes, of a whole envelope of
that kind, checked before anything is parsed.

Times are absolute milliseconds on the sender's clock. Ids and keys are raw
bytes; peer ids are the 64-char hex of an Ed25519 key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

QUERY_ID_LEN = 16
KEY_LEN = 32
DIGEST_LEN = 32
MAX_K = 64
MAX_CLASSES = 1000
MAX_INPUT_DIM = 65_536
MAX_VECTOR_LEN = 4096
# The wire carries ints as msgpack (at most uint64): 2**64 - 1 wei is ~18.4 ETH.
MAX_PRICE_WEI = (1 << 64) - 1


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


_FIELD_TYPES: dict[type, tuple[tuple[str, Any], ...]] = {}


def _field_types(cls: type) -> tuple[tuple[str, Any], ...]:
    spec = _FIELD_TYPES.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        spec = _FIELD_TYPES[cls] = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
    return spec


def _has_type(value: object, tp: Any) -> bool:
    """``value`` is of wire type ``tp``: no bool for an int, no int for a float, ..."""
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return type(value) is bool
    if tp in (float, str, bytes):
        return isinstance(value, tp)
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        return isinstance(value, tuple) and all(_has_type(v, item_tp) for v in value)
    return isinstance(value, tp)


def _typed(obj: object) -> None:
    for name, tp in _field_types(type(obj)):
        _require(_has_type(getattr(obj, name), tp), f"{name} has the wrong type")


def _is_peer_id(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _query_id(value: bytes) -> None:
    _require(len(value) == QUERY_ID_LEN, f"query_id must be {QUERY_ID_LEN} bytes")


def _name(value: str, what: str, max_len: int = 64) -> None:
    ok = 0 < len(value) <= max_len and value.isascii() and value.isprintable()
    _require(ok and " " not in value and "/" not in value, f"{what} must be a short ASCII token")


def _nonneg(value: int, what: str, upper: int = 1 << 63) -> None:
    _require(0 <= value <= upper, f"{what} out of range")


def _prob(value: float, what: str, upper: float) -> None:
    _require(math.isfinite(value) and 0.0 <= value <= upper, f"{what} out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCard:
    """What a peer's model does, as published in its announcements."""

    task: str
    n_classes: int
    input_dim: int
    arch: str
    model_hash: bytes
    rules: tuple[str, ...]

    def __post_init__(self) -> None:
        _typed(self)
        _name(self.task, "task")
        _name(self.arch, "arch")
        _require(2 <= self.n_classes <= MAX_CLASSES, "n_classes out of range")
        _require(1 <= self.input_dim <= MAX_INPUT_DIM, "input_dim out of range")
        _require(len(self.model_hash) == DIGEST_LEN, "model_hash must be 32 bytes")
        _require(0 < len(self.rules) <= 16, "rules: 1 to 16 entries")
        for rule in self.rules:
            _name(rule, "rule", 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class Announce:
    """Gossiped every few seconds on ``fi/<net>/peers``: who I am and what I sell."""

    KIND: ClassVar[str] = "announce"
    MAX_ENVELOPE: ClassVar[int] = 8 * 1024

    seq: int
    addresses: tuple[str, ...]
    box_key: bytes
    eth_address: str
    card: ModelCard
    price_wei: int
    capacity: int

    def __post_init__(self) -> None:
        _typed(self)
        _nonneg(self.seq, "seq")
        _require(len(self.addresses) <= 16, "at most 16 addresses")
        for addr in self.addresses:
            _require(0 < len(addr) <= 256 and addr.isascii(), "bad address")
        _require(len(self.box_key) == KEY_LEN, "box_key must be 32 bytes")
        eth = self.eth_address
        _require(eth == "" or (len(eth) == 42 and eth.startswith("0x")), "bad eth_address")
        _nonneg(self.price_wei, "price_wei", MAX_PRICE_WEI)
        _require(0 <= self.capacity <= 1_000_000, "capacity out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryRequest:
    """Gossiped on ``fi/<net>/q/<task>``. Carries no input."""

    KIND: ClassVar[str] = "query_request"
    MAX_ENVELOPE: ClassVar[int] = 2 * 1024

    query_id: bytes
    task: str
    n_classes: int
    input_dim: int
    rule: str
    vector_len: int
    k: int
    max_price_wei: int
    deadline_ms: int
    reply_key: bytes
    epsilon: float = 0.0
    delta: float = 0.0

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _name(self.task, "task")
        _name(self.rule, "rule", 32)
        _require(2 <= self.n_classes <= MAX_CLASSES, "n_classes out of range")
        _require(1 <= self.input_dim <= MAX_INPUT_DIM, "input_dim out of range")
        _require(1 <= self.vector_len <= MAX_VECTOR_LEN, "vector_len out of range")
        _require(1 <= self.k <= MAX_K, f"k must be 1..{MAX_K}")
        _nonneg(self.max_price_wei, "max_price_wei", MAX_PRICE_WEI)
        _nonneg(self.deadline_ms, "deadline_ms")
        _require(len(self.reply_key) == KEY_LEN, "reply_key must be 32 bytes")
        _prob(self.epsilon, "epsilon", 1e6)
        _prob(self.delta, "delta", 1.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """Member -> querier (direct): I will answer at this price."""

    KIND: ClassVar[str] = "offer"
    MAX_ENVELOPE: ClassVar[int] = 1024

    query_id: bytes
    price_wei: int
    box_key: bytes
    expected_latency_ms: int

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _nonneg(self.price_wei, "price_wei", MAX_PRICE_WEI)
        _require(len(self.box_key) == KEY_LEN, "box_key must be 32 bytes")
        _nonneg(self.expected_latency_ms, "expected_latency_ms", 3_600_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    peer_id: str
    box_key: bytes

    def __post_init__(self) -> None:
        _typed(self)
        _require(_is_peer_id(self.peer_id), "bad peer id")
        _require(len(self.box_key) == KEY_LEN, "box_key must be 32 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Accept:
    """Querier -> member (direct): you are in the committee; here is your sealed input."""

    KIND: ClassVar[str] = "accept"
    MAX_ENVELOPE: ClassVar[int] = 512 * 1024

    query_id: bytes
    committee: tuple[Member, ...]
    threshold: int
    price_wei: int
    answer_deadline_ms: int
    escrow_ref: bytes
    noise_sigma: float
    sealed_input: bytes

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        n = len(self.committee)
        _require(1 <= n <= MAX_K, f"committee size must be 1..{MAX_K}")
        _require(len({m.peer_id for m in self.committee}) == n, "duplicate committee member")
        _require(1 <= self.threshold <= n, "threshold must be 1..committee size")
        _nonneg(self.price_wei, "price_wei", MAX_PRICE_WEI)
        _nonneg(self.answer_deadline_ms, "answer_deadline_ms")
        _require(len(self.escrow_ref) <= 64, "escrow_ref too long")
        _prob(self.noise_sigma, "noise_sigma", 1e9)
        _require(0 < len(self.sealed_input) <= 4 * MAX_INPUT_DIM + 256, "sealed_input size")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decline:
    """Member -> querier: I will not (or can no longer) answer this query."""

    KIND: ClassVar[str] = "decline"
    MAX_ENVELOPE: ClassVar[int] = 1024

    query_id: bytes
    reason: str

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _name(self.reason, "reason")


@dataclass(frozen=True, slots=True, kw_only=True)
class Share:
    """Member -> querier: my (fixed-point, later masked) contribution vector."""

    KIND: ClassVar[str] = "share"
    MAX_ENVELOPE: ClassVar[int] = 8 * MAX_VECTOR_LEN + 1024

    query_id: bytes
    vector: bytes
    commitment: bytes

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _require(0 < len(self.vector) <= 8 * MAX_VECTOR_LEN, "vector size out of range")
        _require(len(self.vector) % 8 == 0, "vector must be whole 64-bit words")
        _require(len(self.commitment) in (0, DIGEST_LEN), "commitment must be empty or 32 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """Querier -> member: I received your share (the member's proof of delivery)."""

    KIND: ClassVar[str] = "receipt"
    MAX_ENVELOPE: ClassVar[int] = 1024

    query_id: bytes
    member: str
    share_digest: bytes
    price_wei: int

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _require(_is_peer_id(self.member), "bad member peer id")
        _require(len(self.share_digest) == DIGEST_LEN, "share_digest must be 32 bytes")
        _nonneg(self.price_wei, "price_wei", MAX_PRICE_WEI)


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """Querier -> committee: the query is over (answered or failed, and why)."""

    KIND: ClassVar[str] = "result"
    MAX_ENVELOPE: ClassVar[int] = 8 * 1024

    query_id: bytes
    ok: bool
    contributors: tuple[str, ...] = field(default=())
    reason: str = "ok"

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _require(len(self.contributors) <= MAX_K, "too many contributors")
        _require(all(_is_peer_id(p) for p in self.contributors), "bad contributor id")
        _name(self.reason, "reason")


Message = Announce | QueryRequest | Offer | Accept | Decline | Share | Receipt | Result

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (Announce, QueryRequest, Offer, Accept, Decline, Share, Receipt, Result)
}
MAX_ENVELOPE_BYTES = max(cls.MAX_ENVELOPE for cls in MESSAGE_TYPES.values())
