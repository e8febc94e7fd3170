"""Gossip topic names. A network name keeps separate FI networks apart."""

from __future__ import annotations


def peers_topic(net: str) -> str:
    return f"fi/{net}/peers"


def query_topic(net: str, task: str) -> str:
    return f"fi/{net}/q/{task}"
