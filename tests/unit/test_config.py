"""The peer config file: defaults, round trip, and one clear error per mistake."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fi_peer import config as config_module
from fi_peer.config import PeerConfig, load_config, parse_config, write_config
from fi_peer.errors import ConfigError


def _doc(**sections: dict[str, object]) -> dict[str, object]:
    return {"version": 1, **sections}


def test_an_empty_config_means_every_default(tmp_path: Path) -> None:
    cfg = parse_config(_doc(), tmp_path)
    assert cfg.transport == "libp2p" and cfg.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert cfg.control_host == "127.0.0.1" and cfg.control_port == 0
    assert cfg.state_dir == tmp_path / "." and cfg.control_file == tmp_path / "control.json"
    assert cfg.keystore == tmp_path / "keystore.json" and cfg.model is None


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    original = PeerConfig(
        name="alice",
        net="lab",
        model=tmp_path / "alice.pt",
        price_wei=7,
        transport="mqtt",
        broker="mqtt://127.0.0.1:18830",
        bootstrap=("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWx",),
        announce_interval_ms=500,
        k=3,
        query_timeout_s=4.5,
        max_price_wei=9,
    )
    write_config(tmp_path / "config.toml", original)
    loaded = load_config(tmp_path / "config.toml")
    for name in PeerConfig.__dataclass_fields__:
        if name not in ("keystore", "state_dir"):
            assert getattr(loaded, name) == getattr(original, name), name
    assert loaded.keystore == tmp_path / "keystore.json"


def test_the_documented_example_parses(tmp_path: Path) -> None:
    text = config_module.__doc__ or ""
    example = text[text.index("version = 1") :]
    cfg = parse_config(tomllib.loads(example), tmp_path)
    assert (cfg.name, cfg.net, cfg.transport, cfg.k) == ("alice", "local", "libp2p", 4)
    assert cfg.model == tmp_path / "model.pt"


def test_relative_paths_are_relative_to_the_config_folder(tmp_path: Path) -> None:
    cfg = parse_config(
        _doc(peer={"state_dir": "state"}, keys={"keystore": "k/ks.json"}, model={"path": "m.pt"}),
        tmp_path,
    )
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.keystore == tmp_path / "k" / "ks.json"
    assert cfg.model == tmp_path / "m.pt"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_doc(network={"transprt": "mqtt"}), "unknown key(s) in [network]: transprt"),
        (_doc(network={"transport": "carrier-pigeon"}), "network.transport must be one of"),
        (_doc(network={"mdns": "yes"}), "network.mdns must be a bool"),
        (_doc(network={"listen": "/ip4/1.2.3.4/tcp/1"}), "network.listen must be a list"),
        (_doc(network={"broker": "tcp://x"}), "mqtt://host:port"),
        (_doc(control={"host": "0.0.0.0"}), "loopback"),
        (_doc(control={"port": 70000}), "control.port"),
        (_doc(query={"k": 0}), "query.k"),
        (_doc(query={"timeout_s": "5"}), "query.timeout_s must be a float"),
        (_doc(query={"timeout_s": 1000}), "query.timeout_s must be 0.1..110"),
        (_doc(market={"price_wei": -1}), "price_wei"),
        (_doc(peer={"net": "a+b"}), "net must not contain"),
        (_doc(network=[1]), "[network] must be a table"),
        ({"version": 2}, "unsupported config version"),
    ],
)
def test_every_mistake_is_one_config_error(
    tmp_path: Path, doc: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc, tmp_path)
    assert message in str(err.value)


def test_tables_owned_by_other_layers_are_left_alone(tmp_path: Path) -> None:
    cfg = parse_config(_doc(explorer={"port": 8080}), tmp_path)
    assert cfg.transport == "libp2p"


ESCROW = "0x" + "ab" * 20
REGISTRY = "0x" + "cd" * 20


def test_no_chain_table_means_unpaid(tmp_path: Path) -> None:
    cfg = parse_config(_doc(), tmp_path)
    assert cfg.chain is None and cfg.receipts_file is None


def test_chain_with_a_deployment_file(tmp_path: Path) -> None:
    chain = {
        "rpc_url": "http://127.0.0.1:8545",
        "deployment": "deployment.json",
        "eth_key_file": "eth.key",
        "settle_every_queries": 3,
        "settle_every_s": 2,
        "auto_withdraw": True,
    }
    cfg = parse_config(_doc(peer={"state_dir": "state"}, chain=chain), tmp_path)
    assert cfg.chain is not None
    assert cfg.chain.deployment == tmp_path / "deployment.json"
    assert cfg.chain.eth_key_file == tmp_path / "eth.key"
    assert cfg.chain.settle_every_queries == 3 and cfg.chain.settle_every_s == 2.0
    assert cfg.chain.auto_withdraw and cfg.chain.settle_window_s == 60
    assert cfg.receipts_file == tmp_path / "state" / "receipts.sqlite"
    path = tmp_path / "peer.toml"
    write_config(path, cfg)
    assert load_config(path) == cfg


def test_chain_with_addresses_and_a_key_from_the_environment(tmp_path: Path) -> None:
    chain = {"rpc_url": "http://h:1", "chain_id": 31337, "escrow": ESCROW, "registry": REGISTRY}
    cfg = parse_config(_doc(chain=chain), tmp_path)
    assert cfg.chain is not None and cfg.chain.eth_key_env == "FI_PEER_ETH_KEY"
    assert cfg.chain.deployment is None and cfg.chain.escrow == ESCROW


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ({"rpc": "http://h:1"}, "unknown key(s) in [chain]"),
        ({"deployment": "d.json"}, "chain.rpc_url is required"),
        ({"rpc_url": "ws://h:1", "deployment": "d.json"}, "http(s) URL"),
        ({"rpc_url": "http://h:1"}, "either a deployment file"),
        (
            {"rpc_url": "http://h:1", "deployment": "d.json", "chain_id": 1, "escrow": ESCROW,
             "registry": REGISTRY},
            "either a deployment file",
        ),
        ({"rpc_url": "http://h:1", "chain_id": 1, "escrow": "0x12", "registry": REGISTRY},
         "chain.escrow"),
        ({"rpc_url": "http://h:1", "deployment": "d.json", "settle_every_queries": 0},
         "settle_every_queries"),
        ({"rpc_url": "http://h:1", "deployment": "d.json", "settle_every_s": 0.0},
         "settle_every_s"),
        ({"rpc_url": "http://h:1", "deployment": "d.json", "eth_key_env": ""},
         "eth_key_file or eth_key_env"),
        ({"rpc_url": "http://h:1", "deployment": "d.json", "auto_withdraw": 1}, "a bool"),
    ],
)
def test_chain_mistakes_are_config_errors(
    tmp_path: Path, chain: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_doc(chain=chain), tmp_path)
    assert message in str(err.value)


def test_ints_are_accepted_where_floats_are_expected(tmp_path: Path) -> None:
    assert parse_config(_doc(query={"timeout_s": 3}), tmp_path).query_timeout_s == 3.0


def test_load_reports_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fi-peer init"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("version = = 1\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(broken)
