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
import operator
import types
import typing
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from functools import cache
from typing import Any, TypeVar, cast

import msgpack

from fi_peer.errors import MalformedMessage

T = TypeVar("T")

MAX_STR = 1024
MAX_BYTES = 1 << 20
MAX_ITEMS = 1024
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1

# True while the decoders below build dataclasses from values whose wire types they
# have already checked field by field (exact types, bounds): a dataclass' own
# validation may then skip its type checks (messages._typed does) and keep only its
# value checks. Per thread/context, so an object built by hand meanwhile elsewhere
# is still checked in full.
_TYPES_CHECKED: ContextVar[bool] = ContextVar("fi_peer_codec_types_checked", default=False)


def types_checked() -> bool:
    """Whether the dataclass now being built comes from this codec's typed decoders."""
    return _TYPES_CHECKED.get()


@cache
def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


_SCALARS = frozenset({int, bool, float, str, bytes})


def to_wire(value: Any) -> Any:
    """Plain msgpack-able structure of a message value."""
    tp = type(value)
    if tp in _SCALARS:
        return value
    if tp is tuple or tp is list:
        return [v if type(v) in _SCALARS else to_wire(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [to_wire(getattr(value, name)) for name, _ in _fields(type(value))]
    if isinstance(value, tuple):
        return [to_wire(v) for v in value]
    return value


Decoder = Callable[[Any, str], Any]


def _decode_bool(raw: Any, path: str = "") -> Any:
    if type(raw) is not bool:
        raise MalformedMessage(f"{path}: expected bool")
    return raw


def _decode_int(raw: Any, path: str = "") -> Any:
    if type(raw) is not int or not _INT_MIN <= raw <= _INT_MAX:
        raise MalformedMessage(f"{path}: expected int")
    return raw


def _decode_float(raw: Any, path: str = "") -> Any:
    if type(raw) is not float or not math.isfinite(raw):
        raise MalformedMessage(f"{path}: expected a finite float")
    return raw


def _decode_str(raw: Any, path: str = "") -> Any:
    if type(raw) is not str or len(raw) > MAX_STR:
        raise MalformedMessage(f"{path}: expected str of at most {MAX_STR} chars")
    return raw


def _decode_bytes(raw: Any, path: str = "") -> Any:
    if type(raw) is not bytes or len(raw) > MAX_BYTES:
        raise MalformedMessage(f"{path}: expected bytes of at most {MAX_BYTES}")
    return raw


_SCALAR_DECODERS: dict[Any, Decoder] = {
    bool: _decode_bool,
    int: _decode_int,
    float: _decode_float,
    str: _decode_str,
    bytes: _decode_bytes,
}


@cache
def _decoder(tp: Any) -> Decoder:
    """The strict decoder of one wire type, built once per type."""
    scalar = _SCALAR_DECODERS.get(tp)
    if scalar is not None:
        return scalar
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, ellipsis) = typing.get_args(tp)
        if ellipsis is not Ellipsis:  # pragma: no cover - schema bug, not input
            raise TypeError(f"only tuple[T, ...] is supported, got {tp}")
        item = _decoder(item_tp)

        def decode_tuple(raw: Any, path: str) -> Any:
            if type(raw) is not list or len(raw) > MAX_ITEMS:
                raise MalformedMessage(f"{path}: expected a list of at most {MAX_ITEMS} items")
            return tuple([item(v, f"{path}[{i}]") for i, v in enumerate(raw)])

        return decode_tuple
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls = tp

        def decode_nested(raw: Any, path: str) -> Any:
            return _from_wire_explained(cls, raw, path)

        return decode_nested
    if isinstance(tp, types.UnionType):  # pragma: no cover - schema bug, not input
        raise TypeError("unions are not allowed on the wire")
    raise TypeError(f"unsupported wire type {tp!r}")  # pragma: no cover


@cache
def _field_decoders(cls: type) -> tuple[tuple[str, Decoder], ...]:
    return tuple((name, _decoder(tp)) for name, tp in _fields(cls))


def _check(tp: Any, raw: Any, path: str) -> Any:
    return _decoder(tp)(raw, path)


_NO_PATH = ""
# The scalar decoders themselves: their path defaults to none.
_FAST_SCALARS: dict[Any, Callable[[Any], Any]] = {
    bool: _decode_bool,
    int: _decode_int,
    float: _decode_float,
    str: _decode_str,
    bytes: _decode_bytes,
}


@cache
def _fast_decoder(tp: Any) -> Callable[[Any], Any]:
    """The decoder of one wire type without error paths: the same checks as
    :func:`_decoder`, minus building a path string for every field and item
    (a third of the cost of decoding an Accept); see :func:`from_wire`."""
    scalar = _FAST_SCALARS.get(tp)
    if scalar is not None:
        return scalar
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        item_scalar = _FAST_SCALARS.get(item_tp)
        item = _fast_decoder(item_tp)

        def decode_tuple(raw: Any) -> Any:
            if type(raw) is not list or len(raw) > MAX_ITEMS:
                raise MalformedMessage(_NO_PATH)
            if item_scalar is not None:
                return tuple([item_scalar(v) for v in raw])
            return tuple([item(v) for v in raw])

        return decode_tuple
    _decoder(tp)  # the same schema errors as the explained decoders
    cls = tp
    return lambda raw: _fast_from_wire(cls, raw)


@cache
def _fast_field_decoders(cls: type) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    return tuple((name, _fast_decoder(tp)) for name, tp in _fields(cls))


def _fast_from_wire(cls: type[T], raw: Any) -> T:
    spec = _fast_field_decoders(cast(type, cls))
    if type(raw) is not list or len(raw) != len(spec):
        raise MalformedMessage(_NO_PATH)
    values = {fname: decode(v) for (fname, decode), v in zip(spec, raw)}  # noqa: B905
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(str(exc)) from exc


def from_wire(cls: type[T], raw: Any, path: str = "") -> T:
    """Build ``cls`` from its plain structure, strictly.

    Valid input (the common case) takes the fast decoders; input they refuse
    is decoded again by the explained ones, which raise the same refusal with
    the path of the offending field (``Accept.committee[2].box_key: ...``).
    """
    token = _TYPES_CHECKED.set(True)
    try:
        return _fast_from_wire(cls, raw)
    except MalformedMessage:
        pass
    finally:
        _TYPES_CHECKED.reset(token)
    return _from_wire_explained(cls, raw, path)


def _from_wire_explained(cls: type[T], raw: Any, path: str = "") -> T:
    spec = _field_decoders(cast(type, cls))
    name = path or cls.__name__
    if type(raw) is not list or len(raw) != len(spec):
        raise MalformedMessage(f"{name}: expected an array of {len(spec)} fields")
    values = {
        fname: decode(v, f"{name}.{fname}") for (fname, decode), v in zip(spec, raw, strict=True)
    }
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(f"{name}: {exc}") from exc


# The last tuple of messages pack() encoded, and its plain structure: a querier
# packs the same committee (k Members) into each of its k Accepts. Holding the
# tuple itself (not its id) keeps the identity test sound; the cached lists
# never leave pack() (msgpack only reads them), so sharing them is safe.
_last_tuple: tuple[Any, Any] = ((), [])


@cache
def _getter(cls: Any) -> Callable[[Any], tuple[Any, ...]] | None:
    """The field values of a message dataclass as a tuple (declaration order), in
    one C call; None for any other type."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    names = [name for name, _ in _fields(cls)]
    if len(names) == 1:
        one = operator.attrgetter(names[0])
        return lambda value: (one(value),)
    return operator.attrgetter(*names)


def _pack_wire(value: Any) -> Any:
    """:func:`to_wire` for :func:`pack`, reusing a repeated tuple of messages."""
    global _last_tuple
    tp = type(value)
    if tp in _SCALARS:
        return value
    if tp is tuple:
        if value and _getter(cast(Hashable, type(value[0]))) is not None:
            last = _last_tuple
            if last[0] is value:
                return last[1]
            wire = [to_wire(v) for v in value]
            _last_tuple = (value, wire)
            return wire
        return [v if type(v) in _SCALARS else _pack_wire(v) for v in value]
    getter = _getter(cast(Hashable, tp))
    if getter is not None:
        return [v if type(v) in _SCALARS else _pack_wire(v) for v in getter(value)]
    return to_wire(value)


def pack(value: Any) -> bytes:
    out = msgpack.packb(_pack_wire(value), use_bin_type=True)
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
    """Decode canonical bytes into ``cls``; MalformedMessage on anything else.

    Canonical means ``pack(value) == data``. Decoding keeps every scalar as it
    is and turns lists into tuples, so re-encoding the value is re-encoding the
    plain structure: that is checked first, before any object is built (one C
    call instead of a walk over the dataclass).
    """
    raw = unpack_raw(data, max_len=max_len)
    if msgpack.packb(raw, use_bin_type=True) != data:
        raise MalformedMessage(f"{cls.__name__}: non-canonical encoding")
    return from_wire(cls, raw)
