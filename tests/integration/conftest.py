"""Fixtures for tests with real daemons: owner models trained once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fi_peer.chain.anvil import AnvilConfig, AnvilProcess
from fi_peer.chain.client import Deployment
from tests.chain.conftest import require_anvil
from tests.integration.support import deploy_on, load_local_network

PEERS = 5
ALPHA = 0.5
EPOCHS = 10


@pytest.fixture(scope="session")
def local_network() -> Any:
    """The ``scripts/local_network.py`` module."""
    return load_local_network()


@pytest.fixture(scope="session")
def owner_models(tmp_path_factory: pytest.TempPathFactory, local_network: Any) -> list[Path]:
    """PEERS + 1 owner models (the extra one is the late joiner's), with samples.json."""
    cache = tmp_path_factory.mktemp("models")
    paths: list[Path] = local_network.ensure_models(cache, PEERS + 1, ALPHA, 1, EPOCHS)
    return paths


@pytest.fixture(scope="session")
def samples(owner_models: list[Path], local_network: Any) -> dict[str, Any]:
    """Test-split digits with their labels: {"inputs": [[64 floats]...], "labels": [...]}."""
    doc: dict[str, Any] = local_network.sample_inputs(owner_models[0].parent)
    return doc


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilProcess]:
    """A fresh anvil (10 funded accounts) for each module of paid-query tests."""
    require_anvil()
    process = AnvilProcess(AnvilConfig(accounts=10))
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def deployment(anvil: AnvilProcess) -> Deployment:
    """The contracts on that module's anvil, with a 30 s claim grace."""
    return deploy_on(anvil, claim_grace_s=30)
