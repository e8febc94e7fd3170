"""A scripted settlement history for the explorer tests (eth-tester or anvil).

Accounts: 0 deployer, 1 querier, 2..7 members m0..m5, 8 outsider, 9 second querier.
Every path of the escrow and registry appears once:

- m0..m3 register (stakes 1_000 + i wei); m3 later deregisters.
- q1 (m0 m1 m2) is opened and settled with ``settle``, all delivered.
- q2 (m1 m2 m3) and q3 (m0 m3) are settled together with ``settleBatch``;
  q3 without m3, who then claims its share with the querier's receipt.
- q4 (m4 m5) is settled with only m4; m5 claims ``CLAIM4`` (less than the
  price). m4 and m5 earn nothing else: their balances are q4's payouts.
- q5 (m0 m1), the second querier's, is never settled; after the deadline and
  the grace anyone (the outsider) refunds it.
- m0 withdraws its balance.

Prices differ per query and are not round, so every sum is checked to the wei.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from fi_peer.chain.client import ChainClient, Deployment, deploy_contracts
from fi_peer.chain.devchain import DevChain
from fi_peer.chain.receipts import PaymentReceipt
from fi_peer.chain.terms import QueryTerms, Settlement, checksum
from tests.chain.helpers import close_web3

GRACE_S = 100
MIN_STAKE = 1_000
UNBONDING_S = 500
PRICES = {
    "q1": 1_000_000_000_000_001,
    "q2": 2_000_000_000_000_003,
    "q3": 3_000_000_000_000_005,
    "q4": 7_000_000_000_000_007,
    "q5": 500_000_000_000_011,
}
CLAIM4 = PRICES["q4"] - 5
QUERY_IDS = {
    "q1": bytes.fromhex("a1" * 16),
    "q2": bytes.fromhex("b2" * 16),
    "q3": bytes.fromhex("c3" * 16),
    "q4": bytes.fromhex("d4e5f60718293a4b5c6d7e8f90a1b2c3"),
    "q5": bytes.fromhex("e5" * 16),
}


def keys_of(i: int) -> tuple[bytes, bytes]:
    return (
        hashlib.sha256(f"ed25519 {i}".encode()).digest(),
        hashlib.sha256(f"x25519 {i}".encode()).digest(),
    )


@dataclass
class History:
    deployment: Deployment
    querier: str
    querier2: str
    outsider: str
    members: list[str]
    terms: dict[str, QueryTerms] = field(default_factory=dict)
    tx: dict[str, bytes] = field(default_factory=dict)  # step name -> tx hash
    withdrawn: dict[str, int] = field(default_factory=dict)

    def payouts(self, name: str) -> dict[str, int]:
        """What each member of query ``name`` was paid, from the script itself."""
        t = self.terms[name]
        price = t.price_wei
        if name == "q1":
            return dict.fromkeys(t.committee, price)
        if name == "q2":
            return dict.fromkeys(t.committee, price)
        if name == "q3":
            return dict.fromkeys(t.committee, price)  # m0 settled, m3 claimed the full price
        if name == "q4":
            return {self.members[4]: price, self.members[5]: CLAIM4}
        return dict.fromkeys(t.committee, 0)


async def script_history(devchain: DevChain) -> History:
    accounts = devchain.accounts
    w3 = devchain.web3()
    try:
        deployment = await deploy_contracts(
            w3,
            accounts[0],
            claim_grace_s=GRACE_S,
            min_stake_wei=MIN_STAKE,
            unbonding_s=UNBONDING_S,
        )
        client = {i: ChainClient(w3, accounts[i], deployment) for i in range(10)}
        querier, querier2, outsider = client[1], client[9], client[8]
        members = [client[i] for i in range(2, 8)]
        h = History(
            deployment=deployment,
            querier=querier.address,
            querier2=querier2.address,
            outsider=outsider.address,
            members=[m.address for m in members],
        )
        for i, m in enumerate(members[:4]):
            ed, x = keys_of(i)
            h.tx[f"register m{i}"] = (await m.register(ed, x, stake_wei=MIN_STAKE + i)).tx_hash

        now = await querier.chain_time()

        async def open_(name: str, who: ChainClient, seats: list[int], deadline_in: int) -> None:
            terms = who.new_terms(
                QUERY_IDS[name], [h.members[i] for i in seats], PRICES[name], now + deadline_in
            )
            h.terms[name] = terms
            h.tx[f"open {name}"] = (await who.open_query(terms)).tx_hash

        await open_("q1", querier, [0, 1, 2], 1_000)
        h.tx["settle q1"] = (await querier.settle(h.terms["q1"], h.terms["q1"].committee)).tx_hash

        await open_("q2", querier, [1, 2, 3], 1_000)
        await open_("q3", querier, [0, 3], 1_000)
        q2, q3 = h.terms["q2"], h.terms["q3"]
        batch = [
            Settlement(q2, q2.full_mask),
            Settlement(q3, q3.mask_of([h.members[0]])),
        ]
        h.tx["settleBatch q2 q3"] = (await querier.settle_batch(batch)).tx_hash
        sig = querier.sign_receipt(q3.query_id, h.members[3], q3.price_wei)
        receipt = PaymentReceipt(
            query_id=q3.query_id, member=checksum(h.members[3]), amount_wei=q3.price_wei
        )
        h.tx["claim q3"] = (await members[3].claim(q3, receipt, sig)).tx_hash

        await open_("q4", querier, [4, 5], 1_000)
        q4 = h.terms["q4"]
        h.tx["settle q4"] = (await querier.settle(q4, [h.members[4]])).tx_hash
        sig = querier.sign_receipt(q4.query_id, h.members[5], CLAIM4)
        receipt = PaymentReceipt(
            query_id=q4.query_id, member=checksum(h.members[5]), amount_wei=CLAIM4
        )
        h.tx["claim q4"] = (await members[5].claim(q4, receipt, sig)).tx_hash

        await open_("q5", querier2, [0, 1], 50)
        await devchain.increase_time(50 + GRACE_S + 10)
        h.tx["refund q5"] = (await outsider.refund(h.terms["q5"])).tx_hash

        balance = await members[0].balance()
        h.tx["withdraw m0"] = (await members[0].withdraw()).tx_hash
        h.withdrawn[h.members[0]] = balance
        h.tx["deregister m3"] = (await members[3].deregister()).tx_hash
        return h
    finally:
        await close_web3(w3)
