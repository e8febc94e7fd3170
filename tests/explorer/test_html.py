"""Escaped-by-default HTML and the exact formats of amounts."""

from __future__ import annotations

import pytest

from fi_peer.explorer.html import (
    Html,
    amount_text,
    bits,
    esc,
    eth_text,
    gwei_text,
    join,
    tag,
    wei,
    when,
)


def test_text_and_attributes_are_escaped() -> None:
    evil = '"><script>alert(1)</script>'
    out = tag("a", evil, href=evil, title="a&b")
    assert "<script>" not in out
    assert out == (
        '<a href="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" title="a&amp;b">'
        "&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;</a>"
    )


def test_markup_passes_only_as_html() -> None:
    inner = tag("b", "x")
    assert tag("p", inner, "<i>") == "<p><b>x</b>&lt;i&gt;</p>"
    assert esc(inner) is inner
    assert join("a", ["<", tag("i", "b")], None, 3) == "a&lt;<i>b</i>3"


def test_attribute_rules() -> None:
    assert tag("input", name="q", hidden=True, value=None) == '<input name="q" hidden>'
    assert tag("span", class_="x", data_wei=5) == '<span class="x" data-wei="5"></span>'
    with pytest.raises(ValueError, match="attribute"):
        tag("span", **{"on click": "x"})


def test_amounts_are_exact() -> None:
    assert eth_text(10**18) == "1 ETH"
    assert eth_text(1_000_000_000_000_000_001) == "1.000000000000000001 ETH"
    assert eth_text(0) == "0 ETH"
    huge = 2**256 - 1  # no float or 28-digit Decimal rounding anywhere
    assert eth_text(huge) == f"{huge // 10**18}.{huge % 10**18:018d} ETH"
    assert eth_text(-5) == "-0.000000000000000005 ETH"
    assert amount_text(1_003) == "1,003 wei"
    assert amount_text(10**9) == "0.000000001 ETH"
    out = wei(7_000_000_000_000_007)
    assert 'data-wei="7000000000000007"' in out and "0.007000000000000007 ETH" in out
    assert "muted" in wei(None)
    assert gwei_text(1_181_176_917) == "1.181176917 gwei"
    assert gwei_text(2 * 10**9) == "2 gwei"


def test_times_and_bits() -> None:
    assert "2026-01-01 00:00:00 UTC" in when(1_767_225_600)
    assert "unix" in when(2**64 - 1)
    assert bits(0b101, 4) == "1010"
    assert isinstance(when(None), Html)
