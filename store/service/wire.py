"""The store service's wire format: request and reply envelopes, limits, and errors as data.

Every message on the service's ROUTER socket is one ZeroMQ multipart message:

    request  [header, *data]   header = msgpack {"v": 1, "kind": str, "id": str, "args": map}
    reply    [header, *data]   header = msgpack {"v": 1, "id": str, "ok": true, "result": any}
                                     or msgpack {"v": 1, "id": str, "ok": false,
                                                 "error": {"type": str, "message": str, "attrs": map}}

``data`` frames carry raw blob bytes only (uploads and downloads of chunks); they never travel
inside msgpack. ``id`` matches a reply to its request and is, for a mutating request, the id under
which the store records the reply in the same write transaction (a retry is applied once).

The doorbell (the service's PUB socket) sends ``[topic, msgpack {"v", "kind", "seq", "server",
"time"}]`` with topic ``b"seq"`` when the event log grew and ``b"beat"`` once a second. It is a hint:
clients read the events themselves from the durable log.

Errors cross as data and are rebuilt client-side as the same classes (``store.errors``) with the
same message, so callers cannot tell a remote store's errors from a local one's.

Everything decoded here is bounded and validated; failures raise ``WireError`` (the server drops
such messages and counts them).
"""
from __future__ import annotations

import secrets
from typing import Any, Callable

import msgpack

from store import errors as store_errors
from store.errors import NotAStore, StoreError, StoreUnavailable

VERSION = 2  # 2: agent kinds (acquire_lease.kind, published_models.kind, pointers)
CHUNK_BYTES = 4 * 2**20          # blob bytes per request or reply (uploads and downloads)
CREDIT = 4                       # chunk requests a client keeps in flight (zguide ch. 7 "credit")
MAX_DATA_FRAMES = 64             # data frames per request (many small blobs share one chunk)
MAX_HEADER_BYTES = 8 * 2**20     # one request header (a commit's records are kilobytes)
MAX_FRAME_BYTES = MAX_HEADER_BYTES + 64 * 2**10  # ZeroMQ MAXMSGSIZE of the ROUTER socket
MAX_REPLY_BYTES = 512 * 2**20    # the client's MAXMSGSIZE (replies come from the trusted service)
MAX_KEYS_PER_REQUEST = 100_000
MAX_BLOB_BYTES = 4 * 2**30
EVENTS_PAGE = 5000               # events per reply; the client pages through longer logs
TOPIC_SEQ = b"seq"
TOPIC_BEAT = b"beat"
BEAT_SECONDS = 1.0


class WireError(Exception):
    """A message that does not follow this format (dropped and counted by the service)."""


class BlobsMissing(StoreError):
    """A commit names blobs the service has neither stored nor staged; the client uploads them and
    retries the same request (internal to the service protocol)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = list(keys)
        super().__init__(f"{len(self.keys)} blob(s) were not uploaded before the commit")


class ServiceBusy(StoreError):
    """The service cannot take this upload now (its staging area is full); retry later."""


class ServiceUnavailable(StoreUnavailable):
    """The service stopped answering and did not come back within the client's give-up bound
    (a ``store.StoreUnavailable``)."""


class ServiceUserError(NotAStore):
    """A store service that cannot be used as asked (wrong endpoint, keys, flags).

    A NotAStore, so every entry point already reports it as a user error (exit 2, one line)."""

    def __init__(self, message: str) -> None:
        StoreError.__init__(self, message)
        self.path = ""


class ServiceUnreachable(ServiceUserError):
    """Connecting failed: nothing answers there, or the service refused this client's keys."""


class AccessRevoked(ServiceUserError):
    """The service no longer authorises this client's key (it was removed from authorized/ while
    the connection was open): every request on that session is refused (a user error, exit 2)."""


# ---- envelopes --------------------------------------------------------------------------------------

def new_request_id() -> str:
    return secrets.token_hex(12)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(raw: Any, limit: int, max_items: int = MAX_KEYS_PER_REQUEST) -> Any:
    if len(raw) > limit:
        raise WireError(f"header of {len(raw)} bytes exceeds {limit}")
    try:
        # bytes values are allowed (records may hold them); their size is bounded by ``limit``
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=limit,
                               max_ext_len=0, max_str_len=limit, max_array_len=max_items,
                               max_map_len=max_items)
    except Exception as exc:  # msgpack raises many unrelated types on junk
        raise WireError(f"header is not msgpack ({type(exc).__name__})") from None


def unpack_small(raw: Any) -> Any:
    """A doorbell message (a few dozen bytes; anything larger is junk)."""
    return _unpack(raw, 4096)


def encode_request(kind: str, request_id: str, args: dict) -> bytes:
    return pack({"v": VERSION, "kind": kind, "id": request_id, "args": args})


def request_id_of(raw: Any) -> str | None:
    """The id of a request header this version cannot serve (another version, say), so the
    client gets an error reply instead of waiting out its timeout; None if there is no usable id."""
    try:
        msg = _unpack(raw, MAX_HEADER_BYTES)
    except WireError:
        return None
    rid = msg.get("id") if isinstance(msg, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 else None


def decode_request(raw: Any) -> tuple[str, str, dict]:
    """(kind, id, args) of a request header; WireError for anything else."""
    msg = _unpack(raw, MAX_HEADER_BYTES)
    if not isinstance(msg, dict) or set(msg) != {"v", "kind", "id", "args"}:
        raise WireError("request header must be a map of exactly v, kind, id, args")
    if msg["v"] != VERSION or isinstance(msg["v"], bool):
        raise WireError(f"protocol version {msg['v']!r} is not {VERSION}")
    kind, rid, args = msg["kind"], msg["id"], msg["args"]
    if not isinstance(kind, str) or not isinstance(rid, str) or not 0 < len(rid) <= 64:
        raise WireError("request kind and id must be strings (id of 1..64 characters)")
    if not isinstance(args, dict):
        raise WireError("request args must be a map")
    return kind, rid, args


def encode_reply(request_id: str, result: Any) -> bytes:
    return pack({"v": VERSION, "id": request_id, "ok": True, "result": result})


def encode_error(request_id: str, exc: BaseException) -> bytes:
    return pack({"v": VERSION, "id": request_id, "ok": False, "error": error_to_wire(exc)})


def decode_reply(raw: Any) -> tuple[str, bool, Any]:
    """(id, ok, result-or-error-map) of a reply header."""
    # no item cap: a reply comes from the (authenticated) service, bounded by MAX_REPLY_BYTES, and
    # a listing such as trials() may hold more than MAX_KEYS_PER_REQUEST records
    msg = _unpack(raw, MAX_REPLY_BYTES, max_items=MAX_REPLY_BYTES)
    if not isinstance(msg, dict) or msg.get("v") != VERSION or "id" not in msg or "ok" not in msg:
        raise WireError("reply header must be a map with v, id and ok")
    return msg["id"], bool(msg["ok"]), msg.get("result") if msg["ok"] else msg.get("error")


# ---- errors as data ---------------------------------------------------------------------------------

_ATTRS = ("agent_id", "holder", "expires_in", "path", "map_size", "keys")
_CLASSES: dict[str, type[BaseException]] = {
    cls.__name__: cls for cls in (
        store_errors.StoreError, store_errors.NotAStore, store_errors.StoreFull,
        store_errors.StoreCorrupt, store_errors.LeaseHeld, store_errors.LeaseLost,
        store_errors.MissingReference, store_errors.Conflict, BlobsMissing, ServiceBusy,
        AccessRevoked)}


def error_to_wire(exc: BaseException) -> dict:
    name = type(exc).__name__
    if name not in _CLASSES:  # a ProtocolError, ValueError... from bad input: a StoreError there
        name = "StoreError" if isinstance(exc, (StoreError, ValueError)) else "ServiceError"
    attrs = {a: getattr(exc, a) for a in _ATTRS if isinstance(getattr(exc, a, None),
                                                              (str, int, float, list))}
    return {"type": name, "message": str(exc), "attrs": attrs}


class ServiceError(StoreError):
    """The service failed on a request (an internal error there; see the service's log)."""


def error_from_wire(err: Any) -> BaseException:
    """The exception a reply's error map describes: same class, same message, same attributes."""
    if not isinstance(err, dict):
        return ServiceError("the service sent a malformed error")
    cls = _CLASSES.get(err.get("type"), ServiceError)
    message = str(err.get("message", ""))
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    for key, value in (err.get("attrs") or {}).items():
        if key in _ATTRS:
            setattr(exc, key, value)
    return exc


# ---- argument checks (the server's view of each request's args) --------------------------------------

def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _maps(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def _map(v: Any) -> bool:
    return isinstance(v, dict)


def _ranges(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and _int(x[1])
        and _int(x[2]) for x in v)


#: kind -> (argument name -> check, required names); mutating kinds are in WRITES
SCHEMAS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "hello": {}, "health": {}, "meta": {}, "root_model_id": {}, "tasks": {},
    "published_models": {"kind": _opt(_is_str)}, "pointers": {}, "agents": {}, "live_agents": {}, "last_event_seq": {}, "stats": {},
    "verify": {}, "check": {},
    "get_model": {"model_id": _is_str}, "get_component": {"component_id": _is_str},
    "get_task": {"task": _is_str}, "get_agent": {"agent_id": _is_str},
    "get_agent_state": {"agent_id": _is_str}, "tensor_shapes": {"component_id": _is_str},
    "trials": {"agent": _opt(_is_str), "task": _opt(_is_str)}, "models": {"agent": _opt(_is_str)},
    "events": {"after": _int, "limit": _opt(_int)},
    "manifest": {"model_id": _opt(_is_str), "component_ids": _opt(_strs)},
    "blob_read": {"reads": _ranges},
    "blob_missing": {"keys": _strs},
    "blob_write": {"writes": _ranges},
    "commit": {"agent_id": _is_str, "token": _is_str, "components": _maps, "models": _maps,
               "state": _opt(_map), "publish": _opt(_map), "trials": _maps,
               "event_kind": _is_str, "event_data": _opt(_map)},
    "ensure_root": {"model": _map, "components": _maps},
    "acquire_lease": {"agent_id": _is_str, "task": _is_str, "ttl": _num, "host": _is_str,
                      "pid": _int, "device": _is_str, "endpoint": _is_str, "preset": _is_str,
                      "kind": _is_str},
    "heartbeat": {"agent_id": _is_str, "token": _is_str, "ttl": _num, "state": _opt(_is_str),
                  "progress": _opt(_map), "endpoint": _opt(_is_str)},
    "release_lease": {"agent_id": _is_str, "token": _is_str, "state": _is_str},
    "gc": {"grace_seconds": _num},
}
#: requests that change the store: their id is recorded with the reply (retry-safe)
WRITES = frozenset({"commit", "ensure_root", "acquire_lease", "heartbeat", "release_lease", "gc"})
#: requests that may run long on the service (the client waits longer before it resends)
SLOW = frozenset({"verify", "check", "gc", "stats"})
#: uploads: they touch the staging area only (never LMDB), on their own service thread
UPLOADS = frozenset({"blob_write", "blob_missing"})
#: answered by the socket's own thread (no store access): a busy service still says hello
INLINE = frozenset({"hello", "health"})


def lane_of(kind: str) -> str:
    """The service thread (pool) a request runs on: ``write`` (one thread, every change to the
    store, in arrival order), ``upload`` (one thread, staging), ``slow`` (one thread: verify, check,
    stats), ``read`` (a pool: every other read, each in its own LMDB read transaction)."""
    if kind in WRITES:
        return "write"
    if kind in UPLOADS:
        return "upload"
    if kind in SLOW:
        return "slow"
    return "read"


def check_args(kind: str, args: dict) -> None:
    """WireError unless ``args`` has exactly the arguments of ``kind`` with the right types."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise WireError(f"unknown request kind {kind[:40]!r}")
    if set(args) != set(schema):
        raise WireError(f"{kind}: expected arguments {sorted(schema)}, got {sorted(args)[:20]}")
    for name, check in schema.items():
        if not check(args[name]):
            raise WireError(f"{kind}: argument {name!r} has the wrong type")
