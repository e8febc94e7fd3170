"""The CKKS work of the HE query mode, for a driver of PeerCore (the agent, tests).

The protocol core moves opaque ciphertexts and asks for the TenSEAL work with
the effects of :mod:`fi_peer.protocol.he_effects`; :class:`HERuntime` does it
(:func:`run_he_effect`, blocking: call it off the event loop) and
:func:`answer_he_effect` hands the result back to the core.

- As a querier: one CKKS key pair per runtime, created on first use (with
  Galois keys: the single layout needs them; ~0.5 s, and the public context is
  ~53 MB, sent once per member and cached there). The secret key never leaves
  this object.
- As a member: the served HE-ready model (:class:`~fi_peer.privacy.he.HEModel`,
  the support vector ``[n(y) f(y|x), n(y)]``), and the queriers' public
  contexts, loaded (a context holding a secret key is refused) and kept per
  (querier, digest) in a small LRU cache.

HE-ready models on disk: ``save_he_model`` / ``load_he_model`` (an ``.npz``
with the layers' weights and biases; :func:`he_model_path` is where a daemon
looks: next to its model file, ``<model>.he.npz``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import nacl.utils
import numpy as np
import numpy.typing as npt

from fi_peer.errors import FiPeerError, ModelError
from fi_peer.privacy import he
from fi_peer.protocol.effects import Effect
from fi_peer.protocol.he_effects import (
    HECombine,
    HEDecrypt,
    HEEffect,
    HEEvaluate,
    HELoadContext,
    HESendChunks,
)
from fi_peer.protocol.peer import PeerCore

log = logging.getLogger(__name__)

HE_SUFFIX = ".he.npz"


def he_model_path(model_path: Path) -> Path:
    """Where the HE-ready model of an owner's model file lives (may not exist)."""
    return model_path.with_name(model_path.name + HE_SUFFIX)


def save_he_model(path: Path, model: he.HEModel) -> None:
    arrays: dict[str, Any] = {}
    for i, layer in enumerate(model.layers):
        arrays[f"w{i}"] = layer.weight
        arrays[f"b{i}"] = layer.bias
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def load_he_model(path: Path) -> he.HEModel:
    """An HE-ready model saved by :func:`save_he_model` (ModelError if unusable)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            n = len([k for k in data.files if k.startswith("w")])
            layers = [he.LinearLayer(data[f"w{i}"], data[f"b{i}"]) for i in range(n)]
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"cannot load the HE model {path}: {exc}") from exc
    items: list[he.LinearLayer | str] = [layers[0]]
    if len(layers) == 2:
        items += ["square", layers[1]]
    elif len(layers) != 1:
        raise ModelError(f"HE model {path} has {len(layers)} layers; 1 or 2 are supported")
    return he.build_he_model(items)


class HERuntime:
    def __init__(
        self,
        model: he.HEModel | None = None,
        *,
        rng: np.random.Generator | None = None,
        max_contexts: int = 4,
        secret: he.SecretContext | None = None,
    ) -> None:
        self.model = model
        self.rng = (
            rng
            if rng is not None
            else np.random.default_rng(int.from_bytes(nacl.utils.random(32), "little"))
        )
        self.contexts = he.ContextCache(max_entries=max_contexts)
        self._secret = secret
        self._public: bytes | None = None
        self._lock = threading.Lock()

    @property
    def serves(self) -> bool:
        return self.model is not None

    # -- querier --------------------------------------------------------------------
    def keys(self) -> tuple[he.SecretContext, bytes]:
        """This peer's CKKS key pair (created on first use) and its public context."""
        with self._lock:
            if self._secret is None:
                self._secret = he.create_secret_context(galois_keys=True)
            if self._public is None:
                self._public = self._secret.public_bytes(galois_keys=True)
            return self._secret, self._public

    def encrypt(self, x: npt.ArrayLike) -> tuple[tuple[bytes, ...], bytes]:
        """One input encrypted (single layout) and the public context to send with it."""
        secret, public = self.keys()
        query = he.encrypt_inputs(
            secret, np.asarray(x, dtype=np.float64).reshape(1, -1), layout=he.Layout.SINGLE
        )
        return query.blobs, public

    def decrypt(self, blobs: tuple[bytes, ...], vector_len: int) -> npt.NDArray[np.float64]:
        secret, _ = self.keys()
        out = he.EncryptedOutput(
            layout=he.Layout.SINGLE, n_inputs=len(blobs), output_dim=vector_len, blobs=blobs
        )
        return he.decrypt_outputs(secret, out).ravel()

    # -- member -----------------------------------------------------------------------
    def load(self, querier: str, digest: str, data: bytes) -> bool:
        if self.contexts.get(querier, digest) is not None:
            return True
        try:
            ctx = he.load_public_context(data, require_galois=True)
        except FiPeerError as exc:
            log.warning("refused the HE context of %s: %s", querier[:8], exc)
            return False
        if ctx.digest != digest:
            return False
        self.contexts.put(querier, ctx)
        return True

    def _context(self, querier: str, digest: str) -> he.PublicContext:
        ctx = self.contexts.get(querier, digest)
        if ctx is None:
            raise ModelError("the querier's public context is no longer cached")
        return ctx

    def evaluate(self, effect: HEEvaluate) -> tuple[bytes, ...]:
        if self.model is None:
            raise ModelError("this peer serves no HE-ready model")
        ctx = self._context(effect.querier, effect.digest)
        query = he.EncryptedQuery(
            layout=he.Layout.SINGLE,
            n_inputs=len(effect.blobs),
            input_dim=self.model.input_dim,
            blobs=effect.blobs,
        )
        out = he.evaluate(ctx, self.model, query, noise_std=effect.noise_std, rng=self.rng)
        return out.blobs

    def combine(self, effect: HECombine) -> tuple[bytes, ...]:
        if self.model is None:
            raise ModelError("this peer serves no HE-ready model")
        ctx = self._context(effect.querier, effect.digest)
        outputs = [
            he.EncryptedOutput(
                layout=he.Layout.SINGLE,
                n_inputs=len(part),
                output_dim=self.model.output_dim,
                blobs=part,
            )
            for part in effect.parts
        ]
        return he.add_outputs(ctx, outputs).blobs


def run_he_effect(runtime: HERuntime | None, effect: HEEffect) -> Any:
    """Do the CKKS work of ``effect`` (blocking); None when it failed (logged).
    ``HESendChunks`` is I/O, not CKKS work: the driver sends those itself."""
    if isinstance(effect, HESendChunks):
        raise TypeError("HESendChunks is sent by the driver, not run here")
    if runtime is None:
        return False if isinstance(effect, HELoadContext) else None
    try:
        match effect:
            case HELoadContext(querier, digest, data):
                return runtime.load(querier, digest, data)
            case HEEvaluate():
                return runtime.evaluate(effect)
            case HECombine():
                return runtime.combine(effect)
            case HEDecrypt(_, blobs, vector_len):
                return runtime.decrypt(blobs, vector_len)
    except (FiPeerError, ValueError, RuntimeError, TypeError) as exc:
        log.warning("HE %s failed: %s", type(effect).__name__, exc)
        return False if isinstance(effect, HELoadContext) else None
    raise TypeError(f"not an HE effect: {effect!r}")  # pragma: no cover


def answer_he_effect(core: PeerCore, effect: HEEffect, result: Any, now_ms: int) -> list[Effect]:
    """Feed the outcome of :func:`run_he_effect` back into the core."""
    match effect:
        case HELoadContext(querier, digest, _):
            return core.he_context_loaded(querier, digest, bool(result), now_ms)
        case HEEvaluate():
            return core.he_evaluated(effect, result, now_ms)
        case HECombine():
            return core.he_combined(effect, result, now_ms)
        case HEDecrypt(query_id, _, _):
            return core.he_decrypted(query_id, result, now_ms)
        case HESendChunks():
            raise TypeError("HESendChunks has no answer")
    raise TypeError(f"not an HE effect: {effect!r}")  # pragma: no cover


HE_RULE = "support"
"""The rule of the HE mode: HE-ready models serve ``[n(y) f(y|x), n(y)]``."""


def runtime_for(model_path: Path | None, *, input_dim: int, vector_len: int) -> HERuntime:
    """A daemon's HE runtime: it serves the HE mode if ``<model>.he.npz`` exists and
    fits the owner's model card (input width, the support rule's vector length);
    it can always ask input-private queries (its key pair is made on first use)."""
    if model_path is None:
        return HERuntime(None)
    path = he_model_path(model_path)
    if not path.exists():
        return HERuntime(None)
    model = load_he_model(path)
    if model.input_dim != input_dim or model.output_dim != vector_len:
        raise ModelError(
            f"HE model {path} maps {model.input_dim} -> {model.output_dim}; the peer's card "
            f"needs {input_dim} -> {vector_len} (the {HE_RULE} rule's vector)"
        )
    log.info("serving the HE (input-private) mode with %s", path.name)
    return HERuntime(model)
