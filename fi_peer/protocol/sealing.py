"""The query input, sealed by the querier to one committee member.

NaCl Box (X25519 + XSalsa20-Poly1305) between the querier's X25519 key (sent in
its QueryRequest as ``reply_key``) and the member's (from its Offer). The
plaintext binds the query id, so a sealed input cannot be replayed into
another query. The input is a float32 little-endian vector.

The Box of a key pair (its X25519 agreement) is memoised: a querier seals to
the same members query after query, and a member opens from the same queriers.
"""

from __future__ import annotations

from functools import lru_cache

import nacl.exceptions
import nacl.public
import numpy as np
import numpy.typing as npt

from fi_peer.errors import MalformedMessage
from fi_peer.protocol import codec


@lru_cache(maxsize=4096)
def _box(secret: bytes, public: bytes) -> nacl.public.Box:
    return nacl.public.Box(nacl.public.PrivateKey(secret), nacl.public.PublicKey(public))


def seal_input(
    querier_key: nacl.public.PrivateKey, member_key: bytes, query_id: bytes, x: npt.ArrayLike
) -> bytes:
    vec = np.asarray(x, dtype="<f4").ravel()
    plaintext = codec.pack([query_id, vec.tobytes()])
    return bytes(_box(bytes(querier_key), member_key).encrypt(plaintext))


def open_input(
    member_key: nacl.public.PrivateKey,
    querier_key: bytes,
    query_id: bytes,
    sealed: bytes,
    input_dim: int,
) -> npt.NDArray[np.float32]:
    """Decrypt and check an input; MalformedMessage on any failure."""
    try:
        plaintext = _box(bytes(member_key), querier_key).decrypt(sealed)
    except (nacl.exceptions.CryptoError, nacl.exceptions.TypeError, ValueError) as exc:
        raise MalformedMessage("sealed input does not open with our key") from exc
    raw = codec.unpack_raw(plaintext, max_len=len(plaintext))
    if (
        type(raw) is not list
        or len(raw) != 2
        or raw[0] != query_id
        or type(raw[1]) is not bytes
        or len(raw[1]) != 4 * input_dim
    ):
        raise MalformedMessage("sealed input is not bound to this query or has the wrong size")
    x = np.frombuffer(raw[1], dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise MalformedMessage("sealed input has NaN or infinite values")
    return x
