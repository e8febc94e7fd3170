"""Sustained queries per second from one querier: k = 8, private flow, in process.

Setup (as ``fi-peer demo`` does it, minus the training): 9 agents (one
querier, which also contributes its own vector, and 8 members) on one
in-memory hub with zero latency and no loss, each with its own sqlite
privacy ledger (unlimited limits, so nothing is refused) behind the real
``LedgerGuard``. Every query is the default private flow: secure aggregation
(offers with per-query mask nonces, key shares, relay, masked shares,
unmask, reveals) plus distributed DP noise at ε = 2, δ = 1e-5 on the
``soft`` rule. Models are cheap deterministic numpy maps (softmax of a fixed
random linear layer over 64 inputs, 10 classes), so what is measured is the
protocol, the crypto, the ledger and the asyncio plumbing, not a network.

One process, one event loop. ``concurrency`` queries are kept in flight. A
warm-up batch (2 x concurrency) runs first (calibrating σ, opening ledgers);
then the timed batch, once without and once under pyinstrument (the
profile's own overhead makes that rate lower: the headline rate is the
unprofiled one). The replay guard admits 24,576 messages per sender per 30 s
window (envelope.DEFAULT_MAX_NONCES_PER_SENDER) and the querier sends each
member 6 per query, so ~136 queries/s sustained over 30 s is the protocol's
ceiling for one querier; more is rejected as ``rate_limited``.
The top costs are self time per function and inclusive time of the
cryptographic primitives, as shares of the busy (not epoll-idle) time.
``cpu_per_query_ms`` (process CPU of all 9 peers per query) is the figure to
compare across runs on a shared machine; the rate depends on what else runs.

Run ``python -m benchmarks.throughput`` (``--help``); writes
``benchmarks/results/throughput.json`` with the rate, CPU per query, the
outcome counts, every agent's metrics and the top costs. ``--before DIR``
(e.g. a ``git worktree`` of an older commit) first runs ``--rounds``
alternating pairs, that tree then this one, each in its own process with the
same settings, and records both rates, CPU per query, their ratios and the
load average around each run (other work on the machine skews the rate far
more than the CPU per query).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fi_peer.agent import Agent, LedgerGuard
from fi_peer.identity import Identity
from fi_peer.privacy.budget import BudgetLedger, BudgetLimits
from fi_peer.protocol.messages import ModelCard
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.responder import ResponderConfig
from network.memory import MemoryHub

RESULTS = Path(__file__).parent / "results"
INPUT_DIM = 64
N_CLASSES = 10
RULE = "soft"
GOAL = 100.0


class NumpyModel:
    """A ModelBackend: softmax(x @ W) with W fixed by the seed."""

    def __init__(self, seed: int) -> None:
        self.w = np.random.default_rng(seed).normal(0.0, 0.3, size=(INPUT_DIM, N_CLASSES))

    def contribution(self, X: npt.NDArray[np.float32], rule: str) -> npt.NDArray[np.float64]:
        z = np.asarray(X, dtype=np.float64) @ self.w
        e = np.exp(z - z.max(axis=1, keepdims=True))
        out: npt.NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
        return out

    def vector_length(self, rule: str) -> int:
        return N_CLASSES


def _card() -> ModelCard:
    return ModelCard(
        task="bench",
        n_classes=N_CLASSES,
        input_dim=INPUT_DIM,
        arch="numpy-linear",
        model_hash=b"\x01" * 32,
        rules=(RULE,),
    )


async def _batch(
    querier: Agent, n: int, concurrency: int, k: int, epsilon: float, delta: float, seed: int
) -> tuple[float, Counter[str], list[float]]:
    rng = np.random.default_rng(seed)
    xs = rng.normal(0.0, 1.0, size=(n, INPUT_DIM)).astype(np.float32)
    gate = asyncio.Semaphore(concurrency)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            t = time.perf_counter()
            out = await querier.query(
                xs[i], rule=RULE, k=k, timeout_s=10.0, epsilon=epsilon, delta=delta
            )
            outcomes[out.reason] += 1
            if out.ok:
                latencies.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for i in range(n):
            tg.create_task(one(i))
    return time.perf_counter() - t0, outcomes, latencies


def _walk(frame: Any, active: tuple[str, ...] = ()) -> Iterator[tuple[str, float, float, bool]]:
    """(key, self time, total time, outermost of its key on this path) for every frame."""
    key = f"{frame.function} ({frame.file_path_short}:{frame.line_no})"
    # Synthetic "[self]"/"[await]" leaves are already in their parent's total_self_time.
    yield key, frame.total_self_time, frame.time, key not in active
    for child in frame.children:
        if child.is_synthetic:
            continue
        yield from _walk(child, (*active, key))


def _idle(key: str) -> bool:
    return "poll (" in key or "select (" in key


def top_costs(session: Any, top: int = 20) -> dict[str, Any]:
    root = session.root_frame()
    self_time: dict[str, float] = defaultdict(float)
    inclusive: dict[str, float] = defaultdict(float)
    for key, own, total, outermost in _walk(root):
        self_time[key] += own
        if outermost:
            inclusive[key] += total
    duration = root.time
    watch = (
        "sign ",
        "verify ",
        "crypto_scalarmult",
        "pair_seed",
        "prepare",
        "reveal",
        "masked_input",
        "seal_input",
        "open_input",
        "charge ",
        "check ",
        "encode ",
        "decode ",
        "open ",
        "seal ",
        "_forward",
        "contribution ",
        "add_member_noise",
        "prg",
        "Channel",
        "shamir",
        "split",
        "reconstruct",
        "commit",
    )
    picked = {
        k: v for k, v in inclusive.items() if any(w in k for w in watch) and v > 0.01 * duration
    }

    # The loop waiting in epoll is idle time, not a cost: shares are of the busy time.
    idle = sum(v for k, v in inclusive.items() if _idle(k))
    busy = max(duration - idle, 1e-9)

    def rows(c: dict[str, float], n: int) -> list[dict[str, Any]]:
        items = sorted(
            ((k, v) for k, v in c.items() if not _idle(k)),
            key=lambda kv: -kv[1],
        )[:n]
        return [
            {"function": k, "s": round(v, 3), "share_of_busy": round(v / busy, 3)} for k, v in items
        ]

    return {
        "profiled_s": round(duration, 3),
        "idle_s": round(idle, 3),
        "self_time": rows(self_time, top),
        "inclusive_selected": rows(picked, top),
    }


async def run(
    queries: int,
    concurrency: int,
    k: int,
    epsilon: float,
    delta: float,
    seed: int,
    profile: bool,
    ledger_dir: Path | None = None,
) -> dict[str, Any]:
    hub = MemoryHub(latency=0.0, loss=0.0, seed=seed)
    config = CoreConfig(
        net="bench",
        querier=QuerierConfig(offer_window_ms=1000, min_committee=2),
        responder=ResponderConfig(price_wei=0, capacity=4 * concurrency + 16),
    )
    limits = BudgetLimits(per_querier_epsilon=math.inf, global_epsilon=math.inf, delta=delta)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fi-peer-throughput-", dir=ledger_dir) as tmp:
        ledgers: list[BudgetLedger] = []
        agents: list[Agent] = []
        for i in range(k + 1):
            identity = Identity.from_seed(f"fi-peer-throughput/{seed}/{i}".encode())
            ledger = BudgetLedger.open(Path(tmp) / f"budget-{i}.sqlite", limits)
            ledgers.append(ledger)
            core = PeerCore(
                identity,
                _card(),
                config=config,
                guard=LedgerGuard(ledger),
                rng=np.random.default_rng([seed, i]),
            )
            agents.append(Agent(core, hub.transport(identity.peer_id), NumpyModel(seed * 100 + i)))
        try:
            for agent in agents:
                await agent.start()
            for agent in agents:
                agent.announce()
            ok = await asyncio.gather(*(a.wait_for_peers(k, timeout_s=10.0) for a in agents))
            if not all(ok):
                raise RuntimeError("membership did not converge")
            querier = agents[0]
            await _batch(querier, 2 * concurrency, concurrency, k, epsilon, delta, seed + 1)
            cpu0 = time.process_time()
            wall, outcomes, lat = await _batch(
                querier, queries, concurrency, k, epsilon, delta, seed + 2
            )
            cpu = time.process_time() - cpu0
            result = {
                "queries": queries,
                "wall_s": round(wall, 3),
                "queries_per_s": round(outcomes["ok"] / wall, 1),
                # Process CPU (all threads) over wall: 1.0 = one core busy throughout.
                "cpu_s": round(cpu, 3),
                "cpu_per_query_ms": round(1000 * cpu / max(1, queries), 2),
                "outcomes": dict(outcomes),
                "latency_ms": {
                    f"p{q}": round(float(np.percentile(lat, q)), 1) if lat else None
                    for q in (50, 90, 99)
                },
            }
            if profile:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.0005, async_mode="disabled")
                profiler.start()
                pwall, poutcomes, _ = await _batch(
                    querier, queries, concurrency, k, epsilon, delta, seed + 3
                )
                session = profiler.stop()
                result["profiled"] = {
                    "queries_per_s": round(poutcomes["ok"] / pwall, 1),
                    "outcomes": dict(poutcomes),
                    **top_costs(session),
                }
                result["profile_text"] = profiler.output_text(unicode=False, color=False)
            totals: Counter[str] = Counter()
            for agent in agents:
                totals.update(agent.metrics)
            result["metrics_all_agents"] = dict(sorted(totals.items()))
        finally:
            for agent in agents:
                await agent.aclose()
            for ledger in ledgers:
                ledger.close()
    return result


def _one_run(tree: Path, queries: int, concurrency: int, seed: int) -> dict[str, Any]:
    """One unprofiled run of ``tree``'s own benchmark in a fresh process."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        load0 = os.getloadavg()[0]
        subprocess.run(
            [sys.executable, "-m", "benchmarks.throughput", "--no-profile",
             "--queries", str(queries), "--concurrency", str(concurrency),
             "--seed", str(seed), "--out", out.name],
            cwd=tree, check=True, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )  # fmt: skip
        load1 = os.getloadavg()[0]
        r = json.loads(Path(out.name).read_text())
    return {
        "queries_per_s": r["queries_per_s"],
        "cpu_per_query_ms": r["cpu_per_query_ms"],
        "outcomes": r["outcomes"],
        "p50_ms": r["latency_ms"]["p50"],
        "load_avg_1min": [round(load0, 2), round(load1, 2)],
    }


def compare(before: Path, rounds: int, queries: int, concurrency: int, seed: int) -> dict[str, Any]:
    """Alternate runs of ``before`` and of this tree; ratios are after / before."""
    here = Path(__file__).resolve().parent.parent
    rows = []
    for _ in range(rounds):
        b = _one_run(before.resolve(), queries, concurrency, seed)
        a = _one_run(here, queries, concurrency, seed)
        rows.append({
            "before": b,
            "after": a,
            "rate_ratio": round(a["queries_per_s"] / max(b["queries_per_s"], 1e-9), 3),
            "cpu_ratio": round(a["cpu_per_query_ms"] / max(b["cpu_per_query_ms"], 1e-9), 3),
        })  # fmt: skip

    def mean(side: str, key: str) -> float:
        return round(sum(r[side][key] for r in rows) / len(rows), 2)

    return {
        "before_tree": str(before),
        "rounds": rows,
        "mean": {
            side: {k: mean(side, k) for k in ("queries_per_s", "cpu_per_query_ms")}
            for side in ("before", "after")
        },
        "mean_cpu_ratio": round(
            mean("after", "cpu_per_query_ms") / mean("before", "cpu_per_query_ms"), 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--epsilon", type=float, default=2.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--ledger-dir",
        type=Path,
        default=None,
        help="where the 9 sqlite ledgers live (default: the system temp dir, on disk; "
        "/dev/shm makes fsync free, as if each owner had its own disk)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    p.add_argument("--profile-text", type=Path, default=None, help="also write pyinstrument's tree")
    p.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another checkout (e.g. `git worktree add /tmp/tp-before HEAD`) to compare "
        "with: alternating unprofiled runs of it and of this tree go first",
    )
    p.add_argument("--rounds", type=int, default=3, help="before/after pairs with --before")
    a = p.parse_args(argv)
    if a.before is not None and not (a.before / "benchmarks" / "throughput.py").is_file():
        p.error(f"--before {a.before}: no benchmarks/throughput.py there")
    before_after = (
        None
        if a.before is None
        else compare(a.before, a.rounds, a.queries, a.concurrency, a.seed)
    )
    load_before = os.getloadavg()
    result = asyncio.run(
        run(
            a.queries,
            a.concurrency,
            a.k,
            a.epsilon,
            a.delta,
            a.seed,
            not a.no_profile,
            a.ledger_dir,
        )
    )
    text = result.pop("profile_text", "")
    report = {
        "benchmark": "throughput",
        "machine": {"python": platform.python_version(), "cpu": platform.processor()},
        "settings": {
            "k": a.k,
            "concurrency": a.concurrency,
            "epsilon": a.epsilon,
            "delta": a.delta,
            "rule": RULE,
            "secure_aggregation": True,
            "transport": "memory, zero latency",
            "ledger_dir": str(a.ledger_dir or tempfile.gettempdir()),
            "model": f"numpy softmax({INPUT_DIM} -> {N_CLASSES})",
        },
        "goal_queries_per_s": GOAL,
        "load_avg_1_5_15_at_start": [round(x, 2) for x in load_before],
        **result,
    }
    if before_after is not None:
        report["before_after"] = before_after
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "profiled"}, indent=2))
    if "profiled" in report:
        for row in report["profiled"]["self_time"][:12]:
            print(f"{row['share_of_busy']:6.1%}  {row['function']}")
        print("-- inclusive (selected) --")
        for row in report["profiled"]["inclusive_selected"][:15]:
            print(f"{row['share_of_busy']:6.1%}  {row['function']}")
    if text and a.profile_text is not None:
        a.profile_text.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
