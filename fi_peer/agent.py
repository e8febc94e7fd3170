"""The asyncio driver of one peer: protocol core + transport + model.

The agent is the only place where time, sockets and the model meet the
sans-io core. It receives its Transport and model as arguments, like
``httpx.AsyncClient(transport=...)``. One task per concern, all children of
one ``asyncio.TaskGroup``:

- ``direct``: direct messages from the transport -> ``core.receive``
- ``topic:<name>``: one per gossip subscription -> ``core.receive(topic=...)``
- ``timers``: fires the core's timers at their due time
- ``evaluate``: batches pending model evaluations, runs them off the loop
- ``charge``: records each answer's privacy cost in the owner's budget (a
  durable write, off the loop) and only then lets the core send the share
- ``outbound``: hands sealed bytes to the transport (bounded queue)
- one short task per chain call of a paid query (``OpenEscrow``,
  ``VerifyEscrow``, a kept receipt, a settlement), awaited off the handler
  so other queries go on meanwhile; see :class:`ChainAdapter`

Privacy: queries are securely aggregated by default (the core's config).
``query(..., epsilon=, delta=)`` calibrates the Gaussian noise of the sum for
the rule's L2 sensitivity (fi_peer.privacy.dp, fi_peer.models.aggregation)
and the members check it against their own policy. A member's budget is a
:class:`LedgerGuard` (a PrivacyGuard over fi_peer.privacy.budget.BudgetLedger)
given to its PeerCore.

Nothing a peer sends can stop the agent: the core rejects bad input and
counts it; a sender past its allowance (:data:`INBOUND_RATE` messages per
second, :data:`INBOUND_BURST` at once; authentic messages only spend it) is
dropped before verification, counted ``rejected.rate_limited``, on every
transport; an unexpected exception while handling one message is logged,
counted as ``internal_error`` and the loop goes on. ``aclose()`` (or leaving
``async with``) cancels the tasks, fails pending queries with ``closed`` and
closes the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Coroutine, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import msgpack
import numpy as np
import numpy.typing as npt

from fi_peer import faults
from fi_peer.errors import FiPeerError, LocalProtocolError
from fi_peer.models.aggregation import get_rule
from fi_peer.privacy.budget import BudgetExceeded, BudgetLedger
from fi_peer.privacy.dp import ORDERS, calibrate_sigma, rdp_cost
from fi_peer.protocol.effects import (
    Charge,
    Effect,
    Evaluate,
    OpenEscrow,
    Paid,
    Publish,
    QueryDone,
    QueryOutcome,
    Send,
    SetTimer,
    VerifyEscrow,
)
from fi_peer.protocol.envelope import Verifier, seal
from fi_peer.protocol.he_effects import (
    HECombine,
    HEDecrypt,
    HEEffect,
    HEEvaluate,
    HELoadContext,
    HESendChunks,
)
from fi_peer.protocol.messages import QueryRequest, Receipt
from fi_peer.protocol.payment import EscrowTerms
from fi_peer.protocol.peer import GOSSIP_KINDS, PeerCore
from network.base import Subscription, Transport, TransportError
from network.ratelimit import RateLimiter

if TYPE_CHECKING:
    from fi_peer.he_runtime import HERuntime

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# (rule, epsilon, delta) -> calibrated noise std: a pure function, worth remembering
_SIGMAS: dict[tuple[str, float, float], float] = {}
# Inbound messages per sender and second (and burst) before ``rejected.rate_limited``:
# far above what the protocol needs (a querier sends a member ~6 messages per query),
# a bound on what one flooding peer can make us verify.
INBOUND_RATE = 1000.0
INBOUND_BURST = 5000


class ModelBackend(Protocol):
    """What the agent needs of a model runtime."""

    def contribution(self, X: npt.NDArray[np.float32], rule: str) -> npt.NDArray[np.float64]:
        """Row i: the vector this member sends for input X[i] under ``rule``."""
        ...

    def vector_length(self, rule: str) -> int: ...


class _QueryTerms(TypedDict):
    """What a plain and an input-private (HE) query are both submitted with."""

    rule: str
    vector_len: int
    k: int
    max_price_wei: int
    timeout_ms: int
    now_ms: int
    epsilon: float
    delta: float
    noise_sigma: float


class ChainAdapter(Protocol):
    """What the agent needs of the chain for paid queries (fi_peer.settlement.Settler).

    Every method is awaited in its own task: a slow chain delays only its query.
    ``open_escrow``/``verify_escrow`` answer False on any failure (never raise).
    """

    async def open_escrow(self, terms: EscrowTerms) -> bool: ...

    async def verify_escrow(self, terms: EscrowTerms) -> bool: ...

    async def on_paid(self, querier: str, terms: EscrowTerms, receipt: Receipt) -> None:
        """Keep a verified receipt (durably) for a later claim."""
        ...

    async def on_outcome(self, outcome: QueryOutcome) -> None:
        """A paid query of ours ended: settle what it delivered (``outcome.escrow``)."""
        ...

    async def on_abandoned(self, terms: EscrowTerms) -> None:
        """Our escrow opened after its query had ended: settle it with nobody delivered."""
        ...


class LedgerGuard:
    """The owner's privacy policy and budget for the core (protocol.guard.PrivacyGuard).

    Policy: a query under DP (0 < epsilon < inf) must carry at least the noise
    that (epsilon, delta) needs for its rule's L2 sensitivity, and its epsilon may
    not exceed ``max_query_epsilon``; rules of unbounded sensitivity are refused
    under DP. A query without DP (epsilon 0) costs infinite RDP, so only an owner
    with unlimited budgets answers it. Budget: the cost of what the querier sees
    (RDP of a Gaussian release with the member's effective noise) is checked at
    offer time and charged, durably, before the share leaves. Ledger failures are
    refusals, never silent passes.
    """

    def __init__(self, ledger: BudgetLedger, *, max_query_epsilon: float = math.inf) -> None:
        self.ledger = ledger
        self.max_query_epsilon = max_query_epsilon
        # (sigma, sensitivity) -> RDP: queries at one epsilon all cost the same
        self._costs: dict[tuple[float, float], tuple[float, ...]] = {}

    @staticmethod
    def _sensitivity(rule: str) -> float | None:
        try:
            return get_rule(rule).l2_sensitivity
        except ValueError:
            return None

    def required_sigma(self, request: QueryRequest) -> float | None:
        eps = request.epsilon
        if eps == 0 or math.isinf(eps):
            return 0.0  # no DP: answered only on an unlimited budget (see check)
        sensitivity = self._sensitivity(request.rule)
        if sensitivity is None or eps > self.max_query_epsilon:
            return None
        try:
            return calibrate_sigma(eps, request.delta, sensitivity)
        except ValueError:
            return None

    def cost(self, request: QueryRequest, sigma: float) -> tuple[float, ...]:
        sensitivity = self._sensitivity(request.rule)
        if sensitivity is None:
            return tuple(math.inf for _ in ORDERS)
        key = (sigma, sensitivity)
        cost = self._costs.get(key)
        if cost is None:
            if len(self._costs) >= 256:
                self._costs.clear()
            cost = self._costs[key] = rdp_cost(sigma, sensitivity)
        return cost

    def check(self, querier: str, request: QueryRequest, sigma: float, now_ms: int) -> str | None:
        try:
            return self.ledger.check(querier, self.cost(request, sigma), now_ms / 1000)
        except (FiPeerError, ValueError):
            log.exception("budget ledger check failed")
            return "ledger_error"

    def charge(
        self, querier: str, request: QueryRequest, sigma: float, now_ms: int
    ) -> str | None:
        cost = self.cost(request, sigma)
        try:
            self.ledger.charge(querier, request.query_id, cost, now_ms / 1000)
        except BudgetExceeded as exc:
            return exc.reason
        except (FiPeerError, ValueError):
            log.exception("budget ledger charge failed")
            return "ledger_error"
        return None  # charged now, or already (a retried charge is a no-op)

    def charge_many(self, items: list[Charge], now_ms: int) -> list[str | None]:
        """:meth:`charge` for each item, group-committed: one ledger transaction and
        one fsync for the batch, durable before this returns (so before any of the
        answers leaves)."""
        try:
            outcomes = self.ledger.charge_many(
                [
                    (c.querier, c.request.query_id, self.cost(c.request, c.sigma), now_ms / 1000)
                    for c in items
                ]
            )
        except (FiPeerError, ValueError):
            log.exception("budget ledger charge failed")
            return ["ledger_error"] * len(items)
        refusals: list[str | None] = []
        for outcome in outcomes:
            if isinstance(outcome, BudgetExceeded):
                refusals.append(outcome.reason)
            elif isinstance(outcome, ValueError):
                log.error("budget ledger charge refused: %s", outcome)
                refusals.append("ledger_error")
            else:
                refusals.append(None)
        return refusals

    def warm_up(self) -> None:
        """Load the RDP accountant (~1-3 s the first time) before queries need it."""
        rdp_cost(1.0, 1.0)


class Agent:
    def __init__(
        self,
        core: PeerCore,
        transport: Transport,
        model: ModelBackend | None,
        *,
        clock: Clock = time.time,
        max_batch: int = 64,
        queue_size: int = 10_000,
        chain: ChainAdapter | None = None,
        inbound_rate: float = INBOUND_RATE,
        inbound_burst: float = INBOUND_BURST,
        he: HERuntime | None = None,
    ) -> None:
        if transport.local_id != core.peer_id:
            raise LocalProtocolError("transport and core must belong to the same peer")
        self.core = core
        self.transport = transport
        self.model = model
        self._clock = clock
        self._max_batch = max_batch
        self._queue_size = queue_size
        self._outbound: asyncio.Queue[Send | Publish] = asyncio.Queue(queue_size)
        self._evaluations: asyncio.Queue[Evaluate] = asyncio.Queue(queue_size)
        self._charges: asyncio.Queue[Charge] = asyncio.Queue(queue_size)
        self._timers: list[tuple[int, int, Hashable]] = []
        self._timer_due: dict[Hashable, int] = {}
        self._timer_changed = asyncio.Event()
        self._tie = itertools.count()
        self._pending: dict[bytes, asyncio.Future[QueryOutcome]] = {}
        self._runner: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._membership_changed = asyncio.Event()
        self._closed = False
        self.chain = chain
        self._chain_tasks: set[asyncio.Task[None]] = set()
        self._inbound_limit = RateLimiter(inbound_rate, inbound_burst)
        self.he = he  # CKKS work of the input-private mode (fi_peer.he_runtime)

    # -- lifecycle ----------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self.core.peer_id

    @property
    def metrics(self) -> dict[str, int]:
        return dict(self.core.metrics)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._runner is not None:
            raise LocalProtocolError("agent already started")
        guard = self.core.responder.guard
        if isinstance(guard, LedgerGuard):
            await asyncio.to_thread(guard.warm_up)
        await self.transport.start()
        subscriptions = [await self.transport.subscribe(t) for t in self.core.topics()]
        self._runner = asyncio.create_task(
            self._run(subscriptions), name=f"agent-{self.peer_id[:8]}"
        )
        self._apply(self.core.start(self.now_ms()))
        await self._ready.wait()

    async def _run(self, subscriptions: list[Subscription]) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._direct_loop(), name="direct")
                for sub in subscriptions:
                    tg.create_task(self._topic_loop(sub), name=f"topic:{sub.topic}")
                tg.create_task(self._timer_loop(), name="timers")
                tg.create_task(self._evaluate_loop(), name="evaluate")
                tg.create_task(self._charge_loop(), name="charge")
                tg.create_task(self._outbound_loop(), name="outbound")
                self._ready.set()
        finally:
            self._ready.set()
            for sub in subscriptions:
                await sub.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        runner, self._runner = self._runner, None
        for task in list(self._chain_tasks):
            task.cancel()
        if self._chain_tasks:
            await asyncio.gather(*self._chain_tasks, return_exceptions=True)
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        for query_id, future in list(self._pending.items()):
            if not future.done():
                future.set_result(_failed(query_id, "closed"))
        self._pending.clear()
        await self.transport.aclose()

    # -- querying -------------------------------------------------------------------
    async def query(
        self,
        x: npt.ArrayLike,
        *,
        rule: str,
        k: int,
        max_price_wei: int = 0,
        timeout_s: float = 5.0,
        epsilon: float = 0.0,
        delta: float = 1e-5,
        secagg: bool | None = None,
        input_private: bool = False,
        audit_label: int | None = None,
    ) -> QueryOutcome:
        """Ask the network; returns how the query ended. Never hangs past the timeout.

        ``audit_label``: the answer is known (an audit query, fi_peer.protocol.audit):
        the core's AuditBook keeps the members' commitments, nothing on the wire
        differs; :meth:`request_openings` asks for the openings after the answer.

        ``epsilon`` > 0: each member's answer is (epsilon, delta)-DP for its data
        (Gaussian noise on the sum, calibrated to ``rule``'s L2 sensitivity);
        0: no noise. ``secagg`` overrides the core's mode (secure aggregation
        unless configured otherwise).
        """
        if self._runner is None or self._closed:
            raise LocalProtocolError("agent is not running")
        if self.model is None:
            raise LocalProtocolError("a querier needs a model to know the vector length")
        model = self.model
        noise_sigma = await self.noise_sigma(rule, epsilon, delta)
        timeout_ms = int(timeout_s * 1000)

        def terms() -> _QueryTerms:  # called as the query leaves (after any encryption)
            return _QueryTerms(
                rule=rule,
                vector_len=model.vector_length(rule),
                k=k,
                max_price_wei=max_price_wei,
                timeout_ms=timeout_ms,
                now_ms=self.now_ms(),
                epsilon=epsilon,
                delta=delta if epsilon > 0 else 0.0,
                noise_sigma=noise_sigma,
            )

        if input_private:  # the input encrypted under our CKKS key (fi_peer.he_runtime)
            query_id, effects = await self._submit_he(x, terms)
        else:
            query_id, effects = self.core.submit_query(x, secagg=secagg, **terms())
        if audit_label is not None:
            if self.core.audit_book is None:
                raise LocalProtocolError("this peer keeps no audit book: it cannot audit")
            try:
                self.core.audit_book.mark(query_id, audit_label)
            except ValueError as exc:
                raise LocalProtocolError(f"audit label: {exc}") from exc
        future: asyncio.Future[QueryOutcome] = asyncio.get_running_loop().create_future()
        self._pending[query_id] = future
        self._apply(effects)
        try:
            # The core's own deadline ends every query; this outer bound only guards
            # against a stalled driver (e.g. an evaluation that never returns).
            async with asyncio.timeout(timeout_s + 2.0):
                return await future
        except TimeoutError:
            self.core.metrics["queries.driver_timeout"] += 1
            return _failed(query_id, "driver_timeout")
        finally:
            self._pending.pop(query_id, None)

    def request_openings(self, query_id: bytes, members: list[str] | None = None) -> int:
        """After an audit query's answer: ask its members (``members``: only these,
        e.g. after a ``not_over`` refusal) to open their commitments; how many asked."""
        book = self.core.audit_book
        if book is None:
            return 0
        now = self.now_ms()
        if members is None:
            effects = self.core.request_openings(query_id, now)
        else:
            effects = [
                Send(member, seal(self.core.identity, request, now))
                for member, request in book.retry(query_id, members)
            ]
        self._apply(effects)
        return len(effects)

    @staticmethod
    async def noise_sigma(rule: str, epsilon: float, delta: float) -> float:
        """Noise std of the sum for an (epsilon, delta) query under ``rule`` (0: no DP)."""
        if epsilon == 0:
            return 0.0
        key = (rule, epsilon, delta)
        sigma = _SIGMAS.get(key)
        if sigma is not None:
            return sigma
        try:
            sensitivity = get_rule(rule).l2_sensitivity
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from exc
        if sensitivity is None:
            raise LocalProtocolError(
                f"rule {rule!r} has unbounded sensitivity: it cannot be answered under DP"
            )
        try:  # calibrating runs the RDP accountant (seconds the first time): off the loop
            sigma = await asyncio.to_thread(calibrate_sigma, epsilon, delta, sensitivity)
        except ValueError as exc:
            raise LocalProtocolError(f"invalid privacy parameters: {exc}") from exc
        if len(_SIGMAS) < 1024:
            _SIGMAS[key] = sigma
        return sigma

    # -- effects --------------------------------------------------------------------
    def _apply(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            match effect:
                case Send() | Publish():
                    self._enqueue(self._outbound, effect, "dropped.outbound_full")
                case SetTimer(key, at_ms):
                    self._timer_due[key] = at_ms
                    heapq.heappush(self._timers, (at_ms, next(self._tie), key))
                    self._timer_changed.set()
                case Evaluate():
                    if not self._enqueue(self._evaluations, effect, "dropped.evaluations_full"):
                        self._apply(self.core.evaluation_failed(effect, self.now_ms()))
                case Charge():
                    if not self._enqueue(self._charges, effect, "dropped.charges_full"):
                        self._apply(self.core.charged(effect, "charge_queue_full", self.now_ms()))
                case OpenEscrow(terms):
                    self._chain_task(self._open_escrow(terms))
                case VerifyEscrow(querier, terms):
                    self._chain_task(self._verify_escrow(querier, terms))
                case Paid(querier, terms, receipt):
                    faults.point("exit_after_share")  # test-only, inert by default
                    if self.chain is not None:
                        self._chain_task(self.chain.on_paid(querier, terms, receipt))
                case HESendChunks():
                    self._chain_task(self._send_chunks(effect))
                case HELoadContext() | HEEvaluate() | HECombine() | HEDecrypt():
                    self._chain_task(self._he_effect(effect))
                case QueryDone(outcome):
                    if outcome.escrow is not None:
                        faults.point("exit_before_settle")  # test-only, inert by default
                    future = self._pending.get(outcome.query_id)
                    if future is not None and not future.done():
                        future.set_result(outcome)
                    if outcome.escrow is not None and self.chain is not None:
                        self._chain_task(self.chain.on_outcome(outcome))

    # -- HE (input-private) mode ----------------------------------------------------------
    async def _submit_he(
        self, x: npt.ArrayLike, terms: Callable[[], _QueryTerms]
    ) -> tuple[bytes, list[Effect]]:
        if self.he is None or self.model is None:
            raise LocalProtocolError("this peer has no HE runtime: it cannot encrypt inputs")
        rows = np.asarray(x)
        if rows.ndim == 2 and len(rows) > 1:  # many inputs: one batched tensor, chunked
            blobs, context = await asyncio.to_thread(self.he.encrypt_batch, rows)
            return self.core.submit_he_query(blobs, context, n_batched=len(rows), **terms())
        # the rule picks the encoding: x (network) or u(x) u(x)^T (kernel evidence)
        blobs, context = await asyncio.to_thread(self.he.encrypt, x, terms()["rule"])
        return self.core.submit_he_query(blobs, context, **terms())

    async def _send_chunks(self, effect: HESendChunks) -> None:
        """A member's copy of our public context, each chunk sealed as it leaves."""
        for chunk in effect.chunks:
            data = self.core.seal_now(chunk, self.now_ms())
            try:
                await self.transport.send(effect.peer, data)
            except TransportError as exc:
                self.core.metrics[f"send_failed.{type(exc).__name__}"] += 1
                return

    async def _he_effect(self, effect: HEEffect) -> None:
        """The CKKS work of an HE effect, off the loop, then its answer to the core."""
        from fi_peer.he_runtime import answer_he_effect, run_he_effect

        result = await asyncio.to_thread(run_he_effect, self.he, effect)
        self._guarded(answer_he_effect, self.core, effect, result, self.now_ms())

    # -- chain (paid queries) ----------------------------------------------------------
    def _chain_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._chain_call(work))
        self._chain_tasks.add(task)
        task.add_done_callback(self._chain_tasks.discard)

    async def _chain_call(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            self.core.metrics["chain.internal_error"] += 1
            log.exception("chain call failed")

    async def _open_escrow(self, terms: EscrowTerms) -> None:
        ok = False
        if self.chain is not None:
            try:
                ok = await self.chain.open_escrow(terms)
                if ok:
                    faults.point("exit_after_escrow")  # test-only, inert by default
            except Exception:
                log.exception("opening an escrow failed")
        if ok and terms.query_id not in self.core.queries and self.chain is not None:
            await self.chain.on_abandoned(terms)  # the query ended while we escrowed
        self._guarded(self.core.escrow_opened, terms.query_id, ok, self.now_ms())

    async def _verify_escrow(self, querier: str, terms: EscrowTerms) -> None:
        ok = False
        if self.chain is not None:
            try:
                ok = await self.chain.verify_escrow(terms)
            except Exception:
                log.exception("checking an escrow failed")
        self._guarded(self.core.escrow_verified, (querier, terms.query_id), ok, self.now_ms())

    def _enqueue(
        self,
        queue: asyncio.Queue[Send | Publish] | asyncio.Queue[Evaluate] | asyncio.Queue[Charge],
        item: object,
        metric: str,
    ) -> bool:
        try:
            queue.put_nowait(item)  # type: ignore[arg-type]
        except asyncio.QueueFull:
            self.core.metrics[metric] += 1
            return False
        return True

    def _handle(self, data: bytes, topic: str | None, peer: str | None = None) -> None:
        # Per-sender rate limit, before the (costly) verification: keyed by the
        # transport's sender of a direct message, else by the sender the envelope
        # claims. Only a message whose signature holds spends a token, so forged
        # envelopes cannot use up another peer's allowance.
        key: str | bytes | None = peer if peer is not None else _claimed_sender(data)
        now = self._clock()
        if key is not None and not self._inbound_limit.ready(key, now):
            self.core.metrics["rejected.rate_limited"] += 1
            return
        forged = self.core.metrics["rejected.bad_signature"]
        known = len(self.core.membership)
        self._guarded(self.core.receive, data, self.now_ms(), topic=topic)
        if key is not None and self.core.metrics["rejected.bad_signature"] == forged:
            self._inbound_limit.take(key, now)
        if len(self.core.membership) != known:
            self._membership_changed.set()

    def announce(self) -> None:
        """Announce this peer now instead of at the next heartbeat."""
        self._apply(self.core.heartbeat(self.now_ms()))

    async def wait_for_peers(self, n: int, timeout_s: float) -> bool:
        """Wait until this peer knows at least ``n`` others; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.core.membership) < n:
                    self._membership_changed.clear()
                    await self._membership_changed.wait()
        except TimeoutError:
            return False
        return True

    # -- tasks ----------------------------------------------------------------------
    async def _direct_loop(self) -> None:
        async for inbound in self.transport.incoming():
            self._handle(inbound.data, None, inbound.sender)

    async def _topic_loop(self, sub: Subscription) -> None:
        async for data in sub:
            self._handle(data, sub.topic)

    async def _timer_loop(self) -> None:
        while True:
            self._timer_changed.clear()
            now = self.now_ms()
            while self._timers and self._timers[0][0] <= now:
                at_ms, _, key = heapq.heappop(self._timers)
                if self._timer_due.get(key) != at_ms:
                    continue  # replaced by a later SetTimer for the same key
                del self._timer_due[key]
                self._guarded(self.core.on_timer, key, now)
            delay = (self._timers[0][0] - now) / 1000 if self._timers else None
            try:
                async with asyncio.timeout(delay):
                    await self._timer_changed.wait()
            except TimeoutError:
                pass

    async def _evaluate_loop(self) -> None:
        while True:
            batch = [await self._evaluations.get()]
            while len(batch) < self._max_batch and not self._evaluations.empty():
                batch.append(self._evaluations.get_nowait())
            by_rule: dict[str, list[Evaluate]] = {}
            for item in batch:
                by_rule.setdefault(item.rule, []).append(item)
            for rule, items in by_rule.items():
                await self._evaluate(rule, items)

    async def _evaluate(self, rule: str, items: list[Evaluate]) -> None:
        model = self.model
        try:
            if model is None:
                raise LocalProtocolError("this peer has no model")
            X = np.stack([item.x for item in items]).astype(np.float32, copy=False)
            vectors = await asyncio.to_thread(model.contribution, X, rule)
            if len(vectors) != len(items):
                raise LocalProtocolError("model returned the wrong number of rows")
        except Exception:
            log.exception("model evaluation failed for %d queries", len(items))
            now = self.now_ms()
            for item in items:
                self._guarded(self.core.evaluation_failed, item, now)
            return
        now = self.now_ms()
        for item, vector in zip(items, vectors, strict=True):
            self._guarded(self.core.evaluated, item, vector, now)

    async def _charge_loop(self) -> None:
        """Durable charges off the loop, one at a time (the ledger is one writer):
        whatever is pending goes to the worker thread together."""
        while True:
            batch = [await self._charges.get()]
            while not self._charges.empty():
                batch.append(self._charges.get_nowait())
            refusals = await asyncio.to_thread(self._charge_batch, batch, self.now_ms())
            now = self.now_ms()
            for item, refusal in zip(batch, refusals, strict=True):
                self._guarded(self.core.charged, item, refusal, now)

    def _charge_batch(self, batch: list[Charge], now_ms: int) -> list[str | None]:
        """Runs in a worker thread. A charge that raises is a refusal, never a pass."""
        guard = self.core.responder.guard
        if isinstance(guard, LedgerGuard):
            try:
                return guard.charge_many(batch, now_ms)  # group commit: one fsync
            except Exception:
                log.exception("privacy charge failed")
                return ["charge_failed"] * len(batch)
        refusals: list[str | None] = []
        for item in batch:
            if guard is None:
                refusals.append("no_guard")
                continue
            try:
                refusals.append(guard.charge(item.querier, item.request, item.sigma, now_ms))
            except Exception:
                log.exception("privacy charge failed")
                refusals.append("charge_failed")
        return refusals

    def _guarded(
        self, handler: Callable[..., list[Effect]], *args: object, **kwargs: object
    ) -> None:
        """Apply a core handler's effects. Peers cannot make the core raise (it
        rejects and counts); an exception here is our bug, and one bug in one
        message must not stop the peer: log it, count it, go on."""
        try:
            self._apply(handler(*args, **kwargs))
        except Exception:
            self.core.metrics["internal_error"] += 1
            log.exception("internal error in %s", getattr(handler, "__name__", handler))

    async def _outbound_loop(self) -> None:
        while True:
            item = await self._outbound.get()
            try:
                faults.outbound(item.data)  # test-only, inert by default
                if isinstance(item, Send):
                    await self.transport.send(item.peer, item.data)
                else:
                    await self.transport.publish(item.topic, item.data)
            except TransportError as exc:
                self.core.metrics[f"send_failed.{type(exc).__name__}"] += 1
                log.debug("transport refused a message: %s", exc)


def relay_check(origin: str, topic: str, data: bytes) -> bool:
    """Whether gossip is worth relaying (a transport's ``gossip_validator``): an
    authentic gossip envelope inside the time window, signed by ``origin`` (the
    peer that published it). Stateless (no replay state: the receiving core
    keeps that), so safe to call from the transport's own thread."""
    try:
        opened = Verifier().open(data, int(time.time() * 1000))
    except FiPeerError:
        return False
    return opened.kind in GOSSIP_KINDS and opened.sender == origin


def _claimed_sender(data: bytes) -> bytes | None:
    """The sender key an envelope claims (not verified), or None if it names none."""
    try:
        unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(1, len(data)))
        unpacker.feed(data)
        if unpacker.read_array_header() != 7:
            return None
        unpacker.skip()  # version
        unpacker.skip()  # kind
        sender = unpacker.unpack()
    except Exception:
        return None
    return sender if type(sender) is bytes and len(sender) == 32 else None


def _failed(query_id: bytes, reason: str) -> QueryOutcome:
    return QueryOutcome(
        query_id=query_id,
        ok=False,
        reason=reason,
        total=None,
        contributors=(),
        committee_size=0,
        elapsed_ms=0,
    )
