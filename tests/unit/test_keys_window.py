"""The querier's key round (secure aggregation): an adaptive window, configurable.

The querier waits for every member's key shares up to ``keys_window_ms``
(at most half of the time before the unmask reserve); once ``t`` are in, it
waits only a grace for the rest: ``keys_grace_ms`` or half of what the first
``t`` took, whichever is longer. Key shares that a loaded network delivers
after 1 s (the old fixed window) still make the query. Driven on the
deterministic sans-io net, with the key shares held back and delivered at
chosen times.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fi_peer.config import PeerConfig, load_config
from fi_peer.errors import ConfigError
from fi_peer.protocol.querier import QuerierConfig
from tests.unit.test_protocol_flow import T0, Tap, World, done, ids, world

TIMEOUT = 10_000  # ms: keys timer at min(window, (TIMEOUT - unmask reserve) // 2)
CONFIG = QuerierConfig()


def _held_key_shares(k: int = 3, config: QuerierConfig = CONFIG) -> tuple[World, Tap, bytes]:
    """A secagg query whose members' key shares are all held back (the Accepts
    and the key shares leave at T0: the net delivers at once)."""
    w = world(k, querier_config=config)
    tap = Tap(hold=lambda src, dst, kind: kind == "key_shares")
    w.net.drop = tap
    qid = w.submit(k=k, timeout_ms=TIMEOUT)
    assert len(tap.held) == k and w.net.now_ms == T0
    return w, tap, qid


def _deliver_key_shares(w: World, tap: Tap, members: list[str], at_ms: int) -> None:
    """Move the clock to T0 + at_ms (firing timers) and hand over these members' key shares."""
    w.net.advance(T0 + at_ms - w.net.now_ms)
    for src, dst, _, data in tap.held:
        if src in members:
            w.net.deliver(dst, data)
    w.net.run()


def test_key_shares_later_than_one_second_still_make_the_query() -> None:
    w, tap, qid = _held_key_shares()
    _deliver_key_shares(w, tap, ids(*w.members), 2500)  # the old window closed at 1000
    w.net.advance(TIMEOUT)
    out = done(w, qid)
    assert out.ok, out.reason
    assert list(out.contributors) == ids(*w.members)


def test_once_t_are_in_the_rest_get_a_grace_of_half_the_wait() -> None:
    # k = 3, t = 2: two key shares at 1200 ms -> the keys timer moves to 1200 + 600
    w, tap, qid = _held_key_shares()
    first, last = ids(*w.members[:2]), w.members[2].peer_id
    _deliver_key_shares(w, tap, first, 1200)
    _deliver_key_shares(w, tap, [last], 1799)  # inside the grace: all three in U1
    w.net.advance(TIMEOUT)
    out = done(w, qid)
    assert out.ok and list(out.contributors) == ids(*w.members)

    w, tap, qid = _held_key_shares()
    first, last = ids(*w.members[:2]), w.members[2].peer_id
    _deliver_key_shares(w, tap, first, 1200)
    w.net.advance(599)
    assert "key_relay" not in {k for _, _, k, _ in tap.seen}
    w.net.advance(1)  # 1800: the relay leaves without the third member
    assert len(tap.of("key_relay")) == 2 and tap.of("result", dst=last)
    w.net.advance(TIMEOUT)
    out = done(w, qid)
    assert out.ok and list(out.contributors) == sorted(first)


def test_the_grace_is_at_least_keys_grace_ms() -> None:
    w, tap, qid = _held_key_shares()
    first, last = ids(*w.members[:2]), w.members[2].peer_id
    _deliver_key_shares(w, tap, first, 100)  # half of 100 ms < the 200 ms floor
    w.net.advance(199)
    assert not tap.of("key_relay")
    w.net.advance(1)
    assert len(tap.of("key_relay")) == 2
    w.net.advance(TIMEOUT)
    assert done(w, qid).ok and last not in done(w, qid).contributors


def test_below_threshold_the_query_fails_at_the_window() -> None:
    config = QuerierConfig(keys_window_ms=3000)
    w, tap, qid = _held_key_shares(config=config)
    _deliver_key_shares(w, tap, [w.members[0].peer_id], 500)
    w.net.advance(T0 + 2999 - w.net.now_ms)
    assert qid not in w.net.done
    w.net.advance(1)
    out = done(w, qid)
    assert not out.ok and out.reason == "too_few_key_shares_1_of_2" and out.elapsed_ms == 3000


def test_the_window_never_takes_more_than_half_of_the_budget() -> None:
    # 10 s budget, 1 s unmask reserve: at most 4.5 s, whatever the config says
    w, _, qid = _held_key_shares(config=QuerierConfig(keys_window_ms=60_000))
    w.net.advance(4499)
    assert qid not in w.net.done
    w.net.advance(1)
    out = done(w, qid)
    assert out.reason == "too_few_key_shares_0_of_2" and out.elapsed_ms == 4500


# -- the daemon's config ----------------------------------------------------------------------


def _write(tmp_path: Path, query: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"version = 1\n[query]\n{query}\n")
    return path


def test_config_sets_the_keys_window_and_grace(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "keys_window_ms = 6000\nkeys_grace_ms = 500"))
    assert (cfg.keys_window_ms, cfg.keys_grace_ms) == (6000, 500)
    defaults = PeerConfig()
    assert (defaults.keys_window_ms, defaults.keys_grace_ms) == (
        CONFIG.keys_window_ms,
        CONFIG.keys_grace_ms,
    )
    again = load_config(_write(tmp_path, ""))
    assert again.to_toml()["query"]["keys_window_ms"] == CONFIG.keys_window_ms


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("keys_window_ms = 0", "query.keys_window_ms must be 10..60000, got 0"),
        ("keys_window_ms = 1.5", "query.keys_window_ms must be a int"),
        ("keys_grace_ms = -1", "query.keys_grace_ms must be 0..60000, got -1"),
        (
            "keys_window_ms = 300\nkeys_grace_ms = 400",
            "query.keys_grace_ms (400) must not exceed query.keys_window_ms (300)",
        ),
        ("keys_windows_ms = 3000", "did you mean keys_windows_ms -> keys_window_ms"),
    ],
)
def test_bad_keys_window_values_are_refused_with_the_fix(
    tmp_path: Path, query: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, query))
    assert message in str(caught.value)
    assert "fix" in str(caught.value) or "did you mean" in str(caught.value)
