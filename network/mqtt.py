"""MQTT transport: aiomqtt (paho-mqtt 2) against a broker; the broker is never trusted.

Theory of operation
-------------------
Every peer of network ``net`` keeps one MQTT 3.1.1 connection to the broker
(Mosquitto in production and CI; :class:`EmbeddedBroker`, amqtt in-process,
for demos and tests without an external program). Topics:

``fi/<net>/g/<topic>``
    gossip: ``publish(topic)`` publishes here, ``subscribe(topic)`` subscribes
    here (one broker subscription per topic, fanned out to every local
    :class:`MqttSubscription`).
``fi/<net>/inbox/<peer id>``
    direct messages to one peer; only that peer subscribes.
``fi/<net>/presence/<peer id>/<session>``
    a retained marker per connection, cleared on a clean close and by the
    connection's will when it dies (SIGKILL, network loss). ``peers()`` is the
    set of peer ids with a live marker. The session part keeps a restarted
    peer's fresh marker safe from the will of its previous connection.

Every payload is a frame ``kind (1 byte) | sender (32 bytes) | data``: MQTT
3.1.1 carries no sender and echoes a client's own publications, so the
sender both fills ``Inbound.sender`` (UNTRUSTED, like on every transport) and
filters the echo. Messages use QoS 0 (per-publisher order is kept by the
broker); the presence markers QoS 1.

Loss of the broker connection is not fatal: the transport reconnects with
backoff, subscribes again and re-announces itself; meanwhile ``publish`` and
``send`` drop (counted ``dropped_unreachable``). A broker cannot tell whether
an inbox has a reader, so ``send`` to an unknown peer is a silent drop, as
the contract allows. Library errors leave as :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import aiomqtt

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

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "BrokerAddress",
    "EmbeddedBroker",
    "MqttSubscription",
    "MqttTransport",
    "parse_broker_url",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE: Final = 1024 * 1024
DEFAULT_QUEUE_SIZE: Final = 10_000
_KIND_DATA: Final = 0x01
_KIND_PROBE: Final = 0x02
_SENDER_LEN: Final = 32
_HEADER: Final = 1 + _SENDER_LEN
_RECONNECT_MAX_S: Final = 2.0

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (default port 1883); ``ValueError`` otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"not an mqtt://host[:port] URL: {url!r}")
    try:
        port = parts.port or 1883
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}") from exc
    return BrokerAddress(parts.hostname, port)


def _check_peer_id(peer: str) -> bytes:
    if len(peer) != 2 * _SENDER_LEN or peer != peer.lower():
        raise ValueError(f"not a fi-peer id: {peer[:80]!r}")
    try:
        return bytes.fromhex(peer)
    except ValueError as exc:
        raise ValueError(f"not a fi-peer id: {peer[:80]!r}") from exc


class MqttSubscription(OwnedSubscription):
    """One ``subscribe()`` call on an :class:`MqttTransport`."""

    __slots__ = ()


class MqttTransport(TransportBase):
    """A peer on an MQTT broker. ``peer_id`` is its fi-peer id (hex Ed25519 key)."""

    def __init__(
        self,
        peer_id: PeerId,
        *,
        broker: str = "mqtt://127.0.0.1:1883",
        net: str = "local",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        keepalive_s: int = 10,
        connect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__()
        self._sender = _check_peer_id(peer_id)
        self._id = peer_id
        self._broker = parse_broker_url(broker)
        if not net or not net.isascii() or any(c in net for c in "/+#\x00") or net[0] == "$":
            raise ValueError(f"net must be a plain ASCII name, got {net!r}")
        if max_message_size < 1 or queue_size < 1 or keepalive_s < 1 or connect_timeout_s <= 0:
            raise ValueError("sizes, keepalive and timeout must be positive")
        self._net = net
        self._max = max_message_size
        self._queue_size = queue_size
        self._keepalive = keepalive_s
        self._connect_timeout = connect_timeout_s
        self._prefix = f"fi/{net}/"
        self._gossip_prefix = f"fi/{net}/g/"
        self._inbox_topic = f"fi/{net}/inbox/{peer_id}"
        self._presence_prefix = f"fi/{net}/presence/"
        self._session = secrets.token_hex(6)
        self._presence_topic = f"{self._presence_prefix}{peer_id}/{self._session}"
        self._inbox: Inbox[Inbound] = Inbox(queue_size)
        self._subscriptions: dict[str, dict[MqttSubscription, None]] = {}
        self._presence: dict[PeerId, set[str]] = {}
        self._client: aiomqtt.Client | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._online = asyncio.Event()
        self._probes: dict[bytes, asyncio.Event] = {}
        self._start_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<MqttTransport {self._id[:16]} {self._broker.url} {self._phase.value}>"

    @property
    def local_id(self) -> PeerId:
        return self._id

    @property
    def max_message_size(self) -> int:
        return self._max

    @property
    def broker(self) -> BrokerAddress:
        return self._broker

    @property
    def online(self) -> bool:
        """Whether the broker connection is up right now."""
        return self._online.is_set()

    # -- lifecycle --

    def _new_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self._broker.host,
            self._broker.port,
            identifier=f"fi-{self._id[:24]}-{self._session}",
            keepalive=self._keepalive,
            will=aiomqtt.Will(self._presence_topic, b"", qos=1, retain=True),
            clean_session=True,
            timeout=self._connect_timeout,
            max_queued_incoming_messages=2 * self._queue_size,
            # paho leaves Nagle on: small messages would wait for the peer's
            # delayed ACK (tens of ms per hop). Brokers need the same
            # (mosquitto: `set_tcp_nodelay true`).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    async def _connect(self) -> aiomqtt.Client:
        client = self._new_client()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await client.__aenter__()
        except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise TransportError(f"cannot reach MQTT broker {self._broker.url}: {reason}") from exc
        return client

    async def start(self) -> None:
        async with self._start_lock:
            if self._phase is Phase.CLOSED:
                raise TransportClosed(f"transport {self._id!r} is closed")
            if self._phase is Phase.RUNNING:
                return
            client = await self._connect()
            try:
                await self._begin_session(client)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                await _disconnect(client)
                raise TransportError(
                    f"MQTT broker {self._broker.url} refused setup: {exc}"
                ) from exc
            self._phase = Phase.RUNNING
            self._supervisor = asyncio.create_task(
                self._supervise(client), name=f"mqtt-{self._id[:8]}"
            )
            log.debug("mqtt %s connected to %s", self._id[:16], self._broker.url)

    async def _begin_session(self, client: aiomqtt.Client) -> None:
        """Subscribe to everything we need and announce presence (before reading)."""
        await client.subscribe(self._inbox_topic, qos=0)
        await client.subscribe(f"{self._presence_prefix}+/+", qos=1)
        for topic in list(self._subscriptions):
            await client.subscribe(self._gossip_prefix + topic, qos=0)
        await client.publish(self._presence_topic, b"1", qos=1, retain=True)
        self._client = client
        self._online.set()

    async def _supervise(self, client: aiomqtt.Client | None) -> None:
        delay = 0.1
        while True:
            if client is not None:
                # Cancellation (aclose) passes straight through: aclose still needs
                # the connection to clear our presence marker before leaving.
                try:
                    await self._read(client)
                except aiomqtt.MqttError as exc:
                    log.warning("lost MQTT broker %s: %s; reconnecting", self._broker.url, exc)
                self._online.clear()
                self._client = None
                self._presence.clear()
                await _disconnect(client)
                client = None
            await asyncio.sleep(delay)
            try:
                client = await self._connect()
                await self._begin_session(client)
            except (TransportError, aiomqtt.MqttError, TimeoutError) as exc:
                if client is not None:
                    await _disconnect(client)
                    client = None
                delay = min(2 * delay, _RECONNECT_MAX_S)
                log.debug("MQTT reconnect failed: %s", exc)
                continue
            delay = 0.1
            log.info("reconnected to MQTT broker %s", self._broker.url)

    async def aclose(self) -> None:
        if self._phase is Phase.CLOSED:
            return
        self._phase = Phase.CLOSED
        for subs in list(self._subscriptions.values()):
            for sub in subs:
                sub._inbox.close()
        self._subscriptions.clear()
        self._inbox.close()
        self._presence.clear()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        client, self._client = self._client, None
        self._online.clear()
        for probe in self._probes.values():
            probe.set()
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await client.publish(self._presence_topic, b"", qos=1, retain=True)
            await _disconnect(client)

    # -- incoming --

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            self._dispatch(message.topic.value, bytes(payload))

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic.startswith(self._presence_prefix):
            self._on_presence(topic[len(self._presence_prefix) :], payload)
            return
        if len(payload) < _HEADER or len(payload) > _HEADER + self._max:
            return  # not ours, or oversized: never delivered
        kind, sender, data = payload[0], payload[1:_HEADER], payload[_HEADER:]
        if topic == self._inbox_topic:
            if kind == _KIND_PROBE:
                probe = self._probes.get(data)
                if probe is not None:
                    probe.set()
            elif kind == _KIND_DATA:
                self._queue(self._inbox, Inbound(sender.hex(), data))
        elif topic.startswith(self._gossip_prefix) and kind == _KIND_DATA:
            if sender == self._sender:
                return  # the broker echoes our own publications
            for sub in self._subscriptions.get(topic[len(self._gossip_prefix) :], ()):
                self._queue(sub._inbox, data)

    def _queue(self, inbox: Inbox[Any], item: object) -> None:
        if inbox.put(item):
            self._count("delivered")
        else:
            self._count("dropped_queue_full")

    def _on_presence(self, rest: str, payload: bytes) -> None:
        peer, _, session = rest.partition("/")
        if len(peer) != 2 * _SENDER_LEN or not session:
            return
        sessions = self._presence.setdefault(peer, set())
        if payload:
            sessions.add(session)
        else:
            sessions.discard(session)
            if not sessions:
                del self._presence[peer]

    # -- Transport API --

    async def _publish_frame(self, topic: str, kind: int, data: bytes) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            await _keep_cancellation(client.publish(topic, bytes([kind]) + self._sender + data))
        except aiomqtt.MqttError as exc:
            log.debug("MQTT publish to %s failed: %s", topic, exc)
            return False
        return True

    async def publish(self, topic: str, data: bytes) -> None:
        self._require_running()
        validate_topic(topic)
        data = self._checked_payload(data)
        self._count("sent")
        if not await self._publish_frame(self._gossip_prefix + topic, _KIND_DATA, data):
            self._count("dropped_unreachable")

    async def subscribe(self, topic: str) -> MqttSubscription:
        self._require_running()
        validate_topic(topic)
        sub = MqttSubscription(self, topic, self._queue_size)
        subs = self._subscriptions.get(topic)
        if subs is not None:
            subs[sub] = None
            return sub
        self._subscriptions[topic] = {sub: None}
        client = self._client
        if client is not None:
            try:
                await _keep_cancellation(client.subscribe(self._gossip_prefix + topic, qos=0))
            except aiomqtt.MqttError as exc:
                # The session is going down; the reconnect subscribes again.
                log.debug("MQTT subscribe to %s deferred: %s", topic, exc)
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
        client = self._client
        if client is not None and self._phase is Phase.RUNNING:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(self._gossip_prefix + sub.topic)

    async def send(self, peer: PeerId, data: bytes) -> None:
        self._require_running()
        data = self._checked_payload(data)
        try:
            _check_peer_id(peer)
        except ValueError as exc:
            raise PeerUnreachable(str(exc)) from exc
        self._count("sent")
        if not await self._publish_frame(f"{self._prefix}inbox/{peer}", _KIND_DATA, data):
            self._count("dropped_unreachable")

    def local_topics(self) -> frozenset[str]:
        """Topics with at least one open local subscription."""
        return frozenset(self._subscriptions)

    def incoming(self) -> AsyncIterator[Inbound]:
        """Direct messages to this peer. Every call iterates the same queue."""
        return InboxIterator(self._inbox)

    def peers(self) -> frozenset[PeerId]:
        if self._phase is not Phase.RUNNING:
            return frozenset()
        return frozenset(p for p in self._presence if p != self._id)

    def addresses(self) -> list[str]:
        return [f"{self._broker.url}/{self._net}/{self._id}"]

    async def connect(self, address: str) -> None:
        """Check that ``address`` is a peer on our broker and net (nothing to dial)."""
        self._require_running()
        try:
            broker = parse_broker_url(address)
            net, _, peer = urlsplit(address).path.strip("/").partition("/")
            _check_peer_id(peer)
        except ValueError as exc:
            raise ValueError(f"not an MQTT peer address: {address!r}") from exc
        if broker != self._broker:
            raise PeerUnreachable(f"{address!r} is on another broker than {self._broker.url}")
        if net != self._net:
            raise PeerUnreachable(f"{address!r} is in net {net!r}, not {self._net!r}")

    # -- extras --

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until the broker has handled everything this peer published so far."""
        self._require_running()
        token = secrets.token_bytes(8)
        event = self._probes[token] = asyncio.Event()
        try:
            if await self._publish_frame(self._inbox_topic, _KIND_PROBE, token):
                async with asyncio.timeout(timeout_s):
                    await event.wait()
        finally:
            self._probes.pop(token, None)

    async def wait_online(self, timeout_s: float) -> bool:
        """Wait until the broker connection is up; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._online.wait()
        except TimeoutError:
            return False
        return True


async def _keep_cancellation(call: Awaitable[_T]) -> _T:
    """Await an aiomqtt call without losing a cancellation of the calling task.

    aiomqtt waits with ``asyncio.wait_for``, which in Python 3.11 can return
    normally when the awaited operation completes just as the task is
    cancelled: the cancellation is lost and the task runs on (an agent's send
    loop then blocks its TaskGroup's shutdown forever). Raise it again.
    """
    result = await call
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return result


async def _disconnect(client: aiomqtt.Client) -> None:
    with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError, RuntimeError):
        async with asyncio.timeout(2.0):
            await client.__aexit__(None, None, None)


class EmbeddedBroker:
    """An in-process MQTT broker (amqtt 0.12), for demos and tests without Mosquitto.

    It shares the caller's event loop. ``async with EmbeddedBroker(port=...) as b:``
    or ``start()`` / ``aclose()``; ``url`` is what transports connect to.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self._address = BrokerAddress(host, port)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return self._address.url

    async def start(self) -> None:
        if self._broker is not None:
            return
        from amqtt.broker import Broker  # type: ignore[import-untyped]

        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self._address.host}:{self._address.port}"}
            },
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        try:
            await broker.start()
        except Exception as exc:
            raise TransportError(f"embedded MQTT broker failed on {self.url}: {exc}") from exc
        self._broker = broker

    async def aclose(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.shutdown()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _main() -> None:  # pragma: no cover - a tiny CLI for scripts/local_network
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="Run an embedded amqtt broker.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with EmbeddedBroker(args.host, args.port):
            print(f"amqtt broker on mqtt://{args.host}:{args.port}", flush=True)
            await stop.wait()

    asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover
    _main()
