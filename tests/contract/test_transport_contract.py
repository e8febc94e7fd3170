"""The transport contract (``network.base``), written once for every transport.

Each test runs against every implementation in ``conftest.FACTORIES``. Only
the ``Transport`` protocol and the net's ``ready()``/``settle()`` are used
here: nothing implementation-specific. To show that something did NOT
arrive, a test settles the net, sends a marker on the same path and expects
the marker as the very next item.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

import pytest

from network import (
    Inbound,
    MessageTooLarge,
    PeerUnreachable,
    Subscription,
    Transport,
    TransportClosed,
    TransportError,
)

if TYPE_CHECKING:
    from tests.contract.conftest import MakeNet

TIMEOUT = 5.0
T = TypeVar("T")


async def next_item(iterator: AsyncIterator[T]) -> T:
    async with asyncio.timeout(TIMEOUT):
        return await anext(iterator)


async def take(iterator: AsyncIterator[T], count: int) -> list[T]:
    async with asyncio.timeout(TIMEOUT):
        return [await anext(iterator) for _ in range(count)]


async def test_transports_satisfy_the_protocol(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, b = net.transports
    assert isinstance(a, Transport)
    assert isinstance(await a.subscribe("fi/test/proto"), Subscription)
    assert a.local_id != b.local_id
    assert isinstance(a.local_id, str) and a.local_id
    assert a.max_message_size > 0
    assert a.addresses() and all(isinstance(addr, str) for addr in a.addresses())
    assert {"sent", "delivered", "dropped_queue_full"} <= set(a.stats)


async def test_publish_reaches_every_other_subscriber_but_not_self(
    transport_factory: MakeNet,
) -> None:
    net = await transport_factory(3)
    a, b, c = net.transports
    subs = {t.local_id: await t.subscribe("fi/test/gossip") for t in (a, b, c)}
    await net.ready()

    await a.publish("fi/test/gossip", b"from-a")

    assert await next_item(subs[b.local_id]) == b"from-a"
    assert await next_item(subs[c.local_id]) == b"from-a"
    await net.settle()
    await b.publish("fi/test/gossip", b"marker-from-b")
    assert await next_item(subs[a.local_id]) == b"marker-from-b"  # not its own b"from-a"
    assert a.stats["sent"] == 1


async def test_two_subscriptions_on_one_topic_both_receive(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, b = net.transports
    first = await b.subscribe("fi/test/twice")
    second = await b.subscribe("fi/test/twice")
    await net.ready()

    await a.publish("fi/test/twice", b"one")
    await a.publish("fi/test/twice", b"two")

    assert first.topic == second.topic == "fi/test/twice"
    assert await take(first, 2) == [b"one", b"two"]
    assert await take(second, 2) == [b"one", b"two"]


async def test_topics_are_isolated(transport_factory: MakeNet) -> None:
    net = await transport_factory(3)
    a, b, c = net.transports
    on_x = await b.subscribe("fi/test/x")
    on_y = await c.subscribe("fi/test/y")
    await net.ready()

    await a.publish("fi/test/x", b"for-x")
    await a.publish("fi/test/prefix-of-nothing", b"for-nobody")
    await net.settle()
    await a.publish("fi/test/y", b"for-y")
    await a.publish("fi/test/x", b"x-again")

    assert await next_item(on_y) == b"for-y"
    assert await take(on_x, 2) == [b"for-x", b"x-again"]


async def test_publish_without_subscribers_is_not_an_error(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, _ = net.transports
    await a.publish("fi/test/nobody-listens", b"into the void")
    assert a.stats["sent"] == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00",
        bytes(range(256)),
        "héllo wörld".encode(),
        b"\xff" * 1000,
    ],
    ids=["empty", "nul", "all-bytes", "utf8", "ff-1000"],
)
async def test_direct_send_arrives_exact_with_sender_id(
    transport_factory: MakeNet, payload: bytes
) -> None:
    net = await transport_factory(3)
    a, b, _ = net.transports
    await net.ready()
    inbox = b.incoming()

    await a.send(b.local_id, payload)

    message = await next_item(inbox)
    assert isinstance(message, Inbound)
    assert message.sender == a.local_id
    assert message.data == payload
    assert type(message.data) is bytes


async def test_payload_of_exactly_max_size_arrives(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, b = net.transports
    sub = await b.subscribe("fi/test/big")
    await net.ready()
    payload = random.Random(7).randbytes(a.max_message_size)
    inbox = b.incoming()

    await a.send(b.local_id, payload)
    await a.publish("fi/test/big", payload)

    assert (await next_item(inbox)).data == payload
    assert await next_item(sub) == payload


async def test_payload_over_max_size_is_refused(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, b = net.transports
    sub = await b.subscribe("fi/test/big")
    await net.ready()
    too_big = bytes(a.max_message_size + 1)

    with pytest.raises(MessageTooLarge):
        await a.send(b.local_id, too_big)
    with pytest.raises(MessageTooLarge):
        await a.publish("fi/test/big", too_big)

    assert issubclass(MessageTooLarge, TransportError)
    assert a.stats["sent"] == 0
    await net.settle()
    await a.publish("fi/test/big", b"marker")
    assert await next_item(sub) == b"marker"


async def test_peers_lists_the_others_not_self(transport_factory: MakeNet) -> None:
    net = await transport_factory(3)
    a, b, c = net.transports
    await net.ready()

    assert {b.local_id, c.local_id} <= a.peers()
    assert a.local_id not in a.peers()
    assert {a.local_id, c.local_id} <= b.peers()


async def test_connect_to_another_peers_address(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, b = net.transports

    await a.connect(b.addresses()[0])
    await net.ready()

    assert b.local_id in a.peers()
    inbox = b.incoming()
    await a.send(b.local_id, b"after connect")
    assert await next_item(inbox) == Inbound(a.local_id, b"after connect")


async def test_closed_peer_disappears_and_does_not_break_the_sender(
    transport_factory: MakeNet,
) -> None:
    net = await transport_factory(3)
    a, b, c = net.transports
    await net.ready()

    await b.aclose()
    await net.settle()

    assert b.local_id not in a.peers()
    # Best effort either way: a silent drop or PeerUnreachable, nothing else.
    with contextlib.suppress(PeerUnreachable):
        await a.send(b.local_id, b"to the departed")
    inbox = c.incoming()
    await a.send(c.local_id, b"still works")
    assert await next_item(inbox) == Inbound(a.local_id, b"still works")


async def test_aclose_is_idempotent(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, _ = net.transports
    await a.aclose()
    await a.aclose()
    assert a.peers() == frozenset()


async def test_aclose_ends_incoming_and_subscription_iteration(
    transport_factory: MakeNet,
) -> None:
    net = await transport_factory(2)
    a, b = net.transports
    sub = await a.subscribe("fi/test/ending")
    await net.ready()
    direct: list[Inbound] = []
    gossip: list[bytes] = []
    got_direct, got_gossip = asyncio.Event(), asyncio.Event()

    async def read_incoming() -> None:
        async for message in a.incoming():
            direct.append(message)
            got_direct.set()

    async def read_subscription() -> None:
        async for data in sub:
            gossip.append(data)
            got_gossip.set()

    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tasks:
        tasks.create_task(read_incoming())
        tasks.create_task(read_subscription())
        await b.send(a.local_id, b"direct")
        await b.publish("fi/test/ending", b"gossip")
        await got_direct.wait()
        await got_gossip.wait()
        # Both readers are now blocked waiting for more; closing must end them.
        await a.aclose()

    assert direct == [Inbound(b.local_id, b"direct")]
    assert gossip == [b"gossip"]
    with pytest.raises(StopAsyncIteration):
        await next_item(a.incoming())


async def test_use_after_close_raises_transport_closed(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, b = net.transports
    await a.aclose()

    with pytest.raises(TransportClosed):
        await a.publish("fi/test/closed", b"x")
    with pytest.raises(TransportClosed):
        await a.subscribe("fi/test/closed")
    with pytest.raises(TransportClosed):
        await a.send(b.local_id, b"x")
    with pytest.raises(TransportClosed):
        await a.connect(b.addresses()[0])
    with pytest.raises(TransportClosed):
        await a.start()
    assert issubclass(TransportClosed, TransportError)


async def test_subscription_aclose_stops_delivery(transport_factory: MakeNet) -> None:
    net = await transport_factory(2)
    a, b = net.transports
    leaving = await b.subscribe("fi/test/leave")
    staying = await b.subscribe("fi/test/leave")
    await net.ready()
    await a.publish("fi/test/leave", b"before")
    await a.publish("fi/test/leave", b"queued")
    assert await next_item(leaving) == b"before"
    assert await take(staying, 2) == [b"before", b"queued"]

    await leaving.aclose()  # b"queued" is still unread on it: discarded
    await leaving.aclose()  # idempotent
    await net.ready()
    await a.publish("fi/test/leave", b"after")

    with pytest.raises(StopAsyncIteration):
        await next_item(leaving)
    assert await next_item(staying) == b"after"


async def test_two_hundred_messages_arrive_complete_and_in_order(
    transport_factory: MakeNet,
) -> None:
    net = await transport_factory(2)
    a, b = net.transports
    sub = await b.subscribe("fi/test/order")
    await net.ready()
    inbox = b.incoming()
    sent = [i.to_bytes(4, "big") for i in range(200)]

    for data in sent:
        await a.send(b.local_id, data)
        await a.publish("fi/test/order", data)

    assert [m.data for m in await take(inbox, 200)] == sent
    assert await take(sub, 200) == sent
    assert a.stats["sent"] == 400
    assert b.stats["delivered"] == 400
