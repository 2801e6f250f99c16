"""``RemoteStore``: the ``StoreAPI`` of a store served by ``launch/serve_store.py`` on another host.

Same calls, same results (the records of ``store.records``, ``RawTensor``), same exceptions with
the same messages as a local ``Store``; code that takes a ``StoreAPI`` cannot tell them apart. The
differences are where the work happens:

- Reads are one request each. Leases, liveness and event times use the service's clock.
- Tensors: a model's component records and blob sizes come in one ``manifest`` request; each blob
  this host has not cached is then fetched in chunks (``CHUNK_BYTES``, ``CREDIT`` requests in
  flight) into the host's blob cache (``blobcache``), so a model is fetched once per host.
- Commits: the blobs the service lacks are uploaded first in chunks (staged and hash-checked
  there), then one small ``commit`` request carries the records; the service writes all of it in
  one transaction. The commit's request id makes a resend (after a lost reply, a dead service)
  apply once. A dropped connection mid-blob resumes from the offset the service reached.
- ``poll_events`` asks the service only when its doorbell rang (or every few seconds).
"""
from __future__ import annotations

import re
import time
from typing import Any, Sequence

from protocol.tensors import encode_blob
from store.errors import MissingReference, StoreError
from store.maintenance import VerifyResult
from store.records import (AgentRecord, AgentState, ComponentRecord, ComponentWrite, Event,
                           ModelRecord, Publication, TaskRecord, TrialRecord, plain_value)
from store.service import wire
from store.service.blobcache import BlobCache, as_tensor
from store.service.channel import Channel
from store.service.keys import load_client_keys
from store.txnops import TensorDict

_SPEC = re.compile(r"^tcp://([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})$")
POLL_FALLBACK_SECONDS = 5.0
MAX_UPLOAD_ROUNDS = 50


def parse_endpoint(spec: str) -> tuple[str, int]:
    """(host, port) of ``tcp://HOST:PORT``; ServiceUserError for anything else."""
    match = _SPEC.match(str(spec))
    if not match or not 0 < int(match.group(2)) < 65536:
        raise wire.ServiceUserError(f"store {spec!r} is not tcp://HOST:PORT (a store service) "
                                    f"nor a directory")
    return match.group(1), int(match.group(2))


def plan_chunks(spans: dict[str, tuple[int, int]]) -> list[list[list]]:
    """Group byte ranges [start, total) of blobs into requests of at most CHUNK_BYTES bytes and
    MAX_DATA_FRAMES ranges: a large blob spans several requests, many small ones share one."""
    batches: list[list[list]] = []
    batch: list[list] = []
    size = 0
    for key, (start, total) in spans.items():
        offset = start
        while offset < total:
            n = min(wire.CHUNK_BYTES - size, total - offset)
            batch.append([key, offset, n])
            size += n
            offset += n
            if size >= wire.CHUNK_BYTES or len(batch) >= wire.MAX_DATA_FRAMES:
                batches.append(batch)
                batch, size = [], 0
    if batch:
        batches.append(batch)
    return batches


MAX_REMEMBERED_COMPONENTS = 100_000  # records are ~0.5 KB: a bound, not a budget


class RemoteStore:
    """A client of one store service; thread-safe (an agent's heartbeat thread shares it)."""

    def __init__(self, spec: str, channel: Channel, cache: BlobCache, readonly: bool) -> None:
        self.path = spec
        self.readonly = readonly
        self.channel = channel
        self.cache = cache
        self._polled_at = 0.0
        self._polled_seq = -1
        self.bytes_fetched = 0
        self.bytes_uploaded = 0
        # Components are immutable once written: their records are kept for this process's life,
        # so loading a component whose blobs this host has cached asks the service nothing.
        self._components: dict[str, ComponentRecord] = {}

    @classmethod
    def connect(cls, spec: str, *, readonly: bool = False, keys: str | None = None,
                cache_dir: str | None = None, connect_timeout: float | None = None,
                retry_seconds: float | None = None) -> RemoteStore:
        """Connect to ``tcp://HOST:PORT`` (ServiceUnreachable, a user error, if nothing answers or
        the service refuses these keys). ``keys``: the KEYDIR with server.key and a client pair."""
        parse_endpoint(spec)
        client_keys = load_client_keys(keys) if keys else None
        channel = Channel(spec, keys=client_keys, connect_timeout=connect_timeout,
                          retry_seconds=retry_seconds)
        channel.connect()
        return cls(spec, channel, BlobCache(cache_dir), readonly)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteStore({self.path!r}, {'readonly' if self.readonly else 'writable'})"

    def _call(self, kind: str, request_id: str | None = None, /, **args: Any) -> Any:
        return self.channel.call(kind, args, request_id=request_id)[0]

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only; open it writable to "
                             f"change it")

    # ---- writes ----------------------------------------------------------------------------------

    def _resolve(self, writes: Sequence[ComponentWrite]) -> tuple[list[dict], dict]:
        records, blobs = [], {}
        for write in writes:
            record, tensors = write.resolved()
            records.append(record.validated().to_dict())
            blobs.update(tensors)
        return records, blobs

    def _send_with_blobs(self, kind: str, blobs: dict, args: dict) -> Any:
        request_id = wire.new_request_id()  # the same id for every resend of this change
        for _ in range(MAX_UPLOAD_ROUNDS):
            self._upload(blobs)
            try:
                return self._call(kind, request_id, **args)
            except wire.BlobsMissing:
                continue  # the service lost staged uploads (restart, expiry): upload again
        raise StoreError(f"{kind}: the service kept losing this client's uploads")

    def commit(self, agent_id: str, lease_token: str, *,
               components: Sequence[ComponentWrite] = (), models: Sequence[ModelRecord] = (),
               state: AgentState | None = None, publish: Publication | None = None,
               trials: Sequence[TrialRecord] = (), event_kind: str = "published",
               event_data: dict | None = None) -> int | None:
        self._writable()
        if publish is not None and not isinstance(publish, Publication):
            raise StoreError(f"publish must be a Publication, got {type(publish).__name__}")
        publish = publish.validated() if publish is not None else None
        records, blobs = self._resolve(components)
        args = {"agent_id": agent_id, "token": lease_token, "components": records,
                "models": [m.validated().to_dict() for m in models],
                "state": state.validated().to_dict() if state is not None else None,
                "publish": publish.to_dict() if publish is not None else None,
                "trials": [t.validated().to_dict() for t in trials], "event_kind": event_kind,
                "event_data": plain_value(dict(event_data or {}), "event_data")}
        return self._send_with_blobs("commit", blobs, args)

    def ensure_root(self, model: ModelRecord, components: Sequence[ComponentWrite]) -> str:
        self._writable()
        model = model.validated()
        records, blobs = self._resolve(components)
        return self._send_with_blobs("ensure_root", blobs,
                                     {"model": model.to_dict(), "components": records})

    def _upload(self, blobs: dict) -> None:
        """Make sure the service holds (stored or staged) every blob; resumes partial uploads."""
        if not blobs:
            return
        encoded: dict[str, bytes] = {}
        backoff, busy_since = 0.1, None
        rounds = 0
        while rounds < MAX_UPLOAD_ROUNDS:
            missing = self._call("blob_missing", keys=sorted(blobs))["missing"]
            if not missing:
                return
            for key in missing:
                if key not in encoded:
                    encoded[key] = encode_blob(blobs[key])
            batches = plan_chunks({k: (int(off), len(encoded[k])) for k, off in missing.items()})
            requests = [("blob_write", {"writes": [[k, o, len(encoded[k])] for k, o, n in batch]},
                         [memoryview(encoded[k])[o:o + n] for k, o, n in batch])
                        for batch in batches]
            reached: dict[str, int] = {}

            def note(i: int, result: Any, frames: list) -> None:
                for key, offset in (result or {}).get("received", {}).items():
                    reached[key] = max(reached.get(key, 0), int(offset))

            try:
                self.channel.pipeline(requests, note)
            except wire.ServiceBusy as exc:
                # no room now (the area, or this client's share, is full): not a failure of this
                # upload. Wait and retry within the give-up bound, then StoreUnavailable (exit 75:
                # an engine restarts the agent later) rather than a failure (exit 1).
                busy_since = busy_since if busy_since is not None else time.monotonic()
                if time.monotonic() - busy_since > self.channel.retry_seconds:
                    raise wire.ServiceUnavailable(
                        f"the store service had no room for this client's uploads for "
                        f"{self.channel.retry_seconds:g} s ({exc})") from None
                time.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            rounds += 1
            busy_since, backoff = None, 0.1
            self.bytes_uploaded += sum(n for batch in batches for _, _, n in batch)
            if all(reached.get(k) == len(encoded[k]) for k in missing):
                for key in missing:  # this host made these bytes: later loads need not fetch them
                    self.cache.put(key, encoded[key], made_here=True)
                return  # every blob arrived whole (and hash-checked there): no need to ask again
        raise StoreError("uploading blobs to the store service made no progress")

    def acquire_lease(self, agent_id: str, task: str, *, ttl: float, host: str, pid: int,
                      device: str, endpoint: str, preset: str, kind: str = "single") -> str:
        self._writable()
        return self._call("acquire_lease", wire.new_request_id(), agent_id=agent_id, task=task,
                          ttl=float(ttl), host=host, pid=int(pid), device=device,
                          endpoint=endpoint, preset=preset, kind=kind)

    def heartbeat(self, agent_id: str, token: str, *, ttl: float, state: str | None = None,
                  progress: dict | None = None, endpoint: str | None = None) -> AgentRecord:
        self._writable()
        return AgentRecord.from_dict(self._call(
            "heartbeat", wire.new_request_id(), agent_id=agent_id, token=token, ttl=float(ttl),
            state=state, progress=None if progress is None else plain_value(progress, "progress"),
            endpoint=endpoint))

    def release_lease(self, agent_id: str, token: str, state: str = "stopped") -> None:
        self._writable()
        self._call("release_lease", wire.new_request_id(), agent_id=agent_id, token=token,
                   state=state)

    def gc(self, grace_seconds: float = 3600) -> dict[str, int]:
        self._writable()
        return self._call("gc", wire.new_request_id(), grace_seconds=float(grace_seconds))

    # ---- records ---------------------------------------------------------------------------------

    def meta(self) -> dict:
        return self._call("meta")

    def root_model_id(self) -> str | None:
        return self._call("root_model_id")

    def get_model(self, model_id: str) -> ModelRecord | None:
        raw = self._call("get_model", model_id=model_id)
        return None if raw is None else ModelRecord.from_dict(raw)

    def _remember(self, rec: ComponentRecord) -> ComponentRecord:
        if len(self._components) >= MAX_REMEMBERED_COMPONENTS:
            self._components.clear()
        self._components[rec.id] = rec
        return rec

    def get_component(self, component_id: str) -> ComponentRecord | None:
        if component_id in self._components:
            return self._components[component_id]
        raw = self._call("get_component", component_id=component_id)
        return None if raw is None else self._remember(ComponentRecord.from_dict(raw))

    def get_task(self, task: str) -> TaskRecord | None:
        raw = self._call("get_task", task=task)
        return None if raw is None else TaskRecord.from_dict(raw)

    def tasks(self) -> list[TaskRecord]:
        return [TaskRecord.from_dict(t) for t in self._call("tasks")]

    def pointers(self) -> list[TaskRecord]:
        return [TaskRecord.from_dict(t) for t in self._call("pointers")]

    def published_models(self, kind: str | None = None) -> dict[str, ModelRecord]:
        return {t: ModelRecord.from_dict(m)
                for t, m in self._call("published_models", kind=kind).items()}

    def agents(self) -> list[AgentRecord]:
        return [AgentRecord.from_dict(a) for a in self._call("agents")]

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        raw = self._call("get_agent", agent_id=agent_id)
        return None if raw is None else AgentRecord.from_dict(raw)

    def live_agents(self) -> list[AgentRecord]:
        return [AgentRecord.from_dict(a) for a in self._call("live_agents")]

    def get_agent_state(self, agent_id: str) -> AgentState | None:
        raw = self._call("get_agent_state", agent_id=agent_id)
        return None if raw is None else AgentState.from_dict(raw)

    def trials(self, agent: str | None = None, task: str | None = None) -> list[TrialRecord]:
        return [TrialRecord.from_dict(t) for t in self._call("trials", agent=agent, task=task)]

    def models(self, agent: str | None = None) -> list[ModelRecord]:
        return [ModelRecord.from_dict(m) for m in self._call("models", agent=agent)]

    def events(self, after: int = 0, limit: int | None = None) -> list[Event]:
        out: list[Event] = []
        while limit is None or len(out) < limit:
            page = wire.EVENTS_PAGE if limit is None else min(wire.EVENTS_PAGE, limit - len(out))
            batch = [Event.from_dict(e) for e in self._call("events", after=after, limit=page)]
            out.extend(batch)
            if len(batch) < page:
                break
            after = batch[-1].seq
        return out

    def last_event_seq(self) -> int:
        return self._call("last_event_seq")

    def poll_events(self, after: int) -> list[Event]:
        """Events after ``after``, asking the service only when its doorbell rang since the last
        poll (or every few seconds, in case the doorbell is lost); never waits."""
        now = time.monotonic()
        seq = self.channel.doorbell_seq
        if seq <= after and seq == self._polled_seq and now - self._polled_at < POLL_FALLBACK_SECONDS:
            return []
        self._polled_at, self._polled_seq = now, seq
        return self.events(after=after)

    # ---- tensors ---------------------------------------------------------------------------------

    def _fetch(self, sizes: dict[str, int | None], what: dict[str, str]) -> dict[str, bytearray]:
        """Blob bytes by key: from this host's cache, else fetched in chunks and cached."""
        out: dict[str, bytearray] = {}
        need: dict[str, int] = {}
        for key, size in sizes.items():
            if size is None:
                raise MissingReference(f"{what.get(key, 'a component')} refers to blob {key} "
                                       f"which is not in the store; run `query.py verify`")
            cached = self.cache.get(key)
            if cached is not None:
                out[key] = cached
            else:
                need[key] = size
        if not need:
            return out
        bufs = {k: bytearray(n) for k, n in need.items()}
        batches = plan_chunks({k: (0, n) for k, n in need.items()})

        def land(i: int, result: Any, frames: list) -> None:
            for (key, offset, n), frame in zip(batches[i], frames):
                view = frame.buffer
                if len(view) != n:
                    raise StoreError(f"blob {key}: the service sent {len(view)} bytes for a "
                                     f"chunk of {n}")
                bufs[key][offset:offset + n] = view
                self.bytes_fetched += n

        self.channel.pipeline([("blob_read", {"reads": b}, ()) for b in batches], land)
        for key, buf in bufs.items():
            self.cache.put(key, buf)
            out[key] = buf
        return out

    def _tensors(self, manifest: dict, cids: list[str], momentum: bool = True
                 ) -> dict[str, tuple[TensorDict, TensorDict]]:
        records = {cid: self._remember(ComponentRecord.from_dict(manifest["components"][cid]))
                   for cid in cids}
        what = {k: f"component {cid}" for cid, r in records.items()
                for k in [*r.tensors.values(), *(r.momentum.values() if momentum else ())]}
        blobs = self._fetch(manifest["sizes"], what)
        return {cid: ({n: as_tensor(blobs[k]) for n, k in r.tensors.items()},
                      {n: as_tensor(blobs[k]) for n, k in r.momentum.items()} if momentum else {})
                for cid, r in records.items()}

    def _cached_tensors(self, component_id: str, momentum: bool = True
                        ) -> tuple[TensorDict, TensorDict] | None:
        """A known component whose blobs are all in this host's cache, read without a request."""
        rec = self._components.get(component_id)
        if rec is None:
            return None
        blobs = {}
        for key in [*rec.tensors.values(), *(rec.momentum.values() if momentum else ())]:
            blob = self.cache.get(key)
            if blob is None:
                return None
            blobs[key] = blob
        return ({n: as_tensor(blobs[k]) for n, k in rec.tensors.items()},
                {n: as_tensor(blobs[k]) for n, k in rec.momentum.items()} if momentum else {})

    def load_component_tensors(self, component_id: str, momentum: bool = True
                               ) -> tuple[TensorDict, TensorDict]:
        """``momentum=False``: the params alone; the momentum blobs are neither fetched nor read."""
        cached = self._cached_tensors(component_id, momentum)
        if cached is not None:
            return cached
        manifest = self._call("manifest", model_id=None, component_ids=[component_id])
        return self._tensors(manifest, [component_id], momentum)[component_id]

    def load_model_tensors(self, model_id: str) -> dict[str, tuple[TensorDict, TensorDict]]:
        manifest = self._call("manifest", model_id=model_id, component_ids=None)
        model = ModelRecord.from_dict(manifest["model"])
        return self._tensors(manifest, list(dict.fromkeys(model.components)))

    def tensor_shapes(self, component_id: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        shapes = self._call("tensor_shapes", component_id=component_id)
        return {name: (dtype, tuple(shape)) for name, (dtype, shape) in shapes.items()}

    # ---- maintenance and numbers -----------------------------------------------------------------

    def verify(self) -> list[str]:
        return list(self._call("verify"))

    def check(self) -> VerifyResult:
        return VerifyResult(**self._call("check"))

    def stats(self) -> dict:
        return self._call("stats")

    def health(self) -> dict:
        """The service's own counters: requests, dropped messages by reason, staging, uptime."""
        return self._call("health")
