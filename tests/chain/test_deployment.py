"""Deployment records round-trip through a JSON file (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fi_peer.chain.client import Deployment
from fi_peer.chain.errors import ChainError
from fi_peer.chain.terms import checksum


def test_deployment_round_trips(tmp_path: Path) -> None:
    deployment = Deployment(
        chain_id=31337,
        escrow=checksum("0x" + "ab" * 20),
        registry=checksum("0x" + "cd" * 20),
        block=3,
        claim_grace_s=3600,
        min_stake_wei=10**18,
        unbonding_s=86_400,
    )
    path = tmp_path / "deployment.json"
    deployment.save(path)
    assert Deployment.load(path) == deployment


def test_a_bad_deployment_file_is_a_chain_error(tmp_path: Path) -> None:
    path = tmp_path / "deployment.json"
    path.write_text('{"chain_id": 1}')
    with pytest.raises(ChainError):
        Deployment.load(path)
    with pytest.raises(ChainError):
        Deployment.load(tmp_path / "missing.json")
