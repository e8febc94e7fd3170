"""Compiled contract artifacts from ``contracts/build/`` (no Node at run time).

``scripts/compile_contracts`` (solc-js, pinned in package.json) writes one JSON
file per contract: ABI, creation and runtime bytecode, compiler version and
settings, and the sha256 of every Solidity source of the compilation. The
artifacts are committed; :func:`stale_sources` tells, without Node, whether
the sources changed since (a test fails on it, and another recompiles and
compares byte for byte when Node is present).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fi_peer.chain.errors import ArtifactError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = REPO_ROOT / "contracts"
#: Environment variable naming another build directory (e.g. an installed copy).
BUILD_DIR_ENV = "FI_PEER_CONTRACTS_BUILD"

#: Compiler settings; the same object as SETTINGS in scripts/compile_contracts.js.
SETTINGS: Mapping[str, Any] = {
    "optimizer": {"enabled": True, "runs": 1000},
    "viaIR": True,
    "evmVersion": "cancun",
    "metadata": {"bytecodeHash": "ipfs"},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Artifact:
    """One compiled contract."""

    name: str
    source_name: str
    compiler: str
    abi: tuple[Mapping[str, Any], ...]
    bytecode: bytes
    deployed_bytecode: bytes
    sources: Mapping[str, str]  # repo-relative path -> sha256 hex
    settings: Mapping[str, Any]

    def abi_list(self) -> list[dict[str, Any]]:
        """The ABI as the plain list web3 expects."""
        return [dict(entry) for entry in self.abi]


def build_dir() -> Path:
    """``$FI_PEER_CONTRACTS_BUILD`` if set, else ``contracts/build`` of this checkout."""
    override = os.environ.get(BUILD_DIR_ENV)
    return Path(override) if override else CONTRACTS_DIR / "build"


def load_artifact(name: str, directory: Path | None = None) -> Artifact:
    """Read ``<directory>/<name>.json`` (default :func:`build_dir`)."""
    return _load(name, str(directory or build_dir()))


@cache
def _load(name: str, directory: str) -> Artifact:
    path = Path(directory) / f"{name}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"no artifact {path}; run scripts/compile_contracts to build the contracts"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc}") from exc
    try:
        return Artifact(
            name=str(doc["contractName"]),
            source_name=str(doc["sourceName"]),
            compiler=str(doc["compiler"]),
            abi=tuple(doc["abi"]),
            bytecode=_hex_bytes(doc["bytecode"]),
            deployed_bytecode=_hex_bytes(doc["deployedBytecode"]),
            sources={str(k): str(v) for k, v in doc["sources"].items()},
            settings=doc["settings"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"malformed artifact {path}: {exc!r}") from exc


def _hex_bytes(text: str) -> bytes:
    if not isinstance(text, str) or not text.startswith("0x"):
        raise ValueError("bytecode must be a 0x-prefixed hex string")
    return bytes.fromhex(text[2:])


def source_hashes(contracts_dir: Path = CONTRACTS_DIR) -> dict[str, str]:
    """sha256 of every ``.sol`` under ``contracts/`` (except ``build/``), keyed as
    the compile script keys them (POSIX paths relative to the repository root)."""
    root = contracts_dir.parent
    build = contracts_dir / "build"
    hashes: dict[str, str] = {}
    for path in sorted(contracts_dir.rglob("*.sol")):
        if build in path.parents:
            continue
        rel = path.relative_to(root).as_posix()
        hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(hashes.items()))


def stale_sources(artifact: Artifact, contracts_dir: Path = CONTRACTS_DIR) -> list[str]:
    """Why ``artifact`` does not match the sources on disk (empty list: up to date)."""
    problems: list[str] = []
    current = source_hashes(contracts_dir)
    for path, digest in current.items():
        recorded = artifact.sources.get(path)
        if recorded is None:
            problems.append(f"{path}: new source, not in the artifact")
        elif recorded != digest:
            problems.append(f"{path}: changed since the artifact was built")
    gone = [path for path in artifact.sources if path not in current]
    problems.extend(f"{path}: in the artifact, gone from disk" for path in gone)
    if dict(artifact.settings) != dict(SETTINGS):
        problems.append(f"settings differ: artifact {artifact.settings!r} != {dict(SETTINGS)!r}")
    return problems
