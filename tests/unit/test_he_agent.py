"""Input-private (HE) queries through real agents over the in-memory transport.

The agent carries out the HE effects with fi_peer.he_runtime off its loop; the
members share one loaded copy of the querier's public context (~12 MB, ~0.2 s to
load) to keep the test short; the context still travels, chunked, to each.
"""

from __future__ import annotations

import numpy as np

from fi_peer.agent import Agent
from fi_peer.he_runtime import HERuntime
from fi_peer.privacy import he
from fi_peer.protocol.he_messages import HE_CHUNK_BYTES
from fi_peer.protocol.peer import CoreConfig
from fi_peer.protocol.querier import QuerierConfig
from network.memory import MemoryHub
from tests.support_agents import meet, memory_transport, start_agent, toy_card
from tests.unit.test_he_protocol import DIM, OUT, TOL, tiny_model


class Plain:
    """The querier's (plaintext) model: only its vector length matters here."""

    def contribution(self, X: np.ndarray, rule: str) -> np.ndarray:
        return np.zeros((len(X), OUT))

    def vector_length(self, rule: str) -> int:
        return OUT


async def test_input_private_query_through_agents_equals_plaintext() -> None:
    hub = MemoryHub(seed=11)
    config = CoreConfig(net="he", querier=QuerierConfig(offer_window_ms=2000, include_self=False))
    shared = he.ContextCache(max_entries=2)
    models = [tiny_model(10 + i) for i in range(2)]
    agents: list[Agent] = []
    for i, model in enumerate([None, *models]):
        card = toy_card(
            task="toy",
            n_classes=OUT,
            input_dim=DIM,
            rules=("soft", "support"),
            he=model is not None,
        )
        runtime = HERuntime(model)
        if model is not None:
            runtime.contexts = shared
        agents.append(
            await start_agent(
                f"he-agent-{i}", card, Plain(), config, memory_transport(hub), he=runtime
            )
        )
    try:
        await meet(agents)
        querier = agents[0]
        x = np.array([0.2, -0.4, 1.0, 0.5])
        expected = sum(m.forward(x[None, :])[0] for m in models)
        for _ in range(2):  # the first with the key exchange, the second without
            outcome = await querier.query(
                x, rule="soft", k=2, timeout_s=60, epsilon=0.0, input_private=True
            )
            assert outcome.ok, outcome.reason
            assert outcome.total is not None
            np.testing.assert_allclose(outcome.total, expected, atol=TOL)
            assert len(outcome.contributors) == 2
        member_core = agents[1].core
        assert querier.he is not None
        public = querier.he.keys()[1]
        chunks = -(-len(public) // HE_CHUNK_BYTES)  # ~12 MB: 27 chunks of 448 KiB
        assert 20 <= chunks <= 32
        assert member_core.metrics["accepted.he_context_chunk"] == chunks  # once, not twice
        # Many inputs, support rule, no DP: ONE batched query, chunked both ways.
        xs = np.random.default_rng(5).uniform(-1, 1, (64, DIM))
        outcome = await querier.query(
            xs, rule="support", k=2, timeout_s=60, epsilon=0.0, input_private=True
        )
        assert outcome.ok, outcome.reason
        assert outcome.total is not None
        totals = np.asarray(outcome.total).reshape(64, OUT)
        np.testing.assert_allclose(totals, sum(m.forward(xs) for m in models), atol=TOL)
        assert member_core.metrics["accepted.he_blob_chunk"] >= 2  # the request, chunked
    finally:
        for agent in agents:
            await agent.aclose()
