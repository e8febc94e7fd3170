"""The ``fi-peer`` command line. Thin: parses, configures logging, calls the library.

Errors the user can fix are printed as one clear line (exit 2 for bad input,
1 for runtime failures); tracebacks only with ``--debug``.
"""

from __future__ import annotations

import asyncio
import enum
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
from rich.markup import escape
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
        "Quick start:  fi-peer demo   (a local network of daemons paying on anvil)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

DEFAULT_HOME = Path(os.environ.get("FI_PEER_HOME", Path.home() / ".fi-peer"))


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _setup_logging(verbose: bool, fmt: str | None = None, level: int | None = None) -> None:
    from fi_peer.logging_setup import configure, default_format

    if level is None:
        level = logging.DEBUG if verbose else logging.WARNING
    configure(level, fmt or default_format())


class LogFormat(enum.StrEnum):
    text = "text"
    json = "json"


LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        help="Logs on stderr as text (default) or json (one object per line); "
        "$FI_PEER_LOG_FORMAT sets the default.",
    ),
]


@app.callback(epilog="Start here:  fi-peer init   then   fi-peer run   (each has --help)")
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    log_format: LogFormatOption = None,
) -> None:
    _setup_logging(verbose, log_format.value if log_format else None)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  fi-peer init --state-dir ./alice      (on a terminal: asks for everything)\n\n"
        "  FI_PEER_PASSPHRASE=... fi-peer init --state-dir ./alice --model alice.pt "
        "--price-wei 1000 --listen /ip4/0.0.0.0/tcp/4001 --non-interactive\n\n"
        "  fi-peer init --state-dir ./bob --model bob.pt --bootstrap "
        "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW... --chain-rpc https://rpc.example.org "
        "--deployment deployment.json"
    )
)
def init(
    ctx: typer.Context,
    state_dir: Annotated[
        Path, typer.Option(help="Where identity and config live ($FI_PEER_HOME).")
    ] = DEFAULT_HOME,
    name: Annotated[str, typer.Option(help="A label for this peer in logs.")] = "peer",
    net: Annotated[str, typer.Option(help="Network name; peers only meet inside one.")] = "local",
    model: Annotated[
        Path | None,
        typer.Option(help="Your model file (state_dict or TorchScript); it must load."),
    ] = None,
    price_wei: Annotated[
        int, typer.Option(min=0, help="Price per answered query, in wei.")
    ] = 0,
    max_price_wei: Annotated[
        int | None, typer.Option(min=0, help="The most you pay one member per query, in wei.")
    ] = None,
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
    announce: Annotated[
        list[str] | None,
        typer.Option(help="Address others dial, e.g. a public IP behind NAT (repeatable)."),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option(help="libp2p peer to join through, /ip4/../tcp/../p2p/.. (repeatable)."),
    ] = None,
    broker: Annotated[
        str, typer.Option(help="MQTT broker URL (transport mqtt).")
    ] = "mqtt://127.0.0.1:1883",
    chain_rpc: Annotated[
        str | None, typer.Option(help="EVM JSON-RPC URL: queries are paid on that chain.")
    ] = None,
    deployment: Annotated[
        Path | None, typer.Option(help="The contracts' deployment.json (`fi-peer deploy`).")
    ] = None,
    eth_key_file: Annotated[
        Path | None,
        typer.Option(help="Ethereum key file: hex, mode 0600 (default: new STATE_DIR/eth.key)."),
    ] = None,
    non_interactive: Annotated[
        bool,
        typer.Option(
            "--non-interactive",
            "--yes",
            "-y",
            help="Ask nothing, even on a terminal: flags and defaults only.",
        ),
    ] = False,
) -> None:
    """Create this owner's identity (encrypted keystore) and config in STATE_DIR.

    On a terminal it walks you through name, passphrase (asked twice, hidden), model
    (loaded to check it), transport and bootstrap peers, an optional chain RPC, and
    price; whatever is given as a flag is not asked. Without a terminal (CI, scripts)
    it never asks: the passphrase comes from $FI_PEER_PASSPHRASE. Every setting can
    be changed later in STATE_DIR/config.toml (see `fi_peer/config.py`).
    """
    from dataclasses import replace

    from fi_peer import wizard
    from fi_peer.config import ChainConfig, PeerConfig, write_config
    from fi_peer.errors import ConfigError
    from fi_peer.identity import Identity, save_keystore

    given = _given_options(ctx)
    interactive = not non_interactive and _stdin_is_tty()
    config_path = state_dir / "config.toml"
    if config_path.exists() and not force:
        _fail(f"{config_path} exists; use --force to replace this peer's identity")

    def ask(key: str, question: str, default: Any, check: Callable[[str], Any]) -> Any:
        """The flag's value if given (or without a terminal), else ask until ``check`` passes."""
        if key in given or not interactive:
            return check("") if default == "" else default  # "": the check's "none"
        while True:
            shown = "" if default is None else str(default)
            answer = typer.prompt(question, default=shown, show_default=bool(shown), type=str)
            try:
                return check(str(answer))
            except wizard.InitError as exc:
                err.print(f"[red]{escape(str(exc))}[/]")

    def model_answer(answer: str) -> Path | None:
        if not answer.strip():
            return None
        path = Path(answer.strip()).expanduser()
        out.print(f"  {wizard.check_model(path)}")
        return path

    def addresses(peer_id: bool) -> Callable[[str], list[str]]:
        return lambda a: [wizard.check_multiaddr(x, peer_id=peer_id) for x in a.split()]

    try:
        if interactive:
            out.print(
                f"[bold]Setting up a fi-peer in {state_dir}[/] (Enter keeps the \\[default]; "
                "Ctrl-C stops, nothing is written before the end)"
            )
        suggested = name
        if interactive and "name" not in given:
            suggested = state_dir.resolve().name.lstrip(".") or name
        name = ask("name", "Peer name (in logs)", suggested, str.strip)
        net = ask("net", "Network name (peers meet only inside one)", net, str.strip)
        passphrase = _init_passphrase(insecure_plaintext_keys, interactive)
        if model is not None:
            described = wizard.check_model(model)
            if interactive:
                out.print(f"  {described}")
        else:
            model = ask("model", "Model file (empty: add [model] path later)", "", model_answer)
        transport = _transport_answer(
            ask("transport", "Transport: libp2p (peer to peer) or mqtt (via a broker)",
                transport, _transport_answer)
        )  # fmt: skip
        listen_list = addresses(False)(" ".join(listen or ()))
        announce_list = addresses(False)(" ".join(announce or ()))
        bootstrap_list = addresses(True)(" ".join(bootstrap or ()))
        if transport == "libp2p" and interactive:
            if "listen" not in given:
                listen_list = ask("listen", "Listen on (0.0.0.0: every interface)",
                                  "/ip4/0.0.0.0/tcp/4001", addresses(False))  # fmt: skip
            if "announce" not in given:
                announce_list = ask("announce", "Address others dial, e.g. your public IP "
                                    "(empty: the listening ones)", "", addresses(False))
            if "bootstrap" not in given:
                bootstrap_list = ask("bootstrap", "Bootstrap peers /ip4/../tcp/../p2p/.., "
                                     "space-separated (empty: you are the first)", "",
                                     addresses(True))  # fmt: skip
        if transport == "mqtt":
            broker = wizard.check_broker(ask("broker", "MQTT broker", broker, wizard.check_broker))
        chain = _init_chain(ask, state_dir, chain_rpc, deployment, eth_key_file, interactive, given)
        price = ask("price_wei", "Price per answered query, wei (or '0.001 eth', '5 gwei')",
                    wizard.DEFAULT_PRICE_WEI if interactive and chain else price_wei,
                    wizard.parse_wei)  # fmt: skip
        if max_price_wei is None:
            max_price_wei = ask("max_price_wei", "The most you pay one member per query, wei",
                                price, wizard.parse_wei) if interactive else 0  # fmt: skip
        config = PeerConfig(
            name=name,
            net=net,
            keystore=Path("keystore.json"),
            model=model.resolve() if model is not None else None,
            price_wei=int(price),
            max_price_wei=int(max_price_wei or 0),
            encrypted=passphrase is not None,
            transport=transport,
            listen=tuple(listen_list) or ("/ip4/127.0.0.1/tcp/0",),
            announce=tuple(announce_list),
            bootstrap=tuple(bootstrap_list),
            broker=broker,
            chain=None
            if chain is None
            else ChainConfig(
                rpc_url=chain.rpc_url,
                deployment=chain.deployment.resolve(),
                eth_key_file=_relative_to(chain.eth_key_file, state_dir),
            ),
        )
        if chain is not None and chain.created_key:
            chain = replace(chain, address=wizard.new_eth_key(chain.eth_key_file))
    except (wizard.InitError, ConfigError) as exc:
        _fail(str(exc))
    identity = Identity.generate()
    try:
        save_keystore(state_dir / config.keystore, identity, passphrase, overwrite=force)
        write_config(config_path, config)
    except FiPeerError as exc:
        _fail(str(exc))
    _say(f"peer id   {identity.peer_id}")
    _say(f"keystore  {state_dir / config.keystore} (mode 0600)")
    _say(f"config    {config_path}")
    if config.transport == "libp2p":
        for line in _bootstrap_hint(identity.peer_id, config.announce or config.listen):
            _say(line)
    if chain is not None:
        made = " (new key, mode 0600)" if chain.created_key else ""
        _say(f"eth key   {chain.eth_key_file}{made}")
        _say(f"account   {chain.address}: fund it with ETH for gas (and, to query, escrows)")
    if config.model is None:
        _say("next      add \\[model] path = ... to the config, then `fi-peer run`")
    else:
        _say(f"next      fi-peer run --state-dir {state_dir}")


def _say(text: str) -> None:
    """One line that is never wrapped (addresses and ids are copied from it)."""
    out.print(text, soft_wrap=True, highlight=False)


def _bootstrap_hint(peer_id: str, addresses: tuple[str, ...]) -> list[str]:
    """The libp2p id, and the address other owners give as --bootstrap to join through us."""
    try:
        from network.libp2p import to_libp2p_id

        libp2p_id = to_libp2p_id(peer_id).to_base58()
    except Exception:  # the id is printed in the daemon's log anyway
        return []
    lines = [f"libp2p id {libp2p_id}"]
    for address in addresses:
        parts = address.split("/")
        if len(parts) >= 5 and parts[3] == "tcp" and parts[4] != "0":
            host = "<this host's IP>" if parts[2] in ("0.0.0.0", "::") else parts[2]
            lines.append(f"bootstrap /{parts[1]}/{host}/tcp/{parts[4]}/p2p/{libp2p_id}")
            break
    return lines


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def _given_options(ctx: typer.Context) -> set[str]:
    """Names of the options given on the command line (or by environment), not defaulted."""
    return {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    }


def _transport_answer(answer: str) -> str:
    from fi_peer.wizard import InitError

    value = answer.strip().lower()
    if value not in ("libp2p", "mqtt"):
        raise InitError(f"transport must be libp2p or mqtt, got {answer!r}")
    return value


def _relative_to(path: Path, folder: Path) -> Path:
    """``path`` relative to ``folder`` when inside it (the state dir can move), else absolute."""
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return path.resolve()


def _init_passphrase(insecure: bool, interactive: bool) -> str | None:
    if insecure:
        return None
    passphrase = os.environ.get("FI_PEER_PASSPHRASE")
    while passphrase is None:
        if not interactive:
            _fail(
                "no passphrase: set FI_PEER_PASSPHRASE, or run on a terminal "
                "(--insecure-plaintext-keys for throwaway demo keys)"
            )
        typed = str(
            typer.prompt(
                "Keystore passphrase (8+ characters, hidden)",
                hide_input=True,
                confirmation_prompt="Repeat the passphrase",
            )
        )
        if len(typed) >= 8:
            return typed
        err.print("[red]the passphrase must have at least 8 characters[/]")
    if len(passphrase) < 8:
        _fail("the passphrase must have at least 8 characters")
    return passphrase


def _init_chain(
    ask: Callable[[str, str, Any, Callable[[str], Any]], Any],
    state_dir: Path,
    rpc: str | None,
    deployment: Path | None,
    key_file: Path | None,
    interactive: bool,
    given: set[str],
) -> Any:
    """The ``[chain]`` answers, each one checked (None: queries are not paid)."""
    from fi_peer import wizard

    if rpc is None:
        rpc = ask("chain_rpc", "Chain JSON-RPC URL to be paid on (empty: queries are free)", "",
                  lambda a: wizard.check_rpc_url(a) if a.strip() else "")  # fmt: skip
    if not rpc:
        if deployment is not None or key_file is not None:
            raise wizard.InitError("--deployment and --eth-key-file need --chain-rpc")
        return None
    rpc = wizard.check_rpc_url(rpc)

    def deployment_answer(answer: str) -> Path:
        path = Path(answer.strip()).expanduser()
        wizard.check_deployment(path)
        return path

    if deployment is None:
        if not interactive:
            raise wizard.InitError("--chain-rpc needs --deployment (written by `fi-peer deploy`)")
        deployment = ask("deployment", "Deployment file (written by `fi-peer deploy`)",
                         "deployment.json", deployment_answer)  # fmt: skip
    assert deployment is not None
    chain_id, escrow = wizard.check_deployment(deployment)
    try:
        node_chain: int | None = wizard.rpc_chain_id(rpc)
    except wizard.InitError as exc:
        err.print(f"[yellow]warning:[/] {escape(str(exc))}; the daemon checks again at start")
        node_chain = None
    if node_chain is not None and node_chain != chain_id:
        raise wizard.InitError(
            f"{rpc} is chain {node_chain} but {deployment} is on chain {chain_id}: deploy "
            "there first (`fi-peer deploy`), or give that chain's RPC"
        )
    if key_file is None:
        key_file = ask("eth_key_file", "Ethereum key file: hex, mode 0600 (empty: create one)",
                       "", lambda a: Path(a.strip()).expanduser() if a.strip() else None)
    if key_file is None:
        key_file = state_dir / "eth.key"
        if key_file.exists():
            raise wizard.InitError(f"{key_file} exists: pass it with --eth-key-file")
        address, created = "", True
    else:
        address, created = wizard.read_eth_key(key_file), False
    _say(f"chain     {chain_id} via {rpc}, escrow {escrow}")
    return wizard.ChainAnswers(rpc, deployment, key_file, address, created)


def _progress_bars(as_json: bool) -> tuple[Progress, Callable[..., None]]:
    """One bar per phase on stderr; ``on_progress(phase, done, total[, info])`` drives
    them (``info``: what the phase is doing, shown after the bar)."""
    progress = Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[info]}"),
        console=err,
        transient=as_json,
        disable=as_json and not err.is_terminal,
    )
    tasks: dict[str, TaskID] = {}

    def on_progress(phase: str, done: int, total: int, info: str = "") -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total, info=info)
        progress.update(tasks[phase], completed=done, total=total, info=info)

    return progress, on_progress


@app.command()
def demo(
    peers: Annotated[
        int | None, typer.Option(min=2, max=64, help="Number of peers (default 5; in-process 10).")
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Dirichlet alpha: small = very non-IID, 100 ~ IID (default 0.3; in-process 0.1).",
        ),
    ] = None,
    queries: Annotated[
        int | None,
        typer.Option(min=1, max=100_000, help="Queries to send (default 40; in-process 300)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for data split, training and traffic.")] = 1,
    k: Annotated[
        int | None,
        typer.Option(min=1, help="Committee size (default 4; in-process every other peer)."),
    ] = None,
    rule: Annotated[
        str, typer.Option(help="Aggregation rule: evidence, gated, support, entropy, soft, vote.")
    ] = "evidence",
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1, max=1000, help="Training epochs per model (default 20; in-process 50)."
        ),
    ] = None,
    epsilon: Annotated[
        float,
        typer.Option(
            min=0.0, help="Per-query DP epsilon (delta 1e-5); 0: no noise, answers still masked."
        ),
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="Instead: every peer in this one process over the in-memory transport, "
            "no chain, no payments (10 peers, 300 queries, ~12 s).",
        ),
    ] = False,
    network: Annotated[
        bool, typer.Option("--network", hidden=True, help="The default (kept for old scripts).")
    ] = False,
    transport: Annotated[str, typer.Option(help="libp2p, or mqtt (a private broker).")] = "libp2p",
    keep_running: Annotated[
        bool, typer.Option(help="Leave the network and the explorer up until Ctrl-C.")
    ] = False,
    state_dir: Annotated[
        Path | None, typer.Option(help="State dirs, logs, demo.json (default: a new temp dir).")
    ] = None,
) -> None:
    """Bring up a local FI network that answers and settles queries, then summarise it.

    Trains (or loads cached) one model per owner on a Dirichlet(alpha) non-IID
    slice of the digits data; starts anvil, deploys the escrow and the peer
    registry, registers every peer's keys with a stake, starts N `fi-peer run`
    daemons as separate processes over libp2p (each pays per share on chain),
    and the explorer; sends queries from several peers through the real protocol
    (signed envelopes, sealed inputs, offers, secure aggregation with DP noise,
    receipts), settles them in batches and prints accuracy (each owner alone vs
    collective), queries paid, wei moved, gas and the explorer's URL. Ctrl-C
    stops every process it started; so does killing it.

    With --in-process: all peers in this process over the in-memory transport,
    no chain; it also prints the pooled-data oracle.

    Example:  fi-peer demo
              fi-peer demo --peers 6 --queries 60 --keep-running
              fi-peer demo --in-process --peers 10 --alpha 0.1 --queries 300 --seed 1
    """
    from fi_peer.models.aggregation import get_rule

    try:
        get_rule(rule)  # an unknown rule is refused before any work
    except ValueError as exc:
        _fail(str(exc))
    if in_process and network:
        _fail("--in-process and --network exclude each other (the network is the default)")
    if not in_process:
        _network_demo(
            peers=peers, alpha=alpha, queries=queries, seed=seed, k=k, epochs=epochs,
            rule=rule, epsilon=epsilon, transport=transport, keep_running=keep_running,
            state_dir=state_dir, as_json=as_json,
        )  # fmt: skip
        return
    import torch

    from fi_peer.demo import DemoSettings, run_demo

    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core free
    base = DemoSettings()
    settings = DemoSettings(
        peers=peers or base.peers,
        alpha=alpha or base.alpha,
        queries=queries or base.queries,
        seed=seed,
        k=k,
        rule=rule,
        epochs=epochs or base.epochs,
        epsilon=epsilon,
    )
    if k is not None and k > settings.peers - 1:
        _fail(f"--k must be at most peers - 1 = {settings.peers - 1}")
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


def _network_demo(
    *,
    peers: int | None,
    alpha: float | None,
    queries: int | None,
    seed: int,
    k: int | None,
    epochs: int | None,
    rule: str,
    epsilon: float,
    transport: str,
    keep_running: bool,
    state_dir: Path | None,
    as_json: bool,
) -> None:
    from fi_peer.netdemo import NetDemoSettings, run_network_demo

    if transport not in ("libp2p", "mqtt"):
        _fail("--transport must be libp2p or mqtt")
    base = NetDemoSettings()
    peers = peers or base.peers
    if peers > 19:
        _fail("at most 19 peers (one anvil account each); --in-process takes up to 64")
    if k is not None and k > peers - 1:
        _fail(f"--k must be at most peers - 1 = {peers - 1}")
    settings = NetDemoSettings(
        peers=peers,
        queries=queries or base.queries,
        alpha=alpha or base.alpha,
        seed=seed,
        epochs=epochs or base.epochs,
        k=k if k is not None else min(base.k, peers - 1),
        rule=rule,
        epsilon=epsilon,
        transport=transport,
        folder=state_dir,
    )
    err.print(
        f"FI network demo: {settings.peers} peers over {settings.transport}, "
        f"{settings.queries} queries, alpha {settings.alpha:g}, {settings.epochs} epochs, "
        f"k {settings.k}, rule {settings.rule}, epsilon {settings.epsilon:g}, "
        f"price {settings.price_wei} wei/share"
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
    s = r["settings"]
    table = Table(
        title=f"FI network demo: {len(acc['singles'])} daemons over {s['transport']}, "
        f"alpha {s['alpha']:g}, k {s['k']}, rule {s['rule']}",
        show_header=False,
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    for single in acc["singles"]:
        table.add_row(f"accuracy {single['peer']} alone", f"{single['accuracy_on_queries']:.1%}")
    table.add_row("accuracy collective", f"[bold green]{acc['collective']:.1%}[/]")
    gain = acc["collective"] - acc["best_single_on_queries"]
    table.add_row("collective vs best single", f"{gain * 100:+.1f} points")
    registered = r.get("registered") or {}
    if registered.get("peers"):
        table.add_row(
            "peers registered (stake)",
            f"{len(registered['peers'])} ({registered['stake_wei']:,} wei each)",
        )
    table.add_row("queries sent / answered", f"{q['sent']} / {q['answered']}")
    table.add_row("queries paid", str(q["paid"]))
    for reason, count in q["failure_reasons"].items():
        table.add_row(f"failed: {reason}", str(count))
    table.add_row("queriers", ", ".join(q["queriers"]))
    for name in ("escrowed", "paid", "refunded", "held", "withdrawn"):
        table.add_row(f"wei {name}", f"{wei[name]:,}")
    table.add_row(
        "gas used",
        f"{gas['used']:,} (deploy {gas['deploy']:,}, register {gas.get('register', 0):,}, "
        f"queries {gas.get('queries', 0):,})",
    )
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
    log_format: LogFormatOption = None,
) -> None:
    """Run this owner's peer daemon until Ctrl-C / SIGTERM.

    It joins the network, answers queries and serves the local control API (for
    `fi-peer query`, `peers`, `status`, `metrics`, and Prometheus at GET /metrics).

    An encrypted keystore needs $FI_PEER_PASSPHRASE (or a terminal prompt).

    Example:  FI_PEER_PASSPHRASE=... fi-peer run --config ./alice/config.toml

    JSON logs:  fi-peer run --state-dir ./alice --log-format json
    """
    from fi_peer.config import load_config
    from fi_peer.daemon import configure_process, serve

    if log_format is not None:
        _setup_logging(verbose, log_format.value, logging.DEBUG if verbose else logging.INFO)
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
    input_private: Annotated[
        bool,
        typer.Option(
            "--input-private",
            help="Encrypt the input under your own CKKS key: members compute on the "
            "ciphertext, you decrypt only their sum (HE mode; rule evidence, the "
            "polynomial-kernel evidence with DP as configured, or --rule support: no DP; "
            "with --rule support, 5 or more rows go as ONE batched query, up to 4,096).",
        ),
    ] = False,
    audit_label: Annotated[
        list[int] | None,
        typer.Option(
            "--audit-label",
            min=0,
            metavar="LABEL",
            help="The label you know for the input (once per input row, in order): an "
            "audit query. It looks like any other query on the wire; after the answer the "
            "members open their commitments and your daemon scores them (fi-peer status).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Ask the network through your running daemon and print the collective answer.

    Prints the answer, the contributing peers and timings; exit 1 if a query failed.

    Example:  fi-peer query digit.npy --state-dir ./alice --k 4

    Example:  fi-peer query my-drawing.png --epsilon 1 --json

    Example:  fi-peer query seven.npy --audit-label 7   (an audit query)
    """
    from fi_peer.control import ControlClient

    client = _client(config, state_dir)
    assert isinstance(client, ControlClient)
    body: dict[str, object] = {"input": _load_input(input_file)}
    if input_private:
        body["input_private"] = True
    if audit_label:
        body["audit_labels"] = list(audit_label)
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
            audit = r.get("audit")
            if isinstance(audit, dict):
                refused = ", ".join(
                    f"{str(m)[:12]} ({why})" for m, why in dict(audit.get("refused", {})).items()
                )
                out.print(
                    f"{prefix}audit    label {audit.get('label')}: {audit.get('opened')} of "
                    f"{audit.get('committed')} members opened their commitments"
                    + (f"; refused: {refused}" if refused else "")
                )
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


@app.command(epilog="Examples:\n\n  fi-peer peers --state-dir ./alice\n\n  fi-peer peers --json")
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
    out.print(_peers_table(rows, f"{len(rows)} peers known to {str(doc.get('peer_id', ''))[:12]}"))


def _peers_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("peer", "connected", "last seen", "price (wei)", "model", "address"):
        table.add_column(column)
    for row in rows:
        addresses = row.get("addresses") or ["-"]
        table.add_row(
            str(row.get("peer_id", ""))[:12],
            "yes" if row.get("connected") else "no",
            f"{row.get('last_seen_ms', 0) / 1000:.1f} s ago",
            str(row.get("price_wei")),
            f"{row.get('task')}/{row.get('arch')}",
            escape(str(addresses[0])),
        )
    return table


def _wei(value: object) -> str:
    """``1000000000000000 wei (0.001 ETH)``; '?' when unknown."""
    if not isinstance(value, int):
        return "?"
    if value == 0:
        return "0"
    return f"{value:,} wei ({value / 10**18:.6g} ETH)"


def _epsilon(value: object) -> str:
    if isinstance(value, int | float):
        return f"{value:.2f}"
    return str(value)  # "inf"


@app.command(
    epilog=(
        "Examples:\n\n  fi-peer status --state-dir ./alice\n\n"
        "  fi-peer status --json | jq .chain.earnings"
    )
)
def status(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what your running daemon is doing: peers, budget, earnings, settlements.

    Peers known and connected; privacy budget left (global and per querier);
    earnings (credited, withdrawn, on-chain balance) and pending settlements
    (receipts kept and claimable, escrowed queries not settled yet)."""
    doc = _daemon_get(config, state_dir, "/v1/status", False)
    assert doc is not None
    peers_doc = _daemon_get(config, state_dir, "/v1/peers", False)
    assert peers_doc is not None
    doc["peers"] = peers_doc.get("peers", [])
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    for table in status_tables(doc):
        out.print(table)


def status_tables(doc: dict[str, Any]) -> list[Table]:
    """The rich tables of ``fi-peer status`` for a /v1/status document (+ "peers")."""
    t, m, q = doc.get("transport", {}), doc.get("model", {}), doc.get("queries", {})
    head = Table(
        title=f"fi-peer {doc.get('name')} {str(doc.get('peer_id', ''))[:12]}",
        title_justify="left",
        show_header=False,
    )
    head.add_column("what", style="bold")
    head.add_column("value")
    head.add_row("peer id", str(doc.get("peer_id")))
    head.add_row("process", f"pid {doc.get('pid')}, up {doc.get('uptime_s', 0):.0f} s")
    head.add_row("network", f"{doc.get('net')} over {t.get('kind')}")
    for address in t.get("addresses", []) or ["-"]:
        head.add_row("address", escape(str(address)))
    head.add_row("peers", f"{doc.get('membership')} known, {t.get('connected')} connected")
    head.add_row("model", f"{m.get('task')}/{m.get('arch')} {str(m.get('sha256', ''))[:16]}")
    head.add_row("price", _wei(doc.get("market", {}).get("price_wei")))
    head.add_row(
        "queries",
        f"{q.get('ok', 0)} asked ok, {q.get('failed', 0)} failed; "
        f"{doc.get('answered', 0)} answered for others",
    )
    tables = [head]
    rows = doc.get("peers", [])
    tables.append(_peers_table(rows, f"peers ({len(rows)})"))

    p = doc.get("privacy", {})
    privacy = Table(
        title="privacy budget this epoch",
        caption=f"epsilon {p.get('epsilon_per_query')} per query this peer asks",
        title_justify="left",
        caption_justify="left",
    )
    for column in ("querier", "spent", "budget", "left"):
        privacy.add_column(column, justify="left" if column == "querier" else "right")
    privacy.add_row(
        "all queriers (global)",
        _epsilon(p.get("global_epsilon_spent", "?")),
        _epsilon(p.get("global_epsilon")),
        _epsilon(p.get("global_epsilon_left", "?")),
        style="bold",
    )
    for row in p.get("per_querier", []):
        privacy.add_row(
            str(row.get("peer_id", ""))[:12],
            _epsilon(row.get("spent")),
            _epsilon(p.get("per_querier_epsilon")),
            _epsilon(row.get("left")),
        )
    tables.append(privacy)

    audits = _audits_table(doc.get("audits", {}))
    if audits is not None:
        tables.append(audits)
    reputation = _reputation_table(doc.get("reputation", {}))
    if reputation is not None:
        tables.append(reputation)

    c = doc.get("chain", {})
    money = Table(title="earnings and settlements", title_justify="left", show_header=False)
    money.add_column("what", style="bold")
    money.add_column("value")
    if not c.get("paid"):
        money.add_row("paid", "no: queries are free (no \\[chain] in the config)")
        tables.append(money)
        return tables
    e = c.get("earnings", {})
    receipts = c.get("receipts", {})
    claimable = c.get("claimable", {})
    money.add_row("account", f"{c.get('address')} on chain {c.get('chain_id')}")
    money.add_row("earned", _wei(e.get("earned_wei")) + "  (receipts signed by queriers)")
    money.add_row("credited", _wei(e.get("credited_wei")) + "  (in the escrow, withdrawable)")
    money.add_row("withdrawn", _wei(e.get("withdrawn_wei")) + "  (by this daemon since start)")
    money.add_row("balance", _wei(e.get("balance_wei")) + "  (the account on chain)")
    if e.get("error"):
        money.add_row("chain", f"[red]{escape(str(e['error']))}[/]")
    pending = receipts.get("pending", {})
    money.add_row(
        "receipts kept",
        f"{pending.get('count', 0)} not yet seen paid ({_wei(pending.get('wei', 0))}), "
        f"{claimable.get('count', 0)} of them claimable now ({_wei(claimable.get('wei', 0))})",
    )
    lost = receipts.get("lost", {})
    if lost.get("count"):
        money.add_row("receipts lost", f"{lost['count']} ({_wei(lost.get('wei'))})")
    money.add_row(
        "as querier", f"{c.get('pending_settlements', 0)} escrowed queries not settled yet"
    )
    tables.append(money)
    return tables


def _score(value: object) -> str:
    return f"{value:+.3f}" if isinstance(value, int | float) else "-"


def _audits_table(a: dict[str, Any]) -> Table | None:
    """Per-member contribution scores from this querier's audit queries."""
    rows = a.get("members") or []
    if not rows:
        return None
    table = Table(
        title=f"contribution scores from audit queries (reward rule: {a.get('reward_rule')})",
        caption="merit: accuracy on opened audits (what the merit rule pays by); loo, "
        "shapley: mean contribution to the committee's answer per audit",
        title_justify="left",
        caption_justify="left",
    )
    for column in ("member", "audits", "hits", "refused", "bad", "merit", "loo", "shapley"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for row in rows:
        table.add_row(
            str(row.get("peer_id", ""))[:12],
            str(row.get("audits", 0)),
            str(row.get("hits", 0)),
            str(row.get("refused", 0)),
            str(row.get("bad", 0)),
            _score(row.get("merit")),
            _score(row.get("loo")),
            _score(row.get("shapley")),
        )
    return table


def _reputation_table(r: dict[str, Any]) -> Table | None:
    """What this querier's committee choice knows of each peer (committee_choice)."""
    rows = r.get("peers") or []
    if not rows:
        return None
    table = Table(
        title=f"committee choice: {r.get('committee_choice')} "
        f"(grace {r.get('choice_grace_ms')} ms, most chosen first)",
        caption="delivery: smoothed share of answers delivered when chosen (a decline counts "
        "half); contribution: audit accuracy",
        title_justify="left",
        caption_justify="left",
    )
    columns = ("peer", "chosen", "delivered", "declined", "dropped", "offer ms", "answer ms")
    for column in (*columns, "delivery", "contribution"):
        table.add_column(column, justify="left" if column == "peer" else "right")
    for row in rows[:20]:
        ms = [row.get("offer_delay_ms"), row.get("answer_ms")]
        table.add_row(
            str(row.get("peer_id", ""))[:12],
            *(str(row.get(k, 0)) for k in ("chosen", "delivered", "declined", "dropped")),
            *(f"{v:.0f}" if isinstance(v, int | float) else "-" for v in ms),
            _score(row.get("delivery")),
            _score(row.get("contribution")),
        )
    return table


@app.command(
    epilog=(
        "Examples:\n\n  fi-peer metrics --state-dir ./alice\n\n"
        "  fi-peer metrics | grep fi_peer_queries_total"
    )
)
def metrics(config: ConfigOption = None, state_dir: StateDirOption = None) -> None:
    """Print the daemon's Prometheus metrics (GET /metrics on the control port).

    Queries answered/failed/refused, latency histograms, messages rejected by
    reason, privacy budget spent, wei earned. For Prometheus itself, set
    `[control] public_metrics = true` and a fixed `port`, and scrape 127.0.0.1."""
    from fi_peer.control import ControlClient

    client = _client(config, state_dir)
    assert isinstance(client, ControlClient)
    try:
        text = client.get_text("/metrics")
    except FiPeerError as exc:
        _fail(str(exc), 1)
    sys.stdout.write(text)


# -- the chain: deploy the contracts, fund and inspect accounts -------------------------------

RpcOption = Annotated[str, typer.Option(help="The chain's JSON-RPC URL.")]
KeyFileOption = Annotated[
    Path | None,
    typer.Option(help="Hex private key file, mode 0600 (default: $FI_PEER_ETH_KEY)."),
]


def _chain_call(rpc: str, key_file: Path | None, work: Callable[[Any, Any], Any]) -> Any:
    """Run ``await work(w3, account)`` against ``rpc``; every failure is one line."""
    from web3 import AsyncHTTPProvider, AsyncWeb3

    from fi_peer import wizard
    from fi_peer.chain.errors import ChainError

    try:
        wizard.check_rpc_url(rpc)
        account = wizard.load_account(key_file)
        wizard.rpc_chain_id(rpc)  # a clear "does not answer" before web3's own errors
    except wizard.InitError as exc:
        _fail(str(exc))

    async def main() -> Any:
        w3 = AsyncWeb3(AsyncHTTPProvider(rpc))
        try:
            return await work(w3, account)
        finally:
            await w3.provider.disconnect()

    try:
        return asyncio.run(main())
    except (ChainError, ValueError, OSError) as exc:
        _fail(f"{rpc}: {exc}", 1)


@app.command(
    epilog=(
        "Example:\n\n  fi-peer deploy --rpc https://rpc.example.org --key-file deployer.key "
        "--out deployment.json\n\n"
        "Then every owner: fi-peer init ... --chain-rpc https://rpc.example.org "
        "--deployment deployment.json"
    )
)
def deploy(
    rpc: RpcOption,
    key_file: KeyFileOption = None,
    out_file: Annotated[
        Path, typer.Option("--out", help="Where to write the deployment (JSON).")
    ] = Path("deployment.json"),
    claim_grace_s: Annotated[
        int, typer.Option(min=0, help="Seconds members may claim after a query's deadline.")
    ] = 3600,
    min_stake_wei: Annotated[int, typer.Option(min=0, help="Registry: stake to register.")] = 0,
    unbonding_s: Annotated[int, typer.Option(min=0, help="Registry: unbonding delay.")] = 86_400,
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out file.")] = False,
) -> None:
    """Deploy the escrow and registry contracts on a chain; write deployment.json.

    `fi-peer init --deployment` and `[chain] deployment` read that file. The
    deploying account pays the gas; it has no other role afterwards."""
    from fi_peer.chain.client import deploy_contracts

    if out_file.exists() and not force:
        _fail(f"{out_file} exists; use --force to replace it (peers using it must follow)")

    async def work(w3: Any, account: Any) -> Any:
        return await deploy_contracts(
            w3,
            account,
            claim_grace_s=claim_grace_s,
            min_stake_wei=min_stake_wei,
            unbonding_s=unbonding_s,
        )

    deployed = _chain_call(rpc, key_file, work)
    deployed.save(out_file)
    _say(f"chain     {deployed.chain_id}")
    _say(f"escrow    {deployed.escrow}")
    _say(f"registry  {deployed.registry}")
    _say(f"block     {deployed.block}")
    _say(f"written   {out_file}")


@app.command(
    epilog=(
        "Example:\n\n  fi-peer fund --rpc https://rpc.example.org --key-file treasury.key "
        "--to 0xAbC...123 --amount '0.05 eth'"
    )
)
def fund(
    rpc: RpcOption,
    to: Annotated[str, typer.Option(help="The account to fund (0x address).")],
    amount: Annotated[str, typer.Option(help="Wei, or with a unit: '5 gwei', '0.05 eth'.")],
    key_file: KeyFileOption = None,
) -> None:
    """Send ETH from the key's account to another account (a peer's, for gas and escrows)."""
    from fi_peer import wizard
    from fi_peer.chain.terms import checksum

    try:
        wei = wizard.parse_wei(amount)
        target = checksum(to)
    except (wizard.InitError, ValueError) as exc:
        _fail(f"--to {to!r} / --amount {amount!r}: {exc}")

    async def work(w3: Any, account: Any) -> Any:
        from fi_peer.chain.client import default_codec
        from fi_peer.chain.txsender import TxSender

        sender = TxSender(w3, account, default_codec())
        result = await sender.send(to=target, data=b"", value=wei)
        return result, int(await w3.eth.get_balance(target))

    result, balance = _chain_call(rpc, key_file, work)
    _say(f"sent      {_wei(wei)} to {target} (tx 0x{result.tx_hash.hex()})")
    _say(f"balance   {_wei(balance)}")


@app.command(
    epilog=(
        "Example:\n\n  fi-peer account --rpc https://rpc.example.org --key-file ./alice/eth.key "
        "--deployment deployment.json"
    )
)
def account(
    rpc: RpcOption,
    key_file: KeyFileOption = None,
    deployment: Annotated[
        Path | None, typer.Option(help="deployment.json: also show the escrow credit.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show an Ethereum account's address and balance (and escrow credit): is it funded?"""
    from fi_peer.chain.client import ChainClient, Deployment
    from fi_peer.chain.errors import ChainError

    try:
        loaded = Deployment.load(deployment) if deployment is not None else None
    except ChainError as exc:
        _fail(str(exc))

    async def work(w3: Any, acct: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "address": acct.address,
            "chain_id": int(await w3.eth.chain_id),
            "balance_wei": int(await w3.eth.get_balance(acct.address)),
        }
        if loaded is not None:
            client = ChainClient.connect(rpc, "0x" + acct.key.hex().removeprefix("0x"), loaded)
            try:
                doc["credited_wei"] = await client.balance()
            finally:
                await client.aclose()
        return doc

    doc = _chain_call(rpc, key_file, work)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    _say(f"address   {doc['address']} (chain {doc['chain_id']})")
    _say(f"balance   {_wei(doc['balance_wei'])}")
    if "credited_wei" in doc:
        _say(f"credited  {_wei(doc['credited_wei'])} in the escrow (withdrawable)")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
