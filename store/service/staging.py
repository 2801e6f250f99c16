"""The service's staging area: blobs being uploaded, held until the commit that uses them.

An upload arrives in chunks at increasing offsets (``blob_write``). Nothing reaches LMDB until the
blob is complete and hashes to its key; the commit then writes only complete, checked blobs in its
short write transaction, so a slow or dropped upload never holds the store's write lock.

A chunk at the offset already reached extends the blob; one below it (a retry of a chunk that did
arrive) is ignored; one beyond it (a chunk before it was lost) is refused with the offset reached,
and the client continues from there. So a client whose connection dropped mid-blob asks
``blob_missing`` for the offset reached and resumes instead of starting again.

Bounded: at most ``max_bytes`` staged at once (ServiceBusy beyond, the client retries later), and
an upload nobody touched for ``ttl`` seconds is dropped.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from protocol.tensors import ProtocolError, RawTensor, decode_blob
from store.errors import StoreError
from store.service.blobcache import content_key
from store.service.wire import MAX_BLOB_BYTES, ServiceBusy

_KEY = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_BYTES = 2 * 2**30
DEFAULT_TTL = 600.0


@dataclass
class _Upload:
    buf: bytearray
    received: int = 0
    complete: bool = False
    touched: float = field(default_factory=time.monotonic)


class Staging:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, ttl: float = DEFAULT_TTL) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._uploads: dict[str, _Upload] = {}
        self.bytes = 0
        self.resumed = 0      # uploads a client continued mid-blob (it asked where one stood)
        self.hash_failures = 0

    @staticmethod
    def check_key(key: str) -> None:
        if not _KEY.match(key):
            raise StoreError(f"blob key {key[:80]!r} is not a content hash")

    def offset(self, key: str) -> int:
        """Bytes of ``key`` received so far (0 when nothing is staged)."""
        up = self._uploads.get(key)
        return 0 if up is None else up.received

    def is_complete(self, key: str) -> bool:
        up = self._uploads.get(key)
        return up is not None and up.complete

    def write(self, key: str, offset: int, total: int, data: memoryview) -> int:
        """Add one chunk; returns the offset reached (== total once complete and checked)."""
        self.check_key(key)
        if not 0 < total <= MAX_BLOB_BYTES or offset < 0 or offset + len(data) > total:
            raise StoreError(f"blob {key}: chunk [{offset}, {offset + len(data)}) does not fit a "
                             f"blob of {total} bytes")
        up = self._uploads.get(key)
        if up is not None and len(up.buf) != total:
            self.discard([key])  # a different size for the same key: start that upload again
            up = None
        if up is None:
            if offset != 0:
                return 0  # the client resumes from 0 (the service restarted, or the upload expired)
            if self.bytes + total > self.max_bytes:
                self.expire()
                if self.bytes + total > self.max_bytes:
                    raise ServiceBusy(f"the service's staging area is full ({self.bytes:,} of "
                                      f"{self.max_bytes:,} bytes): retry shortly")
            up = self._uploads[key] = _Upload(bytearray(total))
            self.bytes += total
        up.touched = time.monotonic()
        if up.complete or offset != up.received:
            return up.received  # a repeated chunk, or a gap: the client continues from here
        up.buf[offset:offset + len(data)] = data
        up.received = offset + len(data)
        if up.received == total:
            actual = content_key(up.buf)
            try:
                decode_blob(up.buf)
            except ProtocolError as exc:
                actual = f"an undecodable value ({exc})"
            if actual != key:
                self.hash_failures += 1
                self.discard([key])
                raise StoreError(f"blob {key}: the uploaded bytes hash to {actual}; upload it "
                                 f"again")
            up.complete = True
        return up.received

    def mark_resume(self, key: str) -> None:
        """The client asked where ``key`` stands mid-upload: count the chunk that continues it."""
        up = self._uploads.get(key)
        if up is not None and 0 < up.received and not up.complete:
            self.resumed += 1

    def tensor(self, key: str) -> RawTensor:
        up = self._uploads[key]
        return decode_blob(up.buf)

    def discard(self, keys) -> None:
        for key in keys:
            up = self._uploads.pop(key, None)
            if up is not None:
                self.bytes -= len(up.buf)

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        old = [k for k, up in self._uploads.items() if now - up.touched > self.ttl]
        self.discard(old)
        return len(old)

    def __len__(self) -> int:
        return len(self._uploads)
