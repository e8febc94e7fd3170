"""Test-only fault injection: SIGKILL this process at a named point of a query.

**Inert by default**: nothing happens unless ``$FI_PEER_FAULT`` is set, and no
production configuration sets it. The fault tests (tests/reliability/) set it
on the daemons they start, to crash a committee member or a querier at an
exact stage of a query instead of racing a ``kill -9`` against the protocol.

``FI_PEER_FAULT=<point>[:<n>]``
    fire the n-th time (default: the first) ``point`` is reached.
``FI_PEER_FAULT=@<path>``
    the same spec, read from the file ``path`` each time a point is reached
    (absent or empty: inert), so a test can arm a daemon that is already up.

Points (the agent calls :func:`point` / :func:`outbound` there):

``exit_before_share``  member: its (masked) Share is about to leave.
``exit_after_share``   member: the querier acknowledged its Share (the signed
                       receipt arrived), before the receipt is kept.
``exit_before_reveal`` member: its Reveal (unmask shares) is about to leave.
``exit_after_escrow``  querier: its escrow opened on chain, no Accept left yet.
``exit_before_settle`` querier: a paid query of its own ended, before its
                       settlement is queued.

Firing sends SIGKILL to this process: no cleanup, no flushing, like a crash.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import msgpack

ENV = "FI_PEER_FAULT"
POINTS = frozenset(
    {
        "exit_before_share",
        "exit_after_share",
        "exit_before_reveal",
        "exit_after_escrow",
        "exit_before_settle",
    }
)
# Envelope kinds whose departure is a fault point (see fi_peer.protocol.envelope).
_OUTBOUND = {"share": "exit_before_share", "reveal": "exit_before_reveal"}

_reached: Counter[str] = Counter()


def _spec() -> tuple[str, int] | None:
    raw = os.environ.get(ENV, "").strip()
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text(encoding="utf-8").strip()
        except OSError:
            return None
    if not raw:
        return None
    name, _, count = raw.partition(":")
    try:
        n = int(count) if count else 1
    except ValueError:
        return None
    return (name, n) if name in POINTS and n >= 1 else None


def active() -> bool:
    """Whether fault injection is configured at all (cheap: one environment read)."""
    return ENV in os.environ


def point(name: str) -> None:
    """Reached fault point ``name``: die here if the configured fault says so."""
    if ENV not in os.environ:
        return
    spec = _spec()
    if spec is None or spec[0] != name:
        return
    _reached[name] += 1
    if _reached[name] == spec[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def outbound(envelope: bytes) -> None:
    """An envelope is about to leave: the fault points named after its kind."""
    if ENV not in os.environ:
        return
    try:
        kind = msgpack.unpackb(envelope, raw=False)[1]
    except (ValueError, TypeError, IndexError, msgpack.UnpackException):
        return
    name = _OUTBOUND.get(kind) if isinstance(kind, str) else None
    if name is not None:
        point(name)
