"""Escaped-by-default HTML, and the formats of chain values on a page.

Everything a page shows comes from the chain, and the chain is attacker-
controlled data (anyone can open a query, send a transaction, revert with a
string). So the only way to produce markup is :func:`tag`, which escapes every
child and every attribute value that is not already :class:`Html`; plain
``str`` never reaches a page unescaped. :class:`Html` values are made only
here, from escaped text or from literal markup in this package's code.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterable

_ATTR_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_VOID = frozenset({"br", "hr", "img", "input", "link", "meta"})

WEI_PER_ETH = 10**18
SMALL_WEI = 10**9  # below 1 gwei amounts read better in wei


class Html(str):
    """Markup that is safe to emit as is (already escaped, or our own literal)."""

    __slots__ = ()


def esc(value: object) -> Html:
    """``value`` as text: escaped unless it is already :class:`Html`."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def _children(children: Iterable[object]) -> Html:
    out: list[str] = []
    for child in children:
        if child is None or child is False:
            continue
        if isinstance(child, str | int):
            out.append(esc(child))
        else:
            out.append(_children(child))  # type: ignore[arg-type]  # nested iterables
    return Html("".join(out))


def join(*children: object) -> Html:
    """Concatenate children (each escaped unless :class:`Html`; iterables flattened)."""
    return _children(children)


def tag(element: str, /, *children: object, **attrs: object) -> Html:
    """``<name attrs>children</name>``. Attribute names come from code
    (``class_`` -> ``class``, ``data_wei`` -> ``data-wei``); values are escaped;
    ``None``/``False`` drop the attribute, ``True`` writes it bare."""
    parts = [element]
    for key, value in attrs.items():
        attr = key.rstrip("_").replace("_", "-")
        if not _ATTR_NAME.match(attr):
            raise ValueError(f"bad attribute name {key!r}")
        if value is None or value is False:
            continue
        parts.append(attr if value is True else f'{attr}="{esc(value)}"')
    opening = f"<{' '.join(parts)}>"
    if element in _VOID:
        return Html(opening)
    return Html(f"{opening}{_children(children)}</{element}>")


def link(href: str, *children: object, **attrs: object) -> Html:
    return tag("a", *children, href=href, **attrs)


# ── formats ──────────────────────────────────────────────────────────────────


def hex0x(data: bytes) -> str:
    return "0x" + data.hex()


def short(text: str, head: int = 6, tail: int = 4) -> str:
    """``0x1234…abcd`` for long hex strings."""
    return text if len(text) <= head + tail + 1 else f"{text[:head]}…{text[-tail:]}"


def eth_text(wei: int) -> str:
    """Exact ETH decimal of ``wei``: integer arithmetic, no rounding at any size
    (pages are right to the wei)."""
    sign = "-" if wei < 0 else ""
    whole, frac = divmod(abs(wei), WEI_PER_ETH)
    text = f"{whole}.{frac:018d}".rstrip("0").rstrip(".")
    return f"{sign}{text} ETH"


def gwei_text(wei_amount: int) -> str:
    """Exact gwei of ``wei_amount`` (gas prices)."""
    whole, frac = divmod(wei_amount, 10**9)
    return f"{whole:,}.{frac:09d}".rstrip("0").rstrip(".") + " gwei"


def amount_text(wei_amount: int) -> str:
    """Exact, in the unit that reads best: wei below 1 gwei, else ETH."""
    if abs(wei_amount) < SMALL_WEI and wei_amount != 0:
        return f"{wei_amount:,} wei"
    return eth_text(wei_amount)


def wei(amount: int | None) -> Html:
    """An amount (exact: :func:`amount_text`); the wei in the tooltip and ``data-wei``."""
    if amount is None:
        return tag("span", "–", class_="muted")
    return tag("span", amount_text(amount), class_="wei", data_wei=amount, title=f"{amount:,} wei")


def number(value: int) -> str:
    return f"{value:,}"


def when(timestamp: int | None, *, short: bool = False) -> Html:
    """A block time in UTC (``short``: without the zone, for tables), the raw unix
    seconds in ``data-ts``."""
    if timestamp is None:
        return tag("span", "–", class_="muted")
    fmt = "%Y-%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S UTC"
    try:
        text = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime(fmt)
    except (OverflowError, OSError, ValueError):
        text = f"unix {timestamp}"
    return tag("time", text, data_ts=timestamp, title="UTC")


def bits(mask: int, size: int) -> str:
    """A delivered bitmap as one character per committee seat (seat 0 first)."""
    return "".join("1" if mask >> i & 1 else "0" for i in range(size))
