"""`fi-peer deploy`, `fund`, `account` and `init --chain-rpc` against a real anvil chain.

The commands an owner runs to pay on a real EVM chain (docs/multi-machine.md),
in that order: deploy the contracts, create a peer with a new key, fund it,
check the balance; plus init's check that the RPC is the deployment's chain.
"""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner, Result

from fi_peer.chain.anvil import AnvilConfig, AnvilProcess, dev_accounts
from fi_peer.cli import app
from fi_peer.config import load_config
from tests.chain.conftest import require_anvil
from tests.unit.test_cli_init import PASS, deployment_file


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "FI_PEER_PASSPHRASE": PASS})


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilProcess]:
    require_anvil()
    process = AnvilProcess(AnvilConfig(accounts=2))
    process.start()
    yield process
    assert process.stop() == 0


@pytest.mark.integration
def test_deploy_init_fund_account(anvil: AnvilProcess, tmp_path: Path) -> None:
    deployer = tmp_path / "deployer.key"
    deployer.write_text(dev_accounts(count=1)[0].key.hex())
    deployer.chmod(0o600)
    out = tmp_path / "deployment.json"
    deployed = invoke("deploy", "--rpc", anvil.rpc_url, "--key-file", str(deployer),
                      "--out", str(out), "--claim-grace-s", "120")  # fmt: skip
    assert deployed.exit_code == 0, deployed.output
    doc = json.loads(out.read_text())
    assert doc["chain_id"] == 31337 and doc["claim_grace_s"] == 120
    assert doc["escrow"] in deployed.output and doc["registry"] in deployed.output
    again = invoke("deploy", "--rpc", anvil.rpc_url, "--key-file", str(deployer),
                   "--out", str(out))  # fmt: skip
    assert again.exit_code == 2 and "--force" in again.output

    state = tmp_path / "alice"
    init = invoke("init", "--state-dir", str(state), "--chain-rpc", anvil.rpc_url,
                  "--deployment", str(out), "--price-wei", "1000")  # fmt: skip
    assert init.exit_code == 0, init.output
    assert "warning" not in init.output  # the RPC answered with the deployment's chain id
    key = state / "eth.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    address = Account.from_key(key.read_text().strip()).address
    config = load_config(state / "config.toml")
    assert config.chain is not None and config.chain.rpc_url == anvil.rpc_url

    funded = invoke("fund", "--rpc", anvil.rpc_url, "--key-file", str(deployer),
                    "--to", address, "--amount", "0.25 eth")  # fmt: skip
    assert funded.exit_code == 0, funded.output
    assert "250,000,000,000,000,000 wei (0.25 ETH)" in funded.output
    shown = invoke("account", "--rpc", anvil.rpc_url, "--key-file", str(key),
                   "--deployment", str(out), "--json")  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == {
        "address": address, "chain_id": 31337, "balance_wei": 25 * 10**16, "credited_wei": 0,
    }  # fmt: skip

    loose = tmp_path / "loose.key"
    loose.write_text(deployer.read_text())
    loose.chmod(0o644)
    refused = invoke("deploy", "--rpc", anvil.rpc_url, "--key-file", str(loose),
                     "--out", str(tmp_path / "d2.json"))  # fmt: skip
    assert refused.exit_code == 2 and "chmod 600" in refused.output
    assert not (tmp_path / "d2.json").exists()


class _ChainId(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": hex(5)}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_init_refuses_an_rpc_of_another_chain(tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _ChainId)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rpc = f"http://127.0.0.1:{server.server_port}"
        result = invoke("init", "--state-dir", str(tmp_path / "p"), "--chain-rpc", rpc,
                        "--deployment", str(deployment_file(tmp_path, chain_id=31337)))  # fmt: skip
    finally:
        server.shutdown()
        thread.join()
    assert result.exit_code == 2
    assert f"{rpc} is chain 5 but" in result.output and "on chain 31337" in result.output
    assert not (tmp_path / "p" / "eth.key").exists() and not (tmp_path / "p").exists()
