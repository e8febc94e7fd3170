"""The one exception tree of fi-peer, split by who is to blame.

::

    FiPeerError                      base of everything fi-peer raises on purpose
    ├── ConfigError                  the local user's input: config file, CLI flags, paths
    ├── KeystoreError                the keystore on disk cannot be opened
    │   ├── WrongPassphrase          authentication failed: wrong passphrase (or tampered file)
    │   └── CorruptKeystore          not a keystore, truncated, unknown version
    ├── ModelError                   an owner's model cannot be loaded or run
    ├── LocalProtocolError           *we* tried to do something the protocol forbids
    │                                (a bug or misuse on this side: never a peer's fault)
    └── RemoteProtocolError          a peer sent something we reject; always dropped + counted
        ├── OversizedMessage         over the size cap of its kind (checked first, before parsing)
        ├── MalformedMessage         not a valid envelope / body (bad msgpack, wrong types, schema)
        ├── UnknownKind              a message kind this version does not know
        ├── BadSignature             signature does not verify for the claimed sender
        ├── StaleMessage             timestamp outside the +/- window (too old or in the future)
        ├── ReplayedMessage          (sender, nonce) already seen inside the window
        ├── RateLimited              a sender exceeded its allowance inside the window
        └── UnexpectedMessage        authentic and well-formed, but not expected in this state

Adapters translate third-party exceptions (nacl, msgpack, torch, transports) into
this tree with ``raise ... from exc``; callers never catch library exceptions.
Every :class:`RemoteProtocolError` carries a short machine-readable ``reason``
used as the label of the rejection metric.
"""

from __future__ import annotations


class FiPeerError(Exception):
    """Base class of every error fi-peer raises on purpose."""


class ConfigError(FiPeerError):
    """Bad local configuration or command-line input."""


class KeystoreError(FiPeerError):
    """The keystore file cannot be used."""


class WrongPassphrase(KeystoreError):
    """The passphrase does not open the keystore (or the ciphertext was altered)."""


class CorruptKeystore(KeystoreError):
    """The file is not a readable fi-peer keystore."""


class ModelError(FiPeerError):
    """An owner's model cannot be loaded, validated or evaluated."""


class LocalProtocolError(FiPeerError):
    """This side attempted something the protocol does not allow."""


class RemoteProtocolError(FiPeerError):
    """A message from the network was rejected. Never fatal: drop and count it."""

    reason: str = "remote"


class OversizedMessage(RemoteProtocolError):
    reason = "oversized"


class MalformedMessage(RemoteProtocolError):
    reason = "malformed"


class UnknownKind(RemoteProtocolError):
    reason = "unknown_kind"


class BadSignature(RemoteProtocolError):
    reason = "bad_signature"


class StaleMessage(RemoteProtocolError):
    reason = "stale"


class ReplayedMessage(RemoteProtocolError):
    reason = "replayed"


class RateLimited(RemoteProtocolError):
    reason = "rate_limited"


class UnexpectedMessage(RemoteProtocolError):
    """Well-formed and authentic, but not what the protocol expects now
    (an unsolicited offer, a share from a non-member, a second share ...)."""

    reason = "unexpected"
