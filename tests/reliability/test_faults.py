"""Faults and restarts on a paid network: nothing is lost, nothing is paid twice.

Six ``fi-peer run`` daemons (separate processes) over a private Mosquitto, paying
on an anvil that keeps its state in a file (``--state``). Peer 0 queries; its
committee is every live member (k = their number, threshold t = k // 2 + 1), so
the member to crash is always in it. Each test crashes something at an exact
point, with the test-only fault hook (fi_peer/faults.py: every daemon reads its
fault from ``<state dir>/fault``, absent = inert) or by stopping a process:

- a committee member SIGKILLed before its share (k = 5), after its share (its
  receipt came back; k = 4), before its reveal (k = 3): the query completes with
  the others, and the killed member is paid exactly when it delivered; with
  k = 2, a member killed before its share leaves fewer than t: the query fails
  with its reason, the share delivered is paid and the other one refunded;
- killed members restart with the same identity, privacy ledger (the charge of
  the answer they died on stays spent, once) and receipts;
- the querier SIGKILLed after its escrow, its query answered but not settled:
  the members claim with their receipts, the restarted querier refunds the rest;
- the broker restarted: the peers reconnect and answer again;
- anvil restarted (SIGINT dumps the state, started again on the same port):
  a query while it is down fails cleanly, the daemons pay again once it is back;
- at the end, past every deadline and grace: every escrowed wei went to exactly
  one place (settled to a member, claimed by one, refunded to the querier),
  everyone withdrew and the escrow holds 0.
The tests run in file order and share the network (module fixtures).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fi_peer.chain.anvil import AnvilChain, AnvilConfig, AnvilProcess, dev_accounts, free_port
from fi_peer.chain.artifacts import load_artifact
from fi_peer.chain.client import ChainClient, Deployment
from fi_peer.control import ControlError
from fi_peer.errors import FiPeerError
from fi_peer.faults import ENV as FAULT_ENV
from tests.chain.conftest import require_anvil
from tests.integration.support import (
    Mosquitto,
    deploy_on,
    load_local_network,
    paid_network,
    require_mosquitto,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRICE = 10**15
TIMEOUT_S = 6.0
GRACE_S = 30
SETTLE_WINDOW_S = 600


@dataclasses.dataclass
class Env:
    net: Any
    anvil: AnvilProcess
    broker: Mosquitto
    deployment: Deployment
    address: dict[str, str]  # peer id -> eth address
    samples: dict[str, Any]  # test digits: {"inputs": [...], "labels": [...]}
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    spent: dict[str, float] = dataclasses.field(default_factory=dict)  # before a crash


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_anvil()
    require_mosquitto()
    folder = tmp_path_factory.mktemp("faults")
    local_network = load_local_network()
    # trained once per session, shared with test_faults_partition.py (same arguments)
    cache = tmp_path_factory.getbasetemp() / "reliability-models"
    models: list[Path] = local_network.ensure_models(cache, 6, 0.5, 1, 5)
    samples = local_network.sample_inputs(models[0].parent)
    anvil = AnvilProcess(
        AnvilConfig(port=free_port(), state_path=folder / "anvil.json", state_interval_s=1)
    )
    anvil.start()
    broker = Mosquitto(folder).start()
    net = None
    try:
        deployment = deploy_on(anvil, claim_grace_s=GRACE_S)
        deployment_file = folder / "deployment.json"
        deployment.save(deployment_file)
        accounts = dev_accounts()

        PaidNetwork = paid_network(
            local_network,
            anvil.rpc_url,
            deployment_file,
            PRICE,
            settle_every_queries=1,
            settle_every_s=1.0,
            claim_every_s=0.5,
            settle_window_s=SETTLE_WINDOW_S,
        )

        class FaultyPaidNetwork(PaidNetwork):  # type: ignore[misc, valid-type]
            def start(self, peer: Any) -> None:
                self.env = {FAULT_ENV: f"@{peer.state_dir / 'fault'}"}
                super().start(peer)

        net = FaultyPaidNetwork(
            folder / "net",
            transport="mqtt",
            broker=broker.url,
            announce_interval_ms=500,
            offer_window_ms=1500,
        )
        net.prepare(models)
        net.start_all()
        net.wait_ready(timeout=120)
        net.wait_connected(timeout=60)
        address = {p.peer_id: accounts[1 + p.index].address for p in net.peers}
        yield Env(net, anvil, broker, deployment, address, samples)
    finally:
        if net is not None:
            net.stop_all()
        broker.stop()
        anvil.stop()


# -- helpers ---------------------------------------------------------------------------------


def _query(env: Env, k: int, n: int = 0) -> dict[str, Any]:
    querier = env.net.peers[0]
    answer = querier.client().post(
        "/v1/query",
        {
            "input": env.samples["inputs"][n],
            "k": k,
            "timeout_s": TIMEOUT_S,
            "max_price_wei": PRICE,
        },
        timeout=TIMEOUT_S + 15,
    )
    result: dict[str, Any] = answer["results"][0]
    return result


def _arm(peer: Any, fault: str) -> None:
    (peer.state_dir / "fault").write_text(fault)


def _killed(peer: Any) -> None:
    wait_until(lambda: peer.process.poll() is not None, timeout=15, what=f"{peer.name} to die")
    assert peer.process.returncode == -signal.SIGKILL, peer.process.returncode
    (peer.state_dir / "fault").unlink(missing_ok=True)


def _restart(env: Env, *peers: Any) -> None:
    for peer in peers:
        (peer.state_dir / "fault").unlink(missing_ok=True)
        env.net.start(peer)
    env.net.wait_ready(list(peers), timeout=150)
    env.net.wait_connected(timeout=60)


def _status(env: Env, peer: Any) -> dict[str, Any]:
    status = env.net.status(peer)
    assert status is not None
    return status


def _chain_metrics(env: Env, peer: Any) -> dict[str, int]:
    metrics: dict[str, int] = _status(env, peer)["chain"]["metrics"]
    return metrics


def _settled(env: Env, n: int) -> None:
    """Wait until the querier has settled ``n`` queries in all."""
    querier = env.net.peers[0]
    wait_until(
        lambda: _chain_metrics(env, querier).get("settle.queries", 0) >= n,
        timeout=30,
        what=f"{n} settled queries",
    )


def _rows(path: Path, sql: str, *args: Any) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(sql, args).fetchone()[0])


def _charges(peer: Any, query_id: str) -> int:
    sql = "SELECT COUNT(*) FROM charges WHERE query_id = ?"
    return _rows(peer.state_dir / "budget.sqlite", sql, bytes.fromhex(query_id))


def _receipts(peer: Any, query_id: bytes) -> int:
    sql = "SELECT COUNT(*) FROM chain_receipts WHERE query_id = ?"
    return _rows(peer.state_dir / "receipts.sqlite", sql, query_id)


def _spent(env: Env, peer: Any) -> float:
    return float(_status(env, peer)["privacy"]["global_epsilon_spent"])


def _paid_in(env: Env, result: dict[str, Any], peer: Any) -> tuple[bool, bool]:
    """(in the committee, delivered) of ``peer`` in a paid query's result."""
    pay = result["payment"]
    eth = env.address[peer.peer_id]
    return eth in pay["committee"], eth in pay["delivered"]


def _crash_a_member(env: Env, fault: str, index: int, k: int, n: int) -> dict[str, Any]:
    """Query with the k live members while member ``index`` carries ``fault``."""
    peers = env.net.peers
    victim = peers[index]
    env.spent[victim.name] = _spent(env, victim)
    settled_before = _chain_metrics(env, peers[0]).get("settle.queries", 0)
    _arm(victim, fault)
    result = _query(env, k, n)
    _killed(victim)
    assert result["committee_size"] == k
    _settled(env, settled_before + 1)  # paid or not, every escrow is settled
    env.results[fault if k > 2 else "too_few"] = result
    return result


# -- committee members crash (no restart in between: one fewer live member each time) ------------


def test_a_member_killed_before_its_share_is_not_paid_and_the_others_answer(env: Env) -> None:
    result = _crash_a_member(env, "exit_before_share", 1, k=5, n=0)
    assert result["ok"], result["reason"]
    assert len(result["contributors"]) == 4  # the survivors of the share round
    assert env.net.peers[1].peer_id not in result["contributors"]
    assert _paid_in(env, result, env.net.peers[1]) == (True, False)
    assert len(result["payment"]["delivered"]) == 4


def test_a_member_killed_after_its_share_is_paid_and_the_others_answer(env: Env) -> None:
    result = _crash_a_member(env, "exit_after_share", 2, k=4, n=1)
    assert result["ok"], result["reason"]
    assert _paid_in(env, result, env.net.peers[2]) == (True, True)
    assert len(result["payment"]["delivered"]) == 4


def test_a_member_killed_before_its_reveal_is_paid_and_the_others_answer(env: Env) -> None:
    result = _crash_a_member(env, "exit_before_reveal", 3, k=3, n=2)
    assert result["ok"], result["reason"]
    assert _paid_in(env, result, env.net.peers[3]) == (True, True)
    assert len(result["payment"]["delivered"]) == 3


def test_fewer_than_t_left_the_query_fails_cleanly(env: Env) -> None:
    result = _crash_a_member(env, "exit_before_share", 4, k=2, n=3)
    assert not result["ok"]
    assert result["reason"] == "too_few_shares_1_of_2"
    assert "label" not in result and result["contributors"] == []
    assert _paid_in(env, result, env.net.peers[4]) == (True, False)
    assert _paid_in(env, result, env.net.peers[5]) == (True, True)  # its share is paid


# -- restarts --------------------------------------------------------------------------------


def test_restarted_members_keep_identity_ledger_and_receipts(env: Env) -> None:
    a, c = env.net.peers[1], env.net.peers[3]
    _restart(env, a, c)
    for peer, fault in ((a, "exit_before_share"), (c, "exit_before_reveal")):
        assert _status(env, peer)["peer_id"] == peer.peer_id
        query_id = env.results[fault]["query_id"]
        # charged before the share could leave, durably, and once
        assert _charges(peer, query_id) == 1
        assert _spent(env, peer) > env.spent[peer.name]
    # c's receipt for the share it delivered before dying is still in its store
    assert _receipts(c, bytes.fromhex(env.results["exit_before_reveal"]["query_id"])) == 1


def test_the_querier_killed_before_settling_its_members_keep_their_receipts(env: Env) -> None:
    querier = env.net.peers[0]
    live = [env.net.peers[i] for i in (1, 3, 5)]
    kept_before = [_chain_metrics(env, m).get("receipts.kept", 0) for m in live]
    _arm(querier, "exit_before_settle")
    with pytest.raises((ControlError, FiPeerError, OSError)):
        _query(env, 3, 4)
    _killed(querier)
    for m, before in zip(live, kept_before, strict=True):
        wait_until(
            lambda m=m, b=before: _chain_metrics(env, m).get("receipts.kept", 0) == b + 1,
            timeout=10,
            what=f"{m.name} to keep its receipt",
        )
    # a member crashes too; both come back
    member = live[0]
    assert member.process is not None
    member.process.kill()
    member.process.wait(10)
    _restart(env, querier, member)
    assert _status(env, querier)["peer_id"] == querier.peer_id
    assert _status(env, member)["chain"]["metrics"].get("receipts.kept", 0) == 0  # a new process


# -- the broker and the chain node restart ----------------------------------------------------


def test_the_broker_restarts_and_the_peers_answer_again(env: Env) -> None:
    port = env.broker.port
    env.broker.stop()
    wait_until(
        lambda: all(
            _status(env, p)["transport"]["connected"] == 0 for p in env.net.peers if _alive(p)
        ),
        timeout=20,
        what="the peers to notice the broker left",
    )
    env.broker.port = port
    env.broker.restart_on_same_port()
    env.net.wait_connected([p for p in env.net.peers if _alive(p)], timeout=30)
    settled_before = _chain_metrics(env, env.net.peers[0]).get("settle.queries", 0)
    result = _query(env, 3, 5)
    assert result["ok"], result["reason"]
    assert len(result["payment"]["delivered"]) == 3
    _settled(env, settled_before + 1)


def test_the_chain_node_restarts_and_the_daemons_pay_again(env: Env) -> None:
    querier = env.net.peers[0]
    assert env.anvil.stop() == 0  # SIGINT: the state is dumped
    down = _query(env, 3, 6)
    assert not down["ok"]
    assert down["reason"] in ("escrow_failed", "deadline_before_escrow")
    assert "payment" not in down  # nothing escrowed, nothing owed
    env.anvil.start()
    settled_before = _chain_metrics(env, querier).get("settle.queries", 0)
    result = _query(env, 3, 7)
    assert result["ok"], result["reason"]
    assert len(result["payment"]["delivered"]) == 3
    _settled(env, settled_before + 1)


def _alive(peer: Any) -> bool:
    return peer.process is not None and peer.process.poll() is None


# -- the end: every wei accounted for ----------------------------------------------------------


def test_every_escrowed_wei_went_to_exactly_one_place(env: Env) -> None:
    client = ChainClient.connect(env.anvil.rpc_url, dev_accounts()[9].key, env.deployment)
    chain = AnvilChain.of(env.anvil)
    accounts = [a.address for a in dev_accounts()]
    live = [p for p in env.net.peers if _alive(p)]

    def total(name: str) -> int:
        return sum(_chain_metrics(env, p).get(name, 0) for p in live)

    try:
        before = asyncio.run(_events(client, env.deployment))
        settled = {e.args["queryId"] for e in before["QuerySettled"]}
        unsettled = [e for e in before["QueryOpened"] if e.args["queryId"] not in settled]
        assert len(unsettled) == 1  # the dead querier's
        deadline = unsettled[0].args["deadline"]
        last = max(e.args["deadline"] for e in before["QueryOpened"])
        # past its deadline, within its grace: its members claim with their receipts
        now = asyncio.run(client.chain_time())
        asyncio.run(chain.increase_time(deadline + 1 - now))
        wait_until(lambda: total("claims") >= 3, timeout=30, what="3 claims")
        # past every grace: the querier refunds what nobody delivered
        now = asyncio.run(client.chain_time())
        asyncio.run(chain.increase_time(last + GRACE_S + 1 - now))
        wait_until(
            lambda: _chain_metrics(env, env.net.peers[0]).get("refunds", 0) >= 3,
            timeout=30,
            what="3 refunds",
        )
        # one block for all three readings: members keep withdrawing, and a
        # withdrawal mined between them would look like lost money
        events, balances, held = asyncio.run(_snapshot(client, env.deployment, accounts))
    finally:
        asyncio.run(client.aclose())

    opened = {e.args["queryId"]: e for e in events["QueryOpened"]}
    assert len(opened) == 7  # 4 crashes, the dead querier's, after the broker, after anvil
    outflow: Counter[bytes] = Counter()
    paid_to: defaultdict[bytes, list[str]] = defaultdict(list)
    for e in events["QuerySettled"]:
        q = opened[e.args["queryId"]].args
        outflow[q["queryId"]] += e.args["paid"]
        paid_to[q["queryId"]] += [
            m for i, m in enumerate(q["committee"]) if e.args["delivered"] >> i & 1
        ]
    for e in events["Claimed"]:
        outflow[e.args["queryId"]] += e.args["amount"]
        paid_to[e.args["queryId"]].append(e.args["member"])
    refunded = {e.args["queryId"]: e.args["amount"] for e in events["Refunded"]}
    for qid, amount in refunded.items():
        outflow[qid] += amount
    for qid, e in opened.items():
        escrowed = len(e.args["committee"]) * e.args["price"]
        assert outflow[qid] == escrowed, f"query {qid.hex()}: {outflow[qid]} of {escrowed} wei"
        assert len(paid_to[qid]) == len(set(paid_to[qid])), "a member was paid twice"
    deposits = sum(len(e.args["committee"]) * e.args["price"] for e in opened.values())
    withdrawn = sum(e.args["amount"] for e in events["Withdrawn"])
    assert withdrawn + sum(balances) == deposits  # nothing lost ...
    assert held == sum(balances)  # ... and the escrow holds exactly what is still owed

    def paid(name: str, index: int) -> int:
        qid = bytes.fromhex(env.results[name]["query_id"])
        return paid_to[qid].count(env.address[env.net.peers[index].peer_id])

    assert paid("exit_before_share", 1) == 0 and paid("too_few", 4) == 0
    assert paid("exit_after_share", 2) == 1 and paid("exit_before_reveal", 3) == 1
    assert paid("too_few", 5) == 1
    assert refunded[bytes.fromhex(env.results["exit_before_share"]["query_id"])] == PRICE
    assert refunded[bytes.fromhex(env.results["too_few"]["query_id"])] == PRICE
    # the dead querier's query: paid by its members' claims (one after a restart), once each
    orphans = {e.args["queryId"] for e in events["Claimed"]}
    assert len(orphans) == 1
    (orphan,) = orphans
    assert sorted(paid_to[orphan]) == sorted(opened[orphan].args["committee"])
    assert refunded[orphan] == 0


async def _events(
    client: ChainClient, deployment: Deployment, block: int | str = "latest"
) -> dict[str, list[Any]]:
    logs = await client.w3.eth.get_logs(
        {"address": deployment.escrow, "fromBlock": deployment.block, "toBlock": block}
    )
    out: dict[str, list[Any]] = defaultdict(list)
    for raw in logs:
        event = client.codec.decode_log(raw)
        if event is not None:
            out[event.name].append(event)
    return out


async def _snapshot(
    client: ChainClient, deployment: Deployment, accounts: list[str]
) -> tuple[dict[str, list[Any]], list[int], int]:
    """Escrow events, escrow balances of ``accounts`` and the escrow's ether, all
    as of one block."""
    block = await client.w3.eth.block_number
    escrow = client.w3.eth.contract(
        address=deployment.escrow, abi=load_artifact("QueryEscrow").abi_list()
    )
    balances = [
        int(await escrow.functions.balanceOf(a).call(block_identifier=block)) for a in accounts
    ]
    held = int(await client.w3.eth.get_balance(deployment.escrow, block_identifier=block))
    return await _events(client, deployment, block), balances, held
