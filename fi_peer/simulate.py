"""A discrete-event simulator: N PeerCores in one process, in virtual time.

Theory of operation: the protocol core is sans-I/O, so one heap of timed
events drives every peer. An event is a message arriving (gossip or direct),
a core timer firing, a peer starting, a query being submitted, or a churn
step. Handling an event calls the core with the event's virtual time and
turns the returned effects into new events. Nothing reads the wall clock
except the report's ``wall_s``; every random draw comes from one seeded
``random.Random`` (plus per-peer seeded numpy generators for the DP noise),
and ties in the heap are broken by insertion order, so a seed fixes every
outcome and every count. (Envelope nonces and per-query mask keys still come
from the OS: they change bytes, never behaviour.)

What is modelled, and the simplifications:
- Latency: each transmission draws a delay uniform in ``latency_ms``; each
  is lost with probability ``loss`` (gossip hops and direct messages alike).
- Gossip: a GossipSub-like mesh. Each peer links to ``degree // 2`` random
  others when it joins (undirected edges, so about ``degree`` neighbours on
  average; a neighbour that leaves is replaced by a random live peer). A
  publisher sends to its mesh neighbours; a peer receiving a message id for
  the first time hands it to its core and forwards it to its neighbours
  except the one it came from. Duplicates are counted as transmissions but
  dropped by message id *before* ``PeerCore.receive``, so their Ed25519
  verification is skipped (a real GossipSub router also dedupes by message id
  before validation). One mesh carries both topics (announcements and query
  requests): every peer subscribes to both, as every simulated peer serves
  the one task. No IHAVE/IWANT lazy gossip, no peer scoring.
- Direct messages go straight to the destination (a libp2p stream).
- Every message is sealed and verified for real (Ed25519 or the pair's MAC,
  msgpack, strict decoding): that is the CPU cost of the real system. One
  exception, for the simulator's own speed: the N copies of one signed
  gossip message (the same bytes at every peer) are parsed, Ed25519-checked
  and decoded once per process (``envelope.OpenMemo``, pure functions of the
  bytes); each peer still runs its own time-window, replay and membership
  checks on every copy. The report's ``open_memo_hits`` counts the copies
  served from it. In a real network each peer verifies its own copy.
- Models: cheap deterministic numpy functions (softmax of a fixed random
  linear map per peer); evaluation takes no virtual time.
- Churn: Poisson departures at ``churn_per_s`` (after the warm-up); each
  departure is followed by a fresh peer (new identity) joining, so N stays
  constant. A departed querier's open queries are recorded as
  ``querier_left``; every other query ends through the core (its deadline
  timer), so every submitted query has an outcome.
- Queries: Poisson arrivals at ``query_rate`` per virtual second from a
  random live peer, from ``warmup_s`` to ``duration_s``; then the simulation
  runs on until every query has ended.
- Memory per peer: RSS growth of the process from before the peers are built
  to the end of the run, divided by N (includes the event heap and the
  simulator's own state). Not an upper bound of a real peer's state: the
  simulated peers share the decoded announcements the OpenMemo hands out,
  where a real peer holds its own copies.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fi_peer.identity import Identity
from fi_peer.protocol.effects import (
    Charge,
    Effect,
    Evaluate,
    Publish,
    QueryDone,
    QueryOutcome,
    Send,
    SetTimer,
)
from fi_peer.protocol.envelope import OpenMemo
from fi_peer.protocol.messages import ModelCard
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.responder import ResponderConfig

TASK = "sim"
RULE = "soft"

# Event kinds (small ints: the heap holds millions of tuples at N = 1,000).
_GOSSIP, _DIRECT, _TIMER, _START, _QUERY, _CHURN, _SAMPLE = range(7)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    n: int = 20
    seed: int = 0
    duration_s: float = 20.0  # queries are submitted in [warmup_s, duration_s)
    warmup_s: float = 5.0  # no queries and no churn before this
    latency_ms: tuple[int, int] = (20, 80)
    loss: float = 0.0
    churn_per_s: float = 0.0  # departures per virtual second (each followed by a join)
    query_rate: float = 2.0  # queries per virtual second, network-wide
    k: int = 8
    degree: int = 6  # GossipSub D
    announce_interval_ms: int = 2000
    missed_beats: int = 3
    start_spread_ms: int = 1000  # peers start at uniform times in [0, this)
    query_timeout_ms: int = 5000
    offer_window_ms: int = 1000
    secure_aggregation: bool = True
    noise_sigma: float = 0.0  # DP noise std of each sum (0: none)
    n_classes: int = 10
    input_dim: int = 16
    sample_ms: int = 250  # how often membership convergence is checked

    def __post_init__(self) -> None:
        if self.n < 3:
            raise ValueError("n >= 3 required")
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")
        lo, hi = self.latency_ms
        if not 0 <= lo <= hi:
            raise ValueError("latency_ms must be (lo, hi) with 0 <= lo <= hi")
        if self.degree < 2 or self.k < 2:
            raise ValueError("degree >= 2 and k >= 2 required")
        if self.duration_s < self.warmup_s:
            raise ValueError("duration_s must be >= warmup_s")

    @property
    def committee(self) -> int:
        return min(self.k, self.n - 1)


@dataclass(slots=True, kw_only=True)
class SimReport:
    config: dict[str, Any]
    membership_converged_s: float | None  # first time every live peer knew all others
    membership_coverage: float  # at the end: mean fraction of live peers each live peer knows
    gossip_per_peer_s: float  # gossip transmissions (duplicates included) per peer per second
    gossip_delivered_per_peer_s: float  # first copies, verified by the core
    direct_per_peer_s: float
    queries: int
    queries_ok: int
    success_rate: float
    failures: dict[str, int]
    latency_ms: dict[str, float]  # p50 / p90 / p99 of successful queries (virtual)
    memory_per_peer_kb: float
    wall_s: float
    cpu_s: float  # process CPU time: the honest cost when the machine is shared
    receive_wall_s: float  # of which inside PeerCore.receive (verification + handling)
    virtual_s: float
    events: int
    peers_joined: int
    peers_left: int
    open_memo_hits: int = 0  # gossip copies whose parse + Ed25519 check + decode were memoised
    unhandled_effects: dict[str, int] = field(default_factory=dict)
    outcomes: list[tuple[str, bool, str, int]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("outcomes")
        return data


class _LinearModel:
    """softmax(x @ W): a fixed random map per peer, deterministic for its seed."""

    def __init__(self, seed: Sequence[int], input_dim: int, n_classes: int) -> None:
        gen = np.random.default_rng(list(seed))
        self.w = gen.normal(0.0, 1.0, size=(input_dim, n_classes))

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        z = np.asarray(x, dtype=np.float64) @ self.w
        e = np.exp(z - z.max())
        out: npt.NDArray[np.float64] = e / e.sum()
        return out


def _card(cfg: SimConfig) -> ModelCard:
    return ModelCard(
        task=TASK,
        n_classes=cfg.n_classes,
        input_dim=cfg.input_dim,
        arch="linear-softmax",
        model_hash=b"\x00" * 32,
        rules=(RULE,),
    )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # not Linux: peak RSS is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _percentile(values: list[int], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.now_ms = 0
        self._heap: list[tuple[int, int, int, tuple[Any, ...]]] = []
        self._tie = itertools.count()
        self.cores: list[PeerCore] = []
        self.models: list[_LinearModel] = []
        self.alive: list[bool] = []
        self.started: list[bool] = []
        self.slot_of: dict[str, int] = {}
        self.mesh: list[set[int]] = []
        self._neighbours: dict[int, tuple[int, ...]] = {}
        self._lat_lo = config.latency_ms[0]
        self._lat_width = config.latency_ms[1] - config.latency_ms[0] + 1
        self._lat_bits = self._lat_width.bit_length()
        self._getrandbits = self.rng.getrandbits
        self._live: list[int] = []  # live slots, for O(1) random choice
        self._live_pos: dict[int, int] = {}
        self._timer_due: dict[tuple[int, Hashable], int] = {}
        # Gossip dedupe: message id -> slots that have seen it, while copies are in flight.
        self._seen: dict[int, set[int]] = {}
        self._in_flight: dict[int, int] = {}
        self._msg_ids = itertools.count()
        self._core_config = CoreConfig(
            net="sim",
            announce_interval_ms=config.announce_interval_ms,
            missed_beats=config.missed_beats,
            querier=QuerierConfig(
                offer_window_ms=config.offer_window_ms,
                min_committee=2,
                secure_aggregation=config.secure_aggregation,
            ),
            responder=ResponderConfig(price_wei=0, allow_plaintext=not config.secure_aggregation),
        )
        self._card = _card(config)
        # One memo of verified signed envelopes for all simulated peers (module docs).
        self._open_memo = OpenMemo(max_entries=8192)
        # Counters.
        self.gossip_tx = 0
        self.gossip_delivered = 0
        self.direct_tx = 0
        self.events = 0
        self.receive_wall = 0.0
        self.joined = 0
        self.left = 0
        self.unhandled: Counter[str] = Counter()
        self.open_queries: dict[bytes, int] = {}  # query id -> querier slot
        self.outcomes: list[QueryOutcome] = []
        self.converged_ms: int | None = None

    # -- peers ------------------------------------------------------------------
    def _add_peer(self, at_ms: int) -> int:
        slot = len(self.cores)
        identity = Identity.from_seed(f"fi-peer-sim/{self.cfg.seed}/{slot}".encode())
        core = PeerCore(
            identity,
            self._card,
            config=self._core_config,
            rng=np.random.default_rng([self.cfg.seed, slot]),
        )
        core.verifier.memo = self._open_memo
        self.cores.append(core)
        self.models.append(
            _LinearModel((self.cfg.seed, slot), self.cfg.input_dim, self.cfg.n_classes)
        )
        self.alive.append(True)
        self.started.append(False)
        self.mesh.append(set())
        self.slot_of[core.peer_id] = slot
        self._link(slot, self.cfg.degree // 2)
        self._live_pos[slot] = len(self._live)
        self._live.append(slot)
        self._push(at_ms, _START, (slot,))
        return slot

    def _link(self, slot: int, count: int) -> None:
        candidates = [s for s in self._live if s != slot and s not in self.mesh[slot]]
        for other in self.rng.sample(candidates, min(count, len(candidates))):
            self.mesh[slot].add(other)
            self.mesh[other].add(slot)
            self._neighbours.pop(slot, None)
            self._neighbours.pop(other, None)

    def _sorted_mesh(self, slot: int) -> tuple[int, ...]:
        """``sorted(self.mesh[slot])``, cached until the slot's links change."""
        out = self._neighbours.get(slot)
        if out is None:
            out = self._neighbours[slot] = tuple(sorted(self.mesh[slot]))
        return out

    def _remove_peer(self, slot: int) -> None:
        self.alive[slot] = False
        pos = self._live_pos.pop(slot)
        last = self._live.pop()
        if last != slot:
            self._live[pos] = last
            self._live_pos[last] = pos
        for other in sorted(self.mesh[slot]):
            self.mesh[other].discard(slot)
            self._neighbours.pop(other, None)
            if len(self.mesh[other]) < self.cfg.degree // 2:
                self._link(other, 1)
        self.mesh[slot].clear()
        self._neighbours.pop(slot, None)
        for query_id, querier in list(self.open_queries.items()):
            if querier == slot:
                del self.open_queries[query_id]
                self.outcomes.append(
                    QueryOutcome(
                        query_id=query_id,
                        ok=False,
                        reason="querier_left",
                        total=None,
                        contributors=(),
                        committee_size=0,
                        elapsed_ms=0,
                    )
                )
        self.left += 1

    # -- events -------------------------------------------------------------------
    def _push(self, at_ms: int, kind: int, payload: tuple[Any, ...]) -> None:
        heapq.heappush(self._heap, (at_ms, next(self._tie), kind, payload))

    def _latency(self) -> int:
        # random.randint(lo, hi) inlined: the same draws from the same stream
        # (randrange -> _randbelow_with_getrandbits), without its Python call
        # layers (they were ~10 % of a large run).
        r = self._getrandbits(self._lat_bits)
        while r >= self._lat_width:
            r = self._getrandbits(self._lat_bits)
        return self._lat_lo + r

    def _lost(self) -> bool:
        return self.cfg.loss > 0 and self.rng.random() < self.cfg.loss

    def _forward(self, slot: int, msg_id: int, topic: str, data: bytes, skip: int) -> None:
        for other in self._sorted_mesh(slot):
            if other == skip:
                continue
            self.gossip_tx += 1
            if self._lost():
                continue
            self._in_flight[msg_id] = self._in_flight.get(msg_id, 0) + 1
            self._push(self.now_ms + self._latency(), _GOSSIP, (other, msg_id, topic, data, slot))

    def _apply(self, slot: int, effects: list[Effect]) -> None:
        pending = list(effects)
        core = self.cores[slot]
        i = 0
        while i < len(pending):
            effect = pending[i]
            i += 1
            match effect:
                case Publish(topic, data):
                    msg_id = next(self._msg_ids)
                    self._seen[msg_id] = {slot}
                    self._forward(slot, msg_id, topic, data, skip=-1)
                    if msg_id not in self._in_flight:
                        del self._seen[msg_id]
                case Send(peer, data):
                    self.direct_tx += 1
                    dst = self.slot_of.get(peer)
                    if dst is not None and not self._lost():
                        self._push(self.now_ms + self._latency(), _DIRECT, (dst, data))
                case SetTimer(key, at_ms):
                    self._timer_due[(slot, key)] = at_ms
                    self._push(at_ms, _TIMER, (slot, key))
                case Evaluate(x=x):
                    vector = self.models[slot](x)
                    pending.extend(core.evaluated(effect, vector, self.now_ms))
                case Charge():
                    pending.extend(core.charged(effect, None, self.now_ms))
                case QueryDone(outcome):
                    if self.open_queries.pop(outcome.query_id, None) is not None:
                        self.outcomes.append(outcome)
                case _:
                    self.unhandled[type(effect).__name__] += 1

    def _receive(self, slot: int, data: bytes, topic: str | None) -> None:
        t0 = time.perf_counter()
        effects = self.cores[slot].receive(data, self.now_ms, topic=topic)
        self.receive_wall += time.perf_counter() - t0
        self._apply(slot, effects)

    def _handle(self, kind: int, payload: tuple[Any, ...]) -> None:
        if kind == _GOSSIP:
            dst, msg_id, topic, data, src = payload
            left = self._in_flight[msg_id] - 1
            seen = self._seen[msg_id]
            if left:
                self._in_flight[msg_id] = left
            else:
                del self._in_flight[msg_id]
            if self.alive[dst] and self.started[dst] and dst not in seen:
                seen.add(dst)
                self.gossip_delivered += 1
                self._forward(dst, msg_id, topic, data, skip=src)
                self._receive(dst, data, topic)
            if msg_id not in self._in_flight:
                self._seen.pop(msg_id, None)
        elif kind == _DIRECT:
            dst, data = payload
            if self.alive[dst] and self.started[dst]:
                self._receive(dst, data, None)
        elif kind == _TIMER:
            slot, key = payload
            if self._timer_due.get((slot, key)) != self.now_ms or not self.alive[slot]:
                return
            del self._timer_due[(slot, key)]
            self._apply(slot, self.cores[slot].on_timer(key, self.now_ms))
        elif kind == _START:
            (slot,) = payload
            if self.alive[slot]:
                self.started[slot] = True
                self._apply(slot, self.cores[slot].start(self.now_ms))
        elif kind == _QUERY:
            self._submit()
            self._schedule_query()
        elif kind == _CHURN:
            live = [s for s in self._live if self.started[s]]
            if live:
                self._remove_peer(self.rng.choice(live))
                self._add_peer(self.now_ms)
                self.joined += 1
            self._schedule_churn()
        elif kind == _SAMPLE:
            if self._converged():
                self.converged_ms = self.now_ms
            else:
                self._push(self.now_ms + self.cfg.sample_ms, _SAMPLE, ())

    def _known_live(self, slot: int) -> int:
        """How many other live peers ``slot``'s membership table holds."""
        membership = self.cores[slot].membership
        return sum(1 for s in self._live if s != slot and self.cores[s].peer_id in membership)

    def _converged(self) -> bool:
        want = len(self._live) - 1
        if not all(self.started[s] and len(self.cores[s].membership) >= want for s in self._live):
            return False  # the cheap test first: the exact one is O(N^2)
        return all(self._known_live(s) == want for s in self._live)

    def _schedule_query(self) -> None:
        if self.cfg.query_rate <= 0:
            return
        at = self.now_ms + max(1, round(self.rng.expovariate(self.cfg.query_rate) * 1000))
        if at < self.cfg.duration_s * 1000:
            self._push(at, _QUERY, ())

    def _schedule_churn(self) -> None:
        if self.cfg.churn_per_s <= 0:
            return
        at = self.now_ms + max(1, round(self.rng.expovariate(self.cfg.churn_per_s) * 1000))
        if at < self.cfg.duration_s * 1000:
            self._push(at, _CHURN, ())

    def _submit(self) -> None:
        live = [s for s in self._live if self.started[s]]
        if not live:
            return
        slot = self.rng.choice(live)
        core = self.cores[slot]
        x = np.array([self.rng.gauss(0.0, 1.0) for _ in range(self.cfg.input_dim)], np.float32)
        query_id = self.rng.getrandbits(128).to_bytes(16, "big")
        _, effects = core.submit_query(
            x,
            rule=RULE,
            vector_len=self.cfg.n_classes,
            k=self.cfg.committee,
            max_price_wei=0,
            timeout_ms=self.cfg.query_timeout_ms,
            now_ms=self.now_ms,
            query_id=query_id,
            noise_sigma=self.cfg.noise_sigma,
        )
        self.open_queries[query_id] = slot
        self._apply(slot, effects)

    # -- running ------------------------------------------------------------------
    def run(self) -> SimReport:
        cfg = self.cfg
        gc.collect()
        rss0 = _rss_bytes()
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        for _ in range(cfg.n):
            self._add_peer(self.rng.randrange(max(1, cfg.start_spread_ms)))
        self._push(cfg.sample_ms, _SAMPLE, ())
        warmup_ms = round(cfg.warmup_s * 1000)
        if cfg.query_rate > 0:
            self._push(warmup_ms, _QUERY, ())
        if cfg.churn_per_s > 0:
            self._push(warmup_ms, _CHURN, ())
        # Every query has a deadline timer; run until all have ended (or a hard stop).
        end_ms = round(cfg.duration_s * 1000)
        hard_stop = end_ms + cfg.query_timeout_ms + 10 * cfg.latency_ms[1] + 1000
        while self._heap:
            at, _, kind, payload = self._heap[0]
            if at > end_ms and (not self.open_queries or at > hard_stop):
                break
            heapq.heappop(self._heap)
            self.now_ms = at
            self.events += 1
            self._handle(kind, payload)
        gc.collect()
        rss1 = _rss_bytes()
        wall = time.perf_counter() - wall0
        return self._report(wall, time.process_time() - cpu0, rss1 - rss0)

    def _report(self, wall: float, cpu: float, rss_delta: int) -> SimReport:
        cfg = self.cfg
        virtual_s = max(self.now_ms, 1) / 1000
        ok = [o for o in self.outcomes if o.ok]
        failures = Counter(o.reason for o in self.outcomes if not o.ok)
        for query_id in self.open_queries:  # must stay empty: every query ends
            failures["no_outcome"] += 1
            del query_id
        submitted = len(self.outcomes) + len(self.open_queries)
        latencies = [o.elapsed_ms for o in ok]
        live = self._live
        coverage = (
            float(np.mean([self._known_live(s) / (len(live) - 1) for s in live]))
            if len(live) > 1
            else 1.0
        )
        peers = cfg.n
        return SimReport(
            config={**asdict(cfg), "committee": cfg.committee},
            membership_converged_s=None if self.converged_ms is None else self.converged_ms / 1000,
            membership_coverage=coverage,
            gossip_per_peer_s=self.gossip_tx / peers / virtual_s,
            gossip_delivered_per_peer_s=self.gossip_delivered / peers / virtual_s,
            direct_per_peer_s=self.direct_tx / peers / virtual_s,
            queries=submitted,
            queries_ok=len(ok),
            success_rate=len(ok) / submitted if submitted else math.nan,
            failures=dict(sorted(failures.items())),
            latency_ms={
                "p50": _percentile(latencies, 50),
                "p90": _percentile(latencies, 90),
                "p99": _percentile(latencies, 99),
            },
            memory_per_peer_kb=rss_delta / peers / 1024,
            wall_s=wall,
            cpu_s=cpu,
            receive_wall_s=self.receive_wall,
            virtual_s=virtual_s,
            events=self.events,
            peers_joined=self.joined,
            peers_left=self.left,
            open_memo_hits=self._open_memo.hits,
            unhandled_effects=dict(self.unhandled),
            outcomes=[(o.query_id.hex(), o.ok, o.reason, o.elapsed_ms) for o in self.outcomes],
        )


def simulate(config: SimConfig) -> SimReport:
    """Run one simulation to the end; see the module docstring for the model."""
    return Simulator(config).run()


def format_report(report: SimReport) -> str:
    conv = report.membership_converged_s
    lat = report.latency_ms
    lines = [
        f"peers                      {report.config['n']}",
        f"membership converged       {'never' if conv is None else f'{conv:.2f} s (virtual)'}",
        f"membership coverage (end)  {report.membership_coverage:.3f}",
        f"gossip msgs / peer / s     {report.gossip_per_peer_s:.1f} "
        f"({report.gossip_delivered_per_peer_s:.1f} first copies)",
        f"direct msgs / peer / s     {report.direct_per_peer_s:.1f}",
        f"queries ok / submitted     {report.queries_ok} / {report.queries} "
        f"({report.success_rate:.1%})",
        f"failures                   {report.failures or '-'}",
        f"latency p50/p90/p99 (ms)   {lat['p50']:.0f} / {lat['p90']:.0f} / {lat['p99']:.0f}",
        f"memory / peer              {report.memory_per_peer_kb:.0f} KiB",
        f"wall                       {report.wall_s:.1f} s ({report.cpu_s:.1f} s cpu; "
        f"{report.receive_wall_s:.1f} s in PeerCore.receive) for {report.virtual_s:.1f} s virtual",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fi_peer.simulate``: one run; prints the report (``--json``: as JSON)."""
    p = argparse.ArgumentParser(prog="fi_peer.simulate", description=__doc__.splitlines()[0])
    defaults = SimConfig()
    p.add_argument("--peers", type=int, default=defaults.n)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--duration", type=float, default=defaults.duration_s)
    p.add_argument("--warmup", type=float, default=defaults.warmup_s)
    p.add_argument("--latency-ms", type=int, nargs=2, default=list(defaults.latency_ms))
    p.add_argument("--loss", type=float, default=defaults.loss)
    p.add_argument("--churn", type=float, default=defaults.churn_per_s)
    p.add_argument("--query-rate", type=float, default=defaults.query_rate)
    p.add_argument("--k", type=int, default=defaults.k)
    p.add_argument("--degree", type=int, default=defaults.degree)
    p.add_argument("--announce-interval-ms", type=int, default=defaults.announce_interval_ms)
    p.add_argument("--missed-beats", type=int, default=defaults.missed_beats)
    p.add_argument("--start-spread-ms", type=int, default=defaults.start_spread_ms)
    p.add_argument("--query-timeout-ms", type=int, default=defaults.query_timeout_ms)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    config = SimConfig(
        n=a.peers,
        seed=a.seed,
        duration_s=a.duration,
        warmup_s=a.warmup,
        latency_ms=(a.latency_ms[0], a.latency_ms[1]),
        loss=a.loss,
        churn_per_s=a.churn,
        query_rate=a.query_rate,
        k=a.k,
        degree=a.degree,
        announce_interval_ms=a.announce_interval_ms,
        missed_beats=a.missed_beats,
        start_spread_ms=a.start_spread_ms,
        query_timeout_ms=a.query_timeout_ms,
    )
    report = simulate(config)
    if a.json:
        json.dump(report.to_json(), sys.stdout)
        print()
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
