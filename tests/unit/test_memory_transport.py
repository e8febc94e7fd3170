"""Behaviour of the in-memory transport beyond the shared contract.

Latency, loss, partitions, bounded queues and scale. Timing tests measure
with ``loop.time()`` and prefer asserting the ORDER of arrivals; waiting is
done on events and iterators under ``asyncio.timeout``, never by sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import pytest

from network import (
    Inbound,
    MemoryHub,
    MemoryTransport,
    PeerUnreachable,
    TransportClosed,
    TransportError,
)

TIMEOUT = 5.0
T = TypeVar("T")
CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution


async def next_item(iterator: AsyncIterator[T]) -> T:
    async with asyncio.timeout(TIMEOUT):
        return await anext(iterator)


async def take(iterator: AsyncIterator[T], count: int) -> list[T]:
    async with asyncio.timeout(TIMEOUT):
        return [await anext(iterator) for _ in range(count)]


async def started(hub: MemoryHub, *ids: str) -> list[MemoryTransport]:
    transports = [hub.transport(peer_id) for peer_id in ids]
    for transport in transports:
        await transport.start()
    return transports


def index(data: bytes) -> int:
    return int.from_bytes(data, "big")


def packet(i: int) -> bytes:
    return i.to_bytes(4, "big")


# -- lifecycle and ids -------------------------------------------------------


async def test_operations_before_start_raise_transport_closed() -> None:
    hub = MemoryHub()
    a = hub.transport("a")
    (b,) = await started(hub, "b")

    with pytest.raises(TransportClosed, match="not started"):
        await a.publish("t", b"x")
    with pytest.raises(TransportClosed, match="not started"):
        await a.subscribe("t")
    with pytest.raises(TransportClosed, match="not started"):
        await a.send("b", b"x")
    with pytest.raises(TransportClosed, match="not started"):
        await a.connect("memory://b")
    assert a.peers() == frozenset()
    assert b.peers() == frozenset()  # a is not on the network until started


async def test_start_twice_is_a_noop_and_async_with_closes() -> None:
    hub = MemoryHub()
    async with hub.transport("a") as a:
        await a.start()
        assert hub.running() == {"a"}
    assert hub.running() == frozenset()
    with pytest.raises(TransportClosed, match="closed"):
        await a.start()


async def test_peer_id_is_unique_until_closed_then_reusable() -> None:
    hub = MemoryHub()
    (old,) = await started(hub, "a")
    with pytest.raises(ValueError, match="already in use"):
        hub.transport("a")
    with pytest.raises(ValueError, match="non-empty"):
        hub.transport("")

    await old.aclose()
    (new,) = await started(hub, "a")
    assert new is not old
    assert hub.running() == {"a"}


@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#", "$SYS/x", "nul\x00", "x" * 257])
async def test_bad_topics_are_refused(topic: str) -> None:
    hub = MemoryHub()
    (a,) = await started(hub, "a")
    with pytest.raises(ValueError):
        await a.subscribe(topic)
    with pytest.raises(ValueError):
        await a.publish(topic, b"x")
    assert a.stats["sent"] == 0


async def test_stats_are_read_only_and_hub_sums_them() -> None:
    hub = MemoryHub()
    a, b = await started(hub, "a", "b")
    await a.send("b", b"1")
    await b.send("a", b"2")
    await b.send("a", b"3")

    with pytest.raises(TypeError):
        a.stats["sent"] = 0  # type: ignore[index]
    assert (a.stats["sent"], a.stats["delivered"]) == (1, 2)
    assert (b.stats["sent"], b.stats["delivered"]) == (2, 1)
    assert hub.stats["sent"] == 3
    assert hub.stats["delivered"] == 3


async def test_bytearray_payload_is_copied() -> None:
    hub = MemoryHub()
    a, b = await started(hub, "a", "b")
    buffer = bytearray(b"abc")
    await a.send("b", buffer)  # type: ignore[arg-type]
    buffer[0] = ord("z")
    message = await next_item(b.incoming())
    assert message.data == b"abc"
    assert type(message.data) is bytes


# -- direct sends: self, unknown, departed --------------------------------------


async def test_send_to_self_is_delivered() -> None:
    hub = MemoryHub()
    (a,) = await started(hub, "a")
    await a.send("a", b"note to self")
    assert await next_item(a.incoming()) == Inbound("a", b"note to self")


async def test_send_to_never_known_peer_raises_peer_unreachable() -> None:
    hub = MemoryHub()
    (a,) = await started(hub, "a")
    hub.transport("made-not-started")

    with pytest.raises(PeerUnreachable, match="unknown peer"):
        await a.send("nobody", b"x")
    with pytest.raises(PeerUnreachable):
        await a.send("made-not-started", b"x")
    assert issubclass(PeerUnreachable, TransportError)
    assert a.stats["sent"] == 0


async def test_send_to_closed_peer_is_a_silent_counted_drop() -> None:
    hub = MemoryHub()
    a, b = await started(hub, "a", "b")
    await b.aclose()

    await a.send("b", b"lost")

    assert a.stats["sent"] == 1
    assert a.stats["dropped_unreachable"] == 1
    assert b.stats["delivered"] == 0


async def test_copies_in_flight_to_a_closing_peer_are_dropped() -> None:
    hub = MemoryHub(latency=0.01)
    a, b = await started(hub, "a", "b")
    await b.subscribe("t")
    await a.send("b", b"direct")
    await a.publish("t", b"gossip")
    assert hub.in_flight == 2

    await b.aclose()
    async with asyncio.timeout(TIMEOUT):
        await hub.drained()

    assert hub.in_flight == 0
    assert a.stats["dropped_unreachable"] == 2
    assert hub.stats["delivered"] == 0


async def test_closing_discards_what_is_queued() -> None:
    hub = MemoryHub()
    a, b = await started(hub, "a", "b")
    sub = await b.subscribe("t")
    await a.send("b", b"unread")
    await a.publish("t", b"unread")
    assert b.stats["delivered"] == 2

    await sub.aclose()
    with pytest.raises(StopAsyncIteration):
        await next_item(sub)
    await b.aclose()
    with pytest.raises(StopAsyncIteration):
        await next_item(b.incoming())


async def test_a_closed_subscription_is_forgotten_by_the_hub() -> None:
    hub = MemoryHub()
    a, b = await started(hub, "a", "b")
    gone = await b.subscribe("t")
    kept = await b.subscribe("t")
    await gone.aclose()
    await b.subscribe("other")

    await a.publish("t", b"x")

    assert await next_item(kept) == b"x"
    assert b.stats["delivered"] == 1
    assert a.stats["dropped_unreachable"] == 0  # no copy routed to the closed one

    await b.aclose()
    await a.publish("t", b"y")
    await a.publish("other", b"z")
    assert a.stats["dropped_unreachable"] == 0  # closing b unsubscribed everything


async def test_connect_checks_the_address() -> None:
    hub = MemoryHub()
    a, b = await started(hub, "a", "b")

    await a.connect("memory://b")
    await a.connect(a.addresses()[0])
    assert a.dialed == ("memory://b", "memory://a")
    assert b.addresses() == ["memory://b"]
    with pytest.raises(PeerUnreachable):
        await a.connect("memory://nobody")
    with pytest.raises(ValueError):
        await a.connect("/ip4/127.0.0.1/tcp/4001")
    with pytest.raises(ValueError):
        await a.connect("memory://")


# -- latency ---------------------------------------------------------------------


async def test_latency_delays_delivery_by_at_least_the_latency() -> None:
    latency = 0.03
    hub = MemoryHub(latency=latency, seed=1)
    a, b = await started(hub, "a", "b")
    loop = asyncio.get_running_loop()
    inbox = b.incoming()

    sent_at = loop.time()
    await a.send("b", b"slow")
    assert b.stats["delivered"] == 0
    assert hub.in_flight == 1
    message = await next_item(inbox)
    arrived_at = loop.time()

    assert message == Inbound("a", b"slow")
    assert arrived_at - sent_at >= latency - CLOCK_RESOLUTION
    assert hub.in_flight == 0


async def test_constant_latency_keeps_order() -> None:
    hub = MemoryHub(latency=0.01, seed=1)
    a, b = await started(hub, "a", "b")
    sub = await b.subscribe("t")
    inbox = b.incoming()

    for i in range(50):
        await a.send("b", packet(i))
        await a.publish("t", packet(i))

    assert [index(m.data) for m in await take(inbox, 50)] == list(range(50))
    assert [index(d) for d in await take(sub, 50)] == list(range(50))


async def test_jitter_reorders_as_the_seeded_draws_say() -> None:
    seed, count, jitter = 185, 8, (0.0, 0.1)
    draws = random.Random(seed)
    delays = [draws.uniform(*jitter) for _ in range(count)]
    expected = sorted(range(count), key=lambda i: delays[i])
    smallest_gap = min(y - x for x, y in zip(sorted(delays), sorted(delays)[1:], strict=False))
    hub = MemoryHub(latency=jitter, seed=seed)
    a, b = await started(hub, "a", "b")
    loop = asyncio.get_running_loop()
    inbox = b.incoming()

    started_at = loop.time()
    for i in range(count):
        await a.send("b", packet(i))
    send_duration = loop.time() - started_at

    arrivals = [index(m.data) for m in await take(inbox, count)]
    # Sends differ in time far less than delays differ, so the delays decide.
    assert send_duration < smallest_gap
    assert expected != list(range(count))
    assert arrivals == expected


async def test_lowering_latency_lets_a_later_copy_overtake() -> None:
    hub = MemoryHub(latency=0.05)
    a, b = await started(hub, "a", "b")
    inbox = b.incoming()

    await a.send("b", b"sent first, slow")
    hub.set_latency(0.0)
    await a.send("b", b"sent second, fast")

    assert [m.data for m in await take(inbox, 2)] == [b"sent second, fast", b"sent first, slow"]


async def test_drained_waits_for_copies_in_flight() -> None:
    hub = MemoryHub(latency=(0.005, 0.02), seed=3)
    peers = await started(hub, "a", "b", "c")
    subs = [await t.subscribe("t") for t in peers]
    await peers[0].publish("t", b"x")
    await peers[1].send("c", b"y")
    assert hub.in_flight == 3

    async with asyncio.timeout(TIMEOUT):
        await hub.drained()

    assert hub.in_flight == 0
    assert hub.stats["delivered"] == 3
    assert [await next_item(s) for s in subs[1:]] == [b"x", b"x"]


# -- loss ------------------------------------------------------------------------


async def test_total_loss_drops_everything_and_counts_it() -> None:
    hub = MemoryHub(loss=1.0, seed=0)
    a, b, c = await started(hub, "a", "b", "c")
    sub_b, sub_c = await b.subscribe("t"), await c.subscribe("t")

    for i in range(10):
        await a.send("b", packet(i))
        await a.publish("t", packet(i))

    assert a.stats["sent"] == 20
    assert a.stats["dropped_loss"] == 30  # 10 direct + 10 x 2 subscribers
    assert hub.stats["delivered"] == 0
    hub.set_loss(0.0)
    await a.publish("t", b"marker")
    await a.send("b", b"marker")
    assert await next_item(sub_b) == b"marker"
    assert await next_item(sub_c) == b"marker"
    assert await next_item(b.incoming()) == Inbound("a", b"marker")


async def received_under_loss(seed: int, count: int = 200) -> list[int]:
    hub = MemoryHub(loss=0.5, seed=seed)
    a, b = await started(hub, "a", "b")
    for i in range(count):
        await a.send("b", packet(i))
    delivered = b.stats["delivered"]
    assert delivered + a.stats["dropped_loss"] == count
    return [index(m.data) for m in await take(b.incoming(), delivered)]


async def test_seeded_loss_is_deterministic() -> None:
    first = await received_under_loss(seed=11)
    again = await received_under_loss(seed=11)
    other = await received_under_loss(seed=12)

    assert first == again
    assert first != other
    assert 60 < len(first) < 140  # about half of 200
    assert first == sorted(first)  # loss never reorders


def test_bad_loss_and_latency_are_refused() -> None:
    with pytest.raises(ValueError):
        MemoryHub(loss=1.5)
    with pytest.raises(ValueError):
        MemoryHub(latency=(0.2, 0.1))
    with pytest.raises(ValueError):
        MemoryHub(latency=-1.0)
    hub = MemoryHub()
    with pytest.raises(ValueError):
        hub.set_loss(-0.1)
    with pytest.raises(ValueError):
        hub.set_latency(float("inf"))
    hub.set_latency(0.25)
    assert hub.latency == (0.25, 0.25)


# -- partitions ------------------------------------------------------------------


async def test_partition_blocks_gossip_and_direct_and_heal_restores() -> None:
    hub = MemoryHub()
    a, b, c, d = await started(hub, "a", "b", "c", "d")
    subs = {t.local_id: await t.subscribe("t") for t in (a, b, c, d)}

    # a, b together; c alone; d is named nowhere, so it is in "the rest".
    hub.partition({"a", "b"}, ["c"])
    await a.publish("t", b"cut")
    await a.send("c", b"cut")
    await c.send("a", b"cut")
    await d.send("c", b"cut")
    await d.send("a", b"cut")

    assert a.peers() == {"b"}
    assert c.peers() == frozenset()
    assert d.peers() == frozenset()
    assert hub.reachable("a", "b") and not hub.reachable("c", "d")
    assert a.stats["dropped_partition"] == 3  # c and d subscribers, direct to c
    assert c.stats["dropped_partition"] == 1
    assert d.stats["dropped_partition"] == 2
    assert await next_item(subs["b"]) == b"cut"
    with pytest.raises(PeerUnreachable):
        await a.connect("memory://c")

    hub.heal()
    await a.publish("t", b"healed")
    await a.send("c", b"healed")
    assert a.peers() == {"b", "c", "d"}
    assert await next_item(subs["b"]) == b"healed"
    assert await next_item(subs["c"]) == b"healed"
    assert await next_item(subs["d"]) == b"healed"
    assert await next_item(c.incoming()) == Inbound("a", b"healed")


async def test_unnamed_peers_form_one_group() -> None:
    hub = MemoryHub()
    a, b, c = await started(hub, "a", "b", "c")
    hub.partition(["a"])
    (late,) = await started(hub, "late")

    await b.send("c", b"rest to rest")
    await late.send("b", b"late joins the rest")

    assert b.peers() == {"c", "late"}
    assert a.peers() == frozenset()
    assert await next_item(c.incoming()) == Inbound("b", b"rest to rest")
    assert await next_item(b.incoming()) == Inbound("late", b"late joins the rest")


async def test_a_partition_also_cuts_copies_in_flight() -> None:
    hub = MemoryHub(latency=0.01)
    a, b = await started(hub, "a", "b")
    await a.send("b", b"on the wire")

    hub.partition(["a"], ["b"])
    async with asyncio.timeout(TIMEOUT):
        await hub.drained()

    assert a.stats["dropped_partition"] == 1
    assert b.stats["delivered"] == 0


def test_a_peer_in_two_groups_is_refused() -> None:
    hub = MemoryHub()
    with pytest.raises(ValueError, match="more than one group"):
        hub.partition({"a", "b"}, {"b", "c"})


async def test_partition_replaces_the_previous_one() -> None:
    hub = MemoryHub()
    a, _, c = await started(hub, "a", "b", "c")
    hub.partition(["a"], ["b", "c"])
    hub.partition(["a", "b"])
    assert a.peers() == {"b"}
    assert c.peers() == frozenset()


# -- bounded queues ---------------------------------------------------------------


async def test_full_queues_drop_new_messages_and_count_them() -> None:
    hub = MemoryHub(queue_size=3)
    a, b = await started(hub, "a", "b")
    sub = await b.subscribe("t")

    for i in range(5):
        await a.send("b", packet(i))
        await a.publish("t", packet(i))

    assert b.stats["dropped_queue_full"] == 4
    assert b.stats["delivered"] == 6
    assert hub.stats["dropped_queue_full"] == 4
    assert [index(m.data) for m in await take(b.incoming(), 3)] == [0, 1, 2]
    assert [index(d) for d in await take(sub, 3)] == [0, 1, 2]
    # Room again once the consumer caught up.
    await a.send("b", packet(9))
    assert index((await next_item(b.incoming())).data) == 9


# -- scale ------------------------------------------------------------------------


async def test_a_thousand_transports_on_one_hub() -> None:
    hub = MemoryHub(seed=0)
    ids = [f"{i:064x}" for i in range(1000)]
    peers = await started(hub, *ids)
    subs = [await t.subscribe("fi/sim/peers") for t in peers]
    publishers = peers[:5]
    loop = asyncio.get_running_loop()
    began = loop.time()

    for n, publisher in enumerate(publishers):
        await publisher.publish("fi/sim/peers", packet(n))

    for position, sub in enumerate(subs):
        expected = [n for n in range(5) if n != position]
        assert [index(d) for d in await take(sub, len(expected))] == expected
    assert hub.stats["delivered"] == 5 * 999
    assert peers[0].peers() == frozenset(ids[1:])
    assert loop.time() - began < 5.0
