"""Fair pay: merit from audit queries vs the FI paper's label-free rules.

Setting (as benchmarks/study.py): digits, 10 peers, Dirichlet alpha in
{0.1, 0.5, 1000 ("IID")}, seeds 0-4, every member trained on its own part
only with the same budget (50 epochs, batch 32, Adam 1e-3, wd 5e-4). Two
collectives, each with its own member vectors (what a member commits to,
sums and opens for an audit):

* ``soft`` (the FI paper's setting): a member's vector is its network's
  probabilities, so the accuracy of what it opens IS the FI merit's accuracy;
* ``evidence`` (fi-peer's default): a member's vector is its bounded Parzen
  evidence (kernel width h = 1.25). The member's NETWORK output is never sent
  nor opened, so the FI merit (network accuracy) is not observable by any
  querier. F is also reported against the accuracy of the vector the member
  does contribute (``contribution``), and the label-free rules are computed
  twice: on the network outputs (``agreement``, ``entropy``: what the FI
  paper uses, here a privilege no fi-peer party has) and on the sent vectors
  (``agreement_sent``, ``entropy_sent``: the same information the merit
  rule gets, but on every query). Under ``soft`` the two coincide.

Data: the 450 test inputs are split once per seed, stratified by label, into
the querier's AUDIT split (200 labelled inputs: it holds their labels, as a
querier with a small labelled set would) and the EVALUATION split (250). The
merit p of the fairness score is each member network's accuracy on the
evaluation split only; no audit input is used to measure a rule, and no
hyperparameter was chosen on the evaluation split (see ``HYPERPARAMETERS``).

Stream: 950 queries = the evaluation split three times (each pass in a fresh
seeded order) + the 200 audits, interleaved. Audit schedule: the first 100
audits one in every 2 queries (a random position in each pair) during the
first 200 queries, a new committee's probation; the other 100 at a random
position in each of 100 equal blocks of the remaining 750 queries. Audits
look like any query; a member cannot tell them apart.

Every query pays a fixed price; the querier settles every ``SETTLE_EVERY``
(50) queries, splitting each query of the batch by the rule into exact wei
(fi_peer.incentives.rewards.allocate), with scores from all audits opened so
far (fi_peer.incentives.merit.merit_scores):

* ``equal``: equal per delivered share;
* ``merit``: Shapley value of the individual-accuracy game (= the member's
  accuracy on the opened audits, its vector decided alone; an evidence
  vector, a joint, is decided under the collective's class prior:
  fi_peer.incentives.merit.prior_corrected), shrunk towards
  the committee mean with 10 pseudo-audits, 0 for a member that looks like
  a guesser: hits not above chance (binomial, 0.999) and a collective-
  accuracy Shapley value not positive, unless its hits beat chance at 0.95
  and its Shapley value is >= -0.02 (a lucky guesser's is clearly negative);
* ``shapley``: the truncated Monte-Carlo Shapley value in the collective-
  accuracy game (v(S) = accuracy of S's summed vectors on the audits,
  v(empty) = chance), negative -> 0: marginal contribution, for comparison;
* ``agreement`` / ``entropy`` (FI paper, label-free): per query, the price
  split among the members whose argmax equals the collective answer / by
  w = exp(-H) normalised; ``*_sent``: the same on the sent vectors' decided
  distributions.

Reported per collective, alpha and seed:

1. ``fairness_paid``: F = 1 - ||p - r||_1 / 2 with r the share of all wei
   each member was PAID over the stream (early settlements, with few
   audits, included); ``fairness_settled``: r = the last settlement's shares
   (all 200 audits), as the FI paper computes each rule once over the set
   (for the label-free rules the two are the same).
2. ``games``: F of the EXACT Shapley value (1024 coalitions) on all 200
   audits for four characteristic functions (fi_peer.incentives.merit
   docs): collective accuracy, log-likelihood of the true label, labelled
   coverage, individual accuracy; and the truncated Monte-Carlo estimate's
   largest error against the exact value (collective-accuracy game).
3. Lazy peer: an 11th member answers every query with a uniformly random
   class, one-hot (a confident guess, the best a liar can do under the
   entropy rule; under ``evidence`` scaled to the honest members' mean total
   evidence). Its pay over the mean honest member's, per block of 10 queries
   (earning rate) and cumulative.

Goals (issue 8): at alpha 0.1, F(merit) > F of every label-free rule (here:
per seed, not only on the mean); the lazy peer's earning rate under
``merit`` below 10 % of an honest peer's within 200 queries.

Caveats. The label-free rules need every member's individual output on every
query, which secure aggregation hides: they are computed here with
privileges no fi-peer querier has (for comparison only). Audits cost: 200 of
the 950 queries (21 %) are paid for their score, not their answer, and each
opened audit answer costs the member privacy budget (fi_peer.protocol.audit).

Run ``python -m benchmarks.fairness`` (``--help``): a few minutes of CPU with
one torch thread. Writes ``benchmarks/results/fairness.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.model_selection import train_test_split

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
    merit_from_accuracy,
    merit_shares,
    monte_carlo_shapley,
)
from fi_peer.incentives.merit import (
    CoalitionLogLikelihood,
    IndividualAccuracy,
    LabelledCoverage,
    merit_scores,
    prior_corrected,
    solo_correct,
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
SEEDS = (0, 1, 2, 3, 4)
COLLECTIVES = ("soft", "evidence")
HEADLINE = "soft"  # the FI paper's setting: the opened vector is the network's answer
RULE_NAMES = (
    "equal",
    "merit",
    "shapley",
    "agreement",
    "entropy",
    "agreement_sent",
    "entropy_sent",
)
MERIT_RULES = ("merit", "shapley")
LABEL_FREE = ("agreement", "entropy")
LABEL_FREE_SENT = ("agreement_sent", "entropy_sent")
GAMES = ("collective_accuracy", "log_likelihood", "labelled_coverage", "individual_accuracy")
AUDIT_POOL = 200
PASSES = 3  # ordinary queries: the evaluation split this many times
FRONT_AUDITS, FRONT_QUERIES = 100, 200  # probation: one audit in every 2 queries
SETTLE_EVERY = 50
SHRINKAGE = 10.0
CHANCE_LEVEL, STRICT_LEVEL, HARM = 0.95, 0.999, 0.02
PERMUTATIONS = 100
TOLERANCE = 0.01
LOGLIK_EPS = 1e-3
# Solo decision of a member's opened vector: the evidence vector is a joint
# (n_i(y) q_i(x|y)), decided under the collective's class prior
# (fi_peer.incentives.merit.prior_corrected); the soft vector is an answer.
PRIOR_EPS: dict[str, float | None] = {"soft": None, "evidence": 0.1}
PRICE_WEI = 10**15  # per query, for the whole committee
GOAL_ALPHA, GOAL_QUERIES, GOAL_RATIO = 0.1, 200, 0.10
CHECKPOINTS = (10, 50, 100, 150, 200, 300, 500, 950)
RATE_BLOCK = 10
_KEY_STREAM, _KEY_LAZY, _KEY_SHAPLEY, _KEY_NOISE, _KEY_SPLIT = 11, 12, 13, 14, 15

HYPERPARAMETERS = {
    "chosen_without_the_evaluation_split": True,
    "how": (
        "development seeds 100-104 (other partitions and models than the reported seeds), "
        "inside the AUDIT split only: merit scores from 100 audits, F against network "
        "accuracy on the other 100 audit inputs; the evaluation split was never used"
    ),
    "choices": {
        "score": "individual accuracy (the FI merit's own definition; a priori, not tuned)",
        "audit_schedule": "front-loaded (first half of the audits 1 in 2) beat uniform on dev",
        "shrinkage": "10 pseudo-audits (0/5/10/20 within 0.005 of each other on dev)",
        "chance_gate": (
            "pass if hits beat chance at 0.999, or collective Shapley > 0, or hits beat "
            "chance at 0.95 and Shapley >= -0.02. Dev (alpha 0.1 soft, mean F; share of 480 "
            "lazy runs paid > 10 % at query 200): 0.95 alone 0.938, 5 %; 0.999 alone 0.899, "
            "0 %; hybrid with margin 0.01 / 0.02 / 0.03: 0.911 / 0.924 / 0.932, "
            "0 / 0 / 0.8 %. The log-likelihood game was rejected as the Shapley gate "
            "because it is negative for many honest members at alpha 0.1 (dilution)"
        ),
        "permutations_tolerance": "100 / 0.01, as before (cost), error reported in games",
        "disclosure": (
            "two choices were first prompted by looking at reported seeds: the class-prior "
            "correction of evidence vectors (an early table over seeds 0-4 and 100-104 on "
            "test inputs overlapping the evaluation split) and the strict gate level (a lucky "
            "lazy peer paid under level 0.95 alone at alpha 0.1, seed 1, evidence); both "
            "values were then set by the dev protocol above, nothing was tuned on the "
            "reported F values"
        ),
        "prior_eps": (
            "evidence only: 0.1 (0.05: 0.947, 0.1: 0.949, 0.2: 0.934 mean dev F at alpha 0.1; "
            "raw solo decision 0.883); soft: none, a priori (its vector is the answer)"
        ),
    },
}


def alpha_key(alpha: float) -> str:
    return "iid" if alpha >= 1000 else f"{alpha:g}"


def decider(collective: str) -> Any:
    rule = RULES[collective]
    return lambda sums: rule.decide_batch(sums)[0]


def distributions(collective: str) -> Any:
    rule = RULES[collective]
    return lambda sums: rule.decide_batch(sums)[1]


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


def split_test(y: np.ndarray, seed: int, a_idx: int) -> tuple[np.ndarray, np.ndarray]:
    """(audit, evaluation) indices of the test inputs: a stratified 200 / 250 split."""
    audit, evaluation = train_test_split(
        np.arange(y.size),
        train_size=AUDIT_POOL,
        random_state=derive_seed(seed, _KEY_SPLIT, a_idx) % 2**32,
        stratify=y,
    )
    return np.sort(audit), np.sort(evaluation)


def audit_marks(n_queries: int, n_audits: int, rng: np.random.Generator) -> np.ndarray:
    """Audit positions: FRONT_AUDITS in the first FRONT_QUERIES queries (one per
    equal block), the rest one per equal block of the remaining queries."""
    front = min(FRONT_AUDITS, n_audits)
    bounds = [
        *np.linspace(0, FRONT_QUERIES, front + 1).round().astype(int)[:-1],
        *np.linspace(FRONT_QUERIES, n_queries, n_audits - front + 1).round().astype(int),
    ]
    marks = np.zeros(n_queries, dtype=bool)
    for start, stop in itertools.pairwise(bounds):
        marks[start + int(rng.integers(stop - start))] = True
    return marks


def make_stream(
    audit: np.ndarray, evaluation: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(test index per query, is-audit per query) for the whole stream."""
    ordinary = np.concatenate([rng.permutation(evaluation) for _ in range(PASSES)])
    n = ordinary.size + audit.size
    marks = audit_marks(n, audit.size, rng)
    index = np.empty(n, dtype=np.int64)
    index[marks] = rng.permutation(audit)
    index[~marks] = ordinary
    return index, marks


def simulate(
    probs: np.ndarray,
    sent: np.ndarray,
    labels: np.ndarray,
    marks: np.ndarray,
    *,
    collective: str,
    seed: list[int],
) -> dict[str, Any]:
    """Run the stream (everything indexed by query position); per rule, the wei
    paid to each member at each query."""
    k, n = sent.shape[0], sent.shape[1]
    answers = decider(collective)(sent.sum(axis=0))
    sent_dist = np.stack([distributions(collective)(v) for v in sent])
    ent = entropy_weights(probs)  # (K, n)
    ent_sent = entropy_weights(sent_dist)
    paid = {rule: np.zeros((n, k), dtype=np.int64) for rule in RULE_NAMES}
    final = None
    for batch, start in enumerate(range(0, n, SETTLE_EVERY)):
        stop = min(start + SETTLE_EVERY, n)
        # Settlement of queries [start, stop): the audits opened so far (incl. this batch).
        pos = np.flatnonzero(marks[:stop])
        final = merit_scores(
            sent[:, pos],
            labels[pos],
            decider(collective),
            n_classes=probs.shape[2],
            shrinkage=SHRINKAGE,
            level=CHANCE_LEVEL,
            strict_level=STRICT_LEVEL,
            harm=HARM,
            permutations=PERMUTATIONS,
            tolerance=TOLERANCE,
            seed=[*seed, batch],
            prior_eps=PRIOR_EPS[collective],
        )
        batch_shares = {
            "equal": equal_shares(n_members=k),
            "merit": merit_shares(final.scores),
            "shapley": merit_shares(final.shapley),
        }
        for t in range(start, stop):
            shares = {
                **batch_shares,
                "agreement": agreement_shares(probs[:, t : t + 1], answers[t : t + 1]),
                "entropy": ent[:, t] / ent[:, t].sum(),
                "agreement_sent": agreement_shares(sent_dist[:, t : t + 1], answers[t : t + 1]),
                "entropy_sent": ent_sent[:, t] / ent_sent[:, t].sum(),
            }
            for rule, s in shares.items():
                paid[rule][t] = allocate(PRICE_WEI, s)
    assert final is not None
    return {"paid": paid, "final": final, "answers": answers}


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


def game_table(
    vectors: np.ndarray, labels: np.ndarray, collective: str, merit: np.ndarray, seed: list[int]
) -> dict[str, Any]:
    """F of the exact Shapley value of each characteristic function on all audits."""
    n_classes = int(labels.max()) + 1 if labels.size else 2
    n_classes = max(n_classes, RULES[collective].n_classes(vectors.shape[2]))
    decide = decider(collective)
    eps = PRIOR_EPS[collective]
    correct = solo_correct(
        vectors if eps is None else prior_corrected(vectors, eps), labels, decide
    )
    collective_game = CoalitionAccuracy(vectors, labels, decide, n_classes=n_classes)
    games = {
        "collective_accuracy": collective_game,
        "log_likelihood": CoalitionLogLikelihood(
            vectors, labels, distributions(collective), n_classes=n_classes, eps=LOGLIK_EPS
        ),
        "labelled_coverage": LabelledCoverage(correct),
        "individual_accuracy": IndividualAccuracy(correct),
    }
    out: dict[str, Any] = {}
    exact_collective = None
    for name, game in games.items():
        phi = exact_shapley(game)
        if name == "collective_accuracy":
            exact_collective = phi
        efficiency = float(phi.sum() - (game.grand_value() - game.empty_value))
        positive = np.maximum(phi, 0.0)
        out[name] = {
            "F": round(fairness(merit, positive), 4) if positive.sum() > 0 else 0.0,
            "negative_members": int((phi < 0).sum()),
            "efficiency_error": float(f"{efficiency:.2e}"),
        }
    assert exact_collective is not None
    tmc = monte_carlo_shapley(
        collective_game, permutations=PERMUTATIONS, tolerance=TOLERANCE, seed=seed
    )
    plain = monte_carlo_shapley(collective_game, permutations=PERMUTATIONS, seed=seed)
    out["tmc_max_abs_error"] = {
        "truncated": round(float(np.abs(tmc - exact_collective).max()), 5),
        "untruncated": round(float(np.abs(plain - exact_collective).max()), 5),
        "exact_range": round(float(np.ptp(exact_collective)), 5),
    }
    return out


def run_collective(
    collective: str,
    probs: np.ndarray,
    vectors: np.ndarray,
    y: np.ndarray,
    audit: np.ndarray,
    evaluation: np.ndarray,
    stream: tuple[np.ndarray, np.ndarray],
    *,
    sigma: float,
    seeds: tuple[int, int],
) -> dict[str, Any]:
    seed, a_idx = seeds
    index, marks = stream
    n_classes = probs.shape[2]
    decide = decider(collective)
    c_idx = COLLECTIVES.index(collective)
    own_acc = (probs[:, evaluation].argmax(axis=2) == y[None, evaluation]).mean(axis=1)
    merit = merit_from_accuracy(own_acc)
    solo = solo_correct(vectors[:, evaluation], y[evaluation], decide).mean(axis=1)
    contribution = merit_from_accuracy(solo)

    # Per query position; DP noise (if any) is fresh for every query.
    sent = vectors[:, index]
    if sigma > 0:
        noise_rng = np.random.default_rng(derive_seed(seed, _KEY_NOISE, a_idx, c_idx))
        sent = np.stack([add_member_noise(m, sigma, PEERS, noise_rng) for m in sent])
    p_stream, y_stream = probs[:, index], y[index]
    honest = simulate(
        p_stream, sent, y_stream, marks, collective=collective, seed=[seed, a_idx, c_idx, 0]
    )
    paid = {rule: p.sum(axis=0) / p.sum() for rule, p in honest["paid"].items()}
    settled = dict(paid)
    settled["merit"] = merit_shares(honest["final"].scores)
    settled["shapley"] = merit_shares(honest["final"].shapley)

    lazy_rng = np.random.default_rng(derive_seed(seed, _KEY_LAZY, a_idx, c_idx))
    n = index.size
    one_hot = np.eye(n_classes)[lazy_rng.integers(n_classes, size=n)]
    scale = 1.0 if collective == "soft" else float(vectors.sum(axis=2).mean())
    lazy_vec = one_hot * scale
    if sigma > 0:
        lazy_vec = add_member_noise(lazy_vec, sigma, PEERS + 1, lazy_rng)
    sent11 = np.concatenate([sent, lazy_vec[None]], axis=0)
    lazy = simulate(
        np.concatenate([p_stream, one_hot[None]], axis=0),
        sent11,
        y_stream,
        marks,
        collective=collective,
        seed=[seed, a_idx, c_idx, 1],
    )
    series = {rule: ratio_series(p, PEERS) for rule, p in lazy["paid"].items()}
    audit_pos = np.flatnonzero(marks)
    games = game_table(
        sent[:, audit_pos],
        y_stream[audit_pos],
        collective,
        merit,
        [seed, a_idx, c_idx, _KEY_SHAPLEY],
    )

    def f_of(target: np.ndarray, shares: dict[str, np.ndarray]) -> dict[str, float]:
        return {rule: round(fairness(target, s), 4) for rule, s in shares.items()}

    return {
        "seed": seed,
        "own_accuracy_eval": [round(float(a), 4) for a in own_acc],
        "contribution_accuracy_eval": [round(float(a), 4) for a in solo],
        "collective_accuracy_eval": round(
            float((decide(vectors[:, evaluation].sum(axis=0)) == y[evaluation]).mean()), 4
        ),
        "collective_accuracy_with_lazy": round(float((lazy["answers"] == y_stream).mean()), 4),
        "merit": [round(float(m), 4) for m in merit],
        "reward_share_paid": {r: [round(float(v), 4) for v in s] for r, s in paid.items()},
        "fairness_paid": f_of(merit, paid),
        "fairness_settled": f_of(merit, settled),
        "fairness_paid_vs_contribution": f_of(contribution, paid),
        "fairness_settled_vs_contribution": f_of(contribution, settled),
        "games": games,
        "final_merit_scores": [round(float(v), 4) for v in honest["final"].scores],
        "final_audit_hits": [int(v) for v in honest["final"].hits],
        "final_shapley": [round(float(v), 4) for v in honest["final"].shapley],
        "lazy_final_merit_score": round(float(lazy["final"].scores[PEERS]), 4),
        "lazy_final_shapley": round(float(lazy["final"].shapley[PEERS]), 4),
        "lazy_rate_ratio": {r: [round(v, 4) for v in s[0]] for r, s in series.items()},
        "lazy_cumulative_ratio": {r: [round(v, 4) for v in s[1]] for r, s in series.items()},
        "audits": int(marks.sum()),
        "audits_by_goal_queries": int(marks[:GOAL_QUERIES].sum()),
        "queries": int(n),
        "evaluation_inputs": int(evaluation.size),
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
    audit, evaluation = split_test(y, seed, a_idx)
    assert np.intersect1d(audit, evaluation).size == 0
    stream = make_stream(
        audit, evaluation, np.random.default_rng(derive_seed(seed, _KEY_STREAM, a_idx))
    )
    out = {}
    for collective in COLLECTIVES:
        sigma = sigma_for(epsilon, RULES[collective].l2_sensitivity or 0.0)
        out[collective] = run_collective(
            collective,
            probs,
            vectors[collective],
            y,
            audit,
            evaluation,
            stream,
            sigma=sigma,
            seeds=(seed, a_idx),
        )
        out[collective]["partition_sizes"] = [int(m.support_y.numel()) for m in peers]
    return out


def at_query(series: list[float], t: int) -> float:
    return float(series[min(t // RATE_BLOCK, len(series)) - 1])


def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    rate = {r: np.mean([s["lazy_rate_ratio"][r] for s in per_seed], axis=0) for r in RULE_NAMES}
    cum = {
        r: np.mean([s["lazy_cumulative_ratio"][r] for s in per_seed], axis=0) for r in RULE_NAMES
    }
    tables = (
        "fairness_paid",
        "fairness_settled",
        "fairness_paid_vs_contribution",
        "fairness_settled_vs_contribution",
    )
    out: dict[str, Any] = {
        t: {r: _ms([s[t][r] for s in per_seed]) for r in RULE_NAMES} for t in tables
    }
    out["per_seed"] = {t: {r: [s[t][r] for s in per_seed] for r in RULE_NAMES} for t in tables}
    out["games_F"] = {g: _ms([s["games"][g]["F"] for s in per_seed]) for g in GAMES}
    out["games_F_per_seed"] = {g: [s["games"][g]["F"] for s in per_seed] for g in GAMES}
    out["tmc_max_abs_error"] = {
        k: round(max(s["games"]["tmc_max_abs_error"][k] for s in per_seed), 5)
        for k in ("truncated", "untruncated")
    }
    out.update(
        {
            "mean_own_accuracy": _ms([float(np.mean(s["own_accuracy_eval"])) for s in per_seed]),
            "collective_accuracy": _ms([s["collective_accuracy_eval"] for s in per_seed]),
            "collective_accuracy_with_lazy": _ms(
                [s["collective_accuracy_with_lazy"] for s in per_seed]
            ),
            "lazy_rate_ratio_mean": {r: [round(float(v), 4) for v in rate[r]] for r in RULE_NAMES},
            "lazy_cumulative_ratio_mean": {
                r: [round(float(v), 4) for v in cum[r]] for r in RULE_NAMES
            },
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
            "max_seed_cumulative_ratio_at_goal": {
                r: round(
                    max(at_query(s["lazy_cumulative_ratio"][r], GOAL_QUERIES) for s in per_seed),
                    4,
                )
                for r in RULE_NAMES
            },
        }
    )
    return out


def _lazy_goal(s: dict[str, Any], rule: str) -> dict[str, Any]:
    series = s["lazy_rate_ratio_mean"][rule]
    rate = s["lazy_at_checkpoints"][rule][str(GOAL_QUERIES)]["rate"]
    worst = s["max_seed_rate_ratio_at_goal"][rule]
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
        "worst_seed_rate_ratio_at_goal_queries": worst,
        "worst_seed_cumulative_ratio_at_goal_queries": s["max_seed_cumulative_ratio_at_goal"][rule],
        "stays_below_from_query": first_below,
        "max_rate_ratio_after_goal_queries": round(
            max(series[GOAL_QUERIES // RATE_BLOCK - 1 :]), 4
        ),
        "met_every_seed": worst < GOAL_RATIO,
        "met_and_stays": first_below is not None and first_below <= GOAL_QUERIES,
    }


def _wins(s: dict[str, Any], table: str, rule: str, rivals: tuple[str, ...]) -> dict[str, Any]:
    per = s["per_seed"][table]
    margins = [round(m - max(per[r][i] for r in rivals), 4) for i, m in enumerate(per[rule])]
    means = {r: s[table][r]["mean"] for r in (rule, *rivals)}
    return {
        "F_mean": means[rule],
        "best_rival_mean": max(means[r] for r in rivals),
        "margin_per_seed": margins,
        "seeds_won": sum(m > 0 for m in margins),
        "seeds": len(margins),
        "met_every_seed": all(m > 0 for m in margins),
    }


def goals(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fairness_goal": (
            f"alpha {GOAL_ALPHA:g}: F(merit) > F of every label-free rule, on every seed"
        ),
        "lazy_goal": (
            f"alpha {GOAL_ALPHA:g}: lazy peer's earning rate under merit < "
            f"{GOAL_RATIO:.0%} of an honest peer's within {GOAL_QUERIES} queries"
        ),
        "headline_collective": HEADLINE,
    }
    for key, res in results.items():
        out[key] = {}
        for collective in COLLECTIVES:
            s = res[collective]["summary"]
            fair: dict[str, Any] = {}
            for table in ("fairness_paid", "fairness_settled"):
                fair[table] = {
                    "vs_label_free_on_network_outputs": _wins(s, table, "merit", LABEL_FREE),
                    "vs_label_free_on_sent_vectors": _wins(s, table, "merit", LABEL_FREE_SENT),
                }
            for table in ("fairness_paid_vs_contribution", "fairness_settled_vs_contribution"):
                fair[table] = {
                    "vs_label_free_on_sent_vectors": _wins(s, table, "merit", LABEL_FREE_SENT)
                }
            out[key][collective] = {
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
    "agreement_sent": "lightsteelblue",
    "entropy_sent": "navajowhite",
}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    keys = list(results)
    fig, axes = plt.subplots(2, len(keys), figsize=(6.0 * len(keys), 9.0), squeeze=False)
    width = 0.38
    for col, key in enumerate(keys):
        ax = axes[0][col]
        lows = []
        for c_idx, collective in enumerate(COLLECTIVES):
            s = results[key][collective]["summary"]
            means = [s["fairness_paid"][r]["mean"] for r in RULE_NAMES]
            lows.append(min(means))
            xs = np.arange(len(RULE_NAMES)) + (c_idx - 0.5) * width
            ax.bar(
                xs,
                means,
                width,
                color=[COLORS[r] for r in RULE_NAMES],
                alpha=1.0 if collective == HEADLINE else 0.5,
                edgecolor="black" if collective == HEADLINE else "none",
            )
            for x, rule in zip(xs, RULE_NAMES, strict=True):
                per = s["per_seed"]["fairness_paid"][rule]
                lows.append(min(per))
                ax.plot([x] * len(per), per, "k.", ms=3)
        ax.set_xticks(range(len(RULE_NAMES)), RULE_NAMES, fontsize=7, rotation=20)
        ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
        ax.set_title(
            f"alpha = {key}: F(paid share, FI merit); dots = seeds\n"
            "(left, outlined: soft collective; right: evidence)",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
        ax2 = axes[1][col]
        for collective, style in zip(COLLECTIVES, ("-", "--"), strict=True):
            s = results[key][collective]["summary"]
            n_blocks = len(s["lazy_rate_ratio_mean"]["merit"])
            qs = [(i + 1) * RATE_BLOCK for i in range(n_blocks)]
            for rule in ("equal", "merit", "shapley", "agreement", "entropy"):
                ax2.plot(
                    qs,
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
        ax2.set_xlabel(
            f"queries ({FRONT_AUDITS} audits in the first {FRONT_QUERIES}, "
            f"{AUDIT_POOL} in all; settled every {SETTLE_EVERY})"
        )
        ax2.set_ylabel("lazy peer pay rate / mean honest peer's")
        ax2.set_title(f"alpha = {key}: a lazy 11th peer (random one-hot answers)", fontsize=9)
        ax2.grid(alpha=0.3)
    axes[1][-1].legend(fontsize=6, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(*, alphas: list[float], seeds: list[int], epsilon: float) -> dict[str, Any]:
    started, cpu0 = time.perf_counter(), time.process_time()
    load_before = _loadavg()
    split = load_digits_split()
    results: dict[str, Any] = {}
    for a_idx, alpha in enumerate(alphas):
        per_seed: dict[str, list[dict[str, Any]]] = {c: [] for c in COLLECTIVES}
        for seed in seeds:
            t0 = time.perf_counter()
            one = run_one(split, alpha, a_idx, seed, epsilon)
            for collective in COLLECTIVES:
                per_seed[collective].append(one[collective])
                f = one[collective]["fairness_paid"]
                log(
                    f"[{time.perf_counter() - started:6.1f}s] alpha {alpha:g} seed {seed} "
                    f"{collective} ({time.perf_counter() - t0:.1f}s): F paid "
                    + " ".join(f"{r} {v:.3f}" for r, v in f.items())
                    + "; lazy rate @200 "
                    + ", ".join(
                        f"{r} {at_query(one[collective]['lazy_rate_ratio'][r], 200):.3f}"
                        for r in ("merit", "agreement", "entropy")
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
                f"{DEFAULT_BANDWIDTH} (fi-peer default); the network output is never sent",
            },
            "headline_collective": HEADLINE,
            "epsilon": "inf" if math.isinf(epsilon) else epsilon,
            "delta": DELTA,
            "data_split": {
                "audit_split": (
                    f"{AUDIT_POOL} test inputs, stratified by label (seeded per alpha and "
                    "seed): the querier's labelled audit queries, each audited once"
                ),
                "evaluation_split": (
                    "the other 250 test inputs: merit p (network accuracy) and contribution "
                    "accuracy are measured here only; disjoint from the audit split"
                ),
            },
            "stream": {
                "queries": f"{PASSES} passes over the evaluation split + {AUDIT_POOL} audits",
                "audit_schedule": (
                    f"{FRONT_AUDITS} audits in the first {FRONT_QUERIES} queries (one per pair, "
                    "random position), the rest one per equal block of the remaining queries"
                ),
                "settle_every": SETTLE_EVERY,
            },
            "hyperparameters": HYPERPARAMETERS,
            "merit_rule": {
                "score": (
                    "Shapley value of the individual-accuracy game = accuracy of the member's "
                    "opened vector decided alone, on the audits so far"
                ),
                "solo_decision": {
                    "soft": "the rule's argmax of the member's probabilities (its answer)",
                    "evidence": (
                        "argmax of E_i(x, y) / (share_i(y) + 0.1), share_i(y) = member's share "
                        "of class y's evidence over the opened audits (label-free): the "
                        "member's class-conditional evidence under the collective's prior"
                    ),
                },
                "shrinkage_pseudo_audits": SHRINKAGE,
                "chance_gate": (
                    f"hits above chance (binomial) at {STRICT_LEVEL}, or collective-accuracy "
                    f"Shapley > 0, or hits above chance at {CHANCE_LEVEL} and Shapley >= -{HARM}"
                ),
            },
            "shapley": {
                "method": "truncated Monte-Carlo, antithetic permutation pairs",
                "permutations": PERMUTATIONS,
                "truncation_tolerance": TOLERANCE,
                "value": "collective accuracy of the coalition's summed vectors on the audits",
                "empty_value": "chance, 1/10",
            },
            "games": {
                "collective_accuracy": "v(S) = accuracy of S's summed vectors; v(0) = 1/10",
                "log_likelihood": (
                    f"v(S) = mean log((1 - {LOGLIK_EPS:g}) q_S(y|x) + {LOGLIK_EPS:g}/10); "
                    "v(0) = log 1/10"
                ),
                "labelled_coverage": "v(S) = share of audits some member of S gets right alone",
                "individual_accuracy": "v(S) = sum of S's members' own audit accuracies",
                "solo_decisions": "as the merit rule's (evidence: class-prior corrected)",
                "F": "of the exact Shapley value on all 200 audits, negatives clipped to 0",
            },
            "price_wei_per_query": PRICE_WEI,
            "merit": "own network accuracy / sum (FI paper); F = 1 - L1(p, r)/2",
            "contribution": (
                "accuracy of the member's sent vector decided alone by the aggregation rule "
                "(raw argmax, no prior correction) on the evaluation split, / sum"
            ),
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
        "load_average_1min": {"start": load_before, "end": _loadavg()},
    }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def format_table(report: dict[str, Any]) -> str:
    lines = ["F = 1 - L1(FI merit, paid share)/2, mean ± std over seeds (settled merit in [])"]
    lines.append("alpha  collective " + "  ".join(f"{c:>14}" for c in RULE_NAMES))
    for key, res in report["results"].items():
        for collective in COLLECTIVES:
            s = res[collective]["summary"]
            f = s["fairness_paid"]
            lines.append(
                f"{key:>5}  {collective:>10} "
                + "  ".join(f"{f[c]['mean']:>6.3f} ± {f[c]['std']:.3f}" for c in RULE_NAMES)
                + f"  [{s['fairness_settled']['merit']['mean']:.3f}]"
            )
    lines.append("exact-Shapley F by game (mean over seeds)")
    for key, res in report["results"].items():
        for collective in COLLECTIVES:
            g = res[collective]["summary"]["games_F"]
            lines.append(
                f"{key:>5}  {collective:>10} "
                + "  ".join(f"{name} {g[name]['mean']:.3f}" for name in GAMES)
            )
    lines.append("lazy peer pay / mean honest pay (rate over the last 10 queries | cumulative)")
    for key, res in report["results"].items():
        for collective in COLLECTIVES:
            cp = res[collective]["summary"]["lazy_at_checkpoints"]
            for rule in ("merit", "shapley", "agreement", "entropy"):
                lines.append(
                    f"{key:>5} {collective:>8} {rule:>9}: "
                    + "  ".join(
                        f"@{t} {v['rate']:.3f}|{v['cumulative']:.3f}" for t, v in cp[rule].items()
                    )
                )
    return "\n".join(lines)


def slim(report: dict[str, Any]) -> dict[str, Any]:
    """The report to write: per seed, the lazy series only at CHECKPOINTS (the
    summaries keep the mean series, which the plot uses)."""
    out = json.loads(json.dumps(report))
    for res in out["results"].values():
        for collective in COLLECTIVES:
            for s in res[collective]["per_seed"]:
                for name in ("lazy_rate_ratio", "lazy_cumulative_ratio"):
                    series = s.pop(name)
                    s[f"{name}_at_checkpoints"] = {
                        r: {str(t): round(at_query(v, t), 4) for t in CHECKPOINTS}
                        for r, v in series.items()
                    }
                    if name == "lazy_rate_ratio":
                        s["lazy_rate_blocks_above_goal_after_goal_queries"] = {
                            r: sum(x >= GOAL_RATIO for x in v[GOAL_QUERIES // RATE_BLOCK :])
                            for r, v in series.items()
                        }
    return out


def dumps(report: dict[str, Any]) -> str:
    """JSON with lists of numbers kept on one line."""
    text = json.dumps(report, indent=2)
    return re.sub(
        r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fairness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--epsilon", type=float, default=math.inf, help="per-query ε (inf: no DP)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if any(a <= 0 or not math.isfinite(a) for a in args.alphas):
        parser.error("alphas must be positive and finite")
    if not (args.epsilon > 0):
        parser.error("epsilon must be positive (inf: no DP)")
    if args.threads < 1:
        parser.error("threads must be >= 1")

    torch.set_num_threads(args.threads)
    report = run(alphas=args.alphas, seeds=args.seeds, epsilon=args.epsilon)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(slim(report)) + "\n")
    if not args.no_plot:
        plot(report, args.out.with_suffix(".png"))
    print(format_table(report))
    print("goals:", json.dumps(report["goals"], indent=2))
    print(f"wall {report['wall_seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
