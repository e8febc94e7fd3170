"""How the network's costs grow with N: the discrete-event simulator at N = 10, 100, 1,000.

Each N runs in its own Python process (``python -m fi_peer.simulate --json``)
so that the memory per peer of one run is not hidden by another's freed heap.
Every N uses the same network settings, so the columns compare:

* announce interval 10 s, expiry after 3 missed beats (the default 2 s is for
  demos of a handful of peers: announcement traffic per peer is N·D/interval);
* GossipSub-like mesh of degree D = 6, latency uniform 20-80 ms per hop, no
  loss, no churn (the unit tests cover loss and churn);
* cold start: peers start at uniform times within 1 s; a peer that starts
  after another's announcement learns it at the next heartbeat, so
  convergence is about start spread + one interval;
* 4 queries per virtual second network-wide (from random peers) from t = 12 s
  to t = 30 s, k = 8 (N = 10: k = 8 of 9 others), secure aggregation, 5 s timeout.

The simulated period is the same for every N (30 s + the last queries' end);
nothing had to be shortened. The whole benchmark took 210 s of wall time on
this 2-core machine while it was quiet (N = 1,000: 200 s wall, 193 s CPU) and
1,696 s while other sessions kept the load average at ~26 (N = 1,000: 1,682 s
wall for 272 s of CPU): the CPU column is the comparable one. Announcements
dominate (N²/interval copies per virtual second); each distinct signed gossip
message is now verified once per process (envelope.OpenMemo, see
fi_peer.simulate), every copy still goes through its peer's own window,
replay and membership checks. ``--sizes 10 100`` runs in seconds. Run
``python -m benchmarks.scale`` (``--help``); writes
``benchmarks/results/scale.json`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SIZES = (10, 100, 1000)
SETTINGS = {
    "duration": 30.0,
    "warmup": 12.0,
    "latency-ms": (20, 80),
    "query-rate": 4.0,
    "k": 8,
    "degree": 6,
    "announce-interval-ms": 10_000,
    "missed-beats": 3,
    "start-spread-ms": 1000,
    "query-timeout-ms": 5000,
}


def run_one(n: int, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    args = [sys.executable, "-m", "fi_peer.simulate", "--json", "--peers", str(n)]
    args += ["--seed", str(seed)]
    for key, value in settings.items():
        values = value if isinstance(value, tuple | list) else (value,)
        args += [f"--{key}", *(str(v) for v in values)]
    t0 = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    result["process_wall_s"] = time.perf_counter() - t0
    return result


COLUMNS = (
    ("N", lambda r: f"{r['config']['n']}"),
    ("converged s", lambda r: f"{r['membership_converged_s']}"),
    ("gossip/peer/s", lambda r: f"{r['gossip_per_peer_s']:.1f}"),
    ("1st copies/peer/s", lambda r: f"{r['gossip_delivered_per_peer_s']:.1f}"),
    ("direct/peer/s", lambda r: f"{r['direct_per_peer_s']:.1f}"),
    ("ok/queries", lambda r: f"{r['queries_ok']}/{r['queries']}"),
    ("p50 ms", lambda r: f"{r['latency_ms']['p50']:.0f}"),
    ("p99 ms", lambda r: f"{r['latency_ms']['p99']:.0f}"),
    ("KiB/peer", lambda r: f"{r['memory_per_peer_kb']:.0f}"),
    ("wall s", lambda r: f"{r['wall_s']:.1f}"),
    ("cpu s", lambda r: f"{r['cpu_s']:.1f}" if "cpu_s" in r else "-"),
    ("in receive s", lambda r: f"{r['receive_wall_s']:.1f}"),
)


def table(runs: list[dict[str, Any]]) -> str:
    rows = [[name for name, _ in COLUMNS]] + [[f(r) for _, f in COLUMNS] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["config"]["n"] for r in runs]
    series = {
        "gossip msgs / peer / s": [r["gossip_per_peer_s"] for r in runs],
        "direct msgs / peer / s": [r["direct_per_peer_s"] for r in runs],
        "memory / peer (KiB)": [r["memory_per_peer_kb"] for r in runs],
        "cpu s (whole run)": [r.get("cpu_s", r["wall_s"]) for r in runs],
        "query latency p50 (ms)": [r["latency_ms"]["p50"] for r in runs],
        "membership convergence (virtual s)": [
            r["membership_converged_s"] or float("nan") for r in runs
        ],
    }
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, ys) in zip(axes.flat, series.items(), strict=True):
        ax.plot(ns, ys, "o-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("N peers")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("fi-peer simulated network: cost growth with N (log-log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    a = p.parse_args(argv)
    runs = []
    t0, load0 = time.perf_counter(), os.getloadavg()
    for n in a.sizes:
        print(f"N = {n} ...", file=sys.stderr, flush=True)
        runs.append(run_one(n, a.seed, SETTINGS))
        print(table(runs[-1:]), file=sys.stderr, flush=True)
    report = {
        "benchmark": "scale",
        "machine": {"python": platform.python_version(), "cpu": platform.processor()},
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()},
        # The machine is shared: the load average says how much of it this run had.
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "load_average_start_end": [round(load0[0], 1), round(os.getloadavg()[0], 1)],
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, a.out.with_suffix(".png"))
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
