"""Collective accuracy of the aggregation rules on non-IID digits.

For each Dirichlet alpha and seed: partition the digits training set over the
peers, train one owner model per peer on its part only, and one pooled model
(the oracle, trained on everything). On the full test split, measure every
peer's own accuracy and, for every aggregation rule, the accuracy of the
label the querier decides from the SUM of all peers' vectors (what secure
aggregation reveals; plaintext here, no DP noise).

Run ``python -m benchmarks.accuracy`` (``--help`` for options). Writes
``benchmarks/results/accuracy.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch

from fi_peer.models.aggregation import RULES
from fi_peer.models.data import DigitsSplit, load_digits_split
from fi_peer.models.runtime import ModelRuntime
from fi_peer.models.zoo import (
    DEFAULT_ARCH,
    DEFAULT_BANDWIDTH,
    OwnerModel,
    ProgressCallback,
    train_peer_models,
    train_pooled,
)

DEFAULT_OUT = Path(__file__).parent / "results" / "accuracy.json"
HEADLINE_ALPHA = 0.1
HEADLINE_SEED = 1
TARGET_GAIN = 15.0  # points over the best single peer, at alpha 0.1
# Training settings of notes/aggregation.md (the zoo's defaults, spelled out
# so the JSON records exactly what ran).
BATCH_SIZE = 32
LR = 1e-3
WEIGHT_DECAY = 5e-4
MIN_PART_SIZE = 10


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def _progress(label: str) -> ProgressCallback:
    def report(done: int, total: int) -> None:
        if sys.stderr.isatty():
            width = 30
            filled = width * done // max(total, 1)
            bar = "#" * filled + "." * (width - filled)
            end = "\n" if done == total else ""
            print(f"\r{label:<22} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return report


def evaluate(peers: list[OwnerModel], split: DigitsSplit) -> dict[str, Any]:
    """Per-peer and per-rule test accuracies (fractions) for one trained committee."""
    runtimes = [ModelRuntime.from_module(m) for m in peers]
    y = split.y_test
    peer_acc = [float((r.predict_proba(split.X_test).argmax(axis=1) == y).mean()) for r in runtimes]
    collective: dict[str, float] = {}
    for name, rule in RULES.items():
        total = np.sum([r.contribution(split.X_test, name) for r in runtimes], axis=0)
        labels, _ = rule.decide_batch(total)
        collective[name] = float((labels == y).mean())
    return {"peer_accuracy": peer_acc, "collective": collective}


def run(
    *,
    alphas: list[float],
    seeds: list[int],
    n_peers: int,
    epochs: int,
    bandwidth: float,
    arch: str,
) -> dict[str, Any]:
    started = time.perf_counter()
    split = load_digits_split()
    training: dict[str, Any] = {
        "arch": arch,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "bandwidth": bandwidth,
    }
    pooled: dict[int, tuple[float, float, float]] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        model = train_pooled(
            seed, split=split, on_progress=_progress(f"pooled seed {seed}"), **training
        )
        seconds = time.perf_counter() - t0
        runtime = ModelRuntime.from_module(model)
        oracle = float((runtime.predict_proba(split.X_test).argmax(1) == split.y_test).mean())
        parzen = float((runtime.parzen_evidence(split.X_test).argmax(1) == split.y_test).mean())
        pooled[seed] = (oracle, parzen, seconds)

    results: dict[str, Any] = {}
    for alpha in alphas:
        per_seed: list[dict[str, Any]] = []
        for seed in seeds:
            t0 = time.perf_counter()
            peers = train_peer_models(
                n_peers,
                alpha,
                seed,
                split=split,
                min_size=MIN_PART_SIZE,
                on_progress=_progress(f"alpha {alpha:g} seed {seed}"),
                **training,
            )
            peer_seconds = time.perf_counter() - t0
            ev = evaluate(peers, split)
            oracle, oracle_parzen, pooled_seconds = pooled[seed]
            accs = ev["peer_accuracy"]
            per_seed.append(
                {
                    "seed": seed,
                    "partition_sizes": [int(m.support_y.numel()) for m in peers],
                    "peer_accuracy": [_pct(a) for a in accs],
                    "best_single": _pct(max(accs)),
                    "mean_single": _pct(float(np.mean(accs))),
                    "collective": {k: _pct(v) for k, v in ev["collective"].items()},
                    "oracle": _pct(oracle),
                    "oracle_parzen": _pct(oracle_parzen),
                    "train_seconds": {
                        "peers": round(peer_seconds, 2),
                        "pooled": round(pooled_seconds, 2),
                        "total": round(peer_seconds + pooled_seconds, 2),
                    },
                }
            )

        def mean_of(values: list[float]) -> float:
            return round(float(np.mean(values)), 2)

        collective = {r: mean_of([s["collective"][r] for s in per_seed]) for r in RULES}
        best = mean_of([s["best_single"] for s in per_seed])
        results[f"{alpha:g}"] = {
            "alpha": alpha,
            "per_seed": per_seed,
            "mean": {
                "best_single": best,
                "mean_single": mean_of([s["mean_single"] for s in per_seed]),
                "collective": collective,
                "gain_over_best_single": {r: round(v - best, 2) for r, v in collective.items()},
                "oracle": mean_of([s["oracle"] for s in per_seed]),
                "oracle_parzen": mean_of([s["oracle_parzen"] for s in per_seed]),
            },
        }

    headline_key = f"{HEADLINE_ALPHA:g}"
    recommended, reason, headline = None, "", None
    if headline_key in results:
        mean = results[headline_key]["mean"]
        bounded = [n for n, r in RULES.items() if r.dp_bounded]
        recommended = max(bounded, key=lambda n: mean["collective"][n])
        gain = mean["gain_over_best_single"][recommended]
        reason = (
            f"highest mean accuracy at alpha {HEADLINE_ALPHA:g} among rules with a bounded "
            f"per-record contribution ({', '.join(bounded)}): "
            f"{mean['collective'][recommended]} vs best single peer {mean['best_single']} "
            f"(+{gain} points; target +{TARGET_GAIN:g})"
        )
        headline = next(
            (s for s in results[headline_key]["per_seed"] if s["seed"] == HEADLINE_SEED), None
        )
    totals = [s["train_seconds"]["total"] for r in results.values() for s in r["per_seed"]]
    return {
        "benchmark": "accuracy",
        "task": "digits",
        "settings": {
            "peers": n_peers,
            "alphas": alphas,
            "seeds": seeds,
            **training,
            "optimizer": "Adam",
            "partition_min_size": MIN_PART_SIZE,
            "split": "digits X/16, stratified 75/25, random_state 0",
            "test_examples": int(split.y_test.size),
            "dp_noise": None,
            "torch_threads": torch.get_num_threads(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "scikit-learn": sklearn.__version__,
            },
            "machine": f"{platform.machine()}, {platform.system()}",
        },
        "rules": {
            name: {
                "description": rule.description,
                "vector_length": rule.vector_length(10),
                "dp_bounded": rule.dp_bounded,
                "l2_sensitivity": rule.l2_sensitivity,
            }
            for name, rule in RULES.items()
        },
        "results": results,
        "headline": {"alpha": HEADLINE_ALPHA, "seed": HEADLINE_SEED, **(headline or {})},
        "recommended_rule": recommended,
        "recommendation_reason": reason,
        "max_train_seconds_peers_plus_pooled": max(totals) if totals else None,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def format_table(report: dict[str, Any]) -> str:
    rules = list(report["rules"])
    head = ["alpha", "seed", "best1", "mean1", *rules, "oracle"]
    rows = [head]
    for key, res in report["results"].items():
        for s in res["per_seed"]:
            rows.append(
                [key, str(s["seed"]), f"{s['best_single']:.1f}", f"{s['mean_single']:.1f}"]
                + [f"{s['collective'][r]:.1f}" for r in rules]
                + [f"{s['oracle']:.1f}"]
            )
        m = res["mean"]
        rows.append(
            [key, "mean", f"{m['best_single']:.1f}", f"{m['mean_single']:.1f}"]
            + [f"{m['collective'][r]:.1f}" for r in rules]
            + [f"{m['oracle']:.1f}"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 100.0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH)
    parser.add_argument("--arch", default=DEFAULT_ARCH)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    report = run(
        alphas=args.alphas,
        seeds=args.seeds,
        n_peers=args.peers,
        epochs=args.epochs,
        bandwidth=args.bandwidth,
        arch=args.arch,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"test accuracy (%), {args.peers} peers, digits; collective = sum over all peers")
    print(format_table(report))
    print(f"recommended rule: {report['recommended_rule']} ({report['recommendation_reason']})")
    print(
        f"training (peers + pooled), worst configuration: "
        f"{report['max_train_seconds_peers_plus_pooled']} s; wall {report['wall_seconds']} s"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
