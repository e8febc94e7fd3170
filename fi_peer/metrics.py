"""Prometheus text exposition (format 0.0.4) for the daemon's ``/metrics``, without a dependency.

A :class:`Registry` holds counters, gauges and histograms, each a family of
series told apart by labels. Values that other parts already count (the
protocol core's ``metrics`` Counter, the settler's, the budget ledger) are
copied in by the daemon just before rendering; only latencies are observed
here directly. Label values are escaped as the format requires; the number of
series per family is capped (``MAX_SERIES``: further label sets go to
``reason="other"``-style overflow), so a hostile peer cannot grow the output
by inventing reasons.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAX_SERIES = 64
# Seconds: a query over memory takes ~15 ms, over libp2p ~60-200 ms; deadlines are <= 110 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 110.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


@dataclass
class _Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    label_names: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    values: dict[Labels, float] = field(default_factory=dict)
    hist: dict[Labels, list[float]] = field(default_factory=dict)  # bucket counts, sum, count

    def key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        key = tuple((n, str(labels[n])) for n in self.label_names)
        store = self.hist if self.kind == "histogram" else self.values
        if key not in store and len(store) >= MAX_SERIES:
            key = tuple((n, "other") for n in self.label_names)
        return key


class Registry:
    """Metric families in registration order; :meth:`render` gives the exposition text."""

    def __init__(self, prefix: str = "fi_peer_") -> None:
        self.prefix = prefix
        self._families: dict[str, _Family] = {}

    def _family(
        self, name: str, kind: str, help: str, labels: Sequence[str], buckets: Sequence[float] = ()
    ) -> _Family:
        full = self.prefix + name
        family = self._families.get(full)
        if family is None:
            family = _Family(full, kind, help, tuple(labels), tuple(sorted(buckets)))
            self._families[full] = family
        elif family.kind != kind or family.label_names != tuple(labels):
            raise ValueError(f"{full} is already a {family.kind} with labels {family.label_names}")
        return family

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self._family(name, "counter", help, labels)

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self._family(name, "gauge", help, labels)

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self._family(name, "histogram", help, labels, buckets)

    def _get(self, name: str, kinds: Iterable[str]) -> _Family:
        family = self._families.get(self.prefix + name)
        if family is None or family.kind not in kinds:
            raise KeyError(f"no {'/'.join(kinds)} {self.prefix + name} registered")
        return family

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge, or a counter copied from a count kept elsewhere."""
        family = self._get(name, ("counter", "gauge"))
        family.values[family.key(labels)] = float(value)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        family = self._get(name, ("counter", "gauge"))
        if family.kind == "counter" and amount < 0:
            raise ValueError("a counter only goes up")
        key = family.key(labels)
        family.values[key] = family.values.get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        family = self._get(name, ("histogram",))
        key = family.key(labels)
        row = family.hist.setdefault(key, [0.0] * (len(family.buckets) + 2))
        i = bisect_left(family.buckets, value)  # le: the first bucket >= value
        if i < len(family.buckets):
            row[i] += 1
        row[-2] += value
        row[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 if never set): for tests and status."""
        family = self._get(name, ("counter", "gauge"))
        return family.values.get(tuple((n, str(labels[n])) for n in family.label_names), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            if family.kind != "histogram":
                if not family.values and not family.label_names:
                    lines.append(f"{family.name} 0")
                for key, value in sorted(family.values.items()):
                    lines.append(f"{family.name}{_labels(key)} {_number(value)}")
                continue
            for key, row in sorted(family.hist.items()):
                cumulative = 0.0
                for bound, count in zip(family.buckets, row, strict=False):
                    cumulative += count
                    le = (("le", _number(bound)),)
                    lines.append(f"{family.name}_bucket{_labels(key, le)} {_number(cumulative)}")
                inf = (("le", "+Inf"),)
                lines.append(f"{family.name}_bucket{_labels(key, inf)} {_number(row[-1])}")
                lines.append(f"{family.name}_sum{_labels(key)} {_number(row[-2])}")
                lines.append(f"{family.name}_count{_labels(key)} {_number(row[-1])}")
        return "\n".join(lines) + "\n"


# -- the daemon's metrics ------------------------------------------------------------------

# Prefixes of the protocol core's Counter keys, and the labelled families they feed.
_CORE_FAMILIES = (
    ("rejected.", "messages_rejected_total", "reason"),
    ("accepted.", "messages_accepted_total", "kind"),
    ("late.", "messages_late_total", "kind"),
    ("responder.declined.", "queries_refused_total", "reason"),
    ("responder.refused.", "queries_refused_total", "reason"),
    ("declined.", "declines_received_total", "reason"),
)


class PeerMetrics:
    """The daemon's ``/metrics``: latencies observed here, everything else copied in
    from the counts the core, the transport, the ledger and the settler keep."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        r.counter("queries_total", "Queries this peer asked, by outcome.", ["outcome"])
        r.counter(
            "query_failures_total", "Queries this peer asked that failed, by reason.", ["reason"]
        )
        r.histogram(
            "query_latency_seconds",
            "Queries asked through the control API: wall time at the daemon.",
            ["outcome"],
        )
        r.histogram(
            "query_protocol_latency_seconds",
            "Queries asked: request to outcome, inside the protocol.",
            ["outcome"],
        )
        r.counter("queries_answered_total", "Queries this peer answered for others (receipts).")
        r.counter(
            "queries_refused_total",
            "Queries this peer declined or refused to answer, by reason.",
            ["reason"],
        )
        r.counter("declines_received_total", "Declines this peer received as querier.", ["reason"])
        r.counter("messages_accepted_total", "Messages accepted, by kind.", ["kind"])
        r.counter(
            "messages_rejected_total", "Messages rejected and dropped, by reason.", ["reason"]
        )
        r.counter("messages_late_total", "Valid messages for a finished session.", ["kind"])
        r.counter("protocol_events_total", "Other counts of the protocol core.", ["event"])
        r.gauge("peers_known", "Peers in the membership table.")
        r.gauge("peers_connected", "Peers with a live transport connection.")
        r.counter("transport_events_total", "Transport counters (drops, reconnects...).", ["event"])
        r.gauge("privacy_epsilon_spent", "Epsilon spent in the current epoch, by all queriers.")
        r.gauge("privacy_epsilon_budget", "Epsilon budget per epoch.", ["scope"])
        r.gauge(
            "wei_earned",
            "Wei of the receipts kept, by state (pending, paid, claimed, lost).",
            ["state"],
        )
        r.counter("wei_withdrawn_total", "Wei this daemon withdrew from the escrow since start.")
        r.counter("settlement_events_total", "Settlement counters (batches, claims...).", ["event"])
        r.gauge("settlements_pending", "Paid queries asked, escrowed, not settled yet.")
        r.gauge("uptime_seconds", "Seconds since the daemon started.")

    def observe_query(self, ok: bool, wall_s: float, protocol_s: float) -> None:
        outcome = "ok" if ok else "failed"
        self.registry.observe("query_latency_seconds", wall_s, outcome=outcome)
        self.registry.observe("query_protocol_latency_seconds", protocol_s, outcome=outcome)

    def render(
        self,
        *,
        core: dict[str, int],
        transport: dict[str, int],
        peers_known: int,
        peers_connected: int,
        uptime_s: float,
        epsilon_spent: float | None = None,
        budgets: dict[str, float] | None = None,
        wei_by_state: dict[str, int] | None = None,
        settler: dict[str, int] | None = None,
        settlements_pending: int = 0,
    ) -> str:
        r = self.registry
        refused: dict[str, float] = {}
        for outcome in ("ok", "failed"):  # present from the start: rate() needs a first sample
            r.set("queries_total", core.get(f"queries.{outcome}", 0), outcome=outcome)
        for key, value in core.items():
            if key in ("queries.ok", "queries.failed"):
                r.set("queries_total", value, outcome=key.removeprefix("queries."))
                continue
            if key == "accepted.receipt":
                r.set("queries_answered_total", value)
            for prefix, family, label in _CORE_FAMILIES:
                if key.startswith(prefix):
                    name = key.removeprefix(prefix)
                    if family == "queries_refused_total":
                        refused[name] = refused.get(name, 0) + value
                    else:
                        r.set(family, value, **{label: name})
                    break
            else:
                if key == "charge.refused":
                    refused["budget"] = refused.get("budget", 0) + value
                else:
                    r.set("protocol_events_total", value, event=key)
        for reason, count in refused.items():
            r.set("queries_refused_total", count, reason=reason)
        for key, value in transport.items():
            r.set("transport_events_total", value, event=key)
        r.set("peers_known", peers_known)
        r.set("peers_connected", peers_connected)
        r.set("uptime_seconds", round(uptime_s, 3))
        if epsilon_spent is not None:
            r.set("privacy_epsilon_spent", epsilon_spent)
        for scope, budget in (budgets or {}).items():
            r.set("privacy_epsilon_budget", budget, scope=scope)
        for state, wei in (wei_by_state or {}).items():
            r.set("wei_earned", wei, state=state)
        for key, n in (settler or {}).items():
            if key == "withdrawn_wei":
                r.set("wei_withdrawn_total", n)
            else:
                r.set("settlement_events_total", n, event=key)
        r.set("settlements_pending", settlements_pending)
        return r.render()

    def count_failure(self, reason: str) -> None:
        self.registry.inc("query_failures_total", reason=reason or "unknown")
