"""The CKKS work of the HE query mode, for a driver of PeerCore (the agent, tests).

The protocol core moves opaque ciphertexts and asks for the TenSEAL work with
the effects of :mod:`fi_peer.protocol.he_effects`; :class:`HERuntime` does it
(:func:`run_he_effect`, blocking: call it off the event loop) and
:func:`answer_he_effect` hands the result back to the core.

- As a querier: one CKKS key pair per runtime, created on first use (with
  Galois keys for the nine rotation steps the single layout uses; ~0.2 s of CPU
  in the worker thread of the first input-private query, and the public context
  is ~12 MB, sent once per member and cached there). The secret key never leaves
  this object.
- As a member: the served HE-ready models, by rule: ``support`` (the network
  :class:`~fi_peer.privacy.he.HEModel` serving ``[n(y) f(y|x), n(y)]``, no
  bounded sensitivity: DP refused by owners with finite budgets) and
  ``evidence`` (:class:`~fi_peer.privacy.he.KernelEvidenceModel`, the
  polynomial-kernel evidence: L2 sensitivity 1 per record, so it is priced and
  charged by the budget ledger exactly as the default mode's ``evidence``
  rule); other rule names use the network (tests). And the queriers' public
  contexts, loaded (a context holding a secret key is refused) and kept per
  (querier, digest) in a small LRU cache.

HE-ready models on disk: ``save_he_model`` / ``load_he_model`` (an ``.npz``
with the layers' weights and biases; :func:`he_model_path` is where a daemon
looks: next to its model file, ``<model>.he.npz``) and ``save_kernel_model`` /
``load_kernel_model`` (``<model>.he-kernel.npz``: the per-class second
moments and the public feature map, :func:`kernel_model_path`).
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
KERNEL_SUFFIX = ".he-kernel.npz"
HE_KERNEL_RULE = "evidence"
"""The rule whose HE vector is the kernel evidence (bounded sensitivity, DP allowed)."""


def he_model_path(model_path: Path) -> Path:
    """Where the HE-ready model of an owner's model file lives (may not exist)."""
    return model_path.with_name(model_path.name + HE_SUFFIX)


def kernel_model_path(model_path: Path) -> Path:
    """Where the kernel evidence of an owner's model file lives (may not exist)."""
    return model_path.with_name(model_path.name + KERNEL_SUFFIX)


def save_kernel_model(path: Path, model: he.KernelEvidenceModel) -> None:
    fmap = model.feature_map
    with path.open("wb") as fh:
        np.savez(
            fh,
            moments=model.moments,
            keep=np.asarray(fmap.keep, dtype=np.int64),
            params=np.asarray([fmap.input_dim, fmap.centre, fmap.bias], dtype=np.float64),
        )


def load_kernel_model(path: Path) -> he.KernelEvidenceModel:
    """A kernel evidence saved by :func:`save_kernel_model` (ModelError if unusable,
    or if its feature map is not the task's public one: the querier encrypts with
    :func:`fi_peer.privacy.he.kernel_feature_map`)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            moments, keep, params = data["moments"], data["keep"], data["params"]
            input_dim, centre, bias = int(params[0]), float(params[1]), float(params[2])
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise ModelError(f"cannot load the kernel evidence {path}: {exc}") from exc
    fmap = he.KernelFeatureMap(input_dim, tuple(int(i) for i in keep), centre, bias)
    if fmap != he.kernel_feature_map(input_dim):
        raise ModelError(f"kernel evidence {path}: its feature map is not the task's public one")
    return he.KernelEvidenceModel(fmap, moments)


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
        kernel: he.KernelEvidenceModel | None = None,
        rng: np.random.Generator | None = None,
        max_contexts: int = 4,
        secret: he.SecretContext | None = None,
    ) -> None:
        self.model = model
        self.kernel = kernel
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
        return self.model is not None or self.kernel is not None

    @property
    def rules(self) -> tuple[str, ...]:
        """The HE-mode rules (:data:`HE_RULES`) this peer serves."""
        served = {HE_KERNEL_RULE: self.kernel is not None, HE_RULE: self.model is not None}
        return tuple(rule for rule in HE_RULES if served[rule])

    def served(self, rule: str) -> he.HEModel | he.KernelEvidenceModel:
        """The model answering ``rule`` (ModelError if this peer does not serve it)."""
        model = self.kernel if rule == HE_KERNEL_RULE else self.model
        if model is None:
            raise ModelError(f"this peer serves no HE-ready model for the {rule!r} rule")
        return model

    # -- querier --------------------------------------------------------------------
    def keys(self) -> tuple[he.SecretContext, bytes]:
        """This peer's CKKS key pair (created on first use) and its public context."""
        with self._lock:
            if self._secret is None:
                self._secret = he.create_secret_context(galois_keys=True)
            if self._public is None:
                self._public = self._secret.public_bytes(galois_keys=True)
            return self._secret, self._public

    def encrypt(self, x: npt.ArrayLike, rule: str = "support") -> tuple[tuple[bytes, ...], bytes]:
        """One input encrypted (single layout) and the public context to send with it.
        For the ``evidence`` rule: the outer product u(x) u(x)^T of the task's public
        kernel feature map (the querier squares in the clear)."""
        secret, public = self.keys()
        row = np.asarray(x, dtype=np.float64).reshape(1, -1)
        if rule == HE_KERNEL_RULE:
            query = he.encrypt_kernel_inputs(secret, row, he.kernel_feature_map(row.shape[1]))
        else:
            query = he.encrypt_inputs(secret, row, layout=he.Layout.SINGLE)
        return query.blobs, public

    def encrypt_batch(self, X: npt.ArrayLike) -> tuple[tuple[bytes, ...], bytes]:
        """Many inputs (rows) in one batched-layout tensor (the network vector only:
        the kernel evidence is single-layout) and the public context."""
        secret, public = self.keys()
        rows = np.asarray(X, dtype=np.float64)
        query = he.encrypt_inputs(secret, rows, layout=he.Layout.BATCHED)
        return query.blobs, public

    def decrypt(
        self, blobs: tuple[bytes, ...], vector_len: int, layout: str = "single", n_inputs: int = 0
    ) -> npt.NDArray[np.float64]:
        secret, _ = self.keys()
        batched = layout == he.Layout.BATCHED
        out = he.EncryptedOutput(
            layout=he.Layout.BATCHED if batched else he.Layout.SINGLE,
            n_inputs=n_inputs if batched else len(blobs),
            output_dim=vector_len,
            blobs=blobs,
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
        model = self.served(effect.rule)
        ctx = self._context(effect.querier, effect.digest)
        batched = effect.layout == he.Layout.BATCHED
        query = he.EncryptedQuery(
            layout=he.Layout.BATCHED if batched else he.Layout.SINGLE,
            n_inputs=effect.n_inputs if batched else len(effect.blobs),
            input_dim=model.input_dim,
            blobs=effect.blobs,
        )
        out = he.evaluate(ctx, model, query, noise_std=effect.noise_std, rng=self.rng)
        return out.blobs

    def combine(self, effect: HECombine) -> tuple[bytes, ...]:
        if not self.serves:
            raise ModelError("this peer serves no HE-ready model")
        ctx = self._context(effect.querier, effect.digest)
        if effect.layout == he.Layout.BATCHED:  # one [1, vector_len] tensor per part
            batched = [
                he.EncryptedOutput(
                    layout=he.Layout.BATCHED,
                    n_inputs=effect.n_inputs,
                    output_dim=effect.output_dim,
                    blobs=part,
                )
                for part in effect.parts
            ]
            return he.add_outputs(ctx, batched).blobs
        # Both served vectors are single-layout ciphertexts of 4,096 slots: the sum
        # does not depend on the width (checked by the querier at decryption).
        outputs = [
            he.EncryptedOutput(
                layout=he.Layout.SINGLE,
                n_inputs=len(part),
                output_dim=1,
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
            case HEDecrypt(_, blobs, vector_len, layout, n_inputs):
                return runtime.decrypt(blobs, vector_len, layout, n_inputs)
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
        case HEDecrypt(query_id, _, _, _, _):
            return core.he_decrypted(query_id, result, now_ms)
        case HESendChunks():
            raise TypeError("HESendChunks has no answer")
    raise TypeError(f"not an HE effect: {effect!r}")  # pragma: no cover


HE_RULE = "support"
"""The HE mode's network rule: HE-ready networks serve ``[n(y) f(y|x), n(y)]``."""
HE_RULES = (HE_KERNEL_RULE, HE_RULE)
"""Rules an input-private query may use; the first (bounded sensitivity) is the default."""


def runtime_for(
    model_path: Path | None, *, input_dim: int, vector_len: int, n_classes: int | None = None
) -> HERuntime:
    """A daemon's HE runtime: it serves the HE mode's ``support`` rule if
    ``<model>.he.npz`` exists and fits the owner's model card (input width, the
    support rule's vector length), the ``evidence`` rule if ``<model>.he-kernel.npz``
    exists (``n_classes`` outputs); it can always ask input-private queries (its key
    pair is made on first use)."""
    if model_path is None:
        return HERuntime(None)
    model: he.HEModel | None = None
    kernel: he.KernelEvidenceModel | None = None
    path = he_model_path(model_path)
    if path.exists():
        model = load_he_model(path)
        if model.input_dim != input_dim or model.output_dim != vector_len:
            raise ModelError(
                f"HE model {path} maps {model.input_dim} -> {model.output_dim}; the peer's card "
                f"needs {input_dim} -> {vector_len} (the {HE_RULE} rule's vector)"
            )
        log.info("serving the HE (input-private) support rule with %s", path.name)
    kpath = kernel_model_path(model_path)
    if kpath.exists():
        kernel = load_kernel_model(kpath)
        if kernel.input_dim != input_dim or (
            n_classes is not None and kernel.output_dim != n_classes
        ):
            raise ModelError(
                f"kernel evidence {kpath} maps {kernel.input_dim} -> {kernel.output_dim}; "
                f"the peer's card needs {input_dim} -> {n_classes}"
            )
        log.info("serving the HE (input-private) evidence rule with %s", kpath.name)
    return HERuntime(model, kernel=kernel)
