"""Secure aggregation (fi_peer/privacy/secagg.py) and Shamir sharing (shamir.py).

Pure, in memory, deterministic: every random byte comes from a seeded numpy
generator, so a failure reproduces. The protocol-level flows (messages,
timers, drops on the wire) are in test_protocol_private.py.
"""

from __future__ import annotations

import hmac
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.utils
import numpy as np
import pytest
from scipy import stats

from fi_peer.privacy import secagg, shamir
from fi_peer.privacy.secagg import (
    Aggregator,
    Channel,
    MaskingMember,
    Participant,
    SecAggError,
)
from fi_peer.protocol import fixedpoint

QUERIER = "f" * 64
QUERY_ID = b"\x01" * 16
N_WORDS = 12
# Rounding to 24 fractional bits moves each value by at most half a step.
HALF_STEP = 2.0**-25


def rng_bytes(seed: int) -> Callable[[int], bytes]:
    gen = np.random.default_rng(seed)
    return lambda n: gen.bytes(n)


def threshold(k: int) -> int:
    return k // 2 + 1


# -- a whole secure aggregation, in memory ---------------------------------------------------


@dataclass
class Committee:
    """k members with long-term keys and per-query mask nonces, and the querier's Aggregator."""

    context: bytes
    committee: list[Participant]
    members: list[MaskingMember]
    aggregator: Aggregator
    long_term: list[nacl.public.PrivateKey]

    @property
    def k(self) -> int:
        return len(self.members)


_LONG_TERM = [nacl.public.PrivateKey(bytes([i + 1]) * 32) for i in range(64)]
_CHANNELS: dict[tuple[int, int], Channel] = {}


def channel(i: int, j: int) -> Channel:
    if (i, j) not in _CHANNELS:
        _CHANNELS[(i, j)] = Channel(_LONG_TERM[i], bytes(_LONG_TERM[j].public_key))
    return _CHANNELS[(i, j)]


def committee_of(
    k: int, t: int | None = None, *, seed: int = 0, query_id: bytes = QUERY_ID
) -> Committee:
    random_bytes = rng_bytes(seed)
    t = threshold(k) if t is None else t
    context = secagg.session_context(QUERIER, query_id)
    nonces = [secagg.mask_nonce(random_bytes) for _ in range(k)]
    committee = [
        Participant(f"{i:064x}", bytes(_LONG_TERM[i].public_key), nonces[i]) for i in range(k)
    ]
    members = [
        MaskingMember(
            context=context,
            committee=committee,
            index=i,
            threshold=t,
            mask_nonce=nonces[i],
            channels=[None if j == i else channel(i, j) for j in range(k)],
            random_bytes=random_bytes,
        )
        for i in range(k)
    ]
    aggregator = Aggregator(context=context, committee=committee, threshold=t)
    return Committee(context, committee, members, aggregator, _LONG_TERM[:k])


def run(
    c: Committee,
    xs: Sequence[np.ndarray],
    *,
    drop_keys: Iterable[int] = (),
    drop_masked: Iterable[int] = (),
    drop_reveal: Iterable[int] = (),
) -> np.ndarray:
    """One aggregation with members dropping before key shares, before their masked
    input, or before revealing. Returns the unmasked sum (words)."""
    drop_keys, drop_masked, drop_reveal = set(drop_keys), set(drop_masked), set(drop_reveal)
    agg = c.aggregator
    for i, member in enumerate(c.members):
        ciphertexts, commitment = member.key_shares()
        if i not in drop_keys:
            agg.add_key_shares(i, ciphertexts, commitment)
    u1 = agg.fix_u1()
    for i in u1:
        c.members[i].open_relay(u1, agg.relay_for(i))
        if i not in drop_masked:
            y, tags = c.members[i].masked_input(fixedpoint.encode(xs[i]))
            agg.add_masked(i, y, tags)
    survivors, dropped = agg.fix_survivors()
    for i in survivors:
        if i not in drop_reveal:
            shares, seeds = c.members[i].reveal(survivors, dropped, agg.tags_for(i))
            agg.add_reveal(i, shares, seeds)
    return agg.unmask()


def vectors(k: int, seed: int) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.uniform(-1000, 1000, N_WORDS) for _ in range(k)]


def assert_sum(total: np.ndarray, xs: Sequence[np.ndarray], included: Iterable[int]) -> None:
    ids = sorted(included)
    # exact in words (mod 2**64) ...
    words = np.zeros(N_WORDS, dtype=np.uint64)
    for i in ids:
        words = fixedpoint.add(words, fixedpoint.encode(xs[i]))
    assert np.array_equal(total, words)
    # ... hence within the fixed-point rounding of the true sum
    err = np.abs(fixedpoint.decode(total) - np.sum([xs[i] for i in ids], axis=0))
    assert np.all(err <= len(ids) * HALF_STEP + 1e-9), err.max()


# -- primitives ---------------------------------------------------------------------------------


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = secagg.hkdf_sha256(ikm, salt=salt, info=info, length=42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_prg_is_deterministic_labelled_and_sized() -> None:
    seed = b"s" * 32
    a = secagg.prg_words(seed, 5, b"x")
    assert a.dtype == np.uint64 and a.shape == (5,)
    assert np.array_equal(a, secagg.prg_words(seed, 5, b"x"))
    assert np.array_equal(a[:3], secagg.prg_words(seed, 3, b"x"))  # an XOF: prefixes agree
    assert not np.array_equal(a, secagg.prg_words(seed, 5, b"y"))
    assert not np.array_equal(a, secagg.prg_words(b"t" * 32, 5, b"x"))
    with pytest.raises(ValueError):
        secagg.prg_words(b"short", 5, b"x")


def _seed(c: Committee, u: int, v: int) -> bytes:
    """Member u's pair seed with v, as u derives it."""
    c.members[u].prepare([v])
    return c.members[u]._pair_seeds[v]


def test_pair_seeds_are_symmetric_and_bound_to_query_and_members() -> None:
    c = committee_of(3)
    assert _seed(c, 0, 1) == _seed(c, 1, 0)
    assert _seed(c, 0, 2) == _seed(c, 2, 0) != _seed(c, 0, 1)
    # the same derivation by hand: one HKDF-Expand block keyed by the channel's mask
    # root, over the committee digest (context, t, ids, long-term keys, nonces), ids
    digest = secagg.committee_digest(c.context, c.committee, 2)
    info = secagg.DOMAIN + b"pair" + digest + f"{0:064x}|{1:064x}".encode()
    by_hand = hmac.digest(channel(1, 0).mask_root, info + b"\x01", "sha256")
    assert by_hand == _seed(c, 0, 1)
    assert channel(0, 1).mask_root == channel(1, 0).mask_root  # both ends derive it
    # not the channel key itself, nor anything a long-term key alone gives
    assert channel(0, 1).mask_root not in {_seed(c, 0, 1), bytes(32)}
    other_querier = secagg.session_context("e" * 64, QUERY_ID)
    assert other_querier != c.context


def test_pair_seeds_differ_per_query_even_with_a_replayed_query_id() -> None:
    """Same members, same long-term keys: a new query id, or the same query id
    again (the members draw new nonces), or another threshold gives new seeds."""
    base = committee_of(4, seed=1)
    seeds = {_seed(base, 0, 1)}
    for other in (
        committee_of(4, seed=1, query_id=b"\x02" * 16),  # another query
        committee_of(4, seed=2),  # the same query id replayed: fresh nonces
        committee_of(4, 4, seed=1),  # same nonces, another threshold
    ):
        seeds.add(_seed(other, 0, 1))
        assert _seed(other, 1, 0) == _seed(other, 0, 1)
    assert len(seeds) == 4


def test_two_members_pairwise_masks_cancel_only_together() -> None:
    c = committee_of(4)

    def pairwise_part(u: int) -> np.ndarray:
        acc = np.zeros(N_WORDS, dtype=np.uint64)
        for v in range(4):
            if v != u:
                acc = fixedpoint.add(acc, secagg.pair_mask(_seed(c, u, v), N_WORDS, u, v))
        return acc

    seed01 = _seed(c, 0, 1)
    m01 = secagg.pair_mask(seed01, N_WORDS, 0, 1)
    m10 = secagg.pair_mask(seed01, N_WORDS, 1, 0)
    assert np.all(m01 != 0) and np.all(m10 != 0)
    assert np.array_equal(fixedpoint.add(m01, m10), np.zeros(N_WORDS, dtype=np.uint64))
    parts = [pairwise_part(u) for u in range(4)]
    zero = np.zeros(N_WORDS, dtype=np.uint64)
    for size in range(1, 5):
        for subset in itertools.combinations(range(4), size):
            total = zero
            for u in subset:
                total = fixedpoint.add(total, parts[u])
            cancels = np.array_equal(total, zero)
            assert cancels == (size == 4), subset  # only the whole committee cancels


# -- Shamir ---------------------------------------------------------------------------------


def test_prime_is_the_mersenne_prime_2_521_minus_1() -> None:
    p = shamir.PRIME
    assert p == 2**521 - 1 and shamir.SHARE_LEN == 66
    assert all(pow(a, p - 1, p) == 1 for a in (2, 3, 5, 7, 11, 13))  # Fermat, sanity
    assert p > 2 ** (8 * shamir.SECRET_LEN)  # a 32-byte secret is one field element


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3), (6, 4), (7, 7)])
def test_any_t_shares_reconstruct_and_more_do_too(n: int, t: int) -> None:
    secret = int.from_bytes(rng_bytes(n)(32), "big")
    xs = list(range(1, n + 1))
    shares = shamir.split(secret, xs, t, rng_bytes(100 + n))
    for size in range(t, n + 1):
        for subset in itertools.combinations(range(n), size):
            points = [(xs[i], shares[i]) for i in subset]
            assert shamir.combine(points) == secret


def test_t_minus_1_shares_do_not_give_the_secret() -> None:
    secret = 123456789
    xs = [1, 2, 3, 4, 5]
    shares = shamir.split(secret, xs, 3, rng_bytes(7))
    for subset in itertools.combinations(range(5), 2):
        assert shamir.combine([(xs[i], shares[i]) for i in subset]) != secret


@pytest.mark.parametrize(("p", "t", "n"), [(13, 3, 4), (11, 2, 3), (7, 4, 5)])
def test_t_minus_1_shares_are_independent_of_the_secret_exhaustively(
    p: int, t: int, n: int
) -> None:
    """Over a small field, enumerate every polynomial: for each set of t - 1
    x-coordinates the share tuples are uniform, for every secret alike."""
    xs = list(range(1, n + 1))
    for subset in itertools.combinations(range(n), t - 1):
        for secret in range(p):
            seen: Counter[tuple[int, ...]] = Counter()
            for coefficients in itertools.product(range(p), repeat=t - 1):
                poly = (secret, *coefficients)
                point = tuple(sum(c * xs[i] ** e for e, c in enumerate(poly)) % p for i in subset)
                seen[point] += 1
            assert len(seen) == p ** (t - 1) and set(seen.values()) == {1}, (secret, subset)
    # and the module's own split/combine on that field: t points give the secret back
    for secret in range(p):
        shares = shamir.split(secret, xs, t, rng_bytes(secret), prime=p)
        assert shamir.combine(list(zip(xs, shares, strict=True))[:t], prime=p) == secret


def test_split_uses_uniform_field_elements() -> None:
    p = 13
    draw = rng_bytes(5)
    values = [shamir.random_element(p, draw) for _ in range(13_000)]
    counts = np.bincount(values, minlength=p)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_share_encoding_is_strict() -> None:
    assert shamir.element_from_bytes(shamir.element_to_bytes(5)) == 5
    with pytest.raises(ValueError):
        shamir.element_from_bytes(b"\x00" * 65)
    with pytest.raises(ValueError):
        shamir.element_from_bytes(b"\xff" * 66)  # >= p
    with pytest.raises(ValueError):
        shamir.split(1, [1, 1, 2], 2)
    with pytest.raises(ValueError):
        shamir.split(1, [1, 2], 3)


# -- the sum, with dropouts at every round -----------------------------------------------------


@pytest.mark.parametrize("k", range(3, 17))
@pytest.mark.parametrize("stage", ["keys", "masked", "reveal"])
def test_sum_is_exact_with_every_number_of_dropouts_at_each_round(k: int, stage: str) -> None:
    t = threshold(k)
    xs = vectors(k, seed=k)
    for d in range(0, k - t + 1):
        c = committee_of(k, seed=1000 * k + d)
        gone = set(np.random.default_rng(d).choice(k, size=d, replace=False).tolist())
        if stage == "masked" and d > t - 2:  # members reveal seeds for at most t - 2
            with pytest.raises(SecAggError) as info:
                run(c, xs, drop_masked=gone)
            assert info.value.reason == "too_many_dropped"
            continue
        total = run(
            c,
            xs,
            drop_keys=gone if stage == "keys" else (),
            drop_masked=gone if stage == "masked" else (),
            drop_reveal=gone if stage == "reveal" else (),
        )
        included = set(range(k)) - gone if stage in ("keys", "masked") else set(range(k))
        assert_sum(total, xs, included)


@pytest.mark.parametrize("k", [5, 9, 16])
def test_sum_is_exact_with_dropouts_at_all_rounds_at_once(k: int) -> None:
    t = threshold(k)
    xs = vectors(k, seed=3)
    spare = k - t
    order = np.random.default_rng(k).permutation(k).tolist()
    # with no one dropped between relay and masked input, any t reveals do
    keys, reveal = order[: spare // 2], order[spare // 2 : spare]
    c = committee_of(k, seed=k)
    total = run(c, xs, drop_keys=keys, drop_reveal=reveal)
    assert_sum(total, xs, set(range(k)) - set(keys))
    # with someone dropped there, every survivor reveals (its seeds with the dropped)
    a = spare // 2
    b = min(spare - a, t - 2)
    keys, masked = order[:a], order[a : a + b]
    c = committee_of(k, seed=k + 1)
    total = run(c, xs, drop_keys=keys, drop_masked=masked)
    assert_sum(total, xs, set(range(k)) - set(keys) - set(masked))


@pytest.mark.parametrize("k", [5, 8])
def test_a_dropped_member_and_a_silent_survivor_fail_cleanly(k: int) -> None:
    """The price of pair seeds from long-term keys: only survivor s knows its seed
    with a dropped d, so once someone dropped, every survivor must reveal."""
    c = committee_of(k, seed=40 + k)
    with pytest.raises(SecAggError) as info:
        run(c, vectors(k, 2), drop_masked=[0], drop_reveal=[1])
    assert info.value.reason == "too_few_reveals"
    assert len(c.aggregator.revealed) >= threshold(k) and not c.aggregator.ready


@pytest.mark.parametrize("stage", ["keys", "masked", "reveal"])
@pytest.mark.parametrize("k", [3, 8, 16])
def test_below_threshold_the_query_fails_cleanly(k: int, stage: str) -> None:
    t = threshold(k)
    gone = list(range(k - t + 1))  # one more than can be spared
    c = committee_of(k)
    with pytest.raises(SecAggError) as info:
        run(
            c,
            vectors(k, 1),
            drop_keys=gone if stage == "keys" else (),
            drop_masked=gone if stage == "masked" else (),
            drop_reveal=gone if stage == "reveal" else (),
        )
    expected = {
        "keys": "too_few_key_shares",
        "masked": "too_few_shares",
        "reveal": "too_few_reveals",
    }
    assert info.value.reason == expected[stage]


def test_a_larger_than_majority_threshold_still_works() -> None:
    xs = vectors(6, 2)
    assert_sum(run(committee_of(6, 5), xs, drop_masked=[2]), xs, {0, 1, 3, 4, 5})


# -- what a single masked share shows ------------------------------------------------------------


def _one_masked_share(run_index: int, x: np.ndarray) -> np.ndarray:
    c = committee_of(3, seed=50_000 + run_index)
    agg = c.aggregator
    for i, member in enumerate(c.members):
        agg.add_key_shares(i, *member.key_shares())
    u1 = agg.fix_u1()
    member = c.members[0]
    member.open_relay(u1, agg.relay_for(0))
    y, _ = member.masked_input(fixedpoint.encode(x))
    return y


def _top_byte_chisquare_pvalue(words: np.ndarray) -> float:
    top = (words >> np.uint64(56)).astype(np.int64)
    return float(stats.chisquare(np.bincount(top, minlength=256)).pvalue)


def test_a_single_masked_share_is_indistinguishable_from_uniform() -> None:
    """Chi-square on the top byte and on every bit position of 2,000 masked
    shares of one fixed, very non-uniform vector (fixed seeds)."""
    x = np.array([0.0, 1.0, -1.0, 0.5, 3.0, 0.0, 1e6, -1e6] + [0.0] * (N_WORDS - 8))
    words = np.concatenate([_one_masked_share(i, x) for i in range(2000)])
    assert _top_byte_chisquare_pvalue(words) > 1e-3
    bits = ((words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(np.int64)
    ones = bits.sum(axis=0)
    n = len(words)
    pvalues = stats.binomtest  # one test per bit; Bonferroni over 64 bits
    assert all(pvalues(int(o), n).pvalue > 1e-3 / 64 for o in ones)
    # control: the same test rejects the unmasked vector and a weak (16-bit) mask
    plain = np.concatenate([fixedpoint.encode(x) for _ in range(2000)])
    assert _top_byte_chisquare_pvalue(plain) < 1e-9
    weak = plain + (words & np.uint64(0xFFFF))
    assert _top_byte_chisquare_pvalue(weak) < 1e-9


# -- the cheating querier ----------------------------------------------------------------------


def test_querier_claiming_a_member_dropped_after_its_share_cannot_unmask_it() -> None:
    """The querier holds every masked input, then tells the others that member 0
    dropped. It gets every pair seed of member 0 (hence all its pairwise masks)
    but no share of its self-mask seed, so member 0's vector stays hidden; and
    no member then answers a second request that would give that seed."""
    k = 5
    xs = vectors(k, 9)
    c = committee_of(k, seed=77)
    agg = c.aggregator
    for i, member in enumerate(c.members):
        agg.add_key_shares(i, *member.key_shares())
    u1 = agg.fix_u1()
    masked: dict[int, np.ndarray] = {}
    tags: dict[int, tuple[bytes, ...]] = {}
    for i in u1:
        c.members[i].open_relay(u1, agg.relay_for(i))
        masked[i], tags[i] = c.members[i].masked_input(fixedpoint.encode(xs[i]))
    # the lie: member 0 "dropped"; the honest aggregator never saw its input
    for i in range(1, k):
        agg.add_masked(i, masked[i], tags[i])
    survivors, dropped = agg.fix_survivors()
    assert survivors == (1, 2, 3, 4) and dropped == (0,)
    reveals = {i: c.members[i].reveal(survivors, dropped, agg.tags_for(i)) for i in survivors}
    # each reveal holds one seed share per survivor and one pair seed: with member 0
    assert all(len(sh) == 4 and len(sd) == 1 for sh, sd in reveals.values())
    assert all(reveals[v][1][0] == _seed(c, 0, v) for v in survivors)  # the real seeds
    # strip every pairwise mask of member 0 from its masked input
    peeled = masked[0].copy()
    for v in range(1, k):
        seed = reveals[v][1][0]
        peeled = np.subtract(peeled, secagg.pair_mask(seed, N_WORDS, 0, v), dtype=np.uint64)
    truth = fixedpoint.encode(xs[0])
    assert not np.any(peeled == truth)  # still under PRG(b_0): nothing of x_0 shows
    assert np.all(np.abs(fixedpoint.decode(peeled) - xs[0]) > 1e3)
    # the self mask is all that stands between it and x_0 (the test would fail on a
    # member that also revealed seed shares of a "dropped" member):
    seed0 = c.members[0]._seed
    unmasked = np.subtract(peeled, secagg.self_mask(seed0, N_WORDS), dtype=np.uint64)
    assert np.array_equal(unmasked, truth)
    # a second request, now asking for member 0's seed, is refused by everyone asked
    for i in survivors:
        with pytest.raises(SecAggError) as info:
            c.members[i].reveal((0, *survivors), (), ())
        assert info.value.reason == "already_revealed"
    # and the sum it may learn is still exactly the others' sum
    for i in survivors:
        agg.add_reveal(i, *reveals[i])
    assert_sum(agg.unmask(), xs, survivors)


def _ready(
    c: Committee, xs: Sequence[np.ndarray]
) -> tuple[tuple[int, ...], dict[int, tuple[bytes, ...]]]:
    agg = c.aggregator
    for i, member in enumerate(c.members):
        agg.add_key_shares(i, *member.key_shares())
    u1 = agg.fix_u1()
    tags = {}
    for i in u1:
        c.members[i].open_relay(u1, agg.relay_for(i))
        y, tags[i] = c.members[i].masked_input(fixedpoint.encode(xs[i]))
        agg.add_masked(i, y, tags[i])
    agg.fix_survivors()
    return u1, tags


@pytest.mark.parametrize(
    ("survivors", "dropped", "reason"),
    [
        ((0, 1, 2, 3), (3, 4), "both_kinds"),  # 3 in both
        ((0, 1, 2), (4,), "view_mismatch"),  # 3 missing
        ((0, 1, 2, 3, 4, 5), (), "bad_index_set"),  # not a member
        ((1, 2, 3), (0, 4), "not_a_survivor"),  # asked while listed as dropped
        ((0, 1), (2, 3, 4), "too_few_survivors"),
        ((0, 1, 2), (3, 4), "too_many_dropped"),  # t = 3: at most t - 2 = 1 dropped
    ],
)
def test_member_refuses_unmask_requests_that_break_the_rules(
    survivors: tuple[int, ...], dropped: tuple[int, ...], reason: str
) -> None:
    c = committee_of(5)
    _ready(c, vectors(5, 4))
    member = c.members[0]
    tags = tuple(c.aggregator._tags[s][[u for u in range(5) if u != s].index(0)]
                 for s in survivors if s != 0 and s < 5)
    with pytest.raises(SecAggError) as info:
        member.reveal(survivors, dropped, tags)
    assert info.value.reason == reason
    assert not member.revealed  # a refused request reveals nothing and uses nothing up
    agg = c.aggregator
    seeds, keys = member.reveal(agg.survivors or (), agg.dropped, agg.tags_for(0))
    assert len(seeds) == 5 and keys == ()


def test_member_refuses_forged_view_tags() -> None:
    c = committee_of(4)
    _ready(c, vectors(4, 5))
    agg = c.aggregator
    good = agg.tags_for(2)
    forged = (good[0], bytes(16), good[2])
    with pytest.raises(SecAggError) as info:
        c.members[2].reveal(agg.survivors or (), agg.dropped, forged)
    assert info.value.reason == "bad_view_tag"


def test_querier_cannot_show_one_member_a_smaller_u1() -> None:
    """The querier relays U1 = {0, 1, 2, 3} to member 0 but U1 = {0..5} to the rest,
    hoping to peel member 0's input with seeds the others reveal. The others check
    member 0's view tag against their own view: refused."""
    k = 6
    xs = vectors(k, 6)
    c = committee_of(k, seed=8)
    agg = c.aggregator
    for i, member in enumerate(c.members):
        agg.add_key_shares(i, *member.key_shares())
    u1 = agg.fix_u1()
    small = (0, 1, 2, 3)
    c.members[0].open_relay(small, list(agg.relay_for(0)[:3]))
    _, tags0 = c.members[0].masked_input(fixedpoint.encode(xs[0]))
    tags = {0: tags0}
    for i in range(1, k):
        c.members[i].open_relay(u1, agg.relay_for(i))
        _, tags[i] = c.members[i].masked_input(fixedpoint.encode(xs[i]))
    # ask member 1 for member 0's seed share and its pair seeds with 4 and 5
    # (member 0's view), with each survivor's genuine tag for member 1
    def tag_for_1(s: int, view: tuple[int, ...]) -> bytes:
        return tags[s][[u for u in view if u != s].index(1)]

    forwarded = (tag_for_1(0, small), tag_for_1(2, u1), tag_for_1(3, u1))
    with pytest.raises(SecAggError) as info:
        c.members[1].reveal((0, 1, 2, 3), (4, 5), forwarded)
    assert info.value.reason == "bad_view_tag"


def test_a_member_never_reveals_a_seed_share_and_the_pair_seed_for_one_member() -> None:
    """Asking member 2 for both kinds for member 3, at once or one after the other."""
    c = committee_of(5, seed=13)
    _ready(c, vectors(5, 13))
    agg = c.aggregator
    member = c.members[2]

    def tags(survivors: tuple[int, ...]) -> tuple[bytes, ...]:
        return tuple(agg._tags[s][[u for u in range(5) if u != s].index(2)]
                     for s in survivors if s != 2)

    with pytest.raises(SecAggError) as info:  # 3 in both lists
        member.reveal((0, 1, 2, 3), (3, 4), tags((0, 1, 2, 3)))
    assert info.value.reason == "both_kinds" and not member.revealed
    shares, seeds = member.reveal((0, 1, 2, 4), (3,), tags((0, 1, 2, 4)))
    assert len(shares) == 4 and seeds == (_seed(c, 2, 3),)
    with pytest.raises(SecAggError) as info:  # now 3 as a survivor: its seed share
        member.reveal((0, 1, 2, 3, 4), (), tags((0, 1, 2, 3, 4)))
    assert info.value.reason == "already_revealed"


def test_split_views_cannot_peel_a_member_of_an_odd_committee() -> None:
    """k = 5, t = 3: the querier tells member 0 that 3 and 4 dropped (their pair
    seeds with 0 from 0 itself), tells 1 and 2 that 0 dropped (theirs), and 3 and 4
    that 0 survived (shares of b_0 with 0's own: t = 3). Member 0's t - 2 rule
    stops it; without that rule the five answers would give x_0 away."""
    c = committee_of(5, seed=17)
    _ready(c, vectors(5, 17))
    agg = c.aggregator

    def tags(me: int, survivors: tuple[int, ...]) -> tuple[bytes, ...]:
        return tuple(agg._tags[s][[u for u in range(5) if u != s].index(me)]
                     for s in survivors if s != me)

    with pytest.raises(SecAggError) as info:
        c.members[0].reveal((0, 1, 2), (3, 4), tags(0, (0, 1, 2)))
    assert info.value.reason == "too_many_dropped" and not c.members[0].revealed


def test_swapped_mask_nonce_is_caught_at_the_relay() -> None:
    """A querier that tells member 0 another nonce for member 1."""
    c = committee_of(3, seed=12)
    lied = list(c.committee)
    lied[1] = Participant(lied[1].peer_id, lied[1].box_key, secagg.mask_nonce(rng_bytes(99)))
    victim = MaskingMember(
        context=c.context,
        committee=lied,
        index=0,
        threshold=2,
        mask_nonce=c.committee[0].mask_nonce,
        channels=[None, channel(0, 1), channel(0, 2)],
    )
    agg = c.aggregator
    agg.add_key_shares(0, *victim.key_shares())
    for i in (1, 2):
        agg.add_key_shares(i, *c.members[i].key_shares())
    u1 = agg.fix_u1()
    with pytest.raises(SecAggError) as info:
        victim.open_relay(u1, agg.relay_for(0))
    assert info.value.reason == "mask_nonce_mismatch"


def test_key_shares_are_bound_to_query_sender_and_recipient() -> None:
    c = committee_of(3, seed=21)
    other = committee_of(3, seed=21, query_id=b"\x09" * 16)
    agg, agg2 = c.aggregator, other.aggregator
    for i in range(3):
        agg.add_key_shares(i, *c.members[i].key_shares())
        agg2.add_key_shares(i, *other.members[i].key_shares())
    u1, _ = agg.fix_u1(), agg2.fix_u1()
    relay = agg.relay_for(0)
    # a ciphertext of another query (same members, same long-term keys)
    with pytest.raises(SecAggError) as info:
        c.members[0].open_relay(u1, [agg2.relay_for(0)[0], relay[1]])
    assert info.value.reason == "bad_key_share"
    # two ciphertexts swapped between senders: each names its real sender
    c2 = committee_of(3, seed=22)
    for i in range(3):
        c2.aggregator.add_key_shares(i, *c2.members[i].key_shares())
    u1 = c2.aggregator.fix_u1()
    r = c2.aggregator.relay_for(0)
    with pytest.raises(SecAggError):
        c2.members[0].open_relay(u1, [r[1], r[0]])
    # a ciphertext tampered with on the way
    c3 = committee_of(3, seed=23)
    for i in range(3):
        c3.aggregator.add_key_shares(i, *c3.members[i].key_shares())
    u1 = c3.aggregator.fix_u1()
    r = c3.aggregator.relay_for(0)
    bad = bytearray(r[0])
    bad[-1] ^= 1
    with pytest.raises(SecAggError) as info:
        c3.members[0].open_relay(u1, [bytes(bad), r[1]])
    assert info.value.reason == "bad_key_share"


def test_a_wrong_revealed_share_fails_the_unmask_instead_of_a_wrong_sum() -> None:
    c = committee_of(5, seed=31)
    xs = vectors(5, 31)
    _ready(c, xs)
    agg = c.aggregator
    for i in (0, 1, 2):
        seeds, keys = c.members[i].reveal(agg.survivors or (), agg.dropped, agg.tags_for(i))
        if i == 1:
            seeds = (shamir.element_to_bytes(12345), *seeds[1:])
        agg.add_reveal(i, seeds, keys)
    with pytest.raises(SecAggError) as info:
        agg.unmask()
    assert info.value.reason == "unmask_inconsistent"


def test_steps_out_of_order_are_refused() -> None:
    c = committee_of(3)
    member = c.members[0]
    with pytest.raises(SecAggError):
        member.open_relay((0, 1, 2), [])  # before its own key shares
    with pytest.raises(SecAggError):
        member.masked_input(fixedpoint.encode(np.zeros(3)))
    with pytest.raises(SecAggError):
        member.reveal((0, 1, 2), (), ())
    member.key_shares()
    with pytest.raises(SecAggError):
        member.key_shares()
    with pytest.raises(SecAggError):
        c.aggregator.relay_for(0)
    with pytest.raises(SecAggError):
        c.aggregator.unmask()
    with pytest.raises(ValueError):
        MaskingMember(
            context=c.context,
            committee=c.committee,
            index=1,  # the committee lists another mask nonce at index 1
            threshold=2,
            mask_nonce=c.committee[0].mask_nonce,
            channels=[channel(1, 0), None, channel(1, 2)],
        )


def test_usable_public_key_rejects_low_order_points() -> None:
    good = bytes(_LONG_TERM[3].public_key)
    assert secagg.usable_public_key(good)
    assert not secagg.usable_public_key(b"\x00" * 32)
    assert not secagg.usable_public_key((1).to_bytes(32, "little"))
    assert not secagg.usable_public_key(good[:31])


def test_usable_public_key_agrees_with_a_trial_x25519() -> None:
    """The low-order list gives exactly what libsodium's own refusal gives."""
    p = (1 << 255) - 19
    us = [*range(64), *range(p - 64, 1 << 255)]
    keys = [u.to_bytes(32, "little") for u in us]
    keys += [bytes([*k[:31], k[31] | 0x80]) for k in keys]
    keys += [nacl.utils.random(32) for _ in range(200)]
    keys += [(u | (1 << 255)).to_bytes(32, "little") for u in (0, 1, p - 1, p, p + 1)]
    for key in keys:
        try:
            nacl.bindings.crypto_scalarmult(nacl.utils.random(32), key)
            trial = True
        except nacl.exceptions.CryptoError:
            trial = False
        assert secagg.usable_public_key(key) is trial, key.hex()


def test_channel_is_nacl_box_on_the_wire() -> None:
    """Channel's direct libsodium calls give and take exactly NaCl Box ciphertexts."""
    a, b = _LONG_TERM[0], _LONG_TERM[1]
    ours = channel(0, 1).encrypt(b"share" * 20)
    assert nacl.public.Box(b, a.public_key).decrypt(ours) == b"share" * 20
    theirs = bytes(nacl.public.Box(a, b.public_key).encrypt(b"x" * 7))
    assert channel(1, 0).decrypt(theirs) == b"x" * 7
    for bad in (b"", ours[:39], ours[:-1] + bytes([ours[-1] ^ 1])):
        with pytest.raises(SecAggError) as info:
            channel(1, 0).decrypt(bad)
        assert info.value.reason == "bad_key_share"
