"""The persistent privacy budget: limits per querier and global, epochs, idempotent
charges, file mode, and crash survival (a real process killed with SIGKILL)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fi_peer.errors import FiPeerError
from fi_peer.privacy.budget import (
    GLOBAL_EXHAUSTED,
    QUERIER_EXHAUSTED,
    BudgetExceeded,
    BudgetLedger,
    BudgetLimits,
    LedgerError,
)
from fi_peer.privacy.dp import ORDERS, calibrate_sigma, epsilon_spent, rdp_cost

REPO_ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5
DAY = 86_400
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z, the first second of an epoch
COST = rdp_cost(calibrate_sigma(1.0, DELTA, 1.0), 1.0)  # one query at ε = 1


def qid(i: int) -> bytes:
    return i.to_bytes(8, "big")


def accumulate(cost: tuple[float, ...], n: int) -> tuple[float, ...]:
    """n charges of ``cost`` added in order, as the ledger adds them."""
    total = (0.0,) * len(ORDERS)
    for _ in range(n):
        total = tuple(a + b for a, b in zip(total, cost, strict=True))
    return total


def max_affordable(cost: tuple[float, ...], limit: float) -> int:
    """How many charges of ``cost`` fit under ``limit``, by the accountant directly."""
    n = 0
    while epsilon_spent(accumulate(cost, n + 1), DELTA) <= limit:
        n += 1
    return n


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "budget.sqlite"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[BudgetLedger]:
    with BudgetLedger.open(ledger_path, BudgetLimits(3.0, 5.0, DELTA)) as led:
        yield led


# --- limits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_querier_epsilon": -1.0},
        {"global_epsilon": float("nan")},
        {"delta": 0.0},
        {"delta": 1.0},
        {"epoch_s": 0},
        {"epoch_s": 1.5},
    ],
)
def test_limits_validation(kwargs: dict[str, float]) -> None:
    base: dict[str, float] = {"per_querier_epsilon": 1.0, "global_epsilon": 2.0, "delta": DELTA}
    with pytest.raises(ValueError):
        BudgetLimits(**{**base, **kwargs})  # type: ignore[arg-type]


def test_epoch_is_floor_of_time_over_epoch_length() -> None:
    limits = BudgetLimits(1.0, 1.0, DELTA, epoch_s=100)
    assert [limits.epoch(t) for t in (0, 99.9, 100, 250, -1)] == [0, 0, 1, 2, -1]


# --- refusals at the limit ---------------------------------------------------------


def test_per_querier_limit_refuses_exactly_at_the_limit(ledger: BudgetLedger) -> None:
    n = max_affordable(COST, 3.0)
    assert n >= 3  # RDP composes better than adding epsilons
    for i in range(n):
        assert ledger.check("alice", COST, NOW) is None
        assert ledger.charge("alice", qid(i), COST, NOW) is True
    assert ledger.spent("alice", NOW) == epsilon_spent(accumulate(COST, n), DELTA) <= 3.0
    assert ledger.check("alice", COST, NOW) == QUERIER_EXHAUSTED
    with pytest.raises(BudgetExceeded) as info:
        ledger.charge("alice", qid(n), COST, NOW)
    assert info.value.reason == QUERIER_EXHAUSTED
    assert isinstance(info.value, FiPeerError)
    assert not ledger.charged("alice", qid(n))
    assert ledger.spent("alice", NOW) == epsilon_spent(accumulate(COST, n), DELTA)
    # Another querier still has its own budget.
    assert ledger.check("bob", COST, NOW) is None


def test_a_query_at_exactly_the_limit_is_affordable(ledger_path: Path) -> None:
    cost = rdp_cost(calibrate_sigma(2.0, DELTA, 1.0), 1.0)
    with BudgetLedger.open(ledger_path, BudgetLimits(2.0, 2.0, DELTA)) as led:
        assert led.charge("alice", qid(0), cost, NOW)
        assert led.check("alice", cost, NOW) == QUERIER_EXHAUSTED


def test_global_limit_is_shared_by_all_queriers(ledger_path: Path) -> None:
    limits = BudgetLimits(per_querier_epsilon=100.0, global_epsilon=3.0, delta=DELTA)
    n = max_affordable(COST, 3.0)
    with BudgetLedger.open(ledger_path, limits) as led:
        for i in range(n):  # Sybil queriers, one query each
            assert led.charge(f"sybil-{i}", qid(0), COST, NOW)
        assert led.spent(None, NOW) == epsilon_spent(accumulate(COST, n), DELTA)
        assert led.spent("sybil-0", NOW) == epsilon_spent(COST, DELTA) < 100.0
        assert led.check("newcomer", COST, NOW) == GLOBAL_EXHAUSTED
        with pytest.raises(BudgetExceeded) as info:
            led.charge("newcomer", qid(0), COST, NOW)
        assert info.value.reason == GLOBAL_EXHAUSTED


def test_reason_tokens_fit_a_decline_reason() -> None:
    for token in (QUERIER_EXHAUSTED, GLOBAL_EXHAUSTED):
        assert re.fullmatch(r"[a-z_]+", token)


def test_non_private_answers_need_unlimited_budgets(ledger_path: Path) -> None:
    no_dp = rdp_cost(0.0, 1.0)
    with BudgetLedger.open(ledger_path, BudgetLimits(100.0, 100.0, DELTA)) as led:
        assert led.check("alice", no_dp, NOW) == QUERIER_EXHAUSTED
    unlimited = BudgetLimits(float("inf"), float("inf"), DELTA)
    with BudgetLedger.open(ledger_path, unlimited) as led:
        assert led.charge("alice", qid(0), no_dp, NOW)
        assert led.spent("alice", NOW) == float("inf")


def test_epochs_roll_over(ledger: BudgetLedger) -> None:
    end_of_day = NOW + DAY - 0.001
    n = max_affordable(COST, 3.0)
    for i in range(n):
        ledger.charge("alice", qid(i), COST, end_of_day)
    assert ledger.check("alice", COST, end_of_day) == QUERIER_EXHAUSTED
    next_day = NOW + DAY
    assert ledger.spent("alice", next_day) == 0.0
    assert ledger.spent(None, next_day) == 0.0
    assert ledger.check("alice", COST, next_day) is None
    assert ledger.charge("alice", qid(n), COST, next_day)
    assert ledger.spent("alice", end_of_day) == epsilon_spent(accumulate(COST, n), DELTA)


def test_charges_are_idempotent_per_querier_and_query(ledger: BudgetLedger) -> None:
    assert ledger.charge("alice", qid(1), COST, NOW) is True
    assert ledger.charge("alice", qid(1), COST, NOW) is False
    assert ledger.charge("alice", qid(1), COST, NOW + 3 * DAY) is False  # even later
    assert ledger.spent("alice", NOW) == epsilon_spent(COST, DELTA)
    assert ledger.spent("alice", NOW + 3 * DAY) == 0.0
    # The same query id from another querier is another query.
    assert ledger.charge("bob", qid(1), COST, NOW) is True
    assert ledger.spent(None, NOW) == epsilon_spent(accumulate(COST, 2), DELTA)


def test_concurrent_threads_charge_each_query_once(ledger_path: Path) -> None:
    unlimited = BudgetLimits(float("inf"), float("inf"), DELTA)
    with BudgetLedger.open(ledger_path, unlimited) as led:
        results: list[bool] = []

        def worker() -> None:
            for i in range(25):
                results.append(led.charge("alice", qid(i), COST, NOW))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 25
        assert led.spent("alice", NOW) == pytest.approx(epsilon_spent(accumulate(COST, 25), DELTA))


def test_misuse_raises_value_error(ledger: BudgetLedger) -> None:
    with pytest.raises(ValueError, match="31 values"):
        ledger.check("alice", COST[:3], NOW)
    with pytest.raises(ValueError, match="querier"):
        ledger.charge("", qid(0), COST, NOW)
    with pytest.raises(ValueError, match="query_id"):
        ledger.charge("alice", b"", COST, NOW)
    with pytest.raises(ValueError, match="finite"):
        ledger.spent("alice", float("nan"))


# --- the file ---------------------------------------------------------------------


def test_file_mode_is_0600_and_wal(ledger_path: Path) -> None:
    ledger_path.touch(mode=0o644)
    os.chmod(ledger_path, 0o644)
    with BudgetLedger.open(ledger_path, BudgetLimits(3.0, 5.0, DELTA)) as led:
        led.charge("alice", qid(0), COST, NOW)
        wal = ledger_path.with_name(ledger_path.name + "-wal")
        assert wal.exists()
        for path in (ledger_path, wal):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        with sqlite3.connect(ledger_path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_totals_survive_reopening(ledger_path: Path) -> None:
    limits = BudgetLimits(3.0, 5.0, DELTA)
    with BudgetLedger.open(ledger_path, limits) as led:
        led.charge("alice", qid(0), COST, NOW)
        led.charge("bob", qid(0), COST, NOW)
    with BudgetLedger.open(ledger_path, limits) as led:
        assert led.spent("alice", NOW) == epsilon_spent(COST, DELTA)
        assert led.spent(None, NOW) == epsilon_spent(accumulate(COST, 2), DELTA)
        assert led.charge("alice", qid(0), COST, NOW) is False


def test_a_ledger_of_other_orders_is_refused(ledger_path: Path) -> None:
    limits = BudgetLimits(3.0, 5.0, DELTA)
    BudgetLedger.open(ledger_path, limits).close()
    with sqlite3.connect(ledger_path) as raw:
        raw.execute("UPDATE meta SET value = '[2.0, 4.0]' WHERE key = 'orders'")
    with pytest.raises(LedgerError, match="orders"):
        BudgetLedger.open(ledger_path, limits)


def test_unusable_files_raise_ledger_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(LedgerError):
        BudgetLedger.open(junk, BudgetLimits(1.0, 1.0, DELTA))
    with pytest.raises(LedgerError):
        BudgetLedger.open(tmp_path / "missing-dir" / "b.sqlite", BudgetLimits(1.0, 1.0, DELTA))
    led = BudgetLedger.open(tmp_path / "b.sqlite", BudgetLimits(1.0, 1.0, DELTA))
    led.close()
    led.close()
    with pytest.raises(LedgerError, match="closed"):
        led.spent(None, NOW)


# --- crash survival: a real process, SIGKILLed ------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fi_peer.privacy.budget import BudgetLedger, BudgetLimits
    from fi_peer.privacy.dp import calibrate_sigma, rdp_cost

    path, mode, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cost = rdp_cost(calibrate_sigma(1.0, 1e-5, 1.0), 1.0)
    ledger = BudgetLedger.open(path, BudgetLimits(float("inf"), float("inf"), 1e-5))
    if mode == "stall-in-transaction":
        original = BudgetLedger._write_charge

        def stalled(self, *args):
            original(self, *args)  # rows written, COMMIT not yet issued
            print("in-transaction", flush=True)
            time.sleep(60)

        BudgetLedger._write_charge = stalled
    for i in range(count):
        ledger.charge("alice", i.to_bytes(8, "big"), cost, {now})
        print("committed", i, flush=True)
    print("done", flush=True)
    time.sleep(60)
    """
).replace("{now}", repr(NOW))


def spawn(tmp_path: Path, path: Path, mode: str, count: int) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, str(script), str(path), mode, str(count)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


def kill_after(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """Read the child's lines until ``marker``, then SIGKILL it; return the lines."""
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(marker):
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return lines


def reopen(path: Path) -> BudgetLedger:
    return BudgetLedger.open(path, BudgetLimits(float("inf"), float("inf"), DELTA))


def test_charges_committed_before_a_kill_survive_it(tmp_path: Path, ledger_path: Path) -> None:
    lines = kill_after(spawn(tmp_path, ledger_path, "plain", 3), "done")
    assert lines[-1] == "done"
    with reopen(ledger_path) as led:
        assert [led.charged("alice", qid(i)) for i in range(4)] == [True, True, True, False]
        assert led.spent("alice", NOW) == epsilon_spent(accumulate(COST, 3), DELTA)
        assert led.spent(None, NOW) == epsilon_spent(accumulate(COST, 3), DELTA)
        # The restarted daemon retries its last charge before sending: no double charge.
        assert led.charge("alice", qid(2), COST, NOW) is False
        assert led.spent("alice", NOW) == epsilon_spent(accumulate(COST, 3), DELTA)


def test_a_kill_inside_the_transaction_leaves_no_trace(tmp_path: Path, ledger_path: Path) -> None:
    lines = kill_after(spawn(tmp_path, ledger_path, "stall-in-transaction", 3), "in-transaction")
    assert lines == ["in-transaction"]
    with reopen(ledger_path) as led:
        assert not led.charged("alice", qid(0))
        assert led.spent("alice", NOW) == 0.0
        assert led.spent(None, NOW) == 0.0
        assert led.charge("alice", qid(0), COST, NOW) is True  # the retry charges once
        assert led.spent("alice", NOW) == epsilon_spent(COST, DELTA)


def test_a_kill_at_any_moment_keeps_rows_and_totals_consistent(
    tmp_path: Path, ledger_path: Path
) -> None:
    # The child charges as fast as it can; it is killed wherever it happens to be.
    lines = kill_after(spawn(tmp_path, ledger_path, "plain", 100_000), "committed 40")
    reported = sum(1 for line in lines if line.startswith("committed"))
    with reopen(ledger_path) as led:
        charged = 0
        while led.charged("alice", qid(charged)):
            charged += 1
        assert charged >= reported  # it may have committed more before the signal landed
        assert not any(led.charged("alice", qid(i)) for i in range(charged, charged + 50))
        expected = epsilon_spent(accumulate(COST, charged), DELTA)
        assert led.spent("alice", NOW) == expected
        assert led.spent(None, NOW) == expected


def test_charge_many_is_one_commit_with_per_item_outcomes(ledger_path: Path) -> None:
    """Group commit: each item gets what charge() alone would give, in order, and
    all of them are durable once it returns (one transaction, one fsync)."""
    n = max_affordable(COST, 3.0)
    items = [("alice", qid(i), COST, NOW) for i in range(n + 1)]  # the last one is refused
    items.insert(1, ("alice", qid(0), COST, NOW))  # a repeat inside the group: a no-op
    items.append(("", qid(99), COST, NOW))  # an invalid item fails alone
    items.append(("bob", qid(0), COST, NOW))
    with BudgetLedger.open(ledger_path, BudgetLimits(3.0, 50.0, DELTA)) as led:
        out = led.charge_many(items)
    assert out[0] is True and out[1] is False
    assert out[2 : n + 1] == [True] * (n - 1)
    assert isinstance(out[n + 1], BudgetExceeded) and out[n + 1].reason == QUERIER_EXHAUSTED
    assert isinstance(out[n + 2], ValueError)
    assert out[n + 3] is True
    with BudgetLedger.open(ledger_path, BudgetLimits(3.0, 50.0, DELTA)) as again:
        assert all(again.charged("alice", qid(i)) for i in range(n))
        assert not again.charged("alice", qid(n))
        assert again.charged("bob", qid(0))
        assert again.spent("alice", NOW) == epsilon_spent(accumulate(COST, n), DELTA)
