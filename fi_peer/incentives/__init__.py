"""Incentives: contribution scores over opened audit answers, and reward rules.

:mod:`fi_peer.incentives.merit` scores each member by the accuracy of its
own opened audit answers (the FI paper's merit, estimated);
:mod:`fi_peer.incentives.scores` values coalitions of members by their
collective accuracy on audit queries and computes leave-one-out and
(truncated Monte-Carlo) Shapley scores; :mod:`fi_peer.incentives.rewards`
turns scores (or, for comparison, the FI paper's label-free rules) into
reward shares and exact wei amounts, and measures fairness. Both are pure
numpy: no torch, no I/O, no clock; randomness only from a caller's seed.
"""

from __future__ import annotations

from fi_peer.incentives.merit import accuracy_merit, audit_hits, binomial_critical
from fi_peer.incentives.rewards import (
    REWARD_RULES,
    agreement_shares,
    allocate,
    entropy_shares,
    entropy_weights,
    equal_shares,
    fairness,
    merit_from_accuracy,
    merit_shares,
    normalize,
)
from fi_peer.incentives.scores import (
    CoalitionAccuracy,
    Decider,
    Distribution,
    ValueFunction,
    exact_shapley,
    leave_one_out,
    monte_carlo_shapley,
)

__all__ = [
    "REWARD_RULES",
    "CoalitionAccuracy",
    "Decider",
    "Distribution",
    "ValueFunction",
    "accuracy_merit",
    "agreement_shares",
    "allocate",
    "audit_hits",
    "binomial_critical",
    "entropy_shares",
    "entropy_weights",
    "equal_shares",
    "exact_shapley",
    "fairness",
    "leave_one_out",
    "merit_from_accuracy",
    "merit_shares",
    "monte_carlo_shapley",
    "normalize",
]
