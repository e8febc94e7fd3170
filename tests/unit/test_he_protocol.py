"""The HE (CKKS) query mode through the real protocol core, in process (issue 11, part 4).

Cores exchange real signed envelopes over a deterministic in-memory net
(tests/unit/sansio_net.py); the CKKS work of the HE effects is done for real
by fi_peer.he_runtime with a tiny model (4 -> 8 -> 3), so these tests run in
a few seconds. One querier key pair for the module (creating one takes ~0.2 s).

Tolerance: HE equals plaintext within 1e-3 absolute (measured ~5e-5; CKKS with
scale 2^40 and three rescalings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fi_peer.errors import MalformedMessage, UnexpectedMessage
from fi_peer.he_runtime import HERuntime, answer_he_effect, run_he_effect
from fi_peer.identity import Identity
from fi_peer.privacy import he
from fi_peer.protocol import codec
from fi_peer.protocol.effects import Effect, QueryOutcome, Send
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.he_effects import (
    HECombine,
    HEDecrypt,
    HEEvaluate,
    HELoadContext,
    HESendChunks,
)
from fi_peer.protocol.he_messages import (
    HE_CHUNK_BYTES,
    HEContextAck,
    HEContextChunk,
    HEOffer,
    HEPartial,
    HERoute,
)
from fi_peer.protocol.he_query import ContextTransfers, aggregation_order
from fi_peer.protocol.messages import MESSAGE_TYPES, ModelCard
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from tests.unit.sansio_net import SansIoNet, _kind, card

TOL = 1e-3
DIM, HIDDEN, OUT = 4, 8, 3


def he_card(serves: bool = True) -> ModelCard:
    return card(OUT, DIM, he=serves)


def tiny_model(seed: int) -> he.HEModel:
    rng = np.random.default_rng(seed)
    return he.build_he_model(
        [
            he.LinearLayer(rng.normal(0, 0.5, (DIM, HIDDEN)), rng.normal(0, 0.1, HIDDEN)),
            "square",
            he.LinearLayer(rng.normal(0, 0.5, (HIDDEN, OUT)), rng.normal(0, 0.1, OUT)),
        ]
    )


class HENet(SansIoNet):
    """SansIoNet plus the HE effects, carried out at once with each peer's HERuntime."""

    def __init__(self) -> None:
        super().__init__()
        self.runtimes: dict[str, HERuntime] = {}
        self.he_models: dict[str, he.HEModel] = {}
        self.he_log: list[tuple[str, object]] = []

    def add_he(
        self,
        name: str,
        model: he.HEModel | None,
        runtime: HERuntime | None = None,
        card: ModelCard | None = None,
    ) -> PeerCore:
        """A peer (a member when ``model`` is given) with ``card`` (default he_card)."""
        config = CoreConfig(querier=QuerierConfig(offer_window_ms=500, include_self=False))
        core = PeerCore(
            Identity.from_seed(name.encode()),
            card or he_card(model is not None),
            config=config,
            rng=np.random.default_rng(7),
        )
        self.cores[core.peer_id] = core
        self.models[core.peer_id] = None
        self.runtimes[core.peer_id] = runtime or HERuntime(model, rng=np.random.default_rng(1))
        if model is not None:
            self.he_models[core.peer_id] = model
        for topic in core.topics():
            self.subs.setdefault(topic, set()).add(core.peer_id)
        self.queue.extend((core.peer_id, e) for e in core.start(self.now_ms))
        return core

    def _apply(self, origin: str, effect: Effect) -> None:
        if isinstance(effect, HESendChunks):
            for chunk in effect.chunks:
                data = self.cores[origin].seal_now(chunk, self.now_ms)
                self.trace.append((origin, "he_context_chunk"))
                self._apply(origin, Send(effect.peer, data))
            return
        if isinstance(effect, HELoadContext | HEEvaluate | HECombine | HEDecrypt):
            self.he_log.append((origin, effect))
            result = run_he_effect(self.runtimes[origin], effect)
            core = self.cores[origin]
            self._feed(origin, answer_he_effect(core, effect, result, self.now_ms))
            return
        super()._apply(origin, effect)


def _ask(
    net: HENet, querier: PeerCore, runtime: HERuntime, x: np.ndarray, *, k: int, sigma: float = 0.0
) -> bytes:
    blobs, public = runtime.encrypt(x)
    qid, effects = querier.submit_he_query(
        blobs,
        public,
        rule="soft",
        vector_len=OUT,
        k=k,
        max_price_wei=0,
        timeout_ms=20_000,
        now_ms=net.now_ms,
        noise_sigma=sigma,
    )
    net._feed(querier.peer_id, effects)
    net.run()
    return qid


@dataclass
class World:
    net: HENet
    querier: PeerCore
    runtime: HERuntime
    members: list[PeerCore]
    plain: PeerCore


@pytest.fixture(scope="module")
def world() -> World:
    """One net for the module: 5 HE members, one peer without the HE mode, a querier.
    Members keep the querier's context between tests (as daemons do between
    queries), and share one loaded copy of it (a 12 MB context loads in ~0.2 s)."""
    net = HENet()
    runtime = HERuntime()
    runtime.keys()
    querier = net.add_he("querier", None, runtime)
    shared = he.ContextCache(max_entries=2)
    members = []
    for i in range(5):
        member = net.add_he(f"member-{i}", tiny_model(i))
        net.runtimes[member.peer_id].contexts = shared
        members.append(member)
    plain = net.add_he("plain-member", None)
    net.run()  # announcements
    return World(net, querier, runtime, members, plain)


@pytest.fixture
def w(world: World) -> World:
    world.net.drop = lambda src, dst, data: False
    return world


def _plain_sum(net: HENet, contributors: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    return np.sum([net.he_models[m].forward(x[None, :])[0] for m in contributors], axis=0)


def _sent(net: HENet, kind: str, by: str | None = None) -> int:
    return sum(1 for origin, k in net.trace if k == kind and (by is None or origin == by))


def _ask_w(w: World, x: np.ndarray, *, k: int, sigma: float = 0.0) -> QueryOutcome:
    qid = _ask(w.net, w.querier, w.runtime, x, k=k, sigma=sigma)
    if qid not in w.net.done:
        w.net.advance(25_000)  # timers: offer window, ready timer, tree levels
    return w.net.done[qid]


def test_he_query_equals_plaintext_and_the_context_goes_once(w: World) -> None:
    net, querier = w.net, w.querier
    x = np.array([0.5, -1.0, 0.25, 2.0])
    chunks_before = _sent(net, "he_context_chunk", querier.peer_id)
    outcome = _ask_w(w, x, k=5)
    assert outcome.ok, outcome.reason
    assert outcome.contributors == tuple(sorted(m.peer_id for m in w.members))
    assert outcome.total is not None
    np.testing.assert_allclose(outcome.total, _plain_sum(net, outcome.contributors, x), atol=TOL)
    # ~12 MB in 448 KiB chunks (windowed by acks), to each member that did not hold it
    n_chunks = -(-len(w.runtime.keys()[1]) // HE_CHUNK_BYTES)
    assert _sent(net, "he_context_chunk", querier.peer_id) - chunks_before == 5 * n_chunks
    assert _sent(net, "he_context_ack") >= 5 * n_chunks
    # a second query reuses every member's cached context: no chunk leaves
    partials = _sent(net, "he_partial")
    decrypts = sum(1 for o, e in net.he_log if o == querier.peer_id and isinstance(e, HEDecrypt))
    chunks = _sent(net, "he_context_chunk", querier.peer_id)
    second = _ask_w(w, -x, k=5)
    assert second.ok and second.total is not None
    np.testing.assert_allclose(second.total, _plain_sum(net, second.contributors, -x), atol=TOL)
    assert _sent(net, "he_context_chunk", querier.peer_id) == chunks
    # one partial per member (the root's to the querier), and one decryption
    assert _sent(net, "he_partial") - partials == 5
    after = sum(1 for o, e in net.he_log if o == querier.peer_id and isinstance(e, HEDecrypt))
    assert after - decrypts == 1
    # receipts for every member in the aggregate
    last = [m.he.responder.receipts[-1].query_id for m in w.members]
    assert last == [second.query_id] * 5


def test_members_never_hold_a_secret_key(w: World) -> None:
    x = np.array([1.0, 0.0, -0.5, 0.5])
    assert _ask_w(w, x, k=2).ok
    evaluated = [e for o, e in w.net.he_log if isinstance(e, HEEvaluate)]
    member_runtime = w.net.runtimes[w.members[0].peer_id]
    ctx = member_runtime.contexts.get(w.querier.peer_id, evaluated[-1].digest)
    assert ctx is not None and not ctx._ctx.is_private() and not ctx._ctx.has_secret_key()
    out = member_runtime.evaluate(evaluated[-1])
    encrypted = he.EncryptedOutput(layout=he.Layout.SINGLE, n_inputs=1, output_dim=OUT, blobs=out)
    with pytest.raises(MalformedMessage, match="secret"):
        he.decrypt_outputs(he.SecretContext(ctx._ctx), encrypted)
    # and a member refuses a context that holds one (a querier's secret context)
    secret, _ = w.runtime.keys()
    inner = bytes(secret._ctx.serialize(save_secret_key=True))
    leaked = b"FIHE\x01" + len(inner).to_bytes(4, "big") + inner  # in the wire container
    with pytest.raises(MalformedMessage, match="secret key"):
        he.load_public_context(leaked)
    assert not HERuntime(tiny_model(0)).load(w.querier.peer_id, "0" * 64, leaked)


def test_curious_querier_cannot_get_a_single_members_answer(w: World) -> None:
    net, querier = w.net, w.querier
    x = np.array([0.3, 0.3, -0.3, 1.0])
    held: list[bytes] = []

    def hold_routes(src: str, dst: str, data: bytes) -> bool:
        if _kind(data) == HERoute.KIND:
            held.append(data)
            return True
        return False

    net.drop = hold_routes
    qid = _ask(net, querier, w.runtime, x, k=3)
    assert held and qid not in net.done  # all ready, waiting for a route
    session = querier.he.queries[qid]
    target = session.committee[0]
    # The querier routes the target alone: a "sum" over one member, below t = 2.
    net.drop = lambda src, dst, data: False
    declines = _sent(net, "decline", target)
    partials = _sent(net, "he_partial", target)
    route = HERoute(query_id=qid, live=(target,), hop_ms=100)
    net.deliver(target, seal(querier.identity, route, net.now_ms))
    net.run()
    assert _sent(net, "he_partial", target) == partials
    assert _sent(net, "decline", target) == declines + 1
    # A partial to the querier from anyone but the root of the real tree is rejected.
    fake = HEPartial(query_id=qid, querier=querier.peer_id, members=(target,), blobs=(b"x",))
    rejected = querier.metrics["rejected.unexpected"]
    sender = next(m for m in w.members if m.peer_id == target)
    net.deliver(querier.peer_id, seal(sender.identity, fake, net.now_ms))
    assert querier.metrics["rejected.unexpected"] == rejected + 1
    # The tree order comes from the query id, not from the querier's choice.
    assert set(aggregation_order(qid, session.committee)) == set(session.committee)
    net.advance(25_000)  # the query ends (deadline)
    assert not net.done[qid].ok


@pytest.mark.parametrize("when", ["before_ready", "after_route"])
def test_dropouts_below_the_threshold_still_answer(w: World, when: str) -> None:
    x = np.array([-0.2, 0.7, 0.1, -1.5])  # k = 4, t = 3: one member may drop
    victim: list[str] = []

    def drop(src: str, dst: str, data: bytes) -> bool:
        kind = _kind(data)
        if when == "before_ready" and kind == "he_accept" and not victim:
            victim.append(dst)  # never gets its accept: never ready
        late = when == "after_route" and kind == "he_partial" and dst != w.querier.peer_id
        if late and not victim:
            victim.append(src)  # its partial is lost (it died after the route)
        return bool(victim) and victim[0] in (src, dst) and kind != "announce"

    w.net.drop = drop
    outcome = _ask_w(w, x, k=4)
    assert outcome.ok, outcome.reason
    assert victim and victim[0] not in outcome.contributors
    assert len(outcome.contributors) == 3
    assert outcome.total is not None
    np.testing.assert_allclose(outcome.total, _plain_sum(w.net, outcome.contributors, x), atol=TOL)


def test_dp_noise_is_added_by_members_inside_the_ciphertext(w: World) -> None:
    x = np.array([0.5, 0.5, 0.5, 0.5])
    seen = len(w.net.he_log)
    outcome = _ask_w(w, x, k=3, sigma=2.0)
    assert outcome.ok and outcome.total is not None
    stds = {e.noise_std for _, e in w.net.he_log[seen:] if isinstance(e, HEEvaluate)}
    assert len(stds) == 1
    assert stds.pop() == pytest.approx(2.0 / np.sqrt(2))  # sigma / sqrt(t), t = 2
    diff = outcome.total - _plain_sum(w.net, outcome.contributors, x)
    assert np.max(np.abs(diff)) > 0.01  # noised: not the plaintext sum


def test_only_capable_peers_offer_and_are_picked(w: World) -> None:
    net, querier = w.net, w.querier
    blobs, public = w.runtime.encrypt(np.array([1.0, 1.0, 0.0, 0.0]))
    qid, effects = querier.submit_he_query(
        blobs,
        public,
        rule="soft",
        vector_len=OUT,
        k=6,
        max_price_wei=0,
        timeout_ms=20_000,
        now_ms=net.now_ms,
    )  # k = 6: 5 HE members and one peer that does not serve the mode
    net._feed(querier.peer_id, effects)
    # an HE offer from a peer whose card does not announce the mode is rejected
    offer = HEOffer(
        query_id=qid, price_wei=0, expected_latency_ms=1, eth_address="", has_context=True
    )
    rejected = querier.metrics["rejected.unexpected"]
    net.deliver(querier.peer_id, seal(w.plain.identity, offer, net.now_ms))
    assert querier.metrics["rejected.unexpected"] == rejected + 1
    net.run()
    net.advance(25_000)
    outcome = net.done[qid]
    assert outcome.ok and len(outcome.contributors) == 5
    assert w.plain.peer_id not in outcome.contributors
    assert _sent(net, "he_offer", w.plain.peer_id) == 0


def test_he_messages_round_trip_and_fit_the_transports() -> None:
    kinds = ("he_request", "he_offer", "he_context_chunk", "he_accept", "he_ready")
    for kind in (*kinds, "he_route", "he_partial"):
        assert MESSAGE_TYPES[kind].MAX_ENVELOPE <= 512 * 1024
    route = HERoute(query_id=b"q" * 16, live=("a" * 64, "b" * 64), hop_ms=10)
    assert codec.unpack(HERoute, codec.pack(route)) == route
    assert codec.unpack(ModelCard, codec.pack(he_card())).he


def test_context_transfer_keeps_at_most_a_window_in_flight() -> None:
    digest = "d" * 64
    chunks = tuple(
        HEContextChunk(digest=digest, index=i, total=10, payload=b"x") for i in range(10)
    )
    transfers = ContextTransfers(window=4)
    transfers.reset(chunks)
    first = transfers.start("m")
    assert [c.index for c in first.chunks] == [0, 1, 2, 3] and first.peer == "m"
    with pytest.raises(UnexpectedMessage, match="not sent"):
        transfers.on_ack("m", HEContextAck(digest=digest, index=5))
    with pytest.raises(UnexpectedMessage, match="no context transfer"):
        transfers.on_ack("other", HEContextAck(digest=digest, index=0))
    with pytest.raises(UnexpectedMessage, match="no context transfer"):
        transfers.on_ack("m", HEContextAck(digest="e" * 64, index=0))
    sent = [0, 1, 2, 3]
    acked: set[int] = set()
    # Acks out of order and one duplicate: never more than 4 unacknowledged chunks.
    for index in [2, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9]:
        if index not in sent:
            continue
        more = transfers.on_ack("m", HEContextAck(digest=digest, index=index))
        acked.add(index)
        sent += [c.index for effect in more for c in effect.chunks]
        assert len(set(sent) - acked) <= 4
    assert sent == list(range(10)) and acked == set(range(10))
    assert transfers.active == ()  # done: a later ack is unexpected
    with pytest.raises(UnexpectedMessage):
        transfers.on_ack("m", HEContextAck(digest=digest, index=9))


def test_a_stalled_key_exchange_is_the_stated_failure_reason(w: World) -> None:
    """A querier whose context never reaches the members (every chunk lost) fails
    with a reason naming the key exchange, not a bare "too few answers"."""
    net = w.net
    runtime = HERuntime()
    querier = net.add_he("querier-2", None, runtime)
    net.run()
    net.drop = lambda src, dst, data: src == querier.peer_id and _kind(data) == "he_context_chunk"
    qid = _ask(net, querier, runtime, np.array([0.1, 0.2, 0.3, 0.4]), k=3)
    if qid not in net.done:
        net.advance(25_000)
    outcome = net.done[qid]
    assert not outcome.ok
    assert outcome.reason == "key_exchange_incomplete_3_of_3"
