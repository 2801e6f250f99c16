"""Byte-level encoding of store keys and record values.

Records are stored as msgpack maps with string keys. Maps are packed with their keys sorted
(recursively), so the same record always encodes to the same bytes: immutability checks can then
compare bytes, which also treats NaN metrics as equal to themselves.
Event keys are 8-byte big-endian integers so that LMDB's lexicographic key order is seq order.
"""
from __future__ import annotations

import math

import struct
from typing import Any

import msgpack

from store.errors import StoreCorrupt

#: bounds for decoding a record value; records are small metadata, blobs never go through here
_MAX_RECORD_BYTES = 64 * 2**20

_SEQ = struct.Struct(">Q")


def _canonical(value: Any) -> Any:
    """Return ``value`` with every dict's keys sorted and tuples turned into lists."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def pack_value(value: dict[str, Any]) -> bytes:
    """Encode a plain dict (a record's ``to_dict()``) canonically."""
    try:
        return msgpack.packb(_canonical(value), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise StoreCorrupt(f"value cannot be encoded as msgpack: {exc}") from None


def unpack_value(data: bytes | memoryview, what: str) -> Any:
    """Decode a stored msgpack value; ``what`` names it in the error (e.g. ``models/abc``)."""
    if len(data) > _MAX_RECORD_BYTES:
        raise StoreCorrupt(f"{what}: record of {len(data)} bytes is larger than any record can be")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise StoreCorrupt(f"{what}: undecodable record ({type(exc).__name__}: {exc})") from None


def str_key(key: str) -> bytes:
    """Key of a record addressed by a string id (ids, task names, blob hashes)."""
    if not key:
        raise ValueError("store keys must be non-empty strings")
    data = key.encode("utf-8")
    if len(data) > 500:  # LMDB's default max key size is 511 bytes
        raise ValueError(f"store key too long ({len(data)} bytes): {key[:40]}...")
    return data


def decode_str_key(key: bytes | memoryview, what: str) -> str:
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise StoreCorrupt(f"{what}: key {bytes(key)[:40]!r} is not utf-8") from None


def seq_key(seq: int) -> bytes:
    """Key of an event: fixed-width big-endian so cursor order is sequence order."""
    return _SEQ.pack(seq)


def decode_seq_key(key: bytes | memoryview) -> int:
    if len(key) != _SEQ.size:
        raise StoreCorrupt(f"events: key of {len(key)} bytes is not an 8-byte sequence number")
    return _SEQ.unpack(bytes(key))[0]


def json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: turn them into null (recursively) so every consumer can parse output."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
