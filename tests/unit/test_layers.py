"""Layer rules that import-linter cannot express.

import-linter (contracts in pyproject.toml, run by ``lint-imports``) checks the
import graph between packages. It cannot see that the protocol core must not
read the clock, use the global random generator, start threads or open files:
those are standard-library modules and builtins. This test walks the AST of
every module under ``fi_peer/protocol/`` and fails on any of them.

The protocol core takes the current time and random bytes as arguments
(DESIGN.md, "Layers"; STYLE.md 1 and 7). Crypto nonces come from
``nacl.utils.random``, which stays allowed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_DIR = REPO_ROOT / "fi_peer" / "protocol"

# Top-level module -> why the protocol core may not import it.
FORBIDDEN_MODULES: dict[str, str] = {
    "asyncio": "event loop: the agent drives the state machines",
    "trio": "event loop: the agent drives the state machines",
    "socket": "network I/O belongs to the transports",
    "ssl": "network I/O belongs to the transports",
    "selectors": "network I/O belongs to the transports",
    "network": "transports are wired in by the daemon only",
    "threading": "concurrency belongs to the agent/daemon",
    "multiprocessing": "concurrency belongs to the agent/daemon",
    "concurrent": "concurrency belongs to the agent/daemon",
    "subprocess": "no processes in the protocol core",
    "time": "reads the clock: take now_ms as an argument",
    "datetime": "reads the clock: take now_ms as an argument",
    "random": "global RNG: take a generator or bytes as an argument (nonces: nacl.utils.random)",
    "torch": "model runtime belongs to fi_peer.models",
    "web3": "chain client belongs to fi_peer.chain",
    "pathlib": "file I/O belongs to the daemon",
    "shutil": "file I/O belongs to the daemon",
    "tempfile": "file I/O belongs to the daemon",
    "sqlite3": "file I/O belongs to the daemon",
}

# Calls that do file or console I/O. Bare names are builtins; dotted names are
# module functions. (Methods such as ``Verifier.open`` are not affected.)
FORBIDDEN_CALLS: dict[str, str] = {
    "open": "file I/O",
    "input": "console I/O",
    "print": "console I/O: log with logging.getLogger(__name__)",
    "builtins.open": "file I/O",
    "io.open": "file I/O",
    "os.open": "file I/O",
    "os.fdopen": "file I/O",
    "codecs.open": "file I/O",
}

DYNAMIC_IMPORTS = {"__import__", "importlib.import_module"}


@dataclass(frozen=True, slots=True)
class Violation:
    filename: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}: {self.message}"


def _dotted_name(node: ast.expr) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _module_violation(module: str, filename: str, line: int) -> Violation | None:
    root = module.split(".", 1)[0]
    reason = FORBIDDEN_MODULES.get(root)
    if reason is None:
        return None
    return Violation(filename, line, f"imports {module} ({reason})")


def find_violations(source: str, filename: str = "<string>") -> list[Violation]:
    """Every forbidden import or call in ``source``, in line order.

    Imports are checked wherever they appear (module level, inside functions,
    under ``if TYPE_CHECKING:``). Relative imports are internal and left to
    import-linter.
    """
    found: list[Violation] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if v := _module_violation(alias.name, filename, node.lineno):
                    found.append(v)
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0 or node.module is None:
                continue  # relative: internal to fi_peer, import-linter's business
            if v := _module_violation(node.module, filename, node.lineno):
                found.append(v)
        elif isinstance(node, ast.Call):
            name = _dotted_name(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(
                    Violation(filename, node.lineno, f"calls {name}() ({FORBIDDEN_CALLS[name]})")
                )
            elif (
                name in DYNAMIC_IMPORTS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and (v := _module_violation(node.args[0].value, filename, node.lineno))
            ):
                found.append(v)
    return sorted(found, key=lambda v: v.line)


def _protocol_modules() -> list[Path]:
    return sorted(p for p in PROTOCOL_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_protocol_package_has_modules() -> None:
    # Guards the parametrized test below against silently checking nothing.
    assert PROTOCOL_DIR.is_dir(), f"{PROTOCOL_DIR} is missing"
    assert _protocol_modules(), f"no modules under {PROTOCOL_DIR}"


@pytest.mark.parametrize("path", _protocol_modules(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_protocol_module_does_no_io(path: Path) -> None:
    violations = find_violations(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))
    assert not violations, "sans-I/O rule broken:\n" + "\n".join(map(str, violations))


# --- the checker itself -------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import asyncio", "imports asyncio"),
        ("import socket as s", "imports socket"),
        ("import time", "imports time"),
        ("from time import monotonic", "imports time"),
        ("from datetime import datetime", "imports datetime"),
        ("import random", "imports random"),
        ("import threading", "imports threading"),
        ("from torch import nn", "imports torch"),
        ("import web3.exceptions", "imports web3.exceptions"),
        ("def f():\n    import time\n", "imports time"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio\n", "asyncio"),
        ("import importlib\nimportlib.import_module('asyncio')", "imports asyncio"),
        ("__import__('socket')", "imports socket"),
        ("data = open('peers.json').read()", "calls open()"),
        ("with open(path, 'rb') as f:\n    pass\n", "calls open()"),
        ("import io\nio.open(path)", "calls io.open()"),
        ("print('hello')", "calls print()"),
    ],
)
def test_checker_flags(source: str, expected: str) -> None:
    violations = find_violations(source)
    assert violations, f"not flagged: {source!r}"
    assert any(expected in v.message for v in violations), violations


@pytest.mark.parametrize(
    "source",
    [
        "import nacl.utils\nnonce = nacl.utils.random(16)",
        "from fi_peer.errors import MalformedMessage",
        "from . import codec\nfrom .messages import Announce",
        "import dataclasses, enum, hashlib, hmac, struct, logging",
        "import timeit_like_name",  # a prefix of a forbidden name is not that module
        "verifier.open(raw, now_ms=now_ms)",  # a method called open is not the builtin
        "import msgpack\nimport numpy as np",
    ],
)
def test_checker_allows(source: str) -> None:
    assert find_violations(source) == []


def test_checker_reports_file_and_line() -> None:
    (violation,) = find_violations("x = 1\n\nimport time\n", "fi_peer/protocol/clock.py")
    assert (violation.filename, violation.line) == ("fi_peer/protocol/clock.py", 3)
    assert str(violation).startswith("fi_peer/protocol/clock.py:3: imports time")
