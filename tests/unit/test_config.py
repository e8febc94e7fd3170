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
    cfg = parse_config(_doc(chain={"rpc": "http://127.0.0.1:8545"}), tmp_path)
    assert cfg.transport == "libp2p"


def test_ints_are_accepted_where_floats_are_expected(tmp_path: Path) -> None:
    assert parse_config(_doc(query={"timeout_s": 3}), tmp_path).query_timeout_s == 3.0


def test_load_reports_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fi-peer init"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("version = = 1\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(broken)
