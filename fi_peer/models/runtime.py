"""Load an owner's model, validate it, describe it, and run it on CPU.

Two file formats, told apart by their content (both are zip archives):

* **state_dict** (:func:`save_owner_model`): ``torch.save`` of
  ``{"format": "fi-peer/owner-model", "version": 1, "arch", "task",
  "state_dict"}``, loaded with ``weights_only=True`` (no code runs) and rebuilt
  from the named architecture in :mod:`fi_peer.models.zoo`. A bare state_dict
  of a zoo network is accepted too, given ``arch=``; it has no evidence head, so
  only the rules that do not need one are offered.
* **TorchScript** (:func:`export_torchscript`): the scripted
  :class:`~fi_peer.models.zoo.OwnerModel`; loading it runs its graph, so load
  only your own files. torch 2.13 deprecates ``torch.jit`` (it still works;
  its DeprecationWarnings are silenced here); ``torch.export`` is the likely
  successor format.

The model hash is the sha256 of the exact bytes loaded (read once, then parsed
from memory). Everything torch raises while loading or running is translated
into :class:`~fi_peer.errors.ModelError` (``raise ... from exc``); so are bad
shapes, unknown architectures, NaN inputs and unknown or unsupported rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fi_peer.errors import ModelError
from fi_peer.models.aggregation import RULES, Evidence, get_rule
from fi_peer.models.zoo import OwnerModel, build_network, get_arch

__all__ = [
    "FILE_FORMAT",
    "ModelCard",
    "ModelRuntime",
    "export_torchscript",
    "save_owner_model",
]

logger = logging.getLogger(__name__)

FILE_FORMAT = "fi-peer/owner-model"
FILE_VERSION = 1

Array = npt.NDArray[np.float64]
StrPath = str | os.PathLike[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCard:
    """What a loaded model does; the daemon copies it into its announcements."""

    task: str
    n_classes: int
    input_dim: int
    arch: str
    sha256: str
    """Hex sha256 of the model file's bytes."""
    format: str
    """``"state_dict"`` or ``"torchscript"``."""
    rules: tuple[str, ...]
    """Aggregation rules this model can answer (evidence rules need the head)."""
    bandwidth: float | None
    """Parzen kernel width h of the evidence head (None without one)."""

    @property
    def digest(self) -> bytes:
        """The model hash as 32 raw bytes."""
        return bytes.fromhex(self.sha256)


def _serialize_state_dict(model: OwnerModel) -> bytes:
    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "arch": model.arch,
        "task": model.task,
        "state_dict": model.state_dict(),
    }
    buf = io.BytesIO()  # in memory: the archive name, hence the hash, is path-free
    torch.save(payload, buf)
    return buf.getvalue()


@contextlib.contextmanager
def _torchscript_deprecation_silenced() -> Iterator[None]:
    # torch 2.13 deprecates torch.jit.{script,save,load} in favour of torch.export;
    # they still work, and this format is offered on purpose (see module docs).
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        yield


def _serialize_torchscript(model: OwnerModel) -> bytes:
    buf = io.BytesIO()
    try:
        with _torchscript_deprecation_silenced():
            torch.jit.save(torch.jit.script(model), buf)
    except Exception as exc:
        raise ModelError(f"cannot export {model.arch} to TorchScript: {exc}") from exc
    return buf.getvalue()


def _write_private(path: StrPath, data: bytes) -> str:
    """Write atomically, mode 0600 (the file holds training data); return sha256."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ModelError(f"cannot write model file {target}: {exc}") from exc
    return hashlib.sha256(data).hexdigest()


def save_owner_model(model: OwnerModel, path: StrPath) -> str:
    """Save ``model`` as a state_dict file with its arch metadata; return its sha256."""
    return _write_private(path, _serialize_state_dict(model))


def export_torchscript(model: OwnerModel, path: StrPath) -> str:
    """Save ``model`` as a TorchScript file; return its sha256."""
    return _write_private(path, _serialize_torchscript(model))


def _is_torchscript(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any("/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _tensor_map(obj: object, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelError(f"{what} is not a state_dict (a mapping of names to tensors)")
    return dict(obj)


def _load_state_dict_model(data: bytes, arch: str | None) -> OwnerModel:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"not a readable model file: {exc}") from exc
    if isinstance(obj, Mapping) and obj.get("format") == FILE_FORMAT:
        if obj.get("version") != FILE_VERSION:
            raise ModelError(f"unsupported model file version {obj.get('version')!r}")
        file_arch, task = obj.get("arch"), obj.get("task")
        if not isinstance(file_arch, str) or not isinstance(task, str):
            raise ModelError("model file metadata lacks arch/task")
        if arch is not None and arch != file_arch:
            raise ModelError(f"model file holds arch {file_arch!r}, expected {arch!r}")
        state = _tensor_map(obj.get("state_dict"), "model file state_dict")
        support_x, support_y = state.get("support_x"), state.get("support_y")
        if support_x is None or support_y is None:
            raise ModelError("model file lacks the evidence head buffers")
        model = OwnerModel(
            build_network(file_arch),
            arch=file_arch,
            support_x=torch.empty_like(support_x),
            support_y=torch.zeros_like(support_y),
            task=task,
        )
    else:
        # A bare network state_dict: the caller names the architecture.
        state = _tensor_map(obj, "model file")
        if arch is None:
            raise ModelError("a bare state_dict file needs arch= (a zoo architecture name)")
        spec = get_arch(arch)
        model = OwnerModel(
            build_network(arch),
            arch=arch,
            support_x=torch.empty(0, spec.input_dim),
            support_y=torch.empty(0, dtype=torch.int64),
        )
        state = {f"net.{k}": v for k, v in state.items()}
        state.update({k: v for k, v in model.state_dict().items() if not k.startswith("net.")})
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"weights do not fit architecture {model.arch!r}: {exc}") from exc
    return model.eval()


def _load_torchscript_model(data: bytes, arch: str | None) -> torch.jit.ScriptModule:
    try:
        with _torchscript_deprecation_silenced():
            loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call, unused-ignore]
        module = cast(torch.jit.ScriptModule, loaded)
    except Exception as exc:
        raise ModelError(f"not a readable TorchScript file: {exc}") from exc
    file_arch = getattr(module, "arch", None)
    if arch is not None and file_arch != arch:
        raise ModelError(f"TorchScript model holds arch {file_arch!r}, expected {arch!r}")
    module.eval()
    return module


def _attr(module: nn.Module, name: str, kind: type[Any]) -> Any:
    value = getattr(module, name, None)
    if not isinstance(value, kind):
        raise ModelError(f"not an fi-peer owner model: missing {name!r} ({kind.__name__})")
    return value


class ModelRuntime:
    """A validated owner model, ready for batched CPU inference.

    Build with :meth:`load` (from a file) or :meth:`from_module` (in memory).
    Inputs are (n, input_dim) arrays of finite reals; outputs are float64.
    """

    def __init__(self, module: nn.Module, *, fmt: str, sha256: str, batch_size: int = 1024):
        """Validate ``module`` (an OwnerModel or its TorchScript); prefer the factories."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._module = module
        self._batch_size = batch_size
        arch = _attr(module, "arch", str)
        task = _attr(module, "task", str)
        input_dim = _attr(module, "input_dim", int)
        n_classes = _attr(module, "n_classes", int)
        support_x = _attr(module, "support_x", torch.Tensor)
        support_y = _attr(module, "support_y", torch.Tensor)
        bandwidth_t = _attr(module, "bandwidth", torch.Tensor)
        if bandwidth_t.numel() != 1:
            raise ModelError("evidence head bandwidth must be a scalar")
        bandwidth = float(bandwidth_t)
        spec = get_arch(arch)
        if (input_dim, n_classes) != (spec.input_dim, spec.n_classes):
            raise ModelError(f"model claims {input_dim}->{n_classes}, {arch} is not that")
        n_support = int(support_x.shape[0])
        if (
            support_x.shape != (n_support, input_dim)
            or support_y.shape != (n_support,)
            or support_x.dtype != torch.float32
            or support_y.dtype != torch.int64
        ):
            raise ModelError("evidence head buffers have inconsistent shapes or dtypes")
        if n_support and not (int(support_y.min()) >= 0 and int(support_y.max()) < n_classes):
            raise ModelError("evidence head holds labels outside the model's classes")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ModelError(f"evidence head bandwidth must be positive, got {bandwidth}")
        if n_support and not bool(torch.isfinite(support_x).all()):
            raise ModelError("evidence head holds non-finite points")
        self._counts = np.bincount(support_y.numpy(), minlength=n_classes).astype(np.float64)
        has_evidence = n_support > 0
        rules = tuple(name for name, r in RULES.items() if has_evidence or not r.needs_evidence)
        self.card = ModelCard(
            task=task,
            n_classes=n_classes,
            input_dim=input_dim,
            arch=arch,
            sha256=sha256,
            format=fmt,
            rules=rules,
            bandwidth=bandwidth if has_evidence else None,
        )
        self._forward(np.zeros((1, input_dim), dtype=np.float32))  # probe: shapes, finiteness

    @classmethod
    def load(
        cls,
        path: StrPath,
        *,
        arch: str | None = None,
        input_dim: int | None = None,
        n_classes: int | None = None,
        expected_sha256: str | None = None,
        batch_size: int = 1024,
    ) -> ModelRuntime:
        """Load a state_dict or TorchScript model file (format detected from content).

        ``arch``, ``input_dim``, ``n_classes`` and ``expected_sha256`` (hex), when
        given, must match the file (ModelError otherwise); ``arch`` is required
        for a bare state_dict. Pinning the hash is the only way to notice
        corrupted weights that still parse.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model file {path}: {exc}") from exc
        sha256 = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256.lower():
            raise ModelError(f"model file sha256 is {sha256}, expected {expected_sha256}")
        module: nn.Module
        if _is_torchscript(data):
            module, fmt = _load_torchscript_model(data, arch), "torchscript"
        else:
            module, fmt = _load_state_dict_model(data, arch), "state_dict"
        runtime = cls(module, fmt=fmt, sha256=sha256, batch_size=batch_size)
        card = runtime.card
        if input_dim is not None and card.input_dim != input_dim:
            raise ModelError(f"model input width is {card.input_dim}, expected {input_dim}")
        if n_classes is not None and card.n_classes != n_classes:
            raise ModelError(f"model has {card.n_classes} classes, expected {n_classes}")
        logger.info("loaded %s model %s (%s)", fmt, card.arch, sha256[:12])
        return runtime

    @classmethod
    def from_module(cls, model: OwnerModel, *, batch_size: int = 1024) -> ModelRuntime:
        """Wrap an in-memory owner model; its hash is that of :func:`save_owner_model`."""
        sha256 = hashlib.sha256(_serialize_state_dict(model)).hexdigest()
        return cls(model.eval(), fmt="state_dict", sha256=sha256, batch_size=batch_size)

    @property
    def class_counts(self) -> Array:
        """(C,) the owner's training examples per class (zeros without evidence head)."""
        return self._counts.copy()

    def vector_length(self, rule: str) -> int:
        """Length of the vector this model sends for ``rule``."""
        try:
            return get_rule(rule).vector_length(self.card.n_classes)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc

    def supports(self, rule: str) -> bool:
        return rule in self.card.rules

    def predict_proba(self, X: npt.ArrayLike) -> Array:
        """(n, input_dim) inputs -> (n, C) class probabilities of the network."""
        return self._forward(X)[0]

    def parzen_evidence(self, X: npt.ArrayLike) -> Array:
        """(n, input_dim) inputs -> (n, C) bounded Parzen evidence per class."""
        return self._forward(X)[1]

    def contribution(self, X: npt.ArrayLike, rule: str) -> Array:
        """(n, input_dim) inputs -> (n, L): what this member sends for ``rule``."""
        try:
            agg = get_rule(rule)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc
        if not self.supports(agg.name):
            raise ModelError(f"rule {agg.name!r} needs an evidence head; this model has none")
        probs, parzen = self._forward(X)
        evidence = Evidence(parzen=parzen, class_counts=self._counts)
        try:
            return agg.member_vector(probs, evidence)
        except ValueError as exc:
            raise ModelError(f"cannot build the {agg.name!r} vector: {exc}") from exc

    def _check_input(self, X: npt.ArrayLike) -> torch.Tensor:
        try:
            arr = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"input is not a numeric array: {exc}") from exc
        width = self.card.input_dim
        if arr.ndim != 2 or arr.shape[1] != width:
            raise ModelError(f"input must have shape (n, {width}), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ModelError("input contains NaN or infinity")
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _forward(self, X: npt.ArrayLike) -> tuple[Array, Array]:
        x = self._check_input(X)
        n_classes = self.card.n_classes
        probs: list[torch.Tensor] = []
        parzen: list[torch.Tensor] = []
        try:
            with torch.inference_mode():
                for start in range(0, x.shape[0], self._batch_size):
                    p, e = self._module(x[start : start + self._batch_size])
                    probs.append(p)
                    parzen.append(e)
                out_p = torch.cat(probs).double().numpy() if probs else np.zeros((0, n_classes))
                out_e = torch.cat(parzen).double().numpy() if parzen else np.zeros((0, n_classes))
        except Exception as exc:
            raise ModelError(f"model {self.card.arch} failed to run: {exc}") from exc
        if out_p.shape != (x.shape[0], n_classes) or out_e.shape != out_p.shape:
            raise ModelError(
                f"model returned shapes {out_p.shape} and {out_e.shape}, "
                f"expected ({x.shape[0]}, {n_classes})"
            )
        if not (np.all(np.isfinite(out_p)) and np.all(np.isfinite(out_e))):
            raise ModelError(f"model {self.card.arch} produced NaN or infinity")
        return out_p, out_e
