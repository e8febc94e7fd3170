"""A peer's configuration file (TOML), as written by ``fi-peer init``.

Relative paths are relative to the config file's folder (the state dir), so a
state dir can be moved as a whole.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fi_peer.errors import ConfigError

CONFIG_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerConfig:
    name: str = "peer"
    net: str = "local"
    keystore: Path = Path("keystore.json")
    encrypted: bool = True
    model: Path | None = None
    price_wei: int = 0
    capacity: int = 64

    def __post_init__(self) -> None:
        if not self.name or not self.net.isascii() or "/" in self.net or not self.net:
            raise ConfigError("name and net must be non-empty; net is ASCII without '/'")
        if self.price_wei < 0 or self.capacity < 1:
            raise ConfigError("price_wei must be >= 0 and capacity >= 1")

    def to_toml(self) -> dict[str, Any]:
        peer: dict[str, Any] = {"name": self.name, "net": self.net}
        keys = {"keystore": str(self.keystore), "encrypted": self.encrypted}
        market = {"price_wei": self.price_wei, "capacity": self.capacity}
        doc: dict[str, Any] = {"version": CONFIG_VERSION, "peer": peer, "keys": keys}
        if self.model is not None:
            doc["model"] = {"path": str(self.model)}
        doc["market"] = market
        return doc


def _get(table: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be a {kind.__name__}")
    return value


def parse_config(doc: dict[str, Any], base: Path) -> PeerConfig:
    if doc.get("version") != CONFIG_VERSION:
        raise ConfigError(f"unsupported config version {doc.get('version')!r}")
    peer, keys = doc.get("peer", {}), doc.get("keys", {})
    model, market = doc.get("model", {}), doc.get("market", {})
    for section in (peer, keys, model, market):
        if not isinstance(section, dict):
            raise ConfigError("config sections must be tables")
    model_path = _get(model, "path", str, "")
    return PeerConfig(
        name=_get(peer, "name", str, "peer"),
        net=_get(peer, "net", str, "local"),
        keystore=base / _get(keys, "keystore", str, "keystore.json"),
        encrypted=_get(keys, "encrypted", bool, True),
        model=(base / model_path) if model_path else None,
        price_wei=_get(market, "price_wei", int, 0),
        capacity=_get(market, "capacity", int, 64),
    )


def load_config(path: Path) -> PeerConfig:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"no config at {path} (run `fi-peer init` first)") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return parse_config(doc, path.parent)


def write_config(path: Path, config: PeerConfig) -> None:
    """Write atomically (a crash never leaves half a config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            tomli_w.dump(config.to_toml(), fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
