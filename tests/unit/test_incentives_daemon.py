"""Audit queries through the daemon's control API (in-memory hub, three daemons):
labels are validated, openings are requested after the answer and scored, the
scores are in /v1/status and in scores.json, and `fi-peer status` shows them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from fi_peer.cli import status_tables
from fi_peer.control import ControlError
from fi_peer.models.data import load_digits_split
from tests.unit.test_daemon import DIM, Running, models, trio_of_daemons  # noqa: F401


async def test_audit_queries_are_opened_and_scored(trio_of_daemons: list[Running]) -> None:  # noqa: F811
    a, b, c = trio_of_daemons
    split = load_digits_split()
    x, y = split.X_test[:4].tolist(), [int(v) for v in split.y_test[:4]]
    # members open at most 25 % of their answers to one querier: three plain queries first
    plain = await a.post("/v1/query", {"input": x[:3], "k": 2, "epsilon": 0})
    assert all(r["ok"] and "audit" not in r for r in plain["results"])
    answer = await a.post(
        "/v1/query", {"input": [x[3]], "k": 2, "epsilon": 0, "audit_labels": [y[3]]}
    )
    (result,) = answer["results"]
    assert result["ok"], result["reason"]
    assert result["audit"] == {"label": y[3], "committed": 2, "opened": 2, "refused": {}}

    status: dict[str, Any] = await a.get("/v1/status")
    audits = status["audits"]
    assert audits["reward_rule"] == "equal" and audits["weighted_settlements"] == []
    rows = {row["peer_id"]: row for row in audits["members"]}
    assert set(rows) == {b.daemon.peer_id, c.daemon.peer_id}
    for row in rows.values():
        assert row["audits"] == 1 and row["bad"] == 0 and row["hits"] in (0, 1)
        assert row["shapley"] is not None and row["loo"] is not None
    saved = json.loads(await asyncio.to_thread(Path(a.daemon.config.scores_file).read_text))
    assert {p: m["audits"] for p, m in saved["members"].items()} == dict.fromkeys(rows, 1)
    # a member counts the opening against its allowance: a second audit now is refused
    again = await a.post("/v1/query", {"input": [x[0]], "k": 2, "epsilon": 0, "audit_label": y[0]})
    assert again["results"][0]["audit"]["opened"] == 0
    assert set(again["results"][0]["audit"]["refused"].values()) == {"open_limit"}

    status["peers"] = []
    titles = [str(t.title) for t in status_tables(status)]
    assert any("contribution scores" in t for t in titles)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"audit_label": 10}, "integers in 0..9"),
        ({"audit_label": True}, "integers in 0..9"),
        ({"audit_labels": [1, 2]}, "list of 1 labels"),
        ({"audit_label": 1, "audit_labels": [1]}, "not both"),
        ({"audit_label": 1, "rule": "soft"}, "configured rule"),
    ],
)
async def test_bad_audit_labels_are_refused_with_a_reason(
    trio_of_daemons: list[Running],  # noqa: F811
    body: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(ControlError, match=rf"400.*{message}"):
        await trio_of_daemons[0].post("/v1/query", {"input": [0.0] * DIM, **body})
