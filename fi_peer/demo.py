"""``fi-peer demo --in-process``: a whole FI network in one process over the memory
transport (plain ``fi-peer demo`` runs daemons as processes: ``fi_peer/netdemo.py``).

N owners each train their own model on a Dirichlet(alpha) non-IID slice of
the digits training set; N agents (protocol core + memory transport + model)
come up and find each other by gossip; test inputs are then queried from
random peers through the real protocol (signed envelopes, offers, sealed
inputs, key shares, masked shares, unmasking, receipts). The report compares
each owner's own accuracy, the collective answer and a model trained on all
the data pooled.

Privacy is on by default: every answer is securely aggregated, and each query
is (epsilon, delta)-DP for every owner's data, with epsilon = 2 and delta =
1e-5 per query (the operating point issue 5 sets: the evidence rule keeps
~90 % there, see notes/aggregation.md). Each owner keeps a real budget ledger
(sqlite, in a temporary directory, on tmpfs when there is one) with
unlimited limits, so the report can show what the run spent; ``epsilon=0``
turns the noise off (answers are still masked), ``secagg=False`` sends
plaintext shares (members opt in).

Library code: no printing. Progress goes to an optional callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fi_peer.agent import Agent, LedgerGuard
from fi_peer.identity import Identity
from fi_peer.models.aggregation import decide, get_rule
from fi_peer.models.data import load_digits_split
from fi_peer.models.runtime import ModelRuntime
from fi_peer.models.zoo import train_peer_models, train_pooled
from fi_peer.privacy.budget import BudgetLedger, BudgetLimits
from fi_peer.protocol.effects import QueryOutcome
from fi_peer.protocol.messages import ModelCard
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.responder import ResponderConfig
from network.memory import MemoryHub

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSettings:
    peers: int = 10
    alpha: float = 0.1
    queries: int = 300
    seed: int = 1
    k: int | None = None  # None: every other peer
    rule: str = "evidence"
    epochs: int = 50
    concurrency: int = 16
    timeout_s: float = 5.0
    latency_ms: tuple[float, float] = (0.0, 0.0)
    loss: float = 0.0
    # per query, for every owner's data; 0: no noise
    epsilon: float = 2.0
    delta: float = 1e-5
    secagg: bool = True

    def committee_size(self) -> int:
        return self.peers - 1 if self.k is None else self.k


@dataclass(slots=True)
class DemoReport:
    settings: DemoSettings
    peer_ids: list[str]
    train_sizes: list[int]
    peer_accuracy: list[float]  # each owner's own network, on the whole test split
    peer_accuracy_on_queries: list[float]  # same, on the queried inputs only
    collective_accuracy: float  # through the network, over all queries (failed = wrong)
    oracle_accuracy: float  # pooled-data model, whole test split
    oracle_accuracy_on_queries: float
    answered: int
    failures: dict[str, int]
    latency_ms: dict[str, float]
    timings_s: dict[str, float]
    messages: dict[str, int] = field(default_factory=dict)
    noise_sigma: float = 0.0  # std of the Gaussian noise on each sum
    epsilon_spent: list[float] = field(default_factory=list)  # per owner, RDP-composed

    @property
    def best_single(self) -> float:
        return max(self.peer_accuracy)

    @property
    def best_single_on_queries(self) -> float:
        return max(self.peer_accuracy_on_queries)

    def to_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "settings": {
                "peers": s.peers,
                "alpha": s.alpha,
                "queries": s.queries,
                "seed": s.seed,
                "k": s.committee_size(),
                "rule": s.rule,
                "epochs": s.epochs,
                "timeout_s": s.timeout_s,
                "epsilon_per_query": s.epsilon,
                "delta": s.delta,
                "secure_aggregation": s.secagg,
            },
            "privacy": {
                "noise_sigma": self.noise_sigma,
                "epsilon_spent_per_owner": self.epsilon_spent,
            },
            "peers": [
                {"peer_id": p, "train_size": n, "accuracy": a, "accuracy_on_queries": aq}
                for p, n, a, aq in zip(
                    self.peer_ids,
                    self.train_sizes,
                    self.peer_accuracy,
                    self.peer_accuracy_on_queries,
                    strict=True,
                )
            ],
            "best_single_accuracy": self.best_single,
            "best_single_accuracy_on_queries": self.best_single_on_queries,
            "collective_accuracy": self.collective_accuracy,
            "oracle_accuracy": self.oracle_accuracy,
            "oracle_accuracy_on_queries": self.oracle_accuracy_on_queries,
            "gain_over_best_single_points": 100
            * (self.collective_accuracy - self.best_single_on_queries),
            "queries_answered": self.answered,
            "queries_failed": self.failures,
            "latency_ms": self.latency_ms,
            "timings_s": self.timings_s,
            "messages": self.messages,
        }


def protocol_card(runtime: ModelRuntime) -> ModelCard:
    card = runtime.card
    return ModelCard(
        task=card.task,
        n_classes=card.n_classes,
        input_dim=card.input_dim,
        arch=card.arch,
        model_hash=card.digest,
        rules=card.rules,
    )


def _scratch_dir() -> str | None:
    """tmpfs for the throwaway ledgers when there is one: ten co-located owners would
    otherwise queue their fsyncs on one disk (a daemon's ledger lives on its disk)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _accuracy(pred: npt.ArrayLike, y: npt.ArrayLike) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(y))) if np.size(y) else 0.0


async def run_demo(settings: DemoSettings, progress: Progress | None = None) -> DemoReport:
    """Train, bring the network up, query it, tear it down; returns the report."""

    def tick(phase: str, done: int, total: int) -> None:
        if progress is not None:
            progress(phase, done, total)

    s = settings
    if s.peers < 2:
        raise ValueError("the demo needs at least 2 peers")
    if not 1 <= s.committee_size() <= s.peers - 1:
        raise ValueError(f"k must be between 1 and {s.peers - 1} (peers - 1)")
    get_rule(s.rule)  # ValueError for an unknown rule, before any work
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    split = load_digits_split()
    owner_models = train_peer_models(
        s.peers,
        s.alpha,
        s.seed,
        split=split,
        epochs=s.epochs,
        on_progress=lambda d, t: tick("train peers", d, t),
    )
    pooled = train_pooled(
        s.seed, split=split, epochs=s.epochs, on_progress=lambda d, t: tick("train pooled", d, t)
    )
    timings["train"] = time.perf_counter() - t0
    runtimes = [ModelRuntime.from_module(m) for m in owner_models]
    if not all(r.supports(s.rule) for r in runtimes):
        raise ValueError(f"rule {s.rule!r} is not supported by the demo models")
    oracle = ModelRuntime.from_module(pooled)
    X_test, y_test = split.X_test, split.y_test

    rng = random.Random(s.seed)
    n_queries = s.queries
    picks = [rng.randrange(len(y_test)) for _ in range(n_queries)]
    if n_queries <= len(y_test):
        picks = rng.sample(range(len(y_test)), n_queries)
    queriers = [rng.randrange(s.peers) for _ in range(n_queries)]

    t1 = time.perf_counter()
    hub = MemoryHub(
        latency=(s.latency_ms[0] / 1000, s.latency_ms[1] / 1000), loss=s.loss, seed=s.seed
    )
    config = CoreConfig(
        net="demo",
        querier=QuerierConfig(
            offer_window_ms=1000,
            min_committee=min(2, s.committee_size()),
            secure_aggregation=s.secagg,
        ),
        responder=ResponderConfig(
            price_wei=0, capacity=4 * s.concurrency, allow_plaintext=not s.secagg
        ),
    )
    # Unlimited budgets (the demo reports what it spent); a real owner sets limits.
    limits = BudgetLimits(per_querier_epsilon=math.inf, global_epsilon=math.inf, delta=s.delta)
    ledger_dir = tempfile.TemporaryDirectory(prefix="fi-peer-demo-", dir=_scratch_dir())
    ledgers: list[BudgetLedger] = []
    agents: list[Agent] = []
    for i, runtime in enumerate(runtimes):
        identity = Identity.from_seed(f"fi-peer-demo/{s.seed}/{i}".encode())
        ledger = BudgetLedger.open(Path(ledger_dir.name) / f"budget-{i}.sqlite", limits)
        ledgers.append(ledger)
        core = PeerCore(
            identity,
            protocol_card(runtime),
            config=config,
            guard=LedgerGuard(ledger),
            rng=np.random.default_rng([s.seed, i]),
        )
        transport = hub.transport(identity.peer_id)
        agents.append(Agent(core, transport, runtime))
    outcomes: list[QueryOutcome | None] = [None] * n_queries
    noise_sigma = 0.0
    spent: list[float] = []
    try:
        noise_sigma = await Agent.noise_sigma(s.rule, s.epsilon, s.delta)
        for agent in agents:
            await agent.start()
        for agent in agents:  # everyone is subscribed now: announce without waiting a beat
            agent.announce()
        converged = await asyncio.gather(
            *(a.wait_for_peers(s.peers - 1, timeout_s=10.0) for a in agents)
        )
        if not all(converged):
            log.warning("membership did not fully converge; queries may get fewer offers")
        timings["membership"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        gate = asyncio.Semaphore(s.concurrency)
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            async with gate:
                outcomes[i] = await agents[queriers[i]].query(
                    X_test[picks[i]],
                    rule=s.rule,
                    k=s.committee_size(),
                    timeout_s=s.timeout_s,
                    epsilon=s.epsilon,
                    delta=s.delta,
                )
            done += 1
            tick("queries", done, n_queries)

        async with asyncio.TaskGroup() as tg:
            for i in range(n_queries):
                tg.create_task(one(i))
        timings["queries"] = time.perf_counter() - t2
    finally:
        messages = Counter[str]()
        for agent in agents:
            messages.update(agent.metrics)
            await agent.aclose()
        now_s = time.time()
        for ledger in ledgers:
            with contextlib.suppress(Exception):
                spent.append(ledger.spent(None, now_s))
            ledger.close()
        ledger_dir.cleanup()

    y_q = y_test[picks]
    answered = [(i, o) for i, o in enumerate(outcomes) if o is not None and o.ok]
    preds = [decide(o.total, s.rule)[0] for _, o in answered if o.total is not None]
    # A failed query counts as a wrong answer: the headline never hides failures.
    correct = int(np.sum(np.asarray(preds) == y_q[[i for i, _ in answered]])) if answered else 0
    collective = correct / n_queries if n_queries else 0.0
    failures = Counter(o.reason for o in outcomes if o is not None and not o.ok)
    latencies = np.array([o.elapsed_ms for _, o in answered], dtype=float)
    latency = (
        {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 99)}
        if latencies.size
        else {}
    )
    X_q = X_test[picks]
    return DemoReport(
        settings=s,
        peer_ids=[a.peer_id for a in agents],
        train_sizes=[int(r.class_counts.sum()) for r in runtimes],
        peer_accuracy=[_accuracy(r.predict_proba(X_test).argmax(1), y_test) for r in runtimes],
        peer_accuracy_on_queries=[_accuracy(r.predict_proba(X_q).argmax(1), y_q) for r in runtimes],
        collective_accuracy=collective,
        oracle_accuracy=_accuracy(oracle.predict_proba(X_test).argmax(1), y_test),
        oracle_accuracy_on_queries=_accuracy(oracle.predict_proba(X_q).argmax(1), y_q),
        answered=len(answered),
        failures=dict(failures),
        latency_ms=latency,
        timings_s=timings,
        messages=dict(sorted(messages.items())),
        noise_sigma=noise_sigma,
        epsilon_spent=spent,
    )
