"""The committed artifacts in contracts/build match the Solidity sources.

Two checks: a source hash recorded in each artifact (no Node needed, always
runs), and a full recompile with the pinned solc-js compared byte for byte
(needs node + ``npm ci``; skipped without them, except in CI where it fails).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fi_peer.chain.artifacts import (
    CONTRACTS_DIR,
    REPO_ROOT,
    ArtifactError,
    load_artifact,
    source_hashes,
    stale_sources,
)

ARTIFACTS = sorted(p.stem for p in (CONTRACTS_DIR / "build").glob("*.json"))


def test_every_contract_has_an_artifact() -> None:
    assert {"QueryEscrow", "PeerRegistry", "ReentrantReceiver"} <= set(ARTIFACTS)


@pytest.mark.parametrize("name", ARTIFACTS)
def test_artifact_is_up_to_date_with_the_sources(name: str) -> None:
    artifact = load_artifact(name)
    problems = stale_sources(artifact)
    assert not problems, (
        f"contracts/build/{name}.json is stale; run scripts/compile_contracts:\n  "
        + "\n  ".join(problems)
    )
    assert artifact.bytecode and artifact.deployed_bytecode
    assert artifact.compiler.startswith("0.8.28+")


def test_a_changed_source_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "contracts"
    shutil.copytree(CONTRACTS_DIR, copy)
    artifact = load_artifact("QueryEscrow")
    assert stale_sources(artifact, copy) == []
    source = copy / "QueryEscrow.sol"
    source.write_text(source.read_text() + "\n// an innocent comment changes the bytecode hash\n")
    changed = "contracts/QueryEscrow.sol: changed since the artifact was built"
    assert stale_sources(artifact, copy) == [changed]
    (copy / "Extra.sol").write_text("// new\n")
    assert "contracts/Extra.sol: new source, not in the artifact" in stale_sources(artifact, copy)
    assert set(source_hashes(copy)) == set(artifact.sources) | {"contracts/Extra.sol"}


def test_missing_or_malformed_artifacts_raise(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="compile_contracts"):
        load_artifact("Nope", tmp_path)
    (tmp_path / "Bad.json").write_text(json.dumps({"abi": []}))
    with pytest.raises(ArtifactError, match="malformed"):
        load_artifact("Bad", tmp_path)


def test_recompiling_reproduces_the_committed_artifacts() -> None:
    node = shutil.which("node")
    solc = REPO_ROOT / "node_modules" / "solc" / "package.json"
    if node is None or not solc.is_file():
        message = "node or node_modules/solc missing (run npm ci)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        [node, str(REPO_ROOT / "scripts" / "compile_contracts.js"), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
