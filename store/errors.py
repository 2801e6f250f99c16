"""Exceptions raised by the parameter store.

Every message is one line that tells the user what to do, because the launch scripts print
``str(exc)`` as the only line on stderr (exit code 2) for user-facing errors.
"""
from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class NotAStore(StoreError):
    """The directory does not exist or does not hold a munet-swarm store."""

    def __init__(self, path: str, reason: str = "no munet-swarm store there") -> None:
        self.path = path
        super().__init__(f"{path} is not a munet-swarm store ({reason}); "
                         f"create one with run_swarm.py or pass the right --store")


class StoreFull(StoreError):
    """The LMDB map is full; the transaction that hit it was aborted (nothing was written)."""

    def __init__(self, map_size: int) -> None:
        self.map_size = map_size
        gib = map_size / 2**30
        super().__init__(f"store map of {gib:.3g} GiB is full: run `query.py gc` or set "
                         f"MUNET_STORE_MAP_SIZE larger")


class StoreDiskError(StoreError):
    """The disk holding the store refused a write (full, over quota, failing). The transaction was
    aborted: nothing it held was written, and everything committed before it is intact."""

    def __init__(self, path: str, detail: str) -> None:
        import os
        import shutil

        self.path = path
        try:
            usage = shutil.disk_usage(path)
            free = f"{usage.free / 2**20:,.0f} MiB free of {usage.total / 2**30:,.1f} GiB"
        except OSError:
            free = "free space unknown"
        super().__init__(f"the disk holding the store {os.path.abspath(path)} refused a write "
                         f"({detail}; {free}): free space there and run the same command again "
                         f"(nothing published was lost)")


DISK_ERRORS = ("Input/output error", "No space left on device", "File too large", "Disk quota exceeded")


def disk_error(path: str, exc: BaseException) -> StoreDiskError | None:
    """``exc`` as a StoreDiskError when it is the disk's refusal (LMDB reports it by message), else None."""
    text = str(exc)
    return StoreDiskError(path, text) if any(m in text for m in DISK_ERRORS) else None


class StoreCorrupt(StoreError):
    """A stored record failed to decode or violates its schema."""


class LeaseHeld(StoreError):
    """Another live process holds the lease this caller asked for."""

    def __init__(self, agent_id: str, holder: str, expires_in: float) -> None:
        self.agent_id = agent_id
        self.holder = holder
        self.expires_in = expires_in
        super().__init__(f"lease for agent {agent_id!r} is held by {holder} for another "
                         f"{expires_in:.1f} s: stop that agent or wait for its lease to expire")


class LeaseLost(StoreError):
    """The caller's lease token no longer matches: another process took the agent over."""

    def __init__(self, agent_id: str, reason: str = "token does not match") -> None:
        self.agent_id = agent_id
        super().__init__(f"agent {agent_id!r} no longer holds its lease ({reason}); "
                         f"stop this process, another one owns the agent now")


class MissingReference(StoreError):
    """A record refers to a model, component or blob that is not in the store."""


class Conflict(StoreError):
    """An immutable key would be rewritten with different content, or a write breaks ownership."""


class StoreUnavailable(StoreError):
    """A store service stopped answering and did not come back within the client's give-up bound
    (``MUNET_STORE_RETRY_SECONDS``, default 120 s): the call was abandoned, nothing more is retried.
    A write may or may not have been applied; its request id makes a later resend apply once."""
