"""`fi-peer init`: the interactive walk on a terminal, and no prompt without one.

Run in process with typer's CliRunner; ``_stdin_is_tty`` is patched to play a
terminal, and the runner feeds the answers (hidden prompts included).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fi_peer import cli
from fi_peer.config import load_config
from fi_peer.identity import load_keystore
from fi_peer.wizard import DEFAULT_PRICE_WEI, InitError, parse_wei

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
BOOT = f"/ip4/203.0.113.7/tcp/4001/p2p/{PEER}"
PASS = "correct horse battery"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from fi_peer.models.data import load_digits_split
    from fi_peer.models.runtime import save_owner_model
    from fi_peer.models.zoo import train_owner_model

    torch.set_num_threads(1)
    split = load_digits_split()
    model = train_owner_model(
        split.X_train[:100], split.y_train[:100], arch="mlp-64-32-10", epochs=1, seed=0
    )
    path = tmp_path_factory.mktemp("model") / "owner.pt"
    save_owner_model(model, path)
    return path


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_stdin_is_tty", lambda: True)


@pytest.fixture(autouse=True)
def no_env_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FI_PEER_PASSPHRASE", raising=False)


def invoke(args: list[str], answers: list[str] | None = None, **env: str) -> Result:
    text = None if answers is None else "\n".join(answers) + "\n"
    return CliRunner().invoke(cli.app, args, input=text, env={"COLUMNS": "200", **env})


def deployment_file(folder: Path, chain_id: int = 31337) -> Path:
    path = folder / "deployment.json"
    doc = {
        "chain_id": chain_id,
        "escrow": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
        "registry": "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512",
        "block": 1,
        "claim_grace_s": 3600,
        "min_stake_wei": 0,
        "unbonding_s": 86400,
    }
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.usefixtures("terminal")
def test_a_terminal_walks_the_owner_through_every_answer(tmp_path: Path, model_file: Path) -> None:
    state = tmp_path / "alice"
    answers = [
        "",  # name: the state dir's
        "lab",  # net
        "short", "short",  # passphrase too short: asked again
        PASS, "a typo",  # the repeat differs: asked again
        PASS, PASS,
        str(tmp_path / "missing.pt"),  # no such file: asked again
        str(model_file),
        "pigeon", "libp2p",  # transport
        "",  # listen: every interface, port 4001
        "/ip4/198.51.100.4/tcp/4001",  # announce
        "/ip4/203.0.113.7/tcp/4001", BOOT,  # bootstrap without /p2p: asked again
        "",  # no chain RPC
        "0.001 eth",  # price
        "",  # max price paid: the same
    ]  # fmt: skip
    result = invoke(["init", "--state-dir", str(state)], answers)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "at least 8 characters" in out
    assert "do not match" in out  # click's confirmation prompt
    assert "does not exist" in out and "transport must be libp2p or mqtt" in out
    assert "lacks the peer's /p2p/<id>" in out
    assert "digits model mlp-64-32-10" in out  # the model was loaded
    assert PASS not in out  # hidden input is never echoed
    config = load_config(state / "config.toml")
    assert (config.name, config.net, config.transport) == ("alice", "lab", "libp2p")
    assert config.model == model_file.resolve()
    assert config.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert config.announce == ("/ip4/198.51.100.4/tcp/4001",)
    assert config.bootstrap == (BOOT,)
    assert (config.price_wei, config.max_price_wei) == (DEFAULT_PRICE_WEI, 10**15)
    assert config.chain is None and config.encrypted
    keystore = state / "keystore.json"
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600
    assert load_keystore(keystore, PASS).peer_id in out


@pytest.mark.usefixtures("terminal")
def test_flags_are_not_asked_again(tmp_path: Path, model_file: Path) -> None:
    args = [
        "init", "--state-dir", str(tmp_path / "b"), "--name", "bob", "--net", "lab",
        "--model", str(model_file), "--transport", "mqtt", "--broker", "mqtt://broker.lan:1883",
        "--price-wei", "7", "--max-price-wei", "9",
    ]  # fmt: skip
    # only the passphrase and the chain question are left
    result = invoke(args, [PASS, PASS, ""])
    assert result.exit_code == 0, result.output
    assert "Peer name" not in result.output and "Transport" not in result.output
    assert "Chain JSON-RPC URL" in result.output
    config = load_config(tmp_path / "b" / "config.toml")
    assert (config.name, config.transport, config.broker) == (
        "bob",
        "mqtt",
        "mqtt://broker.lan:1883",
    )
    assert (config.price_wei, config.max_price_wei) == (7, 9)


@pytest.mark.usefixtures("terminal")
def test_non_interactive_on_a_terminal_asks_nothing(tmp_path: Path) -> None:
    result = invoke(
        ["init", "--state-dir", str(tmp_path / "c"), "--non-interactive"], [],
        FI_PEER_PASSPHRASE=PASS,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.startswith("peer id")  # no question before the summary
    config = load_config(tmp_path / "c" / "config.toml")
    assert (config.name, config.price_wei, config.max_price_wei) == ("peer", 0, 0)
    assert config.listen == ("/ip4/127.0.0.1/tcp/0",) and config.model is None


def test_without_a_terminal_nothing_blocks_and_errors_are_one_line(
    tmp_path: Path, model_file: Path
) -> None:
    # CliRunner's stdin is not a terminal: a missing passphrase is an error, not a prompt
    no_pass = invoke(["init", "--state-dir", str(tmp_path / "d")])
    assert no_pass.exit_code == 2 and "FI_PEER_PASSPHRASE" in no_pass.output
    bad_model = tmp_path / "bad.pt"
    bad_model.write_bytes(b"not a model")
    cases = {
        "does not load": ["--model", str(bad_model)],
        "lacks the peer's /p2p/<id>": ["--bootstrap", "/ip4/1.2.3.4/tcp/1"],
        "is not a multiaddr": ["--listen", "0.0.0.0:4001"],
        "dials IP addresses only": ["--announce", "/dns4/alice.example.org/tcp/4001"],
        "must be mqtt://host:port": ["--transport", "mqtt", "--broker", "tcp://b:1"],
        "transport must be libp2p or mqtt": ["--transport", "pigeon"],
        "--chain-rpc needs --deployment": ["--chain-rpc", "http://127.0.0.1:9"],
        "need --chain-rpc": ["--deployment", "d.json"],
        "must be an http(s) URL": ["--chain-rpc", "ws://x", "--deployment", "d.json"],
    }
    for i, (message, flags) in enumerate(cases.items()):
        state = tmp_path / f"e{i}"
        result = invoke(["init", "--state-dir", str(state), *flags], FI_PEER_PASSPHRASE=PASS)
        assert result.exit_code == 2, (flags, result.output)
        assert message in result.output, (flags, result.output)
        assert not (state / "keystore.json").exists()  # nothing written
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_chain_gets_a_new_private_key_and_the_deployment(tmp_path: Path) -> None:
    deployment = deployment_file(tmp_path)
    state = tmp_path / "p"
    result = invoke(
        ["init", "--state-dir", str(state), "--chain-rpc", "http://127.0.0.1:9",
         "--deployment", str(deployment), "--price-wei", "1000"],
        FI_PEER_PASSPHRASE=PASS,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "does not answer eth_chainId" in result.output  # a warning: the daemon checks again
    key = state / "eth.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    from eth_account import Account

    address = Account.from_key(key.read_text().strip()).address
    assert address in result.output
    config = load_config(state / "config.toml")
    assert config.chain is not None
    assert config.chain.rpc_url == "http://127.0.0.1:9"
    assert config.chain.deployment == deployment.resolve()
    assert config.chain.eth_key_file == key.absolute()
    assert config.price_wei == 1000
    # a second peer reuses an existing key file; a readable one is refused with the fix
    shared = tmp_path / "shared.key"
    shared.write_text(key.read_text())
    shared.chmod(0o644)
    loose = invoke(
        ["init", "--state-dir", str(tmp_path / "q"), "--chain-rpc", "http://127.0.0.1:9",
         "--deployment", str(deployment), "--eth-key-file", str(shared)],
        FI_PEER_PASSPHRASE=PASS,
    )  # fmt: skip
    assert loose.exit_code == 2 and f"chmod 600 {shared}" in loose.output


@pytest.mark.parametrize(
    ("text", "wei"),
    [("0", 0), ("1000", 1000), ("1e15", 10**15), ("5 gwei", 5 * 10**9), ("0.001 ETH", 10**15),
     ("1_000", 1000)],
)  # fmt: skip
def test_prices_accept_units(text: str, wei: int) -> None:
    assert parse_wei(text) == wei


@pytest.mark.parametrize("text", ["-1", "0.5", "ten", "1.5 wei", ""])
def test_bad_prices_say_how_to_write_one(text: str) -> None:
    with pytest.raises(InitError):
        parse_wei(text)


@pytest.mark.usefixtures("terminal")
def test_a_terminal_walk_with_a_chain(tmp_path: Path) -> None:
    deployment = deployment_file(tmp_path)
    state = tmp_path / "carol"
    answers = [
        "", "", PASS, PASS,
        "",  # no model yet
        "", "", "", "",  # transport, listen, announce, bootstrap
        "http://127.0.0.1:9",  # chain RPC (down: a warning)
        str(tmp_path / "nope.json"), str(deployment),  # a missing deployment is asked again
        "",  # no key file: create one
        "", "",  # price and max price: the suggested 10^15 wei
    ]  # fmt: skip
    result = invoke(["init", "--state-dir", str(state)], answers)
    assert result.exit_code == 0, result.output
    assert "cannot read deployment" in result.output
    assert "does not answer eth_chainId" in result.output
    assert "bootstrap /ip4/<this host's IP>/tcp/4001/p2p/12D3KooW" in result.output
    config = load_config(state / "config.toml")
    assert config.model is None and config.chain is not None
    assert config.chain.deployment == deployment.resolve()
    assert config.chain.eth_key_file == (state / "eth.key").absolute()
    assert stat.S_IMODE((state / "eth.key").stat().st_mode) == 0o600
    assert (config.price_wei, config.max_price_wei) == (DEFAULT_PRICE_WEI, DEFAULT_PRICE_WEI)
