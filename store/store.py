"""The LMDB parameter store: one environment per directory, one ``Store`` object per process.

Every public operation is one LMDB transaction. Writes (``commit``, ``ensure_root``, leases, ``gc``)
are serialised by LMDB's single write lock, so checks made inside a write transaction (lease owner,
references, immutability) hold at the moment of commit. Reads use short read transactions that see a
consistent snapshot and never block the writer. Tensors returned by reads are copied out of the
transaction so they outlive it.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import lmdb

from store import leases, maintenance, txnops
from store.env import SharedEnvironment, resolve_map_size
from store.errors import Conflict, MissingReference, NotAStore, StoreError, StoreFull, disk_error
from store.records import (SINGLE, served, AgentRecord, AgentState, ComponentRecord, ComponentWrite, Event,
                           ModelRecord, Publication, TaskRecord, TrialRecord, parse_component_id,
                           plain_value)
from store.txnops import TensorDict


class Store:
    """Handle on one store directory, valid only in the process that opened it."""

    def __init__(self, path: str, shared: SharedEnvironment, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self._shared: SharedEnvironment | None = shared
        self._env: lmdb.Environment | None = shared.env
        self._dbs = shared.dbs
        self._pid = os.getpid()

    # ---- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, readonly: bool = False, create: bool = False,
             map_size: int | None = None) -> Store:
        """Open the store at ``path``; ``create=True`` makes it (and its meta) if missing.

        Several Stores on one directory in one process share a single LMDB environment (LMDB
        allows only one per process); a read-only Store may share a writable environment.
        """
        path = os.fspath(path)
        shared = SharedEnvironment.acquire(path, readonly=readonly, create=create,
                                           map_size=map_size)
        env, dbs = shared.env, shared.dbs
        try:
            if not readonly:
                env.reader_check()  # free reader slots left behind by crashed processes
                with env.begin(write=True) as txn:
                    meta = txnops.read_meta(txn, dbs)
                    if meta is None and create:
                        meta = txnops.new_meta()
                        txnops.write_meta(txn, dbs, meta)
            else:
                with env.begin() as txn:
                    meta = txnops.read_meta(txn, dbs)
            if meta is None:
                raise NotAStore(path, "no meta record")
            txnops.check_schema(meta, path)
        except lmdb.MapFullError:
            shared.release()
            raise StoreFull(resolve_map_size(map_size)) from None
        except lmdb.Error as exc:
            shared.release()
            raise (disk_error(path, exc) or exc) from None
        except BaseException:
            shared.release()
            raise
        return cls(path, shared, readonly)

    def close(self) -> None:
        shared, self._shared, self._env = self._shared, None, None
        # never close an env inherited through fork: the parent still owns its reader slots
        if shared is not None and os.getpid() == self._pid:
            shared.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise StoreError("a Store cannot be pickled or sent to another process: pass the store "
                         "path and call Store.open() in that process")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__reduce__()

    def __repr__(self) -> str:
        state = "closed" if self._env is None else ("readonly" if self.readonly else "writable")
        return f"Store({self.path!r}, {state})"

    def _live_env(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError(f"store {self.path} is closed")
        if os.getpid() != self._pid:
            raise StoreError(f"this Store of {self.path} was opened in process {self._pid}; open "
                             f"the store again in process {os.getpid()} (never share it across "
                             f"fork/spawn)")
        return self._env

    @property
    def map_size(self) -> int:
        return self._live_env().info()["map_size"]

    @contextmanager
    def _write(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """One write transaction: committed on success, aborted (nothing written) on any error."""
        env = self._live_env()
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only; open it writable to change it")
        try:
            with env.begin(write=True, buffers=buffers) as txn:
                yield txn
        except lmdb.MapFullError:
            raise StoreFull(env.info()["map_size"]) from None
        except lmdb.Error as exc:  # a full or failing disk: one line that says so, not mdb_txn_commit
            raise (disk_error(self.path, exc) or exc) from None

    @contextmanager
    def _read(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        with self._live_env().begin(write=False, buffers=buffers) as txn:
            yield txn

    # ---- writes ------------------------------------------------------------------------------------

    @staticmethod
    def _prepare_components(owner: str, writes: Sequence[ComponentWrite]
                            ) -> list[tuple[ComponentRecord, TensorDict]]:
        """Hash and validate outside the write lock; enforce that ``owner`` created each one."""
        prepared = []
        for write in writes:
            record, blobs = write.resolved()
            record = record.validated()
            try:
                id_owner, _ = parse_component_id(record.id)
            except ValueError as exc:
                raise StoreError(str(exc)) from None
            if record.agent != owner or id_owner != owner:
                raise Conflict(f"component {record.id} (agent {record.agent!r}) cannot be written "
                               f"by {owner!r}: each component id has exactly one writer, its agent")
            prepared.append((record, blobs))
        return prepared

    def _write_components(self, txn: lmdb.Transaction,
                          prepared: list[tuple[ComponentRecord, TensorDict]]) -> None:
        for record, blobs in prepared:
            for key, tensor in blobs.items():
                txnops.put_blob(txn, self._dbs, key, tensor)
            # a write may omit tensors the store already holds (the store service sends only the
            # blobs a store lacks): each one it omits must be there, or the component would dangle
            for key in [*record.tensors.values(), *record.momentum.values()]:
                if key not in blobs and not txnops.exists(txn, self._dbs.blobs, key):
                    raise MissingReference(f"component {record.id} refers to blob {key} which is "
                                           f"neither given nor in the store")
            txnops.put_immutable(txn, self._dbs.components, record.id, record, "component")

    def _check_model_refs(self, txn: lmdb.Transaction, model: ModelRecord,
                          new_models: dict[str, ModelRecord]) -> None:
        for cid in model.components:
            if not txnops.exists(txn, self._dbs.components, cid):
                raise MissingReference(f"model {model.id} refers to component {cid} which is not "
                                       f"in the store (deleted by gc or never committed)")
        for ref in model.refs:
            if ref not in new_models and not txnops.exists(txn, self._dbs.models, ref):
                raise MissingReference(f"model {model.id} runs model {ref} which is not in the "
                                       f"store (deleted by gc?): reload the system")
        if model.parent is not None and model.parent not in new_models \
                and not txnops.exists(txn, self._dbs.models, model.parent):
            raise MissingReference(f"model {model.id} has parent {model.parent} which is not in "
                                   f"the store (deleted by gc?): reload the population")

    def commit(self, agent_id: str, lease_token: str, *,
               components: Sequence[ComponentWrite] = (), models: Sequence[ModelRecord] = (),
               state: AgentState | None = None, publish: Publication | None = None,
               trials: Sequence[TrialRecord] = (), event_kind: str = "published",
               event_data: dict | None = None, request_id: str | None = None) -> int | None:
        """Write everything an agent produced in ONE transaction; see docs/design.md section 4.

        Returns the sequence number of the event appended when ``publish`` moves the task pointer,
        else None. On any error nothing at all is written. ``request_id`` (the store service's):
        a commit whose id was already applied returns the first reply and changes nothing.
        """
        if publish is not None and not isinstance(publish, Publication):
            raise StoreError(f"publish must be a Publication, got {type(publish).__name__}")
        publish = publish.validated() if publish is not None else None
        prepared = self._prepare_components(agent_id, components)
        models = [m.validated() for m in models]
        trials = [t.validated() for t in trials]
        state = state.validated() if state is not None else None
        for owned in [*models, *trials, *([state] if state else [])]:
            owner = getattr(owned, "agent", None) or getattr(owned, "agent_id", None)
            if owner != agent_id:
                raise Conflict(f"{type(owned).__name__} of agent {owner!r} cannot be written by "
                               f"{agent_id!r}: every agent writes only its own records")
        event_data = plain_value(dict(event_data or {}), "event_data")
        new_models = {m.id: m for m in models}
        with self._write() as txn:
            done, prior = txnops.recorded_reply(txn, self._dbs, request_id)
            if done:
                return prior
            agent = leases.check(txn, self._dbs, agent_id, lease_token)
            for owned in [*models, *trials, *([state] if state else [])]:
                if owned.task != agent.task:
                    raise Conflict(f"agent {agent_id} serves task {agent.task!r} and cannot write "
                                   f"a {type(owned).__name__} of task {owned.task!r}")
            self._write_components(txn, prepared)
            for model in models:
                self._check_model_refs(txn, model, new_models)
                txnops.put_immutable(txn, self._dbs.models, model.id, model, "model")
            if state is not None:
                txnops.put_record(txn, self._dbs.agent_state, agent_id, state)
            for trial in trials:
                txnops.put_immutable(txn, self._dbs.trials, trial.id, trial, "trial")
            seq = None
            if publish is not None:
                seq = self._publish(txn, agent, publish, event_kind, event_data)
            txnops.record_reply(txn, self._dbs, request_id, seq)
            return seq

    def _publish(self, txn: lmdb.Transaction, agent: AgentRecord, pub: Publication, kind: str,
                 event_data: dict) -> int:
        model = txnops.get_record(txn, self._dbs.models, pub.model_id, ModelRecord, "models")
        if model is None:
            raise MissingReference(f"cannot publish model {pub.model_id}: it is not in the store")
        if model.task != agent.task:
            raise Conflict(f"agent {agent.agent_id} cannot publish model {pub.model_id} of task "
                           f"{model.task!r} for its task {agent.task!r}")
        if model.kind != agent.kind:
            raise Conflict(f"{agent.kind} agent {agent.agent_id} cannot publish {model.kind} model "
                           f"{pub.model_id}")
        now = time.time()
        pointer = TaskRecord(task=model.task, model_id=model.id, agent=agent.agent_id,
                             num_classes=pub.num_classes, data_spec=dict(pub.data_spec),
                             updated_at=now, kind=agent.kind, score=pub.score)
        txnops.put_record(txn, self._dbs.tasks, pointer.key, pointer.validated())
        data = {**event_data, "kind": agent.kind} if agent.kind != SINGLE else event_data
        return txnops.append_event(txn, self._dbs, kind, task=model.task, agent=agent.agent_id,
                                   model_id=model.id, data=data, now=now)

    def ensure_root(self, model: ModelRecord, components: Sequence[ComponentWrite], *,
                    request_id: str | None = None) -> str:
        """Write the root model once; every later call (from any process) returns the same id."""
        model = model.validated()
        prepared = self._prepare_components(model.agent, components)
        with self._write() as txn:
            meta = txnops.read_meta(txn, self._dbs)
            if meta["root_model_id"]:
                return meta["root_model_id"]  # idempotent by itself: no reply to record
            self._write_components(txn, prepared)
            self._check_model_refs(txn, model, {})
            txnops.put_immutable(txn, self._dbs.models, model.id, model, "model")
            meta["root_model_id"] = model.id
            txnops.write_meta(txn, self._dbs, meta)
            txnops.append_event(txn, self._dbs, "root", task=model.task, agent=model.agent,
                                model_id=model.id, data={})
        return model.id

    # ---- leases ------------------------------------------------------------------------------------

    def acquire_lease(self, agent_id: str, task: str, *, ttl: float, host: str, pid: int,
                      device: str, endpoint: str, preset: str, kind: str = SINGLE,
                      now: float | None = None, request_id: str | None = None) -> str:
        """Take the lease of ``agent_id`` (the ``kind`` agent of ``task``) and return its new token.

        Refused with LeaseHeld while another live lease exists for this agent id or for another
        agent id serving the same task with the same kind (a task's single-path and multipath
        agents run side by side). Taking a task over from a stale agent revokes that agent's
        token, so the stale process gets LeaseLost instead of becoming a second writer of the task.
        """
        now = time.time() if now is None else now
        with self._write() as txn:
            done, prior = txnops.recorded_reply(txn, self._dbs, request_id)
            if done:
                return prior
            token = leases.acquire(txn, self._dbs, agent_id, task, ttl=ttl, now=now, host=host,
                                   pid=pid, device=device, endpoint=endpoint, preset=preset,
                                   kind=kind)
            txnops.record_reply(txn, self._dbs, request_id, token, now)
            return token

    def heartbeat(self, agent_id: str, token: str, *, ttl: float, state: str | None = None,
                  progress: dict | None = None, endpoint: str | None = None,
                  now: float | None = None, request_id: str | None = None) -> AgentRecord:
        """Extend the lease to now + ttl and update state/progress; LeaseLost if taken over."""
        now = time.time() if now is None else now
        with self._write() as txn:
            done, prior = txnops.recorded_reply(txn, self._dbs, request_id)
            if done:
                return AgentRecord.from_dict(prior)
            record = leases.heartbeat(txn, self._dbs, agent_id, token, ttl=ttl, now=now,
                                      state=state, progress=progress, endpoint=endpoint)
            if request_id is not None:
                txnops.record_reply(txn, self._dbs, request_id, record.to_dict(), now)
            return record

    def heartbeats(self, beats: Sequence[dict], now: float | None = None
                   ) -> list[AgentRecord | Exception]:
        """Several heartbeats in ONE write transaction (one sync for all: each is a few hundred
        bytes, the sync is what costs; the store service batches the ones waiting together). Each
        ``beats`` item holds ``heartbeat``'s arguments (agent_id, token, ttl, state, progress,
        endpoint); a refused one (LeaseLost, a bad value) comes back as its exception and writes
        nothing, the others commit."""
        now = time.time() if now is None else now
        out: list[AgentRecord | Exception] = []
        with self._write() as txn:
            for b in beats:
                try:
                    out.append(leases.heartbeat(txn, self._dbs, now=now, **b))
                except (StoreError, ValueError, TypeError) as exc:
                    out.append(exc)
        return out

    def release_lease(self, agent_id: str, token: str, state: str = "stopped", *,
                      request_id: str | None = None) -> None:
        """End the lease now (the record stays, for history); LeaseLost if no longer held."""
        with self._write() as txn:
            done, _ = txnops.recorded_reply(txn, self._dbs, request_id)
            if done:
                return
            leases.release(txn, self._dbs, agent_id, token, state=state, now=time.time())
            txnops.record_reply(txn, self._dbs, request_id, None)

    # ---- reads -------------------------------------------------------------------------------------

    def meta(self) -> dict:
        with self._read() as txn:
            return txnops.read_meta(txn, self._dbs)

    def root_model_id(self) -> str | None:
        return self.meta()["root_model_id"]

    def get_model(self, model_id: str) -> ModelRecord | None:
        with self._read() as txn:
            return txnops.get_record(txn, self._dbs.models, model_id, ModelRecord, "models")

    def get_component(self, component_id: str) -> ComponentRecord | None:
        with self._read() as txn:
            return txnops.get_record(txn, self._dbs.components, component_id, ComponentRecord,
                                     "components")

    def pointers(self) -> list[TaskRecord]:
        """Every published pointer: one per (task, agent kind) that has published."""
        with self._read() as txn:
            return list(txnops.iter_records(txn, self._dbs.tasks, TaskRecord, "tasks"))

    def get_task(self, task: str) -> TaskRecord | None:
        """The pointer that serves ``task``: its best-scoring kind (see records.served)."""
        return served(p for p in self.pointers() if p.task == task).get(task)

    def tasks(self) -> list[TaskRecord]:
        """The serving pointer of every task, by task name."""
        return sorted(served(self.pointers()).values(), key=lambda p: p.task)

    def published_models(self, kind: str | None = None) -> dict[str, ModelRecord]:
        """Task -> the model that serves it (None), or that its ``kind`` agent publishes; from one
        snapshot."""
        with self._read() as txn:
            out = {}
            every = list(txnops.iter_records(txn, self._dbs.tasks, TaskRecord, "tasks"))
            chosen = served(every).values() if kind is None else [p for p in every if p.kind == kind]
            for pointer in chosen:
                model = txnops.get_record(txn, self._dbs.models, pointer.model_id, ModelRecord,
                                          "models")
                if model is None:
                    raise MissingReference(f"task {pointer.task} points to missing model "
                                           f"{pointer.model_id}; run `query.py verify`")
                out[pointer.task] = model
            return out

    def agents(self) -> list[AgentRecord]:
        with self._read() as txn:
            return list(txnops.iter_records(txn, self._dbs.agents, AgentRecord, "agents"))

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        with self._read() as txn:
            return txnops.get_record(txn, self._dbs.agents, agent_id, AgentRecord, "agents")

    def live_agents(self, now: float | None = None) -> list[AgentRecord]:
        now = time.time() if now is None else now
        return [a for a in self.agents() if a.lease_live(now)]

    def get_agent_state(self, agent_id: str) -> AgentState | None:
        with self._read() as txn:
            return txnops.get_record(txn, self._dbs.agent_state, agent_id, AgentState,
                                     "agent_state")

    def trials(self, agent: str | None = None, task: str | None = None) -> list[TrialRecord]:
        """Trials in creation order, optionally filtered by agent and/or task."""
        with self._read() as txn:
            found = [t for t in txnops.iter_records(txn, self._dbs.trials, TrialRecord, "trials")
                     if (agent is None or t.agent == agent) and (task is None or t.task == task)]
        return sorted(found, key=lambda t: (t.created_at, t.id))

    def models(self, agent: str | None = None) -> list[ModelRecord]:
        """Models in creation order, optionally only those of one agent."""
        with self._read() as txn:
            found = [m for m in txnops.iter_records(txn, self._dbs.models, ModelRecord, "models")
                     if agent is None or m.agent == agent]
        return sorted(found, key=lambda m: (m.created_at, m.id))

    def events(self, after: int = 0, limit: int | None = None) -> list[Event]:
        """Events with seq > ``after``, in seq order, at most ``limit`` of them."""
        out: list[Event] = []
        with self._read() as txn:
            for event in txnops.iter_events(txn, self._dbs, after):
                if limit is not None and len(out) >= limit:
                    break
                out.append(event)
        return out

    def last_event_seq(self) -> int:
        with self._read() as txn:
            return txnops.last_seq(txn, self._dbs)

    def poll_events(self, after: int) -> list[Event]:
        """New events since ``after`` without waiting (one short read here; a service client asks
        its service only when the service's doorbell rang, see store/service)."""
        return self.events(after=after)

    def load_component_tensors(self, component_id: str, momentum: bool = True
                               ) -> tuple[TensorDict, TensorDict]:
        """(params, momentum) of one component, copied out of the store (``momentum=False``: the
        params alone, the momentum blobs are not read).

        Each tensor's ``data`` is a writable memoryview into a buffer owned by the result (e.g.
        ``torch.frombuffer(t.data, dtype=...)`` wraps it without another copy).
        """
        with self._read(buffers=True) as txn:
            return txnops.load_components(txn, self._dbs, [component_id], momentum)[component_id]

    def load_model_tensors(self, model_id: str) -> dict[str, tuple[TensorDict, TensorDict]]:
        """component id -> (params, momentum) for every component of a model, in ONE read txn."""
        with self._read(buffers=True) as txn:
            model = txnops.get_record(txn, self._dbs.models, model_id, ModelRecord, "models")
            if model is None:
                raise MissingReference(f"model {model_id} is not in the store")
            return txnops.load_components(txn, self._dbs, model.components)

    def tensor_shapes(self, component_id: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """tensor name -> (dtype, shape) of a component's params, read from blob headers only."""
        with self._read(buffers=True) as txn:
            return txnops.tensor_shapes(txn, self._dbs, component_id)

    # ---- maintenance -------------------------------------------------------------------------------

    def check(self) -> maintenance.VerifyResult:
        """Full consistency check with counts (``verify`` returns only the problems)."""
        with self._read(buffers=True) as txn:
            return maintenance.verify(txn, self._dbs)

    def verify(self) -> list[str]:
        """Problems found (empty list = consistent); re-hashes every blob."""
        return self.check().problems

    def gc(self, grace_seconds: float = 3600, now: float | None = None, *,
           request_id: str | None = None) -> dict[str, int]:
        """Delete models no longer reachable, then orphaned components, then orphaned blobs.

        Live models: the root, every task pointer, every agent_state population and best model,
        all their ancestors, and any model created within ``grace_seconds``. Components created
        within the grace period are kept too (an agent may be about to reference them).
        """
        with self._write(buffers=True) as txn:
            done, prior = txnops.recorded_reply(txn, self._dbs, request_id)
            if done:
                return dict(prior)
            counts = maintenance.gc(txn, self._dbs, grace_seconds, now)
            txnops.record_reply(txn, self._dbs, request_id, counts)
            return counts

    def stats(self) -> dict:
        with self._read(buffers=True) as txn:
            return maintenance.stats(self._live_env(), txn, self._dbs, self.path)

    # ---- for the store service (store/service/server.py) -------------------------------------------

    def blob_sizes(self, keys: Sequence[str]) -> dict[str, int | None]:
        """Stored size in bytes (header + data) of each blob, None for the ones not here."""
        out: dict[str, int | None] = {}
        with self._read(buffers=True) as txn:
            for key in keys:
                raw = txn.get(txnops.str_key(key), db=self._dbs.blobs)
                out[key] = None if raw is None else len(raw)
        return out

    def read_blob_ranges(self, reads: Sequence[tuple[str, int, int]]) -> list[bytes | None]:
        """Bytes [offset, offset + length) of each stored blob value (None: no such blob), copied
        out of one read transaction."""
        out: list[bytes | None] = []
        with self._read(buffers=True) as txn:
            for key, offset, length in reads:
                raw = txn.get(txnops.str_key(key), db=self._dbs.blobs)
                out.append(None if raw is None else bytes(raw[offset:offset + length]))
        return out

    def prune_replies(self, older_than: float) -> int:
        """Forget recorded replies of requests older than ``older_than`` (unix seconds)."""
        with self._write() as txn:
            return txnops.prune_replies(txn, self._dbs, older_than)
