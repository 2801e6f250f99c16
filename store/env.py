"""Opening the store's LMDB environment: directory layout, flags, map size and named databases.

One environment per directory (``path/data.mdb`` + ``path/lock.mdb``). The map size is a large,
fixed reservation of address space (not disk): it is never resized while processes run, because
resizing a shared map under concurrent readers and writers is where LMDB deployments go wrong.

LMDB forbids opening the same environment twice in one process (its locks are per process), so
``SharedEnvironment.acquire`` keeps one environment per directory and process and counts the Store
objects using it.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

import lmdb

from store.errors import NotAStore, StoreError

#: default map size (address space only; the file grows with the data)
DEFAULT_MAP_SIZE = 64 * 2**30
MAP_SIZE_ENV_VAR = "MUNET_STORE_MAP_SIZE"
MAX_READERS = 512
MAX_DBS = 16

DB_NAMES = ("meta", "blobs", "components", "models", "tasks", "agents", "agent_state", "trials",
            "events")
#: databases added after schema 1 shipped: made on the first writable open, absent (None) in a
#: read-only open of an older store. ``requests`` maps a retried request's id to its recorded reply.
LATER_DB_NAMES = ("requests",)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Parse ``"68719476736"``, ``"8G"``, ``"512MiB"`` or ``"1.5g"`` into bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise StoreError(f"{MAP_SIZE_ENV_VAR}={text!r} is not a size: use bytes or e.g. 8G, 512M")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _SIZE_UNITS[unit])
    if size < 2**16:
        raise StoreError(f"store map size {size} bytes is too small: use at least 64K")
    return size


def resolve_map_size(map_size: int | None) -> int:
    """Explicit argument, else the environment variable, else the 64 GiB default."""
    if map_size is not None:
        if map_size < 2**16:
            raise StoreError(f"store map size {map_size} bytes is too small: use at least 64K")
        return int(map_size)
    text = os.environ.get(MAP_SIZE_ENV_VAR)
    return parse_size(text) if text else DEFAULT_MAP_SIZE


@dataclass(frozen=True)
class Databases:
    """Handles of the named databases of one open environment."""

    meta: object
    blobs: object
    components: object
    models: object
    tasks: object
    agents: object
    agent_state: object
    trials: object
    events: object
    requests: object = None


def _looks_like_store(path: str) -> str | None:
    """None if ``path`` may hold a store, else the reason it does not (checked before touching it,
    so that opening a wrong path never creates files there)."""
    if not os.path.exists(path):
        return "no such directory"
    if not os.path.isdir(path):
        return "not a directory"
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        return "no data.mdb in it"
    return None


def open_environment(path: str, *, readonly: bool, create: bool,
                     map_size: int | None) -> tuple[lmdb.Environment, Databases]:
    """Open (or create) the environment and its named databases.

    Raises NotAStore when ``create`` is False and ``path`` does not hold a store.
    """
    path = os.fspath(path)
    if create and readonly:
        raise StoreError("a store cannot be created read-only: open it writable with create=True")
    if not create:
        reason = _looks_like_store(path)
        if reason:
            raise NotAStore(path, reason)
    else:
        if os.path.isdir(path) and os.listdir(path) and \
                not os.path.isfile(os.path.join(path, "data.mdb")):
            raise NotAStore(path, "directory is not empty and holds no store: pick a new or "
                                  "empty directory")
        os.makedirs(path, exist_ok=True)
    size = resolve_map_size(map_size)
    try:
        env = lmdb.open(path, map_size=size, subdir=True, readonly=readonly, create=create,
                        max_dbs=MAX_DBS, max_readers=MAX_READERS, sync=True, metasync=True,
                        readahead=False, lock=True)
    except lmdb.Error as exc:
        raise NotAStore(path, f"LMDB cannot open it: {exc}") from None
    try:
        handles = {}
        for name in DB_NAMES:
            handles[name] = env.open_db(name.encode(), create=create and not readonly)
    except lmdb.NotFoundError:
        env.close()
        raise NotAStore(path, "its LMDB file lacks the store's databases") from None
    except lmdb.Error as exc:
        env.close()
        raise NotAStore(path, f"LMDB cannot open its databases: {exc}") from None
    for name in LATER_DB_NAMES:
        try:
            handles[name] = env.open_db(name.encode(), create=not readonly)
        except lmdb.NotFoundError:  # an older store opened read-only: nothing recorded there yet
            handles[name] = None
        except lmdb.Error as exc:
            env.close()
            raise NotAStore(path, f"LMDB cannot open its databases: {exc}") from None
    return env, Databases(**handles)


class SharedEnvironment:
    """One open environment per (directory, process), shared by every Store opened on it."""

    _open: dict[str, SharedEnvironment] = {}
    _lock = threading.Lock()

    def __init__(self, key: str, env: lmdb.Environment, dbs: Databases, readonly: bool) -> None:
        self.key = key
        self.env = env
        self.dbs = dbs
        self.readonly = readonly
        self.pid = os.getpid()
        self.users = 1

    @classmethod
    def acquire(cls, path: str, *, readonly: bool, create: bool,
                map_size: int | None) -> SharedEnvironment:
        key = os.path.realpath(path)
        with cls._lock:
            shared = cls._open.get(key)
            if shared is not None and shared.pid != os.getpid():
                del cls._open[key]  # inherited through fork: unusable here, and not ours to close
                shared = None
            if shared is not None:
                if shared.readonly and not readonly:
                    raise StoreError(f"store {path} is already open read-only in this process: "
                                     f"close that Store first, or open the writable one first")
                shared.users += 1
                return shared
            env, dbs = open_environment(path, readonly=readonly, create=create, map_size=map_size)
            shared = cls(key, env, dbs, readonly)
            cls._open[key] = shared
            return shared

    def release(self) -> None:
        """Drop one user; the last one closes the environment (only in the opening process)."""
        with self._lock:
            self.users -= 1
            if self.users > 0 or os.getpid() != self.pid:
                return
            if self._open.get(self.key) is self:
                del self._open[self.key]
            self.env.close()
