"""Batched HE queries over the wire (docs/he.md, "Batched queries on the wire").

The batched request (one CKKSTensor of n inputs) and every batched partial sum
travel as HEBlobChunks behind a header (HEAccept / HEPartial naming their
sha256 and size), credit-based with HEBlobAck; receivers reassemble with a size
cap derived from the request and check the digest. Through the real cores and
the real CKKS work (tiny 4 -> 8 -> 3 model), plus the pieces alone.
"""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np
import pytest

from fi_peer.errors import LocalProtocolError, UnexpectedMessage
from fi_peer.he_runtime import HERuntime
from fi_peer.identity import Identity
from fi_peer.privacy import he
from fi_peer.protocol import codec
from fi_peer.protocol.effects import Effect, QueryOutcome, Send
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.he_effects import HEDecrypt, HEEvaluate, HESendChunks
from fi_peer.protocol.he_messages import (
    HE_CHUNK_BYTES,
    HEBlobAck,
    HEBlobChunk,
    HEOffer,
    HERequest,
    he_card_rules,
    he_card_tags,
)
from fi_peer.protocol.he_query import (
    BlobAssembler,
    ChunkWindow,
    blob_chunks,
    pack_blobs,
    response_cap,
    unpack_blobs,
)
from fi_peer.protocol.messages import ModelCard
from fi_peer.protocol.peer import CoreConfig, PeerCore
from tests.unit.he_wire import toy_request_fields
from tests.unit.sansio_net import _kind
from tests.unit.test_he_protocol import OUT, TOL, HENet, tiny_model

N_INPUTS = 64
Q = "a" * 64


def batch_card(serves: bool, he_rules: tuple[str, ...] = ("support",)) -> ModelCard:
    return ModelCard(
        task="toy",
        n_classes=OUT,
        input_dim=4,
        arch="fn",
        model_hash=b"\x00" * 32,
        rules=("support", "soft", *he_card_tags(he_rules if serves else ())),
        he=serves,
    )


class BatchNet(HENet):
    """HENet whose cards serve the support rule; traces chunk kinds separately."""

    def add_batch(
        self,
        name: str,
        model: he.HEModel | None,
        runtime: HERuntime | None = None,
        he_rules: tuple[str, ...] = ("support",),
    ) -> PeerCore:
        return self.add_he(name, model, runtime, card=batch_card(model is not None, he_rules))

    def _apply(self, origin: str, effect: Effect) -> None:
        if isinstance(effect, HESendChunks):
            for chunk in effect.chunks:
                data = self.cores[origin].seal_now(chunk, self.now_ms)
                self.trace.append((origin, _kind(data)))
                self._apply(origin, Send(effect.peer, data))
            return
        super()._apply(origin, effect)


Net = tuple["BatchNet", PeerCore, HERuntime, list[PeerCore]]


@pytest.fixture(scope="module")
def net() -> Net:
    net = BatchNet()
    runtime = HERuntime()
    runtime.keys()
    querier = net.add_batch("b-querier", None, runtime)
    shared = he.ContextCache(max_entries=2)
    members = []
    for i in range(3):
        member = net.add_batch(f"b-member-{i}", tiny_model(i))
        net.runtimes[member.peer_id].contexts = shared
        members.append(member)
    net.run()
    return net, querier, runtime, members


def _ask_batch(net: BatchNet, querier: PeerCore, blobs: tuple[bytes, ...], public: bytes) -> bytes:
    qid, effects = querier.submit_he_query(
        blobs,
        public,
        rule="support",
        vector_len=OUT,
        k=3,
        max_price_wei=0,
        timeout_ms=20_000,
        now_ms=net.now_ms,
        n_batched=N_INPUTS,
    )
    net._feed(querier.peer_id, effects)
    net.run()
    return qid


def _outcome(net: BatchNet, qid: bytes) -> QueryOutcome:
    if qid not in net.done:
        net.advance(25_000)
    return net.done[qid]


def _chunk_index(data: bytes) -> int:
    body = msgpack.unpackb(data, raw=False)[5]
    return int(codec.unpack(HEBlobChunk, body).index)


def test_batched_query_travels_chunked_and_equals_plaintext(net: Net) -> None:
    bnet, querier, runtime, _ = net
    bnet.drop = lambda src, dst, data: False
    x = np.random.default_rng(3).uniform(-1, 1, (N_INPUTS, 4))
    blobs, public = runtime.encrypt_batch(x)
    assert sum(len(b) for b in blobs) > HE_CHUNK_BYTES  # more than one chunk
    seen = len(bnet.trace)
    outcome = _outcome(bnet, _ask_batch(bnet, querier, blobs, public))
    assert outcome.ok and outcome.total is not None, outcome.reason
    assert len(outcome.contributors) == 3
    total = np.asarray(outcome.total).reshape(N_INPUTS, OUT)
    plain = sum(bnet.he_models[m].forward(x) for m in outcome.contributors)
    assert np.max(np.abs(total - plain)) < TOL
    assert np.array_equal(total.argmax(axis=1), np.asarray(plain).argmax(axis=1))
    kinds = [k for _, k in bnet.trace[seen:]]
    chunks = -(-len(pack_blobs(blobs)) // HE_CHUNK_BYTES)
    # the request to each member, the partials up the tree (2 of them) and to the querier
    assert kinds.count("he_blob_chunk") >= 3 * chunks + 2
    assert kinds.count("he_blob_ack") == kinds.count("he_blob_chunk")
    evals = [e for _, e in bnet.he_log if isinstance(e, HEEvaluate)]
    assert evals[-1].layout == "batched" and evals[-1].n_inputs == N_INPUTS
    decs = [e for _, e in bnet.he_log if isinstance(e, HEDecrypt)]
    assert decs[-1].layout == "batched"


def test_a_missing_request_chunk_is_a_clear_failure(net: Net) -> None:
    bnet, querier, runtime, _ = net

    def drop(src: str, dst: str, data: bytes) -> bool:
        return src == querier.peer_id and _kind(data) == "he_blob_chunk" and _chunk_index(data) == 1

    bnet.drop = drop
    blobs, public = runtime.encrypt_batch(np.zeros((N_INPUTS, 4)))
    outcome = _outcome(bnet, _ask_batch(bnet, querier, blobs, public))
    assert not outcome.ok
    assert outcome.reason == "input_transfer_incomplete_3_of_3"


def test_a_missing_aggregate_chunk_is_a_clear_failure(net: Net) -> None:
    bnet, querier, runtime, _ = net
    bnet.drop = lambda src, dst, data: dst == querier.peer_id and _kind(data) == "he_blob_chunk"
    blobs, public = runtime.encrypt_batch(np.zeros((N_INPUTS, 4)))
    outcome = _outcome(bnet, _ask_batch(bnet, querier, blobs, public))
    assert not outcome.ok
    assert outcome.reason == "aggregate_transfer_incomplete_all_chunks_missing"


def test_an_oversized_request_is_declined(net: Net) -> None:
    bnet, querier, runtime, members = net
    bnet.drop = lambda src, dst, data: False
    # 4 features may take at most 4 ciphertexts (~2.6 MB): 3 MB of "ciphertext" is refused
    _, public = runtime.keys()
    declined = sum(m.metrics["he.declined.input_too_large"] for m in members)
    outcome = _outcome(bnet, _ask_batch(bnet, querier, (b"\x07" * 3_000_000,), public))
    # t = 2 of 3: the query fails at the second decline
    assert not outcome.ok and outcome.reason == "declined_2_of_3"
    assert sum(m.metrics["he.declined.input_too_large"] for m in members) >= declined + 2


def test_the_querier_takes_offers_only_from_peers_announcing_the_rule(net: Net) -> None:
    bnet, querier, runtime, _ = net
    bnet.drop = lambda src, dst, data: False
    kernel_only = bnet.add_batch("b-kernel-only", tiny_model(9), he_rules=("evidence",))
    bnet.run()  # its announcement
    blobs, public = runtime.encrypt_batch(np.zeros((N_INPUTS, 4)))
    qid, effects = querier.submit_he_query(
        blobs, public, rule="support", vector_len=OUT, k=3, max_price_wei=0,
        timeout_ms=20_000, now_ms=bnet.now_ms, n_batched=N_INPUTS,
    )  # fmt: skip
    offer = HEOffer(
        query_id=qid, price_wei=0, expected_latency_ms=1, eth_address="", has_context=True
    )
    rejected = querier.metrics["rejected.unexpected"]
    bnet.deliver(querier.peer_id, seal(kernel_only.identity, offer, bnet.now_ms))
    assert querier.metrics["rejected.unexpected"] == rejected + 1
    bnet._feed(querier.peer_id, effects)
    bnet.run()
    outcome = _outcome(bnet, qid)
    assert outcome.ok and kernel_only.peer_id not in outcome.contributors


# ------------------------------------------------------------------- the pieces alone


def test_card_rules_are_announced_in_the_rules_field_and_old_cards_mean_any() -> None:
    assert he_card_rules(("soft", "he:evidence", "he:support")) == ("evidence", "support")
    assert he_card_rules(("soft", "vote")) is None  # an older card: any HE rule
    card = batch_card(True, ("evidence",))
    assert codec.unpack(ModelCard, codec.pack(card)) == card  # wire format unchanged


def test_batched_requests_are_support_without_dp_only() -> None:
    base = toy_request_fields(b"q" * 16, now_ms=0, reply_key=b"r" * 32, epsilon=0.0, delta=0.0)
    ok = HERequest(
        **{**base, "rule": "support"}, context_digest="d" * 64, n_inputs=64, layout="batched"
    )
    assert ok.batched
    with pytest.raises(ValueError, match="support rule only"):
        HERequest(
            **{**base, "rule": "evidence"}, context_digest="d" * 64, n_inputs=64, layout="batched"
        )
    dp = {**base, "rule": "support", "epsilon": 1.0, "delta": 1e-5}
    with pytest.raises(ValueError, match="no DP"):
        HERequest(**dp, context_digest="d" * 64, n_inputs=64, layout="batched")
    with pytest.raises(ValueError, match="n_inputs"):
        HERequest(
            **{**base, "rule": "support"}, context_digest="d" * 64, n_inputs=4, layout="batched"
        )
    core = PeerCore(Identity.from_seed(b"x"), batch_card(False), config=CoreConfig())
    with pytest.raises(LocalProtocolError, match="single queries"):
        core.submit_he_query(
            (b"c",), b"ctx", rule="evidence", vector_len=3, k=3, max_price_wei=0,
            timeout_ms=5_000, now_ms=0, n_batched=64, epsilon=1.0, noise_sigma=1.0,
        )  # fmt: skip


def test_reassembly_any_order_duplicates_caps_and_digest() -> None:
    blobs = (b"a" * 1000, b"b" * (2 * HE_CHUNK_BYTES))
    data = pack_blobs(blobs)
    assert unpack_blobs(data) == blobs
    chunks = blob_chunks(b"q" * 16, Q, data)
    assert len(chunks) == 3 and chunks[0].digest == hashlib.sha256(data).hexdigest()
    asm = BlobAssembler(chunks[0].digest, cap=len(data))
    for c in (chunks[2], chunks[0], chunks[0]):
        asm.add(c)
    assert asm.blobs() is None and asm.missing == 1  # one chunk still missing
    assert asm.add(chunks[1]) and asm.data == data
    assert asm.blobs() is None  # not declared by its header yet
    asm.declare(len(data))
    assert asm.blobs() == blobs
    # oversized: refused at the header, or at the first chunk that would pass the cap
    small = BlobAssembler(chunks[0].digest, cap=HE_CHUNK_BYTES)
    with pytest.raises(UnexpectedMessage, match="above the cap"):
        small.declare(len(data))
    with pytest.raises(UnexpectedMessage, match="above the cap"):
        small.add(chunks[0])
    # a chunk whose payload differs: the digest check fails once complete
    bad = BlobAssembler(chunks[0].digest, cap=len(data))
    forged = HEBlobChunk(
        query_id=b"q" * 16, querier=Q, digest=chunks[1].digest, index=1, total=3,
        payload=b"x" * len(chunks[1].payload),
    )  # fmt: skip
    for c in (chunks[0], forged):
        bad.add(c)
    with pytest.raises(UnexpectedMessage, match="digest"):
        bad.add(chunks[2])
    # declared size must match
    wrong = BlobAssembler(chunks[0].digest, cap=len(data))
    wrong.declare(len(data) - 1)
    with pytest.raises(UnexpectedMessage, match="declared size"):
        for c in chunks:
            wrong.add(c)
    for garbage in (b"", b"\x00\x00\x00\x05ab", b"\x00\x00"):
        with pytest.raises(UnexpectedMessage):
            unpack_blobs(garbage)


def test_chunk_window_keeps_at_most_a_window_in_flight() -> None:
    chunks = blob_chunks(b"q" * 16, Q, b"z" * (9 * HE_CHUNK_BYTES + 5))
    window = ChunkWindow("m", chunks, window=4)
    sent = [c.index for c in window.start().chunks]
    assert sent == [0, 1, 2, 3]

    def ack(i: int) -> HEBlobAck:
        return HEBlobAck(query_id=b"q" * 16, querier=Q, digest=chunks[0].digest, index=i)

    with pytest.raises(UnexpectedMessage):
        window.on_ack("m", ack(7))  # not sent yet
    with pytest.raises(UnexpectedMessage):
        window.on_ack("other", ack(0))
    acked: set[int] = set()
    for i in [1, 1, 0, 3, 2, 4, 5, 6, 7, 8, 9]:
        more = window.on_ack("m", ack(i))
        acked.add(i)
        sent += [c.index for e in more for c in e.chunks]
        assert len(set(sent) - acked) <= 4
    assert sent == list(range(10)) and window.done


def test_response_cap_bounds_a_batched_answer() -> None:
    base = toy_request_fields(b"q" * 16, now_ms=0, reply_key=b"r" * 32, epsilon=0.0, delta=0.0)
    req = HERequest(
        **{**base, "rule": "support"}, context_digest="d" * 64, n_inputs=64, layout="batched"
    )
    # 3 outputs at the last level are ~3 x 131 KB: the cap admits that, not 10x more
    assert 3 * 140_000 < response_cap(req) < 10 * 3 * 131_000
