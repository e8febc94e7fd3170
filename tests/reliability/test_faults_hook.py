"""The test-only fault hook (fi_peer/faults.py): inert unless configured, and
when configured it SIGKILLs the process at exactly the point and count named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from fi_peer.faults import ENV

SCRIPT = """
import sys
from fi_peer import faults
for arg in sys.argv[1:]:
    if arg.startswith("kind:"):
        faults.outbound(faults.msgpack.packb([1, arg[5:], b"", 0, b"", b"", b""]))
    else:
        faults.point(arg)
    print("passed", arg, flush=True)
"""


def _run(fault: str | None, *points: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if fault is not None:
        env[ENV] = fault
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *points],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )


def test_inert_by_default_and_for_other_points() -> None:
    result = _run(None, "exit_before_share", "kind:share", "kind:reveal")
    assert result.returncode == 0 and result.stdout.count("passed") == 3
    result = _run("exit_before_reveal", "exit_before_share", "kind:share", "nonsense")
    assert result.returncode == 0 and result.stdout.count("passed") == 3
    result = _run("not_a_point", "exit_before_share")  # an unknown fault is inert
    assert result.returncode == 0


def test_sigkill_at_the_nth_time_the_point_is_reached() -> None:
    result = _run("exit_after_escrow:2", "exit_after_escrow", "exit_after_escrow", "never")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split("\n")[:1] == ["passed exit_after_escrow"]
    assert "never" not in result.stdout


def test_outbound_envelopes_fire_by_kind_and_a_file_arms_it(tmp_path: Path) -> None:
    spec = tmp_path / "fault"
    result = _run(f"@{spec}", "kind:reveal")  # no file yet: inert
    assert result.returncode == 0
    spec.write_text("exit_before_reveal\n")
    result = _run(f"@{spec}", "kind:share", "kind:reveal", "after")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["passed", "kind:share"]
