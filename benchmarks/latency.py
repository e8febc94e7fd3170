"""End-to-end query latency over the three transports, for committees of k = 4 and 8.

One run measures everything on the same machine, same models, same inputs:

* ``memory``: N agents in this process over the in-memory hub (no network);
* ``libp2p``: N ``fi-peer run`` daemons, one OS process each, on 127.0.0.1;
* ``mqtt``: N daemons, one process each, through a private Mosquitto.

Latency is what a user of a daemon waits for one collective answer: from
``Agent.query`` being called to its outcome (gossiped request, offers, sealed
inputs, every member's model evaluation, shares, receipts, aggregation),
measured at the querier (``wall_ms`` of the control API for the daemons, the
same call timed in-process for memory). The client's HTTP round trip to its
own daemon is reported separately. Queries run one after another from peer 0
(latency, not throughput), after warm-up queries; a failed query counts as a
failure, never as a latency. Ratios to memory are computed from this run's
numbers only.

Run ``python -m benchmarks.latency`` (``--help``); writes
``benchmarks/results/latency.json`` and prints a table. Needs Mosquitto for
the MQTT row (skipped with a note if it is not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).parent / "results" / "latency.json"
KS = (4, 8)
RULE = "evidence"
EPSILON = 2.0  # the daemons' default [privacy] epsilon and delta
DELTA = 1e-5


def _load_local_network() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fi_local_network", ROOT / "scripts" / "local_network.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fi_local_network"] = module
    spec.loader.exec_module(module)
    return module


def summarize(samples_ms: list[float], failures: dict[str, int]) -> dict[str, Any]:
    arr = np.asarray(samples_ms, dtype=float)
    out: dict[str, Any] = {"n": int(arr.size), "failed": dict(failures)}
    if arr.size:
        out |= {
            "p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p95_ms": round(float(np.percentile(arr, 95)), 2),
            "mean_ms": round(float(arr.mean()), 2),
            "max_ms": round(float(arr.max()), 2),
        }
    return out


# -- memory ----------------------------------------------------------------------------------


async def measure_memory(
    models: list[Path], inputs: list[Any], queries: int, warmup: int, folder: Path
) -> Any:
    """The daemons' setup in one process: same core config, same ledger-backed budgets."""
    import math

    from fi_peer.agent import Agent, LedgerGuard
    from fi_peer.daemon import protocol_card
    from fi_peer.identity import Identity
    from fi_peer.models.runtime import ModelRuntime
    from fi_peer.privacy.budget import BudgetLedger, BudgetLimits
    from fi_peer.protocol.peer import CoreConfig, PeerCore
    from fi_peer.protocol.querier import QuerierConfig
    from network.memory import MemoryHub

    hub = MemoryHub(seed=0)
    config = CoreConfig(net="bench", querier=QuerierConfig(offer_window_ms=1000, min_committee=2))
    limits = BudgetLimits(per_querier_epsilon=math.inf, global_epsilon=math.inf, delta=DELTA)
    ledgers = [BudgetLedger.open(folder / f"budget-{i}.sqlite", limits) for i in range(len(models))]
    agents = []
    for i, path in enumerate(models):
        identity = Identity.from_seed(f"latency-{i}".encode())
        runtime = ModelRuntime.load(path)
        guard = LedgerGuard(ledgers[i])
        core = PeerCore(identity, protocol_card(runtime), config=config, guard=guard)
        agents.append(Agent(core, hub.transport(identity.peer_id), runtime))
    results: dict[str, Any] = {}
    try:
        for agent in agents:
            await agent.start()
        for agent in agents:
            agent.announce()
        for agent in agents:
            assert await agent.wait_for_peers(len(agents) - 1, timeout_s=10)
        querier = agents[0]
        for k in KS:
            samples, failures = [], {}
            for i in range(warmup + queries):
                x = np.asarray(inputs[i % len(inputs)], dtype=np.float32)
                started = time.perf_counter()
                outcome = await querier.query(
                    x, rule=RULE, k=k, timeout_s=10.0, epsilon=EPSILON, delta=DELTA
                )
                took = (time.perf_counter() - started) * 1000
                if i < warmup:
                    continue
                if outcome.ok:
                    samples.append(took)
                else:
                    failures[outcome.reason] = failures.get(outcome.reason, 0) + 1
            results[f"k={k}"] = summarize(samples, failures)
    finally:
        for agent in agents:
            await agent.aclose()
        for ledger in ledgers:
            ledger.close()
    return results


# -- daemons ---------------------------------------------------------------------------------


def measure_daemons(
    ln: Any,
    transport: str,
    models: list[Path],
    inputs: list[Any],
    queries: int,
    warmup: int,
    folder: Path,
    broker: str | None,
) -> dict[str, Any]:
    net = ln.LocalNetwork(folder, transport=transport, broker=broker, offer_window_ms=1000)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        net.prepare(models)
        net.start_all()
        net.wait_ready(timeout=180)
        net.wait_connected(timeout=120)
        results["startup_s"] = round(time.perf_counter() - started, 2)
        client = net.peers[0].client()
        for k in KS:
            samples, http, failures = [], [], {}
            for i in range(warmup + queries):
                body = {
                    "input": inputs[i % len(inputs)],
                    "k": k,
                    "rule": RULE,
                    "timeout_s": 10,
                    "epsilon": EPSILON,
                    "delta": DELTA,
                }
                t0 = time.perf_counter()
                answer = client.post("/v1/query", body, timeout=30)
                took = (time.perf_counter() - t0) * 1000
                result = answer["results"][0]
                if i < warmup:
                    continue
                if result["ok"]:
                    samples.append(result["wall_ms"])
                    http.append(took - result["wall_ms"])
                else:
                    failures[result["reason"]] = failures.get(result["reason"], 0) + 1
            results[f"k={k}"] = summarize(samples, failures)
            results[f"k={k}"]["client_overhead_p50_ms"] = (
                round(float(np.percentile(http, 50)), 2) if http else None
            )
    finally:
        net.stop_all()
    return results


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None
    )


def _mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return "?"
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].strip() if first else "?"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("libp2p", "aiomqtt", "paho-mqtt", "torch", "trio"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    binary = _mosquitto()
    versions["mosquitto"] = _mosquitto_version(binary) if binary else "not installed"
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=9, help="peers in each network (>= 9)")
    parser.add_argument("--queries", type=int, default=100, help="measured queries per k")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--transports", default="memory,libp2p,mqtt", help="comma-separated subset")
    args = parser.parse_args(argv)
    if args.peers < max(KS) + 1:
        parser.error(f"--peers must be at least {max(KS) + 1} for k = {max(KS)}")
    import torch

    torch.set_num_threads(1)
    ln = _load_local_network()
    wall = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="fi-latency-"))
    try:
        models = ln.ensure_models(work / "models", args.peers, 0.5, 1, args.epochs)
        inputs = ln.sample_inputs(models[0].parent)["inputs"]
        wanted = args.transports.split(",")
        results: dict[str, Any] = {}
        notes: list[str] = []
        if "memory" in wanted:
            print("memory: measuring...", file=sys.stderr)
            (work / "memory").mkdir()
            results["memory"] = asyncio.run(
                measure_memory(models, inputs, args.queries, args.warmup, work / "memory")
            )
        if "libp2p" in wanted:
            print("libp2p: starting daemons...", file=sys.stderr)
            results["libp2p"] = measure_daemons(
                ln, "libp2p", models, inputs, args.queries, args.warmup, work / "libp2p", None
            )
        if "mqtt" in wanted:
            binary = _mosquitto()
            if binary is None:
                notes.append("mqtt skipped: mosquitto is not installed")
            else:
                print("mqtt: starting mosquitto and daemons...", file=sys.stderr)
                url, pid = ln.start_broker(work / "broker")
                try:
                    results["mqtt"] = measure_daemons(
                        ln, "mqtt", models, inputs, args.queries, args.warmup, work / "mqtt", url
                    )
                finally:
                    ln._terminate_pid(pid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios: dict[str, Any] = {}
    base = results.get("memory", {})
    for transport in ("libp2p", "mqtt"):
        for k in KS:
            key = f"k={k}"
            row, ref = results.get(transport, {}).get(key, {}), base.get(key, {})
            if "p50_ms" in row and "p50_ms" in ref:
                ratios.setdefault(transport, {})[key] = {
                    "p50_vs_memory": round(row["p50_ms"] / ref["p50_ms"], 2),
                    "p95_vs_memory": round(row["p95_ms"] / ref["p95_ms"], 2),
                }
    report = {
        "benchmark": "latency",
        "settings": {
            "peers": args.peers,
            "ks": list(KS),
            "rule": RULE,
            "queries_per_k": args.queries,
            "warmup": args.warmup,
            "querier": "peer 0, one query at a time",
            "offer_window_ms": 1000,
            "model": f"mlp-64-128-10, {args.epochs} epochs, Dirichlet 0.5 digits split",
            "measured": "Agent.query wall time at the querier (daemons: control API wall_ms)",
            "torch_threads": 1,
            "cpus": os.cpu_count(),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "privacy": "secure aggregation + DP noise, epsilon 2, delta 1e-5 (the defaults)",
            "versions": _versions(),
            "machine": f"{platform.machine()}, {platform.system()}",
        },
        "results": results,
        "ratios_same_run": ratios,
        "notes": notes,
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'transport':<10}{'k':>3}{'p50 ms':>10}{'p95 ms':>10}{'x mem p50':>11}{'failed':>8}")
    for transport, rows in results.items():
        for k in KS:
            row = rows.get(f"k={k}", {})
            ratio = ratios.get(transport, {}).get(f"k={k}", {}).get("p50_vs_memory", 1.0)
            print(
                f"{transport:<10}{k:>3}{row.get('p50_ms', float('nan')):>10.1f}"
                f"{row.get('p95_ms', float('nan')):>10.1f}{ratio:>11.2f}"
                f"{sum(row.get('failed', {}).values()):>8}"
            )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
