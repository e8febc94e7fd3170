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
and add it to ``FACTORIES``; mark it ``integration`` there if it needs a
real network or broker.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from network import MemoryHub, Transport


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


FACTORIES: dict[str, Callable[[int], Awaitable[TransportNet]]] = {
    "memory": _make_memory,
}


@pytest_asyncio.fixture(params=[pytest.param(name, id=name) for name in sorted(FACTORIES)])
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
