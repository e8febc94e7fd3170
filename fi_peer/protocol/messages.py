"""Typed messages of the query flow (see DESIGN.md, "One query, step by step").

Every message is a frozen dataclass validated in ``__post_init__``: an invalid
message cannot be constructed, so one that decodes is one the state machines
may trust structurally (not semantically: that is their job). ``KIND`` is the
envelope kind; ``MAX_ENVELOPE`` the size cap, in bytes, of a whole envelope of
that kind, checked before anything is parsed.

Times are absolute milliseconds on the sender's clock. Ids and keys are raw
bytes; peer ids are the 64-char hex of an Ed25519 key.

Secure aggregation (fi_peer.privacy.secagg) adds four kinds to the flow of
DESIGN.md steps 4-7: ``KeyShares`` (member -> querier: Shamir shares of its
self-mask seed, encrypted to each other member), ``KeyRelay`` (querier ->
member: U1 and the ciphertexts addressed to it), ``Unmask`` (querier ->
survivor: who survived, who dropped) and ``Reveal`` (survivor -> querier: the
seed shares and pair seeds that request asks for). Members are named by their
index in the Accept's committee. The ``mask_key`` fields of Offer and Member
carry the member's fresh 32-byte per-query mask nonce (no longer an X25519
key: see secagg's "Deviation from DESIGN.md"); the name is kept on the wire.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, ClassVar

from fi_peer.privacy.secagg import CIPHERTEXT_LEN, COMMIT_LEN, SEED_LEN, TAG_LEN
from fi_peer.privacy.shamir import SHARE_LEN
from fi_peer.protocol.codec import types_checked
from fi_peer.protocol.he_messages import HE_MESSAGE_TYPES, HEMessage
from fi_peer.protocol.payment import SIGNATURE_LEN, is_eth_address

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


TypeCheck = Callable[[object], bool]


def _type_check(tp: Any) -> TypeCheck:
    """A predicate: ``value`` is of wire type ``tp`` (no bool for an int, no int
    for a float, ...). Built once per field."""
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if tp is bool:
        return lambda v: type(v) is bool
    if tp in (float, str, bytes):
        return lambda v: isinstance(v, tp)
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        if item_tp in (str, bytes) or (isinstance(item_tp, type) and item_tp not in (int, bool)):
            # isinstance per item, in C (no Python-level generator)
            return lambda v: isinstance(v, tuple) and all(map(isinstance, v, repeat(item_tp)))
        item = _type_check(item_tp)
        return lambda v: isinstance(v, tuple) and all(item(i) for i in v)
    return lambda v: isinstance(v, tp)


_FIELD_CHECKS: dict[type, tuple[tuple[str, TypeCheck], ...]] = {}


def _field_checks(cls: type) -> tuple[tuple[str, TypeCheck], ...]:
    spec = _FIELD_CHECKS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        spec = _FIELD_CHECKS[cls] = tuple(
            (f.name, _type_check(hints[f.name])) for f in dataclasses.fields(cls)
        )
    return spec


def _typed(obj: object) -> None:
    """Every field has its wire type. Skipped for an object the codec is decoding:
    its typed decoders checked exactly that already (stricter: bounds, finiteness)."""
    if types_checked():
        return
    for name, check in _field_checks(type(obj)):
        if not check(getattr(obj, name)):
            raise ValueError(f"{name} has the wrong type")


_PEER_ID = re.compile(r"[0-9a-f]{64}")


def _is_peer_id(value: str) -> bool:
    return _PEER_ID.fullmatch(value) is not None


def _query_id(value: bytes) -> None:
    if len(value) != QUERY_ID_LEN:
        raise ValueError(f"query_id must be {QUERY_ID_LEN} bytes")


def _name(value: str, what: str, max_len: int = 64) -> None:
    ok = 0 < len(value) <= max_len and value.isascii() and value.isprintable()
    if not (ok and " " not in value and "/" not in value):
        raise ValueError(f"{what} must be a short ASCII token")


def _nonneg(value: int, what: str, upper: int = 1 << 63) -> None:
    if not (0 <= value <= upper):
        raise ValueError(f"{what} out of range")


def _prob(value: float, what: str, upper: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= upper):
        raise ValueError(f"{what} out of range")


def _eth(value: str, what: str) -> None:
    """An Ethereum address (0x + 40 hex digits), or empty when there is no chain."""
    _require(value == "" or is_eth_address(value), f"bad {what}")


def _mask_key(value: bytes) -> None:
    _require(len(value) in (0, KEY_LEN), "mask_key must be empty (plaintext mode) or 32 bytes")


def _indices(value: tuple[int, ...], what: str, min_items: int = 0) -> None:
    """Committee indices: sorted, distinct, each in 0..MAX_K-1."""
    ok = list(value) == sorted(set(value)) and all(0 <= i < MAX_K for i in value)
    if not (ok and min_items <= len(value) <= MAX_K):
        raise ValueError(f"{what}: sorted distinct indices")


def _blobs(value: tuple[bytes, ...], size: int, what: str) -> None:
    if len(value) > MAX_K:
        raise ValueError(f"{what}: too many items")
    if value and set(map(len, value)) != {size}:
        raise ValueError(f"{what}: items must be {size} bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCard:
    """What a peer's model does, as published in its announcements."""

    task: str
    n_classes: int
    input_dim: int
    arch: str
    model_hash: bytes
    rules: tuple[str, ...]
    # Serves the homomorphic (CKKS) input-private mode (he_messages.py).
    he: bool = False

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
    # True: the answer is securely aggregated (the default, and all a member allows
    # unless its owner opts in to plaintext sums).
    secagg: bool = True

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _name(self.task, "task")
        _name(self.rule, "rule", 32)
        _require(2 <= self.n_classes <= MAX_CLASSES, "n_classes out of range")
        _require(1 <= self.input_dim <= MAX_INPUT_DIM, "input_dim out of range")
        _require(1 <= self.vector_len <= MAX_VECTOR_LEN, "vector_len out of range")
        if not (1 <= self.k <= MAX_K):
            raise ValueError(f"k must be 1..{MAX_K}")
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
    # this query's mask nonce (secure aggregation, secagg.mask_nonce); empty in plaintext mode
    mask_key: bytes = b""
    # the account this member is paid to (empty when it is not paid on chain)
    eth_address: str = ""

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _nonneg(self.price_wei, "price_wei", MAX_PRICE_WEI)
        _require(len(self.box_key) == KEY_LEN, "box_key must be 32 bytes")
        _nonneg(self.expected_latency_ms, "expected_latency_ms", 3_600_000)
        _mask_key(self.mask_key)
        _eth(self.eth_address, "eth_address")


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    peer_id: str
    box_key: bytes
    mask_key: bytes = b""
    eth_address: str = ""  # from the member's Offer (empty: unpaid query)

    def __post_init__(self) -> None:
        _typed(self)
        _require(_is_peer_id(self.peer_id), "bad peer id")
        _require(len(self.box_key) == KEY_LEN, "box_key must be 32 bytes")
        _mask_key(self.mask_key)
        _eth(self.eth_address, "eth_address")


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
    # Paid queries: the querier's account and the escrow's on-chain deadline (unix
    # seconds); with the committee's addresses and the price, the escrow's terms.
    querier_eth: str = ""
    escrow_deadline_s: int = 0

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        n = len(self.committee)
        if not (1 <= n <= MAX_K):
            raise ValueError(f"committee size must be 1..{MAX_K}")
        _require(len({m.peer_id for m in self.committee}) == n, "duplicate committee member")
        masked = {len(m.mask_key) > 0 for m in self.committee}
        _require(len(masked) == 1, "mask keys for every member or for none")
        _require(1 <= self.threshold <= n, "threshold must be 1..committee size")
        _nonneg(self.price_wei, "price_wei", MAX_PRICE_WEI)
        _nonneg(self.answer_deadline_ms, "answer_deadline_ms")
        _require(len(self.escrow_ref) <= 64, "escrow_ref too long")
        _prob(self.noise_sigma, "noise_sigma", 1e9)
        _require(0 < len(self.sealed_input) <= 4 * MAX_INPUT_DIM + 256, "sealed_input size")
        _eth(self.querier_eth, "querier_eth")
        _nonneg(self.escrow_deadline_s, "escrow_deadline_s")
        paid = {m.eth_address != "" for m in self.committee} | {self.querier_eth != ""}
        _require(len(paid) == 1, "addresses for the querier and every member, or for none")
        _require((self.querier_eth != "") == (self.escrow_deadline_s > 0), "escrow deadline")


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
class KeyShares:
    """Member -> querier, right after Accept: Shamir shares of my self-mask seed,
    one ciphertext per other committee member (committee order, me skipped),
    each sealed to that member; and my commitment to the seed."""

    KIND: ClassVar[str] = "key_shares"
    MAX_ENVELOPE: ClassVar[int] = MAX_K * (CIPHERTEXT_LEN + 3) + 1024

    query_id: bytes
    ciphertexts: tuple[bytes, ...]
    commitment: bytes

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _require(len(self.ciphertexts) < MAX_K, "too many ciphertexts")
        _blobs(self.ciphertexts, CIPHERTEXT_LEN, "ciphertexts")
        _require(len(self.commitment) == COMMIT_LEN, "commitment must be 32 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRelay:
    """Querier -> member: U1 (the members whose key shares arrived, as committee
    indices) and the ciphertexts they addressed to this member (U1 order, the
    recipient skipped)."""

    KIND: ClassVar[str] = "key_relay"
    MAX_ENVELOPE: ClassVar[int] = MAX_K * (CIPHERTEXT_LEN + 5) + 1024

    query_id: bytes
    u1: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _indices(self.u1, "u1", min_items=1)
        _blobs(self.ciphertexts, CIPHERTEXT_LEN, "ciphertexts")
        _require(len(self.ciphertexts) == len(self.u1) - 1, "one ciphertext per other member")


@dataclass(frozen=True, slots=True, kw_only=True)
class Share:
    """Member -> querier: my contribution vector (fixed point; masked under secure
    aggregation, with one view tag per other member of U1, in U1 order)."""

    KIND: ClassVar[str] = "share"
    MAX_ENVELOPE: ClassVar[int] = 8 * MAX_VECTOR_LEN + MAX_K * (TAG_LEN + 2) + 1024

    query_id: bytes
    vector: bytes
    # Hash commitment to the noisy vector before masking (fi_peer.protocol.audit).
    commitment: bytes
    view_tags: tuple[bytes, ...] = ()
    # Paid queries: the member's EIP-712 signature of (querier, query id, commitment)
    # with its registered account (what PeerRegistry.reportEquivocation checks).
    commitment_sig: bytes = b""

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _require(0 < len(self.vector) <= 8 * MAX_VECTOR_LEN, "vector size out of range")
        _require(len(self.vector) % 8 == 0, "vector must be whole 64-bit words")
        _require(len(self.commitment) in (0, DIGEST_LEN), "commitment must be empty or 32 bytes")
        _require(len(self.view_tags) < MAX_K, "too many view tags")
        _blobs(self.view_tags, TAG_LEN, "view_tags")
        _require(len(self.commitment_sig) in (0, SIGNATURE_LEN), "commitment_sig: 0 or 65 bytes")
        _require(bool(self.commitment) or not self.commitment_sig, "signature, no commitment")


@dataclass(frozen=True, slots=True, kw_only=True)
class Unmask:
    """Querier -> each survivor: reveal your shares of the self-mask seeds of
    ``survivors`` and your pair seeds with ``dropped`` (disjoint; together U1).
    ``view_tags``: each other survivor's view tag for the recipient, in
    ``survivors`` order."""

    KIND: ClassVar[str] = "unmask"
    MAX_ENVELOPE: ClassVar[int] = MAX_K * (TAG_LEN + 4) + 1024

    query_id: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    view_tags: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _indices(self.survivors, "survivors", min_items=1)
        _indices(self.dropped, "dropped")
        _require(not set(self.survivors) & set(self.dropped), "survivor and dropped at once")
        _require(len(self.survivors) + len(self.dropped) <= MAX_K, "too many members")
        _blobs(self.view_tags, TAG_LEN, "view_tags")
        _require(len(self.view_tags) == len(self.survivors) - 1, "one tag per other survivor")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reveal:
    """Survivor -> querier: what an Unmask asked for, in its order: shares of the
    survivors' self-mask seeds, and this survivor's pair seeds with the dropped."""

    KIND: ClassVar[str] = "reveal"
    MAX_ENVELOPE: ClassVar[int] = MAX_K * (SHARE_LEN + 2) + 1024

    query_id: bytes
    seed_shares: tuple[bytes, ...]
    pair_seeds: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _blobs(self.seed_shares, SHARE_LEN, "seed_shares")
        _blobs(self.pair_seeds, SEED_LEN, "pair_seeds")
        _require(len(self.seed_shares) >= 1, "a survivor reveals at least its own seed share")
        _require(len(self.seed_shares) + len(self.pair_seeds) <= MAX_K, "too many shares")


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """Querier -> member: I received your share (the member's proof of delivery)."""

    KIND: ClassVar[str] = "receipt"
    MAX_ENVELOPE: ClassVar[int] = 1024

    query_id: bytes
    member: str
    share_digest: bytes
    price_wei: int
    # The querier's EIP-712 signature over (query id, member's address, price):
    # what the member claims with on chain. Empty for an unpaid query.
    payment_sig: bytes = b""

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        _require(_is_peer_id(self.member), "bad member peer id")
        _require(len(self.share_digest) == DIGEST_LEN, "share_digest must be 32 bytes")
        _nonneg(self.price_wei, "price_wei", MAX_PRICE_WEI)
        _require(len(self.payment_sig) in (0, SIGNATURE_LEN), "payment_sig must be 0 or 65 bytes")


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


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenRequest:
    """Querier -> member, after the answer: open your commitment for this query
    (an audit; see fi_peer.protocol.audit)."""

    KIND: ClassVar[str] = "open_request"
    MAX_ENVELOPE: ClassVar[int] = 1024

    query_id: bytes

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Opening:
    """Member -> querier: the noisy vector and nonce my Share committed to, or
    (both empty) why I refuse to open (``refused``)."""

    KIND: ClassVar[str] = "opening"
    MAX_ENVELOPE: ClassVar[int] = 8 * MAX_VECTOR_LEN + 1024

    query_id: bytes
    vector: bytes = b""
    nonce: bytes = b""
    refused: str = ""

    def __post_init__(self) -> None:
        _typed(self)
        _query_id(self.query_id)
        if self.refused:
            _name(self.refused, "refused")
            _require(not self.vector and not self.nonce, "a refusal carries no vector")
        else:
            _require(0 < len(self.vector) <= 8 * MAX_VECTOR_LEN, "vector size out of range")
            _require(len(self.vector) % 8 == 0, "vector must be whole 64-bit words")
            _require(len(self.nonce) == DIGEST_LEN, "nonce must be 32 bytes")


Message = (
    Announce
    | QueryRequest
    | Offer
    | Accept
    | Decline
    | KeyShares
    | KeyRelay
    | Share
    | Unmask
    | Reveal
    | Receipt
    | Result
    | OpenRequest
    | Opening
    | HEMessage
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Announce,
        QueryRequest,
        Offer,
        Accept,
        Decline,
        KeyShares,
        KeyRelay,
        Share,
        Unmask,
        Reveal,
        Receipt,
        Result,
        OpenRequest,
        Opening,
        *HE_MESSAGE_TYPES,
    )
}
MAX_ENVELOPE_BYTES = max(cls.MAX_ENVELOPE for cls in MESSAGE_TYPES.values())
