"""The store service: one process that owns a store's LMDB environment and answers clients over
ZeroMQ (``launch/serve_store.py`` runs it).

One ROUTER socket takes requests (``wire``); one thread handles them in arrival order, each in the
store's own transactions, so the service adds no locking of its own and a request sees everything
earlier requests did. A PUB socket rings a doorbell when the event log grows (whoever wrote it:
agents on this host write to LMDB directly, and the service notices within a quarter second) and
sends a heartbeat every second. It is a data service, not a scheduler: agents decide everything.

Uploads are staged in memory (``staging``) and hash-checked; a commit writes only complete blobs, in
one short write transaction. Downloads are served in chunks the client asks for with a fixed credit
of requests in flight, so neither side ever holds more than a few chunks.

Nothing a client sends can stop the service: a message with too many frames, an oversized frame
(ZeroMQ's MAXMSGSIZE drops that connection), an undecodable header or unknown request is dropped and
counted (``health``); a request with bad arguments gets an error reply. Leases use this host's clock.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from typing import Any, Callable

import zmq

from protocol.bus import process_context
from protocol.tensors import RawTensor
from store.errors import StoreCorrupt, StoreError
from store.records import (AgentState, ComponentRecord, ComponentWrite, ModelRecord, Publication,
                           TrialRecord)
from store.service import wire
from store.service.keys import ServerKeys, authorized_stamp
from store.service.staging import Staging
from store.store import Store

log = logging.getLogger(__name__)

LINGER_MS = 200
POLL_MS = 100
SEQ_CHECK_SECONDS = 0.25
PRUNE_EVERY_SECONDS = 600.0
REPLY_RETENTION_SECONDS = 3600.0
ZAP_DOMAIN = b"munet-store"


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


class StoreServer:
    def __init__(self, store: Store, bind: str, *, pub: str | None = None,
                 keys: ServerKeys | None = None, staging: Staging | None = None) -> None:
        self.store = store
        self.bind_endpoint = bind
        self.pub_request = pub
        self.keys = keys
        self.staging = staging or Staging()
        self.server_id = secrets.token_hex(8)
        self.endpoint = ""
        self.pub_endpoint = ""
        self._ctx = process_context()
        self._router: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._auth: Any = None
        self._auth_stamp: tuple = ()
        self._last_seq = 0
        self.started_at = time.time()
        self.counters: dict[str, Any] = {"requests": 0, "replies": 0, "errors": 0, "dropped": 0,
                                         "bytes_in": 0, "bytes_out": 0, "blob_bytes_served": 0,
                                         "blob_bytes_staged": 0, "doorbells": 0}
        self.dropped_by_reason: dict[str, int] = {}
        self.requests_by_kind: dict[str, int] = {}
        self.errors_by_type: dict[str, int] = {}
        self._handlers: dict[str, Callable[[dict, list], tuple[Any, list]]] = {
            kind: getattr(self, f"_h_{kind}") for kind in wire.SCHEMAS}

    # ---- sockets ---------------------------------------------------------------------------------

    def _secure(self, sock: zmq.Socket) -> None:
        if self.keys is None:
            return
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN
        try:  # refuse every handshake while no ZAP handler answers (libzmq >= 4.3)
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        except (zmq.ZMQError, AttributeError):
            pass

    def start(self) -> None:
        """Start authentication (with keys), then bind; raises zmq.ZMQError if a bind fails."""
        if self.keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._reload_keys(force=True)
            if not self._auth.is_alive():
                raise StoreError("the CURVE authenticator (ZAP handler) did not start")
        router = self._ctx.socket(zmq.ROUTER)
        router.linger = LINGER_MS
        router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        router.setsockopt(zmq.RCVHWM, 1000)
        router.setsockopt(zmq.SNDHWM, 1000)
        self._secure(router)
        self._router = router
        router.bind(self.bind_endpoint)
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        pub = self._ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.setsockopt(zmq.SNDHWM, 100)
        self._secure(pub)
        self._pub = pub
        pub.bind(self.pub_request or _next_port(self.bind_endpoint, self.endpoint))
        self.pub_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._last_seq = self.store.last_event_seq()
        self.store.prune_replies(time.time() - REPLY_RETENTION_SECONDS)

    def _reload_keys(self, force: bool = False) -> None:
        stamp = authorized_stamp(self.keys.authorized_dir)
        if force or stamp != self._auth_stamp:
            self._auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=self.keys.authorized_dir)
            self._auth_stamp = stamp

    def close(self) -> None:
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close()
        self._router = self._pub = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # ---- the loop --------------------------------------------------------------------------------

    def serve(self, should_stop: Callable[[], bool]) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        next_beat = next_seq_check = 0.0
        next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        while not should_stop():
            if poller.poll(POLL_MS):
                for _ in range(1000):  # bounded: the housekeeping below still runs under load
                    if not self._handle_one():
                        break
            now = time.monotonic()
            if now >= next_seq_check:
                next_seq_check = now + SEQ_CHECK_SECONDS
                self._check_seq()
            if now >= next_beat:
                next_beat = now + wire.BEAT_SECONDS
                self._ring(wire.TOPIC_BEAT)
                self.staging.expire()
                if self._auth is not None:
                    if not self._auth.is_alive():
                        raise StoreError("the CURVE authenticator (ZAP handler) stopped: the "
                                         "service stops rather than serve without it")
                    self._reload_keys()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY_SECONDS
                self.store.prune_replies(time.time() - REPLY_RETENTION_SECONDS)

    def _check_seq(self) -> None:
        seq = self.store.last_event_seq()
        if seq != self._last_seq:
            self._last_seq = seq
            self._ring(wire.TOPIC_SEQ)

    def _ring(self, topic: bytes) -> None:
        kind = topic.decode()
        body = wire.pack({"v": wire.VERSION, "kind": kind, "seq": self._last_seq,
                          "server": self.server_id, "time": time.time()})
        try:
            self._pub.send_multipart([topic, body], flags=zmq.NOBLOCK)
            if topic == wire.TOPIC_SEQ:
                self.counters["doorbells"] += 1
        except zmq.Again:
            pass

    def _drop(self, reason: str) -> None:
        self.counters["dropped"] += 1
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + 1

    def _recv(self) -> list[zmq.Frame] | None:
        """One whole multipart message, or None (nothing waiting, or dropped for its frame count)."""
        sock = self._router
        try:
            first = sock.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        frames, count = [first], 1
        while sock.getsockopt(zmq.RCVMORE):
            frame = sock.recv(copy=False)
            count += 1
            self.counters["bytes_in"] += len(frame)
            if count <= wire.MAX_DATA_FRAMES + 2:
                frames.append(frame)
        if count > wire.MAX_DATA_FRAMES + 2:
            self._drop("too_many_frames")
            return []
        return frames

    def _handle_one(self) -> bool:
        frames = self._recv()
        if frames is None:
            return False
        if not frames:
            return True
        if len(frames) < 2:
            self._drop("no_header")
            return True
        identity, header, data = frames[0], frames[1], frames[2:]
        try:
            kind, rid, args = wire.decode_request(header.buffer)
        except wire.WireError:
            self._drop("bad_header")
            return True
        if kind not in wire.SCHEMAS:
            self._drop("unknown_kind")
            return True
        self.counters["requests"] += 1
        self.requests_by_kind[kind] = self.requests_by_kind.get(kind, 0) + 1
        out: list = []
        try:
            wire.check_args(kind, args)
            if data and kind != "blob_write":
                raise wire.WireError(f"{kind} takes no data frames")
            result, out = self._handlers[kind](args, data, rid) if kind in wire.WRITES \
                else self._handlers[kind](args, data)
            reply = wire.encode_reply(rid, result)
        except Exception as exc:  # every failure becomes an error reply; the loop goes on
            if isinstance(exc, wire.WireError):
                self._drop("bad_args")
            elif not isinstance(exc, StoreError):
                log.exception("request %s failed", kind)
            self.counters["errors"] += 1
            name = wire.error_to_wire(exc)["type"]
            self.errors_by_type[name] = self.errors_by_type.get(name, 0) + 1
            reply, out = wire.encode_error(rid, exc), []
        self.counters["replies"] += 1
        self.counters["bytes_out"] += len(reply) + sum(len(f) for f in out)
        try:
            self._router.send_multipart([identity, reply, *out], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._drop("reply_queue_full")
        return True

    # ---- reads -----------------------------------------------------------------------------------

    def _h_hello(self, args: dict, data: list) -> tuple[Any, list]:
        return {"server": self.server_id, "version": wire.VERSION, "path": self.store.path,
                "pub_port": int(self.pub_endpoint.rsplit(":", 1)[1]), "time": time.time(),
                "secure": self.keys is not None, "seq": self._last_seq,
                "limits": {"chunk": wire.CHUNK_BYTES, "credit": wire.CREDIT,
                           "max_data_frames": wire.MAX_DATA_FRAMES,
                           "max_frame": wire.MAX_FRAME_BYTES}}, []

    def health(self) -> dict:
        return {"server": self.server_id, "uptime": time.time() - self.started_at,
                "endpoint": self.endpoint, "pub_endpoint": self.pub_endpoint,
                "secure": self.keys is not None,
                "authenticator_alive": bool(self._auth and self._auth.is_alive()),
                **self.counters, "dropped_by_reason": dict(self.dropped_by_reason),
                "requests_by_kind": dict(self.requests_by_kind),
                "errors_by_type": dict(self.errors_by_type),
                "staged_blobs": len(self.staging), "staged_bytes": self.staging.bytes,
                "uploads_resumed": self.staging.resumed,
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
        return {t: m.to_dict() for t, m in self.store.published_models().items()}, []

    def _h_agents(self, args, data):
        return [a.to_dict() for a in self.store.agents()], []

    def _h_live_agents(self, args, data):
        return [a.to_dict() for a in self.store.live_agents()], []

    def _h_last_event_seq(self, args, data):
        return self.store.last_event_seq(), []

    def _h_stats(self, args, data):
        return self.store.stats(), []

    def _h_verify(self, args, data):
        return self.store.verify(), []

    def _h_check(self, args, data):
        return dataclasses.asdict(self.store.check()), []

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
        from store.errors import MissingReference

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
        from store.errors import MissingReference

        for (key, _, _), chunk in zip(reads, chunks):
            if chunk is None:
                raise MissingReference(f"blob {key} is not in the store (deleted by gc?)")
        self.counters["blob_bytes_served"] += sum(len(c) for c in chunks)
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

    def _h_blob_write(self, args, data):
        writes = args["writes"]
        if len(writes) != len(data):
            raise wire.WireError("blob_write: one data frame per write")
        reached = {}
        for (key, offset, total), frame in zip(writes, data):
            view = frame.buffer
            reached[key] = self.staging.write(key, offset, total, view)
            self.counters["blob_bytes_staged"] += len(view)
        return {"received": reached}, []

    def _staged_writes(self, records: list[ComponentRecord]) -> list[StagedWrite]:
        keys = {k for r in records for k in [*r.tensors.values(), *r.momentum.values()]}
        unstaged = [k for k in keys if not self.staging.is_complete(k)]
        sizes = self.store.blob_sizes(unstaged)
        absent = sorted(k for k in unstaged if sizes[k] is None)
        if absent:
            raise wire.BlobsMissing(absent)
        out = []
        for r in records:
            staged = {n: self.staging.tensor(k) for n, k in r.tensors.items()
                      if self.staging.is_complete(k)}
            mom = {n: self.staging.tensor(k) for n, k in r.momentum.items()
                   if self.staging.is_complete(k)}
            out.append(StagedWrite(record=r, tensors=staged, momentum=mom, keys_computed=True))
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
            request_id=rid), []

    def _h_heartbeat(self, args, data, rid):
        return self.store.heartbeat(
            args["agent_id"], args["token"], ttl=args["ttl"], state=args["state"],
            progress=args["progress"], endpoint=args["endpoint"], request_id=rid).to_dict(), []

    def _h_release_lease(self, args, data, rid):
        self.store.release_lease(args["agent_id"], args["token"], state=args["state"],
                                 request_id=rid)
        return None, []

    def _h_gc(self, args, data, rid):
        counts = self.store.gc(grace_seconds=args["grace_seconds"], request_id=rid)
        self._check_seq()
        return counts, []


def _publication(d: dict) -> Publication:
    try:
        return Publication(model_id=d["model_id"], num_classes=d["num_classes"],
                           data_spec=d.get("data_spec") or {})
    except (KeyError, TypeError):
        raise StoreError("publish must be a map of model_id, num_classes, data_spec") from None


def _next_port(requested: str, bound: str) -> str:
    """Default doorbell endpoint: the request port + 1 on the same host (ephemeral with port 0)."""
    host, _, port = requested.rpartition(":")
    if port in ("0", "*"):
        return f"{host}:*" if host.startswith("tcp://") else "tcp://127.0.0.1:*"
    return f"{host}:{int(bound.rsplit(':', 1)[1]) + 1}"

