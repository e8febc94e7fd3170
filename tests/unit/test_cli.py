"""The ``fi-peer`` command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fi_peer.config import load_config
from fi_peer.identity import load_keystore


def fi_peer(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k != "FI_PEER_PASSPHRASE"}
    full_env = {**inherited, "COLUMNS": "120", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fi_peer.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def test_help_explains_commands() -> None:
    result = fi_peer("--help")
    assert result.returncode == 0
    assert "init" in result.stdout and "demo" in result.stdout
    demo_help = fi_peer("demo", "--help")
    assert demo_help.returncode == 0 and "--alpha" in demo_help.stdout


def test_init_writes_encrypted_keystore_and_config(tmp_path: Path) -> None:
    state = tmp_path / "alice"
    result = fi_peer(
        "init",
        "--state-dir",
        str(state),
        "--price-wei",
        "1000",
        "--net",
        "lab",
        env={"FI_PEER_PASSPHRASE": "correct horse battery"},
    )
    assert result.returncode == 0, result.stderr
    keystore = state / "keystore.json"
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600
    identity = load_keystore(keystore, "correct horse battery")
    assert identity.peer_id in result.stdout
    assert "correct horse" not in keystore.read_text()
    config = load_config(state / "config.toml")
    assert (config.net, config.price_wei, config.encrypted) == ("lab", 1000, True)
    assert config.keystore == keystore


def test_init_refuses_to_overwrite_and_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    env = {"FI_PEER_PASSPHRASE": "correct horse battery"}
    assert fi_peer("init", "--state-dir", str(tmp_path), env=env).returncode == 0
    before = (tmp_path / "keystore.json").read_bytes()
    again = fi_peer("init", "--state-dir", str(tmp_path), env=env)
    assert again.returncode == 2
    assert "exists" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "keystore.json").read_bytes() == before  # nothing lost

    no_pass = fi_peer("init", "--state-dir", str(tmp_path / "b"))
    assert no_pass.returncode == 2 and "FI_PEER_PASSPHRASE" in no_pass.stderr
    short = fi_peer("init", "--state-dir", str(tmp_path / "c"), env={"FI_PEER_PASSPHRASE": "x"})
    assert short.returncode == 2 and "8 characters" in short.stderr
    missing = fi_peer(
        "init",
        "--state-dir",
        str(tmp_path / "d"),
        "--model",
        str(tmp_path / "nope.pt"),
        env=env,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in short.stderr + missing.stderr + no_pass.stderr


def test_demo_rejects_bad_options_clearly() -> None:
    bad_k = fi_peer("demo", "--in-process", "--peers", "3", "--k", "5", "--queries", "1")
    assert bad_k.returncode == 2 and "--k" in bad_k.stderr and "Traceback" not in bad_k.stderr
    bad_rule = fi_peer("demo", "--peers", "3", "--rule", "nope", "--queries", "1", "--epochs", "1")
    assert bad_rule.returncode == 2 and "nope" in bad_rule.stderr
    assert "Traceback" not in bad_rule.stderr


@pytest.mark.slow
def test_demo_collective_beats_best_single_peer_by_15_points() -> None:
    """The issue's acceptance run, with fewer queries to keep the suite fast."""
    result = fi_peer(
        "demo", "--in-process", "--peers", "10", "--alpha", "0.1", "--queries", "120",
        "--seed", "1", "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["queries_answered"] == 120 and report["queries_failed"] == {}
    assert len(report["peers"]) == 10
    gain = report["collective_accuracy"] - report["best_single_accuracy_on_queries"]
    assert gain >= 0.15, report
    assert report["collective_accuracy"] <= report["oracle_accuracy_on_queries"] + 0.05
    # every query went through the protocol: 9 shares and 9 receipts each
    assert report["messages"]["accepted.share"] == 120 * 9
    assert report["messages"]["accepted.receipt"] == 120 * 9
    assert not any(k.startswith("rejected.") for k in report["messages"])


def test_an_image_of_a_digit_becomes_its_64_features(tmp_path: Path) -> None:
    """`fi-peer query digit.png`: a dark-on-light drawing maps back onto the data set's features."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from fi_peer.cli import digit_image_to_input

    digits = load_digits()
    x = digits.images[5] / 16.0
    drawing = Image.fromarray((255 - x * 255).astype(np.uint8))  # ink dark, paper light
    path = tmp_path / "five.png"
    drawing.resize((64, 64), Image.Resampling.NEAREST).save(path)
    features = np.array(digit_image_to_input(path))
    assert features.shape == (64,)
    np.testing.assert_allclose(features, x.ravel() / x.max(), atol=0.01)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        digit_image_to_input(tmp_path / "junk.png")
