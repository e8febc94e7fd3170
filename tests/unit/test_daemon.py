"""The daemon: input parsing, state-dir lock, keystore rules, and three daemons in one
process over the in-memory transport, driven through their real control API.

Process-level behaviour (signals, real transports, SIGKILL) is in
``tests/integration/test_daemons.py``; here a daemon is a coroutine stopped by
an event. Synchronisation is by events and polling observable state with a
deadline, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from fi_peer.config import PeerConfig, write_config
from fi_peer.control import ControlClient, ControlError, RequestError, read_control_file
from fi_peer.daemon import Daemon, load_identity, open_ledger, parse_input, state_dir_lock
from fi_peer.errors import ConfigError, KeystoreError
from fi_peer.identity import Identity, save_keystore
from fi_peer.models.data import load_digits_split
from fi_peer.models.runtime import ModelRuntime, save_owner_model
from fi_peer.models.zoo import train_owner_model
from network.memory import MemoryHub

DIM = 64


# -- pure pieces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "rows"),
    [
        ([0.5] * DIM, 1),
        ([[0.5] * 8] * 8, 1),  # one 8x8 image
        ([[0.5] * DIM] * 3, 3),
        ([[[0.5] * 8] * 8] * 2, 2),  # two images
    ],
)
def test_parse_input_accepts_vectors_images_and_batches(value: Any, rows: int) -> None:
    x = parse_input(value, DIM)
    assert x.shape == (rows, DIM) and x.dtype == np.float32


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1.0] * 63, "64 values per row"),
        ("seven", "not a numeric array"),
        ([[1.0] * DIM] * 65, "1..64 inputs"),
        ([float("nan")] * DIM, "NaN"),
        (None, "64 values per row"),
    ],
)
def test_parse_input_refuses_the_rest_with_400(value: Any, message: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_input(value, DIM)
    assert err.value.status == 400 and message in str(err.value)


def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    with state_dir_lock(tmp_path):
        assert (tmp_path / "daemon.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError, match="already running"), state_dir_lock(tmp_path):
            pass
    with state_dir_lock(tmp_path):  # released on exit
        pass


def test_an_encrypted_keystore_needs_the_passphrase(tmp_path: Path) -> None:
    identity = Identity.generate()
    save_keystore(tmp_path / "ks.json", identity, "correct horse", opslimit=1, memlimit=8192)
    config = PeerConfig(keystore=tmp_path / "ks.json", encrypted=True)
    with pytest.raises(KeystoreError, match="FI_PEER_PASSPHRASE"):
        load_identity(config, None)
    assert load_identity(config, "correct horse").peer_id == identity.peer_id
    save_keystore(tmp_path / "plain.json", identity, None)
    plain = PeerConfig(keystore=tmp_path / "plain.json", encrypted=False)
    assert load_identity(plain, "ignored").peer_id == identity.peer_id


# -- daemons in one process, over the memory hub -------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small owner models, each trained on its own slice of the digits."""
    import torch

    torch.set_num_threads(1)
    split = load_digits_split()
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for i in range(3):
        rows = slice(200 * i, 200 * (i + 1))
        model = train_owner_model(
            split.X_train[rows], split.y_train[rows], arch="mlp-64-32-10", epochs=3, seed=i
        )
        save_owner_model(model, folder / f"m{i}.pt")
        paths.append(folder / f"m{i}.pt")
    return paths


class Running:
    def __init__(self, daemon: Daemon, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.daemon, self.task, self.stop = daemon, task, stop

    def client(self) -> ControlClient:
        return ControlClient(read_control_file(self.daemon.config.control_file))

    async def get(self, path: str) -> Any:
        return await asyncio.to_thread(self.client().get, path, timeout=10)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        return await asyncio.to_thread(self.client().post, path, body, timeout=20)


def daemon_configs(
    folder: Path, models: list[Path], name: str, *, net: str, **extra: Any
) -> list[PeerConfig]:
    """A quick-beating k = 2 config per model, named and kept in ``<folder>/<name><i>``."""
    return [
        PeerConfig(
            name=f"{name}{i}",
            net=net,
            state_dir=folder / f"{name}{i}",
            model=model,
            announce_interval_ms=200,
            offer_window_ms=300,
            k=2,
            query_timeout_s=5.0,
            **extra,
        )
        for i, model in enumerate(models)
    ]


@contextlib.asynccontextmanager
async def running_daemons(
    models: list[Path],
    configs: list[PeerConfig],
    *,
    hub_seed: int,
    seed_prefix: str,
    ledgered: bool = False,
) -> AsyncIterator[list[Running]]:
    """One daemon per (model, config) over one in-memory hub, all ready and seeing each
    other; stopped (and awaited) on exit. ``ledgered`` gives each its privacy ledger."""
    hub = MemoryHub(seed=hub_seed)
    running: list[Running] = []
    for i, (model, config) in enumerate(zip(models, configs, strict=True)):
        identity = Identity.from_seed(f"{seed_prefix}-{i}".encode())
        daemon = Daemon(
            config,
            identity,
            ModelRuntime.load(model),
            hub.transport(identity.peer_id),
            ledger=open_ledger(config) if ledgered else None,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        async with asyncio.timeout(10):
            await daemon.ready.wait()
        running.append(Running(daemon, task, stop))
    for r in running:  # everyone is subscribed: announce now instead of at the next beat
        r.daemon.agent.announce()
    for r in running:
        assert await r.daemon.agent.wait_for_peers(len(models) - 1, timeout_s=10)
    yield running
    for r in running:
        r.stop.set()
    async with asyncio.timeout(15):
        await asyncio.gather(*(r.task for r in running))


@pytest_asyncio.fixture
async def trio_of_daemons(tmp_path: Path, models: list[Path]) -> AsyncIterator[list[Running]]:
    configs = daemon_configs(tmp_path, models, "d", net="unit")
    async with running_daemons(models, configs, hub_seed=0, seed_prefix="daemon-test") as running:
        yield running


async def test_status_peers_and_a_collective_answer(trio_of_daemons: list[Running]) -> None:
    a, b, c = trio_of_daemons
    status = await a.get("/v1/status")
    assert status["peer_id"] == a.daemon.peer_id and status["membership"] == 2
    assert status["transport"]["addresses"] == [f"memory://{a.daemon.peer_id}"]
    assert "evidence" in status["model"]["rules"]
    peers = await a.get("/v1/peers")
    assert {p["peer_id"] for p in peers["peers"]} == {b.daemon.peer_id, c.daemon.peer_id}
    assert all(p["connected"] and p["addresses"] for p in peers["peers"])

    x = load_digits_split().X_test[:2].tolist()
    answer = await a.post("/v1/query", {"input": x, "rule": "evidence", "k": 2})
    assert [r["reason"] for r in answer["results"]] == ["ok", "ok"]
    for result in answer["results"]:
        assert set(result["contributors"]) == {b.daemon.peer_id, c.daemon.peer_id}
        assert 0 <= result["label"] < 10 and len(result["distribution"]) == 10
        assert abs(sum(result["distribution"]) - 1.0) < 1e-3
    assert (await a.get("/v1/status"))["queries"] == {"ok": 2, "failed": 0}


async def test_bad_queries_are_refused_with_a_reason(trio_of_daemons: list[Running]) -> None:
    a = trio_of_daemons[0]
    x = [0.0] * DIM
    with pytest.raises(ControlError, match=r"400.*rule 'nope'"):
        await a.post("/v1/query", {"input": x, "rule": "nope"})
    with pytest.raises(ControlError, match=r"400.*k must be"):
        await a.post("/v1/query", {"input": x, "k": 0})
    with pytest.raises(ControlError, match=r"400.*timeout_s"):
        await a.post("/v1/query", {"input": x, "timeout_s": "soon"})
    with pytest.raises(ControlError, match=r"400.*64 values"):
        await a.post("/v1/query", {"input": [1.0, 2.0]})


async def test_stopping_removes_the_control_file(trio_of_daemons: list[Running]) -> None:
    a = trio_of_daemons[0]
    control_file = a.daemon.config.control_file
    assert control_file.exists()
    a.stop.set()
    async with asyncio.timeout(10):
        await a.task
    assert not control_file.exists()
    with pytest.raises(ControlError):
        read_control_file(control_file)


# -- `fi-peer run` as a process: operational errors are one line, never a traceback ------


def fi_peer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k != "FI_PEER_PASSPHRASE"}
    return subprocess.run(
        [sys.executable, "-m", "fi_peer.cli", *args],
        capture_output=True,
        text=True,
        env={**inherited, "COLUMNS": "200", **(env or {})},
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_run_fails_with_one_clear_line(tmp_path: Path, models: list[Path]) -> None:
    missing = fi_peer("run", "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and "fi-peer init" in missing.stderr

    identity = Identity.generate()
    save_keystore(
        tmp_path / "enc" / "keystore.json", identity, "pw-12345678", opslimit=1, memlimit=8192
    )
    write_config(tmp_path / "enc" / "config.toml", PeerConfig(model=models[0]))
    locked = fi_peer("run", "--config", str(tmp_path / "enc" / "config.toml"))
    assert locked.returncode == 2 and "FI_PEER_PASSPHRASE" in locked.stderr

    save_keystore(tmp_path / "mq" / "keystore.json", identity, None)
    dead_broker = PeerConfig(
        encrypted=False, model=models[0], transport="mqtt", broker="mqtt://127.0.0.1:9"
    )
    write_config(tmp_path / "mq" / "config.toml", dead_broker)
    unreachable = fi_peer("run", "--config", str(tmp_path / "mq" / "config.toml"))
    assert unreachable.returncode == 1 and "cannot reach MQTT broker" in unreachable.stderr
    for result in (missing, locked, unreachable):
        assert "Traceback" not in result.stderr


def test_client_commands_without_a_daemon_say_so(tmp_path: Path) -> None:
    write_config(tmp_path / "config.toml", PeerConfig())
    for command in ("status", "peers"):
        result = fi_peer(command, "--state-dir", str(tmp_path))
        assert result.returncode == 1, result.stderr
        assert "fi-peer run" in result.stderr and "Traceback" not in result.stderr


# -- [chain]: the Ethereum key ---------------------------------------------------------

ETH_KEY = "0x" + "4c" * 32


def _chain_config(tmp_path: Path, **kw: Any) -> Any:
    from fi_peer.config import ChainConfig

    return ChainConfig(rpc_url="http://127.0.0.1:1", deployment=tmp_path / "d.json", **kw)


def test_the_eth_key_file_must_be_private(tmp_path: Path) -> None:
    from fi_peer.daemon import load_eth_key

    key_file = tmp_path / "eth.key"
    key_file.write_text(ETH_KEY[2:] + "\n")
    os.chmod(key_file, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_eth_key(_chain_config(tmp_path, eth_key_file=key_file))
    os.chmod(key_file, 0o600)
    assert load_eth_key(_chain_config(tmp_path, eth_key_file=key_file)) == ETH_KEY


def test_the_eth_key_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fi_peer.daemon import load_eth_key

    config = _chain_config(tmp_path, eth_key_env="FI_TEST_ETH_KEY")
    monkeypatch.delenv("FI_TEST_ETH_KEY", raising=False)
    with pytest.raises(ConfigError, match="FI_TEST_ETH_KEY"):
        load_eth_key(config)
    monkeypatch.setenv("FI_TEST_ETH_KEY", "0x1234")
    with pytest.raises(ConfigError, match="32 bytes"):
        load_eth_key(config)
    monkeypatch.setenv("FI_TEST_ETH_KEY", ETH_KEY)
    assert load_eth_key(config) == ETH_KEY


def test_a_missing_deployment_file_is_a_config_error(tmp_path: Path) -> None:
    from fi_peer.daemon import open_chain

    key_file = tmp_path / "eth.key"
    key_file.write_text(ETH_KEY)
    os.chmod(key_file, 0o600)
    config = PeerConfig(state_dir=tmp_path, chain=_chain_config(tmp_path, eth_key_file=key_file))
    with pytest.raises(ConfigError, match=r"\[chain\]"):
        open_chain(config)
