"""Canonical, strict msgpack encoding of frozen message dataclasses.

A message is encoded as the msgpack array of its field values in declaration
order (nested dataclasses as nested arrays, tuples as arrays). Only these field
types exist on the wire: ``int``, ``bool``, ``float`` (finite), ``str``,
``bytes``, a nested message dataclass, and ``tuple[T, ...]`` of those.

Decoding is strict: exact array lengths, exact types (a bool is not an int, an
int is not a float), finite floats, bounded lengths, no trailing bytes, no
msgpack extension types, and the bytes must be exactly what re-encoding the
decoded value produces (one value, one encoding: no malleability). Every
failure, including a dataclass' own validation, becomes MalformedMessage.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import cache
from typing import Any, TypeVar, cast

import msgpack

from fi_peer.errors import MalformedMessage

T = TypeVar("T")

MAX_STR = 1024
MAX_BYTES = 1 << 20
MAX_ITEMS = 1024
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


@cache
def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def to_wire(value: Any) -> Any:
    """Plain msgpack-able structure of a message value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [to_wire(getattr(value, name)) for name, _ in _fields(type(value))]
    if isinstance(value, tuple):
        return [to_wire(v) for v in value]
    return value


def _check(tp: Any, raw: Any, path: str) -> Any:
    if tp is bool:
        if type(raw) is not bool:
            raise MalformedMessage(f"{path}: expected bool")
        return raw
    if tp is int:
        if type(raw) is not int or not _INT_MIN <= raw <= _INT_MAX:
            raise MalformedMessage(f"{path}: expected int")
        return raw
    if tp is float:
        if type(raw) is not float or not math.isfinite(raw):
            raise MalformedMessage(f"{path}: expected a finite float")
        return raw
    if tp is str:
        if type(raw) is not str or len(raw) > MAX_STR:
            raise MalformedMessage(f"{path}: expected str of at most {MAX_STR} chars")
        return raw
    if tp is bytes:
        if type(raw) is not bytes or len(raw) > MAX_BYTES:
            raise MalformedMessage(f"{path}: expected bytes of at most {MAX_BYTES}")
        return raw
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, ellipsis) = typing.get_args(tp)
        if ellipsis is not Ellipsis:  # pragma: no cover - schema bug, not input
            raise TypeError(f"only tuple[T, ...] is supported, got {tp}")
        if type(raw) is not list or len(raw) > MAX_ITEMS:
            raise MalformedMessage(f"{path}: expected a list of at most {MAX_ITEMS} items")
        return tuple(_check(item_tp, v, f"{path}[{i}]") for i, v in enumerate(raw))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_wire(tp, raw, path)
    if isinstance(tp, types.UnionType):  # pragma: no cover - schema bug, not input
        raise TypeError("unions are not allowed on the wire")
    raise TypeError(f"unsupported wire type {tp!r} at {path}")  # pragma: no cover


def from_wire(cls: type[T], raw: Any, path: str = "") -> T:
    """Build ``cls`` from its plain structure, strictly."""
    spec = _fields(cast(type, cls))
    name = path or cls.__name__
    if type(raw) is not list or len(raw) != len(spec):
        raise MalformedMessage(f"{name}: expected an array of {len(spec)} fields")
    values = {
        fname: _check(tp, v, f"{name}.{fname}") for (fname, tp), v in zip(spec, raw, strict=True)
    }
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(f"{name}: {exc}") from exc


def pack(value: Any) -> bytes:
    out = msgpack.packb(to_wire(value), use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def unpack_raw(data: bytes, *, max_len: int) -> Any:
    """msgpack bytes -> plain structure; strict about types and trailing data."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=MAX_ITEMS,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, UnicodeDecodeError, msgpack.exceptions.UnpackException) as exc:
        raise MalformedMessage(f"not valid msgpack: {type(exc).__name__}") from exc


def unpack(cls: type[T], data: bytes, *, max_len: int = MAX_BYTES) -> T:
    """Decode canonical bytes into ``cls``; MalformedMessage on anything else."""
    value = from_wire(cls, unpack_raw(data, max_len=max_len))
    if pack(value) != data:
        raise MalformedMessage(f"{cls.__name__}: non-canonical encoding")
    return value
