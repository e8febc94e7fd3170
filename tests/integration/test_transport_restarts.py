"""Real transports survive restarts: of a peer (libp2p, MQTT) and of the broker (MQTT).

The shared contract suite (tests/contract) covers one lifetime of a transport;
these tests cover what a long-running daemon meets: the peer it talks to
restarts with the same identity, or the MQTT broker goes away and comes back.
Loopback only; synchronisation by polling observable state with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from network import Inbound
from network.libp2p import Libp2pTransport
from network.mqtt import MqttTransport
from tests.integration.support import Mosquitto, free_port

pytestmark = pytest.mark.integration

DEADLINE_S = 15.0


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def delivered(
    sender: Libp2pTransport | MqttTransport, receiver_inbox: object, to: str
) -> None:
    """Send probes until one arrives (a restart may eat the first few)."""
    inbox = receiver_inbox
    deadline = time.monotonic() + DEADLINE_S
    n = 0
    while time.monotonic() < deadline:
        n += 1
        await sender.send(to, b"probe-%d" % n)
        try:
            async with asyncio.timeout(0.5):
                message = await anext(inbox)  # type: ignore[call-overload]
        except TimeoutError:
            continue
        assert isinstance(message, Inbound) and message.sender == sender.local_id
        return
    raise AssertionError("no probe was delivered after the restart")


async def test_libp2p_peer_restarts_with_the_same_identity() -> None:
    seed_b = os.urandom(32)
    port = free_port()
    a = Libp2pTransport(os.urandom(32))
    b = Libp2pTransport(seed_b, listen=[f"/ip4/127.0.0.1/tcp/{port}"])
    await a.start()
    await b.start()
    try:
        await a.connect(b.addresses()[0])
        await delivered(a, b.incoming(), b.local_id)  # the /fi stream to b is open now

        await b.aclose()
        await eventually(lambda: b.local_id not in a.peers(), "a to notice b left")
        await a.send(b.local_id, b"into the void")  # best effort: dropped, never raised

        b2 = Libp2pTransport(seed_b, listen=[f"/ip4/127.0.0.1/tcp/{port}"])
        await b2.start()
        try:
            assert b2.local_id == b.local_id
            await a.connect(b2.addresses()[0])  # what the daemon does on b's next announcement
            await delivered(a, b2.incoming(), b2.local_id)  # stale stream replaced
            await delivered(b2, a.incoming(), a.local_id)
        finally:
            await b2.aclose()
    finally:
        await a.aclose()


async def test_mqtt_peer_restarts_with_the_same_identity(tmp_path: Path) -> None:
    with Mosquitto(tmp_path) as broker:
        net = f"r{secrets.token_hex(3)}"
        id_b = secrets.token_hex(32)
        a = MqttTransport(secrets.token_hex(32), broker=broker.url, net=net)
        b = MqttTransport(id_b, broker=broker.url, net=net)
        await a.start()
        await b.start()
        try:
            await eventually(lambda: id_b in a.peers(), "a to see b")
            await b.aclose()
            await eventually(lambda: id_b not in a.peers(), "b's presence to be cleared")
            b2 = MqttTransport(id_b, broker=broker.url, net=net)
            await b2.start()
            try:
                await eventually(lambda: id_b in a.peers(), "a to see b again")
                await delivered(a, b2.incoming(), id_b)
            finally:
                await b2.aclose()
        finally:
            await a.aclose()


async def test_mqtt_transports_reconnect_after_the_broker_restarts(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path).start()
    try:
        net = f"r{secrets.token_hex(3)}"
        a = MqttTransport(secrets.token_hex(32), broker=broker.url, net=net)
        b = MqttTransport(secrets.token_hex(32), broker=broker.url, net=net)
        await a.start()
        await b.start()
        sub = await b.subscribe("fi/r/topic")
        try:
            await eventually(lambda: b.local_id in a.peers(), "a to see b")
            port = broker.port
            broker.stop()
            await eventually(lambda: not a.online and not b.online, "both to notice")
            await a.publish("fi/r/topic", b"while down")  # dropped and counted, not raised
            assert a.stats["dropped_unreachable"] >= 1

            broker.port = port
            broker.restart_on_same_port()
            await eventually(lambda: a.online and b.online, "both to reconnect")
            await eventually(lambda: b.local_id in a.peers(), "presence to be re-announced")
            await delivered(a, b.incoming(), b.local_id)
            await a.publish("fi/r/topic", b"after")
            async with asyncio.timeout(DEADLINE_S):
                assert await anext(sub) == b"after"  # the gossip subscription came back too
        finally:
            await a.aclose()
            await b.aclose()
    finally:
        broker.stop()
