"""Load: paid queries from 3 queriers against 8 ``fi-peer run`` daemons over
libp2p with anvil, through the code of ``benchmarks/load.py`` (which runs the
full 1,000 and writes benchmarks/results/load.json).

Asserts the benchmark's invariants (``benchmarks.load.violations`` is empty)
and, explicitly, the figures behind them: every query answered or failed with
a reason, every escrowed query settled with what its querier reported,
balances conserved to the wei, every member's withdrawals equal to its
credits, and no daemon's RSS or open file descriptors growing past the
tolerance between the sample after warm-up and the one after settlement.

``FI_LOAD_QUERIES`` sets the number of queries. The default is 120: 200 took
3 min 14 s on the 2-core development machine, too much of the suite's 15
minutes next to the fault tests; the full 1,000
(``FI_LOAD_QUERIES=1000``, what ``python -m benchmarks.load`` runs) took 7 to
12 minutes there (5 to 8 min of queries at 2.1 to 3.4 queries/s, with load
averages of 10 to 35 from other jobs, plus 0.5 to 1 min to start 8 daemons):
too long for the suite's budget.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load import LoadSettings, run_load
from tests.chain.conftest import require_anvil

# the module's one network serves every test: the first one to run pays for it
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

QUERIES = int(os.environ.get("FI_LOAD_QUERIES", "120"))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_anvil()
    folder = tmp_path_factory.mktemp("load")
    settings = LoadSettings(queries=QUERIES, folder=folder / "net")
    return run_load(settings)


def test_load_invariants_hold(report: dict[str, Any]) -> None:
    assert report["violations"] == [], report["violations"]


def test_every_query_answered_or_failed_with_a_reason(report: dict[str, Any]) -> None:
    q = report["queries"]
    assert q["sent"] == QUERIES == q["answered"] + q["failed"]
    assert q["without_reason"] == 0
    assert sum(q["failures_by_reason"].values()) == q["failed"]
    assert all(reason and reason != "None" for reason in q["failures_by_reason"])
    assert set(q["by_querier"]) == {"peer-0", "peer-1", "peer-2"}
    # the network answers under load, not only fails cleanly (how many depends on
    # the machine: on a 2-core box shared with other work, most time out)
    assert q["answered"] >= 1, q
    assert report["throughput"]["queries_per_s"] > 0


def test_every_escrowed_query_is_settled_and_the_wei_add_up(report: dict[str, Any]) -> None:
    st, wei = report["settlement"], report["wei"]
    rows = [r for r in report["query_rows"] if r["escrow_wei"] is not None]
    assert rows and all(r["escrow_wei"] for r in rows)
    assert st["unsettled"] == [] and st["failed"] == 0 and st["error"] is None
    assert st["escrowed_queries"] == st["settled_queries"] == len(rows)
    for row in rows:
        shares, paid = report["chain_settled"][row["query_id"]]
        assert (shares, paid) == (row["delivered"], row["delivered"] * row["price_wei"]), row
    assert all(r["escrow_wei"] is not None for r in report["query_rows"] if r["ok"])
    assert wei["escrowed"] == wei["escrowed_reported_by_queriers"] > 0
    assert wei["escrowed"] == wei["paid"] + wei["refunded"] + wei["held"]
    assert wei["paid"] == wei["paid_by_settlements"]  # no claims: all settled in time
    assert wei["escrow_balance"] == wei["escrowed"] - wei["withdrawn"]
    for name, member in wei["by_member"].items():
        assert member["withdrawn"] == member["credited"] + member["refunded"], name
        assert member["withdrawn_metric"] == member["withdrawn"], name
    assert wei["withdrawn"] == sum(m["withdrawn"] for m in wei["by_member"].values())


def test_no_daemon_grows_memory_or_file_descriptors(report: dict[str, Any]) -> None:
    tolerance = report["tolerance"]
    assert len(report["daemons"]) == 8
    for name, d in report["daemons"].items():
        assert d["rss_mib_end"] - d["rss_mib_start"] <= tolerance["rss_mib"], (name, d)
        assert d["fds_end"] - d["fds_start"] <= tolerance["fds"], (name, d)


def test_no_daemon_logged_a_traceback(report: dict[str, Any]) -> None:
    logs = sorted(Path(report["folder"]).glob("net/logs/*.log"))
    assert len(logs) == 8
    for log in logs:
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, f"{log.name}:\n{text[-3000:]}"
