"""CKKS query mode (fi_peer.privacy.he): contexts, layouts, evaluation, hostile input.

Stated tolerance: decrypted answers equal the plaintext computation of the same
polynomial network within 1e-3 absolute for outputs of magnitude <= ~50
(measured: ~5e-5), and within 1e-5 relative to the output scale for the
count-weighted ``support`` outputs.
"""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from fi_peer.errors import (
    FiPeerError,
    LocalProtocolError,
    MalformedMessage,
    ModelError,
    OversizedMessage,
)
from fi_peer.privacy import he

TOL = 1e-3


@pytest.fixture(scope="module")
def secret() -> he.SecretContext:
    return he.create_secret_context()


@pytest.fixture(scope="module")
def public_bytes(secret: he.SecretContext) -> bytes:
    return secret.public_bytes()


@pytest.fixture(scope="module")
def member_ctx(public_bytes: bytes) -> he.PublicContext:
    return he.load_public_context(public_bytes, require_galois=True)


@pytest.fixture(scope="module")
def member_ctx_batched(secret: he.SecretContext) -> he.PublicContext:
    return he.load_public_context(secret.public_bytes(galois_keys=False))


@pytest.fixture(scope="module")
def model() -> he.HEModel:
    rng = np.random.default_rng(7)
    return he.build_he_model(
        [
            he.LinearLayer(rng.normal(size=(64, 32)) * 0.3, rng.normal(size=32) * 0.3),
            "square",
            he.LinearLayer(rng.normal(size=(32, 10)) * 0.3, rng.normal(size=10)),
        ]
    )


def _raw_slots(secret: he.SecretContext, blob: bytes, *, tensor: bool) -> np.ndarray:
    """What a querier holding the secret key can read: every slot of the first ciphertext."""
    ctx = secret._ctx
    loaded = ts.ckks_tensor_from(ctx, blob) if tensor else ts.ckks_vector_from(ctx, blob)
    seal = ctx.seal_context().data
    plain = sealapi.Plaintext()
    sealapi.Decryptor(seal, ctx.secret_key().data).decrypt(loaded.ciphertext()[0], plain)
    return np.array(sealapi.CKKSEncoder(seal).decode_double(plain))


def test_parameters_are_exactly_the_128_bit_bound() -> None:
    max_bits = sealapi.CoeffModulus.MaxBitCount(
        he.POLY_MODULUS_DEGREE, sealapi.SEC_LEVEL_TYPE.TC128
    )
    assert sum(he.COEFF_MOD_BIT_SIZES) == max_bits == 218


def test_member_never_holds_a_secret_key(
    secret: he.SecretContext, member_ctx: he.PublicContext, model: he.HEModel
) -> None:
    assert not member_ctx._ctx.has_secret_key()
    query = he.encrypt_inputs(secret, np.full((1, 64), 0.5))
    out = he.evaluate(member_ctx, model, query)
    # The member tries to read the query and its own answer: both fail.
    for blob in (query.blobs[0], out.blobs[0]):
        with pytest.raises(ValueError, match="secret"):
            ts.ckks_vector_from(member_ctx._ctx, blob).decrypt()


def _wrap(tenseal_context: bytes, galois: bytes = b"") -> bytes:
    """A TenSEAL context in fi-peer's public-context container (he.load_public_context)."""
    return b"FIHE\x01" + struct.pack(">I", len(tenseal_context)) + tenseal_context + galois


def test_context_with_secret_key_is_rejected(secret: he.SecretContext) -> None:
    leaked = secret._ctx.serialize(save_secret_key=True, save_galois_keys=False)
    with pytest.raises(MalformedMessage, match="secret key"):
        he.load_public_context(_wrap(leaked))


def test_public_context_carries_only_the_needed_galois_keys(secret: he.SecretContext) -> None:
    full = secret.public_bytes()
    bare = secret.public_bytes(galois_keys=False)
    assert full.startswith(bare) and full is secret.public_bytes()  # stable digest
    # Nine seeded keys (~1.05 MB each) instead of TenSEAL's ~24 unseeded (53 MB in all).
    assert 8e6 < len(full) - len(bare) < 11e6 and len(full) < 13e6
    with pytest.raises(MalformedMessage, match="Galois keys lack"):
        keygen = sealapi.KeyGenerator(
            secret._ctx.data.seal_context(), secret._ctx.data.secret_key()
        )
        partial = keygen.create_galois_keys([pow(3, 1, 2 * he.POLY_MODULUS_DEGREE)])
        he.load_public_context(bare + he._seal_save(partial), require_galois=True)
    with pytest.raises(MalformedMessage):
        he.load_public_context(bare + b"\x00" * 1000)  # garbage keys: an error, not a crash


def test_context_with_other_parameters_is_rejected() -> None:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40]
    )
    ctx.global_scale = 2**20
    with pytest.raises(MalformedMessage, match="N=4096"):
        he.load_public_context(_wrap(ctx.serialize(save_galois_keys=False)))


@pytest.mark.parametrize("data", [b"", b"garbage" * 10, b"\x0a\xff\xff\xff\xff\x0f"])
def test_garbage_context_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        he.load_public_context(data)


def test_truncated_context_is_malformed(secret: he.SecretContext) -> None:
    data = secret.public_bytes(galois_keys=False)
    with pytest.raises(MalformedMessage):
        he.load_public_context(data[: len(data) // 2])


def test_oversized_context_is_rejected_before_parsing() -> None:
    with pytest.raises(OversizedMessage):
        he.load_public_context(b"\x00" * (he.MAX_CONTEXT_BYTES + 1))


def test_single_layout_needs_galois_keys(
    secret: he.SecretContext, member_ctx_batched: he.PublicContext, model: he.HEModel
) -> None:
    query = he.encrypt_inputs(secret, np.zeros((1, 64)))
    with pytest.raises(MalformedMessage, match="Galois"):
        he.evaluate(member_ctx_batched, model, query)
    assert not member_ctx_batched.has_galois_keys


def test_chunks_reassemble_in_any_order_and_verify_digest(secret: he.SecretContext) -> None:
    data = secret.public_bytes(galois_keys=False)
    chunks = he.chunk_context(data, chunk_bytes=256 * 1024)
    assert all(len(c.payload) <= 256 * 1024 for c in chunks)
    assembler = he.ContextAssembler()
    order = [*reversed(chunks), chunks[0]]  # out of order, one duplicate
    results = [assembler.add(c) for c in order[:-1]]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == data
    assert chunks[0].digest == he.context_digest(data)
    assert assembler.pending == ()
    loaded = he.load_public_context(data)
    cache = he.ContextCache(max_entries=1)
    cache.put("querier-a", loaded)
    assert cache.get("querier-a", loaded.digest) is loaded
    assert cache.get("querier-b", loaded.digest) is None


def test_tampered_chunk_fails_the_digest() -> None:
    data = bytes(range(256)) * 40
    chunks = list(he.chunk_context(data, chunk_bytes=4096))
    bad = he.ContextChunk(
        digest=chunks[1].digest,
        index=1,
        total=chunks[1].total,
        payload=b"x" * len(chunks[1].payload),
    )
    assembler = he.ContextAssembler()
    assembler.add(chunks[0])
    with pytest.raises(MalformedMessage, match="digest"):
        assembler.add(bad)
        assembler.add(chunks[2])


def test_chunk_caps() -> None:
    with pytest.raises(OversizedMessage):
        he.ContextChunk(digest="0" * 64, index=0, total=1, payload=b"x" * (he.MAX_CHUNK_BYTES + 1))
    with pytest.raises(MalformedMessage):
        he.ContextChunk(digest="0" * 64, index=2, total=2, payload=b"x")
    assembler = he.ContextAssembler(max_bytes=10)
    with pytest.raises(OversizedMessage):
        assembler.add(he.ContextChunk(digest="0" * 64, index=0, total=2, payload=b"x" * 11))
    with pytest.raises(LocalProtocolError):
        he.chunk_context(b"abc", chunk_bytes=he.MAX_CHUNK_BYTES + 1)


def test_single_layout_equals_plaintext_and_every_slot_is_noised(
    secret: he.SecretContext, member_ctx: he.PublicContext, model: he.HEModel
) -> None:
    x = np.random.default_rng(1).uniform(0, 1, (2, 64))
    query = he.encrypt_inputs(secret, x)
    assert query.layout is he.Layout.SINGLE and len(query.blobs) == 2
    plain_out = he.evaluate(member_ctx, model, query)
    np.testing.assert_allclose(he.decrypt_outputs(secret, plain_out), model.forward(x), atol=TOL)
    one = he.EncryptedQuery(layout=query.layout, n_inputs=1, input_dim=64, blobs=query.blobs[:1])
    noisy = he.evaluate(member_ctx, model, one, noise_std=5.0, rng=np.random.default_rng(2))
    answer = he.decrypt_outputs(secret, noisy)[0]
    assert np.abs(answer - model.forward(x)[0]).max() > 0.5  # noise is there
    # The curious querier reads all 4096 slots: each holds a copy of the *noisy*
    # answer (period = the padded width); no slot holds the noiseless one, and the
    # padding slots hold noise, not the evaluation error of exact zeros.
    slots = _raw_slots(secret, noisy.blobs[0], tensor=False)
    width = he.single_layout_width(model)
    assert width == 32
    copies = slots.reshape(-1, width)
    np.testing.assert_allclose(copies[:, :10], np.tile(answer, (copies.shape[0], 1)), atol=TOL)
    np.testing.assert_allclose(copies, np.tile(copies[0], (copies.shape[0], 1)), atol=TOL)
    assert np.abs(copies[0, 10:]).min() > 1e-2


@pytest.mark.slow
def test_batched_layout_equals_plaintext_and_unused_slots_are_noised(
    secret: he.SecretContext, member_ctx_batched: he.PublicContext, model: he.HEModel
) -> None:
    x = np.random.default_rng(3).uniform(0, 1, (6, 64))
    query = he.encrypt_inputs(secret, x)
    assert query.layout is he.Layout.BATCHED and len(query.blobs) == 1
    out = he.evaluate(member_ctx_batched, model, query)
    np.testing.assert_allclose(he.decrypt_outputs(secret, out), model.forward(x), atol=TOL)
    noisy = he.evaluate(
        member_ctx_batched, model, query, noise_std=5.0, rng=np.random.default_rng(4)
    )
    slots = _raw_slots(secret, noisy.blobs[0], tensor=True)  # output coordinate 0
    at_zero = model.forward(np.zeros((1, 64)))[0, 0]
    unused = slots[6:]
    assert np.allclose(unused, unused[0], atol=TOL)  # one shared extra noise draw...
    assert abs(unused[0] - at_zero) > 1e-2  # ...that hides the answer at x = 0


def test_support_model_folds_counts() -> None:
    rng = np.random.default_rng(5)
    base = he.build_he_model([he.LinearLayer(rng.normal(size=(8, 4)), rng.normal(size=4))])
    counts = np.array([0.0, 3.0, 10.0, 1.0])
    answer = he.support_model(base, counts)
    x = rng.normal(size=(5, 8))
    expected = np.hstack([base.forward(x) * counts, np.broadcast_to(counts, (5, 4))])
    np.testing.assert_allclose(answer.forward(x), expected, atol=1e-12)


def _blob_cases(secret: he.SecretContext, model: he.HEModel) -> dict[str, he.EncryptedQuery]:
    single = he.encrypt_inputs(secret, np.zeros((1, 64)))
    batched = he.encrypt_inputs(secret, np.zeros((5, 64)))
    blob = single.blobs[0]

    def sq(b: bytes) -> he.EncryptedQuery:
        return he.EncryptedQuery(layout=he.Layout.SINGLE, n_inputs=1, input_dim=64, blobs=(b,))

    def bt(b: bytes) -> he.EncryptedQuery:
        return he.EncryptedQuery(layout=he.Layout.BATCHED, n_inputs=5, input_dim=64, blobs=(b,))

    return {
        "empty vector": sq(b""),
        "random vector": sq(np.random.default_rng(0).bytes(5000)),
        "truncated vector": sq(blob[:-10]),
        "tensor as vector": sq(batched.blobs[0][:50_000]),
        # TenSEAL segfaults on these two: the wire check must catch them first.
        "empty tensor": bt(b""),
        "vector as tensor": bt(blob),
        "truncated tensor": bt(batched.blobs[0][:-7]),
        "wrong batch size": he.EncryptedQuery(
            layout=he.Layout.BATCHED, n_inputs=4, input_dim=64, blobs=batched.blobs
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty vector",
        "random vector",
        "truncated vector",
        "tensor as vector",
        "empty tensor",
        "vector as tensor",
        "truncated tensor",
        "wrong batch size",
    ],
)
def test_garbage_ciphertexts_are_rejected_with_typed_errors(
    case: str, secret: he.SecretContext, member_ctx: he.PublicContext, model: he.HEModel
) -> None:
    query = _blob_cases(secret, model)[case]
    with pytest.raises((MalformedMessage, OversizedMessage)):
        he.evaluate(member_ctx, model, query)


def test_bit_flips_give_typed_errors_or_garbage_never_a_crash(
    secret: he.SecretContext, member_ctx: he.PublicContext, model: he.HEModel
) -> None:
    # A flipped bit inside the SEAL payload is just another ciphertext (IND-CPA:
    # undetectable); in the framing it must be a typed error, never a crash.
    blob = he.encrypt_inputs(secret, np.zeros((1, 64))).blobs[0]
    for position in (0, 1, 3, 7, len(blob) // 2):
        flipped = bytearray(blob)
        flipped[position] ^= 0xFF
        query = he.EncryptedQuery(
            layout=he.Layout.SINGLE, n_inputs=1, input_dim=64, blobs=(bytes(flipped),)
        )
        with contextlib.suppress(FiPeerError):
            he.evaluate(member_ctx, model, query)


def test_oversized_ciphertext_rejected_before_parsing(
    member_ctx: he.PublicContext, model: he.HEModel
) -> None:
    blob = b"\x12" + b"\xff" * (he.MAX_CIPHERTEXT_BYTES + 10)
    query = he.EncryptedQuery(layout=he.Layout.SINGLE, n_inputs=1, input_dim=64, blobs=(blob,))
    with pytest.raises(OversizedMessage):
        he.evaluate(member_ctx, model, query)


def test_output_is_not_accepted_as_a_fresh_input(
    secret: he.SecretContext, member_ctx: he.PublicContext
) -> None:
    rng = np.random.default_rng(9)
    square = he.build_he_model([he.LinearLayer(rng.normal(size=(64, 64)), np.zeros(64))])
    once = he.evaluate(member_ctx, square, he.encrypt_inputs(secret, np.zeros((1, 64))))
    replay = he.EncryptedQuery(layout=he.Layout.SINGLE, n_inputs=1, input_dim=64, blobs=once.blobs)
    with pytest.raises(MalformedMessage, match="fresh"):
        he.evaluate(member_ctx, square, replay)


def test_unsupported_models_are_model_errors() -> None:
    layer = he.LinearLayer(np.ones((4, 4)), np.zeros(4))
    with pytest.raises(ModelError, match="relu"):
        he.build_he_model([layer, "relu", layer])
    with pytest.raises(ModelError, match="levels"):
        he.build_he_model([layer, "square", layer, "square", layer])
    with pytest.raises(ModelError, match="order"):
        he.build_he_model(["square", layer])
    with pytest.raises(ModelError, match="limit"):
        he.build_he_model([he.LinearLayer(np.ones((200, 4)), np.zeros(4))])
    with pytest.raises(ModelError, match="fit"):
        he.build_he_model([layer, "square", he.LinearLayer(np.ones((5, 2)), np.zeros(2))])
    with pytest.raises(ModelError, match="NaN"):
        he.LinearLayer(np.full((2, 2), np.nan), np.zeros(2))


def test_input_width_limit_and_mismatch(
    secret: he.SecretContext, member_ctx: he.PublicContext, model: he.HEModel
) -> None:
    with pytest.raises(ModelError, match="limit"):
        he.encrypt_inputs(secret, np.zeros((1, 200)))
    small = he.encrypt_inputs(secret, np.zeros((1, 40)))
    with pytest.raises(ModelError, match="width"):
        he.evaluate(member_ctx, model, small)


def test_zero_and_tiny_weights_are_skipped_not_transparent(
    secret: he.SecretContext, member_ctx: he.PublicContext
) -> None:
    """A support model of a member that never saw a class has zero columns; products
    by plaintexts that encode to zero would be "transparent" ciphertexts (SEAL error)."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(8, 4)) * 0.3
    w1[:, 1] = 0.0  # a dead hidden unit
    w2 = rng.normal(size=(4, 3))
    w2[:, 0] = 0.0
    w2[:, 2] = 1e-14
    model = he.build_he_model(
        [he.LinearLayer(w1, np.zeros(4)), "square", he.LinearLayer(w2, np.zeros(3))]
    )
    x = rng.uniform(0, 1, (1, 8))
    for layout in (he.Layout.SINGLE, he.Layout.BATCHED):
        query = he.encrypt_inputs(secret, x, layout=layout)
        out = he.decrypt_outputs(secret, he.evaluate(member_ctx, model, query))
        np.testing.assert_allclose(out, model.forward(x), atol=TOL)
