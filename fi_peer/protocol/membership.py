"""Membership: who is out there, from their signed announcements.

Theory of operation: every peer gossips an Announce on ``fi/<net>/peers`` every
``interval_ms`` with a sequence number that only grows. A receiver keeps the
newest announcement per peer and the time it last heard one; a peer silent for
``expiry_ms`` (a few missed heartbeats) is forgotten. An announcement with an
old or equal ``seq`` refreshes nothing: a replayed or reordered announcement
cannot roll a peer's details back.
"""

from __future__ import annotations

from dataclasses import dataclass

from fi_peer.errors import UnexpectedMessage
from fi_peer.protocol.messages import Announce

MEMBERSHIP_TIMER = ("membership",)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    peer_id: str
    announce: Announce
    last_seen_ms: int


class Membership:
    def __init__(self, local_id: str, *, interval_ms: int = 2000, missed_beats: int = 3) -> None:
        if interval_ms <= 0 or missed_beats < 1:
            raise ValueError("interval_ms > 0 and missed_beats >= 1 required")
        self.local_id = local_id
        self.interval_ms = interval_ms
        self.expiry_ms = interval_ms * missed_beats
        self._peers: dict[str, PeerInfo] = {}

    def on_announce(self, sender: str, announce: Announce, now_ms: int) -> bool:
        """Record an announcement; True if it changed what we know."""
        if sender == self.local_id:
            return False
        known = self._peers.get(sender)
        if known is not None and announce.seq <= known.announce.seq:
            if announce.seq < known.announce.seq:
                raise UnexpectedMessage("announcement older than one already seen")
            return False
        self._peers[sender] = PeerInfo(sender, announce, now_ms)
        return known is None or known.announce != announce

    def expire(self, now_ms: int) -> list[str]:
        """Forget silent peers; returns who was dropped."""
        horizon = now_ms - self.expiry_ms
        gone = [p for p, info in self._peers.items() if info.last_seen_ms < horizon]
        for peer in gone:
            del self._peers[peer]
        return gone

    def get(self, peer_id: str) -> PeerInfo | None:
        return self._peers.get(peer_id)

    def peers(self) -> list[PeerInfo]:
        return sorted(self._peers.values(), key=lambda p: p.peer_id)

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers
