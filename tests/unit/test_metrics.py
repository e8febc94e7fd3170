"""Prometheus exposition (fi_peer.metrics): exact text, labels, histograms, the daemon's mapping."""

from __future__ import annotations

import re

import pytest

from fi_peer.metrics import MAX_SERIES, PeerMetrics, Registry


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample line of an exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_counters_gauges_and_help_lines() -> None:
    r = Registry(prefix="t_")
    r.counter("hits_total", "Hits.", ["path"])
    r.gauge("temperature", "Degrees.")
    r.inc("hits_total", path="/a")
    r.inc("hits_total", 2, path="/a")
    r.set("temperature", 21.5)
    text = r.render()
    assert "# HELP t_hits_total Hits.\n# TYPE t_hits_total counter\n" in text
    assert "# TYPE t_temperature gauge\n" in text
    assert _samples(text) == {'t_hits_total{path="/a"}': 3.0, "t_temperature": 21.5}
    assert r.value("hits_total", path="/a") == 3.0
    with pytest.raises(ValueError, match="only goes up"):
        r.inc("hits_total", -1, path="/a")
    with pytest.raises(ValueError, match="takes labels"):
        r.inc("hits_total", reason="x")
    with pytest.raises(KeyError):
        r.set("nope", 1)


def test_an_unlabelled_family_without_samples_reads_zero() -> None:
    r = Registry(prefix="t_")
    r.counter("events_total", "Events.")
    assert _samples(r.render()) == {"t_events_total": 0.0}


def test_label_values_are_escaped() -> None:
    r = Registry(prefix="t_")
    r.counter("c_total", "C.", ["reason"])
    r.inc("c_total", reason='say "hi"\\\n')
    assert 't_c_total{reason="say \\"hi\\"\\\\\\n"} 1' in r.render()


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    r = Registry(prefix="t_")
    r.histogram("latency_seconds", "L.", ["outcome"], buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        r.observe("latency_seconds", value, outcome="ok")
    s = _samples(r.render())
    assert s['t_latency_seconds_bucket{outcome="ok",le="0.1"}'] == 2  # 0.1 is <= 0.1
    assert s['t_latency_seconds_bucket{outcome="ok",le="1"}'] == 3
    assert s['t_latency_seconds_bucket{outcome="ok",le="+Inf"}'] == 4
    assert s['t_latency_seconds_count{outcome="ok"}'] == 4
    assert s['t_latency_seconds_sum{outcome="ok"}'] == pytest.approx(3.65)


def test_label_sets_are_capped_so_peers_cannot_grow_the_output() -> None:
    r = Registry(prefix="t_")
    r.counter("c_total", "C.", ["reason"])
    for i in range(MAX_SERIES + 10):
        r.inc("c_total", reason=f"r{i}")
    s = _samples(r.render())
    assert len(s) == MAX_SERIES + 1
    assert s['t_c_total{reason="other"}'] == 10


def test_peer_metrics_map_the_core_counters_to_families() -> None:
    m = PeerMetrics()
    m.observe_query(True, 0.03, 0.02)
    m.observe_query(False, 2.0, 1.9)
    m.count_failure("timeout")
    text = m.render(
        core={
            "queries.ok": 5,
            "queries.failed": 1,
            "accepted.receipt": 7,
            "accepted.announce": 40,
            "rejected.bad_signature": 3,
            "rejected.replay": 2,
            "responder.declined.budget_exhausted": 4,
            "responder.refused.inconsistent": 1,
            "charge.refused": 2,
            "membership.expired": 1,
        },
        transport={"dropped_inbound": 6},
        peers_known=4,
        peers_connected=3,
        uptime_s=12.5,
        epsilon_spent=3.25,
        budgets={"global": 200.0, "per_querier": float("inf")},
        wei_by_state={"pending": 2000, "paid": 5000, "claimed": 0, "lost": 0},
        settler={"withdrawn_wei": 4000, "settle.batches": 2},
        settlements_pending=3,
    )
    s = _samples(text)
    p = "fi_peer_"
    assert s[p + 'queries_total{outcome="ok"}'] == 5
    assert s[p + 'queries_total{outcome="failed"}'] == 1
    assert s[p + 'query_failures_total{reason="timeout"}'] == 1
    assert s[p + "queries_answered_total"] == 7
    assert s[p + 'queries_refused_total{reason="budget_exhausted"}'] == 4
    assert s[p + 'queries_refused_total{reason="inconsistent"}'] == 1
    assert s[p + 'queries_refused_total{reason="budget"}'] == 2
    assert s[p + 'messages_rejected_total{reason="bad_signature"}'] == 3
    assert s[p + 'messages_rejected_total{reason="replay"}'] == 2
    assert s[p + 'messages_accepted_total{kind="announce"}'] == 40
    assert s[p + 'protocol_events_total{event="membership.expired"}'] == 1
    assert s[p + 'transport_events_total{event="dropped_inbound"}'] == 6
    assert (s[p + "peers_known"], s[p + "peers_connected"]) == (4, 3)
    assert s[p + "privacy_epsilon_spent"] == 3.25
    assert s[p + 'privacy_epsilon_budget{scope="per_querier"}'] == float("inf")
    assert s[p + 'wei_earned{state="paid"}'] == 5000
    assert s[p + "wei_withdrawn_total"] == 4000
    assert s[p + 'settlement_events_total{event="settle.batches"}'] == 2
    assert s[p + "settlements_pending"] == 3
    assert s[p + 'query_latency_seconds_bucket{outcome="ok",le="0.05"}'] == 1
    assert s[p + 'query_latency_seconds_bucket{outcome="failed",le="1"}'] == 0
    assert s[p + 'query_latency_seconds_bucket{outcome="failed",le="2.5"}'] == 1
    assert 'privacy_epsilon_budget{scope="per_querier"} +Inf' in text
    # every sample line is valid exposition: name{labels} value
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{.*\})? \S+", line), line
