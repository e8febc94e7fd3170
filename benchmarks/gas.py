"""Gas per settled query: unbatched and batched, for committees of k = 3, 8, 16, 32.

For each chain (anvil from node_modules, and the in-process eth-tester chain)
the benchmark deploys the contracts, then for each k and each member-pool
scenario opens queries with random committees (seeded) drawn from the pool,
and settles them with every member delivered:

- ``unbatched``: one ``settle`` transaction per query;
- ``weighted``: one ``settleWeighted`` per query (a reward rule; unequal amounts),
  with its ratio to ``unbatched`` measured in the same run;
- ``batched_10`` / ``batched_100``: one ``settleBatch`` per 10 / 100 queries.

The figure is the transaction's ``gasUsed`` divided by its number of queries,
everything included (the 21,000 base, calldata, storage, events). Members are
*returning* (they hold a balance from earlier queries, the steady state: a
member's first credit ever costs ~17,100 gas more, once). A batch credits each
distinct member once, so its cost depends on how many distinct members its
queries name; the scenarios bracket that:

- ``same_committee``: every query of the querier goes to the same k members;
- ``pool_16`` / ``pool_64``: committees drawn at random from 16 / 64 peers
  (at least k).

Goal (issue 6): a batched k=8 query settles for under 21,000 gas.
Run ``python -m benchmarks.gas`` (``--help``); writes benchmarks/results/gas.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from eth_utils import keccak, to_checksum_address
from web3 import AsyncHTTPProvider

from fi_peer.chain.anvil import AnvilChain, AnvilProcess, anvil_binary
from fi_peer.chain.artifacts import load_artifact
from fi_peer.chain.client import ChainClient, Deployment, deploy_artifact
from fi_peer.chain.devchain import DevChain, eth_tester_chain
from fi_peer.chain.receipts import PaymentReceipt
from fi_peer.chain.terms import QueryTerms, Settlement, WeightedSettlement
from fi_peer.incentives.rewards import settlement_amounts

DEFAULT_OUT = Path(__file__).parent / "results" / "gas.json"
KS = (3, 8, 16, 32)
SCENARIOS = {"same_committee": 0, "pool_16": 16, "pool_64": 64}
PRICE = 10**15
GOAL_K = 8
GOAL_GAS = 21_000
SEED = 6


def member_address(i: int) -> str:
    """Deterministic member accounts (they only receive credits: no keys needed)."""
    return to_checksum_address(keccak(text=f"fi-peer gas benchmark member {i}")[-20:])


class Bench:
    def __init__(self, devchain: DevChain) -> None:
        self.devchain = devchain
        self.next_id = 0

    def qid(self) -> bytes:
        self.next_id += 1
        return self.next_id.to_bytes(16, "big")

    async def open_many(
        self, q: ChainClient, committees: list[list[str]], deadline: int
    ) -> list[QueryTerms]:
        out = []
        for committee in committees:
            terms = q.new_terms(self.qid(), committee, PRICE, deadline)
            await q.open_query(terms)
            out.append(terms)
        return out


def _weighted(terms: QueryTerms) -> WeightedSettlement:
    """All delivered, paid by weights 1, 2, ..., k above the floor (every amount differs)."""
    amounts = settlement_amounts(
        terms.price_wei,
        [True] * terms.size,
        list(range(1, terms.size + 1)),
        min_share_wei=terms.min_share_wei,
    )
    return WeightedSettlement(terms, terms.full_mask, tuple(amounts))


async def run_chain(devchain: DevChain, name: str, queries: dict[str, int]) -> dict[str, Any]:
    w3 = devchain.web3()
    try:
        return await _run_chain(devchain, name, queries, w3)
    finally:
        if isinstance(w3.provider, AsyncHTTPProvider):
            await w3.provider.disconnect()


async def _run_chain(
    devchain: DevChain, name: str, queries: dict[str, int], w3: Any
) -> dict[str, Any]:
    rng = random.Random(SEED)
    deployer, querier_account = devchain.accounts[0], devchain.accounts[1]
    escrow = await deploy_artifact(w3, deployer, load_artifact("QueryEscrow"), [60])
    registry = await deploy_artifact(w3, deployer, load_artifact("PeerRegistry"), [0, 86_400])
    assert escrow.contract_address and registry.contract_address
    deployment = Deployment(
        chain_id=int(await w3.eth.chain_id),
        escrow=escrow.contract_address,
        registry=registry.contract_address,
        block=escrow.block_number,
        claim_grace_s=60,
        min_stake_wei=0,
        unbonding_s=86_400,
    )
    deploy_gas = {"QueryEscrow": escrow.gas_used, "PeerRegistry": registry.gas_used}
    q = ChainClient(w3, querier_account, deployment)
    bench = Bench(devchain)
    started = time.perf_counter()

    # Single operations, for reference.
    ops: dict[str, Any] = {"openQuery": {}}
    deadline = await q.chain_time() + 3_600
    members = [member_address(i) for i in range(64)]
    for k in KS:
        terms = q.new_terms(bench.qid(), members[:k], PRICE, deadline)
        ops["openQuery"][str(k)] = (await q.open_query(terms)).gas_used

    # Warm up: give every pool member a balance, so measured credits are "returning".
    warm = [members[i : i + 32] for i in range(0, 64, 32)]
    warm_terms = await bench.open_many(q, warm, deadline)
    first_time = await q.settle_batch([Settlement(t, t.full_mask) for t in warm_terms])
    ops["settleBatch_first_credit_2x32_members"] = first_time.gas_used

    settlement: dict[str, Any] = {}
    for scenario, pool_size in SCENARIOS.items():
        settlement[scenario] = {}
        for k in KS:
            pool = members[: max(pool_size, k)] if pool_size else members[:k]

            def committee(pool: list[str] = pool, k: int = k) -> list[str]:
                return rng.sample(pool, k)

            row: dict[str, Any] = {}
            deadline = await q.chain_time() + 3_600
            # unbatched
            opened = await bench.open_many(
                q, [committee() for _ in range(queries["unbatched"])], deadline
            )
            gas = [(await q.settle(t, t.committee)).gas_used for t in opened]
            row["unbatched"] = round(statistics.mean(gas))
            # weighted (a reward rule: settleWeighted, one query per transaction)
            opened = await bench.open_many(
                q, [committee() for _ in range(queries["unbatched"])], deadline
            )
            gas = [(await q.settle_weighted(_weighted(t))).gas_used for t in opened]
            row["weighted"] = round(statistics.mean(gas))
            row["weighted_over_unbatched"] = round(row["weighted"] / row["unbatched"], 3)
            # batched
            for size in (10, 100):
                per_query: list[float] = []
                distinct: list[int] = []
                for _ in range(queries[f"batches_of_{size}"]):
                    opened = await bench.open_many(q, [committee() for _ in range(size)], deadline)
                    result = await q.settle_batch([Settlement(t, t.full_mask) for t in opened])
                    per_query.append(result.gas_used / size)
                    distinct.append(len({m for t in opened for m in t.committee}))
                row[f"batched_{size}"] = round(statistics.mean(per_query))
                row[f"distinct_members_batched_{size}"] = round(statistics.mean(distinct), 1)
            settlement[scenario][str(k)] = row
            print(
                f"  {name:10s} {scenario:15s} k={k:2d}  unbatched {row['unbatched']:7,d}"
                f"  weighted {row['weighted']:7,d}"
                f"  batched 10 {row['batched_10']:7,d}  batched 100 {row['batched_100']:7,d}",
                file=sys.stderr,
            )

    # Claim (by a committee member holding a receipt), refund, withdraw, register.
    claimer = ChainClient(w3, devchain.accounts[2], deployment)
    deadline = await q.chain_time() + 30
    claimed = q.new_terms(bench.qid(), [claimer.address, *members[:7]], PRICE, deadline)
    await q.open_query(claimed)
    await devchain.increase_time(31)
    receipt = PaymentReceipt(query_id=claimed.query_id, member=claimer.address, amount_wei=PRICE)
    signature = q.sign_receipt(claimed.query_id, claimer.address, PRICE)
    ops["claim_k8"] = (await claimer.claim(claimed, receipt, signature, delivered=0)).gas_used
    await devchain.increase_time(61)
    ops["refund_k8"] = (await q.refund(claimed, delivered=0)).gas_used
    ops["withdraw"] = (await claimer.withdraw()).gas_used
    ops["register"] = (await claimer.register(b"\x01" * 32, b"\x02" * 32)).gas_used

    sizes = {}
    for contract in ("QueryEscrow", "PeerRegistry"):
        art = load_artifact(contract)
        sizes[contract] = {
            "runtime_bytes": len(art.deployed_bytecode),
            "initcode_bytes": len(art.bytecode),
            "deploy_gas": deploy_gas[contract],
        }
    return {
        "chain_id": deployment.chain_id,
        "seconds": round(time.perf_counter() - started, 1),
        "contracts": sizes,
        "operations": ops,
        "settlement_gas_per_query": settlement,
    }


def _goal(chains: dict[str, Any]) -> dict[str, Any]:
    goal: dict[str, Any] = {"k": GOAL_K, "under_gas": GOAL_GAS, "per_chain": {}}
    met = True
    for name, res in chains.items():
        rows = {s: res["settlement_gas_per_query"][s][str(GOAL_K)] for s in SCENARIOS}
        goal["per_chain"][name] = {
            s: {"batched_10": r["batched_10"], "batched_100": r["batched_100"]}
            for s, r in rows.items()
        }
        met = met and all(r["batched_100"] < GOAL_GAS for r in rows.values())
    goal["met_for_batches_of_100_in_every_scenario"] = met
    return goal


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    queries = {
        "unbatched": args.unbatched,
        "batches_of_10": args.batches_of_10,
        "batches_of_100": 1,
    }
    chains: dict[str, Any] = {}
    if "eth-tester" in args.chains:
        print("eth-tester (in process)", file=sys.stderr)
        chains["eth-tester"] = await run_chain(eth_tester_chain(), "eth-tester", queries)
    if "anvil" in args.chains:
        print(f"anvil ({anvil_binary()})", file=sys.stderr)
        process = AnvilProcess()
        await asyncio.to_thread(process.start)
        try:
            chains["anvil"] = await run_chain(AnvilChain.of(process), "anvil", queries)
        finally:
            await asyncio.to_thread(process.stop)
    return {
        "benchmark": "gas",
        "settings": {
            "ks": list(KS),
            "scenarios": {s: (p or "k") for s, p in SCENARIOS.items()},
            "price_wei": PRICE,
            "all_delivered": True,
            "members": "returning (nonzero balance before the measured settlements)",
            "queries": queries,
            "seed": SEED,
            "compiler": load_artifact("QueryEscrow").compiler,
            "compiler_settings": dict(load_artifact("QueryEscrow").settings),
            "versions": {
                "python": platform.python_version(),
                "web3": version("web3"),
                "eth-tester": version("eth-tester"),
                "py-evm": version("py-evm"),
                "anvil": "1.7.1 (npm @foundry-rs/anvil)",
            },
        },
        "goal": _goal(chains),
        "chains": chains,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gas", description=__doc__)
    parser.add_argument(
        "--chains",
        nargs="+",
        choices=["anvil", "eth-tester"],
        default=["anvil", "eth-tester"],
    )
    parser.add_argument("--unbatched", type=int, default=5, help="queries settled singly")
    parser.add_argument("--batches-of-10", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if "anvil" in args.chains and not anvil_binary().is_file():
        parser.error(f"anvil not found at {anvil_binary()}: run npm ci, or --chains eth-tester")
    report = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["goal"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
