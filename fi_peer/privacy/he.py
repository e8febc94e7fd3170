"""Homomorphic (CKKS) query mode: the querier's input stays encrypted from the members.

Theory of operation
-------------------
The querier owns a CKKS secret key (:func:`create_secret_context`) and sends
each committee member a *public* context (no secret key; with Galois keys for
the single layout, without for the batched one) once, chunked over the direct
channel and cached by the member per querier and digest
(:func:`chunk_context`, :class:`ContextAssembler`, :class:`ContextCache`).
Per query it encrypts its inputs (:func:`encrypt_inputs`). Each member
evaluates its HE-ready model on the ciphertext (:func:`evaluate`), adding its
share of the DP noise *inside* the ciphertext, and the members sum their
ciphertexts among themselves along an aggregation tree
(:class:`AggregationTree`, :func:`contribute`, :func:`combine`,
:func:`finalize`). The querier receives one ciphertext, the sum over at least
``threshold`` members, and decrypts only that (:func:`open_aggregate`).

Parameters (verified at import of a context, measured in notes/he-and-data.md
and benchmarks/he.py): N = 8192, coefficient moduli [60, 40, 40, 40, 38] bits
(218 bits = SEAL's 128-bit bound for N = 8192), scale 2^40. That leaves three
rescalings: linear -> square -> linear, the only supported model family
(:class:`HEModel`), or a single linear layer.

Layouts (:class:`Layout`)
    ``single``: one CKKSVector per input. TenSEAL replicates the vector over
    all 4,096 slots and ``mm`` (rotations, needs Galois keys) keeps the result
    replicated: *every* slot of the answer holds a copy of some output
    coordinate, and a querier with the secret key reads all of them. So
    anything a member adds (bias, noise) must be added to every copy alike:
    the member adds it as a fresh encryption under the public key (TenSEAL
    replicates it the same way), never as a plain list (which reaches only
    the first slots and leaves ~400 noiseless copies). Replication is exact
    only when the input and hidden widths divide 4,096, so the input is
    zero-padded to a power of two and the first bias is *not* folded into W1
    (folding x + [1.0] gives 65 dims, whose wrap-around leaves partial sums in
    the last slots, readable without noise; padding to 128 instead doubles the
    member's time). ``batched``: one CKKSTensor (batch=True) holding up to
    4,096 inputs in the slots; plain multiply-adds, no rotations, no Galois
    keys. Unused slots hold the model's answer at x = 0; the member floods
    them with one extra noise vector, so they are one more noisy release.

Aggregation: why homomorphic summation, not bounded masks
---------------------------------------------------------
(a) *Masks*: each member adds a bounded real mask, zero-sum over the
committee (pairwise, from X25519), and the querier decrypts every answer and
sums. Hiding is only statistical: y + U[-B, B] and y' + U[-B, B] are at
total-variation distance |y - y'| / 2B per coordinate, and B is capped by the
last 60-bit prime (measured in benchmarks/he.py with masks added as
encrypted replicated vectors: +/-1e6 is the largest safe bound in the single
layout, +/-1e7 wraps silently; +/-3e8 in the batched layout, +/-5e8 wraps).
Worse, the querier chooses
x and members cannot check it under encryption: scaling x by 1e3 scales a
square network's output by ~1e6, and then y + mask reveals y. Dropouts need
the whole double-masking machinery (self masks, Shamir shares), because a
querier that claims "j dropped" and collects the survivors' corrections
unmasks j.

(b) *Homomorphic summation among members* (chosen): members add their
ciphertexts under the querier's public key; they hold no secret key, so
passing ciphertexts among them reveals nothing to them (IND-CPA, 128-bit); the
querier gets exactly one ciphertext per query, the sum over the members listed
with it, and :func:`finalize` / :func:`open_aggregate` refuse sums over fewer
than ``threshold`` members. Hiding from the querier is perfect for any x (it
never holds a ciphertext of one member's answer), dropouts cost nothing (a
missing child is simply absent from its parent's sum; a missing inner node's
children go to the nearest live ancestor, :meth:`AggregationTree.parent`), and
no unmasking round is needed. Limits, stated in docs/he.md: a member that
colludes with the querier can hand over what it received from its children
(a partial sum), as all-but-one colluders can in secure aggregation; each
member's DP noise is then what protects the others. The member-to-member hops
must be sealed to the receiving member (not readable by the querier if
relayed), and a member must contribute to one aggregate per query only (two
aggregates over different member sets would differ by one member's answer).

DP noise: each member adds N(0, sigma^2 / t) to its answer inside the
ciphertext (same split as the default mode; ``sigma`` and ``t`` are
parameters), which also floods the CKKS decryption error (~1e-4 against
sigma ~ 1), so the decrypted sum does not expose the members' evaluation noise.

Errors: a peer's undecodable or ill-formed ciphertext or context is
:class:`~fi_peer.errors.MalformedMessage`, an oversized one
:class:`~fi_peer.errors.OversizedMessage` (checked before parsing), a sum the
protocol forbids :class:`~fi_peer.errors.UnexpectedMessage`; an unsupported
model or input :class:`~fi_peer.errors.ModelError`; misuse on this side
:class:`~fi_peer.errors.LocalProtocolError`. TenSEAL's deserialisers crash the
process (segfault) on some malformed bytes (an empty or vector-shaped blob
given to ``ckks_tensor_from``), so every blob is first checked against the
wire format of TenSEAL's protobuf messages here, before TenSEAL sees it.

No I/O, clock or global RNG: randomness comes in as a ``numpy.random.Generator``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal as ts
from tenseal import sealapi

from fi_peer.errors import (
    LocalProtocolError,
    MalformedMessage,
    ModelError,
    OversizedMessage,
    UnexpectedMessage,
)
from fi_peer.privacy.dp import member_noise_std

__all__ = [
    "BATCH_THRESHOLD",
    "COEFF_MOD_BIT_SIZES",
    "DEFAULT_CHUNK_BYTES",
    "MAX_BATCH",
    "MAX_CHUNK_BYTES",
    "MAX_CIPHERTEXT_BYTES",
    "MAX_CONTEXT_BYTES",
    "MAX_HIDDEN_DIM",
    "MAX_INPUT_DIM",
    "MAX_OUTPUT_DIM",
    "MAX_SINGLE_INPUTS",
    "POLY_MODULUS_DEGREE",
    "SCALE_BITS",
    "SLOT_COUNT",
    "AggregationTree",
    "ContextAssembler",
    "ContextCache",
    "ContextChunk",
    "EncryptedOutput",
    "EncryptedQuery",
    "HEModel",
    "Layout",
    "LinearLayer",
    "Partial",
    "PublicContext",
    "SecretContext",
    "add_outputs",
    "build_he_model",
    "choose_layout",
    "chunk_context",
    "combine",
    "context_digest",
    "contribute",
    "create_secret_context",
    "decrypt_outputs",
    "dp_noise_std",
    "encrypt_inputs",
    "evaluate",
    "finalize",
    "load_public_context",
    "open_aggregate",
    "support_model",
]

Array = npt.NDArray[np.float64]

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES: tuple[int, ...] = (60, 40, 40, 40, 38)
SCALE_BITS = 40
SLOT_COUNT = POLY_MODULUS_DEGREE // 2
_SCALE = float(2**SCALE_BITS)
_TOP_LEVEL_PRIMES = len(COEFF_MOD_BIT_SIZES) - 1  # the last prime is SEAL's special prime

MAX_INPUT_DIM = 128
"""Largest input width (after padding to a power of two in the single layout).
The single layout costs one rotation per input dimension (~5 ms each)."""
MAX_HIDDEN_DIM = 128
MAX_OUTPUT_DIM = 64
MAX_BATCH = SLOT_COUNT
BATCH_THRESHOLD = 5
MAX_SINGLE_INPUTS = 16
"""From this many inputs on, one batched ciphertext is cheaper than single vectors."""

MAX_CIPHERTEXT_BYTES = 640 * 1024
"""One serialised SEAL ciphertext at the top level is ~430 KB (compressed)."""
MAX_CONTEXT_BYTES = 64 * 1024 * 1024
"""A public context with Galois keys is ~53 MB, without ~2.6 MB."""
DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024


class Layout(StrEnum):
    SINGLE = "single"
    BATCHED = "batched"


def choose_layout(n_inputs: int) -> Layout:
    """Single vectors below :data:`BATCH_THRESHOLD` inputs, one batched tensor from it on."""
    if not 1 <= n_inputs <= MAX_BATCH:
        raise LocalProtocolError(f"an HE query holds 1..{MAX_BATCH} inputs, got {n_inputs}")
    return Layout.SINGLE if n_inputs < BATCH_THRESHOLD else Layout.BATCHED


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# --------------------------------------------------------------------------- wire checks
# TenSEAL serialises with protobuf (tenseal/proto/*.proto). Its C++ loaders
# crash on some malformed input, so the outer message is parsed here first.

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise MalformedMessage("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _proto_fields(data: bytes) -> dict[int, list[tuple[int, Any]]]:
    """Top-level fields of a protobuf message: number -> [(wire type, value)]."""
    fields: dict[int, list[tuple[int, Any]]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if number == 0:
            raise MalformedMessage("protobuf field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _I64:
            if pos + 8 > len(data):
                raise MalformedMessage("truncated 64-bit field")
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == _LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise MalformedMessage("truncated length-delimited field")
            value, pos = data[pos : pos + length], pos + length
        elif wire == _I32:
            if pos + 4 > len(data):
                raise MalformedMessage("truncated 32-bit field")
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise MalformedMessage(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append((wire, value))
    return fields


def _uint32s(entries: list[tuple[int, Any]]) -> list[int]:
    out: list[int] = []
    for wire, value in entries:
        if wire == _VARINT:
            out.append(value)
        elif wire == _LEN:  # packed
            pos = 0
            while pos < len(value):
                item, pos = _read_varint(value, pos)
                out.append(item)
        else:
            raise MalformedMessage("repeated uint32 field with a wrong wire type")
    if any(v >= 2**32 for v in out):
        raise MalformedMessage("uint32 field out of range")
    return out


def _single(entries: list[tuple[int, Any]] | None, wire: int, what: str) -> Any:
    if not entries:
        return None
    if len(entries) != 1 or entries[0][0] != wire:
        raise MalformedMessage(f"{what}: repeated or wrongly typed field")
    return entries[0][1]


@dataclass(frozen=True, slots=True)
class _CipherFrame:
    """What the outer protobuf of a serialised CKKSVector/CKKSTensor declares."""

    shape: tuple[int, ...]
    n_ciphertexts: int
    batch_size: int


def _check_frame(data: bytes, *, tensor: bool, max_ciphertexts: int) -> _CipherFrame:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage("ciphertext is not bytes")
    data = bytes(data)
    cap = max_ciphertexts * MAX_CIPHERTEXT_BYTES
    if len(data) > cap:
        raise OversizedMessage(f"ciphertext blob of {len(data)} bytes exceeds {cap}")
    if not data:
        raise MalformedMessage("empty ciphertext blob")
    fields = _proto_fields(data)
    allowed = {1, 2, 3, 4} if tensor else {1, 2, 3}
    if set(fields) - allowed:
        raise MalformedMessage(f"unexpected fields {sorted(set(fields) - allowed)} in ciphertext")
    shape = tuple(_uint32s(fields.get(1, [])))
    cts = fields.get(2, [])
    if any(wire != _LEN or not value for wire, value in cts):
        raise MalformedMessage("empty or wrongly typed ciphertext entry")
    if any(len(value) > MAX_CIPHERTEXT_BYTES for _, value in cts):
        raise OversizedMessage("one ciphertext exceeds the per-ciphertext cap")
    raw_scale = _single(fields.get(3), _I64, "scale")
    scale = struct.unpack("<d", raw_scale)[0] if raw_scale is not None else 0.0
    if scale != _SCALE:
        raise MalformedMessage(f"ciphertext scale {scale!r} is not 2^{SCALE_BITS}")
    batch = _single(fields.get(4), _VARINT, "batch_size") if tensor else None
    if tensor:
        if len(shape) != 2 or shape[0] != 1 or not 1 <= shape[1] <= max_ciphertexts:
            raise MalformedMessage(f"batched tensor must have shape [1, d], got {list(shape)}")
        if len(cts) != shape[1]:
            raise MalformedMessage("tensor shape does not match its number of ciphertexts")
        if batch is None or not 1 <= batch <= MAX_BATCH:
            raise MalformedMessage(f"batch size must lie in 1..{MAX_BATCH}")
    else:
        if len(shape) != 1 or not 1 <= shape[0] <= SLOT_COUNT or len(cts) != 1:
            raise MalformedMessage("a vector holds one ciphertext of 1..4096 values")
    return _CipherFrame(shape=shape, n_ciphertexts=len(cts), batch_size=int(batch or 0))


# --------------------------------------------------------------------------- contexts


def context_digest(data: bytes) -> str:
    """sha256 (hex) of a serialised public context: the cache key per querier."""
    return hashlib.sha256(data).hexdigest()


def _check_params(ctx: Any) -> None:
    """Raise MalformedMessage unless ``ctx`` uses exactly this module's parameters."""
    try:
        parms = ctx.seal_context().data.key_context_data().parms()
        degree = parms.poly_modulus_degree()
        bits = tuple(q.bit_count() for q in parms.coeff_modulus())
        scheme = parms.scheme()
        scale = ctx.global_scale
    except (ValueError, RuntimeError, AttributeError) as exc:
        raise MalformedMessage(f"unreadable HE context parameters: {exc}") from exc
    if int(scheme) != int(sealapi.SCHEME_TYPE.CKKS):
        raise MalformedMessage("HE context is not CKKS")
    if degree != POLY_MODULUS_DEGREE or bits != COEFF_MOD_BIT_SIZES:
        raise MalformedMessage(
            f"HE context has N={degree}, moduli {list(bits)}; expected "
            f"N={POLY_MODULUS_DEGREE}, {list(COEFF_MOD_BIT_SIZES)}"
        )
    if scale != _SCALE:
        raise MalformedMessage(f"HE context scale {scale!r} is not 2^{SCALE_BITS}")


@dataclass(frozen=True, slots=True, eq=False)
class SecretContext:
    """The querier's context: holds the secret key. Never leaves the querier."""

    _ctx: Any = field(repr=False)

    def public_bytes(self, *, galois_keys: bool = True) -> bytes:
        """The public context to send to members: no secret key.

        Galois keys (~51 of ~53 MB) are needed by the single layout only.
        """
        if galois_keys and not self._ctx.has_galois_keys():
            raise LocalProtocolError("this context was created without Galois keys")
        return bytes(
            self._ctx.serialize(
                save_public_key=True,
                save_secret_key=False,
                save_galois_keys=galois_keys,
                save_relin_keys=True,
            )
        )

    @property
    def has_galois_keys(self) -> bool:
        return bool(self._ctx.has_galois_keys())


@dataclass(frozen=True, slots=True, eq=False)
class PublicContext:
    """A member's copy of a querier's public context: encrypts and evaluates, never decrypts."""

    _ctx: Any = field(repr=False)
    digest: str

    @property
    def has_galois_keys(self) -> bool:
        return bool(self._ctx.has_galois_keys())


def create_secret_context(*, galois_keys: bool = True) -> SecretContext:
    """A fresh CKKS key pair for the querier (128-bit security, see module docs).

    ``galois_keys=False`` saves ~190 ms and 51 MB when only batched queries are made.
    """
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
        )
        ctx.global_scale = _SCALE
        if galois_keys:
            ctx.generate_galois_keys()
    except (ValueError, RuntimeError) as exc:  # pragma: no cover - fixed parameters
        raise LocalProtocolError(f"cannot create the CKKS context: {exc}") from exc
    return SecretContext(ctx)


def _context_fields(data: bytes) -> None:
    """Reject, before TenSEAL parses it, a context that is not public."""
    fields = _proto_fields(data)
    if set(fields) - {1, 2, 3, 4}:
        raise MalformedMessage("unexpected fields in HE context")
    private = _single(fields.get(3), _LEN, "private_context")
    if private:
        inner = _proto_fields(private)
        if _single(inner.get(1), _LEN, "secret_key"):
            raise MalformedMessage("HE context holds a secret key; members accept public ones only")
    public = _single(fields.get(2), _LEN, "public_context")
    if not public or not _single(fields.get(1), _LEN, "encryption_parameters"):
        raise MalformedMessage("HE context lacks its parameters or public part")
    inner = _proto_fields(public)
    if not _single(inner.get(1), _LEN, "public_key") or not _single(
        inner.get(4), _LEN, "relin_keys"
    ):
        raise MalformedMessage("HE context lacks its public or relinearisation key")


def load_public_context(data: bytes, *, require_galois: bool = False) -> PublicContext:
    """Member side: parse a querier's public context and check its parameters.

    OversizedMessage above :data:`MAX_CONTEXT_BYTES`; MalformedMessage if it does
    not parse, holds a secret key, uses other parameters, or lacks Galois keys
    while ``require_galois``.
    """
    if len(data) > MAX_CONTEXT_BYTES:
        raise OversizedMessage(f"HE context of {len(data)} bytes exceeds {MAX_CONTEXT_BYTES}")
    if not data:
        raise MalformedMessage("empty HE context")
    data = bytes(data)
    _context_fields(data)
    try:
        ctx = ts.context_from(data)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MalformedMessage(f"undecodable HE context: {exc}") from exc
    if ctx.is_private() or ctx.has_secret_key():
        raise MalformedMessage("HE context holds a secret key")
    _check_params(ctx)
    if require_galois and not ctx.has_galois_keys():
        raise MalformedMessage("HE context lacks Galois keys (needed by the single layout)")
    return PublicContext(ctx, context_digest(data))


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextChunk:
    """One piece of a public context on the direct channel."""

    digest: str
    index: int
    total: int
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != 64 or any(c not in "0123456789abcdef" for c in self.digest):
            raise MalformedMessage("context digest must be 64 lowercase hex digits")
        if not (self.total >= 1 and 0 <= self.index < self.total):
            raise MalformedMessage(f"chunk {self.index} of {self.total} is out of range")
        if self.total > -(-MAX_CONTEXT_BYTES // 1024):
            raise MalformedMessage("too many chunks")
        if not self.payload or len(self.payload) > MAX_CHUNK_BYTES:
            raise OversizedMessage(f"chunk payload must be 1..{MAX_CHUNK_BYTES} bytes")


def chunk_context(
    data: bytes, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[ContextChunk, ...]:
    """Cut a serialised public context into chunks of at most ``chunk_bytes``."""
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise LocalProtocolError(f"chunk_bytes must lie in 1..{MAX_CHUNK_BYTES}")
    if not data or len(data) > MAX_CONTEXT_BYTES:
        raise LocalProtocolError(f"a context is 1..{MAX_CONTEXT_BYTES} bytes")
    digest = context_digest(data)
    total = -(-len(data) // chunk_bytes)
    return tuple(
        ContextChunk(
            digest=digest,
            index=i,
            total=total,
            payload=data[i * chunk_bytes : (i + 1) * chunk_bytes],
        )
        for i in range(total)
    )


class ContextAssembler:
    """Reassembles chunked contexts (any order, duplicates ignored), one digest at a time each.

    ``add`` returns the complete bytes once every chunk of a digest arrived and
    the digest verifies; None before. Memory is capped: at most ``max_pending``
    partial contexts and :data:`MAX_CONTEXT_BYTES` each (the oldest partial is
    dropped to make room). No clock: the caller drops stale partials with
    :meth:`discard`.
    """

    def __init__(self, *, max_pending: int = 4, max_bytes: int = MAX_CONTEXT_BYTES) -> None:
        if max_pending < 1 or not 1 <= max_bytes <= MAX_CONTEXT_BYTES:
            raise LocalProtocolError("max_pending >= 1 and 1 <= max_bytes <= MAX_CONTEXT_BYTES")
        self._max_pending = max_pending
        self._max_bytes = max_bytes
        self._pending: OrderedDict[str, tuple[int, dict[int, bytes]]] = OrderedDict()

    def add(self, chunk: ContextChunk) -> bytes | None:
        total, parts = self._pending.get(chunk.digest, (chunk.total, {}))
        if total != chunk.total:
            self.discard(chunk.digest)
            raise MalformedMessage("chunks of one context disagree on their number")
        if chunk.index in parts:
            if parts[chunk.index] != chunk.payload:
                self.discard(chunk.digest)
                raise MalformedMessage("two different payloads for one chunk index")
            return None
        size = sum(len(p) for p in parts.values()) + len(chunk.payload)
        if size > self._max_bytes:
            self.discard(chunk.digest)
            raise OversizedMessage(f"context exceeds {self._max_bytes} bytes")
        parts[chunk.index] = chunk.payload
        if chunk.digest not in self._pending:
            while len(self._pending) >= self._max_pending:
                self._pending.popitem(last=False)
            self._pending[chunk.digest] = (total, parts)
        if len(parts) < total:
            return None
        del self._pending[chunk.digest]
        data = b"".join(parts[i] for i in range(total))
        if context_digest(data) != chunk.digest:
            raise MalformedMessage("reassembled context does not match its digest")
        return data

    def discard(self, digest: str) -> None:
        self._pending.pop(digest, None)

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(self._pending)


class ContextCache:
    """Loaded public contexts per (querier, digest), least recently used evicted.

    A loaded context with Galois keys takes ~100 MB of memory: keep
    ``max_entries`` small.
    """

    def __init__(self, *, max_entries: int = 4) -> None:
        if max_entries < 1:
            raise LocalProtocolError("max_entries must be >= 1")
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], PublicContext] = OrderedDict()

    def get(self, querier: str, digest: str) -> PublicContext | None:
        ctx = self._entries.get((querier, digest))
        if ctx is not None:
            self._entries.move_to_end((querier, digest))
        return ctx

    def put(self, querier: str, ctx: PublicContext) -> None:
        self._entries[(querier, ctx.digest)] = ctx
        self._entries.move_to_end((querier, ctx.digest))
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True, slots=True)
class LinearLayer:
    """``y = x @ weight + bias``: weight (in, out), bias (out,), as numpy float64."""

    weight: Array
    bias: Array

    def __post_init__(self) -> None:
        w = np.array(self.weight, dtype=np.float64)
        b = np.array(self.bias, dtype=np.float64)
        if w.ndim != 2 or b.shape != (w.shape[1],) or min(w.shape) < 1:
            raise ModelError(
                f"linear layer needs weight (in, out) and bias (out,), got {w.shape} and {b.shape}"
            )
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise ModelError("linear layer holds NaN or infinity")
        w.setflags(write=False)
        b.setflags(write=False)
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)


SUPPORTED_ACTIVATIONS = ("square",)


@dataclass(frozen=True, slots=True)
class HEModel:
    """An HE-ready network: ``linear`` or ``linear -> square -> linear``.

    Build it with :func:`build_he_model` (validates a layer list) or
    :func:`fi_peer.models.he_models.export_he_model` (from torch).
    """

    layers: tuple[LinearLayer, ...]

    def __post_init__(self) -> None:
        if len(self.layers) not in (1, 2):
            raise ModelError(f"HE models have 1 or 2 linear layers, got {len(self.layers)}")
        for a, b in zip(self.layers, self.layers[1:], strict=False):
            if a.weight.shape[1] != b.weight.shape[0]:
                raise ModelError(
                    f"consecutive layers do not fit: {a.weight.shape} then {b.weight.shape}"
                )
        if not 1 <= self.input_dim <= MAX_INPUT_DIM:
            raise ModelError(
                f"input width {self.input_dim} exceeds the HE limit of "
                f"{MAX_INPUT_DIM} (reduce the input first, e.g. PCA)"
            )
        if _next_pow2(self.input_dim) > MAX_INPUT_DIM:
            raise ModelError(f"input width {self.input_dim} pads beyond {MAX_INPUT_DIM}")
        if len(self.layers) == 2 and _next_pow2(self.hidden_dim) > MAX_HIDDEN_DIM:
            raise ModelError(f"hidden width {self.hidden_dim} exceeds {MAX_HIDDEN_DIM}")
        if not 1 <= self.output_dim <= MAX_OUTPUT_DIM:
            raise ModelError(f"output width {self.output_dim} exceeds {MAX_OUTPUT_DIM}")

    @property
    def input_dim(self) -> int:
        return int(self.layers[0].weight.shape[0])

    @property
    def hidden_dim(self) -> int:
        return int(self.layers[0].weight.shape[1]) if len(self.layers) == 2 else 0

    @property
    def output_dim(self) -> int:
        return int(self.layers[-1].weight.shape[1])

    @property
    def padded_input_dim(self) -> int:
        """Width of the single-layout input vector (a power of two, see module docs)."""
        return _next_pow2(self.input_dim)

    def forward(self, X: npt.ArrayLike) -> Array:
        """Plaintext reference of the encrypted computation: (n, in) -> (n, out)."""
        x = _check_inputs(X, self.input_dim, MAX_BATCH * 1024)
        h = x @ self.layers[0].weight + self.layers[0].bias
        if len(self.layers) == 2:
            h = (h * h) @ self.layers[1].weight + self.layers[1].bias
        return np.asarray(h, dtype=np.float64)


def build_he_model(layers: Sequence[LinearLayer | str]) -> HEModel:
    """Validate a layer list: ``[linear]`` or ``[linear, "square", linear]``.

    Anything else raises ModelError naming what is unsupported: other
    activations (ReLU, sigmoid, ... are not polynomials), or more depth than the
    three multiplicative levels of the parameters allow.
    """
    items = list(layers)
    for item in items:
        if isinstance(item, str) and item not in SUPPORTED_ACTIVATIONS:
            raise ModelError(
                f"activation {item!r} is not supported under CKKS; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if not isinstance(item, str | LinearLayer):
            raise ModelError(f"unsupported layer {type(item).__name__}")
    kinds = ["act" if isinstance(i, str) else "linear" for i in items]
    if kinds == ["linear"]:
        return HEModel((items[0],))  # type: ignore[arg-type]
    if kinds == ["linear", "act", "linear"]:
        return HEModel((items[0], items[2]))  # type: ignore[arg-type]
    n_act = kinds.count("act")
    if n_act > 1 or kinds.count("linear") > 2:
        raise ModelError(
            f"{kinds.count('linear')} linear layers / {n_act} activations need "
            "more than the 3 multiplicative levels of N=8192; "
            "supported: linear or linear-square-linear"
        )
    raise ModelError(f"unsupported layer order {kinds}; expected linear or linear-square-linear")


def support_model(model: HEModel, class_counts: npt.ArrayLike) -> HEModel:
    """The member's HE answer for the ``support`` rule: ``[n(y) f(y|x), n(y)]``.

    ``f`` is the model's output (an MSE-trained square network approximates
    p(y|x)), ``n`` the member's training examples per class. Folded into the
    last layer: its columns are scaled by n(y) and C constant outputs n(y)
    appended, so the querier decides with
    ``fi_peer.models.aggregation.get_rule("support")`` on the decrypted sum.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    last = model.layers[-1]
    if counts.shape != (last.weight.shape[1],) or np.any(counts < 0):
        raise ModelError(f"class_counts must be ({last.weight.shape[1]},) and non-negative")
    weight = np.hstack([last.weight * counts[None, :], np.zeros_like(last.weight)])
    bias = np.concatenate([last.bias * counts, counts])
    return HEModel((*model.layers[:-1], LinearLayer(weight, bias)))


# --------------------------------------------------------------------------- ciphertexts


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedQuery:
    """Encrypted inputs: one blob per input (single) or one blob (batched)."""

    layout: Layout
    n_inputs: int
    input_dim: int
    blobs: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.n_inputs <= MAX_BATCH or not 1 <= self.input_dim <= MAX_INPUT_DIM:
            raise MalformedMessage("HE query: n_inputs or input_dim out of range")
        expected = self.n_inputs if self.layout is Layout.SINGLE else 1
        if len(self.blobs) != expected:
            raise MalformedMessage(f"{self.layout} query needs {expected} blobs")
        if self.layout is Layout.SINGLE and self.n_inputs > MAX_SINGLE_INPUTS:
            raise MalformedMessage("too many single-layout inputs; use the batched layout")

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedOutput:
    """Encrypted answers (one member's or a sum), same layout as the query."""

    layout: Layout
    n_inputs: int
    output_dim: int
    blobs: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.n_inputs <= MAX_BATCH or not 1 <= self.output_dim <= MAX_OUTPUT_DIM:
            raise MalformedMessage("HE output: n_inputs or output_dim out of range")
        expected = self.n_inputs if self.layout is Layout.SINGLE else 1
        if len(self.blobs) != expected:
            raise MalformedMessage(f"{self.layout} output needs {expected} blobs")

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs)


def _check_inputs(X: npt.ArrayLike, dim: int | None, max_rows: int) -> Array:
    try:
        x = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"inputs are not numeric: {exc}") from exc
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] < 1 or (dim is not None and x.shape[1] != dim):
        raise ModelError(f"inputs must have shape (n, {dim}), got {x.shape}")
    if x.shape[0] > max_rows:
        raise ModelError(f"at most {max_rows} inputs per HE query, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ModelError("inputs contain NaN or infinity")
    return x


def encrypt_inputs(
    ctx: SecretContext, X: npt.ArrayLike, *, layout: Layout | None = None
) -> EncryptedQuery:
    """Querier side: encrypt (n, d) inputs, layout chosen by n unless given.

    Single: each input zero-padded to a power of two (needs Galois keys on the
    members' side). Batched: inputs in the slots of one [1, d] tensor.
    """
    x = _check_inputs(X, None, MAX_BATCH)
    n, dim = x.shape
    if dim > MAX_INPUT_DIM or _next_pow2(dim) > MAX_INPUT_DIM:
        raise ModelError(f"input width {dim} exceeds the HE limit of {MAX_INPUT_DIM}")
    chosen = layout if layout is not None else choose_layout(n)
    try:
        if chosen is Layout.SINGLE:
            if not ctx.has_galois_keys:
                raise LocalProtocolError("the single layout needs a context with Galois keys")
            width = _next_pow2(dim)
            padded = np.zeros((n, width))
            padded[:, :dim] = x
            blobs = tuple(
                bytes(ts.ckks_vector(ctx._ctx, row.tolist()).serialize()) for row in padded
            )
        else:
            plain = ts.plain_tensor(x.reshape(n, 1, dim).tolist(), dtype="float")
            blobs = (bytes(ts.ckks_tensor(ctx._ctx, plain, batch=True).serialize()),)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise LocalProtocolError(f"encryption failed: {exc}") from exc
    return EncryptedQuery(layout=chosen, n_inputs=n, input_dim=dim, blobs=blobs)


def _load_vector(ctx: Any, blob: bytes, *, size: int, top_level: bool) -> Any:
    frame = _check_frame(blob, tensor=False, max_ciphertexts=1)
    if frame.shape != (size,):
        raise MalformedMessage(f"vector holds {frame.shape[0]} values, expected {size}")
    try:
        vec = ts.ckks_vector_from(ctx, bytes(blob))
        level = vec.ciphertext()[0].coeff_modulus_size()
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise MalformedMessage(f"undecodable CKKS vector: {exc}") from exc
    if top_level and level != _TOP_LEVEL_PRIMES:
        raise MalformedMessage(f"input ciphertext is at level {level}, expected a fresh one")
    return vec


def _load_tensor(ctx: Any, blob: bytes, *, width: int, batch: int, top_level: bool) -> Any:
    frame = _check_frame(blob, tensor=True, max_ciphertexts=max(MAX_INPUT_DIM, MAX_OUTPUT_DIM))
    if frame.shape != (1, width) or frame.batch_size != batch:
        raise MalformedMessage(
            f"tensor is {list(frame.shape)} x {frame.batch_size}, expected [1, {width}] x {batch}"
        )
    try:
        tensor = ts.ckks_tensor_from(ctx, bytes(blob))
        levels = {ct.coeff_modulus_size() for ct in tensor.ciphertext()}
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise MalformedMessage(f"undecodable CKKS tensor: {exc}") from exc
    if top_level and levels != {_TOP_LEVEL_PRIMES}:
        raise MalformedMessage("input tensor is not a fresh ciphertext")
    return tensor


def dp_noise_std(sigma: float, threshold: int) -> float:
    """Each member's noise std when the sum over >= ``threshold`` members must carry
    ``sigma`` (the default mode's split, :func:`fi_peer.privacy.dp.member_noise_std`)."""
    try:
        return member_noise_std(sigma, threshold)
    except ValueError as exc:
        raise LocalProtocolError(str(exc)) from exc


def evaluate(
    ctx: PublicContext,
    model: HEModel,
    query: EncryptedQuery,
    *,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> EncryptedOutput:
    """Member side: run ``model`` on the encrypted inputs, add N(0, noise_std^2) inside.

    The noise reaches every slot the querier can read (module docs, Layouts).
    MalformedMessage / OversizedMessage for a bad query, ModelError when the
    model does not fit it.
    """
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise LocalProtocolError("noise_std must be finite and >= 0")
    if noise_std > 0 and rng is None:
        raise LocalProtocolError("noise needs a random generator")
    if query.input_dim != model.input_dim:
        raise ModelError(
            f"query inputs have width {query.input_dim}, model takes {model.input_dim}"
        )
    gen = rng if rng is not None else np.random.default_rng(0)
    out_dim = model.output_dim

    def noise(rows: int) -> Array:
        if noise_std == 0:
            return np.zeros((rows, out_dim))
        return gen.normal(0.0, noise_std, size=(rows, out_dim))

    try:
        if query.layout is Layout.SINGLE:
            if not ctx.has_galois_keys:
                raise MalformedMessage("single-layout query but the context has no Galois keys")
            blobs = tuple(
                _evaluate_single(ctx._ctx, model, blob, noise(1)[0]) for blob in query.blobs
            )
        else:
            blobs = (_evaluate_batched(ctx._ctx, model, query, noise(SLOT_COUNT)),)
    except (MalformedMessage, OversizedMessage, ModelError, LocalProtocolError):
        raise
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ModelError(f"HE evaluation failed: {exc}") from exc
    return EncryptedOutput(
        layout=query.layout, n_inputs=query.n_inputs, output_dim=out_dim, blobs=blobs
    )


def _evaluate_single(ctx: Any, model: HEModel, blob: bytes, noise: Array) -> bytes:
    width = model.padded_input_dim
    vec = _load_vector(ctx, blob, size=width, top_level=True)
    first = model.layers[0]
    w1 = np.zeros((width, first.weight.shape[1]))
    w1[: model.input_dim] = first.weight
    if len(model.layers) == 1:
        out = vec.mm(w1)
        last_bias = first.bias
    else:
        hidden = _next_pow2(model.hidden_dim)
        w1p = np.zeros((width, hidden))
        w1p[:, : model.hidden_dim] = w1
        b1 = np.zeros(hidden)
        b1[: model.hidden_dim] = first.bias
        h = vec.mm(w1p)
        h = h + ts.ckks_vector(ctx, b1.tolist())  # encrypted: replicated like h
        h.square_()
        second = model.layers[1]
        w2 = np.zeros((hidden, model.output_dim))
        w2[: model.hidden_dim] = second.weight
        out = h.mm(w2)
        last_bias = second.bias
    out = out + ts.ckks_vector(ctx, (last_bias + noise).tolist())
    return bytes(out.serialize())


def _evaluate_batched(ctx: Any, model: HEModel, query: EncryptedQuery, noise: Array) -> bytes:
    n = query.n_inputs
    tensor = _load_tensor(ctx, query.blobs[0], width=model.input_dim, batch=n, top_level=True)
    first = model.layers[0]
    out = tensor.mm(first.weight.tolist()) + first.bias[None, :].tolist()
    if len(model.layers) == 2:
        out.square_()
        second = model.layers[1]
        out = out.mm(second.weight.tolist()) + second.bias[None, :].tolist()
    # Noise in every slot: rows < n for the inputs, one shared extra row for the
    # unused slots (which hold the answer at x = 0: one more noisy release).
    flood = noise.copy()
    if n < SLOT_COUNT:
        flood[n:] = noise[n]
    noise_tensor = ts.ckks_tensor(
        ctx, ts.plain_tensor(flood.reshape(SLOT_COUNT, 1, model.output_dim).tolist()), batch=True
    )
    return bytes((out + noise_tensor).serialize())


def _load_output(ctx: Any, out: EncryptedOutput) -> list[Any]:
    if out.layout is Layout.SINGLE:
        return [_load_vector(ctx, b, size=out.output_dim, top_level=False) for b in out.blobs]
    return [
        _load_tensor(ctx, out.blobs[0], width=out.output_dim, batch=out.n_inputs, top_level=False)
    ]


def _add_outputs(ctx: Any, outputs: Sequence[EncryptedOutput]) -> EncryptedOutput:
    first = outputs[0]
    for o in outputs[1:]:
        if (o.layout, o.n_inputs, o.output_dim) != (first.layout, first.n_inputs, first.output_dim):
            raise MalformedMessage("cannot add HE outputs of different layouts or shapes")
    loaded = [_load_output(ctx, o) for o in outputs]
    try:
        totals = loaded[0]
        for other in loaded[1:]:
            totals = [a + b for a, b in zip(totals, other, strict=True)]
        blobs = tuple(bytes(t.serialize()) for t in totals)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MalformedMessage(f"HE outputs cannot be added: {exc}") from exc
    return EncryptedOutput(
        layout=first.layout, n_inputs=first.n_inputs, output_dim=first.output_dim, blobs=blobs
    )


def decrypt_outputs(ctx: SecretContext, out: EncryptedOutput) -> Array:
    """Querier side: (n, output_dim) float64 values of an encrypted output."""
    loaded = _load_output(ctx._ctx, out)
    try:
        if out.layout is Layout.SINGLE:
            rows = [np.asarray(v.decrypt(), dtype=np.float64) for v in loaded]
            return np.vstack(rows)
        values = np.asarray(loaded[0].decrypt().tolist(), dtype=np.float64)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MalformedMessage(f"cannot decrypt HE output: {exc}") from exc
    return values.reshape(out.n_inputs, out.output_dim)


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True, slots=True, kw_only=True)
class Partial:
    """A sum of encrypted answers and the members whose answers it holds."""

    members: frozenset[str]
    output: EncryptedOutput

    def __post_init__(self) -> None:
        if not self.members:
            raise MalformedMessage("a partial sum names at least one member")


@dataclass(frozen=True, slots=True)
class AggregationTree:
    """Who sends its partial sum to whom: a heap over the live members.

    ``order`` is the committee in an order fixed for the query (e.g. sorted by
    hash(query id, member id), so the querier cannot place its colluders);
    member ``p`` of the live list sends to live member ``(p - 1) // fan_in``;
    the first live member is the root and sends to the querier. ``fan_in = 1``
    is a chain (ring), ``fan_in >= k - 1`` a star. A dropout is handled by
    recomputing the heap over the live members: a dead inner node's children
    go to the nearest live position.
    """

    order: tuple[str, ...]
    fan_in: int = 4

    def __post_init__(self) -> None:
        if len(set(self.order)) != len(self.order) or not self.order:
            raise LocalProtocolError("aggregation order must list distinct members")
        if self.fan_in < 1:
            raise LocalProtocolError("fan_in must be >= 1")

    def _live(self, alive: Iterable[str] | None) -> list[str]:
        if alive is None:
            return list(self.order)
        live = set(alive)
        return [m for m in self.order if m in live]

    def parent(self, member: str, alive: Iterable[str] | None = None) -> str | None:
        """Where ``member`` sends its partial: a member, or None for the querier."""
        live = self._live(alive)
        if member not in live:
            raise LocalProtocolError(f"{member!r} is not a live member of this tree")
        pos = live.index(member)
        return None if pos == 0 else live[(pos - 1) // self.fan_in]

    def children(self, member: str, alive: Iterable[str] | None = None) -> tuple[str, ...]:
        """Whose partials ``member`` waits for before sending its own."""
        live = self._live(alive)
        if member not in live:
            raise LocalProtocolError(f"{member!r} is not a live member of this tree")
        pos = live.index(member)
        first = pos * self.fan_in + 1
        return tuple(live[first : first + self.fan_in])


def contribute(
    ctx: PublicContext,
    model: HEModel,
    query: EncryptedQuery,
    *,
    member: str,
    noise_std: float,
    rng: np.random.Generator,
) -> Partial:
    """A member's own encrypted, noised answer as a one-member partial sum."""
    out = evaluate(ctx, model, query, noise_std=noise_std, rng=rng)
    return Partial(members=frozenset({member}), output=out)


def combine(ctx: PublicContext, parts: Sequence[Partial]) -> Partial:
    """Sum partials whose member sets are disjoint (UnexpectedMessage otherwise).

    A member calls it on its own contribution and whatever its children sent
    before its deadline; missing children are dropouts and simply not summed.
    """
    if not parts:
        raise LocalProtocolError("nothing to combine")
    seen: set[str] = set()
    for part in parts:
        if seen & part.members:
            raise UnexpectedMessage(f"members {sorted(seen & part.members)} counted twice")
        seen |= part.members
    if len(parts) == 1:
        _load_output(ctx._ctx, parts[0].output)  # still validate what we pass on
        return parts[0]
    total = _add_outputs(ctx._ctx, [p.output for p in parts])
    return Partial(members=frozenset(seen), output=total)


def _check_aggregate(partial: Partial, committee: Iterable[str], threshold: int) -> None:
    members = set(committee)
    if threshold < 2:
        raise LocalProtocolError("an HE aggregate needs a threshold of at least 2 members")
    if not partial.members <= members:
        raise UnexpectedMessage(f"aggregate names non-members {sorted(partial.members - members)}")
    if len(partial.members) < threshold:
        raise UnexpectedMessage(
            f"aggregate over {len(partial.members)} members, below the threshold {threshold}"
        )


def finalize(partial: Partial, *, committee: Iterable[str], threshold: int) -> Partial:
    """Root side: the partial may go to the querier only if it sums >= threshold members.

    Raises LocalProtocolError otherwise (the query then fails and is refunded).
    """
    try:
        _check_aggregate(partial, committee, threshold)
    except UnexpectedMessage as exc:
        raise LocalProtocolError(f"refusing to release: {exc}") from exc
    return partial


def open_aggregate(
    ctx: SecretContext, partial: Partial, *, committee: Iterable[str], threshold: int
) -> Array:
    """Querier side: decrypt the aggregate; UnexpectedMessage if it sums too few members."""
    _check_aggregate(partial, committee, threshold)
    return decrypt_outputs(ctx, partial.output)


def add_outputs(ctx: PublicContext, outputs: Sequence[EncryptedOutput]) -> EncryptedOutput:
    """Member side: the encrypted sum of outputs of one layout and shape (each
    blob parsed and checked first; MalformedMessage for anything else)."""
    if not outputs:
        raise LocalProtocolError("nothing to add")
    if len(outputs) == 1:
        _load_output(ctx._ctx, outputs[0])
        return outputs[0]
    return _add_outputs(ctx._ctx, outputs)
