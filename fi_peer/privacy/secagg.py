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

1. Keys (Offer/Accept). Member ``u`` draws a fresh X25519 *mask key* pair
   ``(m_u, M_u)`` for this query only: its secret is Shamir-shared and may be
   revealed if ``u`` drops, so it is never the long-term key.
2. Key shares (right after Accept). ``u`` draws a 32-byte self-mask seed
   ``b_u``, Shamir-shares ``b_u`` and ``m_u`` (threshold ``t``, x = index + 1)
   over the committee, keeps its own share, and encrypts share ``v`` to
   member ``v`` on their long-term channel (below). It also commits to
   ``b_u`` (SHA-256) so the querier can check what it later reconstructs.
3. Relay. The querier forwards to each member the ciphertexts addressed to
   it from every member whose key shares arrived: that set is ``U1``.
4. Masked input. ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in U1, v != u}
   ±PRG(s_uv)`` (``+`` when ``u < v``), ``s_uv = HKDF(X25519(m_u, M_v))``
   bound to the query and both members, so ``s_uv = s_vu`` and the pair's
   masks cancel in a sum that holds both. With it go *view tags* (below).
5. Unmask. Survivors ``S`` (masked input received) and dropped ``D = U1 - S``.
   Each survivor reveals its shares of ``b_s`` for ``s`` in ``S`` and of
   ``m_d`` for ``d`` in ``D``. With ``t`` reveals the querier rebuilds those
   secrets, removes the self masks of ``S`` and the pairwise masks between
   ``S`` and ``D``; the masks among ``S`` cancel. Result: ``sum_{s in S} x_s``.

Why a late-declared dropout stays hidden (double masking): a member never
reveals both shares of ``b_u`` and of ``m_u``. A querier that received
``y_u`` and then calls ``u`` dropped learns ``m_u``, hence every pairwise mask
of ``u``, but ``y_u`` still carries ``PRG(b_u)``.

Rules a member enforces before revealing (``SecAggError.reason`` in brackets):
it revealed nothing yet for this query (``already_revealed``); ``S`` and ``D``
are disjoint (``both_kinds``) and make up exactly its own ``U1``
(``view_mismatch``); it is in ``S`` itself (``not_a_survivor``); ``|S| >= t``
(``too_few_survivors``); and every other survivor's view tag verifies
(``bad_view_tag``).

Against an active querier (beyond honest-but-curious): each share ciphertext
carries the sender's mask public key, so a querier that swapped mask keys in
its Accepts is caught at the relay (``mask_key_mismatch``); the long-term
keys that authenticate the ciphertexts are checked by the protocol against
the peers' own signed announcements. A *view tag* is a MAC, under the key of
the pair's long-term channel, over the committee, ``t`` and the ``U1`` its
sender masked over; a revealing member checks one tag per survivor, so a
querier cannot tell one member a smaller ``U1`` (which would let it peel that
member's input out with the shares the others reveal). With one reveal per
member and ``2t > n`` (the protocol requires a strict majority), two quorums
of ``t`` revealers always have a member in common, who answered ONE request:
any seed secret and any key secret the querier rebuilds come from one
consistent (S, D) split, which bounds what it can get by sending different
survivor sets to different members. Bonawitz's extra consistency round
(signed survivor lists, for ``t > 2n/3`` against a malicious server that
colludes with members) is not implemented: against a querier that sends
different survivor sets to different members, the guarantee is this quorum
argument, not Bonawitz's proof. A member that sends garbage key shares makes
the query fail (the recipients decline): a denial of service, not a leak.

Parameters (constant; changing any of them is a new protocol version):

- Mask words: uint64, sums mod 2**64.
- PRG: SHAKE-256 (FIPS 202) of ``label || seed`` with 32-byte seeds,
  squeezed to ``8 * L`` bytes read as little-endian uint64. 256-bit security
  as an XOF; in the standard library; ~1 µs for the vectors used here.
- Pair seeds: HKDF-SHA256 (RFC 5869), salt = the 32-byte session context
  ``SHA-256(DOMAIN | querier id | query id)``, IKM = the X25519 output,
  info = label, both peer ids and both mask keys (ordered by peer id).
  An all-zero X25519 output (low-order key) is refused.
- Shamir: GF(2**521 - 1) (see shamir.py); each secret is one 32-byte value.
- Share encryption: NaCl Box (X25519, XSalsa20-Poly1305) between the two
  members' LONG-TERM X25519 keys. Not the mask keys: a dropped member's mask
  key is revealed, and with it the querier could open every share that member
  sent or received (including the shares of its ``b``). Long-term keys are
  never revealed, authenticate both ends, and their precomputed Box is cached
  across queries (no X25519 per share). Cost: no forward secrecy for shares
  if a long-term key leaks later; one leaked key exposes one share of each
  secret, and reconstruction needs ``t``.
- View tags: HMAC-SHA256 truncated to 16 bytes, key = HKDF of the pair's
  Box key.
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
    "SEED_LEN",
    "TAG_LEN",
    "Aggregator",
    "Channel",
    "MaskingMember",
    "Participant",
    "SecAggError",
    "agree",
    "commit_seed",
    "committee_digest",
    "hkdf_sha256",
    "mask_keypair",
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
# context | sender index | recipient index | sender's mask key | share of b | share of m
_PLAIN_LEN = 32 + 1 + 1 + KEY_LEN + 2 * shamir.SHARE_LEN
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


def mask_keypair(random_bytes: RandomBytes = nacl.utils.random) -> tuple[bytes, bytes]:
    """A fresh X25519 (secret, public) pair for one query's pairwise masks."""
    secret = random_bytes(KEY_LEN)
    return secret, nacl.bindings.crypto_scalarmult_base(secret)


def agree(secret: bytes, public: bytes) -> bytes:
    """X25519; SecAggError for a low-order public key (all-zero output)."""
    try:
        return nacl.bindings.crypto_scalarmult(secret, public)
    except nacl.exceptions.CryptoError as exc:
        raise SecAggError("bad_mask_key", "X25519 with this key gives no secret") from exc


_P25519 = (1 << 255) - 19
# Every u-coordinate (bit 255 ignored, as X25519 ignores it) whose X25519 output is
# all zero for every clamped scalar: the points of order 1, 2, 4 and 8 on the curve
# and its twist, 0, 1, -1 and the two of order 8, plus the non-canonical p and p + 1.
# Comparing against them gives what a trial X25519 (libsodium refuses exactly these)
# gives, for ~0.3 us instead of ~50 us; agree() still refuses them when it runs.
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
    box_key: bytes  # long-term X25519 public key (share encryption, view tags)
    mask_key: bytes  # this query's X25519 mask public key


def pair_seed(context: bytes, shared: bytes, a: Participant, b: Participant) -> bytes:
    """The pairwise mask seed of ``a`` and ``b``; symmetric in them."""
    lo, hi = (a, b) if a.peer_id < b.peer_id else (b, a)
    info = (
        DOMAIN + b"pair" + lo.peer_id.encode() + hi.peer_id.encode() + lo.mask_key + hi.mask_key
    )
    return hkdf_sha256(shared, salt=context, info=info)


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
        h.update(m.peer_id.encode() + m.box_key + m.mask_key)
    return h.digest()


def view_digest(committee_hash: bytes, u1: Sequence[int]) -> bytes:
    return hashlib.sha256(DOMAIN + b"view" + committee_hash + bytes(u1)).digest()


def _add(acc: Words, words: Words) -> None:
    np.add(acc, words, out=acc, dtype=np.uint64)


def _sub(acc: Words, words: Words) -> None:
    np.subtract(acc, words, out=acc, dtype=np.uint64)


class Channel:
    """The long-term channel of two members: NaCl Box + a MAC key derived from it.

    Build once per peer and cache it: the constructor does the X25519.
    """

    __slots__ = ("_box", "_mac_key")

    def __init__(self, my_secret: nacl.public.PrivateKey, their_public: bytes) -> None:
        try:
            self._box = nacl.public.Box(my_secret, nacl.public.PublicKey(their_public))
        except nacl.exceptions.CryptoError as exc:
            raise SecAggError("bad_box_key", "no channel with this long-term key") from exc
        self._mac_key = hkdf_sha256(self._box.shared_key(), salt=b"", info=DOMAIN + b"view-mac")

    def encrypt(self, plaintext: bytes) -> bytes:
        return bytes(self._box.encrypt(plaintext))

    def decrypt(self, ciphertext: bytes) -> bytes:
        try:
            return self._box.decrypt(ciphertext)
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
    if any(len(m.mask_key) != KEY_LEN or len(m.box_key) != KEY_LEN for m in committee):
        raise ValueError("committee keys must be 32 bytes")


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
    (``None`` at ``index``).
    """

    def __init__(
        self,
        *,
        context: bytes,
        committee: Sequence[Participant],
        index: int,
        threshold: int,
        mask_secret: bytes,
        channels: Sequence[Channel | None],
        random_bytes: RandomBytes = nacl.utils.random,
        mask_public: bytes | None = None,
    ) -> None:
        _check_committee(committee, threshold)
        if not 0 <= index < len(committee) or len(channels) != len(committee):
            raise ValueError("index or channels do not match the committee")
        # ``mask_public``: the public half that mask_keypair() returned with
        # ``mask_secret`` (the caller kept it), so comparing bytes is enough; without
        # it the public key is recomputed (one X25519 base multiplication).
        if mask_public is None:
            mask_public = nacl.bindings.crypto_scalarmult_base(mask_secret)
        if mask_public != committee[index].mask_key:
            raise ValueError("our mask key is not the one the committee lists for us")
        self.context = context
        self.committee = tuple(committee)
        self.index = index
        self.threshold = threshold
        self._mask_secret = mask_secret
        self._channels = channels
        self._random_bytes = random_bytes
        self._committee_hash = committee_digest(context, committee, threshold)
        self._seed = random_bytes(SEED_LEN)
        self._own_shares: tuple[int, int] | None = None
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (share of b, share of m)
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
        if self._own_shares is not None:
            raise SecAggError("twice", "key shares were already made")
        xs = list(range(1, self.n + 1))
        b = int.from_bytes(self._seed, "big")
        m = int.from_bytes(self._mask_secret, "big")
        b_shares = shamir.split(b, xs, self.threshold, self._random_bytes)
        m_shares = shamir.split(m, xs, self.threshold, self._random_bytes)
        me = self.committee[self.index]
        out = []
        for v in range(self.n):
            if v == self.index:
                continue
            plaintext = (
                self.context
                + bytes([self.index, v])
                + me.mask_key
                + shamir.element_to_bytes(b_shares[v])
                + shamir.element_to_bytes(m_shares[v])
            )
            out.append(self._channel(v).encrypt(plaintext))
        self._own_shares = (b_shares[self.index], m_shares[self.index])
        return tuple(out), commit_seed(self.context, self.index, self._seed)

    def open_relay(self, u1: Sequence[int], ciphertexts: Sequence[bytes]) -> None:
        """Take ``U1`` and the shares its other members sent us (``U1`` order)."""
        if self._own_shares is None or self.u1 is not None:
            raise SecAggError("out_of_order", "relay before our key shares, or twice")
        members = _index_set(u1, self.n, "U1")
        if self.index not in members:
            raise SecAggError("not_in_u1", "the relay leaves us out of U1")
        if len(members) < self.threshold:
            raise SecAggError("too_few_in_u1", "U1 is smaller than the threshold")
        senders = _others(members, self.index)
        if len(ciphertexts) != len(senders):
            raise SecAggError("bad_relay", "one ciphertext per other member of U1 expected")
        held: dict[int, tuple[int, int]] = {}
        for sender, ciphertext in zip(senders, ciphertexts, strict=True):
            plain = self._channel(sender).decrypt(ciphertext)
            if len(plain) != _PLAIN_LEN or plain[:32] != self.context:
                raise SecAggError("bad_key_share", "a key share is not for this query")
            if plain[32] != sender or plain[33] != self.index:
                raise SecAggError("bad_key_share", "a key share is not from/for these members")
            if plain[34 : 34 + KEY_LEN] != self.committee[sender].mask_key:
                raise SecAggError(
                    "mask_key_mismatch", "a member's mask key differs from the committee's"
                )
            at = 34 + KEY_LEN
            try:
                b_share = shamir.element_from_bytes(plain[at : at + shamir.SHARE_LEN])
                m_share = shamir.element_from_bytes(plain[at + shamir.SHARE_LEN :])
            except ValueError as exc:
                raise SecAggError("bad_key_share", "a share is not a field element") from exc
            held[sender] = (b_share, m_share)
        self._held = held
        self.u1 = members
        self._view = view_digest(self._committee_hash, members)

    def prepare(self, indices: Iterable[int] | None = None) -> None:
        """Do the X25519 agreements now (e.g. while the model runs); idempotent."""
        for v in range(self.n) if indices is None else indices:
            if v != self.index and v not in self._pair_seeds:
                shared = agree(self._mask_secret, self.committee[v].mask_key)
                self._pair_seeds[v] = pair_seed(
                    self.context, shared, self.committee[self.index], self.committee[v]
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
        """Our shares of b for ``survivors`` and of the mask keys of ``dropped``.

        ``tags``: each other survivor's view tag for us, in ``survivors`` order.
        Refuses (SecAggError) anything that breaks the rules in the module docs.
        """
        if self.revealed:
            raise SecAggError("already_revealed", "this member already revealed for this query")
        if not self.masked or self.u1 is None or self._own_shares is None:
            raise SecAggError("out_of_order", "unmask before our masked input")
        s_set = _index_set(survivors, self.n, "survivors")
        d_set = _index_set(dropped, self.n, "dropped")
        if set(s_set) & set(d_set):
            raise SecAggError("both_kinds", "a member listed as both survivor and dropped")
        if set(s_set) | set(d_set) != set(self.u1):
            raise SecAggError("view_mismatch", "survivors and dropped are not our U1")
        if self.index not in s_set:
            raise SecAggError("not_a_survivor", "asked to reveal while listed as dropped")
        if len(s_set) < self.threshold:
            raise SecAggError("too_few_survivors", "fewer survivors than the threshold")
        others = _others(s_set, self.index)
        if len(tags) != len(others):
            raise SecAggError("bad_view_tag", "one view tag per other survivor expected")
        for s, tag in zip(others, tags, strict=True):
            message = _tag_message(self.context, s, self.index, self._view)
            if not self._channel(s).verify(message, tag):
                raise SecAggError("bad_view_tag", "a survivor masked over another view")
        own_b, _own_m = self._own_shares
        b_out = tuple(
            shamir.element_to_bytes(own_b if s == self.index else self._held[s][0]) for s in s_set
        )
        m_out = tuple(shamir.element_to_bytes(self._held[d][1]) for d in d_set)
        self.revealed = True
        return b_out, m_out


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
        self._reveals: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

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
        """Close the masking round: ``S`` = masked inputs received (>= t), ``D = U1 - S``."""
        if self.u1 is None or self.survivors is not None:
            raise SecAggError("out_of_order", "survivors fixed twice or before U1")
        if len(self._masked) < self.threshold:
            raise SecAggError("too_few_shares", "fewer masked inputs than the threshold")
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

    def add_reveal(self, index: int, b_shares: Sequence[bytes], m_shares: Sequence[bytes]) -> None:
        if self.survivors is None or index not in self.survivors or index in self._reveals:
            raise SecAggError("unexpected", "reveal from a non-survivor, or twice")
        if len(b_shares) != len(self.survivors) or len(m_shares) != len(self.dropped):
            raise SecAggError("bad_reveal", "one share per survivor and per dropped member")
        try:
            b = tuple(shamir.element_from_bytes(x) for x in b_shares)
            m = tuple(shamir.element_from_bytes(x) for x in m_shares)
        except ValueError as exc:
            raise SecAggError("bad_reveal", "a revealed share is not a field element") from exc
        self._reveals[index] = (b, m)

    @property
    def ready(self) -> bool:
        return len(self._reveals) >= self.threshold

    def unmask(self) -> Words:
        """The sum of the survivors' inputs (mod 2**64), from the first ``t`` reveals."""
        if self.survivors is None or not self.ready:
            raise SecAggError("too_few_reveals", "fewer reveals than the threshold")
        survivors, dropped = self.survivors, self.dropped
        revealers = sorted(self._reveals)[: self.threshold]
        weights = shamir.lagrange_at_zero([r + 1 for r in revealers])

        def rebuild(column: int, position: int) -> bytes:
            points = [(r + 1, self._reveals[r][column][position]) for r in revealers]
            value = shamir.combine(points, weights=weights)
            if value >= _SECRET_BOUND:
                raise SecAggError("unmask_inconsistent", "a rebuilt secret is out of range")
            return value.to_bytes(SEED_LEN, "big")

        n_words = len(next(iter(self._masked.values())))
        total = np.zeros(n_words, dtype=np.uint64)
        for position, s in enumerate(survivors):
            _add(total, self._masked[s])
            seed = rebuild(0, position)
            if not hmac.compare_digest(commit_seed(self.context, s, seed), self._commits[s]):
                raise SecAggError("unmask_inconsistent", "a rebuilt self-mask seed is wrong")
            _sub(total, self_mask(seed, n_words))
        for position, d in enumerate(dropped):
            secret = rebuild(1, position)
            if nacl.bindings.crypto_scalarmult_base(secret) != self.committee[d].mask_key:
                raise SecAggError("unmask_inconsistent", "a rebuilt mask key is wrong")
            for s in survivors:
                shared = agree(secret, self.committee[s].mask_key)
                seed = pair_seed(self.context, shared, self.committee[s], self.committee[d])
                _sub(total, pair_mask(seed, n_words, s, d))
        return total
