"""The owner's privacy budget: a persistent RDP ledger per querier and global.

Theory of operation
-------------------
Every answer a member sends costs RDP (:func:`fi_peer.privacy.dp.rdp_cost`,
one value per order of :data:`~fi_peer.privacy.dp.ORDERS`). RDP composes by
addition, so the ledger keeps, per epoch (``floor(now_s / epoch_s)``), the
summed RDP vector of each querier and of all queriers together, and converts
a sum to ε at the owner's δ only when it compares it with a limit. A charge
is refused when the querier's sum, or the global sum, plus the new cost would
exceed its ε limit; the per-querier limit bounds what one querier learns, the
global one what Sybil queriers learn together (DESIGN.md, threat model).

Order of operations in the member (issue 5): ``check`` when deciding an
Offer (a refusal reason goes into the protocol's ``Decline``), ``charge``
right before the noisy share leaves. ``charge`` is one sqlite transaction
(``BEGIN IMMEDIATE`` … ``COMMIT``, WAL, ``synchronous=FULL``), so after a crash
it either happened completely (charge row and both totals) or not at all; a
retried charge for the same ``(querier, query_id)`` is a no-op returning
False, so "charge, crash, restart, charge again, send" charges once. A share
is never sent without its charge; a charge may exist for a share that was
never sent (crash in between): the owner loses that budget, never privacy.

File: created with mode 0600 (sqlite gives its -wal and -shm files the same
mode). Tables: ``meta`` (schema version, the RDP orders), ``charges`` (one row
per charged query; the primary key makes charges idempotent), ``querier_totals``
and ``global_totals`` (RDP vectors as little-endian float64 blobs). Old epochs'
rows are kept (history for audits; pruning is future work).

Errors: :class:`BudgetExceeded` (a charge that would exceed a limit; carries a
``reason`` token) and :class:`LedgerError` (the file cannot be used: sqlite
errors, another schema or other RDP orders). Both derive from
:class:`~fi_peer.errors.FiPeerError`. Methods are safe to call from several
threads (one lock; e.g. the daemon's ``asyncio.to_thread``), and several
processes may share a file (sqlite's locking; totals are read inside the
write transaction).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fi_peer.errors import FiPeerError
from fi_peer.privacy.dp import ORDERS, check_rdp, epsilon_spent

__all__ = [
    "GLOBAL_EXHAUSTED",
    "QUERIER_EXHAUSTED",
    "BudgetExceeded",
    "BudgetLedger",
    "BudgetLimits",
    "LedgerError",
]

QUERIER_EXHAUSTED = "querier_budget_exhausted"
GLOBAL_EXHAUSTED = "global_budget_exhausted"

SCHEMA_VERSION = 1
_MAX_QUERIER_LEN = 256
_MAX_QUERY_ID_LEN = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charges (
    querier    TEXT    NOT NULL,
    query_id   BLOB    NOT NULL,
    epoch      INTEGER NOT NULL,
    charged_at REAL    NOT NULL,
    epsilon    REAL    NOT NULL,  -- this charge alone, at the ledger's delta (for audits)
    PRIMARY KEY (querier, query_id)
);
CREATE TABLE IF NOT EXISTS querier_totals (
    querier TEXT    NOT NULL,
    epoch   INTEGER NOT NULL,
    rdp     BLOB    NOT NULL,
    PRIMARY KEY (querier, epoch)
);
CREATE TABLE IF NOT EXISTS global_totals (
    epoch INTEGER PRIMARY KEY,
    rdp   BLOB    NOT NULL
);
"""


class BudgetExceeded(FiPeerError):
    """A charge would take the querier's or the global ε past its limit.

    ``reason`` is :data:`QUERIER_EXHAUSTED` or :data:`GLOBAL_EXHAUSTED`.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LedgerError(FiPeerError):
    """The ledger file cannot be opened, read or written."""


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """An owner's ε limits per epoch (``inf``: unlimited) at one δ."""

    per_querier_epsilon: float
    global_epsilon: float
    delta: float
    epoch_s: int = 86_400

    def __post_init__(self) -> None:
        for name in ("per_querier_epsilon", "global_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or math.isnan(float(value)) or float(value) < 0:
                raise ValueError(f"{name} must be >= 0 (inf: unlimited), got {value!r}")
        if not 0 < float(self.delta) < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta!r}")
        if isinstance(self.epoch_s, bool) or not isinstance(self.epoch_s, int) or self.epoch_s < 1:
            raise ValueError(f"epoch_s must be an int >= 1, got {self.epoch_s!r}")

    def epoch(self, now_s: float) -> int:
        """The epoch of ``now_s`` (seconds since the Unix epoch)."""
        t = float(now_s)
        if not math.isfinite(t):
            raise ValueError(f"now_s must be finite, got {now_s!r}")
        return math.floor(t / self.epoch_s)


def _pack(rdp: Sequence[float]) -> bytes:
    return np.asarray(rdp, dtype="<f8").tobytes()


def _unpack(blob: bytes) -> tuple[float, ...]:
    if len(blob) != 8 * len(ORDERS):
        raise LedgerError("stored RDP vector has the wrong length")
    return tuple(float(x) for x in np.frombuffer(blob, dtype="<f8"))


def _add(a: Sequence[float], b: Sequence[float]) -> tuple[float, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


_ZERO = tuple(0.0 for _ in ORDERS)


def _check_querier(querier: str) -> str:
    if not isinstance(querier, str) or not querier or len(querier) > _MAX_QUERIER_LEN:
        raise ValueError(f"querier must be a non-empty str of at most {_MAX_QUERIER_LEN} chars")
    return querier


def _check_query_id(query_id: bytes) -> bytes:
    if not isinstance(query_id, bytes) or not query_id or len(query_id) > _MAX_QUERY_ID_LEN:
        raise ValueError(f"query_id must be non-empty bytes of at most {_MAX_QUERY_ID_LEN}")
    return query_id


class _Charge(NamedTuple):
    """One checked charge, as :meth:`BudgetLedger.charge_many` writes it."""

    querier: str
    query_id: bytes
    rdp: tuple[float, ...]
    epoch: int
    now_s: float


def _create_private(path: Path) -> None:
    """Create ``path`` (if missing) with mode 0600 and tighten an existing one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class BudgetLedger:
    """Per-querier and global RDP spent per epoch, in a sqlite file. Build with :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, limits: BudgetLimits, path: Path) -> None:
        """Wrap an open, initialised connection; use :meth:`open`."""
        self._conn = conn
        self._limits = limits
        self._path = path
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, path: Path, limits: BudgetLimits) -> BudgetLedger:
        """Open (creating if needed, mode 0600) the ledger at ``path``."""
        path = Path(path)
        try:
            _create_private(path)
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot open budget ledger {path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"budget ledger {path}: WAL mode refused ({mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            cls._check_meta(conn, path)
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"cannot initialise budget ledger {path}: {exc}") from exc
            raise
        return cls(conn, limits, path)

    @staticmethod
    def _check_meta(conn: sqlite3.Connection, path: Path) -> None:
        expected = {"schema": str(SCHEMA_VERSION), "orders": json.dumps(list(ORDERS))}
        stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        for key, value in expected.items():
            if key not in stored:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            elif stored[key] != value:
                raise LedgerError(
                    f"budget ledger {path} was written with another {key} "
                    f"({stored[key][:60]}); refusing to mix"
                )

    # --- public API -------------------------------------------------------------

    @property
    def limits(self) -> BudgetLimits:
        return self._limits

    @property
    def path(self) -> Path:
        return self._path

    def check(self, querier: str, cost: Sequence[float], now_s: float) -> str | None:
        """None if ``querier`` can afford ``cost`` now, else a reason token
        (:data:`QUERIER_EXHAUSTED` or :data:`GLOBAL_EXHAUSTED`)."""
        _check_querier(querier)
        rdp = check_rdp(cost)
        epoch = self._limits.epoch(now_s)
        with self._locked() as conn:
            return self._refusal(conn, querier, rdp, epoch)

    def charge(self, querier: str, query_id: bytes, cost: Sequence[float], now_s: float) -> bool:
        """Record ``cost`` for ``(querier, query_id)`` in one transaction.

        True if charged now; False if that query was charged before (no-op).
        Raises :class:`BudgetExceeded` (nothing written) if it would exceed a
        limit. Returns only after the commit is durable.
        """
        (outcome,) = self.charge_many([(querier, query_id, cost, now_s)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def charge_many(
        self, items: Sequence[tuple[str, bytes, Sequence[float], float]]
    ) -> list[bool | BudgetExceeded | ValueError]:
        """Several charges ``(querier, query_id, cost, now_s)``, group-committed.

        Each item's outcome is what :meth:`charge` would return or raise for it
        alone, in order (a later item sees the earlier ones' spending): True,
        False (charged before), or the BudgetExceeded / ValueError it would
        raise (that item writes nothing). All of them are in ONE transaction,
        so one commit and one fsync (``synchronous=FULL``) make the whole group
        durable, and this returns only after that commit: a caller that sends
        the answers afterwards never sends one whose charge a crash could
        forget. A sqlite failure raises LedgerError and charges none of them.
        """
        parsed: list[_Charge | ValueError] = []
        for querier, query_id, cost, now_s in items:
            try:
                parsed.append(
                    _Charge(
                        _check_querier(querier),
                        _check_query_id(query_id),
                        check_rdp(cost),
                        self._limits.epoch(now_s),
                        float(now_s),
                    )
                )
            except ValueError as exc:
                parsed.append(exc)
        out: list[bool | BudgetExceeded | ValueError] = []
        with self._locked() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for item in parsed:
                        out.append(item if isinstance(item, ValueError) else self._one(conn, item))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise LedgerError(f"budget ledger {self._path}: charge failed: {exc}") from exc
        return out

    def _one(self, conn: sqlite3.Connection, charge: _Charge) -> bool | BudgetExceeded:
        """One charge inside the caller's transaction (nothing written unless True)."""
        querier, query_id, rdp, epoch, _ = charge
        seen = conn.execute(
            "SELECT 1 FROM charges WHERE querier = ? AND query_id = ?", (querier, query_id)
        ).fetchone()
        if seen is not None:
            return False
        reason = self._refusal(conn, querier, rdp, epoch)
        if reason is not None:
            return BudgetExceeded(
                reason,
                f"charging query {query_id.hex()} of {querier} would exceed "
                f"the {'per-querier' if reason == QUERIER_EXHAUSTED else 'global'}"
                " privacy budget",
            )
        self._write_charge(conn, charge)
        return True

    def charged(self, querier: str, query_id: bytes) -> bool:
        """Whether ``(querier, query_id)`` has been charged (in any epoch)."""
        with self._locked() as conn:
            row = conn.execute(
                "SELECT 1 FROM charges WHERE querier = ? AND query_id = ?",
                (_check_querier(querier), _check_query_id(query_id)),
            ).fetchone()
        return row is not None

    def spent(self, querier: str | None, now_s: float) -> float:
        """ε spent in the epoch of ``now_s`` by ``querier`` (None: by everybody)."""
        epoch = self._limits.epoch(now_s)
        with self._locked() as conn:
            rdp = (
                self._global_total(conn, epoch)
                if querier is None
                else self._querier_total(conn, _check_querier(querier), epoch)
            )
        return epsilon_spent(rdp, self._limits.delta)

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> BudgetLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise LedgerError(f"budget ledger {self._path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise LedgerError(f"budget ledger {self._path}: {exc}") from exc

    @staticmethod
    def _querier_total(conn: sqlite3.Connection, querier: str, epoch: int) -> tuple[float, ...]:
        row = conn.execute(
            "SELECT rdp FROM querier_totals WHERE querier = ? AND epoch = ?", (querier, epoch)
        ).fetchone()
        return _ZERO if row is None else _unpack(row[0])

    @staticmethod
    def _global_total(conn: sqlite3.Connection, epoch: int) -> tuple[float, ...]:
        row = conn.execute("SELECT rdp FROM global_totals WHERE epoch = ?", (epoch,)).fetchone()
        return _ZERO if row is None else _unpack(row[0])

    def _refusal(
        self, conn: sqlite3.Connection, querier: str, rdp: tuple[float, ...], epoch: int
    ) -> str | None:
        limits, delta = self._limits, self._limits.delta
        if limits.per_querier_epsilon < math.inf:
            after = _add(self._querier_total(conn, querier, epoch), rdp)
            if epsilon_spent(after, delta) > limits.per_querier_epsilon:
                return QUERIER_EXHAUSTED
        if limits.global_epsilon < math.inf:
            after = _add(self._global_total(conn, epoch), rdp)
            if epsilon_spent(after, delta) > limits.global_epsilon:
                return GLOBAL_EXHAUSTED
        return None

    def _write_charge(self, conn: sqlite3.Connection, charge: _Charge) -> None:
        """The writes of one charge; the caller's transaction commits them."""
        querier, query_id, rdp, epoch, now_s = charge
        conn.execute(
            "INSERT INTO charges (querier, query_id, epoch, charged_at, epsilon) "
            "VALUES (?, ?, ?, ?, ?)",
            (querier, query_id, epoch, now_s, epsilon_spent(rdp, self._limits.delta)),
        )
        conn.execute(
            "INSERT INTO querier_totals (querier, epoch, rdp) VALUES (?, ?, ?) "
            "ON CONFLICT (querier, epoch) DO UPDATE SET rdp = excluded.rdp",
            (querier, epoch, _pack(_add(self._querier_total(conn, querier, epoch), rdp))),
        )
        conn.execute(
            "INSERT INTO global_totals (epoch, rdp) VALUES (?, ?) "
            "ON CONFLICT (epoch) DO UPDATE SET rdp = excluded.rdp",
            (epoch, _pack(_add(self._global_total(conn, epoch), rdp))),
        )
