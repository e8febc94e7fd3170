"""What the HE query mode asks its driver to do (the CKKS work itself).

The protocol core never touches a ciphertext's contents: it moves opaque
blobs, and the driver (fi_peer.he_runtime under the agent, or a test) does the
TenSEAL work and reports back to the core, like it does model inference for
``Evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class HELoadContext:
    """Member side: load ``querier``'s public context (reassembled, digest
    checked) and keep it; answer with ``PeerCore.he_context_loaded(querier,
    digest, ok, now)``. The driver must reject a context holding a secret key."""

    querier: str
    digest: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class HEEvaluate:
    """Member side: run the HE-ready model on ``blobs`` under ``querier``'s
    context ``digest``, adding N(0, noise_std^2) inside the ciphertext; answer
    with ``PeerCore.he_evaluated(this_effect, blobs_or_None, now)``."""

    querier: str
    query_id: bytes
    digest: str
    blobs: tuple[bytes, ...] = field(repr=False)
    noise_std: float
    rule: str = "support"  # which served HE vector (fi_peer.he_runtime.HERuntime.served)
    layout: str = "single"  # or "batched": one tensor blob holding n_inputs inputs
    n_inputs: int = 1


@dataclass(frozen=True, slots=True)
class HECombine:
    """Member side: add the encrypted partial sums ``parts`` (each a tuple of
    blobs) under ``querier``'s context; answer with
    ``PeerCore.he_combined(this_effect, blobs_or_None, now)``."""

    querier: str
    query_id: bytes
    digest: str
    parts: tuple[tuple[bytes, ...], ...] = field(repr=False)
    layout: str = "single"
    n_inputs: int = 1
    output_dim: int = 1  # batched: the vector length (the tensor's width)


@dataclass(frozen=True, slots=True)
class HEDecrypt:
    """Querier side: decrypt the aggregate with this peer's secret context;
    answer with ``PeerCore.he_decrypted(query_id, values_or_None, now)``
    (``vector_len`` floats per input)."""

    query_id: bytes
    blobs: tuple[bytes, ...] = field(repr=False)
    vector_len: int
    layout: str = "single"
    n_inputs: int = 1


@dataclass(frozen=True, slots=True)
class HESendChunks:
    """Send ``peer`` the public-context chunks (or the HEBlobChunks of a batched
    ciphertext), each sealed (signed, timestamped) just before it leaves: ~120
    chunks per member take longer than the replay window (30 s) on a slow link,
    so they cannot all be sealed up front. The
    driver seals with ``PeerCore.seal_now(chunk, now)``; fire and forget."""

    peer: str
    chunks: tuple[Any, ...] = field(repr=False)  # HEContextChunk | HEBlobChunk


HEEffect = HELoadContext | HEEvaluate | HECombine | HEDecrypt | HESendChunks
