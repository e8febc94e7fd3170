"""Malicious peers, in process over the memory transport: live Agents, real protocol.

One querier and four members (k = 4, threshold t = 3), toy models with exact
outputs and no DP noise, so every sum can be checked to the word.

* A member that sends a bad Share (wrong length; a value out of the fixed-point
  range; garbage instead of a masked vector) or a Reveal whose shares are not
  field elements: the querier rejects it with a counted reason and still
  completes from the three others (t remain), with exactly their sum. Garbage
  under secure aggregation cannot be told from a masked vector: the unmasked
  sum is out of range, and the query fails with that reason instead of
  answering garbage.
* A querier that asks a member for reveals it is not owed (the mask-key share
  of a member whose self-mask share the others reveal, an index outside the
  committee, a member outside U1, the member itself as dropped, a second
  reveal) or an Unmask from someone who is not the querier: refused, with the
  reason counted, and nothing leaked: for no member u does anyone hold t
  shares of both its self-mask seed b_u and its mask key m_u (what it would
  take to peel u's vector out of its masked share).
"""

from __future__ import annotations

import asyncio
import hashlib
import types
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fi_peer.agent import Agent
from fi_peer.identity import Identity
from fi_peer.privacy import secagg
from fi_peer.privacy.shamir import SHARE_LEN
from fi_peer.protocol import fixedpoint
from fi_peer.protocol.effects import Effect, QueryOutcome, Send
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.messages import Reveal, Share, Unmask
from fi_peer.protocol.peer import CoreConfig
from fi_peer.protocol.querier import QuerierConfig, QuerySession
from fi_peer.protocol.responder import MemberSession, Responder, ResponderConfig, RState
from network.memory import MemoryHub
from tests.support_agents import (
    DIM,
    N_CLASSES,
    ToyModel,
    meet,
    memory_transport,
    start_agent,
    toy_card,
)

K = 4
T = K // 2 + 1
TIMEOUT_S = 3.0
X = np.arange(DIM, dtype=np.float32)


@dataclass
class Net:
    querier: Agent
    members: list[Agent]
    hub: MemoryHub
    models: dict[str, ToyModel] = field(default_factory=dict)

    def member(self, peer_id: str) -> Agent:
        return next(m for m in self.members if m.peer_id == peer_id)

    def expected(self, contributors: list[str]) -> npt.NDArray[np.float64]:
        """The exact sum the querier should get: its own row plus ``contributors``'."""
        rows = [self.models[p].contribution(X[None, :], "vote")[0] for p in contributors]
        rows.append(self.models[self.querier.peer_id].contribution(X[None, :], "vote")[0])
        total = np.zeros(N_CLASSES, dtype=np.uint64)
        for row in rows:
            total = fixedpoint.add(total, fixedpoint.encode(row))
        return fixedpoint.decode(total)

    async def query(self, *, secagg: bool = True) -> QueryOutcome:
        return await self.querier.query(X, rule="vote", k=K, timeout_s=TIMEOUT_S, secagg=secagg)


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    hub = MemoryHub(seed=11)
    config = CoreConfig(
        net="malicious",
        announce_interval_ms=3_600_000,  # no heartbeats: every message is the test's doing
        querier=QuerierConfig(offer_window_ms=1000),
        responder=ResponderConfig(allow_plaintext=True),
    )
    agents: list[Agent] = []
    models: dict[str, ToyModel] = {}
    for i in range(K + 1):
        model = ToyModel(i)
        agent = await start_agent(
            f"malicious-test-{i}", toy_card(), model, config, memory_transport(hub)
        )
        models[agent.peer_id] = model
        agents.append(agent)
    try:
        await meet(agents)
        yield Net(agents[0], agents[1:], hub, models)
    finally:
        for agent in agents:
            await agent.aclose()


def delta(after: dict[str, int], before: dict[str, int], prefix: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for key, value in after.items():
        if key.startswith(prefix) and value != before.get(key, 0):
            out[key] = value - before.get(key, 0)
    return out


# -- malicious members ------------------------------------------------------------------------


def corrupt_shares(member: Agent, corrupt: Callable[[fixedpoint.Words], fixedpoint.Words]) -> None:
    """From now on ``member`` sends ``corrupt(masked vector)`` as its Share (signed by it,
    so the querier sees an authentic message from a committee member)."""
    responder = member.core.responder

    def evil_share(
        self: Responder, key: tuple[str, bytes], session: MemberSession, now_ms: int
    ) -> list[Effect]:
        session.state = RState.SHARED
        words = session.words
        tags: tuple[bytes, ...] = ()
        assert words is not None
        if session.masking is not None:
            words, tags = session.masking.masked_input(words)
        data = fixedpoint.to_bytes(corrupt(words))
        session.share_digest = hashlib.sha256(data).digest()
        share = Share(query_id=key[1], vector=data, commitment=b"", view_tags=tags)
        return [self._send(session.querier, share, now_ms)]

    responder._share = types.MethodType(evil_share, responder)  # type: ignore[method-assign]


def _short(words: fixedpoint.Words) -> fixedpoint.Words:
    return words[:-1]


def _long(words: fixedpoint.Words) -> fixedpoint.Words:
    return np.concatenate([words, words[:1]])


def _out_of_range(words: fixedpoint.Words) -> fixedpoint.Words:
    # 2**33 > fixedpoint.MAX_ABS_VALUE (2**32): no honest member can encode it
    big = np.array([2**33 * 2**fixedpoint.FRAC_BITS], dtype=np.int64).view(np.uint64)
    return np.concatenate([big, words[1:]])


@pytest.mark.parametrize(
    ("secure", "corrupt"),
    [(True, _short), (True, _long), (False, _short), (False, _long), (False, _out_of_range)],
    ids=["secagg-short", "secagg-long", "plain-short", "plain-long", "plain-out-of-range"],
)
async def test_bad_share_is_rejected_and_the_query_completes_from_the_others(
    net: Net, secure: bool, corrupt: Callable[[fixedpoint.Words], fixedpoint.Words]
) -> None:
    evil = net.members[0]
    corrupt_shares(evil, corrupt)
    before = net.querier.metrics
    out = await net.query(secagg=secure)
    honest = sorted(m.peer_id for m in net.members[1:])
    assert out.ok, out.reason
    assert list(out.contributors) == honest  # the evil member is left out
    assert out.total is not None
    assert np.array_equal(out.total, net.expected(honest))
    rejected = delta(net.querier.metrics, before, "rejected.")
    assert rejected == Counter({"rejected.unexpected": 1}), rejected
    assert net.querier.metrics["accepted.share"] - before.get("accepted.share", 0) == K - 1
    assert net.querier.metrics.get("internal_error", 0) == 0


async def test_garbage_masked_share_fails_the_query_with_a_reason_not_a_garbage_answer(
    net: Net,
) -> None:
    rng = np.random.default_rng(5)
    corrupt_shares(net.members[0], lambda w: rng.integers(0, 2**64, len(w), dtype=np.uint64))
    out = await net.query(secagg=True)
    assert not out.ok and out.total is None
    assert out.reason == "aggregate_out_of_range", out.reason
    # the honest members keep working: the next query, without the garbage, is exact
    del net.members[0].core.responder._share
    again = await net.query(secagg=True)
    assert again.ok and again.total is not None
    assert np.array_equal(again.total, net.expected(sorted(m.peer_id for m in net.members)))


async def test_reveal_out_of_the_field_is_rejected_and_the_others_unmask(net: Net) -> None:
    # The evil one is whoever is committee member 0: the querier asks it first (with
    # zero latency its Reveal arrives first), so its reveal cannot be the late fourth.
    evil: list[str] = []
    for member in net.members:
        responder = member.core.responder

        def evil_unmask(
            sender: str, unmask: Unmask, now_ms: int, responder: Responder = responder
        ) -> list[Effect]:
            effects = Responder.on_unmask(responder, sender, unmask, now_ms)
            session = responder.sessions[(sender, unmask.query_id)]
            if session.masking is None or session.masking.index != 0:
                return effects
            evil.append(responder.identity.peer_id)
            not_in_field = b"\xff" * SHARE_LEN  # 2**528 - 1 > 2**521 - 1
            reveal = Reveal(
                query_id=unmask.query_id,
                seed_shares=(not_in_field,) * len(unmask.survivors),
                pair_seeds=(b"\x00" * 32,) * len(unmask.dropped),
            )
            return [responder._send(sender, reveal, now_ms)]

        responder.on_unmask = evil_unmask  # type: ignore[method-assign]
    before = net.querier.metrics
    out = await net.query(secagg=True)
    everyone = sorted(m.peer_id for m in net.members)
    assert out.ok, out.reason
    assert len(evil) == 1
    # the evil member's masked vector was fine: it is in the sum, unmasked by the others
    assert list(out.contributors) == everyone
    assert out.total is not None and np.array_equal(out.total, net.expected(everyone))
    rejected = delta(net.querier.metrics, before, "rejected.")
    assert rejected == Counter({"rejected.unexpected": 1}), rejected
    # the three honest reveals rebuilt the sum; none of them was late
    assert net.querier.metrics.get("late.reveal", 0) == before.get("late.reveal", 0)


# -- a malicious querier ------------------------------------------------------------------------


@dataclass
class Revealed:
    """Successful reveals, per query context: who revealed shares of which secrets."""

    seeds: dict[bytes, Counter[int]] = field(default_factory=dict)  # b_u shares per u
    keys: dict[bytes, Counter[int]] = field(default_factory=dict)  # m_u shares per u
    by_member: Counter[int] = field(default_factory=Counter)

    def leaked(self, threshold: int) -> list[tuple[bytes, int]]:
        """(query, member) pairs whose b AND m could both be rebuilt from the reveals."""
        return [
            (ctx, u)
            for ctx, seeds in self.seeds.items()
            for u, n in seeds.items()
            if n >= threshold and self.keys.get(ctx, Counter())[u] >= threshold
        ]


@pytest.fixture
def revealed(monkeypatch: pytest.MonkeyPatch) -> Revealed:
    record = Revealed()
    original = secagg.MaskingMember.reveal

    def recording(
        self: secagg.MaskingMember, survivors: Any, dropped: Any, tags: Any
    ) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        out = original(self, survivors, dropped, tags)  # raises when it refuses
        record.seeds.setdefault(self.context, Counter()).update(survivors)
        record.keys.setdefault(self.context, Counter()).update(dropped)
        record.by_member[self.index] += 1
        return out

    monkeypatch.setattr(secagg.MaskingMember, "reveal", recording)
    return record


Tamper = Callable[[QuerySession, int, Unmask], list[Unmask]]


def unmask_for(session: QuerySession, recipient: int, survivors: tuple[int, ...],
               dropped: tuple[int, ...]) -> Unmask:  # fmt: skip
    """An Unmask with the genuine view tags of ``survivors`` for ``recipient``."""
    agg = session.aggregator
    assert agg is not None and agg.u1 is not None
    tags = []
    for s in survivors:
        if s == recipient:
            continue
        if s in agg.u1:
            others = [i for i in agg.u1 if i != s]
            tags.append(agg._tags[s][others.index(recipient)])
        else:
            tags.append(b"\x00" * secagg.TAG_LEN)  # no such member: no genuine tag
    # one tag per OTHER survivor (a recipient listed as dropped gets one tag fewer)
    tags = tags[: len(survivors) - 1]
    return Unmask(
        query_id=session.query_id, survivors=survivors, dropped=dropped, view_tags=tuple(tags)
    )


def tamper_first_unmask(monkeypatch: pytest.MonkeyPatch, tamper: Tamper) -> list[str]:
    """The querier sends ``tamper(...)`` instead of its Unmask to committee member 0.
    Returns (filled in once it happened) that member's peer id."""
    target: list[str] = []
    original = QuerySession._start_unmask

    def evil(self: QuerySession, now_ms: int) -> list[Effect]:
        effects = original(self, now_ms)
        victim = self.committee[0].peer_id
        target.append(victim)
        out: list[Effect] = []
        for effect in effects:
            if isinstance(effect, Send) and effect.peer == victim:
                agg = self.aggregator
                assert agg is not None and agg.survivors is not None
                genuine = unmask_for(self, 0, tuple(agg.survivors), tuple(agg.dropped))
                out += [self._send(victim, u, now_ms) for u in tamper(self, 0, genuine)]
            else:
                out.append(effect)
        return out

    monkeypatch.setattr(QuerySession, "_start_unmask", evil)
    return target


def _split(session: QuerySession, me: int, genuine: Unmask) -> list[Unmask]:
    # ask member 0 for member 1's MASK KEY share while the others reveal its SEED shares
    survivors = tuple(s for s in genuine.survivors if s != 1)
    return [unmask_for(session, me, survivors, tuple(sorted((*genuine.dropped, 1))))]


def _outsider(session: QuerySession, me: int, genuine: Unmask) -> list[Unmask]:
    outside = len(session.committee)  # an index no committee member has
    return [unmask_for(session, me, (*genuine.survivors, outside), genuine.dropped)]


def _not_in_u1(session: QuerySession, me: int, genuine: Unmask) -> list[Unmask]:
    survivors = tuple(s for s in genuine.survivors if s != 1)
    return [unmask_for(session, me, survivors, genuine.dropped)]


def _self_dropped(session: QuerySession, me: int, genuine: Unmask) -> list[Unmask]:
    survivors = tuple(s for s in genuine.survivors if s != me)
    return [unmask_for(session, me, survivors, tuple(sorted((*genuine.dropped, me))))]


def _twice(session: QuerySession, me: int, genuine: Unmask) -> list[Unmask]:
    # the genuine request, then one for member 1's mask key instead of its seed
    return [genuine, *_split(session, me, genuine)]


@pytest.mark.parametrize(
    ("tamper", "refusal"),
    [
        (_split, None),
        (_outsider, "bad_index_set"),
        (_not_in_u1, "view_mismatch"),
        (_self_dropped, "not_a_survivor"),
        (_twice, "already_revealed"),
    ],
    ids=[
        "mask-key-of-a-survivor",
        "outside-the-committee",
        "outside-u1",
        "self-dropped",
        "second-request",
    ],
)
async def test_member_refuses_reveals_it_does_not_owe_and_nothing_leaks(
    net: Net,
    monkeypatch: pytest.MonkeyPatch,
    revealed: Revealed,
    tamper: Tamper,
    refusal: str | None,
) -> None:
    target = tamper_first_unmask(monkeypatch, tamper)
    before = {m.peer_id: m.metrics for m in net.members}
    out = await net.query(secagg=True)
    everyone = sorted(m.peer_id for m in net.members)
    # the three honest reveals rebuild the sum: the query is fine
    assert out.ok, out.reason
    assert out.total is not None and np.array_equal(out.total, net.expected(everyone))
    victim = net.member(target[0])
    refused = delta(victim.metrics, before[victim.peer_id], "responder.refused.")
    if refusal is None:
        # the rules allow this one reveal (a consistent split of U1) ...
        assert refused == Counter()
        assert revealed.by_member[0] == 1
    else:
        assert refused == Counter({f"responder.refused.{refusal}": 1}), refused
        # a refused first request reveals nothing; a refused second one nothing more
        assert revealed.by_member[0] == (1 if refusal == "already_revealed" else 0)
        if refusal != "already_revealed":  # (that one comes after the query ended)
            assert net.querier.metrics.get(f"declined.refused_{refusal}", 0) == 1
    # ... and in no case does anyone hold t shares of both b_u and m_u of one member
    assert revealed.leaked(T) == []
    (ctx,) = revealed.keys
    assert revealed.keys[ctx][1] <= 1 < T  # member 1's mask key: at most the victim's share
    for m in net.members:
        assert m.metrics.get("internal_error", 0) == 0


async def test_unmask_from_someone_else_than_the_querier_reveals_nothing(
    net: Net, monkeypatch: pytest.MonkeyPatch, revealed: Revealed
) -> None:
    mallory = Identity.from_seed(b"malicious-test-mallory")
    transport = net.hub.transport(mallory.peer_id)
    await transport.start()
    sent: list[str] = []
    original = QuerySession._start_unmask

    def also_mallory(self: QuerySession, now_ms: int) -> list[Effect]:
        effects = original(self, now_ms)
        # Mallory, who saw the query's gossip, asks member 0 for member 1's mask key
        victim = self.committee[0].peer_id
        agg = self.aggregator
        assert agg is not None and agg.survivors is not None
        genuine = unmask_for(self, 0, tuple(agg.survivors), tuple(agg.dropped))
        forged = _split(self, 0, genuine)[0]
        sent.append(victim)
        asyncio.get_running_loop().create_task(
            transport.send(victim, seal(mallory, forged, now_ms))
        )
        return effects

    monkeypatch.setattr(QuerySession, "_start_unmask", also_mallory)
    try:
        before = {m.peer_id: m.metrics for m in net.members}
        out = await net.query(secagg=True)
        assert out.ok, out.reason
        victim = net.member(sent[0])
        rejected = delta(victim.metrics, before[victim.peer_id], "rejected.")
        assert rejected == Counter({"rejected.unexpected": 1}), rejected
        assert revealed.by_member[0] == 1  # only the querier's genuine request was answered
        assert revealed.leaked(T) == []
        (ctx,) = revealed.keys
        assert revealed.keys[ctx][1] == 0
    finally:
        await transport.aclose()
