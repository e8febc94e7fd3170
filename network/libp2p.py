"""libp2p transport: py-libp2p 0.8.1 (trio) behind the asyncio ``Transport`` seam.

Theory of operation
-------------------
py-libp2p is written for trio and the agent runs on asyncio. Every
:class:`Libp2pTransport` of a process shares ONE trio thread
(:class:`_TrioThread`, started by the first transport and stopped with the
last one): several trio threads in one process make the GIL hand-offs
dominate latency. Each transport owns one libp2p host in that thread
(:class:`_Node`).

* asyncio -> trio: ``TrioToken.run_sync_soon`` never blocks the event loop.
  ``publish`` and ``send`` hand their bytes to a bounded trio channel inside
  that (FIFO) callback, so per-sender order survives the hop; calls whose
  result matters (start, connect, subscribe, close) return an asyncio future.
* trio -> asyncio: a bounded deque drained by one ``call_soon_threadsafe``
  per batch (:class:`_Bridge`). A full bridge drops and counts
  (``dropped_queue_full``): a stalled event loop never grows memory.

Identity: the host key is the peer's own Ed25519 key
(``create_new_key_pair(seed)`` with the 32-byte PyNaCl seed), so the libp2p
peer id embeds the same public key as the fi-peer id. Everything above this
module sees fi-peer ids (64 lowercase hex chars); :func:`to_libp2p_id` and
:func:`from_libp2p_id` convert.

Gossip: GossipSub (``/meshsub/1.0.0``) with spam protection off (it silently
drops bursts over 10 msg/s per topic), eclipse protection off (it wants
peers on >= 3 distinct IPs, which a single host or LAN does not have) and
flood publishing of our own messages (:class:`_FloodPublishGossipSub`). One
libp2p subscription per topic, fanned out to every local
:class:`Libp2pSubscription`; the host's own publications come back on its
subscription and are filtered out by ``from_id``.

Flood control: GossipSub relays a message (and keeps it for IHAVE/IWANT
replay to peers that join later) once it passes the topic validators, so
ours (:meth:`_Node._validate`) decides what is relayed, BEFORE relay: a
message whose originator (its libp2p-signed ``from_id``) or forwarding
connection is over its rate (:class:`GossipSettings` ``relay_*`` and
``link_*`` token buckets), that is too large, or that the optional
``gossip_validator`` (given by the daemon: a stateless check of the
envelope, its signature, time window and that it was signed by its
originator) refuses, is neither relayed nor cached. It is still handed to
the local subscribers, which judge and count it themselves (the transport
decides what it forwards, never what the peer accepts); counted here as
``gossip_rate_limited`` and ``gossip_invalid``.

Direct messages: protocol ``/fi/1.0.0``, one long-lived stream per
destination opened on the first send and reused, frames = 4-byte big-endian
length + payload. Each destination has its own bounded outbox and writer
task, so a slow or dead peer never delays messages to the others. A failed
write reopens the stream once; a second failure drops the message (counted
``dropped_unreachable``) and the destination is skipped for
:data:`UNREACHABLE_BACKOFF_S`. The stream handler always catches
``StreamEOF`` (an uncaught one poisons the connection for 10 s).

``peers()`` lists peers with an open connection, kept up to date by the
swarm's connection notifications. Library errors (often ExceptionGroups ten
levels deep) are flattened into one readable line and re-raised as
:class:`~network.base.TransportError` subclasses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import multiaddr  # type: ignore[import-untyped]  # (no stubs, no py.typed)
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee, ISubscriptionAPI
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from network.base import (
    Inbound,
    PeerId,
    PeerUnreachable,
    Phase,
    TransportBase,
    TransportClosed,
    TransportError,
    validate_topic,
)
from network.inbox import Inbox, InboxIterator, OwnedSubscription
from network.ratelimit import RateLimiter

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DIRECT_PROTOCOL",
    "GOSSIP_PROTOCOL",
    "GossipSettings",
    "GossipValidator",
    "Libp2pSubscription",
    "Libp2pTransport",
    "from_libp2p_id",
    "to_libp2p_id",
]

log = logging.getLogger(__name__)

DIRECT_PROTOCOL: Final = TProtocol("/fi/1.0.0")
GOSSIP_PROTOCOL: Final = TProtocol("/meshsub/1.0.0")
DEFAULT_LISTEN: Final = ("/ip4/127.0.0.1/tcp/0",)
# GossipSub refuses RPCs over 1 MiB; keep room for the RPC envelope around a payload.
DEFAULT_MAX_MESSAGE_SIZE: Final = 1024 * 1024 - 64 * 1024
DEFAULT_QUEUE_SIZE: Final = 10_000
UNREACHABLE_BACKOFF_S: Final = 0.5
_FRAME_HEADER: Final = 4
# GossipSub drops RPCs once a peer's outbound queue (32 RPCs) is full: the
# publisher waits below this mark, at most _PUBLISH_STALL_S per message.
_PEER_QUEUE_HIGH: Final = 24
_PUBLISH_STALL_S: Final = 0.2
_STOP_GRACE_S: Final = 5.0
# Ed25519 libp2p peer id: identity multihash (0x00, len 36) of the protobuf
# PublicKey {Type: Ed25519 (1), Data: 32 bytes}.
_ED25519_ID_PREFIX: Final = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])

_T = TypeVar("_T")

GossipValidator = Callable[[PeerId, str, bytes], bool]
"""``(originator's fi-peer id, topic, data) -> relay it?``; called in the trio
thread for every gossip message from another peer, so thread-safe and cheap."""


# -- identities ----------------------------------------------------------------------


def to_libp2p_id(peer: PeerId) -> ID:
    """The libp2p peer id of a fi-peer id; ``ValueError`` if ``peer`` is not one."""
    if len(peer) != 64 or peer != peer.lower():
        raise ValueError(f"not a fi-peer id: {peer[:80]!r}")
    try:
        key = bytes.fromhex(peer)
    except ValueError as exc:
        raise ValueError(f"not a fi-peer id: {peer[:80]!r}") from exc
    return ID(_ED25519_ID_PREFIX + key)


def from_libp2p_id(peer: ID) -> PeerId | None:
    """The fi-peer id inside a libp2p peer id (None unless it embeds an Ed25519 key)."""
    raw = peer.to_bytes()
    if len(raw) == len(_ED25519_ID_PREFIX) + 32 and raw.startswith(_ED25519_ID_PREFIX):
        return raw[len(_ED25519_ID_PREFIX) :].hex()
    return None


def describe_error(exc: BaseException) -> str:
    """One readable line for an exception, flattening nested ExceptionGroups."""
    leaves: list[str] = []

    def walk(err: BaseException) -> None:
        if isinstance(err, BaseExceptionGroup):
            for inner in err.exceptions:
                walk(inner)
            return
        text = f"{type(err).__name__}: {err}".strip().rstrip(":")
        cause = err.__cause__
        if cause is not None and not isinstance(cause, BaseExceptionGroup):
            text += f" ({type(cause).__name__}: {cause})"
        if text not in leaves:
            leaves.append(text)

    walk(exc)
    line = "; ".join(leaves) or type(exc).__name__
    return line if len(line) <= 400 else line[:397] + "..."


# -- the trio thread -------------------------------------------------------------------


class _TrioThread:
    """The process's one trio thread. Shared by every transport, refcounted."""

    _lock: Final = threading.Lock()
    _current: _TrioThread | None = None
    _users = 0

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fi-libp2p-trio", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None

    @classmethod
    def acquire(cls) -> _TrioThread:
        with cls._lock:
            current = cls._current
            if current is None or not current._thread.is_alive():
                current = cls._current = _TrioThread()
                current._thread.start()
                if not current._ready.wait(timeout=10.0):
                    cls._current = None
                    raise TransportError("the libp2p trio thread did not start")
            cls._users += 1
            return current

    def release(self) -> threading.Thread | None:
        """Drop one user; returns the thread to join when this was the last one."""
        with _TrioThread._lock:
            if _TrioThread._current is not self:
                return None
            _TrioThread._users -= 1
            if _TrioThread._users > 0:
                return None
            _TrioThread._current = None
        try:
            self.run_sync_soon(self._request_stop)
        except TransportClosed:
            return None
        return self._thread

    def _main(self) -> None:
        try:
            trio.run(self._trio_main)
        except BaseException as exc:
            self._failure = exc
            log.error("libp2p trio thread crashed: %s", describe_error(exc))
        finally:
            self._ready.set()

    async def _trio_main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def run_sync_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Run the plain function ``fn(*args)`` in the trio thread, in call order."""
        token = self._token
        if token is None:
            raise TransportClosed("the libp2p thread is not running")
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError as exc:
            raise TransportClosed("the libp2p thread has stopped") from exc

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start ``fn(*args)`` as a trio task; errors are logged, never fatal."""

        def start() -> None:
            if self._nursery is not None:
                self._nursery.start_soon(_guarded, fn, args)

        self.run_sync_soon(start)

    def call(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Awaitable[_T]], *args: object
    ) -> asyncio.Future[_T]:
        """Run ``fn(*args)`` as a trio task; its outcome resolves the returned future."""
        future: asyncio.Future[_T] = loop.create_future()

        async def runner() -> None:
            try:
                result = await fn(*args)
            except BaseException as exc:
                _resolve(loop, future, None, exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                _resolve(loop, future, result, None)

        def start() -> None:
            if self._nursery is None:
                _resolve(loop, future, None, TransportClosed("the libp2p thread is stopping"))
            else:
                self._nursery.start_soon(runner)

        self.run_sync_soon(start)
        return future


def _resolve(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: object,
    exc: BaseException | None,
) -> None:
    def apply() -> None:
        if future.done():
            return
        if exc is None:
            future.set_result(result)
        elif isinstance(exc, Exception):
            future.set_exception(exc)
        else:
            future.set_exception(TransportClosed(f"cancelled in the libp2p thread ({exc!r})"))

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(apply)


async def _guarded(fn: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
    try:
        await fn(*args)
    except Exception as exc:
        log.warning("libp2p task %s failed: %s", getattr(fn, "__name__", fn), describe_error(exc))


# -- trio -> asyncio -----------------------------------------------------------------


class _Bridge:
    """Items from the trio thread to one asyncio loop; bounded, batched wake-ups."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, sink: Callable[[Any], None]):
        self._loop = loop
        self._limit = limit
        self._sink = sink
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._closed = False
        self.dropped = 0  # written under _lock, read by the asyncio side

    def put(self, item: object, *, force: bool = False) -> bool:
        """Queue ``item`` (trio thread). False, and counted, when the bridge is full."""
        with self._lock:
            if self._closed:
                return False
            if not force and len(self._items) >= self._limit:
                self.dropped += 1
                return False
            self._items.append(item)
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed
            with self._lock:
                self._closed = True
                self._items.clear()
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._items.clear()

    def _drain(self) -> None:
        with self._lock:
            self._scheduled = False
            items, self._items = self._items, collections.deque()
        for item in items:
            self._sink(item)

    def pending(self) -> int:
        with self._lock:
            return len(self._items)


class _Counters:
    """Counts made in the trio thread, folded into ``stats`` on the asyncio side."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def take(self) -> collections.Counter[str]:
        with self._lock:
            counts, self._counts = self._counts, collections.Counter()
        return counts


# -- settings ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipSettings:
    """GossipSub parameters.

    The mesh is smaller than libp2p's usual D=6 (4..8): py-libp2p spends about a
    millisecond of CPU per message and hop, and with our own messages flooded to
    every subscriber (:class:`_FloodPublishGossipSub`) a wide mesh only adds
    duplicate forwards. Measured with 9 daemons on 2 cores: D=6 cost 12 % CPU
    per idle daemon, D=3 about 6 %.
    """

    degree: int = 4
    degree_low: int = 3
    degree_high: int = 8
    heartbeat_interval: int = 1
    heartbeat_initial_delay: float = 0.1
    time_to_live: int = 60
    # Relayed at most, per originator: messages per second and burst. An honest
    # peer gossips an announcement per interval and one request per query it asks
    # (our own messages reach every subscriber directly: floodPublish), so only a
    # flood, or a querier asking more than this many queries per second of peers
    # not directly connected to it, is held back from relay.
    relay_rate: float = 50.0
    relay_burst: int = 200
    # ... and per connection (what one neighbour may make us relay, all origins).
    link_rate: float = 500.0
    link_burst: int = 2000

    def __post_init__(self) -> None:
        if not 1 <= self.degree_low <= self.degree <= self.degree_high:
            raise ValueError("gossip degrees must satisfy 1 <= low <= degree <= high")
        if self.heartbeat_interval < 1:
            raise ValueError("heartbeat_interval must be >= 1 s")
        if not (self.relay_rate > 0 and self.link_rate > 0):
            raise ValueError("relay_rate and link_rate must be > 0")
        if self.relay_burst < 1 or self.link_burst < 1:
            raise ValueError("relay_burst and link_burst must be >= 1")


# -- trio side: one host -----------------------------------------------------------------


class _FloodPublishGossipSub(GossipSub):
    """GossipSub with go-libp2p's ``floodPublish``: a message we originate goes to
    every peer known to subscribe to its topic, not only to our mesh.

    A peer that has just connected has an empty mesh until the next heartbeat
    (py-libp2p 0.8.1 grafts only there), so its first announcements and query
    requests would otherwise reach nobody, or arrive late by IHAVE/IWANT.
    Forwarded messages still follow the mesh.
    """

    def _get_peers_to_send(
        self,
        topic_ids: Iterable[str],
        msg_forwarder: ID,
        origin: ID,
        msg_id: bytes | None = None,
    ) -> Iterable[ID]:
        topics = list(topic_ids)
        peers = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        pubsub = self.pubsub
        if pubsub is not None and origin == pubsub.my_id:
            for topic in topics:
                peers.update(pubsub.peer_topics.get(topic, ()))
            peers.discard(origin)
        return peers


class _Notifee(INotifee):
    def __init__(self, node: _Node) -> None:
        self._node = node

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._node.connections_changed()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._node.connections_changed(closing=conn)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


class _Outbox:
    """Frames waiting for one destination, and the state of its stream."""

    def __init__(self, size: int) -> None:
        self.send, self.receive = trio.open_memory_channel[bytes](size)
        self.stream: INetStream | None = None
        self.down_until = -math.inf
        self.busy = False


class _Node:
    """One libp2p host, living in the trio thread. Only trio code touches it."""

    def __init__(
        self,
        *,
        seed: bytes,
        listen: Sequence[multiaddr.Multiaddr],
        gossip: GossipSettings,
        mdns: bool,
        max_message_size: int,
        queue_size: int,
        dial_timeout: float,
        bridge: _Bridge,
        counters: _Counters,
        validator: GossipValidator | None = None,
    ) -> None:
        self._key_pair = create_new_key_pair(seed)
        self._listen = list(listen)
        self._gossip = gossip
        self._mdns = mdns
        self._max = max_message_size
        self._queue_size = queue_size
        self._dial_timeout = dial_timeout
        self._bridge = bridge
        self._counters = counters
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._router: GossipSub | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._done: trio.Event | None = None
        self._outboxes: dict[ID, _Outbox] = {}
        self._topics: dict[str, trio.CancelScope] = {}
        self._publish_send, self._publish_receive = trio.open_memory_channel[tuple[str, bytes]](
            queue_size
        )
        self._publishing = False
        self._topic_ops_send, self._topic_ops_receive = trio.open_memory_channel[
            tuple[Callable[[], Awaitable[None]], trio.Event]
        ](math.inf)
        self._own_id = b""
        self._mdns_handler: Callable[[PeerInfo], None] | None = None
        self._validator = validator
        # Only ever used in the trio thread (in _validate).
        self._relay_limit = RateLimiter(gossip.relay_rate, gossip.relay_burst)
        self._link_limit = RateLimiter(gossip.link_rate, gossip.link_burst)

    # -- lifecycle (trio) --

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._stop, self._done = trio.Event(), trio.Event()
        try:
            host = new_host(
                key_pair=self._key_pair,
                sec_opt={
                    NOISE_PROTOCOL_ID: NoiseTransport(
                        self._key_pair, noise_privkey=create_x25519_key_pair().private_key
                    )
                },
                listen_addrs=self._listen,
                enable_mDNS=self._mdns,
                # One connection per peer: with the default (3) every dial waits out
                # a 250 ms happy-eyeballs delay for a second connection. No
                # auto-connector: whom to dial is the daemon's decision.
                connection_config=ConnectionConfig(
                    max_connections_per_peer=1, min_connections=0, low_watermark=0
                ),
            )
            g = self._gossip
            router = _FloodPublishGossipSub(
                protocols=[GOSSIP_PROTOCOL],
                degree=g.degree,
                degree_low=g.degree_low,
                degree_high=g.degree_high,
                heartbeat_interval=g.heartbeat_interval,
                heartbeat_initial_delay=g.heartbeat_initial_delay,
                time_to_live=g.time_to_live,
                spam_protection_enabled=False,
                eclipse_protection_enabled=False,
            )
            pubsub = Pubsub(host, router)
            self._host, self._pubsub, self._router = host, pubsub, router
            self._own_id = host.get_id().to_bytes()
            host.get_network().register_notifee(_Notifee(self))
            async with (
                host.run(listen_addrs=self._listen),
                background_trio_service(pubsub),
                background_trio_service(router),
            ):
                await pubsub.wait_until_ready()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    host.set_stream_handler(DIRECT_PROTOCOL, self._handle_stream)
                    nursery.start_soon(self._publisher)
                    nursery.start_soon(self._topic_worker)
                    if self._mdns:
                        self._start_mdns()
                    task_status.started(_advertised(host))
                    await self._stop.wait()
                    self._nursery = None
                    nursery.cancel_scope.cancel()
                # Leaving host.run() cancels the swarm but does not close its
                # connections: close them so that peers notice at once.
                with trio.move_on_after(_STOP_GRACE_S / 2):
                    try:
                        await host.close()
                    except Exception as exc:
                        log.debug("libp2p host close: %s", describe_error(exc))
        finally:
            self._stop_mdns()
            self._done.set()

    async def stop(self) -> None:
        if self._stop is None or self._done is None:
            return
        self._stop.set()
        with trio.move_on_after(_STOP_GRACE_S):
            await self._done.wait()

    # -- mDNS (LAN discovery: dial whoever is found) --

    def _start_mdns(self) -> None:
        from libp2p.discovery.events.peerDiscovery import peerDiscovery

        token = trio.lowlevel.current_trio_token()

        def found(info: PeerInfo) -> None:  # called from zeroconf's own thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._dial_found, info)

        self._mdns_handler = found
        peerDiscovery.register_peer_discovered_handler(found)

    def _stop_mdns(self) -> None:
        if self._mdns_handler is not None:
            from libp2p.discovery.events.peerDiscovery import peerDiscovery

            peerDiscovery.unregister_peer_discovered_handler(self._mdns_handler)
            self._mdns_handler = None

    def _dial_found(self, info: PeerInfo) -> None:
        if self._nursery is not None and info.peer_id.to_bytes() != self._own_id:
            self._nursery.start_soon(_guarded, self._connect_quietly, (info,))

    async def _connect_quietly(self, info: PeerInfo) -> None:
        try:
            await self.connect(info)
        except TransportError as exc:
            log.debug("mDNS: cannot dial %s: %s", info.peer_id, exc)

    # -- connections --

    def connections_changed(self, closing: INetConn | None = None) -> None:
        host = self._host
        if host is None:
            return
        peers: set[PeerId] = set()
        for peer, conns in host.get_network().connections.items():
            if any(c is not closing and not c.is_closed for c in conns):
                fi_id = from_libp2p_id(peer)
                if fi_id is not None:
                    peers.add(fi_id)
        self._bridge.put(("peers", frozenset(peers)), force=True)

    async def connect(self, info: PeerInfo) -> None:
        host = self._require_host()
        if info.peer_id.to_bytes() == self._own_id:
            return
        # An explicit dial always tries: lift the swarm's 60 s negative cache
        # (private in 0.8.1), which would otherwise refuse a restarted peer.
        negative = getattr(host.get_network(), "_negative_peer_cache", None)
        evict = getattr(negative, "evict", None)
        if callable(evict):
            evict(str(info.peer_id))
        try:
            with trio.fail_after(self._dial_timeout):
                await host.connect(info)
        except Exception as exc:
            raise PeerUnreachable(
                f"cannot connect to {info.peer_id}: {describe_error(exc)}"
            ) from exc
        outbox = self._outboxes.get(info.peer_id)
        if outbox is not None:
            outbox.down_until = -math.inf

    def _require_host(self) -> IHost:
        if self._host is None or self._nursery is None:
            raise TransportClosed("libp2p host is not running")
        return self._host

    # -- gossip --

    def enqueue_publish(self, topic: str, data: bytes) -> None:
        try:
            self._publish_send.send_nowait((topic, data))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._counters.add("dropped_queue_full")

    async def _publisher(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        async for topic, data in self._publish_receive:
            self._publishing = True
            try:
                with trio.move_on_after(_PUBLISH_STALL_S):
                    # GossipSub signals no "queue drained" event: poll its queues.
                    while any(len(q) >= _PEER_QUEUE_HIGH for q in pubsub.peer_queues.values()):  # noqa: ASYNC110
                        await trio.sleep(0.001)
                await pubsub.publish(topic, data)
            except Exception as exc:
                self._counters.add("dropped_unreachable")
                log.debug("gossip publish on %s failed: %s", topic, describe_error(exc))
            finally:
                self._publishing = False

    async def _topic_worker(self) -> None:
        async for op, done in self._topic_ops_receive:
            try:
                await op()
            finally:
                done.set()

    async def _ordered(self, op: Callable[[], Awaitable[None]]) -> None:
        """Run ``op`` after every topic operation queued before it."""
        done = trio.Event()
        self._topic_ops_send.send_nowait((op, done))
        await done.wait()

    async def join(self, topic: str) -> None:
        async def op() -> None:
            pubsub = self._pubsub
            if pubsub is None or self._nursery is None or topic in self._topics:
                return
            subscription = await pubsub.subscribe(topic)
            pubsub.set_topic_validator(
                topic, functools.partial(self._validate, topic), is_async_validator=False
            )
            scope = trio.CancelScope()
            self._topics[topic] = scope
            self._nursery.start_soon(self._pump, topic, subscription, scope)

        await self._ordered(op)

    async def leave(self, topic: str) -> None:
        async def op() -> None:
            scope = self._topics.pop(topic, None)
            if scope is None or self._pubsub is None:
                return
            scope.cancel()
            self._pubsub.remove_topic_validator(topic)
            await self._pubsub.unsubscribe(topic)

        await self._ordered(op)

    async def _pump(
        self, topic: str, subscription: ISubscriptionAPI, scope: trio.CancelScope
    ) -> None:
        with scope:
            try:
                while True:
                    message = await subscription.get()
                    if message.from_id == self._own_id:
                        continue  # our own publication, echoed by Pubsub
                    self._bridge.put(("gossip", topic, bytes(message.data)))
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return

    def _validate(self, topic: str, forwarder: ID, message: Any) -> bool:
        """Whether GossipSub may relay (and cache) ``message``: see the module docs.

        A refused message goes to the local subscribers all the same (the
        validation cache makes sure that happens once per message id)."""
        try:
            origin = bytes(message.from_id)
            if forwarder.to_bytes() == self._own_id or origin == self._own_id:
                return True  # our own publication (or a forgery Pubsub drops itself)
            data = bytes(message.data)
            now = trio.current_time()
            link = forwarder.to_bytes()
            if not (self._relay_limit.ready(origin, now) and self._link_limit.ready(link, now)):
                verdict = "gossip_rate_limited"
            else:
                self._relay_limit.take(origin, now)
                self._link_limit.take(link, now)
                verdict = "" if len(data) <= self._max else "gossip_invalid"
                if not verdict and self._validator is not None:
                    sender = from_libp2p_id(ID(origin)) or ""
                    if not self._validator(sender, topic, data):
                        verdict = "gossip_invalid"
            if not verdict:
                return True
            self._counters.add(verdict)
            if len(data) <= self._max:
                self._bridge.put(("gossip", topic, data))
            return False
        except Exception as exc:  # never let a validator error break the stream
            self._counters.add("gossip_invalid")
            log.debug("gossip validation on %s failed: %s", topic, describe_error(exc))
            return False

    async def gossip_view(self, topic: str) -> tuple[frozenset[PeerId], frozenset[PeerId]]:
        pubsub, router = self._pubsub, self._router
        if pubsub is None or router is None:
            return frozenset(), frozenset()
        subscribers = {from_libp2p_id(p) for p in pubsub.peer_topics.get(topic, set())}
        mesh = {from_libp2p_id(p) for p in router.mesh.get(topic, set())}
        return (
            frozenset(p for p in subscribers if p is not None),
            frozenset(p for p in mesh if p is not None),
        )

    async def flush(self) -> None:
        """Wait until nothing this host accepted is still waiting to be written."""
        pubsub = self._pubsub
        while True:
            busy = self._publishing or self._publish_receive.statistics().current_buffer_used
            busy = busy or any(
                o.busy or o.receive.statistics().current_buffer_used
                for o in self._outboxes.values()
            )
            if pubsub is not None:
                busy = busy or any(len(q) for q in pubsub.peer_queues.values())
            if not busy:
                return
            await trio.sleep(0.002)

    # -- direct messages --

    def enqueue_direct(self, peer: ID, data: bytes) -> None:
        if self._nursery is None:
            self._counters.add("dropped_unreachable")
            return
        outbox = self._outboxes.get(peer)
        if outbox is None:
            outbox = self._outboxes[peer] = _Outbox(self._queue_size)
            self._nursery.start_soon(self._writer, peer, outbox)
        if trio.current_time() < outbox.down_until:
            self._counters.add("dropped_unreachable")
            return
        frame = len(data).to_bytes(_FRAME_HEADER, "big") + data
        try:
            outbox.send.send_nowait(frame)
        except trio.WouldBlock:
            self._counters.add("dropped_queue_full")

    async def _writer(self, peer: ID, outbox: _Outbox) -> None:
        host = self._require_host()
        async for frame in outbox.receive:
            outbox.busy = True
            try:
                if trio.current_time() < outbox.down_until:
                    self._counters.add("dropped_unreachable")
                    continue
                for attempt in (1, 2):
                    try:
                        if outbox.stream is None:
                            with trio.fail_after(self._dial_timeout):
                                outbox.stream = await host.new_stream(peer, [DIRECT_PROTOCOL])
                        with trio.fail_after(self._dial_timeout):
                            await outbox.stream.write(frame)
                        break
                    except Exception as exc:
                        await self._discard(outbox)
                        if attempt == 2:
                            outbox.down_until = trio.current_time() + UNREACHABLE_BACKOFF_S
                            self._counters.add("dropped_unreachable")
                            log.debug("direct message to %s lost: %s", peer, describe_error(exc))
            finally:
                outbox.busy = False

    @staticmethod
    async def _discard(outbox: _Outbox) -> None:
        stream, outbox.stream = outbox.stream, None
        if stream is not None:
            try:
                with trio.move_on_after(1.0):
                    await stream.reset()
            except Exception:
                pass

    async def _handle_stream(self, stream: INetStream) -> None:
        sender = from_libp2p_id(stream.muxed_conn.peer_id)
        try:
            if sender is None:
                raise _BadFrame("the remote key is not Ed25519")
            while True:
                header = await _read_exactly(stream, _FRAME_HEADER)
                if header is None:
                    return
                length = int.from_bytes(header, "big")
                if length > self._max:
                    raise _BadFrame(f"frame of {length} bytes exceeds {self._max}")
                data = await _read_exactly(stream, length) if length else b""
                if data is None:
                    return
                self._bridge.put(("direct", sender, data))
        except StreamEOF:
            return
        except _BadFrame as exc:
            log.debug("resetting /fi stream from %s: %s", stream.muxed_conn.peer_id, exc)
            with contextlib.suppress(Exception):
                await stream.reset()
        except Exception as exc:
            log.debug("/fi stream from %s ended: %s", sender, describe_error(exc))
        finally:
            with contextlib.suppress(Exception):
                await stream.close()


def _advertised(host: IHost) -> list[str]:
    """Dialable addresses: a wildcard listen address (0.0.0.0) becomes one address per
    interface, routable ones first (peers cannot dial 0.0.0.0)."""
    from libp2p.utils.address_validation import get_available_interfaces

    suffix = f"/p2p/{host.get_id().to_base58()}"
    out: list[str] = []
    for addr in host.get_addrs():
        text = str(addr)
        if not text.startswith("/ip4/0.0.0.0/tcp/"):
            out.append(text)
            continue
        port = int(addr.value_for_protocol("tcp"))
        expanded = [str(a) for a in get_available_interfaces(port) if str(a).startswith("/ip4/")]
        expanded.sort(key=lambda a: a.startswith("/ip4/127."))
        out.extend(a + suffix for a in expanded)
    return list(dict.fromkeys(out))


class _BadFrame(Exception):
    pass


async def _read_exactly(stream: INetStream, n: int) -> bytes | None:
    """Exactly ``n`` bytes; None at a clean end of stream before the first byte."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = await stream.read(n - got)
        except StreamEOF:
            chunk = b""
        if not chunk:
            if got == 0:
                return None
            raise _BadFrame(f"stream ended inside a frame ({got} of {n} bytes)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# -- asyncio side ------------------------------------------------------------------------


class Libp2pSubscription(OwnedSubscription):
    """One ``subscribe()`` call on a :class:`Libp2pTransport`."""

    __slots__ = ()


class Libp2pTransport(TransportBase):
    """A libp2p peer: GossipSub topics + ``/fi/1.0.0`` direct streams.

    ``seed`` is the 32-byte Ed25519 seed of the peer's identity (PyNaCl
    ``bytes(signing_key)``); ``local_id`` is the hex of its public key.
    ``listen`` holds multiaddrs (default: an ephemeral port on 127.0.0.1);
    ``mdns`` enables LAN discovery (found peers are dialled).
    ``gossip_validator`` (optional) decides, with the rate limits of ``gossip``,
    which gossip this host relays; see the module docs ("Flood control").
    """

    def __init__(
        self,
        seed: bytes,
        *,
        listen: Sequence[str] = DEFAULT_LISTEN,
        mdns: bool = False,
        gossip: GossipSettings | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        dial_timeout: float = 5.0,
        gossip_validator: GossipValidator | None = None,
    ) -> None:
        super().__init__()
        self._stats.update(gossip_rate_limited=0, gossip_invalid=0)
        if len(seed) != 32:
            raise ValueError("seed must be the 32-byte Ed25519 seed")
        if not 0 < max_message_size <= DEFAULT_MAX_MESSAGE_SIZE:
            raise ValueError(f"max_message_size must be 1..{DEFAULT_MAX_MESSAGE_SIZE}")
        if queue_size < 1 or dial_timeout <= 0:
            raise ValueError("queue_size must be >= 1 and dial_timeout > 0")
        try:
            self._listen = [multiaddr.Multiaddr(a) for a in listen]
        except Exception as exc:
            raise ValueError(f"bad listen address in {list(listen)!r}: {exc}") from exc
        if not self._listen:
            raise ValueError("at least one listen address is required")
        self._seed = bytes(seed)
        self._id = create_new_key_pair(self._seed).public_key.to_bytes().hex()
        self._mdns = mdns
        self._gossip = gossip or GossipSettings()
        self._max = max_message_size
        self._queue_size = queue_size
        self._dial_timeout = dial_timeout
        self._gossip_validator = gossip_validator
        self._thread: _TrioThread | None = None
        self._node: _Node | None = None
        self._bridge: _Bridge | None = None
        self._counters = _Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: Inbox[Inbound] = Inbox(queue_size)
        self._subscriptions: dict[str, dict[Libp2pSubscription, None]] = {}
        self._addresses: list[str] = []
        self._connected: frozenset[PeerId] = frozenset()
        self._known: set[PeerId] = set()
        self._start_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Libp2pTransport {self._id[:16]} {self._phase.value}>"

    # -- properties --

    @property
    def local_id(self) -> PeerId:
        return self._id

    @property
    def libp2p_id(self) -> str:
        """This peer's libp2p id (``12D3KooW...``)."""
        return to_libp2p_id(self._id).to_base58()

    @property
    def max_message_size(self) -> int:
        return self._max

    @property
    def stats(self) -> Mapping[str, int]:
        self._fold_counters()
        return super().stats

    def _fold_counters(self) -> None:
        for key, n in self._counters.take().items():
            self._count(key, n)
        bridge = self._bridge
        if bridge is not None and bridge.dropped:
            with bridge._lock:
                dropped, bridge.dropped = bridge.dropped, 0
            self._count("dropped_queue_full", dropped)

    # -- lifecycle --

    async def start(self) -> None:
        async with self._start_lock:
            if self._phase is Phase.CLOSED:
                raise TransportClosed(f"transport {self._id!r} is closed")
            if self._phase is Phase.RUNNING:
                return
            loop = asyncio.get_running_loop()
            self._loop = loop
            self._bridge = _Bridge(loop, self._queue_size, self._on_item)
            self._node = _Node(
                seed=self._seed,
                listen=self._listen,
                gossip=self._gossip,
                mdns=self._mdns,
                max_message_size=self._max,
                queue_size=self._queue_size,
                dial_timeout=self._dial_timeout,
                bridge=self._bridge,
                counters=self._counters,
                validator=self._gossip_validator,
            )
            thread = _TrioThread.acquire()
            self._thread = thread
            node = self._node

            async def run_node() -> list[str]:
                nursery = thread._nursery
                assert nursery is not None
                started: list[str] = await nursery.start(_guarded_node, node)
                return started

            try:
                self._addresses = await thread.call(loop, run_node)
            except BaseException as exc:
                await self._release_thread()
                self._phase = Phase.CLOSED
                if isinstance(exc, TransportError | asyncio.CancelledError):
                    raise
                raise TransportError(f"libp2p could not start: {describe_error(exc)}") from exc
            self._phase = Phase.RUNNING
            log.debug("libp2p %s listening on %s", self._id[:16], ", ".join(self._addresses))

    async def aclose(self) -> None:
        if self._phase is Phase.CLOSED:
            return
        was_running = self._phase is Phase.RUNNING
        self._phase = Phase.CLOSED
        for subs in list(self._subscriptions.values()):
            for sub in list(subs):
                sub._inbox.close()
        self._subscriptions.clear()
        self._inbox.close()
        self._connected = frozenset()
        if self._bridge is not None:
            self._bridge.close()
        if was_running and self._thread is not None and self._node is not None:
            try:
                await self._thread.call(asyncio.get_running_loop(), self._node.stop)
            except TransportError as exc:
                log.debug("libp2p stop: %s", exc)
        await self._release_thread()

    async def _release_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        finished = thread.release()
        if finished is not None:
            await asyncio.to_thread(finished.join, 10.0)

    # -- trio -> asyncio --

    def _on_item(self, item: tuple[Any, ...]) -> None:
        if self._phase is not Phase.RUNNING:
            return
        kind = item[0]
        if kind == "gossip":
            _, topic, data = item
            for sub in self._subscriptions.get(topic, ()):
                if sub._inbox.put(data):
                    self._count("delivered")
                else:
                    self._count("dropped_queue_full")
        elif kind == "direct":
            _, sender, data = item
            self._known.add(sender)
            if self._inbox.put(Inbound(sender, data)):
                self._count("delivered")
            else:
                self._count("dropped_queue_full")
        elif kind == "peers":
            self._connected = item[1]
            self._known.update(item[1])

    # -- Transport API --

    def _running(self) -> tuple[_TrioThread, _Node, asyncio.AbstractEventLoop]:
        self._require_running()
        assert self._thread is not None and self._node is not None and self._loop is not None
        return self._thread, self._node, self._loop

    async def publish(self, topic: str, data: bytes) -> None:
        thread, node, _ = self._running()
        validate_topic(topic)
        data = self._checked_payload(data)
        thread.run_sync_soon(node.enqueue_publish, topic, data)
        self._count("sent")

    async def subscribe(self, topic: str) -> Libp2pSubscription:
        thread, node, loop = self._running()
        validate_topic(topic)
        sub = Libp2pSubscription(self, topic, self._queue_size)
        subs = self._subscriptions.get(topic)
        if subs is None:
            subs = self._subscriptions[topic] = {}
            subs[sub] = None
            try:
                await thread.call(loop, node.join, topic)
            except Exception as exc:
                self._subscriptions.pop(topic, None)
                if isinstance(exc, TransportError):
                    raise
                raise TransportError(
                    f"cannot subscribe to {topic!r}: {describe_error(exc)}"
                ) from exc
        else:
            subs[sub] = None
        return sub

    async def _drop_subscription(self, sub: OwnedSubscription) -> None:
        sub._inbox.close()
        subs = self._subscriptions.get(sub.topic)
        if subs is None or sub not in subs:
            return
        del subs[sub]
        if subs:
            return
        del self._subscriptions[sub.topic]
        if self._phase is Phase.RUNNING and self._thread is not None and self._node is not None:
            with contextlib.suppress(TransportClosed):
                self._thread.spawn(self._node.leave, sub.topic)

    async def send(self, peer: PeerId, data: bytes) -> None:
        thread, node, _ = self._running()
        data = self._checked_payload(data)
        if peer == self._id:
            self._count("sent")
            if self._inbox.put(Inbound(self._id, data)):
                self._count("delivered")
            else:
                self._count("dropped_queue_full")
            return
        try:
            target = to_libp2p_id(peer)
        except ValueError as exc:
            raise PeerUnreachable(str(exc)) from exc
        if peer not in self._known and peer not in self._connected:
            raise PeerUnreachable(f"no known address for peer {peer[:16]}...; connect() first")
        thread.run_sync_soon(node.enqueue_direct, target, data)
        self._count("sent")

    def local_topics(self) -> frozenset[str]:
        """Topics with at least one open local subscription."""
        return frozenset(self._subscriptions)

    def incoming(self) -> AsyncIterator[Inbound]:
        """Direct messages to this peer. Every call iterates the same queue."""
        return InboxIterator(self._inbox)

    def peers(self) -> frozenset[PeerId]:
        if self._phase is not Phase.RUNNING:
            return frozenset()
        return self._connected

    def addresses(self) -> list[str]:
        return list(self._addresses)

    async def connect(self, address: str) -> None:
        """Dial a ``/ip4/.../tcp/.../p2p/<libp2p id>`` multiaddr (PeerUnreachable on failure)."""
        thread, node, loop = self._running()
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        except Exception as exc:
            raise ValueError(f"not a libp2p address with /p2p/<id>: {address!r}") from exc
        fi_id = from_libp2p_id(info.peer_id)
        if fi_id is None:
            raise PeerUnreachable(f"{address!r} does not name an Ed25519 (fi-peer) identity")
        if fi_id == self._id:
            return
        await thread.call(loop, node.connect, info)
        self._known.add(fi_id)

    # -- extras (diagnostics and tests) --

    async def gossip_view(self, topic: str) -> tuple[frozenset[PeerId], frozenset[PeerId]]:
        """(peers known to subscribe to ``topic``, peers in this host's mesh for it)."""
        thread, node, loop = self._running()
        return await thread.call(loop, node.gossip_view, topic)

    async def flush(self) -> None:
        """Wait until everything accepted so far has been written to the network."""
        thread, node, loop = self._running()
        await thread.call(loop, node.flush)
        while self._bridge is not None and self._bridge.pending():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


async def _guarded_node(node: _Node, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run a host; once it has started, a crash is logged instead of taking the thread down."""
    started = False

    def report(value: object) -> None:
        nonlocal started
        started = True
        task_status.started(value)

    class _Status:
        started = staticmethod(report)

    try:
        await node.run(task_status=_Status())
    except Exception as exc:
        if not started:
            raise
        log.error("libp2p host stopped unexpectedly: %s", describe_error(exc))
