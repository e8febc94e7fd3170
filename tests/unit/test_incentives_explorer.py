"""The explorer's view of incentives: published merit scores and slashing (pure ledger)."""

from __future__ import annotations

from tests.explorer.test_ledger import QUERIER, REGISTRY, A, B, _Chain


def test_ledger_keeps_published_scores_and_slashes() -> None:
    c = _Chain()
    ed, x = "0x" + "01" * 32, "0x" + "02" * 32
    c.tx(A, REGISTRY, ("Registered", {"account": A, "ed25519": ed, "x25519": x, "stake": 10}))
    c.tx(
        QUERIER,
        REGISTRY,
        ("ScorePublished", {"querier": QUERIER, "member": A, "scorePpm": 400_000}),
        ("ScorePublished", {"querier": QUERIER, "member": B, "scorePpm": 0}),
    )
    c.tx(B, REGISTRY, ("ScorePublished", {"querier": B, "member": A, "scorePpm": 600_000}))
    again = {"querier": QUERIER, "member": A, "scorePpm": 800_000}
    c.tx(QUERIER, REGISTRY, ("ScorePublished", again))
    ledger = c.ledger()
    assert ledger.accounts[A].scores == {QUERIER: 0.8, B: 0.6}  # the latest per querier
    assert ledger.accounts[A].score == 0.7 and ledger.accounts[B].score == 0.0
    c.tx(
        B,
        REGISTRY,
        (
            "Equivocated",
            {
                "member": A,
                "reporter": B,
                "querier": QUERIER,
                "queryId": "0x" + "11" * 16,
                "slashed": 10,
                "reward": 5,
            },
        ),
    )
    ledger = c.ledger()
    a = ledger.accounts[A]
    assert a.slashed == 10 and a.registration is not None and a.registration.stake == 0
    assert not a.registration.registered and a.history[-1].kind == "slashed"
    assert ledger.problems == []
