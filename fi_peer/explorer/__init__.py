"""The settlements explorer: a web page of what the chain says about FI queries.

It reads only the chain (the escrow's and registry's events through the
idempotent :class:`~fi_peer.chain.indexer.EventIndexer`, plus transactions,
blocks and ``balanceOf``), so it works for any deployment.

- :mod:`~fi_peer.explorer.source`     RPC reads, caches, snapshots (async)
- :mod:`~fi_peer.explorer.ledger`     events -> queries, accounts, totals (pure)
- :mod:`~fi_peer.explorer.calls`      transaction input decoding with the ABI (pure)
- :mod:`~fi_peer.explorer.html`       escaped-by-default HTML and value formats
- :mod:`~fi_peer.explorer.layout`     page frame, links, tables
- :mod:`~fi_peer.explorer.pages`      overview, queries, peers
- :mod:`~fi_peer.explorer.chainpages` blocks and transactions
- :mod:`~fi_peer.explorer.server`     aiohttp app and lifecycle
- :mod:`~fi_peer.explorer.command`    ``fi-peer explorer`` arguments, :func:`main`
"""

from fi_peer.explorer.command import main
from fi_peer.explorer.server import Explorer, ExplorerSettings, make_app, serve
from fi_peer.explorer.source import ChainSource, ExplorerConfigError, Snapshot

__all__ = [
    "ChainSource",
    "Explorer",
    "ExplorerConfigError",
    "ExplorerSettings",
    "Snapshot",
    "main",
    "make_app",
    "serve",
]
