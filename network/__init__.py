"""Transports: move opaque bytes between peers (see ``network.base``).

Only the in-memory transport is imported here; backends with heavy
dependencies (``network.libp2p``, ``network.mqtt``) are imported explicitly.
"""

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

__all__ = [
    "MAX_TOPIC_LENGTH",
    "STAT_KEYS",
    "Inbound",
    "MemoryHub",
    "MemorySubscription",
    "MemoryTransport",
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
