"""Config validation: every error names the key, what is wrong, and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fi_peer.config import load_config, parse_config
from fi_peer.errors import ConfigError


def _error(tmp_path: Path, **sections: object) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config({"version": 1, **sections}, tmp_path)
    return str(err.value)


@pytest.mark.parametrize(
    ("sections", "key", "fix"),
    [
        ({"market": {"price_wei": -5}}, "market.price_wei must be >= 0, got -5", "price_wei = 0"),
        ({"market": {"capacity": 0}}, "market.capacity must be >= 1", "capacity = 64"),
        ({"network": {"transport": "udp"}}, "got 'udp'", 'transport = "libp2p"'),
        ({"network": {"listen": []}}, "network.listen needs", 'listen = ["/ip4/0.0.0.0/tcp/4001"]'),
        ({"network": {"missed_beats": 0}}, "network.missed_beats must be 1..100, got 0",
         "set missed_beats in [network]"),
        ({"control": {"host": "0.0.0.0"}}, "control.host must be a loopback", "SSH tunnel"),
        ({"query": {"k": 99}}, "query.k must be 1..64, got 99", "set k in [query]"),
        ({"query": {"rule": "majority"}}, "query.rule must be one of vote, soft",
         'rule = "evidence"'),
        ({"query": {"min_committee": 0}}, "query.min_committee must be 1..64",
         "set min_committee in [query]"),
        ({"privacy": {"delta": 2.0}}, "privacy.delta must be in (0, 1)", "delta = 1e-5"),
        ({"privacy": {"global_epsilon": -1.0}}, "privacy.global_epsilon must be >= 0",
         "or inf for no limit"),
        ({"peer": {"net": "a b"}}, "peer.net must not contain", "letters, digits"),
        ({"query": {"timeout_s": "5"}}, "query.timeout_s must be a float, got '5'",
         "write a number without quotes (e.g. timeout_s = 10.0 in [query])"),
        ({"network": {"mdns": "yes"}}, "network.mdns must be a bool",
         "true or false without quotes"),
        ({"network": {"bootstrap": "/ip4/1.2.3.4/tcp/1"}}, "network.bootstrap must be a list",
         'bootstrap = ["/ip4/203.0.113.7/tcp/4001"]'),
        ({"chain": {"rpc_url": "http://h:1"}}, "either a deployment file", "`fi-peer deploy`"),
        ({"chain": {"deployment": "d.json"}}, "chain.rpc_url is required", "delete [chain]"),
        ({"chain": {"rpc_url": "http://h:1", "deployment": "d.json", "settle_window_s": 0}},
         "chain.settle_window_s must be 1..2.592e+06", "set settle_window_s in [chain]"),
    ],
)  # fmt: skip
def test_each_error_names_key_and_fix(
    tmp_path: Path, sections: dict[str, object], key: str, fix: str
) -> None:
    message = _error(tmp_path, **sections)  # type: ignore[arg-type]
    assert key in message
    assert "; fix: " in message
    assert fix in message.split("; fix: ", 1)[1]


def test_a_misspelt_key_gets_a_suggestion(tmp_path: Path) -> None:
    message = _error(tmp_path, network={"bootstrp": []})
    assert message.startswith("unknown key(s) in [network]: bootstrp")
    assert message.endswith("fix: did you mean bootstrp -> bootstrap?")
    unrelated = _error(tmp_path, query={"zzz": 1})
    assert unrelated.endswith("fix: remove or rename them")


def test_the_version_error_says_what_to_write(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unsupported config version None; fix: .*version = 1"):
        parse_config({}, tmp_path)


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("version = 1\n[control]\nport = 99999\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: control.port must be 0..65535, got 99999; fix:")


def test_public_metrics_and_announce_round_trip(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "version": 1,
            "control": {"public_metrics": True, "port": 9101},
            "network": {"announce": ["/ip4/198.51.100.4/tcp/4001"]},
        },
        tmp_path,
    )
    assert cfg.public_metrics and cfg.control_port == 9101
    assert cfg.announce == ("/ip4/198.51.100.4/tcp/4001",)
    again = parse_config(cfg.to_toml(), tmp_path)
    assert (again.public_metrics, again.announce) == (True, cfg.announce)
    import fi_peer.config as module

    assert "announce = []" in (module.__doc__ or "") and "public_metrics = false" in (
        module.__doc__ or ""
    )
