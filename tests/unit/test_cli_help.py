"""`--help` everywhere, with examples; every command the docs name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fi_peer.cli import app

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("init", "demo", "explorer", "simulate", "run", "query", "peers", "status",
            "metrics", "deploy", "fund", "account")  # fmt: skip


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_the_root_help_lists_every_command() -> None:
    text = _help()
    for command in COMMANDS:
        assert re.search(rf"│ {command}\s", text), command
    assert "--log-format" in text and "fi-peer init   then   fi-peer run" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example(command: str) -> None:
    text = _help(command)
    assert "Example" in text
    assert f"fi-peer {command}" in text  # the example runs this very command


def test_every_fi_peer_command_and_flag_in_the_docs_exists() -> None:
    """Each `fi-peer <command> --flag` written in README.md and docs/multi-machine.md."""
    helps: dict[str, str] = {}
    for doc in (REPO / "README.md", REPO / "docs" / "multi-machine.md"):
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in re.findall(r"fi-peer ([a-z]+)((?: [^`\n|#]*)?)", text):
            command, rest = line
            if command not in COMMANDS or command == "demo":
                continue  # prose ("fi-peer run as its own process"); demo's docs are its own
            helps.setdefault(command, _help(command))
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert flag in helps[command], f"{doc.name}: fi-peer {command} {flag}"
    assert {"init", "deploy", "fund", "account", "status", "metrics", "run"} <= set(helps)
