"""Agent leases inside a write transaction: one live process per agent id and per (task, kind).

A lease is the ``lease_token`` + ``lease_expiry`` of an agent's record. Liveness is the holder's
heartbeat extending the expiry; a holder that stops heartbeating (crashed, hung, partitioned) can be
taken over once its lease expires. Every write an agent makes re-checks its token in the same
transaction, so a taken-over process can never write again (it gets LeaseLost).
"""
from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import lmdb

from store.env import Databases
from store.errors import Conflict, LeaseHeld, LeaseLost, StoreError
from store.records import SINGLE, AgentRecord
from store.txnops import get_record, iter_records, put_record


# A lease lives from 1 s to 1 h past its last heartbeat. Below, heartbeats cannot keep up and a live
# agent is superseded; above (an infinite TTL, say), a killed holder blocks its task for that long.
MIN_TTL_S, MAX_TTL_S = 1.0, 3600.0


def checked_ttl(ttl: object) -> float:
    """``ttl`` if it is a finite number of seconds inside [MIN_TTL_S, MAX_TTL_S]; StoreError otherwise
    (the same check for a local store and, on the service's side, for every client)."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not MIN_TTL_S <= ttl <= MAX_TTL_S:
        raise StoreError(f"lease TTL must be a number of seconds from {MIN_TTL_S:g} to {MAX_TTL_S:g}, "
                         f"got {ttl!r}")
    return float(ttl)


def check(txn: lmdb.Transaction, dbs: Databases, agent_id: str, token: str) -> AgentRecord:
    """The caller's agent record if ``token`` still holds its lease, else LeaseLost.

    An expired lease that nobody took over still holds: the agent was only slow, and no other
    process can have written for it.
    """
    record = get_record(txn, dbs.agents, agent_id, AgentRecord, "agents")
    if record is None:
        raise LeaseLost(agent_id, "no lease was ever acquired")
    if not token or record.lease_token != token:
        raise LeaseLost(agent_id, "released or taken over by another process")
    return record


def acquire(txn: lmdb.Transaction, dbs: Databases, agent_id: str, task: str, *, ttl: float,
            now: float, host: str, pid: int, device: str, endpoint: str, preset: str,
            kind: str = SINGLE) -> str:
    """Take the lease (see Store.acquire_lease) and return the new token."""
    ttl = checked_ttl(ttl)
    existing = get_record(txn, dbs.agents, agent_id, AgentRecord, "agents")
    if existing is not None and (existing.task, existing.kind) != (task, kind):
        raise Conflict(f"agent id {agent_id!r} serves task {existing.task!r} as its {existing.kind} "
                       f"agent, not {task!r} as its {kind} agent: use another agent id")
    same_task = [a for a in iter_records(txn, dbs.agents, AgentRecord, "agents")
                 if a.task == task and a.kind == kind]
    for other in same_task:
        if other.lease_live(now):
            raise LeaseHeld(agent_id, f"{other.agent_id} (pid {other.pid} on {other.host})",
                            other.lease_expiry - now)
    for other in same_task:  # stale holders of this task under other ids lose their token
        if other.agent_id != agent_id and other.lease_token:
            put_record(txn, dbs.agents, other.agent_id,
                       dataclasses.replace(other, lease_token="", lease_expiry=0.0,
                                           state="superseded"))
    token = secrets.token_hex(16)
    record = AgentRecord(agent_id=agent_id, task=task, host=host, pid=pid, device=device,
                         endpoint=endpoint, preset=preset, lease_token=token,
                         lease_expiry=now + ttl, heartbeat_at=now, state="starting",
                         progress={}, kind=kind).validated()
    put_record(txn, dbs.agents, agent_id, record)
    return token


def heartbeat(txn: lmdb.Transaction, dbs: Databases, agent_id: str, token: str, *, ttl: float,
              now: float, state: str | None, progress: dict | None,
              endpoint: str | None) -> AgentRecord:
    """Extend the lease to now + ttl and update the optional fields."""
    ttl = checked_ttl(ttl)
    record = check(txn, dbs, agent_id, token)
    changes: dict[str, Any] = {"lease_expiry": now + ttl, "heartbeat_at": now}
    if state is not None:
        changes["state"] = state
    if progress is not None:
        changes["progress"] = dict(progress)
    if endpoint is not None:
        changes["endpoint"] = endpoint
    record = dataclasses.replace(record, **changes).validated()
    put_record(txn, dbs.agents, agent_id, record)
    return record


def release(txn: lmdb.Transaction, dbs: Databases, agent_id: str, token: str, *, state: str,
            now: float) -> None:
    """End the lease now; the record stays (for history) with an empty token."""
    record = check(txn, dbs, agent_id, token)
    record = dataclasses.replace(record, lease_token="", lease_expiry=0.0, state=state,
                                 heartbeat_at=now).validated()
    put_record(txn, dbs.agents, agent_id, record)
