"""``fi-peer explorer`` as a user runs it: --help, bad arguments, a real process
against anvil that stops cleanly on Ctrl-C, wrong addresses, an RPC that is down."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from fi_peer.chain.anvil import free_port
from fi_peer.explorer import main
from tests.explorer.conftest import AnvilHistory, ExplorerProcess

ESCROW = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def test_help_lists_the_options_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--rpc", "--contract", "--registry", "--host", "--port", "--index"):
        assert option in out
    assert "examples:" in out and "127.0.0.1" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rpc", "http://127.0.0.1:1", "--contract", "0x1234"], "--contract: not an address"),
        (["--rpc", "ws://x", "--contract", ESCROW], "--rpc: an http(s) URL"),
        (["--rpc", "http://x", "--contract", ESCROW, "--registry", "zz"], "--registry"),
        (["--rpc", "http://x", "--contract", ESCROW, "--port", "70000"], "--port"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--rpc", "http://127.0.0.1:8545"])
    assert info.value.code == 2
    assert "--contract" in capsys.readouterr().err


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.integration
def test_a_real_process_serves_and_stops_on_ctrl_c(anvil_history: AnvilHistory) -> None:
    h = anvil_history.history
    args = [
        "--rpc",
        anvil_history.process.rpc_url,
        "--contract",
        h.deployment.escrow,
        "--registry",
        h.deployment.registry,
        "--port",
        "0",
    ]
    explorer = ExplorerProcess(args).start()
    try:
        assert explorer.url.startswith("http://127.0.0.1:")  # loopback by default
        status, text = _get(explorer.url + "/")
        assert status == 200 and "Overview" in text
        status, _ = _get(f"{explorer.url}/query/0x{h.terms['q1'].query_id.hex()}")
        assert status == 200  # (redirected to the querier's query page)
    finally:
        assert explorer.stop() == 0


@pytest.mark.integration
def test_wrong_contract_exits_2(anvil_history: AnvilHistory) -> None:
    nowhere = "0x" + "22" * 20
    explorer = ExplorerProcess(
        ["--rpc", anvil_history.process.rpc_url, "--contract", nowhere, "--port", "0"]
    )
    with pytest.raises(AssertionError, match="did not start"):
        explorer.start()
    assert explorer.proc is not None and explorer.proc.returncode == 2
    assert "no contract at" in explorer.stderr and "Traceback" not in explorer.stderr


@pytest.mark.integration
def test_rpc_down_at_start_serves_an_error_page() -> None:
    rpc = f"http://127.0.0.1:{free_port()}"
    explorer = ExplorerProcess(["--rpc", rpc, "--contract", ESCROW, "--port", "0"]).start()
    try:
        status, text = _get(explorer.url + "/")
        assert status == 503 and "does not answer" in text and "Traceback" not in text
    finally:
        assert explorer.stop() == 0
    assert "keeps trying" in explorer.stderr
