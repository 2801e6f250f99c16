"""The store service's request handlers: one ``_h_<kind>`` method per request kind of ``wire``.

Each takes the request's checked arguments and data frames (and, for a mutating request, its id,
which the store records with the reply) and returns ``(result, data frames)``; raising is answered
with an error reply. ``StoreServer`` mixes these in; they use its ``store``, ``staging`` and
counters, and convert records to plain maps for msgpack.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from protocol.tensors import RawTensor
from store.check_child import check_in_child
from store.errors import MissingReference, StoreCorrupt, StoreError
from store.records import (AgentState, ComponentRecord, ComponentWrite, ModelRecord, Publication,
                           TrialRecord)
from store.service import wire
from store.service.staging import Staging


class StagedWrite(ComponentWrite):
    """A component whose blobs are staged uploads or already stored: ``tensors``/``momentum`` hold
    only the staged ones (hash-checked on arrival); the store checks that the others exist."""

    def resolved(self) -> tuple[ComponentRecord, dict[str, RawTensor]]:
        blobs = {self.record.tensors[n]: t for n, t in self.tensors.items()}
        blobs.update({self.record.momentum[n]: t for n, t in self.momentum.items()})
        return self.record, blobs


def _record(cls: type, data: Any) -> Any:
    try:
        return cls.from_dict(data)
    except StoreCorrupt as exc:  # the client's record, not a damaged store
        raise StoreError(str(exc)) from None


def _plain(value: Any) -> Any:
    return None if value is None else value.to_dict()


def _publication(d: dict) -> Publication:
    try:
        return Publication(model_id=d["model_id"], num_classes=d["num_classes"],
                           data_spec=d.get("data_spec") or {}, score=d.get("score"))
    except (KeyError, TypeError):
        raise StoreError("publish must be a map of model_id, num_classes, data_spec") from None


class Handlers:
    """Request handlers of ``StoreServer`` (a mixin: the attributes come from the server)."""

    # ---- reads -----------------------------------------------------------------------------------

    def _h_hello(self, args: dict, data: list) -> tuple[Any, list]:
        return {"server": self.server_id, "version": wire.VERSION, "path": self.store.path,
                "pub_port": int(self.pub_endpoint.rsplit(":", 1)[1]), "time": time.time(),
                "secure": self.keys is not None, "seq": self._last_seq,
                "limits": {"chunk": wire.CHUNK_BYTES, "credit": wire.CREDIT,
                           "max_data_frames": wire.MAX_DATA_FRAMES,
                           "max_frame": wire.MAX_FRAME_BYTES}}, []

    def health(self) -> dict:
        with self._count_lock:
            counts = {**self.counters, "dropped_by_reason": dict(self.dropped_by_reason),
                      "requests_by_kind": dict(self.requests_by_kind),
                      "errors_by_type": dict(self.errors_by_type)}
        return {"server": self.server_id, "uptime": time.time() - self.started_at,
                "endpoint": self.endpoint, "pub_endpoint": self.pub_endpoint,
                "secure": self.keys is not None,
                "authenticator_alive": bool(self._auth and self._auth.is_alive()),
                **counts, "read_workers": self.read_workers,
                "staged_blobs": len(self.staging), "staged_bytes": self.staging.bytes,
                "staging_dir": self.staging.folder,
                "uploads_resumed": self.staging.resumed,
                "uploads_recovered": self.staging.recovered,
                "upload_hash_failures": self.staging.hash_failures}

    def _h_health(self, args: dict, data: list) -> tuple[Any, list]:
        return self.health(), []

    def _h_meta(self, args, data):
        return self.store.meta(), []

    def _h_root_model_id(self, args, data):
        return self.store.root_model_id(), []

    def _h_tasks(self, args, data):
        return [t.to_dict() for t in self.store.tasks()], []

    def _h_published_models(self, args, data):
        return {t: m.to_dict()
                for t, m in self.store.published_models(kind=args.get("kind")).items()}, []

    def _h_pointers(self, args, data):
        return [t.to_dict() for t in self.store.pointers()], []

    def _h_agents(self, args, data):
        return [a.to_dict() for a in self.store.agents()], []

    def _h_live_agents(self, args, data):
        return [a.to_dict() for a in self.store.live_agents()], []

    def _h_last_event_seq(self, args, data):
        return self.store.last_event_seq(), []

    def _h_stats(self, args, data):
        return self.store.stats(), []

    def _full_check(self):
        """A full check in a low-priority child process (store/check_child.py): it re-hashes every
        blob, which would otherwise hold one core and Python's lock in the service beside the
        heartbeats. ``MUNET_STORE_CHECK_IN_PROCESS=1`` runs it here instead."""
        if os.environ.get("MUNET_STORE_CHECK_IN_PROCESS") == "1":
            return self.store.check()
        return check_in_child(self.store.path)

    def _h_verify(self, args, data):
        return self._full_check().problems, []

    def _h_check(self, args, data):
        return dataclasses.asdict(self._full_check()), []

    def _h_get_model(self, args, data):
        return _plain(self.store.get_model(args["model_id"])), []

    def _h_get_component(self, args, data):
        return _plain(self.store.get_component(args["component_id"])), []

    def _h_get_task(self, args, data):
        return _plain(self.store.get_task(args["task"])), []

    def _h_get_agent(self, args, data):
        return _plain(self.store.get_agent(args["agent_id"])), []

    def _h_get_agent_state(self, args, data):
        return _plain(self.store.get_agent_state(args["agent_id"])), []

    def _h_tensor_shapes(self, args, data):
        shapes = self.store.tensor_shapes(args["component_id"])
        return {name: [dtype, list(shape)] for name, (dtype, shape) in shapes.items()}, []

    def _h_trials(self, args, data):
        return [t.to_dict() for t in self.store.trials(agent=args["agent"], task=args["task"])], []

    def _h_models(self, args, data):
        return [m.to_dict() for m in self.store.models(agent=args["agent"])], []

    def _h_events(self, args, data):
        limit = args["limit"]
        limit = wire.EVENTS_PAGE if limit is None else max(0, min(limit, wire.EVENTS_PAGE))
        return [e.to_dict() for e in self.store.events(after=args["after"], limit=limit)], []

    def _h_manifest(self, args, data):
        """Component records (and the model's, if asked by model) plus the size of every blob they
        refer to: what a client needs to plan its chunked download."""
        model = None
        if args["model_id"] is not None:
            model = self.store.get_model(args["model_id"])
            if model is None:
                raise MissingReference(f"model {args['model_id']} is not in the store")
            cids = list(model.components)
        else:
            cids = list(args["component_ids"] or [])
        records = {}
        for cid in cids:
            rec = self.store.get_component(cid)
            if rec is None:
                raise MissingReference(f"component {cid} is not in the store")
            records[cid] = rec.to_dict()
        keys = sorted({k for r in records.values() for part in ("tensors", "momentum")
                       for k in r[part].values()})
        return {"model": _plain(model), "components": records,
                "sizes": self.store.blob_sizes(keys)}, []

    def _h_blob_read(self, args, data):
        reads = args["reads"]
        if len(reads) > wire.MAX_DATA_FRAMES or sum(r[2] for r in reads) > wire.CHUNK_BYTES \
                or any(r[1] < 0 or r[2] < 0 for r in reads):
            raise wire.WireError(f"blob_read: at most {wire.MAX_DATA_FRAMES} ranges and "
                                 f"{wire.CHUNK_BYTES} bytes per request")
        for key, _, _ in reads:
            Staging.check_key(key)
        chunks = self.store.read_blob_ranges([tuple(r) for r in reads])
        for (key, _, _), chunk in zip(reads, chunks):
            if chunk is None:
                raise MissingReference(f"blob {key} is not in the store (deleted by gc?)")
        self._count("blob_bytes_served", sum(len(c) for c in chunks))
        return {"lengths": [len(c) for c in chunks]}, chunks

    def _h_blob_missing(self, args, data):
        keys = args["keys"]
        for key in keys:
            Staging.check_key(key)
        unknown = [k for k in keys if not self.staging.is_complete(k)]
        sizes = self.store.blob_sizes(unknown)
        missing = {}
        for key in unknown:
            if sizes[key] is None:
                missing[key] = self.staging.offset(key)
                self.staging.mark_resume(key)
        return {"missing": missing}, []

    # ---- writes ----------------------------------------------------------------------------------

    def _h_blob_write(self, args, data, client: str = ""):
        writes = args["writes"]
        if len(writes) != len(data):
            raise wire.WireError("blob_write: one data frame per write")
        reached = {}
        for (key, offset, total), frame in zip(writes, data):
            view = frame.buffer
            before = self.staging.offset(key)
            reached[key] = self.staging.write(key, offset, total, view, client)
            # bytes that extended an upload: a chunk resent after a lost reply is not counted twice
            self._count("blob_bytes_staged", max(0, reached[key] - before))
        return {"received": reached}, []

    def _staged_writes(self, records: list[ComponentRecord]) -> list[StagedWrite]:
        keys = {k for r in records for k in [*r.tensors.values(), *r.momentum.values()]}
        unstaged = [k for k in keys if not self.staging.is_complete(k)]
        sizes = self.store.blob_sizes(unstaged)
        absent = sorted(k for k in unstaged if sizes[k] is None)
        stored = set(unstaged)
        if absent:
            raise wire.BlobsMissing(absent)
        out = []
        lost: list[str] = []

        def staged(names: dict[str, str]) -> dict[str, RawTensor]:
            got = {}
            for n, k in names.items():
                if k in stored:
                    continue  # stored already
                tensor = self.staging.tensor(k)  # None: expired (or damaged) since it was checked
                if tensor is None:
                    lost.append(k)
                else:
                    got[n] = tensor
            return got

        for r in records:
            out.append(StagedWrite(record=r, tensors=staged(r.tensors), momentum=staged(r.momentum),
                                   keys_computed=True))
        if lost:
            raise wire.BlobsMissing(sorted(set(lost)))
        return out

    def _written(self, writes: list[StagedWrite]) -> None:
        self.staging.discard({k for w in writes for k in
                              [*w.record.tensors.values(), *w.record.momentum.values()]})

    def _h_commit(self, args, data, rid):
        writes = self._staged_writes([_record(ComponentRecord, c) for c in args["components"]])
        seq = self.store.commit(
            args["agent_id"], args["token"], components=writes,
            models=[_record(ModelRecord, m) for m in args["models"]],
            state=None if args["state"] is None else _record(AgentState, args["state"]),
            publish=None if args["publish"] is None else _publication(args["publish"]),
            trials=[_record(TrialRecord, t) for t in args["trials"]],
            event_kind=args["event_kind"], event_data=args["event_data"], request_id=rid)
        self._written(writes)
        if seq is not None:
            self._check_seq()
        return seq, []

    def _h_ensure_root(self, args, data, rid):
        writes = self._staged_writes([_record(ComponentRecord, c) for c in args["components"]])
        root = self.store.ensure_root(_record(ModelRecord, args["model"]), writes, request_id=rid)
        self._written(writes)
        self._check_seq()
        return root, []

    def _h_acquire_lease(self, args, data, rid):
        return self.store.acquire_lease(
            args["agent_id"], args["task"], ttl=args["ttl"], host=args["host"], pid=args["pid"],
            device=args["device"], endpoint=args["endpoint"], preset=args["preset"],
            kind=args["kind"], request_id=rid), []

    def _h_heartbeat(self, args, data, rid):
        # Not recorded as a reply: a heartbeat applied twice only extends the lease again, and
        # recording each one (every agent, every 2 s, with its progress) would double the writes.
        return self.store.heartbeat(
            args["agent_id"], args["token"], ttl=args["ttl"], state=args["state"],
            progress=args["progress"], endpoint=args["endpoint"]).to_dict(), []

    def _h_release_lease(self, args, data, rid):
        self.store.release_lease(args["agent_id"], args["token"], state=args["state"],
                                 request_id=rid)
        return None, []

    def _h_gc(self, args, data, rid):
        counts = self.store.gc(grace_seconds=args["grace_seconds"], request_id=rid)
        self._check_seq()
        return counts, []
