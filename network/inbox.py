"""Bounded in-process queues shared by every transport.

An :class:`Inbox` is a FIFO that drops (and says so) when full and ends
iteration when closed: what a transport's ``incoming()`` and each
subscription read from. :class:`InboxSubscription` is the part of a
subscription that every transport shares; each adds how it unsubscribes
(:class:`OwnedSubscription`: by asking its transport, asynchronously).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Generic, Protocol, TypeVar

_T = TypeVar("_T")


class Inbox(Generic[_T]):
    """A bounded FIFO that drops when full and ends iteration when closed."""

    __slots__ = ("_closed", "_items", "_maxsize", "_waiters")

    def __init__(self, maxsize: int) -> None:
        self._items: deque[_T] = deque()
        self._maxsize = maxsize
        self._closed = False
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: _T) -> bool:
        """Queue ``item``; False (and nothing queued) if full."""
        if len(self._items) >= self._maxsize:
            return False
        self._items.append(item)
        self._wake()
        return True

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def next(self) -> _T:
        """The next item; StopAsyncIteration once closed."""
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        return self._items.popleft()


class InboxIterator(AsyncIterator[_T]):
    """Iterates an :class:`Inbox` until it is closed."""

    __slots__ = ("_inbox",)

    def __init__(self, inbox: Inbox[_T]) -> None:
        self._inbox = inbox

    async def __anext__(self) -> _T:
        return await self._inbox.next()


class InboxSubscription(AsyncIterator[bytes]):
    """The shared part of one ``subscribe()`` call: its topic and its inbox."""

    __slots__ = ("_inbox", "_topic")

    def __init__(self, topic: str, queue_size: int) -> None:
        self._topic = topic
        self._inbox: Inbox[bytes] = Inbox(queue_size)

    @property
    def topic(self) -> str:
        return self._topic

    async def __anext__(self) -> bytes:
        return await self._inbox.next()

    def _close(self) -> None:
        self._inbox.close()


class SubscriptionOwner(Protocol):
    """A transport that forgets a subscription when it is closed."""

    async def _drop_subscription(self, sub: OwnedSubscription) -> None: ...


class OwnedSubscription(InboxSubscription):
    """A subscription whose ``aclose`` asks its transport to drop it (libp2p, MQTT)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: SubscriptionOwner, topic: str, queue_size: int) -> None:
        super().__init__(topic, queue_size)
        self._owner = owner

    async def aclose(self) -> None:
        await self._owner._drop_subscription(self)
