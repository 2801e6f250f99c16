"""Consistency check, garbage collection and statistics over a whole store.

``verify`` is the oracle of the crash and concurrency tests: it re-hashes every blob and follows every
reference in one read transaction (a consistent snapshot, so it can run while agents write).
``gc`` runs in one write transaction, so agents committing at the same time either see everything it
keeps or get MissingReference for what it removed; they never see half of a collection.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb

from protocol.tensors import ProtocolError, blob_key, decode_blob
from store.codec import decode_seq_key, decode_str_key, unpack_value
from store.env import DB_NAMES, Databases
from store.errors import StoreError
from store.records import (AgentRecord, AgentState, ComponentRecord, Event, ModelRecord,
                           TaskRecord, TrialRecord, parse_component_id)
from store.txnops import append_event, read_meta


@dataclass
class VerifyResult:
    """Problems found (empty = consistent) and how much was checked."""

    problems: list[str] = field(default_factory=list)
    blobs: int = 0
    components: int = 0
    models: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode_all(txn: lmdb.Transaction, db: Any, cls: type, what: str, key_field: str,
                problems: list[str]) -> dict[str, Any]:
    """Decode every record of ``db``; report undecodable ones and keys that disagree with ids."""
    out: dict[str, Any] = {}
    with txn.cursor(db=db) as cursor:
        for raw_key, raw in cursor:
            try:
                key = decode_str_key(raw_key, what)
                record = cls.from_dict(unpack_value(raw, f"{what}/{key}"))
            except StoreError as exc:
                problems.append(str(exc))
                continue
            if getattr(record, key_field) != key:
                problems.append(f"{what}/{key}: record says {key_field}="
                                f"{getattr(record, key_field)!r}")
            out[key] = record
    return out


def _verify_blobs(txn: lmdb.Transaction, dbs: Databases, problems: list[str]) -> set[str]:
    keys: set[str] = set()
    with txn.cursor(db=dbs.blobs) as cursor:
        for raw_key, raw in cursor:
            key = bytes(raw_key).decode("utf-8", "replace")
            keys.add(key)
            try:
                actual = blob_key(decode_blob(raw))
            except ProtocolError as exc:
                problems.append(f"blob {key}: undecodable ({exc})")
                continue
            if actual != key:
                problems.append(f"blob {key}: content hashes to {actual} (corrupted bytes)")
    return keys


def verify(txn: lmdb.Transaction, dbs: Databases) -> VerifyResult:
    """Check every invariant of docs/design.md section 4 that can be checked from the stored data."""
    result = VerifyResult()
    problems = result.problems
    try:
        meta = read_meta(txn, dbs)
    except StoreError as exc:
        problems.append(str(exc))
        meta = None
    if meta is None:
        problems.append("meta: missing")
    blobs = _verify_blobs(txn, dbs, problems)
    components = _decode_all(txn, dbs.components, ComponentRecord, "components", "id", problems)
    models = _decode_all(txn, dbs.models, ModelRecord, "models", "id", problems)
    tasks = _decode_all(txn, dbs.tasks, TaskRecord, "tasks", "key", problems)
    _decode_all(txn, dbs.agents, AgentRecord, "agents", "agent_id", problems)
    states = _decode_all(txn, dbs.agent_state, AgentState, "agent_state", "agent_id", problems)
    _decode_all(txn, dbs.trials, TrialRecord, "trials", "id", problems)
    result.blobs, result.components, result.models = len(blobs), len(components), len(models)

    for cid, comp in components.items():
        try:
            owner, _ = parse_component_id(cid)
        except ValueError as exc:
            problems.append(f"components/{cid}: {exc}")
        else:
            if owner != comp.agent:
                problems.append(f"components/{cid}: id names owner {owner!r} but agent is "
                                f"{comp.agent!r}")
        for part in (comp.tensors, comp.momentum):
            for name, key in part.items():
                if key not in blobs:
                    problems.append(f"components/{cid}: tensor {name!r} refers to missing blob {key}")
    for mid, model in models.items():
        for cid in model.components:
            if cid not in components:
                problems.append(f"models/{mid}: refers to missing component {cid}")
        if model.parent is not None and model.parent not in models:
            problems.append(f"models/{mid}: parent {model.parent} is missing")
        for ref in model.refs:  # a multipath model's pinned paths
            if ref not in models:
                problems.append(f"models/{mid}: runs model {ref}, which is missing")
    for key, pointer in tasks.items():
        task = pointer.task
        target = models.get(pointer.model_id)
        if target is None:
            problems.append(f"tasks/{task}: points to missing model {pointer.model_id}")
        elif target.task != task:
            problems.append(f"tasks/{task}: points to model {pointer.model_id} of task "
                            f"{target.task!r}")
        elif target.kind != pointer.kind:
            problems.append(f"tasks/{task}: the {pointer.kind} pointer names {target.kind} model "
                            f"{pointer.model_id}")
    for agent_id, state in states.items():
        for mid in [*state.population, *([state.best_model_id] if state.best_model_id else [])]:
            if mid not in models:
                problems.append(f"agent_state/{agent_id}: refers to missing model {mid}")
    if meta is not None and meta["root_model_id"] and meta["root_model_id"] not in models:
        problems.append(f"meta: root model {meta['root_model_id']} is missing")
    _verify_events(txn, dbs, problems)
    return result


def _verify_events(txn: lmdb.Transaction, dbs: Databases, problems: list[str]) -> None:
    expected = 1
    with txn.cursor(db=dbs.events) as cursor:
        for raw_key, raw in cursor:
            try:
                seq = decode_seq_key(raw_key)
                event = Event.from_dict(unpack_value(raw, f"events/{seq}"))
            except StoreError as exc:
                problems.append(str(exc))
                expected += 1
                continue
            if seq != expected:
                problems.append(f"events: expected seq {expected}, found {seq} (gap)")
            if event.seq != seq:
                problems.append(f"events/{seq}: record says seq={event.seq}")
            expected = seq + 1


def gc(txn: lmdb.Transaction, dbs: Databases, grace_seconds: float,
       now: float | None = None) -> dict[str, int]:
    """Delete what no live model needs; see Store.gc for what counts as live."""
    now = time.time() if now is None else now
    cutoff = now - grace_seconds
    problems: list[str] = []
    meta = read_meta(txn, dbs) or {}
    models = _decode_all(txn, dbs.models, ModelRecord, "models", "id", problems)
    components = _decode_all(txn, dbs.components, ComponentRecord, "components", "id", problems)
    tasks = _decode_all(txn, dbs.tasks, TaskRecord, "tasks", "key", problems)
    states = _decode_all(txn, dbs.agent_state, AgentState, "agent_state", "agent_id", problems)
    if problems:  # never delete on a store we cannot fully read: we might drop live data
        raise StoreError(f"gc refused: store has undecodable records ({problems[0]}); "
                         f"run `query.py verify`")

    seeds = {meta.get("root_model_id")} | {t.model_id for t in tasks.values()}
    for state in states.values():
        seeds.update(state.population)
        seeds.add(state.best_model_id)
    seeds.update(mid for mid, m in models.items() if m.created_at >= cutoff)
    live_models: set[str] = set()
    todo = list(seeds)
    while todo:  # ancestors, and the models a live model runs by reference (pinned paths)
        mid = todo.pop()
        if mid is None or mid not in models or mid in live_models:
            continue
        live_models.add(mid)
        todo.append(models[mid].parent)
        todo.extend(models[mid].refs)

    live_components = {cid for mid in live_models for cid in models[mid].components}
    live_components.update(cid for cid, c in components.items() if c.created_at >= cutoff)
    live_blobs = {key for cid in live_components if cid in components
                  for part in (components[cid].tensors, components[cid].momentum)
                  for key in part.values()}

    dead_models = [mid for mid in models if mid not in live_models]
    dead_components = [cid for cid in components if cid not in live_components]
    for mid in dead_models:
        txn.delete(mid.encode(), db=dbs.models)
    for cid in dead_components:
        txn.delete(cid.encode(), db=dbs.components)
    freed = 0
    dead_blobs = 0
    with txn.cursor(db=dbs.blobs) as cursor:
        doomed = [bytes(k) for k in cursor.iternext(keys=True, values=False)
                  if bytes(k).decode("utf-8", "replace") not in live_blobs]
    for key in doomed:
        value = txn.get(key, db=dbs.blobs)
        freed += len(value)
        txn.delete(key, db=dbs.blobs)
        dead_blobs += 1
    counts = {"models": len(dead_models), "components": len(dead_components),
              "blobs": dead_blobs, "bytes_freed": freed}
    append_event(txn, dbs, "gc", task=None, agent=None, model_id=None, data=dict(counts), now=now)
    return counts


def stats(env: lmdb.Environment, txn: lmdb.Transaction, dbs: Databases, path: str) -> dict:
    """Entry counts per database, blob bytes, and how much of the map and file is used."""
    counts = {name: txn.stat(getattr(dbs, name))["entries"] for name in DB_NAMES}
    blob_bytes = 0
    with txn.cursor(db=dbs.blobs) as cursor:
        for _, value in cursor:
            blob_bytes += len(value)
    info, env_stat = env.info(), env.stat()
    meta = read_meta(txn, dbs) or {}
    data_file = os.path.join(path, "data.mdb")
    with txn.cursor(db=dbs.events) as cursor:
        last_seq = decode_seq_key(cursor.key()) if cursor.last() else 0
    return {
        "path": path,
        "schema_version": meta.get("schema_version"),
        "root_model_id": meta.get("root_model_id"),
        "counts": counts,
        "blob_bytes": blob_bytes,
        "map_size": info["map_size"],
        "used_bytes": (info["last_pgno"] + 1) * env_stat["psize"],
        "file_bytes": os.path.getsize(data_file) if os.path.exists(data_file) else 0,
        "last_event_seq": last_seq,
        "readers": info["num_readers"],
    }
