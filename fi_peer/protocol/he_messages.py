"""Messages of the homomorphic (CKKS) query mode (issue 11; docs/he.md).

The flow, beside the default one of messages.py (Decline, Receipt and Result
are reused as they are)::

    querier --HERequest (gossip: no input, the context digest)--> every peer
    member  --HEOffer (price, has_context)-----------------------> querier
    querier --HEContextChunk x n (only if not has_context)-------> member
    member  --HEContextAck per chunk (the querier sends the next)-> querier
    querier --HEAccept (committee, t, noise, the ciphertext)-----> member
    member  --HEReady (evaluated, noised inside, charged)--------> querier
    querier --HERoute (the live members)-------------------------> each live member
    member  --HEPartial (sum over its subtree)-------------------> its parent member
    root    --HEPartial (sum over >= t members)------------------> querier
    querier --Receipt (per member in the sum), Result------------> members

Batched (support rule, no DP, 5..4,096 inputs): HEAccept and HEPartial carry no
inline blob but its digest and size; the bytes follow as HEBlobChunks, each
acknowledged (HEBlobAck) so that at most HE_BLOB_WINDOW are in flight.

No message carries anything the querier could decrypt per member: a member's
answer exists only inside partial sums that travel among members, and the
querier gets exactly one, over at least ``t`` members. Every size cap keeps an
envelope under 512 KiB (libp2p direct messages are at most 960 KiB).

This module imports nothing from messages.py (messages.py registers these
kinds), hence its own small validators.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from fi_peer.protocol.messages import QueryRequest

HE_QUERY_ID_LEN = 16
HE_KEY_LEN = 32
HE_MAX_K = 64
HE_MAX_INPUTS = 1
"""Inputs per HE query on the wire: one single-layout ciphertext (~430 KB)."""
HE_MAX_BLOB = 480 * 1024
HE_CHUNK_BYTES = 448 * 1024
"""Public-context chunk payload: a chunk envelope stays below 512 KiB."""
HE_MAX_CHUNKS = 72
"""A context of at most 72 x 448 KiB = 31.5 MiB (he.MAX_CONTEXT_BYTES is 32 MiB; the
single layout's context is ~12 MB): what a member may be asked to buffer per querier."""
HE_CONTEXT_WINDOW = 4
"""Chunks of a context in flight per member: the querier sends the next one when
the member acknowledges one (HEContextAck), so no chunk waits long in a
transport's buffers (chunks are sealed when they leave, and a chunk older than
the replay window is refused)."""
HE_LAYOUTS = ("single", "batched")
HE_ENVELOPE = 512 * 1024
HE_BATCH_MIN = 5
"""From this many inputs a query may use the batched layout (fi_peer.privacy.he.BATCH_THRESHOLD)."""
HE_MAX_BATCH = 4096
"""Inputs of one batched query: one per CKKS slot."""
HE_BATCH_RULES = ("support",)
"""Rules the batched layout computes: the network vector. The kernel evidence (the
DP-bounded ``evidence`` rule) is single-layout only (its outer-product encoding
fills all 4,096 slots with one input), so an ``evidence`` query never travels
batched: the querier sends it as single queries (docs/he.md, Batched queries)."""
HE_MAX_BLOB_CHUNKS = 72
"""A chunked ciphertext (batched request or answer) is at most 72 x 448 KiB = 31.5 MiB;
each receiver caps it lower from the request (input width, vector length)."""
HE_BLOB_WINDOW = 4
"""Chunks of a chunked ciphertext in flight per receiver (HEBlobAck releases the next)."""
HE_CARD_RULE_PREFIX = "he:"
"""A ModelCard rule ``he:<rule>`` says the peer serves ``<rule>`` in the HE mode. A card
with ``he`` set and no such entry is an older peer's: it may serve any HE rule (and
decline the ones it lacks). Carried in the existing ``rules`` field, so the announcement's
wire format is unchanged (older peers decode it and ignore the extra names)."""


def he_card_rules(rules: tuple[str, ...]) -> tuple[str, ...] | None:
    """The HE rules a card's ``rules`` announce; None: not announced (any rule)."""
    out = tuple(r[len(HE_CARD_RULE_PREFIX) :] for r in rules if r.startswith(HE_CARD_RULE_PREFIX))
    return out or None


def he_card_tags(rules: tuple[str, ...]) -> tuple[str, ...]:
    """The card entries announcing the HE ``rules`` a peer serves."""
    return tuple(HE_CARD_RULE_PREFIX + r for r in rules)


_HEX64 = re.compile(r"[0-9a-f]{64}")
_ETH = re.compile(r"0x[0-9a-fA-F]{40}")


def _req(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _int(value: object, what: str, lo: int = 0, hi: int = 1 << 63) -> None:
    _req(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        f"{what} out of range",
    )


def _float(value: object, what: str, hi: float) -> None:
    _req(
        isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= hi,
        f"{what} out of range",
    )


def _bytes(value: object, what: str, lo: int, hi: int) -> None:
    _req(isinstance(value, bytes) and lo <= len(value) <= hi, f"{what} has a bad size")


def _token(value: object, what: str, max_len: int = 64) -> None:
    _req(isinstance(value, str), f"bad {what}")
    assert isinstance(value, str)
    ok = 0 < len(value) <= max_len and value.isascii() and value.isprintable()
    _req(ok and " " not in value and "/" not in value, f"bad {what}")


def _peer(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _eth(value: object, what: str) -> None:
    ok = isinstance(value, str) and (value == "" or _ETH.fullmatch(value) is not None)
    _req(ok, f"bad {what}")


def _digest(value: object) -> None:
    _req(isinstance(value, str) and _HEX64.fullmatch(value) is not None, "bad context digest")


def _peers(value: object, what: str, min_items: int = 1) -> None:
    _req(isinstance(value, tuple), f"{what} must be a tuple")
    assert isinstance(value, tuple)
    _req(min_items <= len(value) <= HE_MAX_K, f"{what}: 1..{HE_MAX_K} peers")
    _req(all(_peer(p) for p in value), f"{what}: bad peer id")
    _req(len(set(value)) == len(value), f"{what}: duplicate peer")


def _inline_or_chunked(blobs: object, digest: str, size: int) -> None:
    """Single: the ciphertexts inline. Batched: none inline, a digest and a size."""
    if digest == "":
        _req(size == 0, "blob_bytes without blob_digest")
        _blobs(blobs, "blobs", HE_MAX_INPUTS, HE_MAX_BLOB)
    else:
        _digest(digest)
        _req(blobs == (), "chunked ciphertexts carry no inline blobs")
        _int(size, "blob_bytes", 1, HE_MAX_BLOB_CHUNKS * HE_CHUNK_BYTES)


def _blobs(value: object, what: str, n_max: int, total: int) -> None:
    _req(isinstance(value, tuple) and 1 <= len(value) <= n_max, f"{what}: 1..{n_max} blobs")
    assert isinstance(value, tuple)
    _req(all(isinstance(b, bytes) and len(b) > 0 for b in value), f"{what}: empty blob")
    _req(sum(len(b) for b in value) <= total, f"{what} too large")


@dataclass(frozen=True, slots=True, kw_only=True)
class HERequest:
    """Gossiped on the task's query topic, like QueryRequest: no input, only the
    digest of the querier's public CKKS context (members say whether they hold it)."""

    KIND: ClassVar[str] = "he_request"
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
    epsilon: float
    delta: float
    context_digest: str
    n_inputs: int
    layout: str

    def __post_init__(self) -> None:
        _bytes(self.query_id, "query_id", HE_QUERY_ID_LEN, HE_QUERY_ID_LEN)
        _token(self.task, "task")
        _token(self.rule, "rule", 32)
        _int(self.n_classes, "n_classes", 2, 1000)
        _int(self.input_dim, "input_dim", 1, 128)
        _int(self.vector_len, "vector_len", 1, 64)
        _int(self.k, "k", 1, HE_MAX_K)
        _int(self.max_price_wei, "max_price_wei", 0, (1 << 64) - 1)
        _int(self.deadline_ms, "deadline_ms")
        _bytes(self.reply_key, "reply_key", HE_KEY_LEN, HE_KEY_LEN)
        _float(self.epsilon, "epsilon", 1e6)
        _float(self.delta, "delta", 1.0)
        _digest(self.context_digest)
        _req(self.layout in HE_LAYOUTS, "unsupported layout")
        if self.layout == "single":
            _int(self.n_inputs, "n_inputs", 1, HE_MAX_INPUTS)
        else:
            # Batched: the network vector only, without DP (its sensitivity is unbounded,
            # and one batch is n + 1 releases: docs/he.md). DP queries go single.
            _int(self.n_inputs, "n_inputs", HE_BATCH_MIN, HE_MAX_BATCH)
            _req(self.rule in HE_BATCH_RULES, "the batched layout serves the support rule only")
            _req(self.epsilon == 0.0 and self.delta == 0.0, "batched queries carry no DP noise")

    @property
    def batched(self) -> bool:
        return self.layout == "batched"

    def as_query_request(self) -> QueryRequest:
        """The equivalent default-mode request (what the privacy guard prices):
        aggregated (``secagg=True``: the querier sees only a sum over >= t)."""
        from fi_peer.protocol.messages import QueryRequest  # here: messages.py imports this module

        return QueryRequest(
            query_id=self.query_id,
            task=self.task,
            n_classes=self.n_classes,
            input_dim=self.input_dim,
            rule=self.rule,
            vector_len=self.vector_len,
            k=self.k,
            max_price_wei=self.max_price_wei,
            deadline_ms=self.deadline_ms,
            reply_key=self.reply_key,
            epsilon=self.epsilon,
            delta=self.delta,
            secagg=True,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HEOffer:
    """Member -> querier: I serve this HE query; ``has_context``: I hold your
    public context already (no chunks needed)."""

    KIND: ClassVar[str] = "he_offer"
    MAX_ENVELOPE: ClassVar[int] = 1024

    query_id: bytes
    price_wei: int
    expected_latency_ms: int
    eth_address: str
    has_context: bool

    def __post_init__(self) -> None:
        _bytes(self.query_id, "query_id", HE_QUERY_ID_LEN, HE_QUERY_ID_LEN)
        _int(self.price_wei, "price_wei", 0, (1 << 64) - 1)
        _int(self.expected_latency_ms, "expected_latency_ms", 0, 3_600_000)
        _eth(self.eth_address, "eth_address")
        _req(type(self.has_context) is bool, "has_context must be a bool")


@dataclass(frozen=True, slots=True, kw_only=True)
class HEContextChunk:
    """Querier -> member: one piece of the querier's public context (no secret key)."""

    KIND: ClassVar[str] = "he_context_chunk"
    MAX_ENVELOPE: ClassVar[int] = HE_ENVELOPE

    digest: str
    index: int
    total: int
    payload: bytes

    def __post_init__(self) -> None:
        _digest(self.digest)
        _int(self.total, "total", 1, HE_MAX_CHUNKS)
        _int(self.index, "index", 0, self.total - 1)
        _bytes(self.payload, "payload", 1, HE_CHUNK_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class HEContextAck:
    """Member -> querier: chunk ``index`` of context ``digest`` arrived (credit-based
    flow control of the transfer: see HE_CONTEXT_WINDOW)."""

    KIND: ClassVar[str] = "he_context_ack"
    MAX_ENVELOPE: ClassVar[int] = 512

    digest: str
    index: int

    def __post_init__(self) -> None:
        _digest(self.digest)
        _int(self.index, "index", 0, HE_MAX_CHUNKS - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class HEAccept:
    """Querier -> member: the committee (its aggregation order is derived from the
    query id, not chosen by the querier), threshold, noise, escrow, and the
    encrypted input."""

    KIND: ClassVar[str] = "he_accept"
    MAX_ENVELOPE: ClassVar[int] = HE_ENVELOPE

    query_id: bytes
    members: tuple[str, ...]
    eth_addresses: tuple[str, ...]
    threshold: int
    fan_in: int
    price_wei: int
    noise_sigma: float
    context_digest: str
    blobs: tuple[bytes, ...]
    querier_eth: str = ""
    escrow_deadline_s: int = 0
    # Batched: ``blobs`` is empty and the ciphertexts follow as HEBlobChunks of this
    # digest (sha256 of pack_blobs) and size.
    blob_digest: str = ""
    blob_bytes: int = 0

    def __post_init__(self) -> None:
        _bytes(self.query_id, "query_id", HE_QUERY_ID_LEN, HE_QUERY_ID_LEN)
        _peers(self.members, "members")
        _req(isinstance(self.eth_addresses, tuple), "eth_addresses must be a tuple")
        _req(len(self.eth_addresses) == len(self.members), "one address per member")
        for eth in self.eth_addresses:
            _eth(eth, "eth address")
        _int(self.threshold, "threshold", 1, len(self.members))
        _int(self.fan_in, "fan_in", 1, HE_MAX_K)
        _int(self.price_wei, "price_wei", 0, (1 << 64) - 1)
        _float(self.noise_sigma, "noise_sigma", 1e9)
        _digest(self.context_digest)
        _inline_or_chunked(self.blobs, self.blob_digest, self.blob_bytes)
        _eth(self.querier_eth, "querier_eth")
        _int(self.escrow_deadline_s, "escrow_deadline_s")
        paid = {e != "" for e in self.eth_addresses} | {self.querier_eth != ""}
        _req(len(paid) == 1, "addresses for the querier and every member, or for none")
        _req((self.querier_eth != "") == (self.escrow_deadline_s > 0), "escrow deadline")


@dataclass(frozen=True, slots=True, kw_only=True)
class HEReady:
    """Member -> querier: my encrypted, noised answer is computed and charged."""

    KIND: ClassVar[str] = "he_ready"
    MAX_ENVELOPE: ClassVar[int] = 512

    query_id: bytes

    def __post_init__(self) -> None:
        _bytes(self.query_id, "query_id", HE_QUERY_ID_LEN, HE_QUERY_ID_LEN)


@dataclass(frozen=True, slots=True, kw_only=True)
class HERoute:
    """Querier -> each live member: who is in the aggregate; each member derives
    its parent and children from the fixed order restricted to ``live``;
    ``hop_ms``: how long a member waits per tree level below it."""

    KIND: ClassVar[str] = "he_route"
    MAX_ENVELOPE: ClassVar[int] = 8 * 1024

    query_id: bytes
    live: tuple[str, ...]
    hop_ms: int

    def __post_init__(self) -> None:
        _bytes(self.query_id, "query_id", HE_QUERY_ID_LEN, HE_QUERY_ID_LEN)
        _peers(self.live, "live")
        _int(self.hop_ms, "hop_ms", 1, 60_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class HEPartial:
    """Member -> its parent (or the root -> the querier): the encrypted sum of the
    answers of ``members`` (sorted) for ``querier``'s query."""

    KIND: ClassVar[str] = "he_partial"
    MAX_ENVELOPE: ClassVar[int] = HE_ENVELOPE

    query_id: bytes
    querier: str
    members: tuple[str, ...]
    blobs: tuple[bytes, ...]
    blob_digest: str = ""  # batched: chunked, as in HEAccept
    blob_bytes: int = 0

    def __post_init__(self) -> None:
        _bytes(self.query_id, "query_id", HE_QUERY_ID_LEN, HE_QUERY_ID_LEN)
        _req(_peer(self.querier), "bad querier id")
        _peers(self.members, "members")
        _req(list(self.members) == sorted(self.members), "members must be sorted")
        _inline_or_chunked(self.blobs, self.blob_digest, self.blob_bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class HEBlobChunk:
    """One piece of a chunked ciphertext of ``querier``'s query ``query_id``: the
    batched request (querier -> member) or a batched partial sum (member -> parent,
    root -> querier). Credit-based like the context (HEBlobAck, HE_BLOB_WINDOW)."""

    KIND: ClassVar[str] = "he_blob_chunk"
    MAX_ENVELOPE: ClassVar[int] = HE_ENVELOPE

    query_id: bytes
    querier: str
    digest: str
    index: int
    total: int
    payload: bytes

    def __post_init__(self) -> None:
        _bytes(self.query_id, "query_id", HE_QUERY_ID_LEN, HE_QUERY_ID_LEN)
        _req(_peer(self.querier), "bad querier id")
        _digest(self.digest)
        _int(self.total, "total", 1, HE_MAX_BLOB_CHUNKS)
        _int(self.index, "index", 0, self.total - 1)
        _bytes(self.payload, "payload", 1, HE_CHUNK_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class HEBlobAck:
    """Receiver -> sender: chunk ``index`` of the chunked ciphertext ``digest`` arrived."""

    KIND: ClassVar[str] = "he_blob_ack"
    MAX_ENVELOPE: ClassVar[int] = 512

    query_id: bytes
    querier: str
    digest: str
    index: int

    def __post_init__(self) -> None:
        _bytes(self.query_id, "query_id", HE_QUERY_ID_LEN, HE_QUERY_ID_LEN)
        _req(_peer(self.querier), "bad querier id")
        _digest(self.digest)
        _int(self.index, "index", 0, HE_MAX_BLOB_CHUNKS - 1)


HEMessage = (
    HERequest
    | HEOffer
    | HEContextChunk
    | HEContextAck
    | HEAccept
    | HEReady
    | HERoute
    | HEPartial
    | HEBlobChunk
    | HEBlobAck
)

HE_MESSAGE_TYPES: tuple[type[HEMessage], ...] = (
    HERequest,
    HEOffer,
    HEContextChunk,
    HEContextAck,
    HEAccept,
    HEReady,
    HERoute,
    HEPartial,
    HEBlobChunk,
    HEBlobAck,
)
