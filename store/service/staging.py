"""The service's staging area: blobs being uploaded, held until the commit that uses them.

An upload arrives in chunks at increasing offsets (``blob_write``). Nothing reaches LMDB until the
blob is complete and hashes to its key; the commit then writes only complete, checked blobs in its
short write transaction, so a slow or dropped upload never holds the store's write lock.

A chunk at the offset already reached extends the blob; one below it (a retry of a chunk that did
arrive) is ignored; one beyond it (a chunk before it was lost) is refused with the offset reached,
and the client continues from there. So a client whose connection dropped mid-blob asks
``blob_missing`` for the offset reached and resumes instead of starting again.

Where: in memory (``folder=None``), or on disk in ``folder`` (``launch/serve_store.py`` uses
``STORE/service-staging``), one file per upload: ``KEY.TOTAL.part`` while it grows (its size is the
offset reached: chunks are only ever appended at that offset), renamed to ``KEY.TOTAL.blob`` once
complete and hash-checked. On disk, uploads survive a restart of the service: on start the folder is
scanned, stale files (untouched for ``ttl``), unknown names and anything beyond ``max_bytes`` are
deleted, and the rest is taken up again, so a client resumes a half-uploaded blob from the offset
reached instead of from zero. A recovered complete blob is hashed again before a commit uses it.
No fsync: this survives the service's death, not necessarily the host's (a torn file then fails
its hash check and is uploaded again).

Bounded, and no client can take it all: space is counted in bytes that arrived, not bytes an upload
declares (a client declaring 2 GiB and sending 1 byte holds 1 byte), at most ``max_bytes`` in all,
and per client identity (its key, or its connection without keys) at most ``max_client_bytes`` in
uploads still in progress (a complete blob waiting for its commit counts only in the total) and
``max_client_uploads`` uploads. Past a bound the chunk is refused with ServiceBusy (the client waits
and retries, within its give-up bound). An upload nobody touched for ``partial_ttl`` seconds (still
incomplete) or ``ttl`` seconds (complete, waiting for its commit) is dropped. Thread-safe (one lock).
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field

from protocol.tensors import ProtocolError, RawTensor, decode_blob
from store.errors import StoreError
from store.service.blobcache import content_key
from store.service.wire import MAX_BLOB_BYTES, ServiceBusy

_KEY = re.compile(r"^[0-9a-f]{64}$")
_FILE = re.compile(r"^([0-9a-f]{64})\.(\d{1,12})\.(part|blob)$")
DEFAULT_MAX_BYTES = 2 * 2**30
DEFAULT_TTL = 600.0
DEFAULT_PARTIAL_TTL = 60.0       # an upload that stalled mid-blob: its client resumes well within this
DEFAULT_CLIENT_UPLOADS = 1024    # uploads in progress or waiting for their commit, per client


@dataclass
class _Upload:
    total: int
    buf: bytearray | None = None   # in memory; None on disk
    received: int = 0
    complete: bool = False
    checked: bool = True           # False: recovered from disk, hash it again before use
    touched: float = field(default_factory=time.time)
    owner: str = ""                # the client identity that uploads it ("" after a restart)


class Staging:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, ttl: float = DEFAULT_TTL,
                 folder: str | None = None, *, partial_ttl: float = DEFAULT_PARTIAL_TTL,
                 max_client_bytes: int | None = None,
                 max_client_uploads: int = DEFAULT_CLIENT_UPLOADS) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.partial_ttl = min(partial_ttl, ttl)
        # a quarter of the area by default (four clients at their bound leave room for the rest), but
        # never under 256 MiB (or the whole area when it is smaller), so one large blob always fits
        self.max_client_bytes = max_client_bytes if max_client_bytes is not None else \
            max(max_bytes // 4, min(max_bytes, 256 * 2**20))
        self.max_client_uploads = max_client_uploads
        self._client_bytes: dict[str, int] = {}
        self._client_uploads: dict[str, int] = {}
        self.folder = os.path.abspath(folder) if folder else None
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.RLock()
        self.bytes = 0
        self.resumed = 0      # uploads a client continued mid-blob (it asked where one stood)
        self.recovered = 0    # uploads taken up again from disk after a restart
        self.cleaned = 0      # stale or unknown files deleted on start
        self.hash_failures = 0
        if self.folder:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            self._recover()

    # ---- disk ------------------------------------------------------------------------------------

    def _path(self, key: str, up: _Upload) -> str:
        return os.path.join(self.folder, f"{key}.{up.total}.{'blob' if up.complete else 'part'}")

    def _recover(self) -> None:
        """Take up the uploads a previous run left (newest first, within ``max_bytes``); delete
        stale, unknown and surplus files."""
        now = time.time()
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                match = _FILE.match(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not match or not entry.is_file(follow_symlinks=False):
                    self._unlink(entry.path)
                    continue
                key, total, state = match.group(1), int(match.group(2)), match.group(3)
                size = st.st_size
                idle = now - st.st_mtime
                if idle > self.ttl or (state == "part" and idle > self.partial_ttl) \
                        or not 0 < total <= MAX_BLOB_BYTES \
                        or size > total or (state == "blob" and size != total) \
                        or key in {f[0] for f in found}:
                    self._unlink(entry.path)
                    continue
                found.append((key, total, state, size, st.st_mtime, entry.path))
        found.sort(key=lambda f: -f[4])
        for key, total, state, size, mtime, path in found:
            if self.bytes + size > self.max_bytes:
                self._unlink(path)
                continue
            up = _Upload(total=total, received=size, complete=state == "blob", checked=False,
                         touched=mtime)
            if not up.complete and size == total:
                # every byte arrived but the service died before checking them: check now, or a
                # client would be told to send the zero bytes left, forever
                blob = self._bytes(key, up)
                if blob is None or not self._valid(key, blob):
                    self._unlink(path)
                    continue
                up.complete = up.checked = True
                os.replace(path, self._path(key, up))
            self._uploads[key] = up
            self.bytes += up.received
            self._client_uploads[""] = self._client_uploads.get("", 0) + 1
            if not up.complete:
                self._client_bytes[""] = self._client_bytes.get("", 0) + up.received
            self.recovered += 1

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
            self.cleaned += 1
        except OSError:
            pass

    # ---- the area --------------------------------------------------------------------------------

    @staticmethod
    def check_key(key: str) -> None:
        if not _KEY.match(key):
            raise StoreError(f"blob key {key[:80]!r} is not a content hash")

    def offset(self, key: str) -> int:
        """Bytes of ``key`` received so far (0 when nothing is staged)."""
        with self._lock:
            up = self._uploads.get(key)
            return 0 if up is None else up.received

    def is_complete(self, key: str) -> bool:
        with self._lock:
            up = self._uploads.get(key)
            return up is not None and up.complete

    def write(self, key: str, offset: int, total: int, data: memoryview, client: str = "") -> int:
        """Add one chunk of ``client``'s upload; returns the offset reached (== total once complete
        and checked). ServiceBusy when the area, or this client's share of it, is full."""
        self.check_key(key)
        if not 0 < total <= MAX_BLOB_BYTES or offset < 0 or offset + len(data) > total:
            raise StoreError(f"blob {key}: chunk [{offset}, {offset + len(data)}) does not fit a "
                             f"blob of {total} bytes")
        if total > min(self.max_bytes, self.max_client_bytes):
            raise StoreError(f"blob {key} of {total:,} bytes can never be staged here (at most "
                             f"{min(self.max_bytes, self.max_client_bytes):,} bytes per client)")
        with self._lock:
            up = self._uploads.get(key)
            if up is not None and up.total != total:
                self._discard(key)  # a different size for the same key: start that upload again
                up = None
            if up is None:
                if offset != 0:
                    return 0  # the client resumes from 0 (the service restarted, or it expired)
                if self._client_uploads.get(client, 0) >= self.max_client_uploads:
                    self.expire()
                    if self._client_uploads.get(client, 0) >= self.max_client_uploads:
                        raise ServiceBusy(f"this client has {self.max_client_uploads} uploads staged "
                                          f"already (the limit per client): retry once they are committed")
                up = _Upload(total=total, buf=None if self.folder else bytearray(), owner=client)
                if self.folder:
                    open(self._path(key, up), "wb").close()
                self._uploads[key] = up
                self._client_uploads[client] = self._client_uploads.get(client, 0) + 1
            up.touched = time.time()
            if up.complete or offset != up.received:
                return up.received  # a repeated chunk, or a gap: the client continues from here
            if up.owner != client and client:  # recovered after a restart: the resuming client owns it
                self._adopt(up, client)
            self._make_room(up.owner, len(data))
            if self.folder:
                try:
                    with open(self._path(key, up), "r+b") as f:
                        f.seek(offset)
                        f.write(data)
                except FileNotFoundError:  # deleted under us (by hand): start again
                    self._discard(key)
                    return 0
            else:
                up.buf += data  # chunks only ever append at the offset reached
            up.received = offset + len(data)
            self.bytes += len(data)
            self._client_bytes[up.owner] = self._client_bytes.get(up.owner, 0) + len(data)
            if up.received == total:
                blob = self._bytes(key, up)
                if blob is None or not self._valid(key, blob):
                    self._discard(key)
                    raise StoreError(f"blob {key}: the uploaded bytes do not hash to its key; "
                                     f"upload it again")
                if self.folder:
                    part = self._path(key, up)
                    up.complete = True
                    os.replace(part, self._path(key, up))
                up.complete = True
                # complete and checked, it waits for its commit: no longer this client's upload in
                # progress (else a commit larger than a client's share could never finish)
                self._client_bytes[up.owner] -= up.received
                self._tidy(up.owner)
            return up.received

    def _adopt(self, up: _Upload, client: str) -> None:
        """Move an upload (and what it holds) to ``client``'s tallies."""
        in_progress = 0 if up.complete else up.received
        self._client_bytes[up.owner] = self._client_bytes.get(up.owner, 0) - in_progress
        self._client_uploads[up.owner] = self._client_uploads.get(up.owner, 0) - 1
        self._client_bytes[client] = self._client_bytes.get(client, 0) + in_progress
        self._client_uploads[client] = self._client_uploads.get(client, 0) + 1
        self._tidy(up.owner)
        up.owner = client

    def _tidy(self, owner: str) -> None:
        for tally in (self._client_bytes, self._client_uploads):
            if tally.get(owner) == 0:
                del tally[owner]

    def _make_room(self, client: str, n: int) -> None:
        """ServiceBusy unless ``n`` more bytes fit the area and ``client``'s share of it."""
        if self.bytes + n > self.max_bytes or self._client_bytes.get(client, 0) + n > self.max_client_bytes:
            self.expire()
        if self._client_bytes.get(client, 0) + n > self.max_client_bytes:
            raise ServiceBusy(f"this client has {self._client_bytes.get(client, 0):,} bytes staged, "
                              f"its limit is {self.max_client_bytes:,}: retry once they are committed")
        if self.bytes + n > self.max_bytes:
            raise ServiceBusy(f"the service's staging area is full ({self.bytes:,} of "
                              f"{self.max_bytes:,} bytes): retry shortly")

    def _bytes(self, key: str, up: _Upload) -> bytearray | None:
        if up.buf is not None:
            return up.buf
        try:
            with open(self._path(key, up), "rb") as f:
                data = bytearray(f.read())
        except FileNotFoundError:
            return None
        return data if len(data) == up.total else None

    def _valid(self, key: str, blob: bytearray) -> bool:
        actual = content_key(blob)
        try:
            decode_blob(blob)
        except ProtocolError:
            actual = "undecodable"
        if actual != key:
            self.hash_failures += 1
            return False
        return True

    def mark_resume(self, key: str) -> None:
        """The client asked where ``key`` stands mid-upload: count the chunk that continues it."""
        with self._lock:
            up = self._uploads.get(key)
            if up is not None and 0 < up.received and not up.complete:
                self.resumed += 1

    def tensor(self, key: str) -> RawTensor | None:
        """The complete staged blob as a tensor; None if it is gone (expired, damaged on disk)."""
        with self._lock:
            up = self._uploads.get(key)
            if up is None or not up.complete:
                return None
            blob = self._bytes(key, up)
            if blob is None or not up.checked and not self._valid(key, blob):
                self._discard(key)
                return None
            up.checked = True
            up.touched = time.time()
            return decode_blob(blob)

    def _discard(self, key: str) -> None:
        up = self._uploads.pop(key, None)
        if up is not None:
            self.bytes -= up.received
            if not up.complete:  # a complete upload no longer counts as its client's (see write)
                self._client_bytes[up.owner] = self._client_bytes.get(up.owner, 0) - up.received
            self._client_uploads[up.owner] = self._client_uploads.get(up.owner, 0) - 1
            self._tidy(up.owner)
            if self.folder:
                try:
                    os.unlink(self._path(key, up))
                except OSError:
                    pass

    def discard(self, keys) -> None:
        with self._lock:
            for key in keys:
                self._discard(key)

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            old = [k for k, up in self._uploads.items()
                   if now - up.touched > (self.ttl if up.complete else self.partial_ttl)]
            for key in old:
                self._discard(key)
            return len(old)

    def __len__(self) -> int:
        return len(self._uploads)
