"""Identity, keystore and sealed inputs (identity.py, sealing.py; DESIGN.md, "Identity").

Argon2id runs at its minimum cost here (opslimit=1, memlimit=8 KiB) to keep the
suite fast; the format and the checks are the same at any cost.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import nacl.public
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fi_peer.errors import CorruptKeystore, KeystoreError, MalformedMessage, WrongPassphrase
from fi_peer.identity import (
    Identity,
    decode_keystore,
    encode_keystore,
    load_keystore,
    peer_id_from_public_key,
    public_key_from_peer_id,
    save_keystore,
    verify_signature,
)
from fi_peer.protocol import codec
from fi_peer.protocol.sealing import open_input, seal_input

FAST = {"opslimit": 1, "memlimit": 8192}
PASS = "correct horse battery staple"


@pytest.fixture
def ident() -> Identity:
    return Identity.from_seed(b"identity-test")


def same_keys(a: Identity, b: Identity) -> bool:
    return a._secrets() == b._secrets() and a.peer_id == b.peer_id


def doc_of(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    assert isinstance(doc, dict)
    return doc


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc))


# -- keys and ids -------------------------------------------------------------


def test_peer_id_is_lowercase_hex_of_the_ed25519_public_key(ident: Identity) -> None:
    assert ident.peer_id == ident.public_key.hex()
    assert len(ident.peer_id) == 64 and ident.peer_id == ident.peer_id.lower()
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    assert peer_id_from_public_key(ident.public_key) == ident.peer_id


@pytest.mark.parametrize(
    "bad", ["", "ab" * 31, "ab" * 33, "AB" * 32, "zz" * 32, " " + "ab" * 31 + "a"]
)
def test_public_key_from_peer_id_rejects_non_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        public_key_from_peer_id(bad)


def test_peer_id_from_public_key_needs_32_bytes() -> None:
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"\x01" * 31)


def test_from_seed_is_deterministic_and_separates_keys() -> None:
    a1, a2, b = Identity.from_seed(b"a"), Identity.from_seed(b"a"), Identity.from_seed(b"b")
    assert same_keys(a1, a2)
    assert a1.peer_id != b.peer_id
    # key separation: the X25519 secret is not the Ed25519 seed
    assert bytes(a1.box_key) != bytes(a1.signing_key)
    assert a1.box_public_key != a1.public_key


def test_generate_gives_fresh_keys() -> None:
    assert Identity.generate().peer_id != Identity.generate().peer_id


@pytest.mark.parametrize(("seed_len", "box_len"), [(31, 32), (32, 31), (33, 32), (0, 0)])
def test_from_secrets_rejects_wrong_lengths(seed_len: int, box_len: int) -> None:
    with pytest.raises(ValueError):
        Identity.from_secrets(b"\x01" * seed_len, b"\x02" * box_len)


def test_sign_and_verify(ident: Identity) -> None:
    other = Identity.from_seed(b"other")
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(ident.public_key, b"hello", sig)
    assert not verify_signature(ident.public_key, b"hellO", sig)
    assert not verify_signature(other.public_key, b"hello", sig)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(ident.public_key, b"hello", flipped)
    # garbage keys and signatures are a False, never an exception
    assert not verify_signature(b"\x00" * 31, b"hello", sig)
    assert not verify_signature(ident.public_key, b"hello", sig[:63])
    assert not verify_signature(b"\xff" * 32, b"hello", sig)
    assert not verify_signature("ab" * 16, b"hello", sig)  # type: ignore[arg-type]
    assert not verify_signature(ident.public_key, b"hello", sig + b"\x00")
    assert not verify_signature(b"\x00" * 32, b"hello", sig)  # small-order key


def test_sign_and_keys_match_pynacl_s_own_objects(ident: Identity) -> None:
    """The derived keys and the direct libsodium call give exactly what the
    SigningKey/VerifyKey wrappers give (deterministic Ed25519)."""
    assert ident.public_key == bytes(ident.signing_key.verify_key)
    assert ident.box_public_key == bytes(ident.box_key.public_key)
    assert ident.peer_id == bytes(ident.signing_key.verify_key).hex()
    for data in (b"", b"hello", bytes(range(256)) * 8):
        sig = ident.sign(data)
        assert sig == ident.signing_key.sign(data).signature
        ident.signing_key.verify_key.verify(data, sig)  # raises if not valid
        assert verify_signature(ident.public_key, data, sig)
    assert Identity.from_seed(b"x") == Identity.from_seed(b"x")


def test_repr_never_shows_secrets(ident: Identity) -> None:
    secrets = ident._secrets()
    texts = [repr(ident), str(ident), f"{ident}", f"{ident!r}", repr([ident])]
    forms = [
        secrets.hex(),
        secrets[:32].hex(),
        secrets[32:].hex(),
        base64.b64encode(secrets).decode(),
        repr(secrets[:32]),
        repr(secrets[32:]),
    ]
    for text in texts:
        assert ident.peer_id[:16] in text
        for form in forms:
            assert form not in text
        # not even an 8-byte window of a secret
        for i in range(0, 64 - 8):
            assert secrets[i : i + 8].hex() not in text


# -- keystore: encrypted form -----------------------------------------------------


def test_roundtrip_with_passphrase(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "keys" / "id.json"  # parent is created
    save_keystore(path, ident, PASS, **FAST)
    loaded = load_keystore(path, PASS)
    assert same_keys(loaded, ident)
    assert loaded.box_public_key == ident.box_public_key
    doc = doc_of(path)
    assert doc["fi_peer_keystore"] == 1
    assert doc["kdf"] == "argon2id"
    assert doc["peer_id"] == ident.peer_id
    assert (doc["opslimit"], doc["memlimit"]) == (1, 8192)
    raw = path.read_bytes()
    assert ident._secrets().hex().encode() not in raw
    assert base64.b64encode(ident._secrets()) not in raw
    assert "secret" not in doc


def test_salt_is_fresh_each_time(ident: Identity) -> None:
    a = json.loads(encode_keystore(ident, PASS, **FAST))
    b = json.loads(encode_keystore(ident, PASS, **FAST))
    assert a["salt"] != b["salt"] and a["ciphertext"] != b["ciphertext"]


def test_file_mode_is_exactly_0600(tmp_path: Path, ident: Identity) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        path = tmp_path / "id.json"
        save_keystore(path, ident, PASS, **FAST)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # replacing a world-readable file also ends at 0600
        other = tmp_path / "other.json"
        other.write_text("{}")
        other.chmod(0o644)
        save_keystore(other, ident, None, overwrite=True)
        assert stat.S_IMODE(other.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.json", "other.json"]


def test_refuses_to_overwrite(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, PASS, **FAST)
    before = path.read_bytes()
    other = Identity.from_seed(b"someone else")
    with pytest.raises(KeystoreError, match="already exists"):
        save_keystore(path, other, PASS, **FAST)
    assert path.read_bytes() == before
    assert same_keys(load_keystore(path, PASS), ident)
    save_keystore(path, other, PASS, overwrite=True, **FAST)
    assert same_keys(load_keystore(path, PASS), other)


def test_wrong_passphrase(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, PASS, **FAST)
    with pytest.raises(WrongPassphrase):
        load_keystore(path, PASS + "!")
    with pytest.raises(WrongPassphrase):
        load_keystore(path, "")
    with pytest.raises(WrongPassphrase):  # encrypted, but no passphrase given
        load_keystore(path, None)


def test_empty_passphrase_is_refused(ident: Identity) -> None:
    with pytest.raises(KeystoreError):
        encode_keystore(ident, "", **FAST)


def test_flipped_ciphertext_byte_is_wrong_passphrase(tmp_path: Path, ident: Identity) -> None:
    # The ciphertext is authenticated (Poly1305): tampering is indistinguishable from a
    # wrong key, and errors.WrongPassphrase documents "wrong passphrase (or tampered file)".
    path = tmp_path / "id.json"
    save_keystore(path, ident, PASS, **FAST)
    doc = doc_of(path)
    ct = bytearray(base64.b64decode(doc["ciphertext"]))
    for index in (0, 30, len(ct) - 1):  # nonce, body, MAC
        tampered = bytearray(ct)
        tampered[index] ^= 0x01
        write_doc(path, doc | {"ciphertext": base64.b64encode(bytes(tampered)).decode()})
        with pytest.raises(WrongPassphrase):
            load_keystore(path, PASS)


def test_truncated_ciphertext_is_wrong_passphrase(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, PASS, **FAST)
    doc = doc_of(path)
    ct = base64.b64decode(doc["ciphertext"])
    for cut in (ct[:5], ct[:30], ct[:-1], b""):
        write_doc(path, doc | {"ciphertext": base64.b64encode(cut).decode()})
        with pytest.raises(WrongPassphrase):
            load_keystore(path, PASS)


def test_changed_salt_or_kdf_cost_is_wrong_passphrase(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, PASS, **FAST)
    doc = doc_of(path)
    write_doc(path, doc | {"salt": base64.b64encode(b"\x00" * 16).decode()})
    with pytest.raises(WrongPassphrase):
        load_keystore(path, PASS)
    write_doc(path, doc | {"opslimit": 2})
    with pytest.raises(WrongPassphrase):
        load_keystore(path, PASS)


def test_truncated_file_is_corrupt(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, PASS, **FAST)
    raw = path.read_bytes()
    for cut in (1, len(raw) // 2, len(raw) - 3):
        path.write_bytes(raw[:cut])
        with pytest.raises(CorruptKeystore):
            load_keystore(path, PASS)
    path.write_bytes(b"")
    with pytest.raises(CorruptKeystore):
        load_keystore(path, PASS)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'"fi_peer_keystore"',
        b"null",
        b'{"fi_peer_keystore": 2, "kdf": "none"}',
        b'{"fi_peer_keystore": "1", "kdf": "none"}',
        b'{"kdf": "none"}',
    ],
)
def test_not_a_keystore_is_corrupt(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "id.json"
    path.write_bytes(raw)
    with pytest.raises(CorruptKeystore):
        load_keystore(path, PASS)


@pytest.mark.parametrize(
    "change",
    [
        {"kdf": "scrypt"},
        {"kdf": None},
        {"salt": "!!not base64!!"},
        {"salt": 12},
        {"salt": base64.b64encode(b"short").decode()},
        {"ciphertext": "@@@"},
        {"ciphertext": None},
        {"opslimit": None},
        {"opslimit": "1"},
        {"opslimit": 0},
        {"opslimit": 1000},
        {"memlimit": 1024},
        {"memlimit": 1 << 40},
    ],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))!r}"[:40],
)
def test_bad_fields_are_corrupt(tmp_path: Path, ident: Identity, change: dict[str, Any]) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, PASS, **FAST)
    write_doc(path, doc_of(path) | change)
    with pytest.raises(CorruptKeystore):
        load_keystore(path, PASS)


def test_missing_fields_are_corrupt(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, PASS, **FAST)
    doc = doc_of(path)
    for name in ("salt", "ciphertext", "opslimit", "memlimit", "kdf"):
        write_doc(path, {k: v for k, v in doc.items() if k != name})
        with pytest.raises(CorruptKeystore):
            load_keystore(path, PASS)


def test_swapped_peer_id_label_is_corrupt(tmp_path: Path, ident: Identity) -> None:
    other = Identity.from_seed(b"label owner")
    for passphrase in (PASS, None):
        path = tmp_path / f"id-{passphrase is None}.json"
        save_keystore(path, ident, passphrase, **FAST)
        write_doc(path, doc_of(path) | {"peer_id": other.peer_id})
        with pytest.raises(CorruptKeystore, match="peer_id"):
            load_keystore(path, passphrase)
        write_doc(path, doc_of(path) | {"peer_id": ident.peer_id.upper()})
        with pytest.raises(CorruptKeystore):
            load_keystore(path, passphrase)


def test_swapped_ciphertexts_between_keystores(tmp_path: Path, ident: Identity) -> None:
    """Moving a ciphertext (and its salt) under another peer's label is caught."""
    other = Identity.from_seed(b"other keystore")
    a = json.loads(encode_keystore(ident, PASS, **FAST))
    b = json.loads(encode_keystore(other, PASS, **FAST))
    path = tmp_path / "id.json"
    write_doc(path, a | {"salt": b["salt"], "ciphertext": b["ciphertext"]})
    with pytest.raises(CorruptKeystore):
        load_keystore(path, PASS)


# -- keystore: plaintext form -----------------------------------------------------


def test_plaintext_roundtrip(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, None)
    doc = doc_of(path)
    assert doc["kdf"] == "none"
    assert base64.b64decode(doc["secret"]) == ident._secrets()
    assert "ciphertext" not in doc
    assert same_keys(load_keystore(path, None), ident)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "secret", [b"", b"\x01" * 63, b"\x01" * 65, b"\x01" * 32], ids=["0", "63", "65", "32"]
)
def test_plaintext_secret_of_wrong_length_is_corrupt(
    tmp_path: Path, ident: Identity, secret: bytes
) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, None)
    write_doc(path, doc_of(path) | {"secret": base64.b64encode(secret).decode()})
    with pytest.raises(CorruptKeystore):
        load_keystore(path, None)


def test_plaintext_secret_not_base64_is_corrupt(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "id.json"
    save_keystore(path, ident, None)
    for bad in ("%%%", None, 5, "é"):
        write_doc(path, doc_of(path) | {"secret": bad})
        with pytest.raises(CorruptKeystore):
            load_keystore(path, None)


def test_decode_keystore_only_raises_keystore_errors(ident: Identity) -> None:
    good = encode_keystore(ident, PASS, **FAST)
    for i in range(0, len(good), 7):
        raw = good[:i] + bytes([good[i] ^ 0x20]) + good[i + 1 :]
        with contextlib.suppress(WrongPassphrase, CorruptKeystore):
            decode_keystore(raw, PASS)


# -- keystore: the file system -----------------------------------------------------


def test_missing_file_is_keystore_error(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="no keystore") as info:
        load_keystore(tmp_path / "nope.json", PASS)
    assert type(info.value) is KeystoreError


def test_directory_is_keystore_error(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError):
        load_keystore(tmp_path, PASS)


def test_huge_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    path.write_bytes(b" " * (64 * 1024 + 1))
    with pytest.raises(CorruptKeystore, match="too large"):
        load_keystore(path, PASS)


# -- the query input, sealed to one committee member ---------------------------------------

QID = b"Q" * 16
INPUT = np.array([0.5, -1.25, 3.0, 1e-3], dtype=np.float32)


def test_sealed_input_opens_with_the_right_key_and_query_id() -> None:
    querier, member = Identity.from_seed(b"querier"), Identity.from_seed(b"member")
    sealed = seal_input(querier.box_key, member.box_public_key, QID, INPUT)
    x = open_input(member.box_key, querier.box_public_key, QID, sealed, 4)
    assert x.dtype == np.float32 and np.array_equal(x, INPUT)
    # randomised, and the plaintext is not visible
    again = seal_input(querier.box_key, member.box_public_key, QID, INPUT)
    assert again != sealed
    assert INPUT.tobytes() not in sealed and QID not in sealed


def test_sealed_input_is_refused_otherwise() -> None:
    querier, member = Identity.from_seed(b"querier"), Identity.from_seed(b"member")
    other = Identity.from_seed(b"other member")
    sealed = seal_input(querier.box_key, member.box_public_key, QID, INPUT)
    attempts = {
        "another member's key": (other.box_key, querier.box_public_key, QID, sealed, 4),
        "another querier's key": (member.box_key, other.box_public_key, QID, sealed, 4),
        "another query id": (member.box_key, querier.box_public_key, b"R" * 16, sealed, 4),
        "another input size": (member.box_key, querier.box_public_key, QID, sealed, 5),
        "flipped byte": (member.box_key, querier.box_public_key, QID,
                         sealed[:30] + bytes([sealed[30] ^ 1]) + sealed[31:], 4),
        "truncated": (member.box_key, querier.box_public_key, QID, sealed[:-1], 4),
        "short": (member.box_key, querier.box_public_key, QID, sealed[:10], 4),
        "empty": (member.box_key, querier.box_public_key, QID, b"", 4),
        "bad querier key": (member.box_key, b"\x01" * 31, QID, sealed, 4),
    }
    for args in attempts.values():
        with pytest.raises(MalformedMessage):
            open_input(*args)


def _box(querier: Identity, member: Identity, plaintext: bytes) -> bytes:
    box = nacl.public.Box(querier.box_key, nacl.public.PublicKey(member.box_public_key))
    return bytes(box.encrypt(plaintext))


def test_authentic_but_wrong_plaintexts_are_refused() -> None:
    querier, member = Identity.from_seed(b"querier"), Identity.from_seed(b"member")
    nan = np.array([0.0, np.nan, 0.0, 0.0], dtype="<f4").tobytes()
    for plaintext in (
        b"\xc1",  # not msgpack
        codec.pack([QID]),
        codec.pack([QID, INPUT.tobytes(), b""]),
        codec.pack({"q": QID}),
        codec.pack([QID, "text" * 4]),
        codec.pack([QID, nan]),
        codec.pack([QID, np.array([np.inf] * 4, dtype="<f4").tobytes()]),
    ):
        with pytest.raises(MalformedMessage):
            open_input(member.box_key, querier.box_public_key, QID,
                       _box(querier, member, plaintext), 4)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_sealed_bytes_only_raise_malformed(sealed: bytes) -> None:
    member, querier = Identity.from_seed(b"member"), Identity.from_seed(b"querier")
    with pytest.raises(MalformedMessage):
        open_input(member.box_key, querier.box_public_key, QID, sealed, 4)
