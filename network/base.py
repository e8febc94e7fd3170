"""The transport seam: how a peer moves opaque bytes to other peers.

A transport knows nothing of Federated Inference. It carries ``bytes`` on
named topics (gossip) and to named peers (direct), and that is all. Every
implementation (``memory``, ``libp2p``, ``mqtt``) keeps the same contract,
checked by one shared test suite (``tests/contract``):

Lifecycle
    new -> running (``start()``) -> closed (``aclose()``). ``start()`` twice
    is a no-op; ``aclose()`` is idempotent. ``publish``, ``subscribe``,
    ``send`` and ``connect`` raise :class:`TransportClosed` before
    ``start()`` and after ``aclose()``; a closed transport cannot be
    restarted. ``async with transport:`` starts and closes it.

Delivery is best effort
    A message may be lost, delayed or (under latency jitter) reordered, like
    on a real network. Nothing is retried or acknowledged here: reliability,
    authenticity and replay protection belong to the layers above (the signed
    envelope). ``Inbound.sender`` is what the transport saw and is UNTRUSTED.

Gossip
    ``publish(topic, data)`` reaches every subscription to ``topic`` on every
    OTHER peer: a peer never receives its own publications, even when it
    subscribes to the topic itself. Each ``subscribe()`` call returns its own
    :class:`Subscription`; two subscriptions to one topic both receive every
    message. ``Subscription.aclose()`` unsubscribes, discards what is queued
    and ends iteration.

Direct messages
    ``send(peer, data)`` delivers one :class:`Inbound` to ``peer``'s
    ``incoming()`` iterator. A transport that can tell a peer is unknown or
    undialable raises :class:`PeerUnreachable`; one that cannot (a broker)
    drops silently. Callers must treat ``send`` as best effort either way.

Ordering
    Messages from one sender to one receiver (per topic, or direct) arrive in
    the order they were sent, as long as nothing adds latency jitter.

Size
    ``data`` longer than ``max_message_size`` raises
    :class:`MessageTooLarge` at the sender; nothing is sent.

Bounded queues
    Every subscription and the direct inbox hold a bounded number of
    messages. When one is full, a newly arriving message is dropped and
    counted (``stats["dropped_queue_full"]``): a slow consumer never blocks
    its senders and never grows memory without bound.

Closing
    ``aclose()`` ends ``incoming()`` and every subscription's iteration
    (``StopAsyncIteration``), discarding what was still queued.

Topics
    A topic is 1 to 256 characters, without ``+``, ``#`` or NUL and not
    starting with ``$`` (what every backend accepts; see
    :func:`validate_topic`). A bad topic is a caller bug: ``ValueError``.

Counters
    ``stats`` maps each name of :data:`STAT_KEYS` to a count: ``sent``
    (accepted ``publish``/``send`` calls), ``delivered`` (messages queued for
    a local consumer), ``dropped_loss``, ``dropped_partition`` (injected
    faults, memory only), ``dropped_queue_full`` (a local queue was full),
    ``dropped_unreachable`` (the destination was gone).

Exceptions raised by a backend library never leave a transport: adapters
re-raise them as a :class:`TransportError` subclass ``from`` the original.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Final, Protocol, Self, TypeAlias, runtime_checkable

__all__ = [
    "MAX_TOPIC_LENGTH",
    "STAT_KEYS",
    "Inbound",
    "MessageTooLarge",
    "PeerId",
    "PeerUnreachable",
    "Phase",
    "Subscription",
    "Transport",
    "TransportBase",
    "TransportClosed",
    "TransportError",
    "validate_topic",
]

PeerId: TypeAlias = str
"""Opaque peer id. fi-peer uses the hex of an Ed25519 public key."""

STAT_KEYS: Final[tuple[str, ...]] = (
    "sent",
    "delivered",
    "dropped_loss",
    "dropped_partition",
    "dropped_queue_full",
    "dropped_unreachable",
)

MAX_TOPIC_LENGTH: Final = 256
_FORBIDDEN_TOPIC_CHARS: Final = frozenset("+#\x00")


@dataclass(frozen=True, slots=True)
class Inbound:
    """One direct message as received."""

    sender: PeerId
    """Transport-level origin. UNTRUSTED: only the envelope signature counts."""
    data: bytes


class TransportError(Exception):
    """Base of every error a transport raises."""


class TransportClosed(TransportError):
    """The transport is not running: not started yet, or closed."""


class PeerUnreachable(TransportError):
    """``send``/``connect`` to a peer this transport knows it cannot reach."""


class MessageTooLarge(TransportError):
    """``data`` is longer than the transport's ``max_message_size``."""


def validate_topic(topic: str) -> None:
    """Raise ``ValueError`` unless ``topic`` is usable on every transport."""
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, not {type(topic).__name__}")
    if not 1 <= len(topic) <= MAX_TOPIC_LENGTH:
        raise ValueError(f"topic length must be 1..{MAX_TOPIC_LENGTH}, got {len(topic)}")
    if topic.startswith("$") or not _FORBIDDEN_TOPIC_CHARS.isdisjoint(topic):
        raise ValueError(f"topic {topic!r} starts with '$' or contains '+', '#' or NUL")


@runtime_checkable
class Subscription(Protocol):
    """Messages published on one topic, one per ``subscribe()`` call."""

    @property
    def topic(self) -> str: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None:
        """Unsubscribe; queued messages are discarded and iteration ends."""
        ...


@runtime_checkable
class Transport(Protocol):
    """Moves opaque bytes between peers. See the module docstring."""

    @property
    def local_id(self) -> PeerId: ...

    @property
    def max_message_size(self) -> int: ...

    @property
    def stats(self) -> Mapping[str, int]: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def publish(self, topic: str, data: bytes) -> None: ...

    async def subscribe(self, topic: str) -> Subscription: ...

    async def send(self, peer: PeerId, data: bytes) -> None: ...

    def incoming(self) -> AsyncIterator[Inbound]: ...

    def peers(self) -> frozenset[PeerId]: ...

    def addresses(self) -> list[str]: ...

    async def connect(self, address: str) -> None: ...


class Phase(enum.Enum):
    """Lifecycle of a transport."""

    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class TransportBase(abc.ABC):
    """Shared plumbing for concrete transports: lifecycle, counters, checks.

    Subclasses set ``self._phase`` in ``start``/``aclose`` and call
    :meth:`_require_running`, :meth:`_checked_payload` and :meth:`_count`.
    """

    def __init__(self) -> None:
        self._phase = Phase.NEW
        self._stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._stats_view: Mapping[str, int] = MappingProxyType(self._stats)

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def stats(self) -> Mapping[str, int]:
        """Read-only live view of this transport's counters."""
        return self._stats_view

    def _count(self, key: str, n: int = 1) -> None:
        self._stats[key] += n

    def _require_running(self) -> None:
        if self._phase is Phase.NEW:
            raise TransportClosed(f"transport {self.local_id!r} is not started")
        if self._phase is Phase.CLOSED:
            raise TransportClosed(f"transport {self.local_id!r} is closed")

    def _checked_payload(self, data: bytes) -> bytes:
        """Return ``data`` as immutable ``bytes``, or raise MessageTooLarge."""
        if type(data) is not bytes:
            data = bytes(data)  # bytearray/memoryview: copy, receivers share it
        if len(data) > self.max_message_size:
            raise MessageTooLarge(
                f"{len(data)} bytes exceeds max_message_size {self.max_message_size}"
            )
        return data

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    @abc.abstractmethod
    def local_id(self) -> PeerId: ...

    @property
    @abc.abstractmethod
    def max_message_size(self) -> int: ...

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    @abc.abstractmethod
    async def publish(self, topic: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, topic: str) -> Subscription: ...

    @abc.abstractmethod
    async def send(self, peer: PeerId, data: bytes) -> None: ...

    @abc.abstractmethod
    def incoming(self) -> AsyncIterator[Inbound]: ...

    @abc.abstractmethod
    def peers(self) -> frozenset[PeerId]: ...

    @abc.abstractmethod
    def addresses(self) -> list[str]: ...

    @abc.abstractmethod
    async def connect(self, address: str) -> None: ...
