"""In-process transport: a hub that many peers share, with injectable faults.

Theory of operation. A :class:`MemoryHub` is the whole "network". Each
:class:`MemoryTransport` it makes joins the hub on ``start()`` and leaves on
``aclose()``. Sending a message routes one copy per destination:

1. partition check (``partition()``): a copy between groups is dropped and
   counted ``dropped_partition`` on the sender;
2. loss (``set_loss(p)``): one draw from the hub's own ``random.Random``,
   a lost copy is counted ``dropped_loss`` on the sender;
3. latency (``set_latency``): zero latency queues the copy at once, in the
   sender's call; otherwise the copy waits in a heap keyed by (due time,
   sequence number) and ``loop.call_at`` delivers it: no task per message.
   A timer delivers every copy due up to and including its own, in key order,
   so constant latency keeps per-pair order even when timers tie.
4. delivery re-checks that the destination still exists (else
   ``dropped_unreachable`` on the sender) and the partition (cutting a link
   also loses what is on it), then queues the copy; a full queue drops it,
   counted ``dropped_queue_full`` on the receiver; otherwise ``delivered``.

The hub keeps the sum of all counters in ``hub.stats``.

Decisions (the contract in ``network.base`` leaves them open):

* ``partition(*groups)``: peers in different groups cannot exchange
  anything, gossip or direct, in either direction. Peers named in no group,
  including ones that join later, form one more group together ("the rest").
  A new ``partition()`` replaces the previous one; ``heal()`` removes it.
  ``peers()`` and ``connect()`` respect the partition.
* ``send`` to a peer id never started on this hub raises
  :class:`PeerUnreachable`. To a peer that was started but has closed, or
  that is partitioned away, the copy is silently dropped and counted, as a
  real network would lose it.
* ``send`` to oneself is allowed and delivered to one's own ``incoming()``
  (subject to loss and latency like any copy). ``publish`` is never echoed.
* Changing the latency while copies are in flight can reorder them (a copy
  sent with less latency may overtake an earlier one).
* A peer id may be reused once its transport has closed (a restarted
  peer); copies still in flight to the old one are dropped.
* With zero latency, delivery happens inside ``publish``/``send``, which
  therefore never yield to the event loop.

Cost: per transport a deque, per topic an ordered set of subscriptions, per
delayed copy one heap entry and one timer; 1,000 peers fit in one process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from network.base import (
    STAT_KEYS,
    Inbound,
    PeerId,
    PeerUnreachable,
    Phase,
    TransportBase,
    TransportClosed,
    validate_topic,
)
from network.inbox import Inbox, InboxIterator, InboxSubscription

__all__ = ["ADDRESS_SCHEME", "MemoryHub", "MemorySubscription", "MemoryTransport"]

ADDRESS_SCHEME: Final = "memory://"
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024
DEFAULT_QUEUE_SIZE: Final = 10_000
_REST_GROUP: Final = -1

_T = TypeVar("_T")


class MemorySubscription(InboxSubscription):
    """One ``subscribe()`` call on a :class:`MemoryTransport`."""

    __slots__ = ("_owner",)

    def __init__(self, owner: MemoryTransport, topic: str, queue_size: int) -> None:
        super().__init__(topic, queue_size)
        self._owner = owner

    @property
    def owner(self) -> MemoryTransport:
        return self._owner

    async def aclose(self) -> None:
        self._owner._drop_subscription(self)


class MemoryTransport(TransportBase):
    """A peer on a :class:`MemoryHub`. Make it with ``hub.transport(id)``."""

    def __init__(self, hub: MemoryHub, peer_id: PeerId) -> None:
        super().__init__()
        self._hub = hub
        self._id = peer_id
        self._inbox: Inbox[Inbound] = Inbox(hub.queue_size)
        self._subscriptions: dict[MemorySubscription, None] = {}
        self._dialed: list[str] = []

    def __repr__(self) -> str:
        return f"<MemoryTransport {self._id!r} {self._phase.value}>"

    @property
    def local_id(self) -> PeerId:
        return self._id

    @property
    def max_message_size(self) -> int:
        return self._hub.max_message_size

    @property
    def hub(self) -> MemoryHub:
        return self._hub

    @property
    def dialed(self) -> tuple[str, ...]:
        """Addresses passed to ``connect()``, in order (for tests)."""
        return tuple(self._dialed)

    async def start(self) -> None:
        if self._phase is Phase.CLOSED:
            raise TransportClosed(f"transport {self._id!r} is closed")
        if self._phase is Phase.RUNNING:
            return
        self._phase = Phase.RUNNING
        self._hub._attach(self)

    async def aclose(self) -> None:
        if self._phase is Phase.CLOSED:
            return
        was_running = self._phase is Phase.RUNNING
        self._phase = Phase.CLOSED
        for sub in list(self._subscriptions):
            self._drop_subscription(sub)
        self._inbox.close()
        self._hub._detach(self, was_running=was_running)

    async def publish(self, topic: str, data: bytes) -> None:
        self._require_running()
        validate_topic(topic)
        data = self._checked_payload(data)
        self._hub._count(self, "sent")
        self._hub._publish(self, topic, data)

    async def subscribe(self, topic: str) -> MemorySubscription:
        self._require_running()
        validate_topic(topic)
        sub = MemorySubscription(self, topic, self._hub.queue_size)
        self._subscriptions[sub] = None
        self._hub._add_subscription(sub)
        return sub

    async def send(self, peer: PeerId, data: bytes) -> None:
        self._require_running()
        data = self._checked_payload(data)
        self._hub._send(self, peer, data)

    def incoming(self) -> AsyncIterator[Inbound]:
        """Direct messages to this peer. Every call iterates the same queue."""
        return InboxIterator(self._inbox)

    def peers(self) -> frozenset[PeerId]:
        if self._phase is not Phase.RUNNING:
            return frozenset()
        return self._hub._peers_of(self._id)

    def addresses(self) -> list[str]:
        return [ADDRESS_SCHEME + self._id]

    async def connect(self, address: str) -> None:
        """Check that ``address`` names a peer we can reach, and record it."""
        self._require_running()
        if not address.startswith(ADDRESS_SCHEME) or len(address) == len(ADDRESS_SCHEME):
            raise ValueError(f"not a memory address: {address!r}")
        peer = address[len(ADDRESS_SCHEME) :]
        if peer != self._id and peer not in self._hub._peers_of(self._id):
            raise PeerUnreachable(f"no reachable peer {peer!r} on this hub")
        self._dialed.append(address)

    def _drop_subscription(self, sub: MemorySubscription) -> None:
        if sub in self._subscriptions:
            del self._subscriptions[sub]
            self._hub._remove_subscription(sub)
        sub._close()


class _Flight(Generic[_T]):
    """One copy of a message on its way to one queue."""

    __slots__ = ("inbox", "item", "receiver", "sender")

    def __init__(
        self,
        sender: MemoryTransport,
        receiver: MemoryTransport,
        inbox: Inbox[_T],
        item: _T,
    ) -> None:
        self.sender = sender
        self.receiver = receiver
        self.inbox = inbox
        self.item = item


def _parse_latency(latency: float | tuple[float, float]) -> tuple[float, float]:
    low, high = (latency, latency) if isinstance(latency, int | float) else latency
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low <= high):
        raise ValueError(f"latency must satisfy 0 <= low <= high, got {latency!r}")
    return low, high


def _check_loss(loss: float) -> float:
    if not 0.0 <= loss <= 1.0:
        raise ValueError(f"loss must be in [0, 1], got {loss!r}")
    return float(loss)


class MemoryHub:
    """An in-process network of :class:`MemoryTransport` peers.

    ``latency`` is seconds, fixed (a float) or drawn uniformly per copy from
    ``(low, high)``; ``loss`` is the probability a copy is lost; ``seed``
    seeds the hub's own random generator (the global one is never used).
    """

    def __init__(
        self,
        *,
        latency: float | tuple[float, float] = (0.0, 0.0),
        loss: float = 0.0,
        seed: int | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if max_message_size < 0:
            raise ValueError(f"max_message_size must be >= 0, got {max_message_size}")
        self._latency = _parse_latency(latency)
        self._loss = _check_loss(loss)
        self._rng = random.Random(seed)
        self._queue_size = queue_size
        self._max_message_size = max_message_size
        self._members: dict[PeerId, MemoryTransport] = {}  # made, not closed
        self._running: dict[PeerId, MemoryTransport] = {}  # started, not closed
        self._known: set[PeerId] = set()  # ever started
        self._topics: dict[str, dict[MemorySubscription, None]] = {}
        self._group_of: dict[PeerId, int] | None = None  # None: no partition
        self._in_flight: list[tuple[float, int, _Flight[Any]]] = []
        self._seq = itertools.count()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    # -- configuration -------------------------------------------------

    @property
    def queue_size(self) -> int:
        return self._queue_size

    @property
    def max_message_size(self) -> int:
        return self._max_message_size

    @property
    def latency(self) -> tuple[float, float]:
        return self._latency

    @property
    def loss(self) -> float:
        return self._loss

    def set_latency(self, latency: float | tuple[float, float]) -> None:
        """Latency for copies sent from now on (seconds, fixed or (low, high))."""
        self._latency = _parse_latency(latency)

    def set_loss(self, loss: float) -> None:
        """Loss probability for copies sent from now on."""
        self._loss = _check_loss(loss)

    def partition(self, *groups: Iterable[PeerId]) -> None:
        """Split the network: only peers in the same group can talk.

        Each group is an iterable of peer ids (a bare str counts as one id).
        Peers named in no group (now or later) form one more group together.
        Replaces any previous partition.
        """
        group_of: dict[PeerId, int] = {}
        for index, group in enumerate(groups):
            members = [group] if isinstance(group, str) else list(group)
            for peer in members:
                if peer in group_of and group_of[peer] != index:
                    raise ValueError(f"peer {peer!r} is in more than one group")
                group_of[peer] = index
        self._group_of = group_of

    def heal(self) -> None:
        """Remove the partition."""
        self._group_of = None

    # -- observation ---------------------------------------------------

    def transport(self, peer_id: PeerId) -> MemoryTransport:
        """A new, not yet started transport with id ``peer_id``."""
        if not isinstance(peer_id, str) or not peer_id:
            raise ValueError(f"peer id must be a non-empty str, got {peer_id!r}")
        if peer_id in self._members:
            raise ValueError(f"peer id {peer_id!r} is already in use on this hub")
        transport = MemoryTransport(self, peer_id)
        self._members[peer_id] = transport
        return transport

    @property
    def stats(self) -> Mapping[str, int]:
        """Counters summed over every transport this hub ever had."""
        return MappingProxyType(self._stats)

    @property
    def in_flight(self) -> int:
        """Copies waiting out their latency."""
        return len(self._in_flight)

    def running(self) -> frozenset[PeerId]:
        """Ids of started, not closed transports."""
        return frozenset(self._running)

    def reachable(self, a: PeerId, b: PeerId) -> bool:
        """Whether the current partition lets ``a`` and ``b`` talk."""
        if a == b or self._group_of is None:
            return True
        return self._group_of.get(a, _REST_GROUP) == self._group_of.get(b, _REST_GROUP)

    async def drained(self) -> None:
        """Wait until no copy is in flight (returns at once if none is)."""
        if not self._in_flight:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter

    # -- used by MemoryTransport ---------------------------------------

    def _count(self, transport: MemoryTransport, key: str) -> None:
        transport._count(key)
        self._stats[key] += 1

    def _attach(self, transport: MemoryTransport) -> None:
        self._running[transport.local_id] = transport
        self._known.add(transport.local_id)

    def _detach(self, transport: MemoryTransport, *, was_running: bool) -> None:
        if self._members.get(transport.local_id) is transport:
            del self._members[transport.local_id]
        if was_running and self._running.get(transport.local_id) is transport:
            del self._running[transport.local_id]

    def _add_subscription(self, sub: MemorySubscription) -> None:
        self._topics.setdefault(sub.topic, {})[sub] = None

    def _remove_subscription(self, sub: MemorySubscription) -> None:
        subs = self._topics.get(sub.topic)
        if subs is not None:
            subs.pop(sub, None)
            if not subs:
                del self._topics[sub.topic]

    def _peers_of(self, peer: PeerId) -> frozenset[PeerId]:
        if self._group_of is None:
            return frozenset(p for p in self._running if p != peer)
        return frozenset(p for p in self._running if p != peer and self.reachable(peer, p))

    def _publish(self, sender: MemoryTransport, topic: str, data: bytes) -> None:
        subs = self._topics.get(topic)
        if not subs:
            return
        # Routing never runs callbacks, so the topic's set cannot change under us.
        for sub in subs:
            receiver = sub.owner
            if receiver is not sender:
                self._route(sender, receiver, sub._inbox, data)

    def _send(self, sender: MemoryTransport, peer: PeerId, data: bytes) -> None:
        receiver = self._running.get(peer)
        if receiver is None:
            if peer not in self._known:
                raise PeerUnreachable(f"unknown peer {peer!r}")
            self._count(sender, "sent")
            self._count(sender, "dropped_unreachable")
            return
        self._count(sender, "sent")
        self._route(sender, receiver, receiver._inbox, Inbound(sender.local_id, data))

    def _route(
        self,
        sender: MemoryTransport,
        receiver: MemoryTransport,
        inbox: Inbox[_T],
        item: _T,
    ) -> None:
        if not self.reachable(sender.local_id, receiver.local_id):
            self._count(sender, "dropped_partition")
            return
        if self._loss > 0.0 and self._rng.random() < self._loss:
            self._count(sender, "dropped_loss")
            return
        low, high = self._latency
        delay = low if low == high else self._rng.uniform(low, high)
        flight = _Flight(sender, receiver, inbox, item)
        if delay <= 0.0:
            self._deliver(flight)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        seq = next(self._seq)
        heapq.heappush(self._in_flight, (when, seq, flight))
        loop.call_at(when, self._on_due, when, seq)

    def _on_due(self, when: float, seq: int) -> None:
        heap = self._in_flight
        while heap and (heap[0][0], heap[0][1]) <= (when, seq):
            self._deliver(heapq.heappop(heap)[2])
        if not heap:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _deliver(self, flight: _Flight[Any]) -> None:
        sender, receiver = flight.sender, flight.receiver
        if flight.inbox.closed:
            self._count(sender, "dropped_unreachable")
        elif not self.reachable(sender.local_id, receiver.local_id):
            self._count(sender, "dropped_partition")
        elif flight.inbox.put(flight.item):
            self._count(receiver, "delivered")
        else:
            self._count(receiver, "dropped_queue_full")
