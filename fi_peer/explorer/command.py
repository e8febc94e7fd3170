"""``fi-peer explorer``: argument parsing and the process's lifetime.

:func:`main` takes the arguments (without the program name) and returns the
exit status: 0 after Ctrl-C or SIGTERM, 2 for bad arguments or addresses that
are not our contracts. The typer CLI calls it; ``python -m fi_peer.explorer``
too. It prints the URL once the server listens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from fi_peer.chain.errors import ChainError
from fi_peer.chain.terms import checksum
from fi_peer.explorer.server import Explorer, ExplorerSettings, serve

DEFAULT_PORT = 8090

EXAMPLES = """\
examples:
  fi-peer explorer --rpc http://127.0.0.1:8545 --contract 0x5FbDB2315678afecb367f032d93F642f64180aa3
  fi-peer explorer --rpc http://127.0.0.1:8545 --contract 0x5FbD...0aa3 \\
      --registry 0xe7f1...0512 --port 8090 --index explorer.sqlite

The explorer reads only the chain: the contracts' events (through an
idempotent sqlite index), transactions, blocks and balanceOf. It binds
127.0.0.1 unless --host says otherwise; the pages are public chain data, but
think twice before exposing any server. On anvil it also uses the Otterscan
API (creation block, reverted transactions, revert reasons).
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fi-peer explorer",
        description="A web page of the settlements on an EVM chain: queries, peers, "
        "payouts, blocks and transactions of a QueryEscrow (and PeerRegistry).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rpc", required=True, metavar="URL", help="the chain's JSON-RPC URL")
    p.add_argument("--contract", required=True, metavar="ADDR", help="QueryEscrow address")
    p.add_argument("--registry", metavar="ADDR", help="PeerRegistry address (peers' keys, stake)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0: any free)"
    )
    p.add_argument(
        "--index",
        default=":memory:",
        metavar="FILE",
        help="sqlite file for the event index, resumed on restart (default: in memory)",
    )
    p.add_argument(
        "--from-block",
        type=int,
        metavar="N",
        help="first block to index (default: the contracts' creation block via Otterscan, else 0)",
    )
    p.add_argument(
        "--refresh",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="catch up with the chain at most this often (default %(default)s)",
    )
    return p


def settings_from(args: argparse.Namespace) -> ExplorerSettings:
    """Validated settings; ValueError with a message naming the option."""
    try:
        escrow = checksum(args.contract)
    except ValueError:
        raise ValueError(f"--contract: not an address: {args.contract!r}") from None
    registry = None
    if args.registry:
        try:
            registry = checksum(args.registry)
        except ValueError:
            raise ValueError(f"--registry: not an address: {args.registry!r}") from None
    if not args.rpc.startswith(("http://", "https://")):
        raise ValueError(f"--rpc: an http(s) URL, got {args.rpc!r}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port: 0..65535, got {args.port}")
    if args.from_block is not None and args.from_block < 0:
        raise ValueError("--from-block: must be >= 0")
    if not args.refresh > 0:
        raise ValueError("--refresh: must be > 0")
    return ExplorerSettings(
        rpc_url=args.rpc,
        escrow=escrow,
        registry=registry,
        host=args.host,
        port=args.port,
        index_path=args.index,
        start_block=args.from_block,
        refresh_s=args.refresh,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fi-peer explorer`` with ``argv``; returns the exit status."""
    p = parser()
    args = p.parse_args(argv)  # --help and usage errors exit here (0 / 2)
    try:
        settings = settings_from(args)
    except ValueError as exc:
        p.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def ready(explorer: Explorer) -> None:
        source = explorer.source
        if source.error is not None:
            print(
                f"warning: the RPC does not answer yet ({source.error}); the explorer keeps trying",
                file=sys.stderr,
            )
        print(f"explorer: {explorer.url}  (Ctrl-C to stop)", flush=True)

    try:
        asyncio.run(serve(settings, ready=ready))
    except KeyboardInterrupt:
        return 0
    except ChainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    return 0
