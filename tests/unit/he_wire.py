"""Sample HE-mode messages (he_messages.py) for the codec and envelope tests."""

from __future__ import annotations

from typing import Any

from fi_peer.protocol.he_messages import (
    HEAccept,
    HEBlobAck,
    HEBlobChunk,
    HEContextAck,
    HEContextChunk,
    HEMessage,
    HEOffer,
    HEPartial,
    HEReady,
    HERequest,
    HERoute,
)

A, B = "a" * 64, "b" * 64
DIGEST = "d" * 64


def toy_request_fields(
    query_id: bytes, *, now_ms: int, reply_key: bytes, epsilon: float, delta: float
) -> dict[str, Any]:
    """The fields a toy query request (plain QueryRequest or HERequest) shares: 3 classes,
    4 inputs, rule soft, k = 2, free, due 5 s after ``now_ms``."""
    return {
        "query_id": query_id,
        "task": "toy",
        "n_classes": 3,
        "input_dim": 4,
        "rule": "soft",
        "vector_len": 3,
        "k": 2,
        "max_price_wei": 0,
        "deadline_ms": now_ms + 5000,
        "reply_key": reply_key,
        "epsilon": epsilon,
        "delta": delta,
    }


def he_samples(now_ms: int) -> list[HEMessage]:
    return [
        HERequest(
            **toy_request_fields(
                b"q" * 16, now_ms=now_ms, reply_key=b"r" * 32, epsilon=0.0, delta=0.0
            ),
            context_digest=DIGEST,
            n_inputs=1,
            layout="single",
        ),
        HEOffer(
            query_id=b"q" * 16,
            price_wei=1,
            expected_latency_ms=5,
            eth_address="",
            has_context=False,
        ),
        HEContextChunk(digest=DIGEST, index=1, total=3, payload=b"p" * 100),
        HEContextAck(digest=DIGEST, index=1),
        HEAccept(
            query_id=b"q" * 16,
            members=(A, B),
            eth_addresses=("", ""),
            threshold=2,
            fan_in=4,
            price_wei=1,
            noise_sigma=0.5,
            context_digest=DIGEST,
            blobs=(b"c" * 200,),
        ),
        HEReady(query_id=b"q" * 16),
        HERoute(query_id=b"q" * 16, live=(A, B), hop_ms=1500),
        HEPartial(query_id=b"q" * 16, querier=A, members=(B,), blobs=(b"c" * 200,)),
        HEPartial(  # batched: the ciphertext follows as HEBlobChunks
            query_id=b"q" * 16,
            querier=A,
            members=(B,),
            blobs=(),
            blob_digest=DIGEST,
            blob_bytes=2_600_000,
        ),
        HEBlobChunk(
            query_id=b"q" * 16, querier=A, digest=DIGEST, index=0, total=7, payload=b"p" * 100
        ),
        HEBlobAck(query_id=b"q" * 16, querier=A, digest=DIGEST, index=0),
    ]


def he_biggest() -> list[HEMessage]:
    """Every field at its maximum: each must still fit its envelope cap."""
    peers = tuple(f"{i:064x}" for i in range(64))
    eth = "0x" + "f" * 40
    return [
        HERequest(
            query_id=b"\xff" * 16,
            task="t" * 64,
            n_classes=1000,
            input_dim=128,
            rule="r" * 32,
            vector_len=64,
            k=64,
            max_price_wei=(1 << 64) - 1,
            deadline_ms=1 << 63,
            reply_key=b"\xff" * 32,
            epsilon=1e6,
            delta=1.0,
            context_digest="f" * 64,
            n_inputs=1,
            layout="single",
        ),
        HEOffer(
            query_id=b"\xff" * 16,
            price_wei=(1 << 64) - 1,
            expected_latency_ms=3_600_000,
            eth_address=eth,
            has_context=True,
        ),
        HEContextChunk(digest="f" * 64, index=71, total=72, payload=b"\xff" * (448 * 1024)),
        HEContextAck(digest="f" * 64, index=71),
        HEAccept(
            query_id=b"\xff" * 16,
            members=peers,
            eth_addresses=(eth,) * 64,
            threshold=64,
            fan_in=64,
            price_wei=(1 << 64) - 1,
            noise_sigma=1e9,
            context_digest="f" * 64,
            blobs=(b"\xff" * (480 * 1024),),
            querier_eth=eth,
            escrow_deadline_s=1 << 62,
        ),
        HEReady(query_id=b"\xff" * 16),
        HERoute(query_id=b"\xff" * 16, live=peers, hop_ms=60_000),
        HEPartial(
            query_id=b"\xff" * 16, querier="f" * 64, members=peers, blobs=(b"\xff" * (480 * 1024),)
        ),
        HEBlobChunk(
            query_id=b"\xff" * 16,
            querier="f" * 64,
            digest="f" * 64,
            index=71,
            total=72,
            payload=b"\xff" * (448 * 1024),
        ),
        HEBlobAck(query_id=b"\xff" * 16, querier="f" * 64, digest="f" * 64, index=71),
    ]
