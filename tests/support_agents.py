"""Shared set-up for tests that run live Agents: toy models and cards, start-up, meeting.

A toy model answers exactly (no training, no noise), so sums can be checked to the
word; ``start_agent`` builds an identity, its core and its Agent and starts it;
``meet`` makes every agent announce and waits until each sees all the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fi_peer.agent import Agent
from fi_peer.identity import Identity
from fi_peer.protocol.messages import ModelCard
from fi_peer.protocol.peer import CoreConfig, PeerCore
from network.base import Transport
from network.memory import MemoryHub

DIM = 4
N_CLASSES = 3


class ToyModel:
    """Member i answers (i + 1) * [1, 2, ..., n]: distinct, exact in fixed point; with
    ``one_hot`` instead the one-hot row of class i mod n."""

    def __init__(self, index: int, *, n_classes: int = N_CLASSES, one_hot: bool = False) -> None:
        self.index = index
        self.n_classes = n_classes
        self.one_hot = one_hot

    def contribution(self, X: npt.NDArray[np.float32], rule: str) -> npt.NDArray[np.float64]:
        if self.one_hot:
            row = np.eye(self.n_classes)[self.index % self.n_classes]
        else:
            row = (self.index + 1) * np.arange(1, self.n_classes + 1, dtype=np.float64)
        return np.tile(row, (len(X), 1))

    def vector_length(self, rule: str) -> int:
        return self.n_classes


def toy_card(
    *,
    task: str = "digits",
    n_classes: int = N_CLASSES,
    input_dim: int = DIM,
    rules: tuple[str, ...] = ("vote",),
    he: bool = False,
) -> ModelCard:
    return ModelCard(
        task=task,
        n_classes=n_classes,
        input_dim=input_dim,
        arch="toy",
        model_hash=b"\x01" * 32,
        rules=rules,
        he=he,
    )


def memory_transport(hub: MemoryHub) -> Callable[[Identity], Transport]:
    return lambda identity: hub.transport(identity.peer_id)


async def start_agent(
    seed: str,
    card: ModelCard,
    model: Any,
    config: CoreConfig,
    transport: Callable[[Identity], Transport],
    **agent_kwargs: Any,
) -> Agent:
    """An Agent for the identity of ``seed``, over ``transport(identity)``, started."""
    identity = Identity.from_seed(seed.encode())
    core = PeerCore(identity, card, config=config)
    agent = Agent(core, transport(identity), model, **agent_kwargs)
    await agent.start()
    return agent


async def meet(agents: Sequence[Agent], timeout_s: float = 5.0) -> None:
    """Every agent announces now (not at its next beat); each then sees all the others."""
    for agent in agents:
        agent.announce()
    for agent in agents:
        assert await agent.wait_for_peers(len(agents) - 1, timeout_s=timeout_s)
