"""Settlement on an EVM chain: escrow per query, receipts, batching, indexing.

The contracts (``contracts/*.sol``, built to ``contracts/build/``) are
QueryEscrow (escrow, settle, settleBatch, claim, refund, withdraw) and
PeerRegistry (account -> Ed25519 + X25519 keys, optional stake). This package
is their Python side:

- :mod:`~fi_peer.chain.terms`     query terms and their on-chain commitment (pure)
- :mod:`~fi_peer.chain.receipts`  EIP-712 payment receipts: sign, verify (pure)
- :mod:`~fi_peer.chain.client`    :class:`ChainClient` (async), deployment
- :mod:`~fi_peer.chain.txsender`  nonces, gas and fees under concurrency
- :mod:`~fi_peer.chain.store`     receipts a member holds (sqlite)
- :mod:`~fi_peer.chain.indexer`   idempotent, resumable event index (sqlite)
- :mod:`~fi_peer.chain.devchain`  :class:`DevChain`; in-process eth-tester chain
- :mod:`~fi_peer.chain.anvil`     anvil process manager and :class:`AnvilChain`
- :mod:`~fi_peer.chain.artifacts` compiled contracts, staleness check
- :mod:`~fi_peer.chain.errors`    the :class:`ChainError` family
"""

from fi_peer.chain.anvil import AnvilChain, AnvilConfig, AnvilProcess
from fi_peer.chain.artifacts import Artifact, load_artifact, stale_sources
from fi_peer.chain.client import (
    ChainClient,
    Deployment,
    PeerRecord,
    QueryStatus,
    deploy_contracts,
)
from fi_peer.chain.devchain import DevChain, EthTesterChain, eth_tester_chain
from fi_peer.chain.errors import (
    ArtifactError,
    BatchTooLarge,
    ChainError,
    ChainUnavailable,
    ContractRevert,
    InvalidReceipt,
    TransactionFailed,
)
from fi_peer.chain.indexer import EventIndexer, IndexedEvent, indexer_for
from fi_peer.chain.receipts import (
    PaymentReceipt,
    ReceiptDomain,
    recover_receipt_signer,
    sign_receipt,
    verify_receipt,
)
from fi_peer.chain.store import ReceiptState, ReceiptStore, StoredReceipt
from fi_peer.chain.terms import (
    QueryTerms,
    Settlement,
    WeightedSettlement,
    encode_batch,
    plan_batches,
)
from fi_peer.chain.txsender import GasPolicy, TxResult, TxSender

__all__ = [
    "AnvilChain",
    "AnvilConfig",
    "AnvilProcess",
    "Artifact",
    "ArtifactError",
    "BatchTooLarge",
    "ChainClient",
    "ChainError",
    "ChainUnavailable",
    "ContractRevert",
    "Deployment",
    "DevChain",
    "EthTesterChain",
    "EventIndexer",
    "GasPolicy",
    "IndexedEvent",
    "InvalidReceipt",
    "PaymentReceipt",
    "PeerRecord",
    "QueryStatus",
    "QueryTerms",
    "ReceiptDomain",
    "ReceiptState",
    "ReceiptStore",
    "Settlement",
    "StoredReceipt",
    "TransactionFailed",
    "TxResult",
    "TxSender",
    "WeightedSettlement",
    "deploy_contracts",
    "encode_batch",
    "eth_tester_chain",
    "indexer_for",
    "load_artifact",
    "plan_batches",
    "recover_receipt_signer",
    "sign_receipt",
    "stale_sources",
    "verify_receipt",
]
