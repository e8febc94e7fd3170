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
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

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
    transport: Annotated[
        str, typer.Option(help="How peers talk: libp2p (peer to peer) or mqtt (via a broker).")
    ] = "libp2p",
    listen: Annotated[
        list[str] | None,
        typer.Option(help="libp2p listen multiaddr (repeatable); default /ip4/127.0.0.1/tcp/0."),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option(help="libp2p peer to join through, /ip4/../tcp/../p2p/.. (repeatable)."),
    ] = None,
    broker: Annotated[
        str, typer.Option(help="MQTT broker URL (transport mqtt).")
    ] = "mqtt://127.0.0.1:1883",
) -> None:
    """Create this owner's identity (encrypted keystore) and config in STATE_DIR.

    The passphrase is read from $FI_PEER_PASSPHRASE, or asked for twice on a terminal.
    Every setting can be changed later in STATE_DIR/config.toml (see `fi_peer/config.py`).

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
    try:
        config = PeerConfig(
            name=name,
            net=net,
            keystore=Path("keystore.json"),
            model=model.resolve() if model is not None else None,
            price_wei=price_wei,
            encrypted=passphrase is not None,
            transport=transport,
            listen=tuple(listen) if listen else ("/ip4/127.0.0.1/tcp/0",),
            bootstrap=tuple(bootstrap or ()),
            broker=broker,
        )
    except FiPeerError as exc:
        _fail(str(exc))
    try:
        save_keystore(state_dir / config.keystore, identity, passphrase, overwrite=force)
        write_config(config_path, config)
    except FiPeerError as exc:
        _fail(str(exc))
    out.print(f"peer id   {identity.peer_id}")
    out.print(f"keystore  {state_dir / config.keystore} (mode 0600)")
    out.print(f"config    {config_path}")


def _progress_bars(as_json: bool) -> tuple[Progress, Callable[[str, int, int], None]]:
    """One bar per phase on stderr; ``on_progress(phase, done, total)`` drives them."""
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
        progress.update(tasks[phase], completed=done, total=total)

    return progress, on_progress


@app.command()
def demo(
    ctx: typer.Context,
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
    epsilon: Annotated[
        float,
        typer.Option(
            min=0.0, help="Per-query DP epsilon (delta 1e-5); 0: no noise, answers still masked."
        ),
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    network: Annotated[
        bool,
        typer.Option(
            "--network",
            help="Instead: N `fi-peer run` daemons as processes, paying on a local anvil chain.",
        ),
    ] = False,
    transport: Annotated[
        str, typer.Option(help="--network: libp2p or mqtt (private broker).")
    ] = "libp2p",
    keep_running: Annotated[
        bool, typer.Option(help="--network: leave network and explorer up until Ctrl-C.")
    ] = False,
    state_dir: Annotated[
        Path | None, typer.Option(help="--network: state, logs (default: a new temp dir).")
    ] = None,
) -> None:
    """Run a whole FI network in one process and compare single, collective and pooled accuracy.

    Each peer trains its own model on a Dirichlet(alpha) non-IID slice of the digits
    data; queries go from random peers through the real protocol (signed envelopes,
    sealed inputs, offers, secure aggregation with DP noise, receipts) over the
    in-memory transport. Each owner keeps a privacy ledger of what it spent.

    With --network: anvil, the contracts, N `fi-peer run` daemons over
    libp2p (or MQTT) paying per share, the explorer; queries from several
    peers, batched settlement, a summary. Its defaults: 5 peers, 40 queries,
    alpha 0.3, 20 epochs (models cached), k 4.

    Example:  fi-peer demo --peers 10 --alpha 0.1 --queries 300 --seed 1
              fi-peer demo --network --keep-running
    """
    if network:
        _network_demo(
            peers=peers, alpha=alpha, queries=queries, seed=seed, k=k, epochs=epochs,
            transport=transport, keep_running=keep_running, state_dir=state_dir,
            as_json=as_json, explicit=_explicit_options(ctx),
        )  # fmt: skip
        return
    import torch

    from fi_peer.demo import DemoSettings, run_demo

    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core free
    settings = DemoSettings(
        peers=peers,
        alpha=alpha,
        queries=queries,
        seed=seed,
        k=k,
        rule=rule,
        epochs=epochs,
        epsilon=epsilon,
    )
    if k is not None and k > peers - 1:
        _fail(f"--k must be at most peers - 1 = {peers - 1}")
    progress, on_progress = _progress_bars(as_json)

    try:
        with progress:
            report = asyncio.run(run_demo(settings, on_progress))
    except (ValueError, FiPeerError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    _print_report(report)


def _explicit_options(ctx: typer.Context) -> set[str]:
    """Names of the options given on the command line (the network demo has other defaults)."""
    return {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    }


def _network_demo(
    *,
    peers: int,
    alpha: float,
    queries: int,
    seed: int,
    k: int | None,
    epochs: int,
    transport: str,
    keep_running: bool,
    state_dir: Path | None,
    as_json: bool,
    explicit: set[str],
) -> None:
    from fi_peer.netdemo import NetDemoSettings, run_network_demo

    if transport not in ("libp2p", "mqtt"):
        _fail("--transport must be libp2p or mqtt")
    base = NetDemoSettings()
    peers = peers if "peers" in explicit else base.peers
    settings = NetDemoSettings(
        peers=peers,
        queries=queries if "queries" in explicit else base.queries,
        alpha=alpha if "alpha" in explicit else base.alpha,
        seed=seed,
        epochs=epochs if "epochs" in explicit else base.epochs,
        k=k if k is not None else min(base.k, peers - 1),
        transport=transport,
        folder=state_dir,
    )
    if settings.peers > 19:
        _fail("--network: at most 19 peers")
    if settings.k > settings.peers - 1:
        _fail(f"--k must be at most peers - 1 = {settings.peers - 1}")
    err.print(
        f"network demo: {settings.peers} peers over {settings.transport}, "
        f"{settings.queries} queries, alpha {settings.alpha:g}, {settings.epochs} epochs, "
        f"k {settings.k}, price {settings.price_wei} wei/share"
    )
    progress, on_progress = _progress_bars(as_json)

    def on_report(report: dict[str, object]) -> None:
        progress.stop()
        if as_json:
            print(json.dumps(report, indent=2), flush=True)
        else:
            _print_network_report(report)
        if keep_running:
            err.print(
                f"network and explorer keep running (state in {report['folder']}); "
                "Ctrl-C stops everything"
            )

    try:
        with progress:
            run_network_demo(settings, on_progress, keep_running=keep_running, on_report=on_report)
    except KeyboardInterrupt:
        err.print("interrupted: every process the demo started was stopped")
        raise typer.Exit(130) from None
    except (ValueError, RuntimeError, FiPeerError) as exc:
        _fail(str(exc), 1)


def _print_network_report(report: dict[str, object]) -> None:

    r: dict[str, Any] = report
    q, acc, wei, gas = r["queries"], r["accuracy"], r["wei"], r["gas"]
    table = Table(title="Networked FI demo", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for single in acc["singles"]:
        table.add_row(f"accuracy {single['peer']} alone", f"{single['accuracy_on_queries']:.1%}")
    table.add_row("accuracy collective", f"[bold]{acc['collective']:.1%}[/]")
    table.add_row("queries sent / answered", f"{q['sent']} / {q['answered']}")
    table.add_row("queries paid", str(q["paid"]))
    for reason, count in q["failure_reasons"].items():
        table.add_row(f"failed: {reason}", str(count))
    table.add_row("queriers", ", ".join(q["queriers"]))
    for name in ("escrowed", "paid", "refunded", "held", "withdrawn"):
        table.add_row(f"wei {name}", f"{wei[name]:,}")
    table.add_row("gas used (deploy)", f"{gas['used']:,} ({gas['deploy']:,})")
    table.add_row("settled", "yes" if r["settled"] else f"NO: {r.get('settle_error')}")
    if r.get("settle_failed"):
        table.add_row("queries in failed batches", f"{r['settle_failed']} (held; see logs)")
    timings = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in r["timings"].items() if k != "total_s")
    table.add_row("time", f"{r['timings'].get('total_s', 0):.0f} s ({timings})")
    table.add_row("explorer", str(r["explorer_url"]))
    table.add_row("logs", str(r["folder"]))
    out.print(table)


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
    if s.epsilon > 0:
        spent = max(report.epsilon_spent, default=0.0)
        out.print(
            f"privacy: secure aggregation, DP epsilon {s.epsilon:g} per query (delta {s.delta:g}); "
            f"the most any owner spent over the run: epsilon {spent:.1f}"
        )
    else:
        out.print("privacy: secure aggregation, no DP noise (--epsilon 0)")
    lat = report.latency_ms
    if lat:
        out.print(
            f"latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items())
        )


@app.command()
def explorer(
    rpc: Annotated[str, typer.Option(help="The chain's JSON-RPC URL.")],
    contract: Annotated[str, typer.Option(help="QueryEscrow address.")],
    registry: Annotated[
        str | None, typer.Option(help="PeerRegistry address (peers' keys, stake).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free).")] = 8090,
    index: Annotated[
        Path | None, typer.Option(help="sqlite file for the event index (default: in memory).")
    ] = None,
) -> None:
    """Web page of the settlements on chain: queries, payouts, peers, blocks, transactions.

    It reads only the chain, so it works for any deployment of the contracts.

    Example:  fi-peer explorer --rpc http://127.0.0.1:8545 --contract 0x5FbDB...80aa3
    """
    from fi_peer.explorer import main as explorer_main

    argv = ["--rpc", rpc, "--contract", contract, "--host", host, "--port", str(port)]
    if registry:
        argv += ["--registry", registry]
    if index is not None:
        argv += ["--index", str(index)]
    if code := explorer_main(argv):
        raise typer.Exit(code)


@app.command()
def simulate(
    peers: Annotated[
        int, typer.Option(min=3, max=100_000, help="Number of simulated peers.")
    ] = 100,
    duration: Annotated[
        float, typer.Option(min=0.0, help="Virtual seconds of traffic (queries stop then).")
    ] = 20.0,
    warmup: Annotated[
        float, typer.Option(min=0.0, help="Virtual seconds before queries and churn.")
    ] = 5.0,
    seed: Annotated[int, typer.Option(help="Seed: a seed fixes every outcome.")] = 0,
    latency_ms: Annotated[
        tuple[int, int], typer.Option(help="Per-hop latency, uniform in [low, high] ms.")
    ] = (20, 80),
    loss: Annotated[float, typer.Option(min=0.0, max=0.99, help="Per-hop loss probability.")] = 0.0,
    churn: Annotated[
        float, typer.Option(min=0.0, help="Departures (each replaced) per virtual second.")
    ] = 0.0,
    query_rate: Annotated[
        float, typer.Option(min=0.0, help="Queries per virtual second, network-wide.")
    ] = 2.0,
    k: Annotated[int, typer.Option(min=2, help="Committee size (capped at peers - 1).")] = 8,
    degree: Annotated[int, typer.Option(min=2, help="Gossip mesh degree D.")] = 6,
    announce_interval_ms: Annotated[int, typer.Option(min=1, help="Heartbeat interval.")] = 2000,
    missed_beats: Annotated[
        int, typer.Option(min=1, help="Missed heartbeats before a peer expires.")
    ] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Simulate N peers in one process, in virtual time (latency, loss, churn).

    Every peer runs the real protocol core (signed envelopes, secure aggregation);
    the network is a seeded discrete-event model with a GossipSub-like mesh.

    Example:  fi-peer simulate --peers 1000 --announce-interval-ms 10000 --duration 30
    """
    from fi_peer.simulate import SimConfig, format_report
    from fi_peer.simulate import simulate as run_simulation

    try:
        config = SimConfig(
            n=peers,
            seed=seed,
            duration_s=duration,
            warmup_s=warmup,
            latency_ms=latency_ms,
            loss=loss,
            churn_per_s=churn,
            query_rate=query_rate,
            k=k,
            degree=degree,
            announce_interval_ms=announce_interval_ms,
            missed_beats=missed_beats,
        )
    except ValueError as exc:
        _fail(str(exc))
    report = run_simulation(config)
    print(json.dumps(report.to_json(), indent=2) if as_json else format_report(report))


# -- the daemon and its control API -------------------------------------------------------


def _config_path(config: Path | None, state_dir: Path | None) -> Path:
    if config is not None:
        return config
    return (state_dir or DEFAULT_HOME) / "config.toml"


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="The peer's config.toml (default: STATE_DIR/config.toml)."),
]
StateDirOption = Annotated[
    Path | None, typer.Option(help="The peer's state dir ($FI_PEER_HOME, default ~/.fi-peer).")
]


def _quiet_libraries(verbose: bool) -> None:
    logging.getLogger("fi_peer").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("network").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # py-libp2p logs expected events (a peer went away mid-stream) at ERROR with
        # multi-line dumps; our transport reports what matters in one line.
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
        for name in ("amqtt", "transitions", "mqtt", "aiomqtt", "multiaddr"):
            logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
def run(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run this owner's peer until Ctrl-C / SIGTERM: join the network, answer queries,
    serve the local control API (for `fi-peer query`, `peers`, `status`).

    An encrypted keystore needs $FI_PEER_PASSPHRASE (or a terminal prompt).

    Example:  FI_PEER_PASSPHRASE=... fi-peer run --config ./alice/config.toml
    """
    from fi_peer.config import load_config
    from fi_peer.daemon import configure_process, serve

    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    _quiet_libraries(verbose)
    try:
        cfg = load_config(_config_path(config, state_dir))
    except FiPeerError as exc:
        _fail(str(exc))
    passphrase = os.environ.get("FI_PEER_PASSPHRASE")
    if cfg.encrypted and passphrase is None and sys.stdin.isatty():
        passphrase = getpass.getpass("Keystore passphrase: ")
    configure_process()
    try:
        asyncio.run(serve(cfg, passphrase))
    except FiPeerError as exc:
        from fi_peer.daemon import DaemonError

        _fail(str(exc), 1 if isinstance(exc, DaemonError) else 2)


def _client(config: Path | None, state_dir: Path | None) -> object:
    from fi_peer.config import load_config
    from fi_peer.control import ControlClient

    try:
        cfg = load_config(_config_path(config, state_dir))
        return ControlClient.from_state_dir(cfg.control_file)
    except FiPeerError as exc:
        _fail(str(exc), 1)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".webp")


def digit_image_to_input(path: Path) -> list[float]:
    """An image of a handwritten digit -> the 64 features of the digits task.

    Like scikit-learn's digits: grayscale, ink bright on dark, 8x8, values in
    [0, 1] (the data set's 0..16 scaled by 1/16). A dark-on-light image (the
    usual scan or drawing) is inverted first, judged by its mean brightness.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    if gray.mean() > 127.5:
        gray = 255.0 - gray
    top = gray.max()
    scaled = gray / top if top > 0 else gray
    return [round(float(v), 4) for v in scaled.ravel()]


def _load_input(path: Path) -> object:
    """A .npy, .json or image file -> a nested list of numbers."""
    import numpy as np

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False).tolist()
        if suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            return doc.get("input") if isinstance(doc, dict) else doc
        if suffix in IMAGE_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(path)
            return digit_image_to_input(path)
    except FileNotFoundError:
        _fail(f"no input file {path}")
    except (OSError, ValueError) as exc:
        _fail(f"cannot read {path}: {exc}")
    _fail(f"input must be a .npy, .json or image file, got {path.name!r}")


@app.command()
def query(
    input_file: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT",
            help="A .npy or .json array (one input or rows), or an image of a digit.",
        ),
    ],
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    rule: Annotated[str | None, typer.Option(help="Aggregation rule (default: config).")] = None,
    k: Annotated[int | None, typer.Option(min=1, max=64, help="Committee size.")] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, max=110, help="Deadline in seconds.")
    ] = None,
    max_price_wei: Annotated[
        int | None, typer.Option(min=0, help="Most to pay one member, in wei.")
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Differential privacy per query (0: no noise; default: config)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Ask the network through your running daemon; prints the collective answer,
    the contributing peers and timings. Exit 1 if a query failed.

    Example:  fi-peer query digit.npy --state-dir ./alice --k 4
    """
    from fi_peer.control import ControlClient

    client = _client(config, state_dir)
    assert isinstance(client, ControlClient)
    body: dict[str, object] = {"input": _load_input(input_file)}
    for key, value in (
        ("rule", rule),
        ("k", k),
        ("timeout_s", timeout),
        ("max_price_wei", max_price_wei),
        ("epsilon", epsilon),
    ):
        if value is not None:
            body[key] = value
    try:
        answer = client.post("/v1/query", body, timeout=(timeout or 110.0) + 10.0)
    except FiPeerError as exc:
        _fail(str(exc), 1)
    results = answer.get("results", [])
    if as_json:
        print(json.dumps(answer, indent=2))
    else:
        _print_answer(answer)
    if not results or not all(r.get("ok") for r in results):
        raise typer.Exit(1)


def _print_answer(answer: dict[str, object]) -> None:
    results = answer.get("results")
    assert isinstance(results, list)
    for i, r in enumerate(results):
        prefix = f"[{i}] " if len(results) > 1 else ""
        if r.get("ok"):
            dist = r.get("distribution") or []
            label = r.get("label")
            p = dist[label] if isinstance(label, int) and label < len(dist) else float("nan")
            contributors = r.get("contributors", [])
            out.print(
                f"{prefix}answer [bold green]{label}[/] (p={p:.2f}), rule {answer.get('rule')}, "
                f"{len(contributors)} of {r.get('committee_size')} committee members + this peer"
            )
            out.print(f"{prefix}contributors " + " ".join(c[:12] for c in contributors))
        else:
            out.print(f"{prefix}[bold red]failed[/]: {r.get('reason')}")
        out.print(
            f"{prefix}timings  protocol {r.get('elapsed_ms')} ms, "
            f"at the daemon {float(r.get('wall_ms', 0.0)):.0f} ms"
        )
    secagg = "secure aggregation" if answer.get("secure_aggregation") else "plaintext shares"
    out.print(f"privacy  epsilon {answer.get('epsilon')} per query, {secagg}")
    timings = answer.get("timings")
    if isinstance(timings, dict) and len(results) > 1:
        out.print(f"total {float(timings.get('total_ms', 0.0)):.0f} ms for {len(results)} inputs")


def _daemon_get(
    config: Path | None, state_dir: Path | None, path: str, as_json: bool
) -> dict[str, Any] | None:
    """GET ``path`` from the local daemon; with ``as_json`` print it and return None."""
    from fi_peer.control import ControlClient

    client = _client(config, state_dir)
    assert isinstance(client, ControlClient)
    try:
        doc: dict[str, Any] = client.get(path)
    except FiPeerError as exc:
        _fail(str(exc), 1)
    if as_json:
        print(json.dumps(doc, indent=2))
        return None
    return doc


@app.command()
def peers(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the peers your running daemon knows (from their announcements)."""
    doc = _daemon_get(config, state_dir, "/v1/peers", as_json)
    if doc is None:
        return
    rows = doc.get("peers", [])
    table = Table(title=f"{len(rows)} peers known to {str(doc.get('peer_id', ''))[:12]}")
    for column in ("peer", "connected", "last seen", "price (wei)", "model", "address"):
        table.add_column(column)
    for row in rows:
        addresses = row.get("addresses") or ["-"]
        table.add_row(
            row["peer_id"][:12],
            "yes" if row.get("connected") else "no",
            f"{row.get('last_seen_ms', 0) / 1000:.1f} s ago",
            str(row.get("price_wei")),
            f"{row.get('task')}/{row.get('arch')}",
            addresses[0],
        )
    out.print(table)


@app.command()
def status(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what your running daemon is doing."""
    doc = _daemon_get(config, state_dir, "/v1/status", as_json)
    if doc is None:
        return
    t = doc.get("transport", {})
    m = doc.get("model", {})
    q = doc.get("queries", {})
    out.print(f"peer      {doc.get('name')} {doc.get('peer_id')} (pid {doc.get('pid')})")
    out.print(f"net       {doc.get('net')} over {t.get('kind')}, up {doc.get('uptime_s', 0):.0f} s")
    for address in t.get("addresses", []):
        out.print(f"address   {address}")
    out.print(f"peers     {doc.get('membership')} known, {t.get('connected')} connected")
    out.print(f"model     {m.get('task')}/{m.get('arch')} {str(m.get('sha256', ''))[:16]}")
    out.print(
        f"queries   {q.get('ok', 0)} asked ok, {q.get('failed', 0)} failed; "
        f"{doc.get('answered', 0)} answered for others"
    )
    p = doc.get("privacy", {})
    if p:
        spent = p.get("global_epsilon_spent")
        out.print(
            f"privacy   epsilon {p.get('epsilon_per_query')} per query asked; budget "
            f"{p.get('per_querier_epsilon')} per querier, {p.get('global_epsilon')} in all"
            + (f", {spent:.2f} spent this epoch" if isinstance(spent, float) else "")
        )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
