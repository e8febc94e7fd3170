"""The asyncio driver of one peer: protocol core + transport + model.

The agent is the only place where time, sockets and the model meet the
sans-io core. It receives its Transport and model as arguments, like
``httpx.AsyncClient(transport=...)``. One task per concern, all children of
one ``asyncio.TaskGroup``:

- ``direct``: direct messages from the transport -> ``core.receive``
- ``topic:<name>``: one per gossip subscription -> ``core.receive(topic=...)``
- ``timers``: fires the core's timers at their due time
- ``evaluate``: batches pending model evaluations, runs them off the loop
- ``outbound``: hands sealed bytes to the transport (bounded queue)

Nothing a peer sends can stop the agent: the core rejects bad input and
counts it; an unexpected exception while handling one message is logged,
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
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fi_peer.errors import LocalProtocolError
from fi_peer.protocol.effects import (
    Effect,
    Evaluate,
    Publish,
    QueryDone,
    QueryOutcome,
    Send,
    SetTimer,
)
from fi_peer.protocol.peer import PeerCore
from network.base import Subscription, Transport, TransportError

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class ModelBackend(Protocol):
    """What the agent needs of a model runtime."""

    def contribution(self, X: npt.NDArray[np.float32], rule: str) -> npt.NDArray[np.float64]:
        """Row i: the vector this member sends for input X[i] under ``rule``."""
        ...

    def vector_length(self, rule: str) -> int: ...


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
        self._timers: list[tuple[int, int, Hashable]] = []
        self._timer_due: dict[Hashable, int] = {}
        self._timer_changed = asyncio.Event()
        self._tie = itertools.count()
        self._pending: dict[bytes, asyncio.Future[QueryOutcome]] = {}
        self._runner: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._membership_changed = asyncio.Event()
        self._closed = False

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
    ) -> QueryOutcome:
        """Ask the network; returns how the query ended. Never hangs past the timeout."""
        if self._runner is None or self._closed:
            raise LocalProtocolError("agent is not running")
        if self.model is None:
            raise LocalProtocolError("a querier needs a model to know the vector length")
        timeout_ms = int(timeout_s * 1000)
        query_id, effects = self.core.submit_query(
            x,
            rule=rule,
            vector_len=self.model.vector_length(rule),
            k=k,
            max_price_wei=max_price_wei,
            timeout_ms=timeout_ms,
            now_ms=self.now_ms(),
        )
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
                case QueryDone(outcome):
                    future = self._pending.get(outcome.query_id)
                    if future is not None and not future.done():
                        future.set_result(outcome)

    def _enqueue(
        self,
        queue: asyncio.Queue[Send | Publish] | asyncio.Queue[Evaluate],
        item: object,
        metric: str,
    ) -> bool:
        try:
            queue.put_nowait(item)  # type: ignore[arg-type]
        except asyncio.QueueFull:
            self.core.metrics[metric] += 1
            return False
        return True

    def _handle(self, data: bytes, topic: str | None) -> None:
        known = len(self.core.membership)
        self._guarded(self.core.receive, data, self.now_ms(), topic=topic)
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
            self._handle(inbound.data, None)

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
                if isinstance(item, Send):
                    await self.transport.send(item.peer, item.data)
                else:
                    await self.transport.publish(item.topic, item.data)
            except TransportError as exc:
                self.core.metrics[f"send_failed.{type(exc).__name__}"] += 1
                log.debug("transport refused a message: %s", exc)


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
