"""Aggregation rules: what each member sends, and what the querier makes of the sum.

Theory of operation
-------------------
Secure aggregation reveals to the querier only the SUM of the committee
members' vectors (plus DP noise). A rule is therefore two pure functions:

* member side, :meth:`AggregationRule.member_vector`: a member's class
  probabilities ``p_i(y|x)`` (and, for evidence rules, its evidence head)
  -> a fixed-length vector per input;
* querier side, :meth:`AggregationRule.decide`: the summed vector -> a label
  and a probability-like distribution over the classes.

Rules (``C`` classes; vector length in brackets):

``vote`` [C]      one-hot of the member's argmax; the sum is the vote histogram.
``soft`` [C]      the probabilities; the sum / n_members is the mean posterior.
``entropy`` [C+1] ``[w p, w]`` with ``w = exp(-H(p))`` in [1/C, 1]: confident
                  members weigh more (the FI paper's entropy-weighted vote).
``evidence`` [C]  per class, the member's bounded Parzen evidence
                  ``E_i(x, y) = sum_{j: y_j = y} exp(-|x - x_j|^2 / 2h^2)`` over
                  its own training points. The sum is the pooled data's Parzen
                  estimate of ``N p(x, y)``, so the collective behaves like one
                  model trained on everybody's data, even on non-IID splits.
``gated`` [C+1]   ``[K_i p_i, K_i]`` with ``K_i(x) = sum_y E_i(x, y)`` (how much
                  the member's data covers x): a density-gated soft vote.
``support`` [2C]  ``[n_i(y) p_i(y|x), n_i(y)]``: each member's posterior for y
                  weighted by how many examples of y it trained on.

Privacy: what DP protects and each rule's sensitivity
----------------------------------------------------
DP protects the owners' TRAINING DATA (DESIGN.md threat model). Neighbouring
relation: two worlds differ in ONE training record of ONE owner, added or
removed (dp-accounting's ``ADD_OR_REMOVE_ONE``); every owner accounts for its
own data in its own ledger. Seen from that owner, one query releases
``v_i(x; D_i) + (others' vectors) + N(0, σ² I)``: the Gaussian mechanism on its
own vector, so σ is calibrated to ``l2_sensitivity`` =
``max ||v_i(x; D) - v_i(x; D')||`` over neighbouring ``D ~ D'`` and all x.

============  ===========  ============  =======================================
rule          add/remove   replace-one   why, and what the guarantee covers
============  ===========  ============  =======================================
``vote``      √2           √2            the vector is a one-hot whatever the
                                         data: any two differ by at most √2
``soft``      √2           √2            a point of the probability simplex
                                         (enforced by :func:`to_simplex`),
                                         diameter √2
``entropy``   √2           √2            ``[w p, w]``, p in the simplex, w in
                                         [0, 1]: ``||wp - w'p'||² + (w - w')²
                                         <= w² + w'² + (w - w')² <= 2``
``evidence``  1            √2            one record adds one kernel value in
                                         (0, 1] to one class coordinate;
                                         replacing it moves two coordinates
``gated``     unbounded    unbounded     ``K p``: K grows with the data and one
                                         record may flip the network's p
``support``   unbounded    unbounded     same with ``n(y) p``
============  ===========  ============  =======================================

The network-output rules (``vote``, ``soft``, ``entropy``) are bounded the
PATE way: NOT because one record moves the network little (nothing bounds
that without DP training) but because the member's whole vector lives in a
set of diameter √2. The bound therefore holds for ANY two training sets of
the owner: their guarantee is owner-level (all of an owner's records at once),
at the price of noise sized for a whole member's answer. ``evidence`` is
record-level: its bound comes from the evidence head (a bounded kernel sum
over the owner's points, :class:`fi_peer.models.zoo.OwnerModel`), so an
owner's k near-identical records are protected as a group of k (ε grows
accordingly). ``l2_sensitivity`` is the add/remove value the accountant uses;
``replace_one_sensitivity`` the replace-one value, for owners who prefer that
relation (the DESIGN.md histogram figure √2). ``None``: unbounded, refused
under DP (``private_vector`` raises).

:meth:`AggregationRule.private_vector` is the member side under DP: it maps the
probabilities onto the simplex and clips the vector into the set whose
diameter is the stated sensitivity, so a sloppy model (unnormalised scores,
rounding) cannot exceed it. :meth:`AggregationRule.decide_confident_batch`
(:func:`decide_confident`) is the querier side with abstention: it answers
only when the top noisy score clears a threshold. Both are post-processing
of one noisy release, so abstaining costs nothing extra and saves nothing
either (the whole noisy vector was revealed). Hyperparameters: the kernel
width h is one public value per task (the model card's bandwidth), chosen on
a validation split or public data, never on the test set
(benchmarks/privacy.py picks it per ε by cross-validation on the training
split).

``decide`` tolerates noisy sums: negative or non-finite scores are clipped to
0 in the distribution (uniform when nothing positive is left); the label is
the argmax of the raw scores (lowest index on ties).

This module is pure numpy (no torch), so the protocol, the DP layer and the
querier can use it without loading a model. Misuse (unknown rule, wrong shapes,
missing evidence) raises ``ValueError``; adapters such as the model runtime
translate it into the fi-peer error tree.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fi_peer.privacy.dp import clip_coordinates, to_simplex

__all__ = [
    "ABSTAIN",
    "DEFAULT_PRIVATE_RULE",
    "RULES",
    "AggregationRule",
    "Evidence",
    "decide",
    "decide_confident",
    "get_rule",
    "member_vector",
    "private_member_vector",
    "sum_member_vectors",
]

ABSTAIN = -1
"""Label of :meth:`AggregationRule.decide_confident_batch` for "no confident answer"."""

DEFAULT_PRIVATE_RULE = "evidence"
"""The rule to use under DP: bounded record-level sensitivity and, on the digits
benchmark, the only rule near the pooled model's accuracy at ε <= 2
(benchmarks/results/privacy.json)."""

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Evidence:
    """A member's evidence head evaluated on a batch of n inputs.

    ``parzen``: (n, C) bounded Parzen evidence per class (see module docs).
    ``class_counts``: (C,) number of the member's training examples per class.
    """

    parzen: npt.ArrayLike | None = None
    class_counts: npt.ArrayLike | None = None


def _as_matrix(values: npt.ArrayLike, what: str, n_cols: int | None = None) -> Array:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array, got shape {arr.shape}")
    if n_cols is not None and arr.shape[1] != n_cols:
        raise ValueError(f"{what} must have {n_cols} columns, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinity")
    return arr


def _normalize(scores: Array) -> Array:
    """Rows of scores -> distributions: negatives/non-finite to 0, uniform if empty."""
    clipped = np.where(np.isfinite(scores) & (scores > 0), scores, 0.0)
    totals = clipped.sum(axis=1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / clipped.shape[1])
    safe = np.where(totals > 0, totals, 1.0)
    return np.where(totals > 0, clipped / safe, uniform)


def _ratio(numerator: Array, denominator: Array) -> Array:
    """numerator / denominator where the denominator is positive, else the numerator."""
    positive = np.isfinite(denominator) & (denominator > 0)
    return np.where(positive, numerator / np.where(positive, denominator, 1.0), numerator)


class AggregationRule(ABC):
    """One way of turning member outputs into a summable vector and back."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_parzen: ClassVar[bool] = False
    needs_counts: ClassVar[bool] = False
    l2_sensitivity: ClassVar[float | None]
    """Add/remove-one-record L2 sensitivity of a member's vector (None: unbounded)."""
    replace_one_sensitivity: ClassVar[float | None]
    """The same under replace-one-record neighbouring."""
    privacy_unit: ClassVar[str | None]
    """What the DP guarantee covers: "owner" (all of an owner's records), "record", or None."""

    # Vector layout: ``blocks`` runs of C values, then ``extra`` scalars.
    blocks: ClassVar[int] = 1
    extra: ClassVar[int] = 0

    @property
    def needs_evidence(self) -> bool:
        return self.needs_parzen or self.needs_counts

    @property
    def dp_bounded(self) -> bool:
        """True when one training record moves a member's vector by a bounded amount."""
        return self.l2_sensitivity is not None

    def vector_length(self, n_classes: int) -> int:
        """Length of the vector each member sends for ``n_classes`` classes."""
        if n_classes < 2:
            raise ValueError(f"need at least 2 classes, got {n_classes}")
        return self.blocks * n_classes + self.extra

    def n_classes(self, vector_length: int) -> int:
        """Inverse of :meth:`vector_length`."""
        n, rest = divmod(vector_length - self.extra, self.blocks)
        if rest or n < 2:
            raise ValueError(f"rule {self.name!r}: no class count gives length {vector_length}")
        return n

    def member_vector(self, probs: npt.ArrayLike, evidence: Evidence | None = None) -> Array:
        """(n, C) probabilities (+ evidence) -> (n, vector_length(C)) float64 vectors."""
        p = _as_matrix(probs, "probs")
        n, n_cls = p.shape
        if n_cls < 2:
            raise ValueError(f"probs must have at least 2 columns, got {n_cls}")
        if np.any(p < 0):
            raise ValueError("probs must be non-negative")
        parzen: Array | None = None
        counts: Array | None = None
        if self.needs_parzen:
            if evidence is None or evidence.parzen is None:
                raise ValueError(f"rule {self.name!r} needs Parzen evidence")
            parzen = _as_matrix(evidence.parzen, "evidence.parzen", n_cls)
            if parzen.shape[0] != n or np.any(parzen < 0):
                raise ValueError("evidence.parzen must be (n, C) and non-negative")
        if self.needs_counts:
            if evidence is None or evidence.class_counts is None:
                raise ValueError(f"rule {self.name!r} needs class counts")
            counts = _as_matrix(np.reshape(evidence.class_counts, (1, -1)), "class_counts", n_cls)
            if np.any(counts < 0):
                raise ValueError("class_counts must be non-negative")
        out = self._encode(p, parzen, counts)
        assert out.shape == (n, self.vector_length(n_cls))
        return out

    def private_vector(self, probs: npt.ArrayLike, evidence: Evidence | None = None) -> Array:
        """:meth:`member_vector` under DP: probabilities mapped onto the simplex,
        the result clipped into the set whose diameter is ``l2_sensitivity``.

        ValueError for a rule without a bounded sensitivity.
        """
        if self.l2_sensitivity is None:
            raise ValueError(f"rule {self.name!r} has unbounded sensitivity: not usable with DP")
        p = _as_matrix(probs, "probs")
        if np.any(p < 0):
            raise ValueError("probs must be non-negative")
        return self._enforce(self.member_vector(to_simplex(p), evidence))

    def _enforce(self, vectors: Array) -> Array:
        """Clip member vectors (built from simplex rows) into the rule's bounded set."""
        return vectors

    def decide(self, sum_vector: npt.ArrayLike) -> tuple[int, Array]:
        """The summed vector of all members -> (label, distribution over classes)."""
        arr = np.asarray(sum_vector, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"sum_vector must be 1-D, got shape {arr.shape}")
        labels, dists = self.decide_batch(arr[None, :])
        return int(labels[0]), dists[0]

    def decide_batch(self, sums: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], Array]:
        """Row-wise :meth:`decide`: (n, L) sums -> (n,) labels, (n, C) distributions."""
        arr = np.asarray(sums, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"sums must be a 2-D array, got shape {arr.shape}")
        if np.any(np.isnan(arr)):
            raise ValueError("sums contain NaN")
        scores = self._scores(arr, self.n_classes(arr.shape[1]))
        ranked = np.where(np.isfinite(scores), scores, -np.inf)
        return np.argmax(ranked, axis=1).astype(np.int64), _normalize(scores)

    def decide_confident_batch(
        self, sums: npt.ArrayLike, threshold: float
    ) -> npt.NDArray[np.int64]:
        """Row-wise labels, or :data:`ABSTAIN` where the top score is below ``threshold``.

        The score is the one :meth:`decide` ranks by: noisy votes for ``vote``,
        summed probabilities for ``soft``, the weighted mean probability for
        ``entropy``, summed kernel evidence for ``evidence`` (PATE's confident
        GNMax answers when the noisy top vote clears T, e.g. half the committee).
        """
        t = float(threshold)
        if math.isnan(t):
            raise ValueError("threshold must not be NaN")
        arr = np.asarray(sums, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"sums must be a 2-D array, got shape {arr.shape}")
        if np.any(np.isnan(arr)):
            raise ValueError("sums contain NaN")
        scores = self._scores(arr, self.n_classes(arr.shape[1]))
        ranked = np.where(np.isfinite(scores), scores, -np.inf)
        labels = np.argmax(ranked, axis=1).astype(np.int64)
        top = ranked[np.arange(ranked.shape[0]), labels]
        out: npt.NDArray[np.int64] = np.where(top >= t, labels, ABSTAIN).astype(np.int64)
        return out

    @abstractmethod
    def _encode(self, probs: Array, parzen: Array | None, counts: Array | None) -> Array:
        """Member side, on validated inputs."""

    @abstractmethod
    def _scores(self, sums: Array, n_classes: int) -> Array:
        """Querier side: (n, L) sums -> (n, C) unnormalised class scores."""


class VoteRule(AggregationRule):
    name = "vote"
    description = "hard vote: one-hot of each member's argmax"
    l2_sensitivity = math.sqrt(2.0)
    replace_one_sensitivity = math.sqrt(2.0)
    privacy_unit = "owner"

    def _encode(self, probs: Array, parzen: Array | None, counts: Array | None) -> Array:
        out = np.zeros_like(probs)
        out[np.arange(probs.shape[0]), np.argmax(probs, axis=1)] = 1.0
        return out

    def _scores(self, sums: Array, n_classes: int) -> Array:
        return sums


class SoftRule(AggregationRule):
    name = "soft"
    description = "soft vote: mean of the members' probabilities"
    l2_sensitivity = math.sqrt(2.0)
    replace_one_sensitivity = math.sqrt(2.0)
    privacy_unit = "owner"

    def _encode(self, probs: Array, parzen: Array | None, counts: Array | None) -> Array:
        return probs.copy()

    def _scores(self, sums: Array, n_classes: int) -> Array:
        return sums


def _entropy_weight(probs: Array) -> Array:
    logs = np.log(np.where(probs > 0, probs, 1.0))
    entropy: Array = -(probs * logs).sum(axis=1)
    return np.exp(-entropy)


class EntropyRule(AggregationRule):
    name = "entropy"
    description = "entropy-weighted soft vote: [w p, w], w = exp(-H(p))"
    # [w p, w] with p in the simplex and w in [0, 1]: two such vectors differ by
    # at most sqrt(w² + w'² + (w - w')²) <= sqrt(2) (module docstring).
    l2_sensitivity = math.sqrt(2.0)
    replace_one_sensitivity = math.sqrt(2.0)
    privacy_unit = "owner"
    extra = 1

    def _encode(self, probs: Array, parzen: Array | None, counts: Array | None) -> Array:
        w = _entropy_weight(probs)[:, None]
        return np.hstack([w * probs, w])

    def _enforce(self, vectors: Array) -> Array:
        # w = exp(-H) may round a hair above 1; clip [w p, w] into [0, 1] (p <= 1).
        return clip_coordinates(vectors, 0.0, 1.0)

    def _scores(self, sums: Array, n_classes: int) -> Array:
        return _ratio(sums[:, :n_classes], sums[:, n_classes:])


class EvidenceRule(AggregationRule):
    name = "evidence"
    description = "bounded Parzen evidence per class (sum = pooled Parzen joint)"
    needs_parzen = True
    l2_sensitivity = 1.0
    replace_one_sensitivity = math.sqrt(2.0)
    privacy_unit = "record"

    def _encode(self, probs: Array, parzen: Array | None, counts: Array | None) -> Array:
        assert parzen is not None
        return parzen.copy()

    def _scores(self, sums: Array, n_classes: int) -> Array:
        return sums


class GatedRule(AggregationRule):
    name = "gated"
    description = "density-gated soft vote: [K p, K], K = total Parzen evidence"
    needs_parzen = True
    l2_sensitivity = None
    replace_one_sensitivity = None
    privacy_unit = None
    extra = 1

    def _encode(self, probs: Array, parzen: Array | None, counts: Array | None) -> Array:
        assert parzen is not None
        k = parzen.sum(axis=1, keepdims=True)
        return np.hstack([k * probs, k])

    def _scores(self, sums: Array, n_classes: int) -> Array:
        return _ratio(sums[:, :n_classes], sums[:, n_classes:])


class SupportRule(AggregationRule):
    name = "support"
    description = "label support: [n(y) p(y|x), n(y)]"
    needs_counts = True
    l2_sensitivity = None
    replace_one_sensitivity = None
    privacy_unit = None
    blocks = 2

    def _encode(self, probs: Array, parzen: Array | None, counts: Array | None) -> Array:
        assert counts is not None
        weights = np.broadcast_to(counts, probs.shape)
        return np.hstack([weights * probs, weights])

    def _scores(self, sums: Array, n_classes: int) -> Array:
        numerator, denominator = sums[:, :n_classes], sums[:, n_classes:]
        positive = denominator > 0
        return np.where(positive, numerator / np.where(positive, denominator, 1.0), 0.0)


RULES: Mapping[str, AggregationRule] = MappingProxyType(
    {
        rule.name: rule
        for rule in (
            VoteRule(),
            SoftRule(),
            EntropyRule(),
            EvidenceRule(),
            GatedRule(),
            SupportRule(),
        )
    }
)


def get_rule(rule: str | AggregationRule) -> AggregationRule:
    """Look a rule up by name (a rule object is returned as is)."""
    if isinstance(rule, AggregationRule):
        return rule
    try:
        return RULES[rule]
    except KeyError:
        known = ", ".join(sorted(RULES))
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {known}") from None


def member_vector(
    probs: npt.ArrayLike, evidence: Evidence | None, rule: str | AggregationRule
) -> Array:
    """Member side of ``rule``: (n, C) probabilities (+ evidence) -> (n, L) vectors."""
    return get_rule(rule).member_vector(probs, evidence)


def decide(sum_vector: npt.ArrayLike, rule: str | AggregationRule) -> tuple[int, Array]:
    """Querier side of ``rule``: summed vector -> (label, distribution)."""
    return get_rule(rule).decide(sum_vector)


def private_member_vector(
    probs: npt.ArrayLike, evidence: Evidence | None, rule: str | AggregationRule
) -> Array:
    """Member side of ``rule`` under DP (:meth:`AggregationRule.private_vector`):
    the clipped vector whose L2 sensitivity is ``rule.l2_sensitivity``; add the
    noise share (``fi_peer.privacy.dp.add_member_noise``) to THIS vector."""
    return get_rule(rule).private_vector(probs, evidence)


def decide_confident(
    sum_vector: npt.ArrayLike, rule: str | AggregationRule, threshold: float
) -> int | None:
    """Querier side with abstention: the label, or None when the top (noisy)
    score is below ``threshold`` (see :meth:`AggregationRule.decide_confident_batch`)."""
    arr = np.asarray(sum_vector, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"sum_vector must be 1-D, got shape {arr.shape}")
    label = int(get_rule(rule).decide_confident_batch(arr[None, :], threshold)[0])
    return None if label == ABSTAIN else label


def sum_member_vectors(vectors: Iterable[npt.ArrayLike]) -> Array:
    """Plaintext stand-in for secure aggregation: the exact, order-free sum.

    Each coordinate is summed with :func:`math.fsum` (correctly rounded), so the
    result does not depend on the members' order, like the fixed-point modular
    sum the secure aggregation computes. Vectors may be 1-D (one query) or 2-D
    (a batch); all must have the same shape.
    """
    arrays = [np.asarray(v, dtype=np.float64) for v in vectors]
    if not arrays:
        raise ValueError("need at least one member vector")
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError("member vectors must all have the same shape")
    stacked = np.stack([a.reshape(-1) for a in arrays], axis=1)
    return np.array([math.fsum(row) for row in stacked], dtype=np.float64).reshape(shape)
