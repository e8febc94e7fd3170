"""`fi-peer status` tables for a paid peer (the unpaid path runs against real daemons in
test_metrics_daemon.py), and the wei formatting they use."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from fi_peer.cli import _wei, status_tables

A, B = "a1" * 32, "b2" * 32


def _doc() -> dict[str, Any]:
    return {
        "peer_id": A,
        "name": "alice",
        "net": "lab",
        "pid": 4242,
        "uptime_s": 61.2,
        "transport": {"kind": "libp2p", "addresses": ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWx"],
                      "connected": 1},
        "membership": 1,
        "model": {"task": "digits", "arch": "mlp-64-32-10", "sha256": "ab" * 32},
        "market": {"price_wei": 10**15},
        "queries": {"ok": 4, "failed": 1},
        "answered": 9,
        "privacy": {
            "epsilon_per_query": 2.0,
            "per_querier_epsilon": 20.0,
            "global_epsilon": "inf",
            "global_epsilon_spent": 7.5,
            "global_epsilon_left": "inf",
            "per_querier": [{"peer_id": B, "spent": 7.5, "left": 12.5}],
        },
        "chain": {
            "paid": True,
            "chain_id": 11155111,
            "address": "0x" + "c" * 40,
            "pending_settlements": 2,
            "earnings": {"credited_wei": 6 * 10**15, "withdrawn_wei": 10**15,
                         "balance_wei": 3 * 10**17, "earned_wei": 9 * 10**15},
            "receipts": {"pending": {"count": 3, "wei": 3 * 10**15},
                         "paid": {"count": 6, "wei": 6 * 10**15},
                         "claimed": {"count": 0, "wei": 0}, "lost": {"count": 1, "wei": 10**15}},
            "claimable": {"count": 1, "wei": 10**15},
        },
        "peers": [{"peer_id": B, "connected": True, "last_seen_ms": 1500, "price_wei": 7,
                   "task": "digits", "arch": "mlp-64-32-10", "addresses": ["/ip4/10.0.0.2/tcp/1"]}],
    }  # fmt: skip


def _render(doc: dict[str, Any]) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    for table in status_tables(doc):
        console.print(table)
    return console.export_text()


def test_a_paid_peer_shows_earnings_budget_and_pending_settlements() -> None:
    text = _render(_doc())
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 3}
    assert "9,000,000,000,000,000 wei (0.009 ETH)" in lines["earned"]
    assert "6,000,000,000,000,000 wei (0.006 ETH)" in lines["credited"]
    assert "1,000,000,000,000,000 wei (0.001 ETH)" in lines["withdrawn"]
    assert "300,000,000,000,000,000 wei (0.3 ETH)" in lines["balance"]
    assert "3 not yet seen paid (3,000,000,000,000,000 wei" in lines["receipts kept"]
    assert "1 of them claimable now" in lines["receipts kept"]
    assert "1 (1,000,000,000,000,000 wei" in lines["receipts lost"]
    assert "2 escrowed queries not settled yet" in lines["as querier"]
    assert "4 asked ok, 1 failed; 9 answered for others" in lines["queries"]
    # budget: the global limit is unlimited, the querier has 12.5 of 20 left
    assert "│ all queriers (global) │  7.50 │    inf │   inf │" in text
    assert f"│ {B[:12]}          │  7.50 │  20.00 │ 12.50 │" in text
    assert "/ip4/10.0.0.2/tcp/1" in text and "1.5 s ago" in text


def test_unknown_chain_reads_are_shown_as_unknown() -> None:
    doc = _doc()
    doc["chain"]["earnings"] = {
        "credited_wei": None,
        "balance_wei": None,
        "withdrawn_wei": 0,
        "earned_wei": 0,
        "error": "the chain did not answer in 3 s",
    }
    text = _render(doc)
    assert "the chain did not answer in 3 s" in text
    credited = next(line for line in text.splitlines() if "credited" in line)
    assert "│ ?  (in the escrow" in credited


def test_wei_formatting() -> None:
    assert _wei(0) == "0"
    assert _wei(None) == "?"
    assert _wei(1234) == "1,234 wei (1.234e-15 ETH)"
    assert _wei(2 * 10**18) == "2,000,000,000,000,000,000 wei (2 ETH)"
