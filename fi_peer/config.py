"""A peer's configuration file (TOML), as written by ``fi-peer init`` and read by ``fi-peer run``.

Relative paths are relative to the config file's folder, so a state dir can be
moved as a whole. Every section and key is optional (defaults below); an
unknown key in a known section is an error (a typo must not be ignored
silently), while unknown top-level tables are left to the layers that own
them. Example::

    version = 1

    [peer]
    name = "alice"
    net = "local"              # peers only meet inside one net
    state_dir = "."            # control file, lock, logs (relative to this file)

    [keys]
    keystore = "keystore.json"
    encrypted = true           # false: written by `init --insecure-plaintext-keys`

    [model]
    path = "model.pt"

    [market]
    price_wei = 0
    capacity = 64              # queries answered at the same time

    [network]
    transport = "libp2p"       # or "mqtt"
    listen = ["/ip4/127.0.0.1/tcp/0"]
    announce = []              # addresses others dial, before the listening ones (the
                               # public IP behind NAT: "/ip4/203.0.113.7/tcp/4001")
    bootstrap = ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW..."]
    mdns = false
    broker = "mqtt://127.0.0.1:1883"
    embedded_broker = false    # true: this daemon runs an in-process amqtt broker at `broker`
    announce_interval_ms = 2000
    missed_beats = 3           # a peer silent this many intervals expires

    [control]
    host = "127.0.0.1"         # loopback only
    port = 0                   # 0: any free port (written to <state_dir>/control.json)
    public_metrics = false     # true: GET /metrics needs no token (for Prometheus)

    [query]
    rule = "evidence"
    k = 4
    timeout_s = 10.0
    offer_window_ms = 1000
    committee_choice = "reputation"  # or "first": the first k offers (arrival order)
    choice_grace_ms = 100      # reputation: after the k-th offer, the most waited for
                               # more to choose from (within the offer window)
    keys_window_ms = 4000      # secure aggregation: longest wait for every member's key
                               # shares (at most half of the time budget left)
    keys_grace_ms = 200        # ... once a threshold of them are in, the most waited for
                               # the rest (or half the time those took, if longer)
    min_committee = 2
    max_concurrent = 16
    max_price_wei = 0          # the most this peer pays one member per query

    [privacy]
    epsilon = 2.0              # per query this peer asks (0: no DP noise)
    delta = 1e-5
    secure_aggregation = true  # ask for masked shares (the querier sees only the sum)
    allow_plaintext = false    # answer queries that are not securely aggregated
    per_querier_epsilon = 20.0 # budget per querier and epoch ("inf": unlimited)
    global_epsilon = 200.0     # budget over all queriers per epoch
    epoch_s = 86400
    max_query_epsilon = 8.0    # refuse queries asking for a larger epsilon
    ledger = "budget.sqlite"   # the persistent budget ledger (relative to state_dir)

    [chain]                    # absent (or no rpc_url): queries are not paid on chain
    rpc_url = "http://127.0.0.1:8545"
    deployment = "deployment.json"  # written by the deploy step (relative to this file)
    # or, instead of a deployment file:
    # chain_id = 31337
    # escrow = "0x..."
    # registry = "0x..."
    eth_key_file = "eth.key"   # hex private key, mode 0600 (relative to this file)
    eth_key_env = "FI_PEER_ETH_KEY"  # used when eth_key_file is not set
    settle_every_queries = 10  # the querier settles in one batch every N paid queries
    settle_every_s = 5.0       # ... or every T seconds, whichever comes first
    claim_every_s = 10.0       # members claim unsettled receipts after the deadline
    settle_window_s = 60       # on-chain deadline = answer deadline + this
    auto_withdraw = false      # members withdraw their credit after each claim round
    receipts = "receipts.sqlite"  # kept receipts (relative to state_dir)
    reward_rule = "equal"      # how this querier pays its committee at settlement:
                               # "equal" (price per delivered share), "merit" (by
                               # accuracy on its audit queries), "agreement" / "entropy"
                               # (the FI paper's label-free rules, for comparison);
                               # every delivered member gets at least 10 % of the price
    publish_scores = false     # publish the audit scores on chain (PeerRegistry)
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fi_peer.errors import ConfigError

CONFIG_VERSION = 1
TRANSPORTS = ("libp2p", "mqtt")
DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
MAX_K = 64
# Reward rules a querier may pay by (fi_peer.incentives.rewards.REWARD_RULES).
REWARD_RULES = ("equal", "merit", "agreement", "entropy")
# How a querier chooses its committee (fi_peer.protocol.reputation.COMMITTEE_CHOICES).
COMMITTEE_CHOICES = ("reputation", "first")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainConfig:
    """``[chain]``: paying for queries on an EVM chain (see fi_peer.settlement)."""

    rpc_url: str
    deployment: Path | None = None
    chain_id: int = 0
    escrow: str = ""
    registry: str = ""
    eth_key_file: Path | None = None
    eth_key_env: str = "FI_PEER_ETH_KEY"
    settle_every_queries: int = 10
    settle_every_s: float = 5.0
    claim_every_s: float = 10.0
    settle_window_s: int = 60
    auto_withdraw: bool = False
    receipts: Path = Path("receipts.sqlite")
    reward_rule: str = "equal"
    publish_scores: bool = False

    def __post_init__(self) -> None:
        _require(
            self.rpc_url.startswith(("http://", "https://")),
            f"chain.rpc_url must be an http(s) URL, got {self.rpc_url!r}",
            'rpc_url = "https://rpc.example.org" (your node\'s JSON-RPC endpoint)',
        )
        direct = bool(self.escrow or self.registry or self.chain_id)
        _require(
            (self.deployment is None) != (not direct),
            "chain needs either a deployment file or chain_id, escrow and registry",
            'set deployment = "deployment.json" (written by `fi-peer deploy`) '
            "or chain_id, escrow and registry, not both",
        )
        _require(
            not direct or (self.chain_id > 0 and _is_address(self.escrow)),
            "chain.chain_id must be > 0 and chain.escrow an 0x address",
            "copy chain_id and escrow from the deployment (40 hex digits after 0x)",
        )
        _require(
            not direct or _is_address(self.registry),
            "chain.registry must be an 0x address",
            "copy registry from the deployment (40 hex digits after 0x)",
        )
        _require(
            self.eth_key_file is not None or bool(self.eth_key_env),
            "chain needs eth_key_file or eth_key_env",
            'eth_key_file = "eth.key" (hex key, chmod 600) or eth_key_env = "FI_PEER_ETH_KEY"',
        )
        _in_range("chain.settle_every_queries", self.settle_every_queries, 1, 10_000)
        _in_range("chain.settle_every_s", self.settle_every_s, 0.1, 86_400)
        _in_range("chain.claim_every_s", self.claim_every_s, 0.1, 86_400)
        _in_range("chain.settle_window_s", self.settle_window_s, 1, 30 * 86_400)
        _require(
            self.reward_rule in REWARD_RULES,
            f"chain.reward_rule must be one of {', '.join(REWARD_RULES)}, "
            f"got {self.reward_rule!r}",
            'reward_rule = "equal" in [chain] (or "merit" to pay by audit accuracy)',
        )

    def to_toml(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"rpc_url": self.rpc_url}
        if self.deployment is not None:
            doc["deployment"] = str(self.deployment)
        else:
            doc |= {"chain_id": self.chain_id, "escrow": self.escrow, "registry": self.registry}
        if self.eth_key_file is not None:
            doc["eth_key_file"] = str(self.eth_key_file)
        return doc | {
            "eth_key_env": self.eth_key_env,
            "settle_every_queries": self.settle_every_queries,
            "settle_every_s": self.settle_every_s,
            "claim_every_s": self.claim_every_s,
            "settle_window_s": self.settle_window_s,
            "auto_withdraw": self.auto_withdraw,
            "receipts": str(self.receipts),
            "reward_rule": self.reward_rule,
            "publish_scores": self.publish_scores,
        }


def _require(ok: bool, problem: str, fix: str) -> None:
    """A ConfigError that names the key, what is wrong and how to fix it."""
    if not ok:
        raise ConfigError(f"{problem}; fix: {fix}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    """``key`` must be in low..high (inclusive)."""
    section, _, name = key.rpartition(".")
    _require(
        not math.isnan(value) and low <= value <= high,
        f"{key} must be {low:g}..{high:g}, got {value!r}",
        f"set {name} in [{section}] to a value in that range",
    )


def _is_address(value: str) -> bool:
    return len(value) == 42 and value.startswith("0x") and all(
        c in "0123456789abcdefABCDEF" for c in value[2:]
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerConfig:
    name: str = "peer"
    net: str = "local"
    state_dir: Path = Path(".")
    keystore: Path = Path("keystore.json")
    encrypted: bool = True
    model: Path | None = None
    price_wei: int = 0
    capacity: int = 64
    # [network]
    transport: str = "libp2p"
    listen: tuple[str, ...] = DEFAULT_LISTEN
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    mdns: bool = False
    broker: str = DEFAULT_BROKER
    embedded_broker: bool = False
    announce_interval_ms: int = 2000
    missed_beats: int = 3
    # [control]
    control_host: str = "127.0.0.1"
    control_port: int = 0
    public_metrics: bool = False  # GET /metrics without the token (still loopback only)
    # [query]
    rule: str = "evidence"
    k: int = 4
    query_timeout_s: float = 10.0
    offer_window_ms: int = 1000
    committee_choice: str = "reputation"
    choice_grace_ms: int = 100
    keys_window_ms: int = 4000
    keys_grace_ms: int = 200
    min_committee: int = 2
    max_concurrent: int = 16
    max_price_wei: int = 0
    # [privacy]
    epsilon: float = 2.0
    delta: float = 1e-5
    secure_aggregation: bool = True
    allow_plaintext: bool = False
    per_querier_epsilon: float = 20.0
    global_epsilon: float = 200.0
    epoch_s: int = 86_400
    max_query_epsilon: float = 8.0
    ledger: Path = Path("budget.sqlite")
    # [chain] (None: queries are not paid on chain)
    chain: ChainConfig | None = None

    def __post_init__(self) -> None:
        _require(bool(self.name), "peer.name must not be empty", 'name = "alice" in [peer]')
        _require(
            bool(self.net) and self.net.isascii() and "/" not in self.net,
            f"peer.net must be non-empty ASCII without '/', got {self.net!r}",
            'net = "local" in [peer] (every peer of one network uses the same name)',
        )
        _require(
            not any(c in self.net for c in "+#$ \x00"),
            f"peer.net must not contain '+', '#', '$', spaces or NUL, got {self.net!r}",
            "use letters, digits, '-' and '_' only",
        )
        _require(
            self.price_wei >= 0,
            f"market.price_wei must be >= 0, got {self.price_wei}",
            "price_wei = 0 (free) or a price in wei in [market]",
        )
        _require(
            self.capacity >= 1,
            f"market.capacity must be >= 1, got {self.capacity}",
            "capacity = 64 in [market]",
        )
        _require(
            self.transport in TRANSPORTS,
            f"network.transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}",
            'transport = "libp2p" (peer to peer) or "mqtt" (via a broker) in [network]',
        )
        _require(
            self.transport != "libp2p" or bool(self.listen),
            "network.listen needs at least one address for libp2p",
            'listen = ["/ip4/0.0.0.0/tcp/4001"] in [network]',
        )
        _require(
            self.broker.startswith("mqtt://"),
            f"network.broker must be an mqtt://host:port URL, got {self.broker!r}",
            'broker = "mqtt://broker.example.org:1883" in [network]',
        )
        _in_range("network.announce_interval_ms", self.announce_interval_ms, 100, 3_600_000)
        _in_range("network.missed_beats", self.missed_beats, 1, 100)
        _require(
            _is_loopback(self.control_host),
            "control.host must be a loopback address (the API has no TLS), got "
            f"{self.control_host!r}",
            'host = "127.0.0.1" in [control] (reach it from elsewhere through an SSH tunnel)',
        )
        _in_range("control.port", self.control_port, 0, 65535)
        from fi_peer.models.aggregation import RULES  # numpy only; not needed before here

        _require(
            self.rule in RULES,
            f"query.rule must be one of {', '.join(RULES)}, got {self.rule!r}",
            'rule = "evidence" in [query] (the rule that works on non-IID data)',
        )
        _in_range("query.k", self.k, 1, MAX_K)
        _in_range("query.min_committee", self.min_committee, 1, MAX_K)
        _in_range("query.timeout_s", self.query_timeout_s, 0.1, 110)
        _in_range("query.offer_window_ms", self.offer_window_ms, 10, 60_000)
        _require(
            self.committee_choice in COMMITTEE_CHOICES,
            f"query.committee_choice must be one of {', '.join(COMMITTEE_CHOICES)}, "
            f"got {self.committee_choice!r}",
            'committee_choice = "reputation" in [query] (or "first": the first k offers)',
        )
        _in_range("query.choice_grace_ms", self.choice_grace_ms, 0, 60_000)
        _in_range("query.keys_window_ms", self.keys_window_ms, 10, 60_000)
        _in_range("query.keys_grace_ms", self.keys_grace_ms, 0, 60_000)
        _require(
            self.keys_grace_ms <= self.keys_window_ms,
            f"query.keys_grace_ms ({self.keys_grace_ms}) must not exceed query.keys_window_ms "
            f"({self.keys_window_ms})",
            "keys_grace_ms = 200 and keys_window_ms = 4000 in [query]",
        )
        _require(
            self.max_price_wei >= 0,
            f"query.max_price_wei must be >= 0, got {self.max_price_wei}",
            "max_price_wei = 0 (only free answers) or the most you pay one member, in [query]",
        )
        _require(
            0 <= self.epsilon < math.inf,
            f"privacy.epsilon must be >= 0 and finite, got {self.epsilon!r}",
            "epsilon = 2.0 in [privacy] (0: no DP noise)",
        )
        _require(
            0 < self.delta < 1,
            f"privacy.delta must be in (0, 1), got {self.delta!r}",
            "delta = 1e-5 in [privacy]",
        )
        for key in ("per_querier_epsilon", "global_epsilon", "max_query_epsilon"):
            value = getattr(self, key)
            _require(
                not math.isnan(value) and value >= 0,
                f"privacy.{key} must be >= 0 (inf: unlimited), got {value!r}",
                f"{key} = 20.0 in [privacy], or inf for no limit",
            )
        _in_range("privacy.epoch_s", self.epoch_s, 1, math.inf)
        _in_range("query.max_concurrent", self.max_concurrent, 1, 10_000)

    @property
    def ledger_file(self) -> Path:
        """The owner's persistent privacy budget ledger."""
        return self.state_dir / self.ledger

    @property
    def receipts_file(self) -> Path | None:
        """The chain ReceiptStore's sqlite file (None without a chain)."""
        return None if self.chain is None else self.state_dir / self.chain.receipts

    @property
    def scores_file(self) -> Path:
        """The querier's per-member audit scores (fi_peer.settlement.RewardPolicy)."""
        return self.state_dir / "scores.json"

    @property
    def control_file(self) -> Path:
        """Where a running daemon writes its control URL and token (mode 0600)."""
        return self.state_dir / "control.json"

    def to_toml(self) -> dict[str, Any]:
        peer: dict[str, Any] = {"name": self.name, "net": self.net}
        if self.state_dir != Path("."):
            peer["state_dir"] = str(self.state_dir)
        keys = {"keystore": str(self.keystore), "encrypted": self.encrypted}
        market = {"price_wei": self.price_wei, "capacity": self.capacity}
        doc: dict[str, Any] = {"version": CONFIG_VERSION, "peer": peer, "keys": keys}
        if self.model is not None:
            doc["model"] = {"path": str(self.model)}
        doc["market"] = market
        doc["network"] = {
            "transport": self.transport,
            "listen": list(self.listen),
            "announce": list(self.announce),
            "bootstrap": list(self.bootstrap),
            "mdns": self.mdns,
            "broker": self.broker,
            "embedded_broker": self.embedded_broker,
            "announce_interval_ms": self.announce_interval_ms,
            "missed_beats": self.missed_beats,
        }
        doc["control"] = {
            "host": self.control_host,
            "port": self.control_port,
            "public_metrics": self.public_metrics,
        }
        doc["query"] = {
            "rule": self.rule,
            "k": self.k,
            "timeout_s": self.query_timeout_s,
            "offer_window_ms": self.offer_window_ms,
            "committee_choice": self.committee_choice,
            "choice_grace_ms": self.choice_grace_ms,
            "keys_window_ms": self.keys_window_ms,
            "keys_grace_ms": self.keys_grace_ms,
            "min_committee": self.min_committee,
            "max_concurrent": self.max_concurrent,
            "max_price_wei": self.max_price_wei,
        }
        doc["privacy"] = {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "secure_aggregation": self.secure_aggregation,
            "allow_plaintext": self.allow_plaintext,
            "per_querier_epsilon": self.per_querier_epsilon,
            "global_epsilon": self.global_epsilon,
            "epoch_s": self.epoch_s,
            "max_query_epsilon": self.max_query_epsilon,
            "ledger": str(self.ledger),
        }
        if self.chain is not None:
            doc["chain"] = self.chain.to_toml()
        return doc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_SECTIONS: dict[str, frozenset[str]] = {
    "peer": frozenset({"name", "net", "state_dir"}),
    "keys": frozenset({"keystore", "encrypted"}),
    "model": frozenset({"path"}),
    "market": frozenset({"price_wei", "capacity"}),
    "network": frozenset(
        {
            "transport",
            "listen",
            "announce",
            "bootstrap",
            "mdns",
            "broker",
            "embedded_broker",
            "announce_interval_ms",
            "missed_beats",
        }
    ),
    "control": frozenset({"host", "port", "public_metrics"}),
    "query": frozenset(
        {
            "rule",
            "k",
            "timeout_s",
            "offer_window_ms",
            "committee_choice",
            "choice_grace_ms",
            "keys_window_ms",
            "keys_grace_ms",
            "min_committee",
            "max_concurrent",
            "max_price_wei",
        }
    ),
    "privacy": frozenset(
        {
            "epsilon",
            "delta",
            "secure_aggregation",
            "allow_plaintext",
            "per_querier_epsilon",
            "global_epsilon",
            "epoch_s",
            "max_query_epsilon",
            "ledger",
        }
    ),
    "chain": frozenset(
        {
            "rpc_url",
            "deployment",
            "chain_id",
            "escrow",
            "registry",
            "eth_key_file",
            "eth_key_env",
            "settle_every_queries",
            "settle_every_s",
            "claim_every_s",
            "settle_window_s",
            "auto_withdraw",
            "receipts",
            "reward_rule",
            "publish_scores",
        }
    ),
}


def _chain(table: dict[str, Any], base: Path) -> ChainConfig | None:
    rpc_url = _get(table, "rpc_url", str, "", "chain")
    if not rpc_url:
        _require(
            not table,
            "chain.rpc_url is required in [chain]",
            'add rpc_url = "https://..." to [chain], or delete [chain] for unpaid queries',
        )
        return None
    deployment = _get(table, "deployment", str, "", "chain")
    key_file = _get(table, "eth_key_file", str, "", "chain")
    return ChainConfig(
        rpc_url=rpc_url,
        deployment=(base / deployment) if deployment else None,
        chain_id=_get(table, "chain_id", int, 0, "chain"),
        escrow=_get(table, "escrow", str, "", "chain"),
        registry=_get(table, "registry", str, "", "chain"),
        eth_key_file=(base / key_file) if key_file else None,
        eth_key_env=_get(table, "eth_key_env", str, "FI_PEER_ETH_KEY", "chain"),
        settle_every_queries=_get(table, "settle_every_queries", int, 10, "chain"),
        settle_every_s=_get(table, "settle_every_s", float, 5.0, "chain"),
        claim_every_s=_get(table, "claim_every_s", float, 10.0, "chain"),
        settle_window_s=_get(table, "settle_window_s", int, 60, "chain"),
        auto_withdraw=_get(table, "auto_withdraw", bool, False, "chain"),
        receipts=Path(_get(table, "receipts", str, "receipts.sqlite", "chain")),
        reward_rule=_get(table, "reward_rule", str, "equal", "chain"),
        publish_scores=_get(table, "publish_scores", bool, False, "chain"),
    )


def _get(table: dict[str, Any], key: str, kind: type, default: Any, section: str = "") -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        where = f"{section}.{key}" if section else key
        raise ConfigError(
            f"{where} must be a {kind.__name__}, got {value!r}; fix: {_TYPE_FIX[kind]} "
            f"(e.g. {key} = {_toml_value(default)}{f' in [{section}]' if section else ''})"
        )
    return value


_TYPE_FIX: dict[type, str] = {
    int: "write a whole number without quotes",
    float: "write a number without quotes",
    bool: "write true or false without quotes",
    str: "write a quoted string",
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _strings(
    table: dict[str, Any], key: str, default: tuple[str, ...], section: str
) -> tuple[str, ...]:
    value = table.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{section}.{key} must be a list of strings, got {value!r}; "
            f'fix: {key} = ["/ip4/203.0.113.7/tcp/4001"] in [{section}] (brackets and quotes)'
        )
    return tuple(value)


def parse_config(doc: dict[str, Any], base: Path) -> PeerConfig:
    _require(
        doc.get("version") == CONFIG_VERSION,
        f"unsupported config version {doc.get('version')!r}",
        f"the file must start with `version = {CONFIG_VERSION}` (this fi-peer reads version "
        f"{CONFIG_VERSION}; `fi-peer init --force` writes a fresh one)",
    )
    tables: dict[str, dict[str, Any]] = {}
    for section, known in _SECTIONS.items():
        table = doc.get(section, {})
        _require(
            isinstance(table, dict),
            f"[{section}] must be a table",
            f"write it as a [{section}] header followed by key = value lines",
        )
        unknown = sorted(set(table) - known)
        if unknown:
            hints = [
                f"{name} -> {close[0]}"
                for name in unknown
                if (close := difflib.get_close_matches(name, known, n=1))
            ]
            raise ConfigError(
                f"unknown key(s) in [{section}]: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))}); fix: "
                + (f"did you mean {', '.join(hints)}?" if hints else "remove or rename them")
            )
        tables[section] = table
    peer, keys, model, market = tables["peer"], tables["keys"], tables["model"], tables["market"]
    network, control, query = tables["network"], tables["control"], tables["query"]
    privacy = tables["privacy"]
    model_path = _get(model, "path", str, "", "model")
    return PeerConfig(
        name=_get(peer, "name", str, "peer", "peer"),
        net=_get(peer, "net", str, "local", "peer"),
        state_dir=base / _get(peer, "state_dir", str, ".", "peer"),
        keystore=base / _get(keys, "keystore", str, "keystore.json", "keys"),
        encrypted=_get(keys, "encrypted", bool, True, "keys"),
        model=(base / model_path) if model_path else None,
        price_wei=_get(market, "price_wei", int, 0, "market"),
        capacity=_get(market, "capacity", int, 64, "market"),
        transport=_get(network, "transport", str, "libp2p", "network"),
        listen=_strings(network, "listen", DEFAULT_LISTEN, "network"),
        announce=_strings(network, "announce", (), "network"),
        bootstrap=_strings(network, "bootstrap", (), "network"),
        mdns=_get(network, "mdns", bool, False, "network"),
        broker=_get(network, "broker", str, DEFAULT_BROKER, "network"),
        embedded_broker=_get(network, "embedded_broker", bool, False, "network"),
        announce_interval_ms=_get(network, "announce_interval_ms", int, 2000, "network"),
        missed_beats=_get(network, "missed_beats", int, 3, "network"),
        control_host=_get(control, "host", str, "127.0.0.1", "control"),
        control_port=_get(control, "port", int, 0, "control"),
        public_metrics=_get(control, "public_metrics", bool, False, "control"),
        rule=_get(query, "rule", str, "evidence", "query"),
        k=_get(query, "k", int, 4, "query"),
        query_timeout_s=_get(query, "timeout_s", float, 10.0, "query"),
        offer_window_ms=_get(query, "offer_window_ms", int, 1000, "query"),
        committee_choice=_get(query, "committee_choice", str, "reputation", "query"),
        choice_grace_ms=_get(query, "choice_grace_ms", int, 100, "query"),
        keys_window_ms=_get(query, "keys_window_ms", int, 4000, "query"),
        keys_grace_ms=_get(query, "keys_grace_ms", int, 200, "query"),
        min_committee=_get(query, "min_committee", int, 2, "query"),
        max_concurrent=_get(query, "max_concurrent", int, 16, "query"),
        max_price_wei=_get(query, "max_price_wei", int, 0, "query"),
        epsilon=_get(privacy, "epsilon", float, 2.0, "privacy"),
        delta=_get(privacy, "delta", float, 1e-5, "privacy"),
        secure_aggregation=_get(privacy, "secure_aggregation", bool, True, "privacy"),
        allow_plaintext=_get(privacy, "allow_plaintext", bool, False, "privacy"),
        per_querier_epsilon=_get(privacy, "per_querier_epsilon", float, 20.0, "privacy"),
        global_epsilon=_get(privacy, "global_epsilon", float, 200.0, "privacy"),
        epoch_s=_get(privacy, "epoch_s", int, 86_400, "privacy"),
        max_query_epsilon=_get(privacy, "max_query_epsilon", float, 8.0, "privacy"),
        ledger=Path(_get(privacy, "ledger", str, "budget.sqlite", "privacy")),
        chain=_chain(tables["chain"], base),
    )


def load_config(path: Path) -> PeerConfig:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"no config at {path} (run `fi-peer init` first)") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        return parse_config(doc, path.parent.absolute())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def write_config(path: Path, config: PeerConfig) -> None:
    """Write atomically (a crash never leaves half a config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            tomli_w.dump(config.to_toml(), fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
