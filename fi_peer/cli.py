"""The ``fi-peer`` command line. Thin: parses, configures logging, calls the library.

Errors the user can fix are printed as one clear line (exit 2 for bad input,
1 for runtime failures); tracebacks only with ``--debug``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fi_peer.errors import FiPeerError

app = typer.Typer(
    name="fi-peer",
    help=(
        "Federated Inference peer: privately owned models answer queries together, "
        "without sharing data or parameters.\n\n"
        "Quick start:  fi-peer demo   (10 peers in one process, non-IID digits)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

DEFAULT_HOME = Path(os.environ.get("FI_PEER_HOME", Path.home() / ".fi-peer"))


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    _setup_logging(verbose)


@app.command()
def init(
    state_dir: Annotated[
        Path, typer.Option(help="Where identity and config live ($FI_PEER_HOME).")
    ] = DEFAULT_HOME,
    name: Annotated[str, typer.Option(help="A label for this peer in logs.")] = "peer",
    net: Annotated[str, typer.Option(help="Network name; peers only meet inside one.")] = "local",
    model: Annotated[
        Path | None, typer.Option(help="Your model file (state_dict or TorchScript).")
    ] = None,
    price_wei: Annotated[int, typer.Option(min=0, help="Price per answered query, in wei.")] = 0,
    insecure_plaintext_keys: Annotated[
        bool, typer.Option(help="Store keys unencrypted (local demos only).")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Replace an existing identity (irreversible).")
    ] = False,
) -> None:
    """Create this owner's identity (encrypted keystore) and config in STATE_DIR.

    The passphrase is read from $FI_PEER_PASSPHRASE, or asked for twice on a terminal.

    Example:  fi-peer init --state-dir ./alice --model alice.pt --price-wei 1000
    """
    from fi_peer.config import PeerConfig, write_config
    from fi_peer.identity import Identity, save_keystore

    passphrase: str | None = None
    if not insecure_plaintext_keys:
        passphrase = os.environ.get("FI_PEER_PASSPHRASE")
        if passphrase is None:
            if not sys.stdin.isatty():
                _fail("no passphrase: set FI_PEER_PASSPHRASE or run on a terminal")
            passphrase = getpass.getpass("New keystore passphrase: ")
            if passphrase != getpass.getpass("Repeat passphrase: "):
                _fail("the passphrases differ")
        if len(passphrase) < 8:
            _fail("the passphrase must have at least 8 characters")
    if model is not None and not model.is_file():
        _fail(f"model file {model} does not exist")
    config_path = state_dir / "config.toml"
    if config_path.exists() and not force:
        _fail(f"{config_path} exists; use --force to replace this peer's identity")
    identity = Identity.generate()
    config = PeerConfig(
        name=name,
        net=net,
        keystore=Path("keystore.json"),
        model=model.resolve() if model is not None else None,
        price_wei=price_wei,
        encrypted=passphrase is not None,
    )
    try:
        save_keystore(state_dir / config.keystore, identity, passphrase, overwrite=force)
        write_config(config_path, config)
    except FiPeerError as exc:
        _fail(str(exc))
    out.print(f"peer id   {identity.peer_id}")
    out.print(f"keystore  {state_dir / config.keystore} (mode 0600)")
    out.print(f"config    {config_path}")


@app.command()
def demo(
    peers: Annotated[int, typer.Option(min=2, max=64, help="Number of peers.")] = 10,
    alpha: Annotated[
        float, typer.Option(min=0.001, help="Dirichlet alpha: small = very non-IID, 100 ~ IID.")
    ] = 0.1,
    queries: Annotated[int, typer.Option(min=1, max=100_000, help="Queries to send.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed for data split, training and traffic.")] = 1,
    k: Annotated[
        int | None, typer.Option(min=1, help="Committee size (default: every other peer).")
    ] = None,
    rule: Annotated[
        str, typer.Option(help="Aggregation rule: evidence, gated, support, entropy, soft, vote.")
    ] = "evidence",
    epochs: Annotated[int, typer.Option(min=1, max=1000, help="Training epochs per model.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run a whole FI network in one process and compare single, collective and pooled accuracy.

    Each peer trains its own model on a Dirichlet(alpha) non-IID slice of the digits
    data; queries go from random peers through the real protocol (signed envelopes,
    sealed inputs, offers, shares, receipts) over the in-memory transport.

    Example:  fi-peer demo --peers 10 --alpha 0.1 --queries 300 --seed 1
    """
    import torch

    from fi_peer.demo import DemoSettings, run_demo

    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core free
    settings = DemoSettings(
        peers=peers, alpha=alpha, queries=queries, seed=seed, k=k, rule=rule, epochs=epochs
    )
    if k is not None and k > peers - 1:
        _fail(f"--k must be at most peers - 1 = {peers - 1}")
    progress = Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=as_json,
        disable=as_json and not err.is_terminal,
    )
    tasks: dict[str, TaskID] = {}

    def on_progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total)
        progress.update(tasks[phase], completed=done)

    try:
        with progress:
            report = asyncio.run(run_demo(settings, on_progress))
    except (ValueError, FiPeerError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    _print_report(report)


def _print_report(report: object) -> None:
    from fi_peer.demo import DemoReport

    assert isinstance(report, DemoReport)
    s = report.settings
    table = Table(
        title=f"{s.peers} peers, Dirichlet alpha={s.alpha}, {s.queries} queries, rule={s.rule}",
    )
    table.add_column("model")
    table.add_column("train n", justify="right")
    table.add_column("acc. queries", justify="right")
    table.add_column("acc. test split", justify="right")
    best = max(range(len(report.peer_ids)), key=lambda i: report.peer_accuracy_on_queries[i])
    for i, pid in enumerate(report.peer_ids):
        style = "bold yellow" if i == best else None
        table.add_row(
            f"peer {i} {pid[:8]}" + (" (best)" if i == best else ""),
            str(report.train_sizes[i]),
            f"{100 * report.peer_accuracy_on_queries[i]:.1f}%",
            f"{100 * report.peer_accuracy[i]:.1f}%",
            style=style,
        )
    table.add_section()
    table.add_row(
        f"[bold green]collective (k={s.committee_size()})[/]",
        "-",
        f"[bold green]{100 * report.collective_accuracy:.1f}%[/]",
        "",
    )
    table.add_row(
        "pooled-data oracle",
        str(sum(report.train_sizes)),
        f"{100 * report.oracle_accuracy_on_queries:.1f}%",
        f"{100 * report.oracle_accuracy:.1f}%",
    )
    out.print(table)
    gain = 100 * (report.collective_accuracy - report.best_single_on_queries)
    failed = sum(report.failures.values())
    out.print(
        f"collective beats the best single peer by [bold]{gain:+.1f}[/] points; "
        f"{report.answered}/{s.queries} queries answered"
        + (f", {failed} failed: {report.failures}" if failed else "")
    )
    lat = report.latency_ms
    if lat:
        out.print(
            f"latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items())
        )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
