"""A peer's identity: Ed25519 signing key, X25519 encryption key, and the keystore.

The peer id is the lowercase hex of the 32-byte Ed25519 public key. The X25519
key is a separate random key (key separation: signing and key agreement never
share a secret); its public half is published in announcements and offers,
always inside an envelope signed by the Ed25519 key, which binds the two.

Keystore file (JSON, mode 0600, written atomically, never overwritten unless asked)::

    {"fi_peer_keystore": 1, "peer_id": "<hex>", "kdf": "argon2id",
     "opslimit": int, "memlimit": int, "salt": "<b64>", "ciphertext": "<b64>"}

``ciphertext`` is a NaCl SecretBox (XSalsa20-Poly1305) of the two 32-byte secret
keys under a key derived from the passphrase with Argon2id. ``kdf: "none"``
(with ``secret`` instead of ``ciphertext``) is the explicit, insecure plaintext
form for local demos only. ``peer_id`` in clear is a label; after decryption it
is checked against the key, so a swapped label is reported as corruption.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils

from fi_peer.errors import CorruptKeystore, KeystoreError, WrongPassphrase

KEYSTORE_VERSION = 1
PEER_ID_HEX_LEN = 64

# Argon2id cost. INTERACTIVE (64 MiB, 2 passes) opens in ~0.06 s on this class of
# machine; tests pass the minimum to stay fast.
DEFAULT_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
DEFAULT_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
_SALT_BYTES = nacl.pwhash.argon2id.SALTBYTES


def peer_id_from_public_key(public_key: bytes) -> str:
    """The peer id of an Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return public_key.hex()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of :func:`peer_id_from_public_key`; ValueError if not a peer id."""
    if len(peer_id) != PEER_ID_HEX_LEN or peer_id != peer_id.lower():
        raise ValueError(f"not a peer id: {peer_id[:80]!r}")
    return bytes.fromhex(peer_id)


@dataclass(frozen=True, slots=True, repr=False)
class Identity:
    """Secret keys of one peer. ``repr`` never shows secrets."""

    signing_key: nacl.signing.SigningKey
    box_key: nacl.public.PrivateKey
    # Derived once (every envelope names its sender): public keys and the peer id.
    _public: bytes = field(init=False, compare=False, repr=False)
    _peer_id: str = field(init=False, compare=False, repr=False)
    _box_public: bytes = field(init=False, compare=False, repr=False)
    _sign_secret: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        public = bytes(self.signing_key.verify_key)
        object.__setattr__(self, "_public", public)
        object.__setattr__(self, "_peer_id", peer_id_from_public_key(public))
        object.__setattr__(self, "_box_public", bytes(self.box_key.public_key))
        # libsodium's 64-byte secret key (seed || public key), as SigningKey keeps it
        _, secret = nacl.bindings.crypto_sign_seed_keypair(bytes(self.signing_key))
        object.__setattr__(self, "_sign_secret", secret)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate())

    @classmethod
    def from_secrets(cls, ed25519_seed: bytes, x25519_secret: bytes) -> Identity:
        if len(ed25519_seed) != 32 or len(x25519_secret) != 32:
            raise ValueError("secrets are 32 bytes each")
        return cls(nacl.signing.SigningKey(ed25519_seed), nacl.public.PrivateKey(x25519_secret))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from any seed (tests and simulations only)."""
        h = nacl.hash.blake2b(seed, digest_size=64, encoder=nacl.encoding.RawEncoder)
        return cls.from_secrets(h[:32], h[32:])

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def box_public_key(self) -> bytes:
        return self._box_public

    def sign(self, data: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature (what SigningKey.sign gives, minus its
        wrapper objects: libsodium's signed message is signature || data)."""
        return nacl.bindings.crypto_sign(data, self._sign_secret)[: nacl.bindings.crypto_sign_BYTES]

    def _secrets(self) -> bytes:
        return bytes(self.signing_key) + bytes(self.box_key)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id[:16]}...)"


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data``.

    libsodium's check directly (VerifyKey.verify does the same, through wrapper
    objects): it refuses non-canonical signatures and small-order public keys.
    """
    if type(public_key) is not bytes or len(public_key) != nacl.bindings.crypto_sign_PUBLICKEYBYTES:
        return False
    if type(signature) is not bytes or len(signature) != nacl.bindings.crypto_sign_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + bytes(data), public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise CorruptKeystore(f"keystore field {what!r} is missing or not text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CorruptKeystore(f"keystore field {what!r} is not valid base64") from exc


def _derive_key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    """Argon2id key for the keystore's SecretBox."""
    try:
        secret = passphrase.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KeystoreError("the passphrase is not valid text") from exc
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, secret, salt, opslimit=opslimit, memlimit=memlimit
    )


def encode_keystore(
    identity: Identity,
    passphrase: str | None,
    *,
    opslimit: int = DEFAULT_OPSLIMIT,
    memlimit: int = DEFAULT_MEMLIMIT,
) -> bytes:
    """Serialise ``identity``; ``passphrase=None`` means the insecure plaintext form."""
    doc: dict[str, Any] = {"fi_peer_keystore": KEYSTORE_VERSION, "peer_id": identity.peer_id}
    if passphrase is None:
        doc |= {"kdf": "none", "secret": _b64(identity._secrets())}
    else:
        if not passphrase:
            raise KeystoreError("the passphrase must not be empty")
        salt = nacl.utils.random(_SALT_BYTES)
        box = nacl.secret.SecretBox(_derive_key(passphrase, salt, opslimit, memlimit))
        doc |= {
            "kdf": "argon2id",
            "opslimit": opslimit,
            "memlimit": memlimit,
            "salt": _b64(salt),
            "ciphertext": _b64(bytes(box.encrypt(identity._secrets()))),
        }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def decode_keystore(raw: bytes, passphrase: str | None) -> Identity:
    """Parse a keystore; raises WrongPassphrase or CorruptKeystore, nothing else."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptKeystore("not a fi-peer keystore (not JSON)") from exc
    if not isinstance(doc, dict) or doc.get("fi_peer_keystore") != KEYSTORE_VERSION:
        raise CorruptKeystore("not a fi-peer keystore, or an unsupported version")
    kdf = doc.get("kdf")
    if kdf == "none":
        secrets = _unb64(doc.get("secret"), "secret")
    elif kdf == "argon2id":
        if passphrase is None:
            raise WrongPassphrase("this keystore is encrypted: a passphrase is required")
        opslimit, memlimit = doc.get("opslimit"), doc.get("memlimit")
        if not (isinstance(opslimit, int) and isinstance(memlimit, int)):
            raise CorruptKeystore("keystore KDF parameters are missing")
        if not (1 <= opslimit <= 64 and 8192 <= memlimit <= 4 << 30):
            raise CorruptKeystore("keystore KDF parameters are out of range")
        salt = _unb64(doc.get("salt"), "salt")
        if len(salt) != _SALT_BYTES:
            raise CorruptKeystore("keystore salt has the wrong length")
        ciphertext = _unb64(doc.get("ciphertext"), "ciphertext")
        key = _derive_key(passphrase, salt, opslimit, memlimit)
        try:
            secrets = nacl.secret.SecretBox(key).decrypt(ciphertext)
        except nacl.exceptions.CryptoError as exc:
            raise WrongPassphrase("wrong passphrase (or the keystore was altered)") from exc
    else:
        raise CorruptKeystore(f"unknown keystore kdf {kdf!r}")
    if len(secrets) != 64:
        raise CorruptKeystore("keystore secret has the wrong length")
    identity = Identity.from_secrets(secrets[:32], secrets[32:])
    if doc.get("peer_id") != identity.peer_id:
        raise CorruptKeystore("keystore peer_id does not match its key")
    return identity


def save_keystore(
    path: Path,
    identity: Identity,
    passphrase: str | None,
    *,
    overwrite: bool = False,
    opslimit: int = DEFAULT_OPSLIMIT,
    memlimit: int = DEFAULT_MEMLIMIT,
) -> None:
    """Write the keystore atomically with mode 0600. Refuses to replace a file unless told."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeystoreError(f"{path} already exists; refusing to overwrite an identity")
    data = encode_keystore(identity, passphrase, opslimit=opslimit, memlimit=memlimit)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keystore-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_keystore(path: Path, passphrase: str | None) -> Identity:
    """Read and decrypt a keystore file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeystoreError(f"no keystore at {path}") from exc
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc.strerror}") from exc
    if len(raw) > 64 * 1024:
        raise CorruptKeystore(f"{path} is too large to be a keystore")
    return decode_keystore(raw, passphrase)
