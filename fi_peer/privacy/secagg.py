"""Secure aggregation with dropouts: the querier learns the sum, nothing else.

After Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning" (CCS 2017), with the querier as the only aggregator. Pure
functions and two small state objects (:class:`MaskingMember` for one
member, :class:`Aggregator` for the querier); the protocol state machines
(fi_peer.protocol.responder / querier) carry their inputs and outputs in
messages. No I/O, no clock; randomness is a parameter.

Theory of operation
-------------------
Committee ``0..n-1`` (the order of the querier's Accept), threshold ``t``.
Vectors are fixed-point words mod 2**64 (fi_peer.protocol.fixedpoint: 24
fractional bits, two's complement; a sum is exact while it stays within
+/-2**39), so every mask below is uniform over the words and cancels exactly.

1. Nonces (Offer/Accept). Member ``u`` draws a fresh 32-byte *mask nonce*
   ``r_u`` for this query (the wire field is still called ``mask_key``). The
   Accept's committee lists every member's id, long-term X25519 key and nonce.
2. Key shares (right after Accept). ``u`` draws a 32-byte self-mask seed
   ``b_u``, Shamir-shares it (threshold ``t``, x = index + 1) over the
   committee, keeps its own share, and encrypts share ``v`` to member ``v``
   on their long-term channel (below). It also commits to ``b_u`` (SHA-256)
   so the querier can check what it later reconstructs.
3. Relay. The querier forwards to each member the ciphertexts addressed to
   it from every member whose key shares arrived: that set is ``U1``.
4. Masked input. ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in U1, v != u}
   ±PRG(s_uv)`` (``+`` when ``u < v``) with the per-query pair seed
   ``s_uv = HKDF-Expand(K_uv, H(committee) | both ids)``, ``K_uv`` a
   key derived from the cached X25519 agreement of ``u``'s and ``v``'s
   LONG-TERM keys and ``H(committee)`` a digest of the query context, ``t``
   and every member's id, long-term key and nonce. ``s_uv = s_vu``, so the
   pair's masks cancel in a sum that holds both. With it go *view tags*.
5. Unmask. Survivors ``S`` (masked input received) and dropped ``D = U1 - S``.
   Each survivor ``s`` reveals its shares of ``b_v`` for ``v`` in ``S`` and
   its own pair seeds ``s_sd`` for ``d`` in ``D`` (query-specific HKDF
   outputs: the long-term agreement is never revealed). With ``t`` reveals
   the querier rebuilds the ``b_v`` and removes the self masks; with every
   survivor's seeds it removes the pairwise masks between ``S`` and ``D``;
   the masks among ``S`` cancel. Result: ``sum_{s in S} x_s``.

Why a late-declared dropout stays hidden (double masking): a member never
reveals, for the same member ``j``, both a share of ``b_j`` and its pair seed
with ``j``. A querier that received ``y_j`` and then calls ``j`` dropped
learns ``j``'s pair seeds with the survivors, but ``y_j`` still carries
``PRG(b_j)``.

Rules a member enforces before revealing (``SecAggError.reason`` in brackets):
it revealed nothing yet for this query (``already_revealed``); ``S`` and ``D``
are disjoint (``both_kinds``) and make up exactly its own ``U1``
(``view_mismatch``); it is in ``S`` itself (``not_a_survivor``); ``|S| >= t``
(``too_few_survivors``); ``|D| <= t - 2`` (``too_many_dropped``, below); and
every other survivor's view tag verifies (``bad_view_tag``).

Against an active querier (beyond honest-but-curious): each share ciphertext
carries the sender's nonce, so a querier that swapped nonces in its Accepts is
caught at the relay (``mask_nonce_mismatch``); the long-term keys that
authenticate the ciphertexts and key the pair seeds are checked by the
protocol against the peers' own signed announcements. A *view tag* is a MAC,
under the key of the pair's long-term channel, over the committee digest and
the ``U1`` its sender masked over; a revealing member checks one tag per
survivor, so a querier cannot tell one member a smaller ``U1``. With one
reveal per member, the querier may still send different (S, D) splits to
different members. To isolate ``x_j`` it needs ``b_j`` (``t`` members told
"j survived", ``j`` may be one) and every pair seed of ``j``: ``s_jv`` comes
either from ``j`` (told "v dropped": at most ``t - 2`` of them) or from ``v``
(told "j dropped", so ``v`` gives no share of ``b_j``). That takes at least
``|U1| - 1 - (t - 2)`` members of the second kind and ``t`` of the first,
disjoint: ``|U1| + 1`` members, more than ``U1`` has. Hence the ``t - 2``
rule; without it an odd committee with ``t = (n + 1) / 2`` could be peeled
(``2t - 1 = n``). Bonawitz's extra consistency round (signed survivor lists)
is not implemented: against a querier that also colludes with members, the
guarantee is this counting argument, not Bonawitz's proof (as before this
change, where one colluder already sufficed for odd ``n``). A member that
sends garbage key shares or seeds makes the query fail (the recipients
decline, or the unmask is out of range): a denial of service, not a leak.

Deviation from DESIGN.md (and from Bonawitz)
--------------------------------------------
DESIGN.md step 5-6 (and this module before) has each member draw a fresh
X25519 *mask key* per query, Shamir-share its secret with ``b_u`` and, for a
dropped member, reveal shares of its mask key. That costs ``n`` X25519
agreements per member per query (~32 µs each: ~1.9 ms of the ~12 ms of CPU
a k = 8 query took in benchmarks/throughput.py). Now the pair seeds come from
the cached long-term agreements, and dropout recovery reveals the survivors'
seeds with the dropped members directly. What changes:

- Forward secrecy of the masks: ``s_uv(q)`` follows from ``u``'s or ``v``'s
  long-term X25519 secret plus public data (the nonces and ids of the signed
  Offers/Accept), with no ciphertext. Before, a per-query mask secret
  protected it, but that secret's shares travelled under the same long-term
  channels, so someone holding a query's relayed ciphertexts (the querier)
  and a long-term key could already open them. Against the querier plus
  stolen long-term keys the bar went up: unmasking ``x_u`` of a past query
  now takes ``u``'s key or the keys of ALL of ``u``'s partners in ``U1``
  (before: ``u``'s, or any ``t``). What is new is that an outsider with one
  stolen long-term key and a recorded masked share learns that one pair's
  masks for every past query without the ciphertexts; the self mask
  ``PRG(b_u)`` still hides ``x_u`` unless ``t`` shares of ``b_u`` are
  opened too. Mitigation: rotating the X25519 box key (a new announcement)
  ends the exposure for later queries; a compromised peer is exposed for its
  own vectors under either scheme.
- Seed freshness does not rely on the querier: ``H(committee)`` covers each
  member's fresh nonce, so a querier that replays a query id still gets new
  seeds (otherwise seeds revealed for a "dropped" ``j`` in one run plus
  ``b_j`` from a rerun would expose ``x_j``).
- Robustness: when ``D`` is not empty the querier needs the reveal of EVERY
  survivor (only ``s`` can give ``s_sd``), not any ``t``, and at most
  ``t - 2`` members may drop between the relay and the masked input (for
  even ``n`` and ``t = n / 2 + 1`` that is ``n - t``, no loss; for odd ``n``
  one fewer than before). A survivor that then fails to reveal fails the
  query (refunded) instead of it being answered.

Parameters (constant; changing any of them is a new protocol version):

- Mask words: uint64, sums mod 2**64.
- PRG: SHAKE-256 (FIPS 202) of ``label || seed`` with 32-byte seeds,
  squeezed to ``8 * L`` bytes read as little-endian uint64. 256-bit security
  as an XOF; in the standard library; ~1 µs for the vectors used here.
- Channel keys: ``k = HSalsa20(X25519(long-term secret, their public))`` (the
  NaCl Box key, cached per peer); view-tag key ``HKDF(k, info = "view-mac")``,
  pair-mask root ``K_uv = HKDF(k, info = "mask-root")``.
- Pair seeds: HKDF-Expand-SHA256 (RFC 5869 section 2.3; ``K_uv`` is already a
  pseudorandom key) with PRK = ``K_uv`` and info = label, the committee digest
  (SHA-256 over the session context ``SHA-256(DOMAIN | querier id | query
  id)``, ``t`` and each member's id, long-term key and nonce) and both peer
  ids in byte order.
- Shamir: GF(2**521 - 1) (see shamir.py); each secret is one 32-byte value.
- Share encryption: NaCl Box (X25519, XSalsa20-Poly1305, random nonce) on the
  two members' long-term keys, precomputed and cached (no X25519 per share).
- View tags: HMAC-SHA256 truncated to 16 bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.utils
import numpy as np
import numpy.typing as npt

from fi_peer.privacy import shamir
from fi_peer.privacy.shamir import RandomBytes

__all__ = [
    "CIPHERTEXT_LEN",
    "COMMIT_LEN",
    "DOMAIN",
    "KEY_LEN",
    "NONCE_LEN",
    "SEED_LEN",
    "TAG_LEN",
    "Aggregator",
    "Channel",
    "MaskingMember",
    "Participant",
    "SecAggError",
    "commit_seed",
    "committee_digest",
    "hkdf_sha256",
    "mask_nonce",
    "pair_mask",
    "pair_seed",
    "prg_words",
    "self_mask",
    "session_context",
    "usable_public_key",
    "view_digest",
]

Words = npt.NDArray[np.uint64]

DOMAIN = b"fi-peer/v1/secagg/"
KEY_LEN = 32
SEED_LEN = 32
TAG_LEN = 16
COMMIT_LEN = 32
_NONCE_LEN = 24
_MAC_LEN = 16
NONCE_LEN = 32
# context | sender index | recipient index | sender's mask nonce | share of b
_PLAIN_LEN = 32 + 1 + 1 + NONCE_LEN + shamir.SHARE_LEN
CIPHERTEXT_LEN = _NONCE_LEN + _MAC_LEN + _PLAIN_LEN
_SECRET_BOUND = 1 << (8 * SEED_LEN)

_LABEL_SELF = DOMAIN + b"prg/self"
_LABEL_PAIR = DOMAIN + b"prg/pair"


class SecAggError(ValueError):
    """A secure-aggregation step cannot go on; ``reason`` is a short token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- primitives ---------------------------------------------------------------------------


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt``, expand with ``info``."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF output length out of range")
    prk = hmac.digest(salt or b"\x00" * 32, ikm, "sha256")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def prg_words(seed: bytes, n: int, label: bytes) -> Words:
    """``n`` uniform uint64 words from SHAKE-256(label || seed)."""
    if len(seed) != SEED_LEN:
        raise ValueError(f"PRG seeds are {SEED_LEN} bytes")
    stream = hashlib.shake_256(label + seed).digest(8 * n)
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def session_context(querier: str, query_id: bytes) -> bytes:
    """32 bytes naming one query: query ids are only unique per querier."""
    return hashlib.sha256(DOMAIN + b"context" + querier.encode() + b"|" + query_id).digest()


def mask_nonce(random_bytes: RandomBytes = nacl.utils.random) -> bytes:
    """A member's fresh per-query nonce: its pair seeds are new even if a query id is not."""
    return random_bytes(NONCE_LEN)


_P25519 = (1 << 255) - 19
# Every u-coordinate (bit 255 ignored, as X25519 ignores it) whose X25519 output is
# all zero for every clamped scalar: the points of order 1, 2, 4 and 8 on the curve
# and its twist, 0, 1, -1 and the two of order 8, plus the non-canonical p and p + 1.
# Comparing against them gives what a trial X25519 (libsodium refuses exactly these)
# gives, for ~0.3 us instead of ~50 us.
_LOW_ORDER = frozenset(
    u.to_bytes(KEY_LEN, "little")
    for u in (
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P25519 - 1,
        _P25519,
        _P25519 + 1,
    )
)


def usable_public_key(public: bytes) -> bool:
    """False for a key X25519 cannot agree with (wrong length, low order)."""
    if len(public) != KEY_LEN:
        return False
    if public[31] & 0x80:
        public = public[:31] + bytes([public[31] & 0x7F])
    return public not in _LOW_ORDER


@dataclass(frozen=True, slots=True)
class Participant:
    """A committee member as secure aggregation needs it."""

    peer_id: str
    box_key: bytes  # long-term X25519 public key (share encryption, pair seeds, view tags)
    mask_nonce: bytes  # this query's fresh nonce (the wire's ``mask_key`` field)


def pair_seed(root: bytes, committee_hash: bytes, a: Participant, b: Participant) -> bytes:
    """The pairwise mask seed of ``a`` and ``b`` for one query; symmetric in them.

    ``root``: the pair's :attr:`Channel.mask_root`; ``committee_hash``: the
    query's :func:`committee_digest` (context, threshold, every id, key and nonce).
    """
    lo, hi = (a, b) if a.peer_id < b.peer_id else (b, a)
    info = DOMAIN + b"pair" + committee_hash + lo.peer_id.encode() + b"|" + hi.peer_id.encode()
    # HKDF-Expand (RFC 5869 2.3), one block: ``root`` is already a PRK (HKDF output)
    return hmac.digest(root, info + b"\x01", "sha256")


def pair_mask(seed: bytes, n: int, mine: int, theirs: int) -> Words:
    """What member ``mine`` adds for its pair with ``theirs``: +PRG below, -PRG above."""
    words = prg_words(seed, n, _LABEL_PAIR)
    return words if mine < theirs else np.subtract(np.uint64(0), words, dtype=np.uint64)


def self_mask(seed: bytes, n: int) -> Words:
    return prg_words(seed, n, _LABEL_SELF)


def commit_seed(context: bytes, index: int, seed: bytes) -> bytes:
    return hashlib.sha256(DOMAIN + b"commit" + context + bytes([index]) + seed).digest()


def committee_digest(context: bytes, committee: Sequence[Participant], threshold: int) -> bytes:
    h = hashlib.sha256(DOMAIN + b"committee" + context + threshold.to_bytes(2, "big"))
    for m in committee:
        h.update(m.peer_id.encode() + b"|" + m.box_key + m.mask_nonce)
    return h.digest()


def view_digest(committee_hash: bytes, u1: Sequence[int]) -> bytes:
    return hashlib.sha256(DOMAIN + b"view" + committee_hash + bytes(u1)).digest()


def _add(acc: Words, words: Words) -> None:
    np.add(acc, words, out=acc, dtype=np.uint64)


def _sub(acc: Words, words: Words) -> None:
    np.subtract(acc, words, out=acc, dtype=np.uint64)


class Channel:
    """The long-term channel of two members: NaCl Box, and a MAC key and the
    pair-mask root derived from it (both ends derive the same).

    Build once per peer and cache it: the constructor does the X25519.
    """

    __slots__ = ("_box", "_key", "_mac_key", "mask_root")

    def __init__(self, my_secret: nacl.public.PrivateKey, their_public: bytes) -> None:
        try:
            self._box = nacl.public.Box(my_secret, nacl.public.PublicKey(their_public))
        except nacl.exceptions.CryptoError as exc:
            raise SecAggError("bad_box_key", "no channel with this long-term key") from exc
        shared = self._key = self._box.shared_key()
        self._mac_key = hkdf_sha256(shared, salt=b"", info=DOMAIN + b"view-mac")
        self.mask_root = hkdf_sha256(shared, salt=b"", info=DOMAIN + b"mask-root")

    def encrypt(self, plaintext: bytes) -> bytes:
        """nonce || Box(plaintext): what ``Box.encrypt`` gives, without its wrappers."""
        nonce = nacl.utils.random(_NONCE_LEN)
        return nonce + nacl.bindings.crypto_box_easy_afternm(plaintext, nonce, self._key)

    def decrypt(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) < _NONCE_LEN + _MAC_LEN:
            raise SecAggError("bad_key_share", "a key share is too short")
        nonce, box = ciphertext[:_NONCE_LEN], ciphertext[_NONCE_LEN:]
        try:
            return nacl.bindings.crypto_box_open_easy_afternm(box, nonce, self._key)
        except nacl.exceptions.CryptoError as exc:
            raise SecAggError("bad_key_share", "a key share does not open") from exc

    def tag(self, message: bytes) -> bytes:
        return hmac.digest(self._mac_key, message, "sha256")[:TAG_LEN]

    def verify(self, message: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.tag(message), tag)


def _tag_message(context: bytes, sender: int, recipient: int, view: bytes) -> bytes:
    return DOMAIN + b"view-tag" + context + bytes([sender, recipient]) + view


def _check_committee(committee: Sequence[Participant], threshold: int) -> None:
    n = len(committee)
    if not 1 <= n <= 255:
        raise ValueError("committee size must be 1..255")
    if not 1 <= threshold <= n:
        raise ValueError("threshold must be 1..committee size")
    if len({m.peer_id for m in committee}) != n:
        raise ValueError("duplicate committee member")
    if any(len(m.mask_nonce) != NONCE_LEN or len(m.box_key) != KEY_LEN for m in committee):
        raise ValueError("committee keys and nonces must be 32 bytes")


def _index_set(values: Iterable[int], n: int, what: str) -> tuple[int, ...]:
    out = tuple(values)
    if list(out) != sorted(set(out)) or any(not 0 <= i < n for i in out):
        raise SecAggError("bad_index_set", f"{what}: sorted distinct committee indices expected")
    return out


def _others(indices: Sequence[int], me: int) -> list[int]:
    return [i for i in indices if i != me]


# -- one member -----------------------------------------------------------------------------


class MaskingMember:
    """Member ``index``'s secure-aggregation state for one query.

    Call in order: :meth:`key_shares`, :meth:`open_relay`, :meth:`masked_input`,
    :meth:`reveal`. ``channels[i]`` is the long-term channel with member ``i``
    (``None`` at ``index``); ``mask_nonce`` the nonce this member offered, which
    the committee must list for it.
    """

    def __init__(
        self,
        *,
        context: bytes,
        committee: Sequence[Participant],
        index: int,
        threshold: int,
        mask_nonce: bytes,
        channels: Sequence[Channel | None],
        random_bytes: RandomBytes = nacl.utils.random,
    ) -> None:
        _check_committee(committee, threshold)
        if not 0 <= index < len(committee) or len(channels) != len(committee):
            raise ValueError("index or channels do not match the committee")
        if mask_nonce != committee[index].mask_nonce:
            raise ValueError("our mask nonce is not the one the committee lists for us")
        self.context = context
        self.committee = tuple(committee)
        self.index = index
        self.threshold = threshold
        self._channels = channels
        self._random_bytes = random_bytes
        self._committee_hash = committee_digest(context, committee, threshold)
        self._seed = random_bytes(SEED_LEN)
        self._own_share: int | None = None
        self._held: dict[int, int] = {}  # sender -> our share of its b
        self.u1: tuple[int, ...] | None = None
        self._view = b""
        self._pair_seeds: dict[int, bytes] = {}
        self.masked = False
        self.revealed = False

    @property
    def n(self) -> int:
        return len(self.committee)

    def _channel(self, i: int) -> Channel:
        channel = self._channels[i]
        if channel is None:  # pragma: no cover - a bug in the caller
            raise ValueError(f"no channel with member {i}")
        return channel

    def key_shares(self) -> tuple[tuple[bytes, ...], bytes]:
        """Ciphertexts for every other member (committee order) and the commitment to b."""
        if self._own_share is not None:
            raise SecAggError("twice", "key shares were already made")
        xs = list(range(1, self.n + 1))
        b_shares = shamir.split(
            int.from_bytes(self._seed, "big"), xs, self.threshold, self._random_bytes
        )
        head = self.context + bytes([self.index])
        nonce = self.committee[self.index].mask_nonce
        out = []
        for v in range(self.n):
            if v == self.index:
                continue
            plaintext = head + bytes([v]) + nonce + shamir.element_to_bytes(b_shares[v])
            out.append(self._channel(v).encrypt(plaintext))
        self._own_share = b_shares[self.index]
        return tuple(out), commit_seed(self.context, self.index, self._seed)

    def open_relay(self, u1: Sequence[int], ciphertexts: Sequence[bytes]) -> None:
        """Take ``U1`` and the shares its other members sent us (``U1`` order)."""
        if self._own_share is None or self.u1 is not None:
            raise SecAggError("out_of_order", "relay before our key shares, or twice")
        members = _index_set(u1, self.n, "U1")
        if self.index not in members:
            raise SecAggError("not_in_u1", "the relay leaves us out of U1")
        if len(members) < self.threshold:
            raise SecAggError("too_few_in_u1", "U1 is smaller than the threshold")
        senders = _others(members, self.index)
        if len(ciphertexts) != len(senders):
            raise SecAggError("bad_relay", "one ciphertext per other member of U1 expected")
        held: dict[int, int] = {}
        at = 34 + NONCE_LEN
        for sender, ciphertext in zip(senders, ciphertexts, strict=True):
            plain = self._channel(sender).decrypt(ciphertext)
            if len(plain) != _PLAIN_LEN or plain[:32] != self.context:
                raise SecAggError("bad_key_share", "a key share is not for this query")
            if plain[32] != sender or plain[33] != self.index:
                raise SecAggError("bad_key_share", "a key share is not from/for these members")
            if plain[34:at] != self.committee[sender].mask_nonce:
                raise SecAggError(
                    "mask_nonce_mismatch", "a member's mask nonce differs from the committee's"
                )
            try:
                held[sender] = shamir.element_from_bytes(plain[at:])
            except ValueError as exc:
                raise SecAggError("bad_key_share", "a share is not a field element") from exc
        self._held = held
        self.u1 = members
        self._view = view_digest(self._committee_hash, members)

    def prepare(self, indices: Iterable[int] | None = None) -> None:
        """Derive the pair seeds now (e.g. while the model runs); idempotent. Cheap:
        one HKDF per pair from the cached long-term channel, no X25519."""
        me = self.committee[self.index]
        for v in range(self.n) if indices is None else indices:
            if v != self.index and v not in self._pair_seeds:
                self._pair_seeds[v] = pair_seed(
                    self._channel(v).mask_root, self._committee_hash, me, self.committee[v]
                )

    def masked_input(self, words: Words) -> tuple[Words, tuple[bytes, ...]]:
        """``y = x + PRG(b) + pairwise masks over U1``, and our view tags (U1 order)."""
        if self.u1 is None:
            raise SecAggError("out_of_order", "masked input before the relay")
        if self.masked:
            raise SecAggError("twice", "one masked input per query")
        others = _others(self.u1, self.index)
        self.prepare(others)
        n = len(words)
        y = np.array(words, dtype=np.uint64)
        _add(y, self_mask(self._seed, n))
        for v in others:
            _add(y, pair_mask(self._pair_seeds[v], n, self.index, v))
        tags = tuple(
            self._channel(v).tag(_tag_message(self.context, self.index, v, self._view))
            for v in others
        )
        self.masked = True
        return y, tags

    def reveal(
        self, survivors: Sequence[int], dropped: Sequence[int], tags: Sequence[bytes]
    ) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """Our shares of b for ``survivors`` and our pair seeds with ``dropped``.

        ``tags``: each other survivor's view tag for us, in ``survivors`` order.
        Refuses (SecAggError) anything that breaks the rules in the module docs;
        a refusal reveals nothing and leaves the member able to answer once.
        """
        if self.revealed:
            raise SecAggError("already_revealed", "this member already revealed for this query")
        if not self.masked or self.u1 is None or self._own_share is None:
            raise SecAggError("out_of_order", "unmask before our masked input")
        s_set = _index_set(survivors, self.n, "survivors")
        d_set = _index_set(dropped, self.n, "dropped")
        if set(s_set) & set(d_set):
            # a share of b_j and the seed with j, for the same j: never both
            raise SecAggError("both_kinds", "a member listed as both survivor and dropped")
        if set(s_set) | set(d_set) != set(self.u1):
            raise SecAggError("view_mismatch", "survivors and dropped are not our U1")
        if self.index not in s_set:
            raise SecAggError("not_a_survivor", "asked to reveal while listed as dropped")
        if len(s_set) < self.threshold:
            raise SecAggError("too_few_survivors", "fewer survivors than the threshold")
        if len(d_set) > self.threshold - 2:
            raise SecAggError("too_many_dropped", "more dropped members than t - 2")
        others = _others(s_set, self.index)
        if len(tags) != len(others):
            raise SecAggError("bad_view_tag", "one view tag per other survivor expected")
        for s, tag in zip(others, tags, strict=True):
            message = _tag_message(self.context, s, self.index, self._view)
            if not self._channel(s).verify(message, tag):
                raise SecAggError("bad_view_tag", "a survivor masked over another view")
        b_out = tuple(
            shamir.element_to_bytes(self._own_share if s == self.index else self._held[s])
            for s in s_set
        )
        self.prepare(d_set)
        seeds_out = tuple(self._pair_seeds[d] for d in d_set)
        self.revealed = True
        return b_out, seeds_out


# -- the querier --------------------------------------------------------------------------------


class Aggregator:
    """The querier's side: relays key shares, collects masked inputs and reveals, unmasks."""

    def __init__(
        self, *, context: bytes, committee: Sequence[Participant], threshold: int
    ) -> None:
        _check_committee(committee, threshold)
        self.context = context
        self.committee = tuple(committee)
        self.threshold = threshold
        self._ciphertexts: dict[int, tuple[bytes, ...]] = {}
        self._commits: dict[int, bytes] = {}
        self.u1: tuple[int, ...] | None = None
        self._masked: dict[int, Words] = {}
        self._tags: dict[int, tuple[bytes, ...]] = {}
        self.survivors: tuple[int, ...] | None = None
        self.dropped: tuple[int, ...] = ()
        # survivor -> (its shares of the survivors' b, its seeds with the dropped)
        self._reveals: dict[int, tuple[tuple[int, ...], tuple[bytes, ...]]] = {}

    @property
    def n(self) -> int:
        return len(self.committee)

    @property
    def keyed(self) -> tuple[int, ...]:
        return tuple(sorted(self._ciphertexts))

    @property
    def masked(self) -> tuple[int, ...]:
        return tuple(sorted(self._masked))

    @property
    def revealed(self) -> tuple[int, ...]:
        return tuple(sorted(self._reveals))

    def add_key_shares(self, index: int, ciphertexts: Sequence[bytes], commitment: bytes) -> None:
        if self.u1 is not None or index in self._ciphertexts:
            raise SecAggError("out_of_order", "key shares after the relay, or twice")
        if len(ciphertexts) != self.n - 1 or any(len(c) != CIPHERTEXT_LEN for c in ciphertexts):
            raise SecAggError("bad_key_shares", "one ciphertext per other member expected")
        if len(commitment) != COMMIT_LEN:
            raise SecAggError("bad_key_shares", "commitment must be 32 bytes")
        self._ciphertexts[index] = tuple(ciphertexts)
        self._commits[index] = commitment

    def fix_u1(self, exclude: Iterable[int] = ()) -> tuple[int, ...]:
        """Close the key round: ``U1`` = members whose key shares arrived (>= t),
        minus ``exclude`` (members known to have given up)."""
        if self.u1 is not None:
            raise SecAggError("out_of_order", "U1 is already fixed")
        gone = set(exclude)
        u1 = tuple(i for i in self.keyed if i not in gone)
        if len(u1) < self.threshold:
            raise SecAggError("too_few_key_shares", "fewer key shares than the threshold")
        self.u1 = u1
        return u1

    def relay_for(self, recipient: int) -> tuple[bytes, ...]:
        """The ciphertexts addressed to ``recipient`` from the rest of U1 (U1 order)."""
        if self.u1 is None or recipient not in self.u1:
            raise SecAggError("out_of_order", "relay for a member outside U1")
        # sender v's list skips v itself: recipient r sits at r, or r - 1 when r > v
        return tuple(
            self._ciphertexts[v][recipient if recipient < v else recipient - 1]
            for v in _others(self.u1, recipient)
        )

    def add_masked(self, index: int, words: Words, tags: Sequence[bytes]) -> None:
        if self.u1 is None or self.survivors is not None:
            raise SecAggError("out_of_order", "masked input outside the masking round")
        if index not in self.u1 or index in self._masked:
            raise SecAggError("unexpected", "masked input from outside U1, or twice")
        if len(tags) != len(self.u1) - 1 or any(len(t) != TAG_LEN for t in tags):
            raise SecAggError("bad_view_tags", "one view tag per other member of U1 expected")
        self._masked[index] = np.array(words, dtype=np.uint64)
        self._tags[index] = tuple(tags)

    def fix_survivors(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Close the masking round: ``S`` = masked inputs received (>= t), ``D = U1 - S``
        (at most ``t - 2``: members refuse to reveal for more)."""
        if self.u1 is None or self.survivors is not None:
            raise SecAggError("out_of_order", "survivors fixed twice or before U1")
        if len(self._masked) < self.threshold:
            raise SecAggError("too_few_shares", "fewer masked inputs than the threshold")
        if len(self.u1) - len(self._masked) > self.threshold - 2:
            raise SecAggError("too_many_dropped", "more members dropped than t - 2")
        self.survivors = self.masked
        self.dropped = tuple(i for i in self.u1 if i not in self._masked)
        return self.survivors, self.dropped

    def tags_for(self, recipient: int) -> tuple[bytes, ...]:
        """Each other survivor's view tag addressed to ``recipient`` (survivor order)."""
        if self.survivors is None or self.u1 is None:
            raise SecAggError("out_of_order", "no survivors yet")
        out = []
        for s in _others(self.survivors, recipient):
            out.append(self._tags[s][_others(self.u1, s).index(recipient)])
        return tuple(out)

    def add_reveal(
        self, index: int, b_shares: Sequence[bytes], pair_seeds: Sequence[bytes]
    ) -> None:
        if self.survivors is None or index not in self.survivors or index in self._reveals:
            raise SecAggError("unexpected", "reveal from a non-survivor, or twice")
        if len(b_shares) != len(self.survivors) or len(pair_seeds) != len(self.dropped):
            raise SecAggError("bad_reveal", "one share per survivor and a seed per dropped")
        if any(len(s) != SEED_LEN for s in pair_seeds):
            raise SecAggError("bad_reveal", f"pair seeds are {SEED_LEN} bytes")
        try:
            b = tuple(shamir.element_from_bytes(x) for x in b_shares)
        except ValueError as exc:
            raise SecAggError("bad_reveal", "a revealed share is not a field element") from exc
        self._reveals[index] = (b, tuple(pair_seeds))

    @property
    def needs_every_survivor(self) -> bool:
        """With dropped members, every survivor's seeds are needed (not any ``t``)."""
        return bool(self.dropped)

    @property
    def ready(self) -> bool:
        if len(self._reveals) < self.threshold:
            return False
        return not self.dropped or len(self._reveals) == len(self.survivors or ())

    def unmask(self) -> Words:
        """The sum of the survivors' inputs (mod 2**64): self masks from the first
        ``t`` reveals, pairwise masks with the dropped from every survivor's seeds."""
        if self.survivors is None or not self.ready:
            raise SecAggError("too_few_reveals", "fewer reveals than needed")
        survivors, dropped = self.survivors, self.dropped
        revealers = sorted(self._reveals)[: self.threshold]
        weights = shamir.lagrange_at_zero([r + 1 for r in revealers])

        def rebuild(position: int) -> bytes:
            points = [(r + 1, self._reveals[r][0][position]) for r in revealers]
            value = shamir.combine(points, weights=weights)
            if value >= _SECRET_BOUND:
                raise SecAggError("unmask_inconsistent", "a rebuilt secret is out of range")
            return value.to_bytes(SEED_LEN, "big")

        n_words = len(next(iter(self._masked.values())))
        total = np.zeros(n_words, dtype=np.uint64)
        for position, s in enumerate(survivors):
            _add(total, self._masked[s])
            seed = rebuild(position)
            if not hmac.compare_digest(commit_seed(self.context, s, seed), self._commits[s]):
                raise SecAggError("unmask_inconsistent", "a rebuilt self-mask seed is wrong")
            _sub(total, self_mask(seed, n_words))
            # s's masks with the dropped, from the seeds s revealed itself (unverifiable:
            # a wrong one garbles the sum, which the querier's range check catches)
            if dropped:  # then every survivor revealed (see ready)
                for d, pair in zip(dropped, self._reveals[s][1], strict=True):
                    _sub(total, pair_mask(pair, n_words, s, d))
        return total
