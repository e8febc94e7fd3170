"""Secrets stay secret: keystores encrypted at rest (0600), the control API on
127.0.0.1 only and token-protected, and no secret in any log of a real run.

A small paid network (three ``fi-peer run --verbose`` processes over a
private Mosquitto, encrypted keystores opened with $FI_PEER_PASSPHRASE, a
``[chain]`` table each on anvil with a fresh Ethereum key in a 0600
``eth_key_file``) answers a paid query, settles it and withdraws; then every
log file, stdout/stderr included, is searched for each peer's passphrase,
Ed25519 seed, X25519 secret (hex and base64), Ethereum private key (hex, with
and without 0x) and control token.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fi_peer.config import ChainConfig, PeerConfig, write_config
from fi_peer.control import ControlClient, ControlError, read_control_file
from fi_peer.errors import WrongPassphrase
from fi_peer.identity import Identity, load_keystore, save_keystore

ROOT = Path(__file__).resolve().parents[2]
PRICE = 10**15


def secret_forms(identity: Identity) -> dict[str, str]:
    seed, box = bytes(identity.signing_key), bytes(identity.box_key)
    forms: dict[str, str] = {}
    for name, raw in (("ed25519 seed", seed), ("x25519 secret", box)):
        forms[f"{name} (hex)"] = raw.hex()
        forms[f"{name} (base64)"] = base64.b64encode(raw).decode().rstrip("=")
        forms[f"{name} (urlsafe base64)"] = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return forms


# -- keystore at rest (no processes) --------------------------------------------------------


def test_keystore_is_encrypted_at_rest_with_mode_0600(tmp_path: Path) -> None:
    identity = Identity.generate()
    path = tmp_path / "keystore.json"
    passphrase = "correct horse battery staple"
    save_keystore(path, identity, passphrase)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    for what, form in {**secret_forms(identity), "passphrase": passphrase}.items():
        assert form not in text, f"the keystore holds the {what} in clear"
    with pytest.raises(WrongPassphrase):
        load_keystore(path, "not the passphrase")
    assert load_keystore(path, passphrase).peer_id == identity.peer_id


# -- a small network of real daemons -------------------------------------------------------------


@dataclass
class Node:
    state: Path
    identity: Identity
    passphrase: str
    log: Path
    eth_key: str = ""  # 0x + 64 hex: the peer's fresh Ethereum private key
    process: subprocess.Popen[bytes] | None = None

    @property
    def eth_key_file(self) -> Path:
        return self.state / "eth.key"

    @property
    def control(self) -> Path:
        return self.state / "control.json"

    def client(self) -> ControlClient:
        return ControlClient(read_control_file(self.control))


@dataclass
class SecretNet:
    folder: Path
    nodes: list[Node] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    answer: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> list[int | None]:
        codes: list[int | None] = []
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is None:
                codes.append(None)
                continue
            try:
                node.process.wait(20)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(10)
            codes.append(node.process.returncode)
        return codes


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (ControlError, OSError):
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def secret_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretNet]:
    from eth_account import Account

    from fi_peer.chain.anvil import AnvilConfig, AnvilProcess
    from tests.chain.conftest import require_anvil
    from tests.integration.support import Mosquitto, load_local_network, require_mosquitto

    require_mosquitto()
    require_anvil()
    folder = tmp_path_factory.mktemp("secrets")
    local_network = load_local_network()
    models: list[Path] = local_network.ensure_models(folder / "models", 3, 0.5, 1, 5)
    anvil = AnvilProcess(AnvilConfig(accounts=2))
    anvil.start()
    broker: Any = None
    net = SecretNet(folder)
    try:
        deployment_file = folder / "deployment.json"
        _deploy(anvil.rpc_url).save(deployment_file)
        broker = Mosquitto(folder).start()
        for i, model in enumerate(models):
            state = folder / f"peer-{i}"
            identity = Identity.generate()
            passphrase = f"pass-{os.urandom(12).hex()}"
            save_keystore(state / "keystore.json", identity, passphrase)
            # a fresh Ethereum account (not a well-known dev key), funded on anvil
            account = Account.create()
            eth_key = "0x" + bytes(account.key).hex()
            _fund(anvil.rpc_url, account.address)
            config = PeerConfig(
                name=f"peer-{i}",
                net="secrets",
                keystore=Path("keystore.json"),
                encrypted=True,
                model=model,
                transport="mqtt",
                listen=(),
                bootstrap=(),
                broker=broker.url,
                announce_interval_ms=500,
                missed_beats=3,
                offer_window_ms=1000,
                k=2,
                per_querier_epsilon=math.inf,
                global_epsilon=math.inf,
                price_wei=PRICE,
                max_price_wei=PRICE,
                chain=ChainConfig(
                    rpc_url=anvil.rpc_url,
                    deployment=deployment_file,
                    eth_key_file=state / "eth.key",
                    settle_every_queries=1,
                    settle_every_s=60.0,
                    claim_every_s=1.0,
                    settle_window_s=3600,
                    auto_withdraw=True,
                ),
            )
            write_config(state / "config.toml", config)
            node = Node(state, identity, passphrase, folder / f"peer-{i}.log", eth_key)
            fd = os.open(node.eth_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(eth_key)
            env = {**os.environ, "FI_PEER_PASSPHRASE": passphrase, "PYTHONUNBUFFERED": "1"}
            with open(node.log, "ab") as log:
                node.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fi_peer.cli",
                        "run",
                        "--verbose",
                        "--config",
                        str(state / "config.toml"),
                    ],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    cwd=ROOT,
                    env=env,
                    start_new_session=True,
                )
            net.nodes.append(node)
        for node in net.nodes:
            _wait(lambda n=node: n.client().get("/v1/status", timeout=2.0), 120, "a daemon")
        for node in net.nodes:
            _wait(lambda n=node: n.client().get("/v1/status")["membership"] >= 2, 60, "discovery")
        net.tokens = [read_control_file(n.control).token for n in net.nodes]
        sample = local_network.sample_inputs(models[0].parent)["inputs"][0]
        net.answer = (
            net.nodes[0]
            .client()
            .post(
                "/v1/query",
                {"input": sample, "k": 2, "timeout_s": 8, "max_price_wei": PRICE},
                timeout=20,
            )
        )
        # the full paid path: the querier settles, the members withdraw
        delivered = net.answer["results"][0].get("payment", {}).get("delivered", [])
        _wait(
            lambda: _chain_metrics(net.nodes[0]).get("settle.queries", 0) == 1,
            30,
            "the settlement",
        )
        _wait(
            lambda: (
                sum(_chain_metrics(n).get("withdrawn_wei", 0) for n in net.nodes)
                == PRICE * len(delivered)
            ),
            30,
            "the withdrawals",
        )
        yield net
    finally:
        net.stop()
        if broker is not None:
            broker.stop()
        anvil.stop()


def _chain_metrics(node: Node) -> dict[str, int]:
    metrics: dict[str, int] = node.client().get("/v1/status")["chain"]["metrics"]
    return metrics


def _deploy(rpc_url: str) -> Any:
    import asyncio

    from web3 import AsyncHTTPProvider, AsyncWeb3

    from fi_peer.chain.anvil import dev_accounts
    from fi_peer.chain.client import deploy_contracts

    async def deploy() -> Any:
        w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url))
        try:
            return await deploy_contracts(w3, dev_accounts()[0], claim_grace_s=30)
        finally:
            await w3.provider.disconnect()

    return asyncio.run(deploy())


def _fund(rpc_url: str, address: str) -> None:
    import urllib.request

    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "anvil_setBalance", "params": [address, hex(10**21)]}
    ).encode()
    request = urllib.request.Request(
        rpc_url, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert "result" in json.loads(response.read())


def _request(url: str, token: str | None, host: str | None = None) -> int:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(host or parts.hostname or "", parts.port, timeout=5)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        conn.request("GET", "/v1/status", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.integration
@pytest.mark.slow
def test_query_ran(secret_net: SecretNet) -> None:
    assert [r["reason"] for r in secret_net.answer["results"]] == ["ok"], secret_net.answer
    payment = secret_net.answer["results"][0]["payment"]
    assert payment["price_wei"] == PRICE and len(payment["delivered"]) == 2, payment


@pytest.mark.integration
@pytest.mark.slow
def test_state_files_are_private(secret_net: SecretNet) -> None:
    for node in secret_net.nodes:
        for name in ("keystore.json", "control.json", "eth.key"):
            mode = stat.S_IMODE((node.state / name).stat().st_mode)
            assert mode == 0o600, f"{node.state / name} has mode {mode:o}"
        text = (node.state / "keystore.json").read_text()
        for what, form in {**secret_forms(node.identity), "passphrase": node.passphrase}.items():
            assert form not in text, f"keystore of {node.state.name} holds the {what} in clear"


@pytest.mark.integration
@pytest.mark.slow
def test_control_api_needs_the_token(secret_net: SecretNet) -> None:
    node = secret_net.nodes[0]
    info = read_control_file(node.control)
    assert info.url.startswith("http://127.0.0.1:"), info.url
    assert _request(info.url, None) == 401
    assert _request(info.url, "wrong-" + info.token) == 401
    assert _request(info.url, info.token[:-1]) == 401
    assert _request(info.url, secret_net.tokens[1]) == 401  # another daemon's token
    assert _request(info.url, "") == 401
    assert _request(info.url, info.token) == 200


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("address", ["127.0.0.2", "127.1.2.3"])
def test_control_api_listens_on_127_0_0_1_only(secret_net: SecretNet, address: str) -> None:
    info = read_control_file(secret_net.nodes[0].control)
    port = int(info.url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, port), timeout=2).close()


@pytest.mark.integration
@pytest.mark.slow
def test_no_secret_in_logs_or_api(secret_net: SecretNet) -> None:
    secrets: dict[str, str] = {}
    for i, node in enumerate(secret_net.nodes):
        for what, form in secret_forms(node.identity).items():
            secrets[f"peer-{i} {what}"] = form
        secrets[f"peer-{i} passphrase"] = node.passphrase
        secrets[f"peer-{i} control token"] = secret_net.tokens[i]
        secrets[f"peer-{i} eth key (0x hex)"] = node.eth_key
        secrets[f"peer-{i} eth key (hex)"] = node.eth_key.removeprefix("0x")
        secrets[f"peer-{i} eth key (HEX)"] = node.eth_key.removeprefix("0x").upper()
    # what the control API shows is as public as a log
    api = json.dumps(
        [n.client().get("/v1/status") for n in secret_net.nodes]
        + [n.client().get("/v1/peers") for n in secret_net.nodes]
        + [secret_net.answer]
    )
    codes = secret_net.stop()  # shutdown logs count too
    assert codes == [0, 0, 0]
    logs = sorted(secret_net.folder.rglob("*.log"))
    assert len(logs) >= 4  # three daemons and the broker
    texts = {str(p): p.read_text(errors="replace") for p in logs}
    assert any("control API on" in t for t in texts.values()), "the daemons logged nothing?"
    texts["control API answers"] = api
    leaks = [
        f"{what} in {where}"
        for where, text in texts.items()
        for what, form in secrets.items()
        if form in text
    ]
    assert not leaks, leaks
