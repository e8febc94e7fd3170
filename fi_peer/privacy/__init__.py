"""Privacy at inference time: secure aggregation, distributed DP noise, budgets.

Public surface (explicit; each module documents its own)::

    # dp.py: distributed Gaussian noise, calibration, RDP accounting, clipping
    ORDERS, PrivacySpec, calibrate_sigma, rdp_cost, epsilon_spent,
    member_noise_std, add_member_noise
    # budget.py: the persistent per-querier / global RDP ledger
    BudgetLimits, BudgetLedger, BudgetExceeded
    # secagg.py: dropout-robust secure aggregation (Bonawitz et al. 2017)
    Aggregator, MaskingMember, Participant, Channel, SecAggError
    # shamir.py: Shamir secret sharing over GF(2**521 - 1)
    shamir (the module)
"""

from __future__ import annotations

from fi_peer.privacy import shamir
from fi_peer.privacy.budget import BudgetExceeded, BudgetLedger, BudgetLimits
from fi_peer.privacy.dp import (
    ORDERS,
    PrivacySpec,
    add_member_noise,
    calibrate_sigma,
    epsilon_spent,
    member_noise_std,
    rdp_cost,
)
from fi_peer.privacy.secagg import Aggregator, Channel, MaskingMember, Participant, SecAggError

__all__ = [
    "ORDERS",
    "Aggregator",
    "BudgetExceeded",
    "BudgetLedger",
    "BudgetLimits",
    "Channel",
    "MaskingMember",
    "Participant",
    "PrivacySpec",
    "SecAggError",
    "add_member_noise",
    "calibrate_sigma",
    "epsilon_spent",
    "member_noise_std",
    "rdp_cost",
    "shamir",
]
