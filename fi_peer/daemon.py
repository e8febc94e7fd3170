"""``fi-peer run``: one owner's peer as a long-running process.

The daemon is the only place that wires a concrete transport in (DESIGN.md,
"Layers"). Startup, in order; any failure ends the process with one line:

1. lock the state dir (one daemon per state dir) and read the keystore
   (passphrase from ``$FI_PEER_PASSPHRASE`` unless the keystore is the
   explicit plaintext kind written by ``init --insecure-plaintext-keys``);
2. load the owner's model (``ModelRuntime.load``) and open its privacy budget
   ledger (``<state_dir>/budget.sqlite``: every answer is charged there before
   its share leaves, across restarts; limits from ``[privacy]``);
3. start the transport (libp2p, or MQTT, optionally with an embedded amqtt
   broker), then give the core the transport's real addresses (known only
   once it listens) and start the agent;
4. start the control API on loopback and write ``<state_dir>/control.json``
   (URL + bearer token, mode 0600).

Then three tasks run until SIGINT/SIGTERM: ``watch`` (logs peers joining and
expiring, dials announced libp2p addresses of peers it is not connected to,
re-announces when a new connection appears, logs answered queries),
``bootstrap`` (one per bootstrap address: dial, retry with backoff, redial
when the connection is lost) and the control server. Shutdown closes the
control API, removes the control file, closes the agent (and with it the
transport: connections are closed, the MQTT presence marker cleared), the
embedded broker and the ledger; every step is bounded in time, so SIGTERM
always ends the process. ``kill -USR1 <pid>`` logs what every asyncio task
is waiting for, ``kill -USR2 <pid>`` every thread's stack.

Known gaps, worked around here without touching ``fi_peer.agent`` or
``fi_peer.protocol``: the core has no "goodbye" message, so a peer that
leaves is forgotten by the others only after ``missed_beats`` announcement
intervals; and the agent exposes no membership events, so ``watch`` polls
the membership table five times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import fcntl
import gc
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fi_peer.agent import Agent, LedgerGuard, relay_check
from fi_peer.chain.client import ChainClient, Deployment
from fi_peer.chain.errors import ChainError
from fi_peer.chain.store import ReceiptState, ReceiptStore
from fi_peer.chain.terms import checksum
from fi_peer.config import MAX_K, ChainConfig, PeerConfig
from fi_peer.control import (
    ControlInfo,
    ControlServer,
    Json,
    RequestError,
    new_token,
    remove_control_file,
    write_control_file,
)
from fi_peer.errors import ConfigError, FiPeerError, KeystoreError, LocalProtocolError
from fi_peer.he_runtime import HE_RULE, HE_RULES, HERuntime, runtime_for
from fi_peer.identity import Identity, load_keystore
from fi_peer.metrics import PeerMetrics
from fi_peer.models.aggregation import decide, get_rule
from fi_peer.models.runtime import ModelRuntime
from fi_peer.privacy.budget import BudgetLedger, BudgetLimits
from fi_peer.protocol.audit import AuditBook
from fi_peer.protocol.he_messages import (
    HE_BATCH_MIN,
    HE_BATCH_RULES,
    HE_MAX_BATCH,
    he_card_tags,
)
from fi_peer.protocol.he_query import HEConfig
from fi_peer.protocol.messages import ModelCard
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.reputation import ReputationSelector
from fi_peer.protocol.responder import ResponderConfig
from fi_peer.settlement import EthPayments, RewardPolicy, Settler
from network.base import PeerUnreachable, Transport, TransportError

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
REDIAL_AFTER_S = 3.0
DIAL_TIMEOUT_S = 5.0
SHUTDOWN_TIMEOUT_S = 10.0  # the agent and the transport get half each
MAX_QUERY_ROWS = 64
MAX_ANNOUNCED_ADDRESSES = 16
# Audit queries: how long to wait for the members' openings after the answer, and
# after how long a member that refused with ``not_over`` (our OpenRequest overtook
# the Result) is asked once more.
AUDIT_OPEN_TIMEOUT_S = 5.0
AUDIT_RETRY_AFTER_S = 0.5


class DaemonError(FiPeerError):
    """The daemon cannot start or keep running (a runtime condition, not bad input)."""


def short(peer_id: str) -> str:
    return peer_id[:12]


# -- startup pieces -------------------------------------------------------------------------


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``<state_dir>/daemon.lock``; ConfigError if another daemon holds it."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fh = open(state_dir / "daemon.lock", "a+")  # noqa: SIM115 - held for the whole run
    except OSError as exc:
        raise ConfigError(f"cannot use state dir {state_dir}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(
                f"another fi-peer daemon is already running with state dir {state_dir}"
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def load_identity(config: PeerConfig, passphrase: str | None) -> Identity:
    """Open the keystore; a plaintext one needs no passphrase, an encrypted one does."""
    if config.encrypted and passphrase is None:
        raise KeystoreError(
            "the keystore is encrypted: set FI_PEER_PASSPHRASE "
            "(or create a demo identity with `fi-peer init --insecure-plaintext-keys`)"
        )
    return load_keystore(config.keystore, passphrase if config.encrypted else None)


def load_model(config: PeerConfig) -> ModelRuntime:
    if config.model is None:
        raise ConfigError("no [model] path in the config: a peer needs a model to answer queries")
    return ModelRuntime.load(config.model)


def open_ledger(config: PeerConfig) -> BudgetLedger:
    """The owner's persistent privacy budget (created on first use, mode 0600)."""
    limits = BudgetLimits(
        per_querier_epsilon=config.per_querier_epsilon,
        global_epsilon=config.global_epsilon,
        delta=config.delta,
        epoch_s=config.epoch_s,
    )
    return BudgetLedger.open(config.ledger_file, limits)


def load_eth_key(chain: ChainConfig) -> str:
    """The peer's Ethereum private key (hex): from a file only its owner can read
    (mode 0600), or from the environment variable ``chain.eth_key_env``."""
    if chain.eth_key_file is not None:
        try:
            mode = chain.eth_key_file.stat().st_mode
            if mode & 0o077:
                raise ConfigError(
                    f"{chain.eth_key_file} is readable by others (mode {mode & 0o777:o}): "
                    "chmod 600 it"
                )
            key = chain.eth_key_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the Ethereum key {chain.eth_key_file}: {exc}") from exc
    else:
        key = os.environ.get(chain.eth_key_env, "").strip()
        if not key:
            raise ConfigError(f"no Ethereum key: set {chain.eth_key_env} or chain.eth_key_file")
    body = key.removeprefix("0x")
    if len(body) != 64 or any(c not in "0123456789abcdefABCDEF" for c in body):
        raise ConfigError("the Ethereum key must be 32 bytes of hex")
    return "0x" + body


def open_chain(config: PeerConfig) -> tuple[Settler, EthPayments]:
    """The chain client, receipt store, settler and receipt signer of ``[chain]``."""
    chain = config.chain
    assert chain is not None and config.receipts_file is not None
    try:
        if chain.deployment is not None:
            deployment = Deployment.load(chain.deployment)
        else:
            deployment = Deployment(
                chain_id=chain.chain_id,
                escrow=checksum(chain.escrow),
                registry=checksum(chain.registry),
                block=0,
                claim_grace_s=0,
                min_stake_wei=0,
                unbonding_s=0,
            )
        client = ChainClient.connect(chain.rpc_url, load_eth_key(chain), deployment)
        config.receipts_file.parent.mkdir(parents=True, exist_ok=True)
        # 0600 before sqlite opens it: its WAL files (-wal, -shm) take the file's mode
        with contextlib.suppress(OSError):
            os.close(os.open(config.receipts_file, os.O_CREAT | os.O_WRONLY, 0o600))
            config.receipts_file.chmod(0o600)
        store = ReceiptStore(config.receipts_file, client.receipt_domain)
    except (ChainError, ValueError) as exc:
        raise ConfigError(f"[chain]: {exc}") from exc
    settler = Settler(
        client,
        store,
        every_queries=chain.settle_every_queries,
        every_s=chain.settle_every_s,
        claim_every_s=chain.claim_every_s,
        auto_withdraw=chain.auto_withdraw,
        book_path=config.receipts_file,  # the querier's escrows, across restarts
    )
    payments = EthPayments(
        client.account,
        client.receipt_domain,
        settle_window_s=chain.settle_window_s,
        registry=client.registry_domain,
    )
    return settler, payments


def protocol_card(runtime: ModelRuntime) -> ModelCard:
    card = runtime.card
    return ModelCard(
        task=card.task,
        n_classes=card.n_classes,
        input_dim=card.input_dim,
        arch=card.arch,
        model_hash=card.digest,
        rules=card.rules,
    )


def make_transport(config: PeerConfig, identity: Identity) -> Transport:
    """The configured transport for ``identity`` (not started)."""
    try:
        if config.transport == "libp2p":
            from network.libp2p import Libp2pTransport

            return Libp2pTransport(
                bytes(identity.signing_key),
                listen=config.listen,
                mdns=config.mdns,
                dial_timeout=DIAL_TIMEOUT_S,
                gossip_validator=relay_check,
            )
        from network.mqtt import MqttTransport

        return MqttTransport(identity.peer_id, broker=config.broker, net=config.net)
    except ValueError as exc:
        raise ConfigError(f"[network]: {exc}") from exc


def address_peer(address: str) -> str | None:
    """The fi-peer id a libp2p address names (``/p2p/<id>``), if any."""
    from network.libp2p import from_libp2p_id

    try:
        from libp2p.peer.id import ID

        _, _, tail = address.rpartition("/p2p/")
        return from_libp2p_id(ID.from_base58(tail)) if tail else None
    except Exception:
        return None


def announced_addresses(announce: Sequence[str], listening: Sequence[str]) -> list[str]:
    """``[network] announce`` first (with the ``/p2p/<id>`` suffix of the listening
    addresses added where missing: peers dial with it), then the listening ones."""
    suffix = next((a[a.index("/p2p/") :] for a in listening if "/p2p/" in a), "")
    extra = [a if "/p2p/" in a or not suffix else a.rstrip("/") + suffix for a in announce]
    return list(dict.fromkeys([*extra, *listening]))


def parse_input(
    value: object, input_dim: int, max_rows: int = MAX_QUERY_ROWS
) -> npt.NDArray[np.float32]:
    """JSON input -> (n, input_dim) float32 rows; RequestError(400) on anything else."""
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise RequestError(400, f"input is not a numeric array: {exc}") from exc
    if arr.size == input_dim and arr.ndim >= 1:
        arr = arr.reshape(1, input_dim)  # one input, any shape (e.g. an 8x8 image)
    elif arr.ndim == 2 and arr.shape[1] == input_dim:
        pass
    elif arr.ndim == 3 and arr.shape[1] * arr.shape[2] == input_dim:
        arr = arr.reshape(arr.shape[0], input_dim)
    else:
        raise RequestError(
            400, f"input must have {input_dim} values per row, got shape {list(arr.shape)}"
        )
    if not 1 <= arr.shape[0] <= max_rows:
        raise RequestError(400, f"1..{max_rows} inputs per request, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise RequestError(400, "input contains NaN or infinity")
    return arr


def _finite_or_text(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _number(request: Json, key: str, kind: type, default: Any, low: float, high: float) -> Any:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(400, f"{key} must be a number")
    if kind is int and value != int(value):
        raise RequestError(400, f"{key} must be an integer")
    if not low <= value <= high:
        raise RequestError(400, f"{key} must be in {low:g}..{high:g}")
    return kind(value)


# -- the daemon ----------------------------------------------------------------------------


@dataclass
class _Counters:
    """What the watcher has already logged."""

    members: set[str] = field(default_factory=set)
    connected: frozenset[str] = frozenset()
    answered: int = 0
    dialed: dict[str, float] = field(default_factory=dict)


class Daemon:
    """A peer daemon: an :class:`~fi_peer.agent.Agent` plus its operational shell.

    Build it with :meth:`create` (I/O happens there, not in ``__init__``), then
    ``await run(stop)``; ``run`` returns after ``stop`` is set and the peer has
    shut down.
    """

    def __init__(
        self,
        config: PeerConfig,
        identity: Identity,
        model: ModelRuntime,
        transport: Transport,
        *,
        ledger: BudgetLedger | None = None,
        clock: Callable[[], float] = time.time,
        settler: Settler | None = None,
        payments: EthPayments | None = None,
        he: HERuntime | None = None,
    ) -> None:
        self.config = config
        self.settler = settler
        self.identity = identity
        self.model = model
        self.transport = transport
        self.ledger = ledger
        self._clock = clock
        core_config = CoreConfig(
            net=config.net,
            announce_interval_ms=config.announce_interval_ms,
            missed_beats=config.missed_beats,
            querier=QuerierConfig(
                offer_window_ms=config.offer_window_ms,
                choice_grace_ms=config.choice_grace_ms,
                keys_window_ms=config.keys_window_ms,
                keys_grace_ms=config.keys_grace_ms,
                min_committee=config.min_committee,
                secure_aggregation=config.secure_aggregation,
            ),
            responder=ResponderConfig(
                price_wei=config.price_wei,
                capacity=config.capacity,
                allow_plaintext=config.allow_plaintext,
            ),
            # HE rules served: the kernel evidence and/or the support network
            he=HEConfig(rules=he.rules if he is not None else ()),
        )
        # Without a ledger (tests) the core answers without budget accounting.
        self.guard = (
            LedgerGuard(ledger, max_query_epsilon=config.max_query_epsilon)
            if ledger is not None
            else None
        )
        # Input-private (HE) mode: served with an HE-ready model (<model>.he.npz), asked always.
        self.he = he if he is not None else HERuntime(None)
        card = protocol_card(model)
        # The HE rules served ride in the card's rules as "he:<rule>" (wire unchanged).
        he_tags = he_card_tags(self.he.rules) if self.he.serves else ()
        card = dataclasses.replace(card, he=self.he.serves, rules=card.rules + he_tags)
        self.core = PeerCore(
            identity, card, config=core_config, guard=self.guard, payments=payments
        )
        self.agent = Agent(self.core, transport, model, clock=clock, chain=settler, he=self.he)
        self.rewards = self._audits(config, model)
        if config.committee_choice == "reputation":
            self.core.committee_selector = self._selector()
        if settler is not None:
            settler.rewards = self.rewards
        self._audit_waiters: dict[bytes, asyncio.Event] = {}
        self._publishing: set[asyncio.Task[None]] = set()
        self.started_at = time.monotonic()
        self.control: ControlServer | None = None
        self._broker: Any = None
        self._gate = asyncio.Semaphore(config.max_concurrent)
        self._seen = _Counters()
        self._queries = {"ok": 0, "failed": 0}
        self.stats = PeerMetrics()
        self._dials: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()

    @classmethod
    def create(cls, config: PeerConfig, passphrase: str | None) -> Daemon:
        identity = load_identity(config, passphrase)
        model = load_model(config)
        try:
            he = runtime_for(
                config.model,
                input_dim=model.card.input_dim,
                vector_len=model.vector_length(HE_RULE) if HE_RULE in model.card.rules else 0,
                n_classes=model.card.n_classes,
            )
        except FiPeerError as exc:
            raise ConfigError(f"HE-ready model: {exc}") from exc
        # The CKKS key pair for input-private queries is made at the first such query,
        # in the worker thread that encrypts it (~0.2 s of CPU, ~70 MB; Galois keys for
        # nine rotation steps only), so daemons that never ask do not pay for it.
        transport = make_transport(config, identity)
        settler, payments = open_chain(config) if config.chain is not None else (None, None)
        return cls(
            config,
            identity,
            model,
            transport,
            ledger=open_ledger(config),
            settler=settler,
            payments=payments,
            he=he,
        )

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # -- audits and reward rule --

    def _audits(self, config: PeerConfig, model: ModelRuntime) -> RewardPolicy:
        """The core's AuditBook (audit queries are decided with the configured rule)
        and the querier's reward rule over it, with its scores in ``scores.json``."""
        rule = get_rule(config.rule)

        def labels(sums: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
            return rule.decide_batch(sums)[0]

        def distributions(sums: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            return rule.decide_batch(sums)[1]

        book = AuditBook(labels, model.card.n_classes)
        book.listener = self._on_opening
        self.core.audit_book = book
        reward_rule = config.chain.reward_rule if config.chain is not None else "equal"
        try:
            policy = RewardPolicy(
                reward_rule, book, decide=labels, proba=distributions, path=config.scores_file
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        policy.directory = self._eth_directory
        return policy

    @property
    def _reputation_file(self) -> Path:
        return self.config.state_dir / "reputation.json"

    def _selector(self) -> ReputationSelector:
        """The committee choice by reputation (tie-breaks from OS entropy): what was
        learnt before the last stop (reputation.json, a cache: unreadable means start
        afresh), and the audit accuracies kept in scores.json (the core updates them
        on every opening)."""
        selector = ReputationSelector(np.random.default_rng())
        try:
            selector.load_json(json.loads(self._reputation_file.read_text(encoding="utf-8")))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self._reputation_file, exc)
        book = self.core.audit_book
        if book is not None:
            audited = sorted(p for p, n in book.opened.items() if n > 0)
            if audited:
                selector.set_contributions(dict(zip(audited, book.accuracy(audited), strict=True)))
        return selector

    def _reputation_status(self) -> Json:
        """How this querier chooses committees, and what it knows of each peer."""
        selector = self.core.committee_selector
        doc: Json = {
            "committee_choice": self.config.committee_choice,
            "choice_grace_ms": self.config.choice_grace_ms,
        }
        if selector is not None:
            doc["seats"] = selector.seats
            doc["peers"] = selector.table()
        return doc

    def _eth_directory(self) -> dict[str, str]:
        """peer id -> Ethereum account, from the signed announcements heard."""
        return {
            info.peer_id: info.announce.eth_address
            for info in self.core.membership.peers()
            if info.announce.eth_address
        }

    def _on_opening(self, query_id: bytes, member: str, ok: bool) -> None:
        book = self.core.audit_book
        waiter = self._audit_waiters.get(query_id)
        if waiter is None or book is None:
            return
        if book.answered(query_id) >= set(book.committed(query_id)):
            waiter.set()

    async def _open_audit(self, query_id: bytes) -> Json:
        """After an audit query's answer: ask its members to open, wait for their
        replies (bounded), fold the openings into the scores, save them, and
        publish them on chain if configured."""
        book = self.core.audit_book
        assert book is not None
        members = set(book.committed(query_id))
        done = self._audit_waiters[query_id] = asyncio.Event()
        try:
            if members:
                self.agent.request_openings(query_id)
                await self._wait(done, AUDIT_RETRY_AFTER_S)
                late = [m for m, why in book.refused(query_id).items() if why == "not_over"]
                if late:
                    done.clear()
                    self.agent.request_openings(query_id, late)
                if not done.is_set():
                    await self._wait(done, AUDIT_OPEN_TIMEOUT_S)
        finally:
            self._audit_waiters.pop(query_id, None)
        opened = self.rewards.on_audit(query_id)
        try:
            self.rewards.save()  # a few KB; on the loop, so no audit changes it meanwhile
        except OSError as exc:
            log.warning("saving the audit scores failed: %s", exc)
        chain = self.config.chain
        if opened and self.settler is not None and chain is not None and chain.publish_scores:
            task = asyncio.get_running_loop().create_task(self._publish_scores())
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)
        return {
            "label": book.label(query_id),
            "committed": len(members),
            "opened": len(book.opened_vectors(query_id)),
            "refused": book.refused(query_id),
        }

    @staticmethod
    async def _wait(event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()

    async def _publish_scores(self) -> None:
        """The merit scores (in [0, 1]) of the members we audited, as registry events."""
        assert self.settler is not None
        scores = {
            row["eth"]: row["merit"]
            for row in self.rewards.table()
            if row["eth"] and row["audits"] > 0 and row["merit"] is not None
        }
        if not scores:
            return
        try:
            await self.settler.client.publish_scores(scores)
        except (ChainError, ValueError) as exc:
            log.warning("publishing the audit scores failed: %s", exc)
            self.settler.metrics["scores.publish_failed"] += 1
            return
        self.settler.metrics["scores.published"] += 1

    # -- lifecycle --

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        try:
            await self._start()
        except BaseException:
            await self._shutdown()
            raise
        log.info(
            "%s %s joined net %r over %s at %s",
            cfg.name,
            short(self.peer_id),
            cfg.net,
            cfg.transport,
            ", ".join(self.transport.addresses()),
        )
        # Everything loaded so far lives as long as the process: keep it out of the
        # collector's scans (shorter GC pauses, and exit in ~0.2 s instead of ~1-5 s).
        gc.freeze()
        log.info(
            "control API on %s (token in %s)",
            self.control.url if self.control else "-",
            cfg.control_file,
        )
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._watch(), name="watch")
                if self.settler is not None:
                    tasks.create_task(self.settler.run(), name="settlement")
                if cfg.transport == "libp2p":
                    for address in cfg.bootstrap:
                        tasks.create_task(self._bootstrap(address), name=f"bootstrap {address}")
                await stop.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            log.info("%s %s shutting down", cfg.name, short(self.peer_id))
            await self._shutdown()
            log.info("%s %s stopped", cfg.name, short(self.peer_id))

    async def _start(self) -> None:
        cfg = self.config
        if cfg.transport == "mqtt" and cfg.embedded_broker:
            from network.mqtt import EmbeddedBroker, parse_broker_url

            address = parse_broker_url(cfg.broker)
            self._broker = EmbeddedBroker(address.host, address.port)
            try:
                await self._broker.start()
            except TransportError as exc:
                raise DaemonError(str(exc)) from exc
            log.info("embedded MQTT broker (amqtt) on %s", cfg.broker)
        if self.settler is not None:
            try:
                await self.settler.client.check_chain()
            except ChainError as exc:
                raise DaemonError(f"chain: {exc}") from exc
            log.info(
                "paying on chain %d as %s (escrow %s)",
                self.settler.client.deployment.chain_id,
                self.settler.client.address,
                self.settler.client.deployment.escrow,
            )
        # (the agent warms the members' RDP accountant up; this is the querier's side)
        if cfg.epsilon > 0 and cfg.rule in self.model.card.rules:
            with contextlib.suppress(LocalProtocolError):  # an unbounded rule: said per query
                await Agent.noise_sigma(cfg.rule, cfg.epsilon, cfg.delta)
        try:
            await self.transport.start()
        except TransportError as exc:
            raise DaemonError(str(exc)) from exc
        # The core announces where it can be reached; that is known only now.
        addresses = announced_addresses(cfg.announce, self.transport.addresses())
        addresses = [a for a in addresses if 0 < len(a) <= 256 and a.isascii()]
        self.core.addresses = tuple(addresses[:MAX_ANNOUNCED_ADDRESSES])
        await self.agent.start()
        token = new_token()
        self.control = ControlServer(
            self,
            token=token,
            host=cfg.control_host,
            port=cfg.control_port,
            public_metrics=cfg.public_metrics,
        )
        await self.control.start()
        write_control_file(
            cfg.control_file,
            ControlInfo(url=self.control.url, token=token, pid=os.getpid(), peer_id=self.peer_id),
        )

    async def _shutdown(self) -> None:
        """Close everything, each step bounded: a step that hangs is logged and skipped,
        so SIGTERM always ends the process (the transport is closed directly if
        the agent does not finish closing it)."""
        for task in list(self._dials) + list(self._publishing):
            task.cancel()
        if self.control is not None:
            await _bounded("the control API", self.control.aclose(), 3.0)
            remove_control_file(self.config.control_file, os.getpid())
        await _bounded("the agent", self.agent.aclose(), SHUTDOWN_TIMEOUT_S / 2)
        await _bounded("the transport", self.transport.aclose(), SHUTDOWN_TIMEOUT_S / 2)
        if self._broker is not None:
            await _bounded("the embedded broker", self._broker.aclose(), 3.0)
        if self.ledger is not None:
            self.ledger.close()
        self._save_reputation()
        if self.settler is not None:
            # what the querier owes is settled now rather than left to claims
            await _bounded("the last settlement", self._last_settlement(), 10.0)
            await _bounded("the chain client", self.settler.client.aclose(), 3.0)
            self.settler.close()

    def _save_reputation(self) -> None:
        selector = self.core.committee_selector
        if selector is None:
            return
        path = self._reputation_file
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(selector.to_json()), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("saving %s failed: %s", path, exc)

    async def _last_settlement(self) -> None:
        assert self.settler is not None
        if self.settler.pending:
            await self.settler.flush()

    # -- background tasks --

    async def _watch(self) -> None:
        seen = self._seen
        while True:
            try:
                self._watch_once(seen)
            except Exception:  # a bug here must not stop the peer
                log.exception("internal error in the membership watcher")
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _watch_once(self, seen: _Counters) -> None:
        members = {p.peer_id: p for p in self.core.membership.peers()}
        for peer in sorted(members.keys() - seen.members):
            log.info("peer joined: %s (%d known)", short(peer), len(members))
        for peer in sorted(seen.members - members.keys()):
            log.info("peer expired: %s (%d known)", short(peer), len(members))
        seen.members = set(members)
        connected = self.transport.peers()
        if connected - seen.connected:
            self.agent.announce()  # new neighbours learn about us now, not at the next beat
        seen.connected = connected
        answered = self.core.metrics.get("accepted.receipt", 0)
        if answered > seen.answered:
            log.info("answered %d queries (%d in all)", answered - seen.answered, answered)
            seen.answered = answered
        if self.config.transport != "libp2p":
            return
        now = time.monotonic()
        for peer, info in members.items():
            if peer in connected or now - seen.dialed.get(peer, -math.inf) < REDIAL_AFTER_S:
                continue
            seen.dialed[peer] = now
            if info.announce.addresses:
                task = asyncio.get_running_loop().create_task(
                    self._dial(peer, list(info.announce.addresses[:4])), name=f"dial {short(peer)}"
                )
                self._dials.add(task)
                task.add_done_callback(self._dials.discard)

    async def _dial(self, peer: str, addresses: list[str]) -> None:
        for address in addresses:
            try:
                async with asyncio.timeout(DIAL_TIMEOUT_S + 1):
                    await self.transport.connect(address)
            except (TransportError, ValueError, TimeoutError) as exc:
                log.debug("cannot dial %s at %s: %s", short(peer), address, exc)
                continue
            log.debug("connected to %s at %s", short(peer), address)
            return

    async def _bootstrap(self, address: str) -> None:
        peer = address_peer(address)
        delay, warned = 0.5, False
        while True:
            if peer is not None and peer in self.transport.peers():
                await asyncio.sleep(2.0)
                continue
            try:
                async with asyncio.timeout(DIAL_TIMEOUT_S + 1):
                    await self.transport.connect(address)
            except (PeerUnreachable, TransportError, TimeoutError) as exc:
                level = logging.DEBUG if warned else logging.WARNING
                log.log(level, "bootstrap peer %s unreachable (%s); retrying", address, exc)
                warned = True
                delay = min(2 * delay, 10.0)
                await asyncio.sleep(delay)
                continue
            except ValueError as exc:
                log.error("bootstrap address %r is invalid: %s", address, exc)
                return
            log.info("connected to bootstrap peer %s", address)
            self.agent.announce()
            delay, warned = 0.5, False
            if peer is None:
                return
            await asyncio.sleep(2.0)

    # -- control API (ControlHandler) --

    async def status(self) -> Json:
        card = self.model.card
        metrics = self.core.metrics
        return {
            "peer_id": self.peer_id,
            "name": self.config.name,
            "net": self.config.net,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "transport": {
                "kind": self.config.transport,
                "addresses": self.transport.addresses(),
                "connected": len(self.transport.peers()),
                "stats": dict(self.transport.stats),
            },
            "membership": len(self.core.membership),
            "model": {
                "task": card.task,
                "arch": card.arch,
                "sha256": card.sha256,
                "classes": card.n_classes,
                "input_dim": card.input_dim,
                "rules": list(card.rules),
            },
            "market": {"price_wei": self.config.price_wei, "capacity": self.config.capacity},
            "privacy": self._privacy_status(),
            "chain": await self._chain_status(),
            "audits": self._audit_status(),
            "reputation": self._reputation_status(),
            "queries": dict(self._queries),
            "answered": int(metrics.get("accepted.receipt", 0)),
            "metrics": {k: int(v) for k, v in sorted(metrics.items())},
        }

    def _audit_status(self) -> Json:
        """This querier's reward rule, its members' audit scores, and the last
        weighted settlements (weights and wei per seat)."""
        return {
            "reward_rule": self.rewards.rule,
            "members": self.rewards.table(),
            "weighted_settlements": list(self.rewards.recent),
        }

    async def _chain_status(self) -> Json:
        if self.settler is None:
            return {"paid": False}
        client = self.settler.client
        receipts = self._receipts_by_state()
        now = int(self._clock())  # the chain's clock, near enough for a status line
        claimable = [
            r for r in self.settler.store.receipts(state=ReceiptState.PENDING)
            if r.terms.deadline < now
        ]  # fmt: skip
        earnings: Json = {
            "credited_wei": None,  # in the escrow, withdrawable
            "withdrawn_wei": int(self.settler.metrics.get("withdrawn_wei", 0)),  # by this run
            "balance_wei": None,  # the account's own balance on chain
            # receipts the queriers signed (not lost); confirmed: seen paid on chain
            "earned_wei": sum(receipts[k]["wei"] for k in ("pending", "paid", "claimed")),
            "confirmed_wei": receipts["paid"]["wei"] + receipts["claimed"]["wei"],
        }
        try:
            async with asyncio.timeout(3.0):
                earnings["credited_wei"] = await client.balance()
                earnings["balance_wei"] = await client.eth_balance()
        except (ChainError, TimeoutError) as exc:
            earnings["error"] = str(exc) or "the chain did not answer in 3 s"
        return {
            "paid": True,
            "chain_id": client.deployment.chain_id,
            "escrow": client.deployment.escrow,
            "address": client.address,
            "pending_settlements": len(self.settler.pending),
            "earnings": earnings,
            "receipts": receipts,
            "claimable": {
                "count": len(claimable),
                "wei": sum(r.receipt.amount_wei for r in claimable),
            },
            "metrics": {k: int(v) for k, v in sorted(self.settler.metrics.items())},
        }

    def _receipts_by_state(self) -> dict[str, dict[str, int]]:
        """Receipts this member kept, by state: count and wei."""
        doc = {state.value: {"count": 0, "wei": 0} for state in ReceiptState}
        if self.settler is not None:
            for stored in self.settler.store.receipts():
                row = doc[stored.state.value]
                row["count"] += 1
                row["wei"] += stored.receipt.amount_wei
        return doc

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text (see fi_peer.metrics)."""
        cfg = self.config
        spent = None
        if self.ledger is not None:
            with contextlib.suppress(FiPeerError, ValueError):
                spent = self.ledger.spent(None, self._clock())
        settler = self.settler
        return self.stats.render(
            core={k: int(v) for k, v in self.core.metrics.items()},
            transport={k: int(v) for k, v in self.transport.stats.items()},
            peers_known=len(self.core.membership),
            peers_connected=len(self.transport.peers()),
            uptime_s=time.monotonic() - self.started_at,
            epsilon_spent=spent,
            budgets={"global": cfg.global_epsilon, "per_querier": cfg.per_querier_epsilon},
            wei_by_state=(
                {k: v["wei"] for k, v in self._receipts_by_state().items()} if settler else None
            ),
            settler={k: int(v) for k, v in settler.metrics.items()} if settler else None,
            settlements_pending=len(settler.pending) if settler else 0,
        )

    def _privacy_status(self) -> Json:
        cfg = self.config
        doc: Json = {
            "epsilon_per_query": cfg.epsilon,
            "delta": cfg.delta,
            "secure_aggregation": cfg.secure_aggregation,
            "allow_plaintext": cfg.allow_plaintext,
            # "inf" as a string: JSON has no infinity
            "per_querier_epsilon": _finite_or_text(cfg.per_querier_epsilon),
            "global_epsilon": _finite_or_text(cfg.global_epsilon),
        }
        if self.ledger is not None:
            now = self._clock()
            with contextlib.suppress(FiPeerError, ValueError):
                spent = self.ledger.spent(None, now)
                doc["global_epsilon_spent"] = spent
                doc["global_epsilon_left"] = _finite_or_text(max(0.0, cfg.global_epsilon - spent))
            # Per querier: the peers known now (a querier that left still counts in the global).
            queriers = []
            for peer in sorted(p.peer_id for p in self.core.membership.peers()):
                with contextlib.suppress(FiPeerError, ValueError):
                    used = self.ledger.spent(peer, now)
                    left = max(0.0, cfg.per_querier_epsilon - used)
                    queriers.append(
                        {"peer_id": peer, "spent": used, "left": _finite_or_text(left)}
                    )
            doc["per_querier"] = queriers
        return doc

    def peers(self) -> Json:
        now_ms = int(self._clock() * 1000)
        connected = self.transport.peers()
        rows = []
        for info in self.core.membership.peers():
            a = info.announce
            rows.append(
                {
                    "peer_id": info.peer_id,
                    "addresses": list(a.addresses),
                    "connected": info.peer_id in connected,
                    "last_seen_ms": max(0, now_ms - info.last_seen_ms),
                    "price_wei": a.price_wei,
                    "capacity": a.capacity,
                    "task": a.card.task,
                    "arch": a.card.arch,
                    "model_hash": a.card.model_hash.hex(),
                    "rules": list(a.card.rules),
                    "he": a.card.he,  # serves input-private (HE) queries
                }
            )
        return {"peer_id": self.peer_id, "peers": rows}

    async def query(self, request: Json) -> Json:
        cfg = self.config
        card = self.model.card
        input_private = request.get("input_private", False)  # HE mode (fi_peer.he_runtime)
        # an input-private support query of many inputs is ONE batched query (<= 4,096)
        batch_ok = input_private is True and request.get("rule") == HE_RULE
        rows = parse_input(
            request.get("input"), card.input_dim, HE_MAX_BATCH if batch_ok else MAX_QUERY_ROWS
        )
        if not isinstance(input_private, bool):
            raise RequestError(400, "input_private must be true or false")
        # Input-private: the kernel evidence (bounded sensitivity: DP and budgets as in
        # the default mode) unless the support network is asked for (no DP then).
        rule = request.get("rule") or (HE_RULES[0] if input_private else cfg.rule)
        if input_private and rule not in HE_RULES:
            raise RequestError(
                400, f"input-private queries use the {' or '.join(map(repr, HE_RULES))} rule"
            )
        if not isinstance(rule, str) or rule not in card.rules:
            raise RequestError(
                400, f"rule {rule!r} is not offered by this peer's model ({', '.join(card.rules)})"
            )
        known = len(self.core.membership)
        if known == 0:
            raise RequestError(
                409, "no other peer is known yet; wait for discovery (`fi-peer peers`)"
            )
        k = _number(request, "k", int, min(cfg.k, known), 1, MAX_K)
        # An HE query may carry the key exchange (~12 MB to each new member): more time.
        timeout_default = max(cfg.query_timeout_s, 60.0) if input_private else cfg.query_timeout_s
        timeout_s = _number(request, "timeout_s", float, timeout_default, 0.1, 110.0)
        max_price = _number(request, "max_price_wei", int, cfg.max_price_wei, 0, 2**64 - 1)
        # The HE mode's support vector has no bounded sensitivity: no DP unless asked.
        eps_default = 0.0 if input_private and rule == HE_RULE else cfg.epsilon
        epsilon = _number(request, "epsilon", float, eps_default, 0.0, 1e6)
        delta = _number(request, "delta", float, cfg.delta, 1e-12, 0.5)
        secagg = request.get("secure_aggregation", cfg.secure_aggregation)
        if not isinstance(secagg, bool):
            raise RequestError(400, "secure_aggregation must be true or false")
        privacy = {"epsilon": epsilon, "delta": delta, "secagg": secagg}
        privacy["input_private"] = input_private
        labels = self._audit_labels(request, len(rows), rule, input_private)
        started = time.perf_counter()
        # Many inputs, network vector, no DP: one batched HE query (chunked on the wire).
        # The DP-bounded kernel evidence is single-layout only: those go one by one.
        batched = input_private and len(rows) >= HE_BATCH_MIN and rule in HE_BATCH_RULES
        batched = batched and epsilon == 0 and all(label is None for label in labels)
        if len(rows) > MAX_QUERY_ROWS and not batched:
            raise RequestError(
                400,
                f"more than {MAX_QUERY_ROWS} inputs go only as one batched input-private "
                "query (rule support, epsilon 0, no audit labels)",
            )
        if batched:
            results = await self._he_batch_query(
                rows, rule=rule, k=k, timeout_s=timeout_s, max_price=max_price
            )
        else:
            results = await self._gather_queries(
                rows, labels, rule=rule, k=k, timeout_s=timeout_s, max_price=max_price, **privacy
            )
        total_ms = (time.perf_counter() - started) * 1000
        return {
            "peer_id": self.peer_id,
            "rule": rule,
            "k": k,
            "timeout_s": timeout_s,
            "epsilon": epsilon,
            "delta": delta if epsilon > 0 else 0.0,
            "secure_aggregation": secagg,
            "input_private": input_private,
            "results": results,
            "timings": {"total_ms": round(total_ms, 3)},
        }

    async def _he_batch_query(
        self, rows: npt.NDArray[np.float32], *, rule: str, k: int, timeout_s: float, max_price: int
    ) -> list[Json]:
        """One batched input-private query for all ``rows``: one result per row (they
        share the query id, contributors and timings)."""
        one = await self._one_query(
            rows,
            rule=rule,
            k=k,
            timeout_s=timeout_s,
            max_price=max_price,
            epsilon=0.0,
            delta=0.0,
            secagg=True,
            input_private=True,
            batch=len(rows),
        )
        totals = one.pop("_totals", None)
        if totals is None:
            return [dict(one) for _ in rows]
        out = []
        for total in totals:
            label, distribution = decide(total, rule)
            row = dict(one, label=label, distribution=[round(float(p), 6) for p in distribution])
            out.append(row)
        return out

    async def _gather_queries(
        self,
        rows: npt.NDArray[np.float32],
        labels: list[int | None],
        **terms: Any,
    ) -> list[Json]:
        return await asyncio.gather(
            *(
                self._one_query(row, audit_label=label, **terms)
                for row, label in zip(rows, labels, strict=True)
            )
        )

    def _audit_labels(
        self, request: Json, n_rows: int, rule: str, input_private: bool
    ) -> list[int | None]:
        """Per input row, the label this querier knows (an audit query) or None:
        ``audit_label`` (one input) or ``audit_labels`` (one per row, null for none)."""
        one, many = request.get("audit_label"), request.get("audit_labels")
        if one is not None and many is not None:
            raise RequestError(400, "give audit_label or audit_labels, not both")
        if one is not None:
            if n_rows != 1:
                raise RequestError(400, "audit_label is for one input; use audit_labels")
            many = [one]
        if many is None:
            return [None] * n_rows
        if not isinstance(many, list) or len(many) != n_rows:
            raise RequestError(400, f"audit_labels must be a list of {n_rows} labels (or null)")
        n_classes = self.model.card.n_classes
        for label in many:
            if label is not None and (
                isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_classes
            ):
                raise RequestError(400, f"audit labels must be integers in 0..{n_classes - 1}")
        if any(label is not None for label in many):
            if input_private:
                raise RequestError(400, "input-private (HE) queries cannot be audited")
            if rule != self.config.rule:
                raise RequestError(
                    400, f"audit queries use the configured rule {self.config.rule!r}"
                )
        return list(many)

    async def _one_query(
        self,
        x: npt.NDArray[np.float32],
        *,
        rule: str,
        k: int,
        timeout_s: float,
        max_price: int,
        epsilon: float,
        delta: float,
        secagg: bool,
        input_private: bool = False,
        audit_label: int | None = None,
        batch: int = 0,
    ) -> Json:
        async with self._gate:
            started = time.perf_counter()
            try:
                outcome = await self.agent.query(
                    x,
                    rule=rule,
                    k=k,
                    max_price_wei=max_price,
                    timeout_s=timeout_s,
                    epsilon=epsilon,
                    delta=delta,
                    secagg=secagg,
                    input_private=input_private,
                    audit_label=audit_label,
                )
            except LocalProtocolError as exc:
                raise RequestError(400, str(exc)) from exc
            wall_ms = (time.perf_counter() - started) * 1000
        self.stats.observe_query(outcome.ok, wall_ms / 1000, outcome.elapsed_ms / 1000)
        if not outcome.ok:
            self.stats.count_failure(str(outcome.reason))
        result: Json = {
            "ok": outcome.ok,
            "reason": outcome.reason,
            "query_id": outcome.query_id.hex(),
            "contributors": list(outcome.contributors),
            "committee_size": outcome.committee_size,
            "elapsed_ms": outcome.elapsed_ms,
            "wall_ms": round(wall_ms, 3),
        }
        if outcome.escrow is not None:
            result["payment"] = {
                "querier": outcome.escrow.querier,
                "price_wei": outcome.escrow.price_wei,
                "escrow_wei": outcome.escrow.escrow_wei,
                "committee": list(outcome.escrow.committee),
                "delivered": list(outcome.delivered),
            }
        if outcome.ok and audit_label is not None:
            result["audit"] = await self._open_audit(outcome.query_id)
        if batch and outcome.ok and outcome.total is not None:
            result["_totals"] = np.asarray(outcome.total).reshape(batch, -1)  # split by the caller
            result["batched_inputs"] = batch
            self._queries["ok"] += 1
        elif outcome.ok and outcome.total is not None:
            label, distribution = decide(outcome.total, rule)
            result["label"] = label
            result["distribution"] = [round(float(p), 6) for p in distribution]
            self._queries["ok"] += 1
            log.info(
                "query %s: label %d from %d peers + self in %.0f ms",
                outcome.query_id.hex()[:8],
                label,
                len(outcome.contributors),
                wall_ms,
            )
        else:
            self._queries["failed"] += 1
            log.warning("query %s failed: %s", outcome.query_id.hex()[:8], outcome.reason)
        return result


class _Stop(Exception):
    pass


async def _bounded(what: str, step: Coroutine[Any, Any, None], timeout_s: float) -> None:
    """Run one shutdown step for at most ``timeout_s``; log instead of raising.

    Waits with ``asyncio.wait`` (no cancellation of the caller is involved), so
    a step that swallows cancellations cannot stall the shutdown.
    """
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("closing %s took over %.0f s; going on without it", what, timeout_s)
        task.cancel()
        return
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing %s failed: %s", what, task.exception())


# -- process entry point ---------------------------------------------------------------------


async def serve(config: PeerConfig, passphrase: str | None) -> None:
    """Run a daemon until SIGINT/SIGTERM. Raises FiPeerError subclasses for operational errors."""
    with state_dir_lock(config.state_dir):
        daemon = Daemon.create(config, passphrase)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(128 + signum)
            log.info("received %s", signal.Signals(signum).name)
            stop.set()

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        try:
            await daemon.run(stop)
        finally:
            for sig in (*signals, signal.SIGUSR1):
                loop.remove_signal_handler(sig)


def dump_tasks() -> None:
    """Log what every asyncio task is waiting for (``kill -USR1 <daemon pid>``)."""
    tasks = asyncio.all_tasks()
    lines = [f"{len(tasks)} asyncio tasks:"]
    for task in sorted(tasks, key=lambda t: t.get_name()):
        lines.append(f"--- {task.get_name()}: {task.get_coro()!r}")
        for frame in task.get_stack(limit=12):
            code = frame.f_code
            lines.append(f"      {code.co_filename}:{frame.f_lineno} in {code.co_name}")
    log.warning("\n".join(lines))


def configure_process() -> None:
    """Process-wide settings for a daemon (never done on import of a library module)."""
    import torch

    torch.set_num_threads(1)  # small models, several daemons per machine: one thread each
    # Shorter GIL hand-offs between the asyncio and libp2p threads (field notes: -40 %).
    sys.setswitchinterval(0.0005)
    # `kill -USR2 <pid>` writes every thread's stack to the log, even if the event
    # loop is stuck (SIGUSR1, handled in `serve`, also lists the asyncio tasks).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
