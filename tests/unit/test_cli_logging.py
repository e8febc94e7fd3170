"""Structured logs: text by default, JSON lines with --log-format json or $FI_PEER_LOG_FORMAT."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fi_peer.logging_setup import JsonFormatter, configure, default_format


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_time_level_logger_message_and_extras() -> None:
    stream = io.StringIO()
    configure(logging.INFO, "json", stream)
    log = logging.getLogger("fi_peer.test")
    log.info("answered %d queries", 3, extra={"peer": "ab12", "wei": 1000})
    log.debug("not shown at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert (first["level"], first["logger"], first["msg"]) == (
        "INFO",
        "fi_peer.test",
        "answered 3 queries",
    )
    assert (first["peer"], first["wei"]) == ("ab12", 1000)
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert isinstance(first["pid"], int)
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


def test_text_is_the_default_and_configure_replaces_only_its_own_handler() -> None:
    stream = io.StringIO()
    configure(logging.WARNING, "text", stream)
    configure(logging.WARNING, "text", stream)  # again: still one handler of ours
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "fi-peer"]
    assert len(ours) == 1
    logging.getLogger("fi_peer.x").warning("peer %s expired", "ab12")
    line = stream.getvalue().strip()
    assert line.endswith("WARNING fi_peer.x: peer ab12 expired")
    with pytest.raises(ValueError, match="text, json"):
        configure(logging.INFO, "xml", stream)


def test_the_environment_picks_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FI_PEER_LOG_FORMAT", "JSON")
    assert default_format() == "json"
    monkeypatch.setenv("FI_PEER_LOG_FORMAT", "yaml")  # unknown: text, never a crash
    assert default_format() == "text"


def test_an_odd_extra_value_never_breaks_a_record() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.path = Path("/tmp/a")
    assert json.loads(JsonFormatter().format(record))["path"] == "/tmp/a"


def test_the_cli_flag_gives_json_errors_from_a_real_process(tmp_path: Path) -> None:
    """`fi-peer run --log-format json` on a broken config: the flag is accepted and the
    one error line stays a plain message naming key and fix; a wrong format is refused."""
    (tmp_path / "config.toml").write_text("version = 1\n[market]\nprice_wei = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "fi_peer.cli", "run", "--state-dir", str(tmp_path),
         "--log-format", "json"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "market.price_wei must be >= 0, got -1; fix:" in result.stderr
    assert "Traceback" not in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "fi_peer.cli", "--log-format", "xml", "peers"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "xml" in bad.stderr
