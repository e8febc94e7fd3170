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

Parameters (checked when a context is loaded; measured in notes/he-and-data.md
and benchmarks/he.py): N = 8192, coefficient moduli [60, 40, 40, 40, 38] bits
(218 bits = SEAL's 128-bit bound for N = 8192), scale 2^40. That leaves three
rescalings: linear -> square -> linear, the only supported model family
(:class:`HEModel`), or a single linear layer.

Kernel evidence (:class:`KernelEvidenceModel`, the vector served under DP):
``E_c(x) = sum_{j: y_j = c} (u(x) . u(x_j))^2`` over the member's own points,
u a public unit feature map of 64 coordinates (:func:`kernel_feature_map`), so
each record adds one value in [0, 1] to one class whatever x is: L2
sensitivity 1 (add/remove), sqrt 2 (replace one), as the default mode's
``evidence`` rule. ``E_c = <M_c, u u^T>``: the querier encrypts the outer
product (:func:`encrypt_kernel_inputs`, 4,096 slots) and the member applies one
plaintext linear map (hybrid diagonal method, 17 rotations with the same Galois
keys, no ciphertext product); the answer has the single layout's shape
(period 32), so aggregation and decryption are unchanged. docs/he.md,
"Kernel evidence".

Layouts (:class:`Layout`)
    ``single``: one ciphertext per input, evaluated with SEAL directly (TenSEAL's
    ``CKKSVector.mm`` needs ~24 Galois keys, 53 MB, and one rotation per input
    row: ~640 ms of CPU per member). The querier encrypts x padded to a power
    of two d with each value repeated 4096 / d times (:func:`single_layout_vector`).
    A member multiplies by one plaintext holding W1 in that layout (slot
    i * 4096/d + r holds W1[i, r mod w], w = padded hidden width) and sums the d
    blocks with log2(d) rotate-and-adds (strides 4096/d .. 2048): every slot s
    then holds z[s mod w] exactly (an all-reduce, no wrap-around partial sums).
    x^2 keeps that. W2 goes by the diagonal method over the period w, with
    baby steps (rotations by 1) and giant steps (rotations by 8, Horner), so the
    answer is again replicated: slot s holds y[s mod w] (padding slots hold
    zeros). Rotations are done before rescaling (at scale 2^80): the 38-bit
    special prime makes key-switching noise ~2^37, harmless only there. Galois
    keys for the nine steps of :data:`GALOIS_STEPS` only, saved seeded: the
    public context is ~12 MB instead of 53. Bias and noise are added as one
    plaintext replicated with the answer's period (every readable slot holds
    the noisy answer; the padding slots get their own noise draws, hiding the
    evaluation error there too). ~50 ms of CPU per input and member.
    ``batched``: one [1, d] tensor (TenSEAL's CKKSTensor wire format) whose
    ciphertext i holds feature i of up to 4,096 inputs, one per slot; plain
    scalar multiply-adds with one rescale per output ciphertext (lazy
    rescaling; TenSEAL's ``mm`` rescales every product), no rotations, no Galois
    keys. Unused slots hold the model's answer at x = 0; the member floods
    them with one extra noise vector, so they are one more noisy release.
    Queries are encrypted with the secret key (seeded symmetric encryption: half
    the bytes of a public-key ciphertext). Outputs are switched to the last
    level before they leave (131 KB per ciphertext).

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
Galois keys are read by SEAL's own loader, which validates them against the
parameters (a test feeds it garbage).

No network I/O, clock or global RNG: randomness comes in as a
``numpy.random.Generator``. The only I/O is a private scratch file (on /dev/shm
when present) through which SEAL objects are saved and loaded: TenSEAL's sealapi
binding reads and writes paths, not bytes.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, cast

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
    "BABY_STEPS",
    "BATCH_THRESHOLD",
    "COEFF_MOD_BIT_SIZES",
    "DEFAULT_CHUNK_BYTES",
    "GALOIS_STEPS",
    "KERNEL_L2_SENSITIVITY",
    "KERNEL_PERIOD",
    "KERNEL_REPLACE_ONE_SENSITIVITY",
    "KERNEL_SIDE",
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
    "KernelEvidenceModel",
    "KernelFeatureMap",
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
    "encrypt_kernel_inputs",
    "evaluate",
    "finalize",
    "kernel_evidence_model",
    "kernel_feature_map",
    "kernel_query_vector",
    "load_public_context",
    "open_aggregate",
    "single_layout_vector",
    "single_layout_width",
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
MAX_CONTEXT_BYTES = 32 * 1024 * 1024
"""A public context with the single layout's Galois keys is ~12 MB, without ~2.6 MB."""
BABY_STEPS = 8
"""Baby-step count of the second layer's diagonal method (single layout)."""
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


# --------------------------------------------------------------------------- SEAL bytes
# sealapi (TenSEAL's SEAL binding) saves and loads through file paths only; a
# private scratch file on tmpfs (/dev/shm when present) carries the bytes.

_SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _seal_save(obj: Any) -> bytes:
    fd, path = tempfile.mkstemp(prefix="fi-peer-he-", dir=_SCRATCH_DIR)
    try:
        os.close(fd)
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def _seal_load(obj: Any, seal_context: Any, data: bytes) -> None:
    fd, path = tempfile.mkstemp(prefix="fi-peer-he-", dir=_SCRATCH_DIR)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        obj.load(seal_context, path)
    finally:
        os.unlink(path)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _frame_bytes(dims: Sequence[int], cts: Sequence[bytes], *, batch: int | None = None) -> bytes:
    """TenSEAL's CKKSVectorProto / CKKSTensorProto (tensors.proto) around SEAL ciphertexts."""
    packed = b"".join(_varint(d) for d in dims)
    out = [_varint((1 << 3) | _LEN), _varint(len(packed)), packed]
    for ct in cts:
        out += [_varint((2 << 3) | _LEN), _varint(len(ct)), ct]
    out += [_varint((3 << 3) | _I64), struct.pack("<d", _SCALE)]
    if batch is not None:
        out += [_varint((4 << 3) | _VARINT), _varint(batch)]
    return b"".join(out)


# --------------------------------------------------------------------------- contexts

GALOIS_STEPS: tuple[int, ...] = (1, BABY_STEPS, 32, 64, 128, 256, 512, 1024, 2048)
"""Rotation steps the single layout uses (module docs, Layouts): the first layer's
all-reduce over the input blocks (strides 4096 / padded width x 2^k, within 32..2048
for widths up to 128), the second layer's baby steps (1, repeated) and giant steps
(BABY_STEPS, Horner). Nine Galois keys instead of TenSEAL's ~24: 9.5 MB seeded."""

_CONTEXT_MAGIC = b"FIHE\x01"


def _galois_elt(step: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots: 3^step mod 2N."""
    return pow(3, step, 2 * POLY_MODULUS_DEGREE)


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


class _Kit:
    """SEAL evaluator, encoder and keys bound to one context (not thread-safe)."""

    def __init__(self, ctx: Any, galois: Any | None) -> None:
        self.seal = ctx.data.seal_context()
        self.evaluator = sealapi.Evaluator(self.seal)
        self.encoder = sealapi.CKKSEncoder(self.seal)
        self.relin = ctx.data.relin_keys()
        self.galois = galois
        self.lock = threading.Lock()

    def plain(self, values: Any, parms_id: Any, scale: float = _SCALE) -> Any:
        pt = sealapi.Plaintext()
        if isinstance(values, float):
            self.encoder.encode(values, parms_id, scale, pt)
        else:
            self.encoder.encode(np.asarray(values, dtype=np.float64).tolist(), parms_id, scale, pt)
        return pt

    def rotate(self, ct: Any, step: int) -> Any:
        out = sealapi.Ciphertext()
        self.evaluator.rotate_vector(ct, step, self.galois, out)
        return out

    def rescale(self, ct: Any) -> None:
        """Rescale and pin the scale to 2^40 (primes are 2^40 (1 +- 1e-7): negligible)."""
        self.evaluator.rescale_to_next_inplace(ct)
        ct.scale = _SCALE


@dataclass(frozen=True, slots=True, eq=False)
class SecretContext:
    """The querier's context: holds the secret key. Never leaves the querier."""

    _ctx: Any = field(repr=False)
    _galois: bytes = field(default=b"", repr=False)
    _public: dict[bool, bytes] = field(default_factory=dict, repr=False)

    def public_bytes(self, *, galois_keys: bool = True) -> bytes:
        """The public context to send to members: no secret key (same bytes every call).

        ``FIHE\\x01 | len(TenSEAL public context) (4 bytes) | TenSEAL public context
        (public + relinearisation keys, 2.6 MB) | seeded SEAL Galois keys for
        :data:`GALOIS_STEPS` (~9.5 MB, single layout only; empty without)``.
        """
        if galois_keys and not self._galois:
            raise LocalProtocolError("this context was created without Galois keys")
        cached = self._public.get(galois_keys)
        if cached is None:
            base = self._public.get(False)
            if base is None:
                inner = bytes(
                    self._ctx.serialize(
                        save_public_key=True,
                        save_secret_key=False,
                        save_galois_keys=False,
                        save_relin_keys=True,
                    )
                )
                base = self._public[False] = _CONTEXT_MAGIC + struct.pack(">I", len(inner)) + inner
            cached = self._public[galois_keys] = base + (self._galois if galois_keys else b"")
        return cached

    @property
    def has_galois_keys(self) -> bool:
        return bool(self._galois)


@dataclass(frozen=True, slots=True, eq=False)
class PublicContext:
    """A member's copy of a querier's public context: encrypts and evaluates, never decrypts."""

    _ctx: Any = field(repr=False)
    digest: str
    _galois: Any = field(default=None, repr=False)
    _kit: dict[int, _Kit] = field(default_factory=dict, repr=False)

    @property
    def has_galois_keys(self) -> bool:
        return self._galois is not None

    def kit(self) -> _Kit:
        """Evaluator, encoder and keys for the calling thread."""
        key = threading.get_ident()
        kit = self._kit.get(key)
        if kit is None:
            kit = self._kit[key] = _Kit(self._ctx, self._galois)
        return kit


def create_secret_context(*, galois_keys: bool = True) -> SecretContext:
    """A fresh CKKS key pair for the querier (128-bit security, see module docs).

    ``galois_keys=False`` saves the ~9.5 MB of rotation keys when only batched
    queries are made. TenSEAL runs single-threaded here: members are separate
    processes, and the custom evaluation below calls SEAL directly.
    """
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
            n_threads=1,
        )
        ctx.global_scale = _SCALE
        galois = b""
        if galois_keys:
            keygen = sealapi.KeyGenerator(ctx.data.seal_context(), ctx.data.secret_key())
            seeded = keygen.create_galois_keys([_galois_elt(s) for s in GALOIS_STEPS])
            galois = _seal_save(seeded)
    except (ValueError, RuntimeError, OSError) as exc:  # pragma: no cover - fixed parameters
        raise LocalProtocolError(f"cannot create the CKKS context: {exc}") from exc
    return SecretContext(ctx, galois)


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
    if _single(inner.get(5), _LEN, "galois_keys"):
        raise MalformedMessage("HE context carries TenSEAL's full Galois keys; expected none")


def load_public_context(data: bytes, *, require_galois: bool = False) -> PublicContext:
    """Member side: parse a querier's public context and check its parameters.

    OversizedMessage above :data:`MAX_CONTEXT_BYTES`; MalformedMessage if it does
    not parse, holds a secret key, uses other parameters, or lacks Galois keys
    (for every step of :data:`GALOIS_STEPS`) while ``require_galois``.
    """
    if len(data) > MAX_CONTEXT_BYTES:
        raise OversizedMessage(f"HE context of {len(data)} bytes exceeds {MAX_CONTEXT_BYTES}")
    if not data:
        raise MalformedMessage("empty HE context")
    data = bytes(data)
    head = len(_CONTEXT_MAGIC)
    if not data.startswith(_CONTEXT_MAGIC) or len(data) < head + 4:
        raise MalformedMessage("not an fi-peer HE context (bad magic)")
    (inner_len,) = struct.unpack(">I", data[head : head + 4])
    inner = data[head + 4 : head + 4 + inner_len]
    galois_bytes = data[head + 4 + inner_len :]
    if len(inner) != inner_len or not inner:
        raise MalformedMessage("truncated HE context")
    _context_fields(inner)
    try:
        ctx = ts.context_from(inner, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MalformedMessage(f"undecodable HE context: {exc}") from exc
    if ctx.is_private() or ctx.has_secret_key():
        raise MalformedMessage("HE context holds a secret key")
    _check_params(ctx)
    galois = None
    if galois_bytes:
        galois = sealapi.GaloisKeys()
        try:
            _seal_load(galois, ctx.data.seal_context(), galois_bytes)
        except (ValueError, RuntimeError, TypeError, OSError) as exc:
            raise MalformedMessage(f"undecodable Galois keys: {exc}") from exc
        missing = [s for s in GALOIS_STEPS if not galois.has_key(_galois_elt(s))]
        if missing:
            raise MalformedMessage(f"Galois keys lack the rotation steps {missing}")
    if require_galois and galois is None:
        raise MalformedMessage("HE context lacks Galois keys (needed by the single layout)")
    return PublicContext(ctx, context_digest(data), galois)


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

    A loaded context with its nine Galois keys takes ~40 MB of memory (~100 MB
    with TenSEAL's full set): keep ``max_entries`` small.
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


def _symmetric_blob(kit: _Kit, encryptor: Any, values: Array) -> bytes:
    """Seeded symmetric encryption (half the bytes of a public-key ciphertext)."""
    pt = kit.plain(values, kit.seal.first_parms_id())
    return _seal_save(encryptor.encrypt_symmetric(pt))


def single_layout_vector(x: Array) -> Array:
    """The 4,096 slots of one single-layout input: x zero-padded to a power of two
    ``d`` and each value repeated 4096 / d times (slot s holds x[s // (4096 / d)])."""
    width = _next_pow2(x.shape[-1])
    padded = np.zeros(width)
    padded[: x.shape[-1]] = x
    return np.repeat(padded, SLOT_COUNT // width)


def encrypt_inputs(
    ctx: SecretContext, X: npt.ArrayLike, *, layout: Layout | None = None
) -> EncryptedQuery:
    """Querier side: encrypt (n, d) inputs, layout chosen by n unless given.

    Single: one ciphertext per input in the layout of :func:`single_layout_vector`
    (needs Galois keys on the members' side). Batched: a [1, d] tensor whose
    ciphertext i holds feature i of every input, one input per slot. Both are
    encrypted with the secret key (seeded: ~220 KB per ciphertext instead of 430).
    """
    x = _check_inputs(X, None, MAX_BATCH)
    n, dim = x.shape
    if dim > MAX_INPUT_DIM or _next_pow2(dim) > MAX_INPUT_DIM:
        raise ModelError(f"input width {dim} exceeds the HE limit of {MAX_INPUT_DIM}")
    chosen = layout if layout is not None else choose_layout(n)
    try:
        kit = _Kit(ctx._ctx, None)
        encryptor = sealapi.Encryptor(kit.seal, ctx._ctx.data.secret_key())
        if chosen is Layout.SINGLE:
            if not ctx.has_galois_keys:
                raise LocalProtocolError("the single layout needs a context with Galois keys")
            blobs = tuple(
                _frame_bytes(
                    [SLOT_COUNT], [_symmetric_blob(kit, encryptor, single_layout_vector(row))]
                )
                for row in x
            )
        else:
            cols = np.zeros((dim, SLOT_COUNT))
            cols[:, :n] = x.T
            cts = [_symmetric_blob(kit, encryptor, col) for col in cols]
            blobs = (_frame_bytes([1, dim], cts, batch=n),)
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
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


def single_layout_width(model: HEModel) -> int:
    """Replication period of a model's single-layout answer (slot s holds output
    s mod width; outputs >= output_dim are padding): the padded hidden/output width.
    ModelError if it exceeds 4096 / padded input width (use the batched layout)."""
    inner = [model.output_dim] if len(model.layers) == 1 else [model.hidden_dim, model.output_dim]
    width = _next_pow2(max(inner))
    if width > SLOT_COUNT // model.padded_input_dim:
        raise ModelError(
            f"single layout: padded width {width} x padded input {model.padded_input_dim} "
            f"exceeds {SLOT_COUNT} slots; use the batched layout"
        )
    return width


class _EncodedPlan:
    """Plaintext arrays (``arrays``, by name; None for an all-zero one) encoded on
    first use, once per level (``parms_id``), shared by the worker threads."""

    #: also skip arrays that would encode to all zeros at scale 2^40 (a product
    #: with such a plaintext is transparent, which SEAL refuses)
    skip_unencodable = False
    arrays: dict[Any, Array | None]

    def __init__(self) -> None:
        self._encoded: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def plain(self, kit: _Kit, name: Any, parms_id: Any) -> Any | None:
        key = (name, tuple(parms_id))
        with self._lock:
            pt = self._encoded.get(key)
        if pt is None:
            values = self.arrays[name]
            if values is None:
                return None
            if self.skip_unencodable and not np.any(np.abs(values) * _SCALE >= 1.0):
                return None  # a zero plaintext: its product would be transparent
            pt = kit.plain(values, parms_id)
            with self._lock:
                self._encoded[key] = pt
        return pt


class _SinglePlan(_EncodedPlan):
    """A model's plaintext weights in the single layout, encoded once per level."""

    skip_unencodable = True

    def __init__(self, model: HEModel) -> None:
        self.model = model
        self.width = width = single_layout_width(model)
        dp = model.padded_input_dim
        self.stride = SLOT_COUNT // dp
        s = np.arange(SLOT_COUNT)
        first = model.layers[0]
        w1 = np.zeros((dp, width))
        w1[: model.input_dim, : first.weight.shape[1]] = first.weight
        self.arrays: dict[Any, Array | None] = {"p1": w1[s // self.stride, s % width]}
        b1 = np.zeros(width)
        b1[: first.bias.shape[0]] = first.bias
        self.first_bias = b1
        self.last_bias = b1
        self.baby = self.giant = 0
        if len(model.layers) == 2:
            second = model.layers[1]
            w2 = np.zeros((width, width))
            w2[: model.hidden_dim, : model.output_dim] = second.weight
            self.baby = min(BABY_STEPS, width)
            self.giant = width // self.baby
            for g in range(self.giant):
                for b in range(self.baby):
                    d = g * self.baby + b
                    diag = np.roll(w2[(s + d) % width, s % width], g * self.baby)
                    self.arrays["d", g, b] = diag if np.any(diag) else None
            self.arrays["b1"] = b1[s % width]
            b2 = np.zeros(width)
            b2[: model.output_dim] = second.bias
            self.last_bias = b2
        super().__init__()


_P = TypeVar("_P")
_PLANS: OrderedDict[int, Any] = OrderedDict()
_PLANS_LOCK = threading.Lock()


def _cached_plan(model: Any, make: Callable[[Any], _P]) -> _P:
    """The evaluation plan of ``model`` (encoded weights), made once by ``make``
    and kept for the 16 most recently used models (of either kind). Keyed by id(model) and
    checked by identity, so a new model at a recycled address is not served
    another's plan."""
    with _PLANS_LOCK:
        plan = _PLANS.get(id(model))
        if plan is not None and plan.model is model:
            _PLANS.move_to_end(id(model))
            return cast(_P, plan)
    made = make(model)
    with _PLANS_LOCK:
        _PLANS[id(model)] = made
        while len(_PLANS) > 16:
            _PLANS.popitem(last=False)
    return made


def _single_plan(model: HEModel) -> _SinglePlan:
    return _cached_plan(model, _SinglePlan)


def evaluate(
    ctx: PublicContext,
    model: HEModel | KernelEvidenceModel,
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

    def noise(rows: int, cols: int = out_dim) -> Array:
        if noise_std == 0:
            return np.zeros((rows, cols))
        return gen.normal(0.0, noise_std, size=(rows, cols))

    try:
        if isinstance(model, KernelEvidenceModel):
            if query.layout is not Layout.SINGLE or not ctx.has_galois_keys:
                raise ModelError("kernel evidence: single layout with Galois keys only")
            kplan = _kernel_plan(model)
            blobs = tuple(
                _evaluate_kernel(ctx, kplan, blob, noise(1, KERNEL_PERIOD)[0])
                for blob in query.blobs
            )
        elif query.layout is Layout.SINGLE:
            if not ctx.has_galois_keys:
                raise MalformedMessage("single-layout query but the context has no Galois keys")
            plan = _single_plan(model)
            blobs = tuple(
                _evaluate_single(ctx, plan, blob, noise(1, plan.width)[0]) for blob in query.blobs
            )
        else:
            blobs = (_evaluate_batched(ctx, model, query, noise(SLOT_COUNT)),)
    except (MalformedMessage, OversizedMessage, ModelError, LocalProtocolError):
        raise
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        raise ModelError(f"HE evaluation failed: {exc}") from exc
    return EncryptedOutput(
        layout=query.layout, n_inputs=query.n_inputs, output_dim=out_dim, blobs=blobs
    )


def _zero_like(kit: _Kit, ctx: PublicContext, parms_id: Any) -> Any:
    """A fresh encryption of zero (a layer whose weights are all zero)."""
    out = sealapi.Ciphertext()
    sealapi.Encryptor(kit.seal, ctx._ctx.data.public_key()).encrypt_zero(parms_id, out)
    out.scale = _SCALE
    return out


def _to_last_level(kit: _Kit, ct: Any) -> bytes:
    """Mod-switch to the last level (smallest reply, one level for every sum) and save."""
    while ct.coeff_modulus_size() > 1:
        kit.evaluator.mod_switch_to_next_inplace(ct)
    return _seal_save(ct)


def _evaluate_single(ctx: PublicContext, plan: _SinglePlan, blob: bytes, noise: Array) -> bytes:
    """Packed evaluation with few rotations (module docs, Layouts): one plaintext
    product by W1 in the input's layout, log2(d) rotate-and-adds (all-reduce over
    the input blocks, done at scale 2^80 so the key-switching noise of the 38-bit
    special prime stays far below the signal), x^2, then W2 by the diagonal method
    with baby steps (rotations by 1) and giant steps (Horner, rotations by 8)."""
    kit = ctx.kit()
    ev = kit.evaluator
    model = plan.model
    ct = _load_vector(ctx._ctx, blob, size=SLOT_COUNT, top_level=True).ciphertext()[0]
    p1 = plan.plain(kit, "p1", ct.parms_id())
    if p1 is None:
        ct = _zero_like(kit, ctx, ct.parms_id())
    else:
        ev.multiply_plain_inplace(ct, p1)
        step = plan.stride
        while step < SLOT_COUNT:
            ev.add_inplace(ct, kit.rotate(ct, step))
            step *= 2
    kit.rescale(ct)
    if len(model.layers) == 2:
        b1 = plan.plain(kit, "b1", ct.parms_id())
        if b1 is not None:
            ev.add_plain_inplace(ct, b1)
        ev.square_inplace(ct)
        ev.relinearize_inplace(ct, kit.relin)
        babies = [ct]
        for _ in range(1, plan.baby):
            babies.append(kit.rotate(babies[-1], 1))  # at scale 2^80, as above
        for c in babies:
            kit.rescale(c)
        acc: Any = None
        for g in reversed(range(plan.giant)):
            inner: Any = None
            for b in range(plan.baby):
                pt = plan.plain(kit, ("d", g, b), babies[b].parms_id())
                if pt is None:
                    continue
                term = sealapi.Ciphertext()
                ev.multiply_plain(babies[b], pt, term)
                if inner is None:
                    inner = term
                else:
                    ev.add_inplace(inner, term)
            if acc is not None:
                acc = kit.rotate(acc, plan.baby)
                if inner is not None:
                    ev.add_inplace(acc, inner)
            else:
                acc = inner
        if acc is None:
            acc = _zero_like(kit, ctx, babies[0].parms_id())
            acc.scale = _SCALE * _SCALE
        kit.rescale(acc)
        ct = acc
    # Bias and noise, replicated with the answer's period: every slot is noised
    # (padding slots by their own draws, so the evaluation error stays hidden too).
    tail = plan.last_bias + noise
    s = np.arange(SLOT_COUNT)
    ev.add_plain_inplace(ct, kit.plain(tail[s % plan.width], ct.parms_id()))
    return _frame_bytes([SLOT_COUNT], [_to_last_level(kit, ct)])


# --------------------------------------------------------------------------- kernel evidence

KERNEL_SIDE = 64
"""D: the kernel's feature vector u(x) has D = 64 coordinates, so the querier's
outer product u(x) u(x)^T fills the 4,096 slots exactly."""
KERNEL_CENTRE = 0.35
"""Public centre subtracted from every input feature (inputs scaled to [0, 1])."""
KERNEL_BIAS = 0.1
"""Public weight of the constant coordinate of u(x) (before normalising)."""
KERNEL_PERIOD = 32
"""Replication period of the kernel answer (classes <= 32; the support layout's period)."""
KERNEL_L2_SENSITIVITY = 1.0
"""Add/remove one training record: one class coordinate moves by k(x, x_j) in [0, 1]."""
KERNEL_REPLACE_ONE_SENSITIVITY = math.sqrt(2.0)
"""Replace one record: two class coordinates move by at most 1 each."""


@dataclass(frozen=True, slots=True)
class KernelFeatureMap:
    """The public map x -> u(x) of the kernel evidence (the querier and every member
    of a task use the same one): the kept input features minus ``centre``, scaled to
    unit norm, a constant ``bias`` prepended, the whole scaled to unit norm and
    zero-padded to :data:`KERNEL_SIDE`. Hence u(x) . u(x') lies in [-1, 1] and
    k(x, x') = (u(x) . u(x'))^2 in [0, 1] for ANY inputs (bounded sensitivity)."""

    input_dim: int
    keep: tuple[int, ...]
    centre: float = KERNEL_CENTRE
    bias: float = KERNEL_BIAS

    def __post_init__(self) -> None:
        if not 1 <= self.input_dim <= MAX_INPUT_DIM:
            raise ModelError(f"kernel evidence: input width {self.input_dim} out of range")
        keep = tuple(int(i) for i in self.keep)
        if (
            not 1 <= len(keep) <= KERNEL_SIDE - 1
            or len(set(keep)) != len(keep)
            or min(keep) < 0
            or max(keep) >= self.input_dim
        ):
            raise ModelError(
                f"kernel evidence keeps 1..{KERNEL_SIDE - 1} distinct input features, got {keep}"
            )
        if not (math.isfinite(self.centre) and math.isfinite(self.bias) and self.bias > 0):
            raise ModelError("kernel evidence: centre must be finite and bias > 0")
        object.__setattr__(self, "keep", keep)

    def __call__(self, X: npt.ArrayLike) -> Array:
        """(n, input_dim) -> (n, KERNEL_SIDE) unit vectors u(x)."""
        x = _check_inputs(X, self.input_dim, MAX_BATCH * 1024)
        z = x[:, list(self.keep)] - self.centre
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        z = np.where(norms > 0, z / np.where(norms > 0, norms, 1.0), 0.0)
        u = np.zeros((x.shape[0], KERNEL_SIDE))
        u[:, 0] = self.bias
        u[:, 1 : 1 + z.shape[1]] = z
        out: Array = u / np.linalg.norm(u, axis=1, keepdims=True)
        return out


def kernel_feature_map(input_dim: int) -> KernelFeatureMap:
    """The task's public feature map for ``input_dim`` inputs: all features if they
    fit (<= 63), for 64 (digits) all but feature 0 (the top-left pixel, zero in every
    digits image); wider inputs raise ModelError (reduce them first)."""
    if input_dim <= KERNEL_SIDE - 1:
        return KernelFeatureMap(input_dim, tuple(range(input_dim)))
    if input_dim == KERNEL_SIDE:
        return KernelFeatureMap(input_dim, tuple(range(1, input_dim)))
    raise ModelError(f"kernel evidence takes at most {KERNEL_SIDE} input features, got {input_dim}")


@dataclass(frozen=True, slots=True, eq=False)
class KernelEvidenceModel:
    """A member's polynomial-kernel evidence: ``E_c(x) = sum_{j: y_j = c} (u(x) . u(x_j))^2``
    over its own training points, ``= <M_c, u(x) u(x)^T>`` with the second moments
    ``M_c = sum_{j: y_j = c} u(x_j) u(x_j)^T`` (shape (C, 64, 64)).

    Each record adds one kernel value in [0, 1] to one class: L2 sensitivity 1
    (add/remove), sqrt(2) (replace one), whatever x is, as the default mode's
    ``evidence`` rule. Encrypted, it is ONE plaintext linear map of the querier's
    encrypted outer product (:func:`encrypt_kernel_inputs`, :func:`evaluate`):
    depth 1, no square on the member's side.
    """

    feature_map: KernelFeatureMap
    moments: Array

    def __post_init__(self) -> None:
        m = np.array(self.moments, dtype=np.float64)
        if m.ndim != 3 or m.shape[1:] != (KERNEL_SIDE, KERNEL_SIDE) or m.shape[0] < 1:
            raise ModelError(
                f"kernel moments must be (C, {KERNEL_SIDE}, {KERNEL_SIDE}), got {m.shape}"
            )
        if m.shape[0] > KERNEL_PERIOD:
            raise ModelError(f"kernel evidence serves at most {KERNEL_PERIOD} classes")
        if not np.all(np.isfinite(m)):
            raise ModelError("kernel moments hold NaN or infinity")
        m.setflags(write=False)
        object.__setattr__(self, "moments", m)

    @property
    def input_dim(self) -> int:
        return self.feature_map.input_dim

    @property
    def output_dim(self) -> int:
        return int(self.moments.shape[0])

    def forward(self, X: npt.ArrayLike) -> Array:
        """Plaintext reference: (n, input_dim) -> (n, C) evidence."""
        u = self.feature_map(X)
        out: Array = np.einsum("na,cab,nb->nc", u, self.moments, u)
        return out


def kernel_evidence_model(
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    n_classes: int,
    feature_map: KernelFeatureMap | None = None,
) -> KernelEvidenceModel:
    """A member's kernel evidence from its training data (X scaled to [0, 1])."""
    x = _check_inputs(X, None, 10**9)
    labels = np.asarray(y)
    if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ModelError("need one integer label per training row")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ModelError(f"labels must lie in [0, {n_classes})")
    fmap = feature_map if feature_map is not None else kernel_feature_map(x.shape[1])
    u = fmap(x)
    moments = np.zeros((n_classes, KERNEL_SIDE, KERNEL_SIDE))
    for c in range(n_classes):
        uc = u[labels == c]
        moments[c] = uc.T @ uc
    return KernelEvidenceModel(fmap, moments)


def kernel_query_vector(u: Array) -> Array:
    """The 4,096 slots of one kernel query: the outer product u u^T, row-major."""
    out: Array = np.outer(u, u).ravel()
    return out


def encrypt_kernel_inputs(
    ctx: SecretContext, X: npt.ArrayLike, feature_map: KernelFeatureMap
) -> EncryptedQuery:
    """Querier side of the kernel evidence: one ciphertext of u(x) u(x)^T per input
    (the querier squares in the clear; single layout, needs Galois keys)."""
    x = _check_inputs(X, feature_map.input_dim, MAX_SINGLE_INPUTS)
    if not ctx.has_galois_keys:
        raise LocalProtocolError("the kernel evidence needs a context with Galois keys")
    try:
        kit = _Kit(ctx._ctx, None)
        encryptor = sealapi.Encryptor(kit.seal, ctx._ctx.data.secret_key())
        blobs = tuple(
            _frame_bytes([SLOT_COUNT], [_symmetric_blob(kit, encryptor, kernel_query_vector(u))])
            for u in feature_map(x)
        )
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        raise LocalProtocolError(f"encryption failed: {exc}") from exc
    return EncryptedQuery(
        layout=Layout.SINGLE, n_inputs=x.shape[0], input_dim=feature_map.input_dim, blobs=blobs
    )


class _KernelPlan(_EncodedPlan):
    """The kernel evidence as the hybrid diagonal method over the period w = 32:
    ``T[s] = sum_{k < w} ct[s + k] W[s mod w, s + k]`` then sum the 4096 / w blocks
    (rotate-and-add), so every slot s holds E[s mod w]. k = 8 g + b: baby steps b
    (rotations by 1), giant steps g (Horner, rotations by 8); plaintext
    ``P'_{g,b} = roll(P_{8g+b}, 8g)``."""

    def __init__(self, model: KernelEvidenceModel) -> None:
        self.model = model
        w = KERNEL_PERIOD
        s = np.arange(SLOT_COUNT)
        weights = np.zeros((w, SLOT_COUNT))
        weights[: model.output_dim] = model.moments.reshape(model.output_dim, -1)
        self.baby = BABY_STEPS
        self.giant = w // BABY_STEPS
        self.arrays: dict[Any, Array | None] = {}
        for g in range(self.giant):
            for b in range(self.baby):
                k = g * self.baby + b
                diag = np.roll(weights[s % w, (s + k) % SLOT_COUNT], g * self.baby)
                self.arrays[g, b] = diag if np.any(diag) else None
        super().__init__()


def _kernel_plan(model: KernelEvidenceModel) -> _KernelPlan:
    return _cached_plan(model, _KernelPlan)


def _evaluate_kernel(ctx: PublicContext, plan: _KernelPlan, blob: bytes, noise: Array) -> bytes:
    """One encrypted outer product -> every slot s holds E[s mod 32] + noise.

    The fresh input (scale 2^40) is first multiplied by a constant plaintext at
    scale ~2^40 so that every rotation runs at scale ~2^80 (the 38-bit special
    prime's key-switching noise, ~2^37, would be an error ~1 at 2^40); the
    constant's scale is q2 q3 / 2^40 so that the result is exactly at 2^40 after
    the two rescales."""
    kit = ctx.kit()
    ev = kit.evaluator
    ct = _load_vector(ctx._ctx, blob, size=SLOT_COUNT, top_level=True).ciphertext()[0]
    primes = [m.value() for m in kit.seal.get_context_data(ct.parms_id()).parms().coeff_modulus()]
    lift = float(primes[-1]) * float(primes[-2]) / _SCALE
    ev.multiply_plain_inplace(ct, kit.plain(1.0, ct.parms_id(), lift))
    babies = [ct]
    for _ in range(1, plan.baby):
        babies.append(kit.rotate(babies[-1], 1))
    acc: Any = None
    for g in reversed(range(plan.giant)):
        inner: Any = None
        for b in range(plan.baby):
            pt = plan.plain(kit, (g, b), ct.parms_id())
            if pt is None:
                continue
            term = sealapi.Ciphertext()
            ev.multiply_plain(babies[b], pt, term)
            if inner is None:
                inner = term
            else:
                ev.add_inplace(inner, term)
        if inner is not None:
            ev.rescale_to_next_inplace(inner)  # 2^120 -> ~2^80: cheaper rotations below
        if acc is not None:
            acc = kit.rotate(acc, plan.baby)
            if inner is not None:
                ev.add_inplace(acc, inner)
        else:
            acc = inner
    if acc is None:  # no training data at all: an encryption of zero
        acc = _zero_like(kit, ctx, ct.parms_id())
        acc.scale = ct.scale * _SCALE
        ev.rescale_to_next_inplace(acc)
    step = KERNEL_PERIOD
    while step < SLOT_COUNT:
        ev.add_inplace(acc, kit.rotate(acc, step))
        step *= 2
    ev.rescale_to_next_inplace(acc)
    acc.scale = _SCALE  # exact up to float rounding: lift was chosen for it
    s = np.arange(SLOT_COUNT)
    ev.add_plain_inplace(acc, kit.plain(noise[s % KERNEL_PERIOD], acc.parms_id()))
    return _frame_bytes([SLOT_COUNT], [_to_last_level(kit, acc)])


def _evaluate_batched(
    ctx: PublicContext, model: HEModel, query: EncryptedQuery, noise: Array
) -> bytes:
    """Inputs in the slots: plain scalar products, one rescale per output ciphertext
    (lazy rescaling), no rotations."""
    n = query.n_inputs
    kit = ctx.kit()
    ev = kit.evaluator
    tensor = _load_tensor(ctx._ctx, query.blobs[0], width=model.input_dim, batch=n, top_level=True)
    layer_in = list(tensor.ciphertext())

    def linear(cts: list[Any], weight: Array) -> list[Any]:
        outs = []
        for j in range(weight.shape[1]):
            acc: Any = None
            for i, ct in enumerate(cts):
                w = float(weight[i, j])
                if abs(w) * _SCALE < 1.0:  # encodes to a zero plaintext (SEAL: transparent)
                    continue
                term = sealapi.Ciphertext()
                ev.multiply_plain(ct, kit.plain(w, ct.parms_id()), term)
                if acc is None:
                    acc = term
                else:
                    ev.add_inplace(acc, term)
            if acc is None:
                acc = _zero_like(kit, ctx, cts[0].parms_id())
                acc.scale = _SCALE * _SCALE
            kit.rescale(acc)
            outs.append(acc)
        return outs

    first = model.layers[0]
    outs = linear(layer_in, first.weight)
    last_bias = first.bias
    if len(model.layers) == 2:
        for h, ct in enumerate(outs):
            if abs(first.bias[h]) * _SCALE >= 1.0:
                ev.add_plain_inplace(ct, kit.plain(float(first.bias[h]), ct.parms_id()))
            ev.square_inplace(ct)
            ev.relinearize_inplace(ct, kit.relin)
            kit.rescale(ct)
        second = model.layers[1]
        outs = linear(outs, second.weight)
        last_bias = second.bias
    # Noise in every slot: rows < n for the inputs, one shared extra row for the
    # unused slots (which hold the answer at x = 0: one more noisy release).
    flood = noise.copy()
    if n < SLOT_COUNT:
        flood[n:] = noise[n]
    blobs = []
    for j, ct in enumerate(outs):
        ev.add_plain_inplace(ct, kit.plain(flood[:, j] + last_bias[j], ct.parms_id()))
        blobs.append(_to_last_level(kit, ct))
    return _frame_bytes([1, model.output_dim], blobs, batch=n)


def _load_output(ctx: Any, out: EncryptedOutput) -> list[Any]:
    if out.layout is Layout.SINGLE:
        return [_load_vector(ctx, b, size=SLOT_COUNT, top_level=False) for b in out.blobs]
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
            rows = [np.asarray(v.decrypt(), dtype=np.float64)[: out.output_dim] for v in loaded]
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
    model: HEModel | KernelEvidenceModel,
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
