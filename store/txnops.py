"""Operations on an open LMDB transaction, shared by the Store's writes, reads and maintenance.

Nothing here opens or commits a transaction: callers group these into one transaction so that each
public store operation is atomic.
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Sequence, TypeVar

import lmdb

from protocol.tensors import ProtocolError, RawTensor, encode_blob, unpack_header
from store.codec import (decode_seq_key, decode_str_key, pack_value, seq_key, str_key,
                         unpack_value)
from store.env import Databases
from store.errors import Conflict, MissingReference, StoreCorrupt, StoreError
from store.records import ComponentRecord, Event, _Record

SCHEMA_VERSION = 1
_META_KEY = b"meta"
_META_FIELDS = {"schema_version", "created_at", "root_model_id", "config"}

R = TypeVar("R", bound=_Record)
TensorDict = dict[str, RawTensor]


# ---- meta -------------------------------------------------------------------------------------------

def new_meta() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "created_at": time.time(), "root_model_id": None,
            "config": {}}


def read_meta(txn: lmdb.Transaction, dbs: Databases) -> dict[str, Any] | None:
    """The meta dict, or None if the store has none yet (a half-created store)."""
    raw = txn.get(_META_KEY, db=dbs.meta)
    if raw is None:
        return None
    meta = unpack_value(raw, "meta")
    if not isinstance(meta, dict) or not _META_FIELDS <= set(meta):
        raise StoreCorrupt(f"meta: expected a map with fields {sorted(_META_FIELDS)}")
    version = meta["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise StoreCorrupt("meta.schema_version is not an int")
    if not (meta["root_model_id"] is None or isinstance(meta["root_model_id"], str)):
        raise StoreCorrupt("meta.root_model_id is not a str or None")
    return meta


def write_meta(txn: lmdb.Transaction, dbs: Databases, meta: dict[str, Any]) -> None:
    txn.put(_META_KEY, pack_value(meta), db=dbs.meta)


def check_schema(meta: dict[str, Any], path: str) -> None:
    version = meta["schema_version"]
    if version > SCHEMA_VERSION:
        raise StoreError(f"store {path} has schema version {version}, newer than this code's "
                         f"{SCHEMA_VERSION}: upgrade munet-swarm to open it")


# ---- records ----------------------------------------------------------------------------------------

def get_record(txn: lmdb.Transaction, db: Any, key: str, cls: type[R], what: str) -> R | None:
    raw = txn.get(str_key(key), db=db)
    if raw is None:
        return None
    return cls.from_dict(unpack_value(raw, f"{what}/{key}"))


def exists(txn: lmdb.Transaction, db: Any, key: str) -> bool:
    # a cursor positioned on the key avoids copying the value out (blobs can be megabytes)
    with txn.cursor(db=db) as cursor:
        return cursor.set_key(str_key(key))


def put_record(txn: lmdb.Transaction, db: Any, key: str, record: _Record) -> None:
    """Overwrite ``key`` (mutable records: tasks, agents, agent_state)."""
    txn.put(str_key(key), pack_value(record.to_dict()), db=db)


def put_immutable(txn: lmdb.Transaction, db: Any, key: str, record: _Record, what: str) -> bool:
    """Write ``key`` once. Rewriting identical bytes is a no-op (False); different bytes: Conflict."""
    value = pack_value(record.to_dict())
    existing = txn.get(str_key(key), db=db)
    if existing is not None:
        if bytes(existing) != value:
            raise Conflict(f"{what} {key!r} already exists with different content; "
                           f"stored {what}s are immutable: use a new id")
        return False
    txn.put(str_key(key), value, db=db)
    return True


def iter_records(txn: lmdb.Transaction, db: Any, cls: type[R], what: str) -> Iterator[R]:
    with txn.cursor(db=db) as cursor:
        for key, raw in cursor:
            name = decode_str_key(key, what)
            yield cls.from_dict(unpack_value(raw, f"{what}/{name}"))


# ---- blobs ------------------------------------------------------------------------------------------

def put_blob(txn: lmdb.Transaction, dbs: Databases, key: str, tensor: RawTensor) -> int:
    """Store a tensor under its content address; returns bytes written (0 if already there)."""
    k = str_key(key)
    with txn.cursor(db=dbs.blobs) as cursor:
        if cursor.set_key(k):
            return 0  # content-addressed: same key means same bytes, keep the first copy
    value = encode_blob(tensor)
    txn.put(k, value, db=dbs.blobs)
    return len(value)


def read_tensors(txn: lmdb.Transaction, dbs: Databases, refs: list[tuple[str, str]]
                 ) -> list[RawTensor]:
    """Copy several blobs out of the transaction; ``refs`` are (key, what-refers-to-it) pairs.

    All tensors share ONE new writable buffer (each ``data`` is a memoryview slice of it): one
    allocation per call instead of one per tensor, because fresh large allocations are paid for
    in page faults, which cost more than the copy itself. Each tensor is copied exactly once.
    """
    layout = []
    total = 0
    for key, what in refs:
        raw = txn.get(str_key(key), db=dbs.blobs)
        if raw is None:
            raise MissingReference(f"{what} refers to blob {key} which is not in the store; "
                                   f"run `query.py verify`")
        try:
            dtype, shape, header_len = unpack_header(raw)
        except ProtocolError as exc:
            raise StoreCorrupt(f"blob {key}: undecodable ({exc}); run `query.py verify`") from None
        size = len(raw) - header_len
        layout.append((dtype, shape, header_len, size))
        total += size
    arena = memoryview(bytearray(total))
    out = []
    offset = 0
    for (key, _), (dtype, shape, header_len, size) in zip(refs, layout):
        raw = memoryview(txn.get(str_key(key), db=dbs.blobs))
        target = arena[offset:offset + size]
        target[:] = raw[header_len:]
        try:
            out.append(RawTensor(dtype, shape, target))
        except ProtocolError as exc:
            raise StoreCorrupt(f"blob {key}: {exc}; run `query.py verify`") from None
        offset += size
    return out


def load_components(txn: lmdb.Transaction, dbs: Databases, component_ids: Sequence[str],
                    momentum: bool = True) -> dict[str, tuple[TensorDict, TensorDict]]:
    """component id -> (params, momentum), all copied into one buffer (see read_tensors);
    ``momentum=False`` reads no momentum blob (the second dict is empty)."""
    records = []
    refs: list[tuple[str, str]] = []
    for cid in component_ids:
        record = get_record(txn, dbs.components, cid, ComponentRecord, "components")
        if record is None:
            raise MissingReference(f"component {cid} is not in the store")
        records.append(record)
        refs.extend((key, f"component {cid}") for key in record.tensors.values())
        if momentum:
            refs.extend((key, f"component {cid}") for key in record.momentum.values())
    tensors = iter(read_tensors(txn, dbs, refs))
    out = {}
    for record in records:
        params = {name: next(tensors) for name in record.tensors}
        moms = {name: next(tensors) for name in record.momentum} if momentum else {}
        out[record.id] = (params, moms)
    return out


def tensor_shapes(txn: lmdb.Transaction, dbs: Databases, component_id: str
                  ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (dtype, shape) of a component's params, from the blob headers alone."""
    record = get_record(txn, dbs.components, component_id, ComponentRecord, "components")
    if record is None:
        raise MissingReference(f"component {component_id} is not in the store")
    out = {}
    for name, key in record.tensors.items():
        raw = txn.get(str_key(key), db=dbs.blobs)
        if raw is None:
            raise MissingReference(f"component {component_id} refers to missing blob {key}")
        try:
            dtype, shape, _ = unpack_header(raw)
        except ProtocolError as exc:
            raise StoreCorrupt(f"blob {key}: undecodable ({exc})") from None
        out[name] = (dtype, shape)
    return out


# ---- events -----------------------------------------------------------------------------------------

def last_seq(txn: lmdb.Transaction, dbs: Databases) -> int:
    with txn.cursor(db=dbs.events) as cursor:
        if not cursor.last():
            return 0
        return decode_seq_key(cursor.key())


def append_event(txn: lmdb.Transaction, dbs: Databases, kind: str, *, task: str | None,
                 agent: str | None, model_id: str | None, data: dict[str, Any] | None,
                 now: float | None = None) -> int:
    """Append the next event (seq = last + 1; the write lock makes this race-free)."""
    seq = last_seq(txn, dbs) + 1
    event = Event(seq=seq, kind=kind, task=task, agent=agent, model_id=model_id,
                  time=time.time() if now is None else float(now), data=dict(data or {}))
    event = event.validated()
    txn.put(seq_key(seq), pack_value(event.to_dict()), db=dbs.events)
    return seq


def iter_events(txn: lmdb.Transaction, dbs: Databases, after: int = 0) -> Iterator[Event]:
    with txn.cursor(db=dbs.events) as cursor:
        if not cursor.set_range(seq_key(after + 1)):
            return
        for key, raw in cursor:
            seq = decode_seq_key(key)
            yield Event.from_dict(unpack_value(raw, f"events/{seq}"))


# ---- recorded replies of retried requests -------------------------------------------------------------
#
# A client of the store service may send a mutating request twice (its reply was lost, the service
# restarted). The request carries an id; the reply is recorded under it in the same write transaction
# as the change, so a second arrival finds it and gets the first reply instead of a second change.

MAX_REQUEST_ID_LEN = 128


def recorded_reply(txn: lmdb.Transaction, dbs: Databases, request_id: str | None
                   ) -> tuple[bool, Any]:
    """(True, result) if ``request_id`` was already applied, else (False, None)."""
    if request_id is None:
        return False, None
    if dbs.requests is None:
        raise StoreError("this store was opened read-only and has no request log")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_LEN:
        raise StoreError(f"request id must be a str of 1..{MAX_REQUEST_ID_LEN} characters")
    raw = txn.get(str_key(request_id), db=dbs.requests)
    if raw is None:
        return False, None
    value = unpack_value(raw, f"requests/{request_id}")
    if not isinstance(value, dict) or "result" not in value:
        raise StoreCorrupt(f"requests/{request_id}: expected a map with a result")
    return True, value["result"]


def record_reply(txn: lmdb.Transaction, dbs: Databases, request_id: str | None, result: Any,
                 now: float | None = None) -> None:
    """Remember ``result`` (plain msgpack data) as the reply to ``request_id``."""
    if request_id is None:
        return
    txn.put(str_key(request_id), pack_value({"at": time.time() if now is None else now,
                                             "result": result}), db=dbs.requests)


def prune_replies(txn: lmdb.Transaction, dbs: Databases, older_than: float) -> int:
    """Forget replies recorded before ``older_than`` (unix seconds); returns how many."""
    if dbs.requests is None:
        return 0
    stale = []
    with txn.cursor(db=dbs.requests) as cursor:
        for key, raw in cursor:
            try:
                at = unpack_value(raw, "requests").get("at", 0.0)
            except (StoreCorrupt, AttributeError):
                at = 0.0
            if not isinstance(at, (int, float)) or at < older_than:
                stale.append(bytes(key))
    for key in stale:
        txn.delete(key, db=dbs.requests)
    return len(stale)
