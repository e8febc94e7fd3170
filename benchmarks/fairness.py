"""Fair pay: merit from audit queries vs the FI paper's label-free rules.

Setting (as benchmarks/study.py): digits, 10 peers, Dirichlet alpha in
{0.1, 0.5, 1000 ("IID")}, seeds 0-2, every member trained on its own part
only with the same budget (50 epochs, batch 32, Adam 1e-3, wd 5e-4). Two
collectives, each with its own opened vectors (what a member commits to,
sums and opens for an audit):

* ``soft`` (the FI paper's setting): a member's vector is its network's
  probabilities, so the accuracy of what it opens IS the FI merit's
  accuracy;
* ``evidence`` (fi-peer's default): a member's vector is its bounded Parzen
  evidence (kernel width h = 1.25). The FI merit (the member NETWORK's
  accuracy) is then not observable by any querier: the network's output is
  never sent. F is also reported against the accuracy of the member's
  contributed vector (``contribution_accuracy``).

The querier answers a stream of queries: the 450 test inputs in a seeded
random order. One query in every block of ``AUDIT_EVERY`` (5; at a seeded
random position) is an audit: its label is known, and after the answer the
members open their vectors for it. The merit p_i of the fairness score is
each member network's accuracy on the test inputs that were NOT audits (360
of 450): no input whose label the rules saw is used to measure them.

Every query pays a fixed price; the querier settles every ``SETTLE_EVERY``
(50) queries, in one batch, splitting each query of the batch by the rule
into exact wei amounts (fi_peer.incentives.rewards.allocate), with scores
from all audits opened so far:

* ``equal``: equal per delivered share;
* ``merit``: fi_peer.incentives.merit.accuracy_merit: each member's accuracy
  on the opened audits (its vector decided alone), shrunk towards the
  committee mean with 10 pseudo-audits, 0 for a member neither above chance
  (binomial test, 95 %) nor of positive Shapley value in the collective;
* ``shapley``: by the truncated Monte-Carlo Shapley value of the collective
  (v(S) = accuracy of coalition S's summed vectors on the audits, v(empty) =
  chance; negative -> 0): the earlier merit rule, kept for comparison;
* ``agreement`` (FI paper, label-free): that query's price split among the
  members whose network argmax equals the collective answer;
* ``entropy`` (FI paper, label-free): split by w = exp(-H) normalised.

Two experiments per collective, alpha and seed:

1. Fairness: the 10 honest members; each rule's total pay share r over the
   stream vs merit p: F = 1 - ||p - r||_1 / 2.
2. Lazy peer: an 11th member answers every query with a uniformly random
   class, one-hot probabilities (a confident guess, the best a liar can do
   under the entropy rule; under ``evidence`` scaled to the honest members'
   mean total evidence). Its pay per query over the honest members' mean,
   per block of 10 queries (earning rate) and cumulative.

Goals (issue 8): at alpha 0.1, F(merit) > F of every label-free rule; the
lazy peer's earning rate under ``merit`` below 10 % of an honest peer's
within 200 queries.

Caveats. The label-free rules need every member's individual probabilities
on every query, which secure aggregation hides: they are computed here with
privileges no fi-peer querier has (for comparison only). Audits cost: one
query in five is paid for its score, not its answer, and each opened audit
answer costs the member privacy budget (fi_peer.protocol.audit).

Run ``python -m benchmarks.fairness`` (``--help``): a few minutes of CPU with
one torch thread. Writes ``benchmarks/results/fairness.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch

from benchmarks.privacy import (
    BATCH_SIZE,
    DELTA,
    EPOCHS,
    LR,
    MIN_PART_SIZE,
    WEIGHT_DECAY,
    log,
    sigma_for,
)
from benchmarks.study import member_evidence
from fi_peer.incentives import (
    CoalitionAccuracy,
    accuracy_merit,
    agreement_shares,
    allocate,
    audit_hits,
    entropy_weights,
    equal_shares,
    fairness,
    merit_from_accuracy,
    merit_shares,
    monte_carlo_shapley,
)
from fi_peer.models.aggregation import RULES, Evidence
from fi_peer.models.data import DigitsSplit, load_digits_split
from fi_peer.models.runtime import ModelRuntime
from fi_peer.models.zoo import DEFAULT_ARCH, DEFAULT_BANDWIDTH, derive_seed, train_peer_models
from fi_peer.privacy.dp import add_member_noise

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = RESULTS / "fairness.json"
PEERS = 10
ALPHAS = (0.1, 0.5, 1000.0)
SEEDS = (0, 1, 2)
COLLECTIVES = ("soft", "evidence")
HEADLINE = "soft"  # the FI paper's setting: the opened vector is the network's answer
RULE_NAMES = ("equal", "merit", "shapley", "agreement", "entropy")
MERIT_RULES = ("merit", "shapley")
LABEL_FREE = ("agreement", "entropy")
AUDIT_EVERY = 5
SETTLE_EVERY = 50
SHRINKAGE = 10.0
CHANCE_LEVEL = 0.95
PERMUTATIONS = 100
TOLERANCE = 0.01
PRICE_WEI = 10**15  # per query, for the whole committee
GOAL_ALPHA, GOAL_QUERIES, GOAL_RATIO = 0.1, 200, 0.10
CHECKPOINTS = (10, 50, 100, 150, 200, 300, 450)
RATE_BLOCK = 10
_KEY_STREAM, _KEY_LAZY, _KEY_SHAPLEY, _KEY_NOISE = 11, 12, 13, 14


def alpha_key(alpha: float) -> str:
    return "iid" if alpha >= 1000 else f"{alpha:g}"


def decider(collective: str) -> Any:
    rule = RULES[collective]
    return lambda sums: rule.decide_batch(sums)[0]


def member_outputs(
    peers: list[Any], split: DigitsSplit
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(K, n, C) network probabilities and, per collective, (K, n, L) member vectors."""
    probs, evidence = [], []
    for model in peers:
        p = ModelRuntime.from_module(model).predict_proba(split.X_test)
        ev = member_evidence(model, split.X_test, {DEFAULT_BANDWIDTH}, split.n_classes)
        probs.append(p)
        evidence.append(RULES["evidence"].private_vector(p, Evidence(parzen=ev[DEFAULT_BANDWIDTH])))
    p_all = np.stack(probs)
    soft = np.stack([RULES["soft"].private_vector(p) for p in probs])
    return p_all, {"soft": soft, "evidence": np.stack(evidence)}


def audit_positions(n: int, rng: np.random.Generator) -> np.ndarray:
    """One audit at a random position in every block of AUDIT_EVERY queries."""
    marks = np.zeros(n, dtype=bool)
    for start in range(0, n, AUDIT_EVERY):
        stop = min(start + AUDIT_EVERY, n)
        marks[start + int(rng.integers(stop - start))] = True
    return marks


def scores_at(
    vectors: np.ndarray, labels: np.ndarray, idx: np.ndarray, collective: str, seed: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(merit, shapley) scores from the opened audits ``idx`` so far."""
    k = vectors.shape[0]
    if idx.size == 0:
        return np.zeros(k), np.zeros(k)
    decide = decider(collective)
    game = CoalitionAccuracy(vectors[:, idx], labels[idx], decide, n_classes=vectors.shape[2])
    shapley = monte_carlo_shapley(game, permutations=PERMUTATIONS, tolerance=TOLERANCE, seed=seed)
    hits = audit_hits(vectors[:, idx], labels[idx], decide)
    merit = accuracy_merit(
        hits,
        int(idx.size),
        n_classes=vectors.shape[2],
        shrinkage=SHRINKAGE,
        level=CHANCE_LEVEL,
        shapley=shapley,
    )
    return merit, shapley


def simulate(
    probs: np.ndarray,
    vectors: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    audits: np.ndarray,
    *,
    collective: str,
    seed: list[int],
) -> dict[str, Any]:
    """Run the query stream; per rule, the wei paid to each member at each query."""
    k = vectors.shape[0]
    answers = decider(collective)(vectors.sum(axis=0))
    ent = entropy_weights(probs)  # (K, n)
    paid = {rule: np.zeros((len(order), k), dtype=np.int64) for rule in RULE_NAMES}
    merit = shapley = np.zeros(k)
    for batch, start in enumerate(range(0, len(order), SETTLE_EVERY)):
        stop = min(start + SETTLE_EVERY, len(order))
        # Settlement of queries [start, stop): the audits opened so far (incl. this batch).
        idx = order[:stop][audits[:stop]]
        merit, shapley = scores_at(vectors, labels, idx, collective, [*seed, batch])
        batch_shares = {
            "equal": equal_shares(n_members=k),
            "merit": merit_shares(merit),
            "shapley": merit_shares(shapley),
        }
        for t in range(start, stop):
            q = order[t]
            shares = {
                **batch_shares,
                "agreement": agreement_shares(probs[:, q : q + 1], answers[q : q + 1]),
                "entropy": ent[:, q] / ent[:, q].sum(),
            }
            for rule, s in shares.items():
                paid[rule][t] = allocate(PRICE_WEI, s)
    return {
        "paid": paid,
        "final_merit": merit,
        "final_shapley": shapley,
        "n_audits": int(audits.sum()),
    }


def ratio_series(paid: np.ndarray, lazy: int) -> tuple[list[float], list[float]]:
    """Lazy / mean-honest: earning rate per block of RATE_BLOCK queries, and cumulative."""
    honest = [i for i in range(paid.shape[1]) if i != lazy]
    rate, cumulative = [], []
    cum = np.cumsum(paid, axis=0)
    for end in range(RATE_BLOCK, paid.shape[0] + 1, RATE_BLOCK):
        block = paid[end - RATE_BLOCK : end].sum(axis=0)
        rate.append(float(block[lazy] / block[honest].mean()))
        c = cum[end - 1]
        cumulative.append(float(c[lazy] / c[honest].mean()))
    return rate, cumulative


def run_collective(
    collective: str,
    probs: np.ndarray,
    vectors: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    audits: np.ndarray,
    *,
    sigma: float,
    seeds: tuple[int, int],
) -> dict[str, Any]:
    seed, a_idx = seeds
    n, n_classes = y.size, probs.shape[2]
    decide = decider(collective)
    held_out = np.sort(order[~audits])  # never audited: where merit p is measured
    own_acc = (probs[:, held_out].argmax(axis=2) == y[None, held_out]).mean(axis=1)
    merit = merit_from_accuracy(own_acc)
    solo = np.array([(decide(v[held_out]) == y[held_out]).mean() for v in vectors])
    c_idx = COLLECTIVES.index(collective)

    honest = simulate(
        probs,
        vectors,
        y,
        order,
        audits,
        collective=collective,
        seed=[seed, a_idx, c_idx, _KEY_SHAPLEY],
    )
    shares = {rule: p.sum(axis=0) / p.sum() for rule, p in honest["paid"].items()}
    fair = {rule: round(fairness(merit, s), 4) for rule, s in shares.items()}
    fair_contribution = {
        rule: round(fairness(merit_from_accuracy(solo), s), 4) for rule, s in shares.items()
    }

    lazy_rng = np.random.default_rng(derive_seed(seed, _KEY_LAZY, a_idx))
    guess = lazy_rng.integers(n_classes, size=n)
    one_hot = np.eye(n_classes)[guess]
    scale = 1.0 if collective == "soft" else float(vectors.sum(axis=2).mean())
    lazy_vec = one_hot * scale
    if sigma > 0:
        lazy_vec = add_member_noise(lazy_vec, sigma, PEERS + 1, lazy_rng)
    probs11 = np.concatenate([probs, one_hot[None]], axis=0)
    vectors11 = np.concatenate([vectors, lazy_vec[None]], axis=0)
    lazy = simulate(
        probs11,
        vectors11,
        y,
        order,
        audits,
        collective=collective,
        seed=[seed, a_idx, c_idx, _KEY_SHAPLEY, 1],
    )
    series = {rule: ratio_series(p, PEERS) for rule, p in lazy["paid"].items()}
    return {
        "seed": seed,
        "own_accuracy_held_out": [round(float(a), 4) for a in own_acc],
        "contribution_accuracy_held_out": [round(float(a), 4) for a in solo],
        "collective_accuracy": round(float((decide(vectors.sum(axis=0)) == y).mean()), 4),
        "collective_accuracy_with_lazy": round(
            float((decide(vectors11.sum(axis=0)) == y).mean()), 4
        ),
        "merit": [round(float(m), 4) for m in merit],
        "reward_share": {r: [round(float(v), 4) for v in s] for r, s in shares.items()},
        "fairness": fair,
        "fairness_vs_contribution_accuracy": fair_contribution,
        "final_merit_scores": [round(float(v), 4) for v in honest["final_merit"]],
        "final_shapley": [round(float(v), 4) for v in honest["final_shapley"]],
        "lazy_final_merit_score": round(float(lazy["final_merit"][PEERS]), 4),
        "lazy_final_shapley": round(float(lazy["final_shapley"][PEERS]), 4),
        "lazy_rate_ratio": {r: [round(v, 4) for v in s[0]] for r, s in series.items()},
        "lazy_cumulative_ratio": {r: [round(v, 4) for v in s[1]] for r, s in series.items()},
        "audits": honest["n_audits"],
        "held_out": int(held_out.size),
        "wei_exact": all(
            int(p.sum()) == PRICE_WEI * n
            for p in [*honest["paid"].values(), *lazy["paid"].values()]
        ),
    }


def run_one(
    split: DigitsSplit, alpha: float, a_idx: int, seed: int, epsilon: float
) -> dict[str, dict[str, Any]]:
    peers = train_peer_models(
        PEERS,
        alpha,
        seed,
        split=split,
        arch=DEFAULT_ARCH,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        min_size=MIN_PART_SIZE,
    )
    probs, vectors = member_outputs(peers, split)
    y = split.y_test
    stream_rng = np.random.default_rng(derive_seed(seed, _KEY_STREAM, a_idx))
    order = stream_rng.permutation(y.size)
    audits = audit_positions(y.size, stream_rng)
    out = {}
    for collective in COLLECTIVES:
        sigma = sigma_for(epsilon, RULES[collective].l2_sensitivity or 0.0)
        v = vectors[collective]
        if sigma > 0:  # each member's noise share: what it commits to and opens
            noise_rng = np.random.default_rng(derive_seed(seed, _KEY_NOISE, a_idx))
            v = np.stack([add_member_noise(m, sigma, PEERS, noise_rng) for m in v])
        out[collective] = run_collective(
            collective, probs, v, y, order, audits, sigma=sigma, seeds=(seed, a_idx)
        )
        out[collective]["partition_sizes"] = [int(m.support_y.numel()) for m in peers]
    return out


def at_query(series: list[float], t: int) -> float:
    return float(series[min(t // RATE_BLOCK, len(series)) - 1])


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(values: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}

    rate = {r: np.mean([s["lazy_rate_ratio"][r] for s in per_seed], axis=0) for r in RULE_NAMES}
    cum = {
        r: np.mean([s["lazy_cumulative_ratio"][r] for s in per_seed], axis=0) for r in RULE_NAMES
    }
    return {
        "fairness": {r: ms([s["fairness"][r] for s in per_seed]) for r in RULE_NAMES},
        "fairness_vs_contribution_accuracy": {
            r: ms([s["fairness_vs_contribution_accuracy"][r] for s in per_seed]) for r in RULE_NAMES
        },
        "mean_own_accuracy": ms([float(np.mean(s["own_accuracy_held_out"])) for s in per_seed]),
        "collective_accuracy": ms([s["collective_accuracy"] for s in per_seed]),
        "collective_accuracy_with_lazy": ms([s["collective_accuracy_with_lazy"] for s in per_seed]),
        "lazy_rate_ratio_mean": {r: [round(float(v), 4) for v in rate[r]] for r in RULE_NAMES},
        "lazy_cumulative_ratio_mean": {r: [round(float(v), 4) for v in cum[r]] for r in RULE_NAMES},
        "lazy_at_checkpoints": {
            r: {
                str(t): {
                    "rate": round(at_query(list(rate[r]), t), 4),
                    "cumulative": round(at_query(list(cum[r]), t), 4),
                }
                for t in CHECKPOINTS
            }
            for r in RULE_NAMES
        },
        "max_seed_rate_ratio_at_goal": {
            r: round(max(at_query(s["lazy_rate_ratio"][r], GOAL_QUERIES) for s in per_seed), 4)
            for r in RULE_NAMES
        },
        "per_seed_fairness": {r: [s["fairness"][r] for s in per_seed] for r in RULE_NAMES},
    }


def _lazy_goal(s: dict[str, Any], rule: str) -> dict[str, Any]:
    series = s["lazy_rate_ratio_mean"][rule]
    rate = s["lazy_at_checkpoints"][rule][str(GOAL_QUERIES)]["rate"]
    first_below = next(
        (
            (i + 1) * RATE_BLOCK
            for i in range(len(series))
            if all(v < GOAL_RATIO for v in series[i:])
        ),
        None,
    )
    return {
        "rate_ratio_at_goal_queries": rate,
        "worst_seed_rate_ratio_at_goal_queries": s["max_seed_rate_ratio_at_goal"][rule],
        "stays_below_from_query": first_below,
        "max_rate_ratio_after_goal_queries": round(
            max(series[GOAL_QUERIES // RATE_BLOCK - 1 :]), 4
        ),
        "met": rate < GOAL_RATIO,
        "met_and_stays": first_below is not None and first_below <= GOAL_QUERIES,
    }


def goals(results: dict[str, Any]) -> dict[str, Any]:
    key = alpha_key(GOAL_ALPHA)
    if key not in results:
        return {}
    out: dict[str, Any] = {
        "fairness_goal": f"alpha {GOAL_ALPHA:g}: F(merit) > F of every label-free rule",
        "lazy_goal": (
            f"alpha {GOAL_ALPHA:g}: lazy peer's earning rate under merit < "
            f"{GOAL_RATIO:.0%} of an honest peer's within {GOAL_QUERIES} queries"
        ),
        "headline_collective": HEADLINE,
    }
    for collective in COLLECTIVES:
        s = results[key][collective]["summary"]
        by_merit = {
            "fi_paper_network_accuracy": s["fairness"],
            "contribution_accuracy": s["fairness_vs_contribution_accuracy"],
        }
        fair: dict[str, Any] = {}
        for name, table in by_merit.items():
            f = {r: table[r]["mean"] for r in RULE_NAMES}
            best = max(LABEL_FREE, key=lambda r: f[r])
            fair[name] = {
                rule: {
                    "F": f[rule],
                    "best_label_free": {"rule": best, "F": f[best]},
                    "met_on_mean": f[rule] > f[best],
                }
                for rule in MERIT_RULES
            }
        out[collective] = {
            "fairness": fair,
            "lazy": {rule: _lazy_goal(s, rule) for rule in MERIT_RULES},
        }
    return out


COLORS = {
    "equal": "tab:gray",
    "merit": "tab:green",
    "shapley": "tab:purple",
    "agreement": "tab:blue",
    "entropy": "tab:orange",
}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    keys = list(results)
    fig, axes = plt.subplots(2, len(keys), figsize=(5.5 * len(keys), 8.5), squeeze=False)
    width = 0.38
    for col, key in enumerate(keys):
        ax = axes[0][col]
        lows = []
        for c_idx, collective in enumerate(COLLECTIVES):
            s = results[key][collective]["summary"]
            means = [s["fairness"][r]["mean"] for r in RULE_NAMES]
            stds = [s["fairness"][r]["std"] for r in RULE_NAMES]
            lows.append(min(means))
            xs = np.arange(len(RULE_NAMES)) + (c_idx - 0.5) * width
            ax.bar(
                xs,
                means,
                width,
                yerr=stds,
                color=[COLORS[r] for r in RULE_NAMES],
                alpha=1.0 if collective == HEADLINE else 0.45,
                capsize=2,
                edgecolor="black" if collective == HEADLINE else "none",
            )
        ax.set_xticks(range(len(RULE_NAMES)), RULE_NAMES, fontsize=8)
        ax.set_ylim(max(0.0, min(lows) - 0.1), 1.0)
        ax.set_title(
            f"alpha = {key}: F vs FI merit\n(left, outlined: soft collective; right: evidence)",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
        ax2 = axes[1][col]
        for collective, style in zip(COLLECTIVES, ("-", "--"), strict=True):
            s = results[key][collective]["summary"]
            n_blocks = len(s["lazy_rate_ratio_mean"]["merit"])
            xs = [(i + 1) * RATE_BLOCK for i in range(n_blocks)]
            for rule in RULE_NAMES:
                ax2.plot(
                    xs,
                    s["lazy_rate_ratio_mean"][rule],
                    color=COLORS[rule],
                    ls=style,
                    lw=1.2 if collective == HEADLINE else 0.8,
                    label=f"{rule} ({collective})",
                )
        ax2.axhline(GOAL_RATIO, color="tab:red", lw=0.8)
        ax2.axvline(GOAL_QUERIES, color="tab:red", lw=0.8, ls=":")
        ax2.set_yscale("symlog", linthresh=0.01)
        ax2.set_ylim(0.0, 4.0)
        ax2.set_xlabel(f"queries (1 in {AUDIT_EVERY} is an audit; settled every {SETTLE_EVERY})")
        ax2.set_ylabel("lazy peer pay rate / mean honest peer's")
        ax2.set_title(f"alpha = {key}: a lazy 11th peer (random one-hot answers)", fontsize=9)
        ax2.grid(alpha=0.3)
    axes[1][-1].legend(fontsize=6, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(*, alphas: list[float], seeds: list[int], epsilon: float) -> dict[str, Any]:
    started, cpu0 = time.perf_counter(), time.process_time()
    split = load_digits_split()
    results: dict[str, Any] = {}
    for a_idx, alpha in enumerate(alphas):
        per_seed: dict[str, list[dict[str, Any]]] = {c: [] for c in COLLECTIVES}
        for seed in seeds:
            t0 = time.perf_counter()
            one = run_one(split, alpha, a_idx, seed, epsilon)
            for collective in COLLECTIVES:
                per_seed[collective].append(one[collective])
                log(
                    f"[{time.perf_counter() - started:6.1f}s] alpha {alpha:g} seed {seed} "
                    f"{collective} ({time.perf_counter() - t0:.1f}s): "
                    f"F {one[collective]['fairness']}; lazy rate @200 "
                    + ", ".join(
                        f"{r} {at_query(one[collective]['lazy_rate_ratio'][r], 200):.3f}"
                        for r in RULE_NAMES
                    )
                )
        results[alpha_key(alpha)] = {
            "alpha": alpha,
            **{
                c: {"per_seed": per_seed[c], "summary": summarize(per_seed[c])} for c in COLLECTIVES
            },
        }
    return {
        "benchmark": "fairness",
        "task": "digits",
        "settings": {
            "peers": PEERS,
            "alphas": alphas,
            "iid": "alpha 1000 (Dirichlet), as the FI paper",
            "seeds": seeds,
            "collectives": {
                "soft": "opened vector = the network's probabilities (FI paper setting)",
                "evidence": "opened vector = bounded Parzen evidence, h = "
                f"{DEFAULT_BANDWIDTH} (fi-peer default)",
            },
            "headline_collective": HEADLINE,
            "epsilon": "inf" if math.isinf(epsilon) else epsilon,
            "delta": DELTA,
            "audit_every": AUDIT_EVERY,
            "audit_position": f"uniformly random within each block of {AUDIT_EVERY} (seeded)",
            "settle_every": SETTLE_EVERY,
            "merit_measured_on": "test inputs never audited (disjoint from the audits)",
            "merit_rule": {
                "score": "accuracy of the member's opened vector decided alone, on the audits",
                "shrinkage_pseudo_audits": SHRINKAGE,
                "chance_gate": f"binomial, level {CHANCE_LEVEL}, or positive Shapley",
            },
            "shapley": {
                "method": "truncated Monte-Carlo, antithetic permutation pairs",
                "permutations": PERMUTATIONS,
                "truncation_tolerance": TOLERANCE,
                "value": "collective accuracy of the coalition's summed vectors on the audits",
                "empty_value": "chance, 1/10",
            },
            "price_wei_per_query": PRICE_WEI,
            "merit": "own network accuracy / sum (FI paper); F = 1 - L1(p, r)/2",
            "lazy_peer": (
                "11th member: uniformly random class per query, one-hot probabilities; "
                "evidence collective: one-hot x honest members' mean total evidence"
            ),
            "training": {
                "arch": DEFAULT_ARCH,
                "epochs": EPOCHS,
                "batch_size": BATCH_SIZE,
                "lr": LR,
                "weight_decay": WEIGHT_DECAY,
                "partition_min_size": MIN_PART_SIZE,
            },
            "torch_threads": torch.get_num_threads(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "scikit-learn": sklearn.__version__,
            },
        },
        "results": results,
        "goals": goals(results),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
    }


def format_table(report: dict[str, Any]) -> str:
    lines = ["F = 1 - L1(FI merit, reward share)/2, mean ± std over seeds"]
    lines.append("alpha  collective " + "  ".join(f"{c:>14}" for c in RULE_NAMES))
    for key, res in report["results"].items():
        for collective in COLLECTIVES:
            f = res[collective]["summary"]["fairness"]
            lines.append(
                f"{key:>5}  {collective:>10} "
                + "  ".join(f"{f[c]['mean']:>6.3f} ± {f[c]['std']:.3f}" for c in RULE_NAMES)
            )
    lines.append("lazy peer pay / mean honest pay (rate over the last 10 queries | cumulative)")
    for key, res in report["results"].items():
        for collective in COLLECTIVES:
            cp = res[collective]["summary"]["lazy_at_checkpoints"]
            for rule in RULE_NAMES:
                lines.append(
                    f"{key:>5} {collective:>8} {rule:>9}: "
                    + "  ".join(
                        f"@{t} {v['rate']:.3f}|{v['cumulative']:.3f}" for t, v in cp[rule].items()
                    )
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fairness", description=__doc__)
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--epsilon", type=float, default=math.inf, help="per-query ε (inf: no DP)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    report = run(alphas=args.alphas, seeds=args.seeds, epsilon=args.epsilon)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plot:
        plot(report, args.out.with_suffix(".png"))
    print(format_table(report))
    print("goals:", json.dumps(report["goals"], indent=2))
    print(f"wall {report['wall_seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
