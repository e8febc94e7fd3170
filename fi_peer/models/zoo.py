"""Named architectures, deterministic training, and owner models.

An :class:`OwnerModel` is what an owner runs: its network *and* an evidence
head (notes/aggregation.md: on non-IID data a member must also say how much it
knows about inputs like x). The evidence head is the member's own training set
kept as registered buffers, from which it computes the bounded Parzen evidence

    E(x, y) = sum over own points j with label y of exp(-|x - x_j|^2 / 2h^2)

(each record adds at most 1, which bounds the DP sensitivity) and the class
counts n(y). Being one ``torch.nn.Module``, it saves, loads and exports to
TorchScript as one file. That file holds the owner's training data: it is
private and never leaves the owner (only noised, masked sums do).

Determinism: every random draw comes from a local ``torch.Generator`` seeded
from the arguments (never the global RNG), so the same seed gives identical
weights on the same machine and thread count. Thread counts are the caller's
business (``torch.set_num_threads``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fi_peer.errors import ModelError
from fi_peer.models.data import DigitsSplit, dirichlet_partition, load_digits_split

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCH",
    "DEFAULT_BANDWIDTH",
    "ArchSpec",
    "OwnerModel",
    "ProgressCallback",
    "build_network",
    "derive_seed",
    "get_arch",
    "make_owner_model",
    "train_classifier",
    "train_owner_model",
    "train_peer_models",
    "train_pooled",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""``on_progress(done, total)``: called after each training epoch."""

DEFAULT_ARCH = "mlp-64-128-10"
DEFAULT_BANDWIDTH = 1.25
"""Parzen kernel width h; evidence sums only make sense if all members share it."""


@dataclass(frozen=True, slots=True)
class ArchSpec:
    """A named fully connected ReLU network: ``dims`` = (input, hidden..., classes)."""

    name: str
    dims: tuple[int, ...]

    @property
    def input_dim(self) -> int:
        return self.dims[0]

    @property
    def n_classes(self) -> int:
        return self.dims[-1]

    def build(self, generator: torch.Generator | None = None) -> nn.Sequential:
        """A fresh network, initialised from ``generator`` (seed 0 if none).

        The initialisation is PyTorch's default for ``nn.Linear`` (uniform in
        +-1/sqrt(fan_in) for weights and biases), drawn from the generator.
        """
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        layers: list[nn.Module] = []
        pairs = list(zip(self.dims[:-1], self.dims[1:], strict=True))
        for i, (fan_in, fan_out) in enumerate(pairs):
            # skip_init: no draw from the global RNG; the generator initialises below.
            linear = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out)  # type: ignore[no-untyped-call, unused-ignore]
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                linear.weight.uniform_(-bound, bound, generator=gen)
                linear.bias.uniform_(-bound, bound, generator=gen)
            layers.append(linear)
            if i < len(pairs) - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def _spec(*dims: int) -> ArchSpec:
    prefix = "mlp" if len(dims) > 2 else "linear"
    return ArchSpec("-".join([prefix, *map(str, dims)]), dims)


ARCHITECTURES: Mapping[str, ArchSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _spec(64, 128, 10),  # the default digits member
            _spec(64, 32, 10),  # small and fast (tests, weak members)
            _spec(64, 256, 128, 10),
            _spec(64, 10),  # multinomial logistic regression
            _spec(392, 128, 10),  # the default member on "mnist" (392 features, data.py)
        )
    }
)


def get_arch(name: str) -> ArchSpec:
    """The registered architecture ``name``; :class:`ModelError` if unknown."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {name!r}; known: {known}") from None


def build_network(name: str, generator: torch.Generator | None = None) -> nn.Sequential:
    """Build the registered architecture ``name`` (see :meth:`ArchSpec.build`)."""
    return get_arch(name).build(generator)


class OwnerModel(nn.Module):
    """An owner's network plus its Parzen evidence head, as one module.

    ``forward(x)`` returns ``(probs, parzen)``: the (n, C) softmax of the
    network and the (n, C) Parzen evidence of the owner's training points.
    Buffers: ``support_x`` (N, d) float32, ``support_y`` (N,) int64,
    ``bandwidth`` () float32. N = 0 means "no evidence head" (a bare network).
    """

    # No class-level annotations: TorchScript cannot resolve the string
    # annotations of ``from __future__ import annotations`` and infers the
    # types of these attributes from their values instead.

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        bandwidth: float = DEFAULT_BANDWIDTH,
        task: str = "digits",
    ) -> None:
        super().__init__()
        spec = get_arch(arch)
        if support_x.ndim != 2 or support_x.shape[1] != spec.input_dim:
            raise ModelError(
                f"support_x must be (N, {spec.input_dim}), got {tuple(support_x.shape)}"
            )
        if support_y.shape != (support_x.shape[0],):
            raise ModelError("support_y must hold one label per row of support_x")
        if support_y.numel() and not (
            int(support_y.min()) >= 0 and int(support_y.max()) < spec.n_classes
        ):
            raise ModelError(f"support_y labels must lie in [0, {spec.n_classes})")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ModelError(f"bandwidth must be positive, got {bandwidth}")
        self.net = net
        self.arch = arch
        self.task = task
        self.input_dim = spec.input_dim
        self.n_classes = spec.n_classes
        self.register_buffer("support_x", support_x.detach().to(torch.float32).contiguous())
        self.register_buffer("support_y", support_y.detach().to(torch.int64).contiguous())
        self.register_buffer("bandwidth", torch.tensor(float(bandwidth), dtype=torch.float32))
        # Declarations for type checkers (nn.Module.__getattr__ is untyped).
        self.support_x: torch.Tensor
        self.support_y: torch.Tensor
        self.bandwidth: torch.Tensor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.net(x), dim=1)
        return probs, self.parzen_evidence(x)

    @torch.jit.export
    def parzen_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C): sum over own points of class y of exp(-|x - x_j|^2 / 2h^2)."""
        out = torch.zeros(x.shape[0], self.n_classes, dtype=x.dtype, device=x.device)
        if self.support_x.shape[0] == 0:
            return out
        dist = torch.cdist(x, self.support_x, compute_mode="donot_use_mm_for_euclid_dist")
        kernel = torch.exp(-(dist * dist) / (2.0 * self.bandwidth * self.bandwidth))
        return out.index_add_(1, self.support_y, kernel)

    @torch.jit.export
    def class_counts(self) -> torch.Tensor:
        """(C,) int64: the owner's number of training examples per class."""
        return torch.bincount(self.support_y, minlength=self.n_classes)


def _check_xy(
    X: npt.ArrayLike, y: npt.ArrayLike, spec: ArchSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    xa = np.asarray(X, dtype=np.float32)
    ya = np.asarray(y, dtype=np.int64)
    if xa.ndim != 2 or xa.shape[1] != spec.input_dim:
        raise ModelError(f"{spec.name} expects X of shape (n, {spec.input_dim}), got {xa.shape}")
    if ya.shape != (xa.shape[0],) or xa.shape[0] == 0:
        raise ModelError(f"need one label per row and at least one row, got {ya.shape}")
    if not np.all(np.isfinite(xa)):
        raise ModelError("X contains NaN or infinity")
    if ya.min() < 0 or ya.max() >= spec.n_classes:
        raise ModelError(f"labels must lie in [0, {spec.n_classes}) for {spec.name}")
    return torch.from_numpy(np.ascontiguousarray(xa)), torch.from_numpy(ya)


def train_classifier(
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    arch: str = DEFAULT_ARCH,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    seed: int,
    on_progress: ProgressCallback | None = None,
) -> nn.Sequential:
    """Train network ``arch`` on (X, y) with Adam and cross-entropy; eval mode out.

    Initialisation and per-epoch shuffling draw from one local generator
    seeded with ``seed``: same inputs and seed -> identical weights.
    """
    spec = get_arch(arch)
    xt, yt = _check_xy(X, y, spec)
    if epochs < 0 or batch_size < 1:
        raise ValueError("epochs must be >= 0 and batch_size >= 1")
    gen = torch.Generator().manual_seed(seed)
    net = spec.build(gen)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    n = xt.shape[0]
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
        if on_progress is not None:
            on_progress(epoch + 1, epochs)
    net.eval()
    logger.debug("trained %s on %d examples for %d epochs (seed %d)", arch, n, epochs, seed)
    return net


def make_owner_model(
    net: nn.Module,
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    arch: str = DEFAULT_ARCH,
    bandwidth: float = DEFAULT_BANDWIDTH,
    task: str = "digits",
) -> OwnerModel:
    """Wrap a trained network with the evidence head of its training set (X, y)."""
    xt, yt = _check_xy(X, y, get_arch(arch))
    return OwnerModel(
        net, arch=arch, support_x=xt.clone(), support_y=yt.clone(), bandwidth=bandwidth, task=task
    ).eval()


def train_owner_model(
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    arch: str = DEFAULT_ARCH,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    bandwidth: float = DEFAULT_BANDWIDTH,
    seed: int,
    on_progress: ProgressCallback | None = None,
) -> OwnerModel:
    """:func:`train_classifier` then :func:`make_owner_model` on the same data."""
    net = train_classifier(
        X,
        y,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        on_progress=on_progress,
    )
    return make_owner_model(net, X, y, arch=arch, bandwidth=bandwidth)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for sub-task ``keys`` of run ``seed`` (independent streams)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


_PARTITION_KEY = 0
_PEER_KEY = 1
_POOLED_KEY = 2


def peer_partition(
    n_peers: int, alpha: float, seed: int, split: DigitsSplit | None = None, min_size: int = 10
) -> tuple[DigitsSplit, list[npt.NDArray[np.int64]]]:
    """The data and each peer's training indices for run ``seed``: every model
    family trained from the same seed (plain, HE-ready) sees the same partition."""
    data = split if split is not None else load_digits_split()
    rng = np.random.default_rng(derive_seed(seed, _PARTITION_KEY))
    return data, dirichlet_partition(data.y_train, n_peers, alpha, rng, min_size=min_size)


def peer_seed(seed: int, peer: int) -> int:
    """The training seed of peer number ``peer`` in run ``seed``."""
    return derive_seed(seed, _PEER_KEY, peer)


def pooled_seed(seed: int) -> int:
    """The training seed of run ``seed``'s pooled-data model."""
    return derive_seed(seed, _POOLED_KEY)


def train_peer_models(
    n_peers: int,
    alpha: float,
    seed: int,
    *,
    split: DigitsSplit | None = None,
    arch: str = DEFAULT_ARCH,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    bandwidth: float = DEFAULT_BANDWIDTH,
    min_size: int = 10,
    on_progress: ProgressCallback | None = None,
) -> list[OwnerModel]:
    """Partition ``split``'s training set Dirichlet(alpha)-wise over ``n_peers``
    peers and train one owner model per peer on its own part only.

    Everything derives from ``seed``: the partition (numpy generator) and each
    peer's training (its own torch generator). ``on_progress(done, total)``
    counts epochs over all peers (total = n_peers * epochs).
    """
    data, parts = peer_partition(n_peers, alpha, seed, split, min_size)
    total = n_peers * epochs
    models: list[OwnerModel] = []
    for i, idx in enumerate(parts):

        def peer_progress(done: int, _total: int, offset: int = i * epochs) -> None:
            if on_progress is not None:
                on_progress(offset + done, total)

        models.append(
            train_owner_model(
                data.X_train[idx],
                data.y_train[idx],
                arch=arch,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                bandwidth=bandwidth,
                seed=peer_seed(seed, i),
                on_progress=peer_progress,
            )
        )
        logger.info("peer %d/%d trained on %d examples", i + 1, n_peers, idx.size)
    return models


def train_pooled(
    seed: int,
    *,
    split: DigitsSplit | None = None,
    arch: str = DEFAULT_ARCH,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    bandwidth: float = DEFAULT_BANDWIDTH,
    on_progress: ProgressCallback | None = None,
) -> OwnerModel:
    """The oracle: one owner model trained on the whole training set."""
    data = split if split is not None else load_digits_split()
    return train_owner_model(
        data.X_train,
        data.y_train,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        bandwidth=bandwidth,
        seed=pooled_seed(seed),
        on_progress=on_progress,
    )
