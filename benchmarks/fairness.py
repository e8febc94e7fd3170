"""Fair pay: contribution scores from audit queries vs the FI paper's label-free rules.

Setting (as benchmarks/study.py): digits, 10 peers, Dirichlet alpha in
{0.1, 0.5, 1000 ("IID")}, seeds 0-2, every member trained on its own part
only with the same budget (50 epochs, batch 32, Adam 1e-3, wd 5e-4). The
collective is the default aggregation rule, ``evidence``: each member's
vector is its bounded Parzen evidence (``RULES["evidence"].private_vector``,
kernel width = the model card default h = 1.25), the querier decides on
the SUM. Those vectors are exactly what a member opens for an audit. With
``--epsilon`` each member also adds its noise share N(0, σ²/K) (what it
commits to and opens); by default there is no DP noise.

The querier answers a stream of queries (the 450 test inputs in a seeded
random order). One query in every block of ten (at a seeded random
position) is an audit: its label is known, and the members open their
vectors for it. After each audit the querier recomputes truncated
Monte-Carlo Shapley scores (fi_peer.incentives.scores) over a running
window of the last ``--window`` audits (default 40, i.e. the last ~400
queries; v(S) = accuracy of coalition S's summed evidence on the window,
v(empty) = chance). Every query pays a
fixed price, split by each rule into exact wei amounts
(fi_peer.incentives.rewards.allocate):

* ``equal``: equal per delivered share;
* ``merit``: by the current Shapley scores (negative -> 0; equal before the
  first audit);
* ``merit_soft``: the same with the smooth value (mean probability of the
  true label in the coalition's decided distribution), for comparison;
* ``agreement`` (FI paper, label-free): that query's price split among the
  members whose argmax equals the collective answer (equal if nobody does);
* ``entropy`` (FI paper, label-free): split by w = exp(-H) normalised.

Two experiments per alpha and seed:

1. Fairness: the 10 honest members; each rule's total pay share r over the
   stream vs merit p_i = acc_i / sum_j acc_j (each member's own test
   accuracy, the FI paper's merit): F = 1 - ||p - r||_1 / 2. Also reported:
   Shapley and leave-one-out computed on ALL test labels (what the querier
   could do with hindsight; reference only).
2. Lazy peer: an 11th member answers every query with a uniformly random
   class, one-hot probabilities (a confident guess, the best a liar can do
   under the entropy rule) and evidence of a plausible size (the honest
   members' mean total evidence per query on that one-hot). Its pay per
   query over the honest members' mean, per block of 10 queries (earning
   rate) and cumulative.

Goals (issue 8): at alpha 0.1, F(merit) > F of every label-free rule; the
lazy peer's earning rate under ``merit`` below 10 % of an honest peer's
within 200 queries.

Caveats. The label-free rules need every member's individual probabilities
on every query, which secure aggregation hides: they are computed here with
privileges no fi-peer querier has (for comparison only). And the FI merit
(a member NETWORK's own accuracy) is not what a member contributes under
the evidence collective (its Parzen evidence); two other readings of merit
are reported beside it: the test accuracy of the member's own opened vector
alone, and its exact Shapley value on all test labels.

Run ``python -m benchmarks.fairness`` (``--help``): about 1.5 minutes of CPU
with one torch thread (9 committees; Shapley by 200 permutations per audit).
Writes ``benchmarks/results/fairness.json`` and ``fairness.png``.
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
    agreement_shares,
    allocate,
    entropy_weights,
    equal_shares,
    exact_shapley,
    fairness,
    leave_one_out,
    merit_from_accuracy,
    merit_shares,
    monte_carlo_shapley,
)
from fi_peer.models.aggregation import DEFAULT_PRIVATE_RULE, RULES, Evidence
from fi_peer.models.data import DigitsSplit, load_digits_split
from fi_peer.models.runtime import ModelRuntime
from fi_peer.models.zoo import DEFAULT_ARCH, DEFAULT_BANDWIDTH, derive_seed, train_peer_models
from fi_peer.privacy.dp import add_member_noise

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = RESULTS / "fairness.json"
PEERS = 10
ALPHAS = (0.1, 0.5, 1000.0)
SEEDS = (0, 1, 2)
RULE_NAMES = ("equal", "merit", "merit_soft", "agreement", "entropy")
MERIT_RULES = ("merit", "merit_soft")
LABEL_FREE = ("agreement", "entropy")
AUDIT_EVERY = 10
WINDOW = 40  # audits (400 queries)
PERMUTATIONS = 200
TOLERANCE = 0.01
PRICE_WEI = 10**15  # per query, for the whole committee
GOAL_ALPHA, GOAL_QUERIES, GOAL_RATIO = 0.1, 200, 0.10
CHECKPOINTS = (10, 50, 100, 150, 200, 300, 450)
COLLECTIVE = DEFAULT_PRIVATE_RULE
_KEY_STREAM, _KEY_LAZY, _KEY_SHAPLEY, _KEY_NOISE = 11, 12, 13, 14


def alpha_key(alpha: float) -> str:
    return "iid" if alpha >= 1000 else f"{alpha:g}"


def decide(sums: np.ndarray) -> np.ndarray:
    return RULES[COLLECTIVE].decide_batch(sums)[0]


def proba(sums: np.ndarray) -> np.ndarray:
    return RULES[COLLECTIVE].decide_batch(sums)[1]


def window_game(
    vectors: np.ndarray, labels: np.ndarray, idx: list[int], soft: bool
) -> CoalitionAccuracy:
    return CoalitionAccuracy(
        vectors[:, idx],
        labels[idx],
        decide,
        n_classes=vectors.shape[2],
        proba=proba if soft else None,
    )


def opened_vectors(
    peers: list[Any], split: DigitsSplit, sigma: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(K, n, C) probabilities and (K, n, C) opened evidence vectors on the test inputs."""
    rule = RULES[COLLECTIVE]
    probs, vectors = [], []
    for model in peers:
        p = ModelRuntime.from_module(model).predict_proba(split.X_test)
        ev = member_evidence(model, split.X_test, {DEFAULT_BANDWIDTH}, split.n_classes)
        v = rule.private_vector(p, Evidence(parzen=ev[DEFAULT_BANDWIDTH]))
        if sigma > 0:
            v = add_member_noise(v, sigma, len(peers), rng)
        probs.append(p)
        vectors.append(v)
    return np.stack(probs), np.stack(vectors)


def audit_positions(n: int, rng: np.random.Generator) -> np.ndarray:
    """One audit at a random position in every block of AUDIT_EVERY queries."""
    marks = np.zeros(n, dtype=bool)
    for start in range(0, n, AUDIT_EVERY):
        stop = min(start + AUDIT_EVERY, n)
        marks[start + int(rng.integers(stop - start))] = True
    return marks


def simulate(
    probs: np.ndarray,
    vectors: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    audits: np.ndarray,
    *,
    window: int,
    seed: list[int],
) -> dict[str, Any]:
    """Run the query stream; per rule, the wei paid to each member at each query."""
    k = vectors.shape[0]
    answers = decide(vectors.sum(axis=0))
    ent = entropy_weights(probs)  # (K, n)
    paid = {rule: np.zeros((len(order), k), dtype=np.int64) for rule in RULE_NAMES}
    scores = {rule: np.zeros(k) for rule in MERIT_RULES}
    seen: list[int] = []
    n_audits = 0
    for t, q in enumerate(order):
        shares = {
            "equal": equal_shares(n_members=k),
            "merit": merit_shares(scores["merit"]),
            "merit_soft": merit_shares(scores["merit_soft"]),
            "agreement": agreement_shares(probs[:, q : q + 1], answers[q : q + 1]),
            "entropy": ent[:, q] / ent[:, q].sum(),
        }
        for rule, s in shares.items():
            paid[rule][t] = allocate(PRICE_WEI, s)
        if audits[t]:  # the answer is out; members open, the querier rescores
            seen.append(int(q))
            n_audits += 1
            idx = seen[-window:]
            for j, rule in enumerate(MERIT_RULES):
                scores[rule] = monte_carlo_shapley(
                    window_game(vectors, labels, idx, soft=rule == "merit_soft"),
                    permutations=PERMUTATIONS,
                    tolerance=TOLERANCE,
                    seed=[*seed, j, n_audits],
                )
    exact = exact_shapley(window_game(vectors, labels, seen[-window:], soft=False))
    return {
        "paid": paid,
        "final_scores": scores["merit"],
        "mc_vs_exact_max_abs": float(np.abs(scores["merit"] - exact).max()),
        "n_audits": n_audits,
    }


def ratio_series(paid: np.ndarray, lazy: int) -> tuple[list[float], list[float]]:
    """Lazy / mean-honest: earning rate per block of AUDIT_EVERY queries, and cumulative."""
    honest = [i for i in range(paid.shape[1]) if i != lazy]
    rate, cumulative = [], []
    cum = np.cumsum(paid, axis=0)
    for end in range(AUDIT_EVERY, paid.shape[0] + 1, AUDIT_EVERY):
        block = paid[end - AUDIT_EVERY : end].sum(axis=0)
        rate.append(float(block[lazy] / block[honest].mean()))
        c = cum[end - 1]
        cumulative.append(float(c[lazy] / c[honest].mean()))
    return rate, cumulative


def run_one(
    split: DigitsSplit, alpha: float, a_idx: int, seed: int, epsilon: float, window: int
) -> dict[str, Any]:
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
    sigma = sigma_for(epsilon, RULES[COLLECTIVE].l2_sensitivity or 0.0)
    noise_rng = np.random.default_rng(derive_seed(seed, _KEY_NOISE, a_idx))
    probs, vectors = opened_vectors(peers, split, sigma, noise_rng)
    y = split.y_test
    n, n_classes = y.size, split.n_classes
    own_acc = (probs.argmax(axis=2) == y[None, :]).mean(axis=1)
    merit = merit_from_accuracy(own_acc)
    collective_acc = float((decide(vectors.sum(axis=0)) == y).mean())

    stream_rng = np.random.default_rng(derive_seed(seed, _KEY_STREAM, a_idx))
    order = stream_rng.permutation(n)
    audits = audit_positions(n, stream_rng)

    # 1. fairness, 10 honest members
    honest = simulate(
        probs, vectors, y, order, audits, window=window, seed=[seed, a_idx, _KEY_SHAPLEY]
    )
    shares = {rule: p.sum(axis=0) / p.sum() for rule, p in honest["paid"].items()}
    full = CoalitionAccuracy(vectors, y, decide, n_classes=n_classes)
    hindsight = {
        "shapley_all_labels": merit_shares(exact_shapley(full)),
        "loo_all_labels": merit_shares(leave_one_out(full)),
    }
    fair = {rule: round(fairness(merit, s), 4) for rule, s in {**shares, **hindsight}.items()}
    # Other readings of "merit" under the evidence collective (reported beside the FI one):
    # the test accuracy of the member's own opened vector alone, and its exact Shapley
    # value on every test label (its true marginal contribution).
    solo = np.array([(decide(vectors[i]) == y).mean() for i in range(PEERS)])
    alt_merit = {
        "contribution_accuracy": merit_from_accuracy(solo),
        "shapley_all_labels": hindsight["shapley_all_labels"],
    }
    fair_alt = {
        name: {rule: round(fairness(m, s), 4) for rule, s in shares.items()}
        for name, m in alt_merit.items()
    }

    # 2. a lazy 11th member
    lazy_rng = np.random.default_rng(derive_seed(seed, _KEY_LAZY, a_idx))
    guess = lazy_rng.integers(n_classes, size=n)
    one_hot = np.eye(n_classes)[guess]
    scale = float(vectors.sum(axis=2).mean())  # an honest member's mean total evidence
    lazy_vec = one_hot * scale
    if sigma > 0:
        lazy_vec = add_member_noise(lazy_vec, sigma, PEERS + 1, lazy_rng)
    probs11 = np.concatenate([probs, one_hot[None]], axis=0)
    vectors11 = np.concatenate([vectors, lazy_vec[None]], axis=0)
    lazy = simulate(
        probs11, vectors11, y, order, audits, window=window, seed=[seed, a_idx, _KEY_SHAPLEY, 1]
    )
    series = {rule: ratio_series(p, PEERS) for rule, p in lazy["paid"].items()}
    return {
        "seed": seed,
        "partition_sizes": [int(m.support_y.numel()) for m in peers],
        "own_accuracy": [round(float(a), 4) for a in own_acc],
        "collective_accuracy": round(collective_acc, 4),
        "collective_accuracy_with_lazy": round(
            float((decide(vectors11.sum(axis=0)) == y).mean()), 4
        ),
        "merit": [round(float(m), 4) for m in merit],
        "reward_share": {r: [round(float(v), 4) for v in s] for r, s in shares.items()},
        "fairness": fair,
        "fairness_other_merit": fair_alt,
        "contribution_accuracy": [round(float(a), 4) for a in solo],
        "final_shapley_window": [round(float(v), 4) for v in honest["final_scores"]],
        "lazy_final_shapley_window": round(float(lazy["final_scores"][PEERS]), 4),
        "lazy_rate_ratio": {r: [round(v, 4) for v in s[0]] for r, s in series.items()},
        "lazy_cumulative_ratio": {r: [round(v, 4) for v in s[1]] for r, s in series.items()},
        "mc_vs_exact_max_abs": round(
            max(honest["mc_vs_exact_max_abs"], lazy["mc_vs_exact_max_abs"]), 4
        ),
        "audits": honest["n_audits"],
        "wei_exact": all(
            int(p.sum()) == PRICE_WEI * n
            for p in [*honest["paid"].values(), *lazy["paid"].values()]
        ),
    }


def at_query(series: list[float], t: int) -> float:
    return float(series[min(t // AUDIT_EVERY, len(series)) - 1])


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(values: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}

    fair_keys = list(per_seed[0]["fairness"])
    alt = per_seed[0]["fairness_other_merit"]
    rate = {r: np.mean([s["lazy_rate_ratio"][r] for s in per_seed], axis=0) for r in RULE_NAMES}
    cum = {
        r: np.mean([s["lazy_cumulative_ratio"][r] for s in per_seed], axis=0) for r in RULE_NAMES
    }
    return {
        "fairness": {k: ms([s["fairness"][k] for s in per_seed]) for k in fair_keys},
        "fairness_other_merit": {
            m: {r: ms([s["fairness_other_merit"][m][r] for s in per_seed]) for r in alt[m]}
            for m in alt
        },
        "mean_own_accuracy": ms([float(np.mean(s["own_accuracy"])) for s in per_seed]),
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
    }


def _lazy_goal(s: dict[str, Any], rule: str) -> dict[str, Any]:
    series = s["lazy_rate_ratio_mean"][rule]
    rate = s["lazy_at_checkpoints"][rule][str(GOAL_QUERIES)]["rate"]
    first_below = next(
        (
            (i + 1) * AUDIT_EVERY
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
            max(series[GOAL_QUERIES // AUDIT_EVERY - 1 :]), 4
        ),
        "met": rate < GOAL_RATIO,
        "met_and_stays": first_below is not None and first_below <= GOAL_QUERIES,
    }


def goals(results: dict[str, Any]) -> dict[str, Any]:
    key = alpha_key(GOAL_ALPHA)
    if key not in results:
        return {}
    s = results[key]["summary"]
    fair: dict[str, Any] = {}
    merits = {"fi_paper_network_accuracy": s["fairness"], **s["fairness_other_merit"]}
    for merit_name, table in merits.items():
        f = {r: table[r]["mean"] for r in RULE_NAMES}
        best_label_free = max(LABEL_FREE, key=lambda r: f[r])
        fair[merit_name] = {
            rule: {
                "F": f[rule],
                "best_label_free": {"rule": best_label_free, "F": f[best_label_free]},
                "met_on_mean": f[rule] > f[best_label_free],
            }
            for rule in MERIT_RULES
        }
    return {
        "fairness": {
            "goal": f"alpha {GOAL_ALPHA:g}: F(merit) > F of every label-free rule",
            "headline_merit": "fi_paper_network_accuracy",
            "by_merit_definition": fair,
        },
        "lazy": {
            "goal": (
                f"alpha {GOAL_ALPHA:g}: lazy peer's earning rate under merit < "
                f"{GOAL_RATIO:.0%} of an honest peer's within {GOAL_QUERIES} queries"
            ),
            **{rule: _lazy_goal(s, rule) for rule in MERIT_RULES},
        },
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    keys = list(results)
    fig, axes = plt.subplots(2, len(keys), figsize=(5.5 * len(keys), 8.5), squeeze=False)
    colors = {
        "equal": "tab:gray",
        "merit": "tab:green",
        "merit_soft": "tab:purple",
        "agreement": "tab:blue",
        "entropy": "tab:orange",
    }
    bars = [*RULE_NAMES, "shapley_all_labels", "loo_all_labels"]
    for col, key in enumerate(keys):
        s = results[key]["summary"]
        ax = axes[0][col]
        means = [s["fairness"][b]["mean"] for b in bars]
        stds = [s["fairness"][b]["std"] for b in bars]
        ax.bar(
            range(len(bars)),
            means,
            yerr=stds,
            color=[colors.get(b, "tab:olive") for b in bars],
            capsize=3,
        )
        ax.set_xticks(
            range(len(bars)), [b.replace("_all_labels", "\n(all labels)") for b in bars], fontsize=8
        )
        lo = min(means) - 0.1
        ax.set_ylim(max(0.0, lo), 1.0)
        ax.set_title(f"alpha = {key}: fairness F vs merit (mean of seeds)")
        ax.grid(axis="y", alpha=0.3)
        ax2 = axes[1][col]
        n_blocks = len(s["lazy_rate_ratio_mean"]["merit"])
        xs = [(i + 1) * AUDIT_EVERY for i in range(n_blocks)]
        for rule in RULE_NAMES:
            ax2.plot(
                xs, s["lazy_rate_ratio_mean"][rule], color=colors[rule], label=f"{rule} (rate)"
            )
            ax2.plot(
                xs,
                s["lazy_cumulative_ratio_mean"][rule],
                color=colors[rule],
                ls=":",
                lw=1,
                label=f"{rule} (cumulative)",
            )
        ax2.axhline(GOAL_RATIO, color="tab:red", lw=0.8)
        ax2.axvline(GOAL_QUERIES, color="tab:red", lw=0.8, ls="--")
        ax2.set_yscale("symlog", linthresh=0.01)
        ax2.set_ylim(0.0, 4.0)
        ax2.set_xlabel("queries (1 in 10 is an audit)")
        ax2.set_ylabel("lazy peer pay / mean honest peer pay")
        ax2.set_title(f"alpha = {key}: a lazy 11th peer (random one-hot answers)")
        ax2.grid(alpha=0.3)
    axes[1][-1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(*, alphas: list[float], seeds: list[int], epsilon: float, window: int) -> dict[str, Any]:
    started, cpu0 = time.perf_counter(), time.process_time()
    split = load_digits_split()
    results: dict[str, Any] = {}
    for a_idx, alpha in enumerate(alphas):
        per_seed = []
        for seed in seeds:
            t0 = time.perf_counter()
            one = run_one(split, alpha, a_idx, seed, epsilon, window)
            per_seed.append(one)
            log(
                f"[{time.perf_counter() - started:6.1f}s] alpha {alpha:g} seed {seed} "
                f"({time.perf_counter() - t0:.1f}s): F {one['fairness']}; lazy rate @200 "
                + ", ".join(
                    f"{r} {at_query(one['lazy_rate_ratio'][r], 200):.3f}" for r in RULE_NAMES
                )
            )
        results[alpha_key(alpha)] = {
            "alpha": alpha,
            "per_seed": per_seed,
            "summary": summarize(per_seed),
        }
    return {
        "benchmark": "fairness",
        "task": "digits",
        "settings": {
            "peers": PEERS,
            "alphas": alphas,
            "iid": "alpha 1000 (Dirichlet), as the FI paper",
            "seeds": seeds,
            "collective_rule": COLLECTIVE,
            "bandwidth": DEFAULT_BANDWIDTH,
            "epsilon": "inf" if math.isinf(epsilon) else epsilon,
            "delta": DELTA,
            "opened_vector": "the member's evidence private_vector (+ its noise share under DP)",
            "audit_every": AUDIT_EVERY,
            "audit_position": "uniformly random within each block of 10 queries (seeded)",
            "shapley_window_audits": window,
            "shapley": {
                "method": "truncated Monte-Carlo, antithetic permutation pairs",
                "permutations": PERMUTATIONS,
                "truncation_tolerance": TOLERANCE,
                "value": "collective accuracy of the coalition's summed vectors on the window",
                "empty_value": "chance, 1/10",
            },
            "price_wei_per_query": PRICE_WEI,
            "merit": "own test accuracy / sum (FI paper); F = 1 - L1(p, r)/2",
            "lazy_peer": (
                "11th member: uniformly random class per query, one-hot probabilities, "
                "evidence = one-hot x honest members' mean total evidence"
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
    lines = ["F = 1 - L1(merit, reward share)/2, mean ± std over seeds"]
    cols = [*RULE_NAMES, "shapley_all_labels", "loo_all_labels"]
    lines.append("alpha  " + "  ".join(f"{c:>18}" for c in cols))
    for key, res in report["results"].items():
        f = res["summary"]["fairness"]
        lines.append(
            f"{key:>5}  " + "  ".join(f"{f[c]['mean']:>10.3f} ± {f[c]['std']:.3f}" for c in cols)
        )
    lines.append("lazy peer pay / mean honest pay (rate over the last 10 queries | cumulative)")
    for key, res in report["results"].items():
        cp = res["summary"]["lazy_at_checkpoints"]
        for rule in RULE_NAMES:
            lines.append(
                f"{key:>5} {rule:>9}: "
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
    parser.add_argument("--window", type=int, default=WINDOW, help="Shapley window (audits)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    report = run(alphas=args.alphas, seeds=args.seeds, epsilon=args.epsilon, window=args.window)
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
