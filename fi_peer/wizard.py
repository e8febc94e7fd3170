"""``fi-peer init``: the questions a new owner is asked, and the check behind every answer.

The CLI asks only on a terminal, and only for what was not given as a flag;
every answer (typed or given as a flag) goes through the same checks here, so
a mistake is one line that says what to do, typed again at the prompt or
reported with exit code 2. Nothing is written before every answer is valid.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from fi_peer.errors import FiPeerError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

# What the networked demo charges per share: 0.001 ETH, visible on any explorer and
# far above the gas a batched settlement costs per member (~12.5k gas).
DEFAULT_PRICE_WEI = 10**15
UNITS = {"wei": 1, "gwei": 10**9, "eth": 10**18, "ether": 10**18}
RPC_TIMEOUT_S = 3.0


class InitError(FiPeerError):
    """An answer to ``fi-peer init`` that cannot be used (the message says why and what to do)."""


def parse_wei(text: str) -> int:
    """``"1000"``, ``"1e15"``, ``"5 gwei"``, ``"0.001 eth"`` -> wei (a whole number >= 0)."""
    raw = text.strip().lower().replace("_", "").replace(",", "")
    unit = 1
    for name, factor in sorted(UNITS.items(), key=lambda kv: -len(kv[0])):
        if raw.endswith(name):
            raw, unit = raw[: -len(name)].strip(), factor
            break
    try:
        amount = Decimal(raw) * unit
    except InvalidOperation:
        raise InitError(
            f"{text!r} is not an amount: write wei (1000000000000000), or with a unit "
            "(5 gwei, 0.001 eth)"
        ) from None
    if amount < 0 or amount != amount.to_integral_value() or amount >= 2**256:
        raise InitError(f"{text!r} is not a whole number of wei >= 0")
    return int(amount)


def check_model(path: Path) -> str:
    """Load the model as the daemon will; a one-line description of it."""
    from fi_peer.models.runtime import ModelRuntime

    if not path.is_file():
        raise InitError(f"model file {path} does not exist")
    try:
        runtime = ModelRuntime.load(path)
    except Exception as exc:  # a pickle or TorchScript file can fail in many ways
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if len(first) > 160:
            first = first[:157] + "..."
        raise InitError(
            f"model {path} does not load ({first}); give a model saved by fi-peer "
            "(fi_peer.models.runtime.save_owner_model) or its TorchScript"
        ) from exc
    card = runtime.card
    return (
        f"{card.task} model {card.arch}, {card.input_dim} inputs, "
        f"{card.n_classes} classes, rules {', '.join(card.rules)}"
    )


def check_multiaddr(address: str, *, peer_id: bool) -> str:
    """A libp2p TCP multiaddr; with ``peer_id``, it must end in ``/p2p/<id>`` (to dial it)."""
    from multiaddr import Multiaddr  # type: ignore[import-untyped]  # (no stubs)

    example = "/ip4/203.0.113.7/tcp/4001" + ("/p2p/12D3KooW..." if peer_id else "")
    try:
        parsed = Multiaddr(address.strip())
    except Exception as exc:
        raise InitError(f"{address!r} is not a multiaddr ({exc}); e.g. {example}") from None
    names = [p.name for p in parsed.protocols()]
    # py-libp2p 0.8.1 dials IP addresses only (a /dns4/ address never connects)
    if len(names) < 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
        raise InitError(
            f"{address!r} must be /ip4/<IP>/tcp/<port> (or /ip6/): libp2p here dials IP "
            f"addresses only, not DNS names; e.g. {example}"
        )
    if peer_id and "p2p" not in names:
        raise InitError(
            f"{address!r} lacks the peer's /p2p/<id> (`fi-peer status` on that peer prints "
            f"its addresses); e.g. {example}"
        )
    return str(parsed)


def check_broker(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme != "mqtt" or not parts.hostname:
        raise InitError(f"broker {url!r} must be mqtt://host:port, e.g. mqtt://broker.lan:1883")
    return url.strip()


def check_rpc_url(url: str) -> str:
    if not url.strip().startswith(("http://", "https://")):
        raise InitError(f"chain RPC {url!r} must be an http(s) URL, e.g. https://rpc.example.org")
    return url.strip()


def rpc_chain_id(url: str, timeout_s: float = RPC_TIMEOUT_S) -> int:
    """``eth_chainId`` of the node at ``url`` (InitError if it does not answer)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            doc = json.loads(response.read())
        return int(doc["result"], 16)
    except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError) as exc:
        raise InitError(f"the chain RPC {url} does not answer eth_chainId: {exc}") from exc


def check_deployment(path: Path) -> tuple[int, str]:
    """(chain id, escrow address) of a deployment file written by ``fi-peer deploy``."""
    from fi_peer.chain.client import Deployment
    from fi_peer.chain.errors import ChainError

    try:
        deployment = Deployment.load(path)
    except ChainError as exc:
        raise InitError(f"{exc} (write one with `fi-peer deploy --rpc URL ...`)") from exc
    return deployment.chain_id, deployment.escrow


def read_eth_key(path: Path) -> str:
    """The address of the hex private key in ``path``, which only its owner may read."""
    from eth_account import Account

    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InitError(f"cannot read the Ethereum key file {path}: {exc}") from exc
    if mode & 0o077:
        raise InitError(f"{path} is readable by others (mode {mode:o}): chmod 600 {path}")
    try:
        return str(Account.from_key(text).address)
    except Exception:
        raise InitError(f"{path} must hold a 32-byte private key in hex (0x + 64 digits)") from None


def new_eth_key(path: Path) -> str:
    """Create a new Ethereum key in ``path`` (mode 0600, never overwritten); its address."""
    from eth_account import Account

    if path.exists():
        raise InitError(f"{path} exists: pass it with --eth-key-file, or move it away")
    account = Account.create()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eth-key-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(account.key.hex().removeprefix("0x") + "\n")
        os.link(tmp, path)  # fails if the path appeared meanwhile: never overwrite a key
    finally:
        Path(tmp).unlink(missing_ok=True)
    return str(account.address)


@dataclass(frozen=True, slots=True)
class ChainAnswers:
    rpc_url: str
    deployment: Path
    eth_key_file: Path
    address: str
    created_key: bool


def load_account(key_file: Path | None, env: str = "FI_PEER_ETH_KEY") -> LocalAccount:
    """The Ethereum account of a key file (mode 0600) or, without one, of ``$env``."""
    from eth_account import Account

    if key_file is not None:
        read_eth_key(key_file)  # mode and format, with the messages above
        text = key_file.read_text(encoding="ascii").strip()
    else:
        text = os.environ.get(env, "").strip()
        if not text:
            raise InitError(f"no Ethereum key: give --key-file FILE (hex, mode 0600) or set ${env}")
    try:
        account: LocalAccount = Account.from_key(text)
    except Exception:
        raise InitError("the Ethereum key must be 32 bytes of hex (0x + 64 digits)") from None
    return account
