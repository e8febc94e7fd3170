"""Load: 1,000 paid queries from 3 queriers against 8 ``fi-peer run`` daemons
over libp2p with anvil, through the code of ``benchmarks/load.py`` (issue 10,
part 4; the benchmark writes benchmarks/results/load.json from the same run).

Asserts the benchmark's invariants (``benchmarks.load.violations`` is empty)
and, explicitly, the figures behind them: every query answered or failed with
a reason, at least :data:`MIN_ANSWERED` of them answered, every escrowed query
settled with what its querier reported, balances conserved to the wei, every
member's withdrawals equal to its credits (and to its own metric), and no
daemon's RSS or open file descriptors growing past the tolerance between the
sample after the warm-up and the one after settlement.

Cost: one network for the module (8 daemons + anvil, ~30 s to start), the
queries at 4-6 per second on 2 cores (3 queriers, each with 4 queries in
flight: one control-API request of 4 inputs, run concurrently by the
daemon), ~5 s to settle. Measured on the 2-core development machine: 197 s
for the module with load averages of 7-15 (the 120-query version it replaces:
59 s), 270 s at 13-15. The per-transaction gas readout of the benchmark
(10-30 s) is skipped here. ``FI_LOAD_QUERIES`` sets another count (e.g. 100
for a quick local run).

Before the 1,000 fitted here (2026-11): a fixed 1 s key-share window failed
~40 % of the queries under load (``too_few_key_shares``), and every member
re-read and re-decoded all its pending receipts each claim round on its event
loop (O(receipts) per second), so the run slowed as it went (7-12 min).
"""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load import LoadSettings, run_load
from tests.chain.conftest import require_anvil

# the module's one network serves every test: the first one to run pays for it
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

QUERIES = int(os.environ.get("FI_LOAD_QUERIES", "1000"))
# Answered share floor. Measured: 1000/1000 with a load average of ~17 from other
# jobs; a failure must still be a counted reason (asserted below), never a hang.
MIN_ANSWERED = 0.95


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_anvil()
    # minutes are expected here: no all-threads dump at the suite's 120 s mark
    # (pytest-timeout's 1500 s still ends, and dumps, a run that hangs)
    faulthandler.cancel_dump_traceback_later()
    folder = tmp_path_factory.mktemp("load")
    settings = LoadSettings(queries=QUERIES, folder=folder / "net", gas=False)
    return run_load(settings)


def test_load_invariants_hold(report: dict[str, Any]) -> None:
    assert report["violations"] == [], report["violations"]
    assert report["readout_errors"] == {}


def test_every_query_answered_or_failed_with_a_reason(report: dict[str, Any]) -> None:
    q = report["queries"]
    assert q["sent"] == QUERIES == q["answered"] + q["failed"]
    assert q["without_reason"] == 0
    assert sum(q["failures_by_reason"].values()) == q["failed"]
    assert all(reason and reason != "None" for reason in q["failures_by_reason"])
    assert set(q["by_querier"]) == {"peer-0", "peer-1", "peer-2"}
    assert min(q["by_querier"].values()) >= QUERIES // 3 - 4  # the queriers load evenly
    assert q["answered"] >= MIN_ANSWERED * QUERIES, q
    assert report["throughput"]["answered_per_s"] > 0


def test_every_escrowed_query_is_settled_and_the_wei_add_up(report: dict[str, Any]) -> None:
    st, wei = report["settlement"], report["wei"]
    rows = [r for r in report["query_rows"] if r["escrow_wei"] is not None]
    assert rows and all(r["escrow_wei"] for r in rows)
    assert st["unsettled"] == [] and st["failed"] == 0 and st["error"] is None
    assert st["escrowed_queries"] == st["settled_queries"] == len(rows)
    for row in rows:
        shares, paid = report["chain_settled"][row["query_id"]]
        assert (shares, paid) == (row["delivered"], row["delivered"] * row["price_wei"]), row
    # every answered query was escrowed, and settled paying at least t of its committee
    answered = [r for r in report["query_rows"] if r["ok"]]
    assert len(answered) == report["queries"]["answered"] + report["queries"]["warmup_answered"]
    for row in answered:
        assert row["escrow_wei"] is not None and row["price_wei"], row
        committee = row["escrow_wei"] // row["price_wei"]
        assert row["delivered"] >= committee // 2 + 1, row
    assert wei["escrowed"] == wei["escrowed_reported_by_queriers"] > 0
    assert wei["escrowed"] == wei["paid"] + wei["refunded"] + wei["held"]
    assert wei["paid"] == wei["paid_by_settlements"]  # no claims: all settled in time
    assert wei["escrow_balance"] == wei["escrowed"] - wei["withdrawn"]
    assert wei["withdrawn"] == wei["paid"] + wei["refunded"]  # the members took it all
    for name, member in wei["by_member"].items():
        assert member["withdrawn"] == member["credited"] + member["refunded"], name
        assert member["withdrawn_metric"] == member["withdrawn"], name
    assert wei["withdrawn"] == sum(m["withdrawn"] for m in wei["by_member"].values())


def test_no_daemon_grows_memory_or_file_descriptors(report: dict[str, Any]) -> None:
    tolerance = report["tolerance"]
    samples = report["samples"]
    assert samples[0]["at"] == "after warm-up" and samples[-1]["at"].startswith("end")
    assert len(samples) >= 5  # the trend in between is in the report
    assert len(report["daemons"]) == 8
    for name, d in report["daemons"].items():
        assert d["rss_mib_start"] > 0 and d["fds_start"] > 0
        assert d["rss_mib_end"] - d["rss_mib_start"] <= tolerance["rss_mib"], (name, d)
        assert d["fds_end"] - d["fds_start"] <= tolerance["fds"], (name, d)
        # no fd leak hides in the middle of the run either
        assert max(s["fds"][name] for s in samples) <= d["fds_start"] + 2 * tolerance["fds"]


def test_no_daemon_logged_a_traceback(report: dict[str, Any]) -> None:
    logs = sorted(Path(report["folder"]).glob("net/logs/*.log"))
    assert len(logs) == 8
    for log in logs:
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, f"{log.name}:\n{text[-3000:]}"
