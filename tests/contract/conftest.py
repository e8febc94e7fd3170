"""The transport contract suite runs once per implementation listed here.

A test asks for ``transport_factory`` and calls ``await make(n)`` to get a
:class:`TransportNet`: ``n`` started transports that can reach one another.
Ids are chosen by the implementation (real transports derive them from keys);
tests use ``transport.local_id``.

Everything implementation-specific about *waiting* lives in the net, never
in the tests:

* ``await net.ready()``: after subscribing, wait until every subscription
  and connection made so far is known to every peer (a gossip mesh needs
  time; memory needs none);
* ``await net.settle()``: wait until every message sent and every close made
  so far has taken effect everywhere, so a test can check that something
  did NOT arrive (then send a marker and expect the marker next).

To add a transport: write ``async def _make_<name>(count) -> TransportNet``
and add it to ``FACTORIES``; mark it ``integration`` in ``MARKS`` if it needs a
real network or broker.

Real transports here: ``libp2p`` (hosts on 127.0.0.1, all in this process's
one trio thread, dialled as a full mesh), ``mqtt-mosquitto`` (a private
Mosquitto on a free loopback port per net; skipped if it is not installed)
and ``mqtt-amqtt`` (the embedded amqtt broker in the test's event loop).
Their ``ready()``/``settle()`` poll observable state until a deadline.
"""

from __future__ import annotations

import abc
import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import pytest_asyncio

from network import MemoryHub, Phase, Transport, TransportBase
from network.libp2p import GossipSettings, Libp2pTransport
from network.mqtt import EmbeddedBroker, MqttTransport
from tests.integration.support import AsyncMosquitto, free_port

DEADLINE_S = 10.0


class TransportNet(abc.ABC):
    """``count`` started transports that can reach one another."""

    def __init__(self, transports: list[Transport]) -> None:
        self.transports = transports

    @abc.abstractmethod
    async def ready(self) -> None:
        """Wait until subscriptions and connections made so far are in place."""

    @abc.abstractmethod
    async def settle(self) -> None:
        """Wait until messages sent and closes made so far have taken effect."""

    async def aclose(self) -> None:
        for transport in self.transports:
            await transport.aclose()


MakeNet = Callable[[int], Awaitable[TransportNet]]


class _MemoryNet(TransportNet):
    def __init__(self, hub: MemoryHub, transports: list[Transport]) -> None:
        super().__init__(transports)
        self.hub = hub

    async def ready(self) -> None:
        return  # subscribing and starting take effect at once on a hub

    async def settle(self) -> None:
        await self.hub.drained()


async def _make_memory(count: int) -> TransportNet:
    hub = MemoryHub(seed=0)
    # Ids shaped like fi-peer's (hex of a 32-byte key), without making keys.
    transports: list[Transport] = [hub.transport(f"{i + 1:064x}") for i in range(count)]
    for transport in transports:
        await transport.start()
    return _MemoryNet(hub, transports)


async def _poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"transport net: timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _split(net: TransportNet) -> tuple[list[Transport], set[str]]:
    """(transports still running, ids of the closed ones)."""
    running = [
        t for t in net.transports if isinstance(t, TransportBase) and t.phase is Phase.RUNNING
    ]
    gone = {t.local_id for t in net.transports if t not in running}
    return running, gone


def _topics(transport: Transport) -> frozenset[str]:
    assert isinstance(transport, Libp2pTransport | MqttTransport)
    return transport.local_topics()


class _Libp2pNet(TransportNet):
    async def ready(self) -> None:
        running, _ = _split(self)

        async def meshed() -> bool:
            ids = {t.local_id for t in running}
            if any(not (ids - {t.local_id}) <= t.peers() for t in running):
                return False
            for topic in set().union(*(_topics(t) for t in running)):
                subscribers = {t.local_id for t in running if topic in _topics(t)}
                for t in running:
                    assert isinstance(t, Libp2pTransport)
                    # Our own publications are flooded to every known subscriber,
                    # so knowing the subscriptions is enough; the mesh may lag.
                    known, _ = await t.gossip_view(topic)
                    if not (subscribers - {t.local_id}) <= known:
                        return False
            return True

        await _poll(meshed, "connections and subscriptions to be known")

    async def settle(self) -> None:
        running, gone = _split(self)
        for t in running:
            assert isinstance(t, Libp2pTransport)
            await t.flush()

        async def departed() -> bool:
            return all(not (gone & t.peers()) for t in running)

        await _poll(departed, "closed peers to disappear")

    async def aclose(self) -> None:
        # Closing a host waits for its connections to close: do them together.
        await asyncio.gather(*(t.aclose() for t in self.transports))


async def _make_libp2p(count: int) -> TransportNet:
    gossip = GossipSettings(heartbeat_interval=1, heartbeat_initial_delay=0.05)
    transports: list[Transport] = [
        Libp2pTransport(os.urandom(32), gossip=gossip) for _ in range(count)
    ]
    for transport in transports:
        await transport.start()
    dials = [
        a.connect(b.addresses()[0]) for i, a in enumerate(transports) for b in transports[i + 1 :]
    ]
    await asyncio.gather(*dials)
    return _Libp2pNet(transports)


class _MqttNet(TransportNet):
    def __init__(self, transports: Sequence[Transport], stop_broker: Callable[[], Awaitable[None]]):
        super().__init__(list(transports))
        self._stop_broker = stop_broker

    async def ready(self) -> None:
        running, _ = _split(self)
        ids = {t.local_id for t in running}

        async def present() -> bool:
            return all((ids - {t.local_id}) <= t.peers() for t in running)

        await _poll(present, "presence of every peer")

    async def settle(self) -> None:
        running, gone = _split(self)
        for t in running:
            assert isinstance(t, MqttTransport)
            await t.flush()

        async def departed() -> bool:
            return all(not (gone & t.peers()) for t in running)

        await _poll(departed, "closed peers to disappear")

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self._stop_broker()


async def _mqtt_net(count: int, url: str, stop: Callable[[], Awaitable[None]]) -> TransportNet:
    net = f"c{secrets.token_hex(4)}"
    transports = [MqttTransport(secrets.token_hex(32), broker=url, net=net) for _ in range(count)]
    try:
        for transport in transports:
            await transport.start()
    except BaseException:
        for transport in transports:
            await transport.aclose()
        await stop()
        raise
    return _MqttNet(transports, stop)


async def _make_mqtt_mosquitto(count: int) -> TransportNet:
    broker = await AsyncMosquitto().start()
    return await _mqtt_net(count, broker.url, broker.stop)


async def _make_mqtt_amqtt(count: int) -> TransportNet:
    broker = EmbeddedBroker(port=free_port())
    await broker.start()
    return await _mqtt_net(count, broker.url, broker.aclose)


FACTORIES: dict[str, Callable[[int], Awaitable[TransportNet]]] = {
    "memory": _make_memory,
    "libp2p": _make_libp2p,
    "mqtt-mosquitto": _make_mqtt_mosquitto,
    "mqtt-amqtt": _make_mqtt_amqtt,
}
MARKS: dict[str, tuple[pytest.MarkDecorator, ...]] = {
    "libp2p": (pytest.mark.integration,),
    "mqtt-mosquitto": (pytest.mark.integration,),
    "mqtt-amqtt": (pytest.mark.integration,),
}


@pytest_asyncio.fixture(
    params=[pytest.param(name, id=name, marks=MARKS.get(name, ())) for name in sorted(FACTORIES)]
)
async def transport_factory(request: pytest.FixtureRequest) -> AsyncIterator[MakeNet]:
    """``await make(n)``: a fresh net of ``n`` transports, closed after the test."""
    build = FACTORIES[request.param]
    nets: list[TransportNet] = []

    async def make(count: int) -> TransportNet:
        net = await build(count)
        nets.append(net)
        return net

    yield make
    for net in nets:
        await net.aclose()
