"""Message types that agents exchange over the peer bus, and their strict msgpack encoding.

Every message is a frozen dataclass with a ``kind`` and the three common fields ``agent_id``, ``task``
and ``time`` (unix seconds). On the wire a message is one msgpack map with string keys only:
``{"v": PROTOCOL_VERSION, "kind": <kind>, <field>: <value>, ...}``.

Messages are hints (the store is the truth), but they come from other processes, possibly buggy or
hostile, so ``decode`` is strict and bounded: it checks the size before parsing, asks msgpack to refuse
long strings/lists/maps before allocating them, requires exactly the declared fields with exactly the
declared types, and raises nothing but ``ProtocolError``. ``encode`` applies the same checks, so a
sender cannot emit a message that its peers would drop.

Other packages may add message kinds with ``@register_message`` on a frozen dataclass derived from
``Message`` whose fields use the supported types: ``str``, ``int``, ``float``, ``bool``,
``X | None`` and ``tuple[X, ...]`` of those.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import time as _time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

import msgpack

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # bound on one encoded message payload
MAX_STRING_LEN = 4096  # characters in any string field
MAX_LIST_LEN = 1024  # items in any tuple field
MAX_FIELDS = 64  # entries in a message map (fields + "v" + "kind")
_INT_MIN = -(2**63)  # msgpack's integer range: int64 .. uint64
_INT_MAX = 2**64 - 1
_KIND_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_RESERVED_KEYS = frozenset({"v", "kind"})


class ProtocolError(ValueError):
    """A message or tensor frame is malformed, oversized, of an unknown kind or version."""


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message kind: who sent it, for which task, and when (unix seconds).

    Fields are keyword-only so that adding a field to a kind can never silently shift positional
    arguments at call sites. ``time`` defaults to now.
    """

    kind: ClassVar[str] = ""
    agent_id: str
    task: str
    time: float = field(default_factory=_time.time)


# A checker validates one field value and returns it normalised (e.g. int -> float for a float field,
# list -> tuple for a tuple field); it raises ProtocolError with a short reason otherwise.
_Checker = Callable[[Any], Any]


def _check_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"expected str, got {type(value).__name__}")
    if len(value) > MAX_STRING_LEN:
        raise ProtocolError(f"string longer than {MAX_STRING_LEN} characters")
    return value if type(value) is str else str.__str__(value)


def _check_int(value: Any) -> int:
    # bool is an int subclass in Python; a flag where a count belongs is a bug, so reject it.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProtocolError(f"expected int, got {type(value).__name__}")
    value = int(value)
    if not _INT_MIN <= value <= _INT_MAX:
        raise ProtocolError("integer outside the 64-bit range")
    return value


def _check_float(value: Any) -> float:
    # Ints are accepted for float fields (msgpack senders may pack 3.0 as 3); numpy scalars are
    # numbers.Real too, so callers can pass metrics straight from numpy.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProtocolError(f"expected float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ProtocolError("float must be finite")
    return value


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"expected bool, got {type(value).__name__}")
    return value


_SCALAR_CHECKERS: dict[type, _Checker] = {
    str: _check_str,
    int: _check_int,
    float: _check_float,
    bool: _check_bool,
}


def _optional(inner: _Checker) -> _Checker:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def _sequence(inner: _Checker) -> _Checker:
    def check(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"expected a list, got {type(value).__name__}")
        if len(value) > MAX_LIST_LEN:
            raise ProtocolError(f"list longer than {MAX_LIST_LEN} items")
        return tuple(inner(item) for item in value)

    return check


def _checker_for(annotation: Any, where: str) -> _Checker:
    """Build the checker for one field annotation; unsupported annotations fail at registration."""
    if annotation in _SCALAR_CHECKERS:
        return _SCALAR_CHECKERS[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(args) == 2 and len(others) == 1:
            return _optional(_checker_for(others[0], where))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(_checker_for(args[0], where))
    raise TypeError(
        f"{where}: unsupported field type {annotation!r}; use str, int, float, bool, "
        "X | None or tuple[X, ...]"
    )


@dataclass(frozen=True)
class _Schema:
    cls: type[Message]
    checkers: dict[str, _Checker]
    keys: frozenset[str]  # every key the wire map must hold, "v" and "kind" included


_REGISTRY: dict[str, _Schema] = {}
M = TypeVar("M", bound=type[Message])


def register_message(cls: M) -> M:
    """Class decorator: make a frozen ``Message`` dataclass with a unique ``kind`` encodable.

    Raises TypeError/ValueError at import time for a class the protocol could not carry faithfully,
    so a bad extension fails where it is defined rather than on a peer.
    """
    name = getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Message) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{name}: a message kind must be a dataclass derived from protocol.Message")
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{name}: a message kind must be a frozen dataclass")
    kind = cls.__dict__.get("kind")
    if not isinstance(kind, str) or not _KIND_PATTERN.fullmatch(kind):
        raise ValueError(f"{name}: kind must match {_KIND_PATTERN.pattern}, got {kind!r}")
    if kind in _REGISTRY and _REGISTRY[kind].cls is not cls:
        raise ValueError(f"{name}: message kind {kind!r} is already registered")
    hints = typing.get_type_hints(cls)
    checkers: dict[str, _Checker] = {}
    for fld in dataclasses.fields(cls):
        if fld.name in _RESERVED_KEYS:
            raise ValueError(f"{name}: field name {fld.name!r} is reserved for the envelope")
        if not fld.init:
            raise TypeError(f"{name}: field {fld.name!r} must be an __init__ field")
        checkers[fld.name] = _checker_for(hints[fld.name], f"{name}.{fld.name}")
    if len(checkers) + len(_RESERVED_KEYS) > MAX_FIELDS:
        raise ValueError(f"{name}: more than {MAX_FIELDS - len(_RESERVED_KEYS)} fields")
    _REGISTRY[kind] = _Schema(cls, checkers, frozenset(checkers) | _RESERVED_KEYS)
    return cls


def message_kinds() -> dict[str, type[Message]]:
    """A snapshot of the registered kinds: kind -> message class."""
    return {kind: schema.cls for kind, schema in _REGISTRY.items()}


@register_message
@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """A peer came up: where its PUB socket listens, so others can connect without a store rescan."""

    kind: ClassVar[str] = "hello"
    endpoint: str
    pid: int
    host: str


@register_message
@dataclass(frozen=True, kw_only=True)
class Published(Message):
    """A model was committed to the store; ``seq`` is the store event sequence number of that commit.

    Sent only after the commit, so a receiver that reads the store finds the model.
    """

    kind: ClassVar[str] = "published"
    model_id: str
    seq: int
    score: float | None = None
    quality: float | None = None


@register_message
@dataclass(frozen=True, kw_only=True)
class Bye(Message):
    """A peer is leaving on purpose (a crash sends nothing; the store lease expires instead)."""

    kind: ClassVar[str] = "bye"
    reason: str


def _schema_of(msg: Message) -> _Schema:
    schema = _REGISTRY.get(getattr(type(msg), "kind", None))  # type: ignore[arg-type]
    if schema is None or schema.cls is not type(msg):
        raise ProtocolError(f"{type(msg).__name__} is not a registered message kind")
    return schema


def encode(msg: Message) -> bytes:
    """Encode a registered message as one msgpack map; ProtocolError if a field is invalid."""
    schema = _schema_of(msg)
    wire: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": schema.cls.kind}
    for name, check in schema.checkers.items():
        try:
            wire[name] = check(getattr(msg, name))
        except ProtocolError as exc:
            raise ProtocolError(f"{schema.cls.kind}.{name}: {exc}") from None
    try:
        data = msgpack.packb(wire, use_bin_type=True)
    except (ValueError, TypeError, OverflowError, UnicodeError) as exc:
        raise ProtocolError(f"{schema.cls.kind}: cannot encode: {exc}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{schema.cls.kind}: encoded size {len(data)} exceeds {MAX_MESSAGE_BYTES} bytes")
    return data


def _unpack_bounded(data: bytes | bytearray | memoryview) -> Any:
    """msgpack.unpackb with every length bounded, so a hostile frame cannot make us allocate much."""
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_str_len=MAX_MESSAGE_BYTES,
        max_bin_len=0,  # no field is binary; tensors travel in their own frames
        max_array_len=MAX_LIST_LEN,
        max_map_len=MAX_FIELDS,
        max_ext_len=0,
    )


def _decode_strict(data: Any) -> Message:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        wire = _unpack_bounded(data)
    except Exception as exc:  # msgpack raises several unrelated types on junk; all mean "malformed"
        raise ProtocolError(f"not a valid msgpack payload ({type(exc).__name__})") from None
    if not isinstance(wire, dict):
        raise ProtocolError(f"payload must be a map, got {type(wire).__name__}")
    if not all(type(key) is str for key in wire):
        raise ProtocolError("payload map keys must all be strings")
    version = wire.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    kind = wire.get("kind")
    schema = _REGISTRY.get(kind) if type(kind) is str else None
    if schema is None:
        raise ProtocolError(f"unknown message kind {str(kind)[:64]!r}")
    keys = wire.keys()
    if keys != schema.keys:
        missing = sorted(schema.keys - keys)
        extra = sorted(k[:64] for k in keys - schema.keys)
        raise ProtocolError(f"{kind}: missing fields {missing}, unexpected fields {extra}")
    values: dict[str, Any] = {}
    for name, check in schema.checkers.items():
        try:
            values[name] = check(wire[name])
        except ProtocolError as exc:
            raise ProtocolError(f"{kind}.{name}: {exc}") from None
    return schema.cls(**values)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode and validate one payload; raises ProtocolError (and nothing else) if it is malformed."""
    try:
        return _decode_strict(data)
    except ProtocolError:
        raise
    except Exception as exc:  # defensive: a bug here must still look like a dropped frame to callers
        raise ProtocolError(f"malformed message ({type(exc).__name__})") from None
