"""HE-ready owner models: linear -> square -> linear, trained like the zoo's, exported to numpy.

CKKS evaluates polynomials only, and the parameters of
:mod:`fi_peer.privacy.he` allow three multiplications in depth, so an
HE-served network is ``Linear -> x*x -> Linear`` (or one ``Linear``). The
default is 64-32-10 on digits. It is trained with a squared error against the
one-hot label (``loss="mse"``): its outputs then estimate p(y|x) without a
softmax, which the ``support`` aggregation needs (each member sends
``[n(y) f(y|x), n(y)]``, see :func:`fi_peer.privacy.he.support_model`).
``loss="ce"`` trains on cross-entropy (logits), for comparison.

Determinism as in :mod:`fi_peer.models.zoo`: all draws come from a local
``torch.Generator`` seeded from the arguments, and the per-peer partition is
the zoo's (same seed keys), so HE peers and default peers of one seed hold the
same data.

Recipe for an owner exporting its own model
-------------------------------------------
1. Build ``nn.Sequential(nn.Linear(d, h), Square(), nn.Linear(h, C))`` with
   d <= 128 inputs (reduce wider inputs first, e.g. PCA) and h <= 128.
2. Train it on your data (any optimiser; :func:`train_he_network` is one way).
   Keep inputs in the range you trained on: a square network grows
   quadratically outside it.
3. ``model = export_he_model(net)`` gives numpy weights
   (:class:`~fi_peer.privacy.he.HEModel`); ``export_he_model`` refuses ReLU or
   other activations, deeper stacks and oversized layers with a ModelError.
4. ``answer = support_model(model, class_counts)`` is what you serve; check
   ``answer.forward(X)`` against your torch outputs on a few inputs.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fi_peer.errors import ModelError
from fi_peer.models.data import DigitsSplit, load_digits_split
from fi_peer.models.zoo import ProgressCallback, peer_partition, peer_seed, pooled_seed
from fi_peer.privacy.he import (
    HEModel,
    KernelEvidenceModel,
    LinearLayer,
    build_he_model,
    kernel_evidence_model,
    support_model,
)

__all__ = [
    "HE_DIMS",
    "HEPeer",
    "Square",
    "build_he_network",
    "ensure_he_models",
    "export_he_model",
    "train_he_kernel_peer_models",
    "train_he_network",
    "train_he_peer_models",
    "train_he_pooled",
]

logger = logging.getLogger(__name__)

HE_DIMS = (64, 32, 10)
Loss = Literal["mse", "ce"]


class Square(nn.Module):
    """The activation x -> x * x (a polynomial: CKKS can evaluate it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def build_he_network(
    dims: Sequence[int] = HE_DIMS, generator: torch.Generator | None = None
) -> nn.Sequential:
    """``Linear -> Square -> Linear`` (or one Linear for two dims), zoo initialisation."""
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise ModelError(f"HE networks have dims (in, out) or (in, hidden, out), got {dims}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    pairs = list(itertools.pairwise(dims))
    for i, (fan_in, fan_out) in enumerate(pairs):
        linear = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out)  # type: ignore[no-untyped-call, unused-ignore]
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=gen)
            linear.bias.uniform_(-bound, bound, generator=gen)
        layers.append(linear)
        if i < len(pairs) - 1:
            layers.append(Square())
    return nn.Sequential(*layers)


def export_he_model(net: nn.Module) -> HEModel:
    """Numpy weights of a ``Linear [-> Square -> Linear]`` network, validated for CKKS.

    ModelError for any other module (ReLU, Dropout, BatchNorm, ...), depth or size.
    """
    modules = list(net.children()) if isinstance(net, nn.Sequential) else [net]
    items: list[LinearLayer | str] = []
    for module in modules:
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().double().numpy().T
            bias = (
                module.bias.detach().double().numpy()
                if module.bias is not None
                else np.zeros(module.out_features)
            )
            items.append(LinearLayer(weight.copy(), bias.copy()))
        elif isinstance(module, Square):
            items.append("square")
        else:
            items.append(type(module).__name__.lower())
    return build_he_model(items)


def _tensors(X: npt.ArrayLike, y: npt.ArrayLike, dims: Sequence[int]) -> tuple[torch.Tensor, ...]:
    xa = np.asarray(X, dtype=np.float32)
    ya = np.asarray(y, dtype=np.int64)
    if xa.ndim != 2 or xa.shape[1] != dims[0] or ya.shape != (xa.shape[0],) or not len(ya):
        raise ModelError(f"need X (n, {dims[0]}) and one label per row, got {xa.shape}, {ya.shape}")
    if not np.all(np.isfinite(xa)) or ya.min() < 0 or ya.max() >= dims[-1]:
        raise ModelError("X must be finite and labels in range")
    return torch.from_numpy(np.ascontiguousarray(xa)), torch.from_numpy(ya)


def train_he_network(
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    dims: Sequence[int] = HE_DIMS,
    loss: Loss = "mse",
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    seed: int,
    on_progress: ProgressCallback | None = None,
) -> nn.Sequential:
    """Train an HE network with Adam (zoo defaults); eval mode out, deterministic by seed."""
    xt, yt = _tensors(X, y, dims)
    if epochs < 0 or batch_size < 1 or loss not in ("mse", "ce"):
        raise ValueError("epochs >= 0, batch_size >= 1, loss 'mse' or 'ce'")
    gen = torch.Generator().manual_seed(seed)
    net = build_he_network(dims, gen)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    n_classes = dims[-1]
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(xt.shape[0], generator=gen)
        for start in range(0, xt.shape[0], batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            out = net(xt[idx])
            if loss == "ce":
                value = nn.functional.cross_entropy(out, yt[idx])
            else:
                target = nn.functional.one_hot(yt[idx], n_classes).to(out.dtype)
                value = ((out - target) ** 2).sum(dim=1).mean()
            value.backward()
            optimizer.step()
        if on_progress is not None:
            on_progress(epoch + 1, epochs)
    net.eval()
    return net


@dataclass(frozen=True, slots=True)
class HEPeer:
    """One owner's HE-ready model and what it serves in the HE query mode."""

    model: HEModel
    class_counts: npt.NDArray[np.float64]
    indices: npt.NDArray[np.int64]

    @property
    def answer_model(self) -> HEModel:
        """The served model: ``[n(y) f(y|x), n(y)]`` (the ``support`` rule's vector)."""
        return support_model(self.model, self.class_counts)


def train_he_peer_models(
    n_peers: int,
    alpha: float,
    seed: int,
    *,
    split: DigitsSplit | None = None,
    dims: Sequence[int] = HE_DIMS,
    loss: Loss = "mse",
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    min_size: int = 10,
) -> list[HEPeer]:
    """Dirichlet(alpha) partition (the zoo's, same seed) and one HE network per peer."""
    data, parts = peer_partition(n_peers, alpha, seed, split, min_size)
    n_classes = dims[-1]
    peers: list[HEPeer] = []
    for i, idx in enumerate(parts):
        net = train_he_network(
            data.X_train[idx],
            data.y_train[idx],
            dims=dims,
            loss=loss,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=peer_seed(seed, i),
        )
        counts = np.bincount(data.y_train[idx], minlength=n_classes).astype(np.float64)
        peers.append(HEPeer(export_he_model(net), counts, idx))
        logger.info("HE peer %d/%d trained on %d examples", i + 1, n_peers, idx.size)
    return peers


def train_he_pooled(
    seed: int,
    *,
    split: DigitsSplit | None = None,
    dims: Sequence[int] = HE_DIMS,
    loss: Loss = "mse",
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
) -> HEModel:
    """One HE network on the whole training set (the oracle)."""
    data = split if split is not None else load_digits_split()
    net = train_he_network(
        data.X_train,
        data.y_train,
        dims=dims,
        loss=loss,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=pooled_seed(seed),
    )
    return export_he_model(net)


def ensure_he_models(
    model_paths: Sequence[Path], alpha: float, seed: int, *, epochs: int = 50
) -> list[Path]:
    """The HE-ready model of each owner model file of the zoo (same ``alpha`` and
    ``seed``, hence the same Dirichlet partition), written next to it as
    ``<model>.he.npz`` (what a daemon serves in the HE mode). Trained only if
    missing. The file holds the served support model ``[n(y) f(y|x), n(y)]``;
    next to it ``<model>.he-kernel.npz``, the owner's kernel evidence (the
    ``evidence`` rule of the HE mode, the one served under DP)."""
    from fi_peer.he_runtime import (
        he_model_path,
        kernel_model_path,
        save_he_model,
        save_kernel_model,
    )

    out = [he_model_path(Path(p)) for p in model_paths]
    kernels = [kernel_model_path(Path(p)) for p in model_paths]
    if not all(p.is_file() for p in kernels):
        for path, kernel in zip(
            kernels, train_he_kernel_peer_models(len(out), alpha, seed), strict=True
        ):
            save_kernel_model(path, kernel)
    if all(p.is_file() for p in out):
        return out
    peers = train_he_peer_models(len(out), alpha, seed, epochs=epochs)
    for path, peer in zip(out, peers, strict=True):
        save_he_model(path, peer.answer_model)
    return out


def train_he_kernel_peer_models(
    n_peers: int,
    alpha: float,
    seed: int,
    *,
    split: DigitsSplit | None = None,
    n_classes: int = HE_DIMS[-1],
    min_size: int = 10,
) -> list[KernelEvidenceModel]:
    """Each peer's kernel evidence (:func:`fi_peer.privacy.he.kernel_evidence_model`)
    on the zoo's Dirichlet(alpha) partition of run ``seed``: no training, the
    per-class second moments of the peer's own points. Bounded per-record
    sensitivity (1 add/remove, sqrt 2 replace-one): what a member with a finite
    DP budget serves in the input-private mode."""
    data, parts = peer_partition(n_peers, alpha, seed, split, min_size)
    return [kernel_evidence_model(data.X_train[idx], data.y_train[idx], n_classes) for idx in parts]
