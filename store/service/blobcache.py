"""A host's local cache of immutable blobs fetched from a store service, addressed by content.

Blobs never change (their key is the hash of their bytes), so a blob fetched once serves every
process on the host until someone deletes the folder: a model is fetched once per host, not once
per agent. Layout: ``DIR/ab/abcdef...`` (the key's first two hex digits name a sub-folder), each
file holding exactly the store's blob value (tensor header + raw bytes).

Safe with several processes: a blob is written to a temporary file in the same folder, checked
against its key, and renamed into place (atomic on POSIX); two processes fetching the same blob
both end with the same complete file, and a reader never sees a partial one. A file whose header
does not match its length (a torn write from a crash before rename cannot happen; a damaged disk
can) is treated as missing and replaced.

Where: ``$MUNET_BLOB_CACHE``, else ``$MUNET_DATA_DIR/blobs``, else ``~/.cache/munet-swarm/blobs``.

Bounded: at most ``max_bytes`` on disk (``$MUNET_BLOB_CACHE_MB``, default 4096 MB; 0 means no cap).
A hit stamps the file's access time (explicitly, so ``noatime``/``relatime`` mounts do not matter;
the modification time, part of the "already hashed" stamp, is left alone). When this process's
running estimate of the folder's size passes the cap, or every ``max_bytes / 16`` bytes it added (so
other processes' additions are seen), it scans the folder and deletes the least recently used
blobs until the cache is at 90% of the cap. Safe with several processes: a process reading a blob
another one deletes keeps reading it (POSIX keeps an open file until it is closed), and one that
opens it after the deletion sees a miss and fetches it again; ``get`` hashes what it reads, so an
eviction can cause a refetch, never a wrong blob. Temporary ``.part-`` files older than an hour
(left by a crash) are deleted by the same scan.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time

from protocol.tensors import ProtocolError, RawTensor, unpack_header
from store.errors import StoreCorrupt

_KEY = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_MB = 4096
LOW_WATER = 0.9              # an eviction leaves the cache at this fraction of its cap
ATIME_EVERY_SECONDS = 60.0   # a hit re-stamps a file's access time at most this often
STALE_PART_SECONDS = 3600.0


def default_max_bytes() -> int:
    """``$MUNET_BLOB_CACHE_MB`` (0: no cap) in bytes, else 4096 MB."""
    text = os.environ.get("MUNET_BLOB_CACHE_MB", "").strip()
    if not text:
        return DEFAULT_MAX_MB * 2**20
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if mb < 0:
        from store.service.wire import ServiceUserError
        raise ServiceUserError(f"MUNET_BLOB_CACHE_MB={text!r}: use a size in MB (0: no cap)")
    return int(mb * 2**20)


def default_cache_dir() -> str:
    explicit = os.environ.get("MUNET_BLOB_CACHE")
    if explicit:
        return explicit
    data = os.environ.get("MUNET_DATA_DIR")
    if data:
        return os.path.join(data, "blobs")
    return os.path.join(os.path.expanduser("~"), ".cache", "munet-swarm", "blobs")


def content_key(blob: bytes | bytearray | memoryview) -> str:
    """The key a stored blob value has (``protocol.tensors.blob_key`` of the tensor it holds)."""
    return hashlib.blake2b(blob, digest_size=32).hexdigest()


def as_tensor(blob: bytearray) -> RawTensor:
    """The tensor in a blob value, its data a writable view of ``blob`` (no copy)."""
    dtype, shape, header_len = unpack_header(blob)
    return RawTensor(dtype, shape, memoryview(blob)[header_len:])


class BlobCache:
    def __init__(self, root: str | None = None, max_bytes: int | None = None) -> None:
        self.root = os.path.abspath(root or default_cache_dir())
        os.makedirs(self.root, exist_ok=True)
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self.hits = 0
        self.misses = 0
        self.evicted = 0          # files this process deleted to stay under the cap
        self._estimate: int | None = None   # this process's view of the folder's size
        self._added_since_scan = 0
        # key -> (inode, mtime, size) of a file this process already hashed: a blob file only
        # changes by being replaced, which changes these, so an unchanged file is not re-hashed
        self._verified: dict[str, tuple[int, int, int]] = {}

    def path(self, key: str) -> str:
        if not _KEY.match(key):
            raise StoreCorrupt(f"blob key {key[:80]!r} is not a content hash")
        return os.path.join(self.root, key[:2], key)

    def get(self, key: str) -> bytearray | None:
        """The blob's bytes in a new writable buffer, or None when this host has not cached it."""
        path = self.path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                size = st.st_size
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                buf = bytearray(size)
                view = memoryview(buf)
                got = 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            self.misses += 1
            return None
        if self.max_bytes and time.time() - st.st_atime > ATIME_EVERY_SECONDS:
            try:  # most recently used: stamp the access time, keep the modification time
                os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
            except OSError:
                pass
        try:
            if got == size:
                as_tensor(buf)  # header canonical and length matching it
                if self._verified.get(key) != stamp:
                    if content_key(buf) != key:  # a damaged (or planted) file is never served
                        got = -1
                    else:
                        self._verified[key] = stamp
        except ProtocolError:
            got = -1
        if got != size:  # damaged on disk: forget it, the caller fetches it again
            self._discard(path)
            self.misses += 1
            return None
        self.hits += 1
        return buf

    def put(self, key: str, blob: bytes | bytearray | memoryview, *, made_here: bool = False) -> None:
        """Add a fetched blob after checking it hashes to ``key`` (StoreCorrupt if not).

        ``made_here``: bytes this process encoded and named itself (an upload), whose key is their
        hash by construction; they are not hashed again."""
        if not made_here:
            actual = content_key(blob)
            if actual != key:
                raise StoreCorrupt(f"blob {key} fetched from the service hashes to {actual}: the "
                                   f"transfer or the service's copy is damaged; run `query.py "
                                   f"verify`")
            try:
                unpack_header(blob)
            except ProtocolError as exc:
                raise StoreCorrupt(f"blob {key} fetched from the service is undecodable: "
                                   f"{exc}") from None
        path = self.path(key)
        if os.path.exists(path):
            return  # already there (get checks every read and removes a damaged copy)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
        try:
            # no fsync: a cache file is checked against its hash when read, so one torn by a crash
            # is dropped and fetched again; durability lives in the store, not here
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600: other users sharing the cache read it too
            st = os.stat(tmp)
            os.replace(tmp, path)
            self._verified[key] = (st.st_ino, st.st_mtime_ns, st.st_size)  # hashed above (or ours)
        except BaseException:
            self._discard(tmp)
            raise
        self._added(st.st_size)

    # ---- the cap ---------------------------------------------------------------------------------

    def _added(self, nbytes: int) -> None:
        if not self.max_bytes:
            return
        if self._estimate is None:
            self._estimate = self.size()
        else:
            self._estimate += nbytes
        self._added_since_scan += nbytes
        if self._estimate > self.max_bytes or self._added_since_scan > self.max_bytes // 16:
            self.evict()

    def _files(self) -> list[tuple[float, int, str]]:
        """(access time, size, path) of every blob file; stale temporary files are deleted."""
        out = []
        now = time.time()
        try:
            folders = [e for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return out
        for folder in folders:
            try:
                entries = list(os.scandir(folder.path))
            except OSError:
                continue
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue  # deleted meanwhile (another process evicting)
                if e.name.startswith(".part-"):
                    if now - st.st_mtime > STALE_PART_SECONDS:
                        self._discard(e.path)
                    continue
                if _KEY.match(e.name):
                    out.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
        return out

    def size(self) -> int:
        """Bytes of blob files in the cache now (every process's)."""
        return sum(size for _, size, _ in self._files())

    def evict(self) -> int:
        """Delete least recently used blobs until the cache is at most LOW_WATER of its cap;
        returns the bytes deleted."""
        files = self._files()
        total = sum(size for _, size, _ in files)
        freed = 0
        if self.max_bytes and total > self.max_bytes:
            target = int(self.max_bytes * LOW_WATER)
            for _, size, path in sorted(files):
                if total - freed <= target:
                    break
                try:
                    os.unlink(path)
                except OSError:
                    continue  # another process evicted it first
                freed += size
                self.evicted += 1
                self._verified.pop(os.path.basename(path), None)
        self._estimate = total - freed
        self._added_since_scan = 0
        return freed

    @staticmethod
    def _discard(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
