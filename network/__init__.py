"""Transports: move opaque bytes between peers (see ``network.base``).

``memory`` (in-process hub), ``libp2p`` (py-libp2p in one trio thread per
process: GossipSub + ``/fi/1.0.0`` streams) and ``mqtt`` (aiomqtt against a
broker; amqtt as the embedded one). The two real backends pull in heavy
dependencies, so they load on first use: ``from network import
Libp2pTransport`` imports ``network.libp2p`` then, not ``import network``.
"""

from typing import TYPE_CHECKING, Any

from network.base import (
    MAX_TOPIC_LENGTH,
    STAT_KEYS,
    Inbound,
    MessageTooLarge,
    PeerId,
    PeerUnreachable,
    Phase,
    Subscription,
    Transport,
    TransportBase,
    TransportClosed,
    TransportError,
    validate_topic,
)
from network.memory import MemoryHub, MemorySubscription, MemoryTransport

if TYPE_CHECKING:
    from network.libp2p import Libp2pTransport
    from network.mqtt import EmbeddedBroker, MqttTransport

_LAZY = {
    "Libp2pTransport": "network.libp2p",
    "MqttTransport": "network.mqtt",
    "EmbeddedBroker": "network.mqtt",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'network' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "MAX_TOPIC_LENGTH",
    "STAT_KEYS",
    "EmbeddedBroker",
    "Inbound",
    "Libp2pTransport",
    "MemoryHub",
    "MemorySubscription",
    "MemoryTransport",
    "MessageTooLarge",
    "MqttTransport",
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
