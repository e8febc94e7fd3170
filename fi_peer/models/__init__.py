"""Owner models: the digits task, the model zoo, the runtime and aggregation rules.

Public surface::

    # pure numpy, imported eagerly (no torch): usable by the querier and the protocol
    RULES, AggregationRule, Evidence, get_rule, member_vector, decide, sum_member_vectors
    # data (numpy + scikit-learn)
    DigitsSplit, load_digits_split, dirichlet_partition
    # torch-backed, imported on first use
    ARCHITECTURES, DEFAULT_ARCH, DEFAULT_BANDWIDTH, ArchSpec, OwnerModel, build_network,
    train_classifier, train_owner_model, train_peer_models, train_pooled,
    ModelCard, ModelRuntime, save_owner_model, export_torchscript

The torch-backed names are resolved lazily (PEP 562 ``__getattr__``) so that
``import fi_peer.models.aggregation`` (which runs this file first) does not
load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fi_peer.models.aggregation import (
    RULES,
    AggregationRule,
    Evidence,
    decide,
    get_rule,
    member_vector,
    sum_member_vectors,
)

if TYPE_CHECKING:
    from fi_peer.models.data import DigitsSplit, dirichlet_partition, load_digits_split
    from fi_peer.models.runtime import (
        ModelCard,
        ModelRuntime,
        export_torchscript,
        save_owner_model,
    )
    from fi_peer.models.zoo import (
        ARCHITECTURES,
        DEFAULT_ARCH,
        DEFAULT_BANDWIDTH,
        ArchSpec,
        OwnerModel,
        build_network,
        train_classifier,
        train_owner_model,
        train_peer_models,
        train_pooled,
    )

_LAZY = {
    "DigitsSplit": "data",
    "dirichlet_partition": "data",
    "load_digits_split": "data",
    "ModelCard": "runtime",
    "ModelRuntime": "runtime",
    "export_torchscript": "runtime",
    "save_owner_model": "runtime",
    "ARCHITECTURES": "zoo",
    "DEFAULT_ARCH": "zoo",
    "DEFAULT_BANDWIDTH": "zoo",
    "ArchSpec": "zoo",
    "OwnerModel": "zoo",
    "build_network": "zoo",
    "train_classifier": "zoo",
    "train_owner_model": "zoo",
    "train_peer_models": "zoo",
    "train_pooled": "zoo",
}

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCH",
    "DEFAULT_BANDWIDTH",
    "RULES",
    "AggregationRule",
    "ArchSpec",
    "DigitsSplit",
    "Evidence",
    "ModelCard",
    "ModelRuntime",
    "OwnerModel",
    "build_network",
    "decide",
    "dirichlet_partition",
    "export_torchscript",
    "get_rule",
    "load_digits_split",
    "member_vector",
    "save_owner_model",
    "sum_member_vectors",
    "train_classifier",
    "train_owner_model",
    "train_peer_models",
    "train_pooled",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
