"""Fixtures for tests with real daemons: owner models trained once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.support import load_local_network

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
