"""The discrete-event simulator (fi_peer.simulate): deterministic, convergent, and honest
about loss and churn. Small runs (N = 20, ~10 s virtual) of about a second each."""

from __future__ import annotations

import pytest

from fi_peer.simulate import SimConfig, SimReport, format_report, simulate

BASE = SimConfig(n=20, seed=7, duration_s=10.0, warmup_s=3.5, query_rate=3.0, k=5)


def _run(**changes: object) -> SimReport:
    fields = {**{f: getattr(BASE, f) for f in BASE.__dataclass_fields__}, **changes}
    return simulate(SimConfig(**fields))


@pytest.fixture(scope="module")
def baseline() -> SimReport:
    return _run()


def test_deterministic_for_a_seed(baseline: SimReport) -> None:
    again = _run()
    assert again.outcomes == baseline.outcomes
    assert (again.events, again.membership_converged_s) == (
        baseline.events,
        baseline.membership_converged_s,
    )
    assert again.gossip_per_peer_s == baseline.gossip_per_peer_s
    assert again.direct_per_peer_s == baseline.direct_per_peer_s
    other = _run(seed=8)
    assert other.outcomes != baseline.outcomes


def test_membership_converges_for_20_peers(baseline: SimReport) -> None:
    assert baseline.membership_converged_s is not None
    # Cold start: start spread (1 s) + one announce interval (2 s) + a few hops.
    assert baseline.membership_converged_s <= 3.5
    assert baseline.membership_coverage == 1.0


def test_queries_succeed_without_faults(baseline: SimReport) -> None:
    assert baseline.queries >= 10
    assert baseline.success_rate == 1.0
    assert baseline.failures == {}
    # A private query is 7 one-way hops of 20-80 ms after the request's gossip.
    assert 140 <= baseline.latency_ms["p50"] <= 1500
    assert baseline.unhandled_effects == {}
    assert "queries ok / submitted" in format_report(baseline)


def test_gossip_is_deduplicated_fan_out(baseline: SimReport) -> None:
    # Each first copy is forwarded to ~degree-1 neighbours: duplicates exist but stay bounded.
    ratio = baseline.gossip_per_peer_s / baseline.gossip_delivered_per_peer_s
    assert 1.5 < ratio < BASE.degree + 1


def _ended(report: SimReport) -> None:
    assert report.queries == len(report.outcomes)
    assert "no_outcome" not in report.failures


def test_every_query_ends(baseline: SimReport) -> None:
    _ended(baseline)


def test_loss_reduces_success(baseline: SimReport) -> None:
    lossy = _run(loss=0.25)
    _ended(lossy)
    assert lossy.success_rate < baseline.success_rate
    assert lossy.failures


def test_churn_reduces_success(baseline: SimReport) -> None:
    churny = _run(churn_per_s=3.0)
    _ended(churny)
    assert churny.peers_left > 10 and churny.peers_joined == churny.peers_left
    assert churny.success_rate < baseline.success_rate
    assert churny.failures
    # Churn stops at duration_s; the drain that follows lets heartbeats catch up.
    assert churny.membership_coverage == pytest.approx(1.0, abs=0.1)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        SimConfig(n=2)
    with pytest.raises(ValueError):
        SimConfig(loss=1.0)
