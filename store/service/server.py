"""The store service: one process that owns a store's LMDB environment and answers clients over
ZeroMQ (``launch/serve_store.py`` runs it).

Concurrency. One thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe): it receives
and decodes every request, checks the sender's key is still authorised, and hands the request to a
*lane* (``wire.lane_of``); replies come back from the lanes through an inproc PULL socket that the
same thread polls, so only it ever touches the ROUTER.

- ``write`` (one thread): every request that changes the store (commit, ensure_root, leases,
  heartbeats, gc, pruning), one after another in arrival order, heartbeats first when several
  wait. Serialised writes keep the reply record (a resent request id is applied once) simple.
- ``read`` (a pool, ``read_workers`` threads, default 4): every other read, each in its own short
  LMDB read transaction on its own thread (py-lmdb: a read transaction stays on the thread that
  began it; readers never block the writer; ``max_readers`` is 512).
- ``slow`` (one thread): verify, check, stats, so a long verify holds one thread and never delays a
  heartbeat or a read.
- ``upload`` (one thread): blob_write and blob_missing, which touch only the staging area.

A client's request is answered only after its transaction committed, so its next request (on any
lane) sees it. ``read_workers=0`` handles everything on the socket's thread in arrival order (the
service before lanes existed; kept for comparison: ``serve_store.py --read-workers 0``).

A PUB socket rings a doorbell when the event log grows (whoever wrote it: agents on this host write
to LMDB directly, and the service notices within a quarter second) and sends a heartbeat every
second. It is a data service, not a scheduler: agents decide everything.

Uploads are staged (``staging``: on disk beside the store when served by serve_store.py, so they
survive a restart) and hash-checked; a commit writes only complete blobs, in one short write
transaction. Downloads are served in chunks the client asks for with a fixed credit of requests in
flight, so neither side ever holds more than a few chunks.

With keys, every request's ZAP User-Id (the client's public key) is checked against the current
``authorized/`` folder (reloaded about once a second), so removing a key cuts that client's open
sessions too: their requests get an ``AccessRevoked`` error.

Nothing a client sends can stop the service: a message with too many frames, an oversized frame
(ZeroMQ's MAXMSGSIZE drops that connection), an undecodable header or unknown request is dropped and
counted (``health``); a request with bad arguments gets an error reply. Leases use this host's clock.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import threading
import time
from typing import Any, Callable

import zmq
import zmq.auth

from protocol.bus import process_context
from store.errors import StoreError
from store.service import wire
from store.service.handlers import Handlers
from store.service.keys import ServerKeys, authorized_stamp, load_authorized
from store.service.staging import Staging
from store.store import Store

log = logging.getLogger(__name__)

LINGER_MS = 200
POLL_MS = 100
SEQ_CHECK_SECONDS = 0.25
PRUNE_EVERY_SECONDS = 600.0
REPLY_RETENTION_SECONDS = 3600.0
ZAP_DOMAIN = b"munet-store"
DEFAULT_READ_WORKERS = 4
MAX_HEARTBEAT_BATCH = 256  # heartbeats applied in one write transaction
MAX_IN_FLIGHT = 2000      # requests handed to lanes and not yet answered: beyond, stop reading
_URGENT = frozenset({"heartbeat", "release_lease", "acquire_lease"})  # first in the write lane
_HEARTBEAT_ARGS = ("agent_id", "token", "ttl", "state", "progress", "endpoint")


def default_read_workers() -> int:
    """``MUNET_STORE_READ_WORKERS`` (0: the single-threaded service), else 4."""
    text = os.environ.get("MUNET_STORE_READ_WORKERS", "")
    try:
        n = int(text) if text.strip() else DEFAULT_READ_WORKERS
    except ValueError:
        raise wire.ServiceUserError(f"MUNET_STORE_READ_WORKERS={text!r} is not a whole number")
    if not 0 <= n <= 64:
        raise wire.ServiceUserError(f"MUNET_STORE_READ_WORKERS={n}: use 0 to 64")
    return n


class StoreServer(Handlers):
    def __init__(self, store: Store, bind: str, *, pub: str | None = None,
                 keys: ServerKeys | None = None, staging: Staging | None = None,
                 read_workers: int | None = None) -> None:
        self.store = store
        self.bind_endpoint = bind
        self.pub_request = pub
        self.keys = keys
        self.staging = staging if staging is not None else Staging()
        self.read_workers = default_read_workers() if read_workers is None else int(read_workers)
        self.server_id = secrets.token_hex(8)
        self.endpoint = ""
        self.pub_endpoint = ""
        self._ctx = process_context()
        self._router: zmq.Socket | None = None
        self._replies: zmq.Socket | None = None
        self._reply_addr = f"inproc://store-replies-{self.server_id}"
        self._lanes: dict[str, Any] = {}
        self._workers: list[threading.Thread] = []
        self._order = itertools.count()
        self._in_flight = 0
        self._bell: threading.Thread | None = None
        self._auth: Any = None
        self._auth_stamp: tuple = ()
        self._authorized: frozenset[str] = frozenset()
        self._last_seq = 0
        self._count_lock = threading.Lock()
        self.started_at = time.time()
        self.counters: dict[str, Any] = {"requests": 0, "replies": 0, "errors": 0, "dropped": 0,
                                         "bytes_in": 0, "bytes_out": 0, "blob_bytes_served": 0,
                                         "blob_bytes_staged": 0, "doorbells": 0, "revoked": 0,
                                         "heartbeat_batches": 0, "heartbeats_batched": 0}
        self.dropped_by_reason: dict[str, int] = {}
        self.requests_by_kind: dict[str, int] = {}
        self.errors_by_type: dict[str, int] = {}
        self._handlers: dict[str, Callable[[dict, list], tuple[Any, list]]] = {
            kind: getattr(self, f"_h_{kind}") for kind in wire.SCHEMAS}

    def _count(self, name: str, n: int = 1) -> None:
        """Add to a counter (lanes run on several threads)."""
        with self._count_lock:
            self.counters[name] += n

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
        pub.bind(self.pub_request or _next_port(self.bind_endpoint, self.endpoint))
        self.pub_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._last_seq = self.store.last_event_seq()
        # The doorbell thread owns the PUB socket from here on (handed over before it starts), so
        # beats keep coming while a long request (verify, a big commit, the LMDB write lock) holds
        # a lane: clients must not take a busy service for a dead one.
        self._bell_wake = threading.Event()
        self._bell_stop = threading.Event()
        self._bell = threading.Thread(target=self._doorbell, args=(pub,), daemon=True,
                                      name="store-doorbell")
        self._bell.start()
        if self.read_workers > 0:
            self._start_lanes()
        self.store.prune_replies(time.time() - REPLY_RETENTION_SECONDS)

    def _start_lanes(self) -> None:
        replies = self._ctx.socket(zmq.PULL)
        replies.linger = 0
        replies.bind(self._reply_addr)
        self._replies = replies
        sizes = {"write": 1, "upload": 1, "slow": 1, "read": self.read_workers}
        for lane, n in sizes.items():
            self._lanes[lane] = queue.PriorityQueue() if lane == "write" else queue.SimpleQueue()
            for i in range(n):
                t = threading.Thread(target=self._worker, args=(lane,), daemon=True,
                                     name=f"store-{lane}-{i}")
                t.start()
                self._workers.append(t)

    def _reload_keys(self, force: bool = False) -> None:
        """Admit exactly the valid keys now in authorized/: a bad file is skipped with a warning (the
        others still take effect, revocations included); no folder admits nobody."""
        stamp = authorized_stamp(self.keys.authorized_dir)
        if force or stamp != self._auth_stamp:
            admitted, problems = load_authorized(self.keys.authorized_dir)
            for problem in problems:
                log.warning("authorized/%s is not a public key file: skipped; every other key "
                            "file still counts", problem)
            if not os.path.isdir(self.keys.authorized_dir):
                log.warning("%s is gone: no client is authorised until it comes back",
                            self.keys.authorized_dir)
            self._auth.allow_any = False
            self._auth.certs[ZAP_DOMAIN.decode()] = admitted  # one assignment: the ZAP thread reads it
            self._authorized = frozenset(_z85_keys(self._auth, self.keys.authorized_dir))
            self._auth_stamp = stamp

    def close(self) -> None:
        if getattr(self, "_bell", None) is not None:
            self._bell_stop.set()
            self._bell_wake.set()
            self._bell.join(timeout=5)
            self._bell = None
        for lane, q in self._lanes.items():
            for t in self._workers:
                if t.name.startswith(f"store-{lane}-"):
                    self._submit(lane, None)
        for t in self._workers:
            t.join(timeout=5)
        self._workers, self._lanes = [], {}
        if self._replies is not None:
            self._replies.close()
        self._replies = None
        if self._router is not None:
            self._router.close()
        self._router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # ---- the loop --------------------------------------------------------------------------------

    def serve(self, should_stop: Callable[[], bool]) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        if self._replies is not None:
            poller.register(self._replies, zmq.POLLIN)
        reading = True
        next_beat = next_seq_check = 0.0
        next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        while not should_stop():
            ready = dict(poller.poll(POLL_MS))
            if self._replies is not None and self._replies in ready:
                for _ in range(1000):
                    if not self._forward_one():
                        break
            if self._router in ready:
                for _ in range(1000):  # bounded: the housekeeping below still runs under load
                    if self._in_flight >= MAX_IN_FLIGHT or not self._handle_one():
                        break
            if self._replies is not None:  # back-pressure: stop reading while lanes are full
                if reading and self._in_flight >= MAX_IN_FLIGHT:
                    poller.modify(self._router, 0)
                    reading = False
                elif not reading and self._in_flight < MAX_IN_FLIGHT // 2:
                    poller.modify(self._router, zmq.POLLIN)
                    reading = True
            now = time.monotonic()
            if now >= next_seq_check:
                next_seq_check = now + SEQ_CHECK_SECONDS
                self._check_seq()
            if now >= next_beat:
                next_beat = now + wire.BEAT_SECONDS
                self._housekeep(self.staging.expire, "upload")
                if self._auth is not None:
                    if not self._auth.is_alive():
                        raise StoreError("the CURVE authenticator (ZAP handler) stopped: the "
                                         "service stops rather than serve without it")
                    self._reload_keys()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY_SECONDS
                self._housekeep(self._prune, "write")

    def _prune(self) -> None:
        try:
            self.store.prune_replies(time.time() - REPLY_RETENTION_SECONDS)
        except StoreError as exc:  # a full map must not stop the service: log, go on
            log.warning("pruning recorded replies failed: %s", exc)

    def _housekeep(self, fn: Callable[[], Any], lane: str) -> None:
        """Run ``fn`` on ``lane`` (writes stay on the writer thread), or here without lanes."""
        if self._lanes:
            self._submit(lane, fn)
        else:
            fn()

    def _check_seq(self) -> None:
        seq = self.store.last_event_seq()
        if seq != self._last_seq:
            self._last_seq = seq
            self._ring(wire.TOPIC_SEQ)

    def _ring(self, topic: bytes) -> None:
        """Ask the doorbell thread to announce the current sequence number now."""
        if topic == wire.TOPIC_SEQ:
            self._count("doorbells")
        self._bell_wake.set()

    def _doorbell(self, pub: zmq.Socket) -> None:
        """Own thread: a ``seq`` message whenever the log grew, a ``beat`` every second."""
        sent_seq = None
        try:
            while not self._bell_stop.is_set():
                woken = self._bell_wake.wait(wire.BEAT_SECONDS)
                self._bell_wake.clear()
                if self._bell_stop.is_set():
                    break
                seq = self._last_seq
                topic = wire.TOPIC_SEQ if woken and seq != sent_seq else wire.TOPIC_BEAT
                body = wire.pack({"v": wire.VERSION, "kind": topic.decode(), "seq": seq,
                                  "server": self.server_id, "time": time.time()})
                try:
                    pub.send_multipart([topic, body], flags=zmq.NOBLOCK)
                    sent_seq = seq
                except zmq.Again:
                    pass
        finally:
            pub.close()

    def _drop(self, reason: str) -> None:
        with self._count_lock:
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

    def _revoked(self, header: zmq.Frame) -> bool:
        """With keys: the sender's key (ZAP User-Id) is no longer in authorized/."""
        if self.keys is None:
            return False
        try:
            user = header.get("User-Id")
        except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
            user = None
        return not user or user not in self._authorized

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
        except wire.WireError as exc:
            self._drop("bad_header")
            rid = wire.request_id_of(header.buffer)
            if rid is not None:  # say why, so the client fails at once instead of timing out
                self._reply(identity, wire.encode_error(rid, wire.ServiceError(
                    f"request refused: {exc} (client and service versions differ?)")), [])
            return True
        if self._revoked(header):
            self._drop("revoked")
            self._count("revoked")
            self._reply(identity, wire.encode_error(rid, wire.AccessRevoked(
                f"store service {self.endpoint} no longer authorises this client's key (it was "
                f"removed from its authorized/ folder): ask its operator for a key")), [])
            return True
        if kind not in wire.SCHEMAS:
            self._drop("unknown_kind")
            self._reply(identity, wire.encode_error(rid, wire.ServiceError(
                f"this service does not know request {kind!r} (client and service versions "
                f"differ?)")), [])
            return True
        with self._count_lock:
            self.counters["requests"] += 1
            self.requests_by_kind[kind] = self.requests_by_kind.get(kind, 0) + 1
        client = self._client_of(identity, header) if kind == "blob_write" else ""
        if not self._lanes or kind in wire.INLINE:
            self._reply(identity, *self._execute(kind, rid, args, data, client))
        else:
            self._in_flight += 1
            self._submit(wire.lane_of(kind), (identity.bytes, kind, rid, args, data, client))
        return True

    def _client_of(self, identity: zmq.Frame, header: zmq.Frame) -> str:
        """Who sends an upload, for the staging area's per-client bounds: the client's key when the
        service has keys (the same across its reconnections), else its connection."""
        if self.keys is not None:
            try:
                return "key:" + (header.get("User-Id") or "")
            except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
                pass
        return "conn:" + identity.bytes.hex()

    def _submit(self, lane: str, item: Any) -> None:
        q = self._lanes[lane]
        if lane == "write":
            urgent = isinstance(item, tuple) and item[1] in _URGENT
            q.put((0 if urgent else 1, next(self._order), item))
        else:
            q.put(item)

    def _worker(self, lane: str) -> None:
        """One lane thread: take requests in order, answer through the inproc reply socket."""
        q = self._lanes[lane]
        push = self._ctx.socket(zmq.PUSH)
        push.linger = LINGER_MS
        push.connect(self._reply_addr)
        try:
            while True:
                item = q.get()
                if lane == "write":
                    item = item[2]
                if item is None:
                    break
                if callable(item):
                    try:
                        item()
                    except Exception:  # housekeeping must not end a lane
                        log.exception("housekeeping on the %s lane failed", lane)
                    continue
                if lane == "write" and item[1] == "heartbeat":
                    batch = self._more_heartbeats(q, [item])
                    for (identity, *_), reply in zip(batch, self._heartbeats(batch)):
                        push.send_multipart([identity, reply], copy=False)
                    continue
                identity, kind, rid, args, data, client = item
                reply, out = self._execute(kind, rid, args, data, client)
                del data, item
                push.send_multipart([identity, reply, *out], copy=False)
        finally:
            push.close()

    @staticmethod
    def _more_heartbeats(q: queue.PriorityQueue, batch: list) -> list:
        """Every heartbeat waiting right behind the first (they come first in the write lane)."""
        while len(batch) < MAX_HEARTBEAT_BATCH:
            try:
                entry = q.get_nowait()
            except queue.Empty:
                break
            item = entry[2]
            if not (isinstance(item, tuple) and item[1] == "heartbeat"):
                q.put(entry)  # same (priority, order): it keeps its place
                break
            batch.append(item)
        return batch

    def _heartbeats(self, batch: list) -> list[bytes]:
        """Apply waiting heartbeats in one write transaction (``Store.heartbeats``). A heartbeat
        refused (lease lost, bad arguments) gets its own error and writes nothing; the others still
        commit. If the transaction itself fails (a full map), each is retried alone for its own
        reply."""
        if len(batch) == 1:
            identity, kind, rid, args, data, _ = batch[0]
            return [self._execute(kind, rid, args, data)[0]]
        checked: list[Exception | None] = []
        for identity, kind, rid, args, data, _ in batch:
            try:
                wire.check_args(kind, args)
                if data:
                    raise wire.WireError(f"{kind} takes no data frames")
                checked.append(None)
            except wire.WireError as exc:
                checked.append(exc)
        valid = [b for b, err in zip(batch, checked) if err is None]
        try:
            results = iter(self.store.heartbeats([{k: b[3][k] for k in _HEARTBEAT_ARGS}
                                                  for b in valid]))
        except Exception as exc:  # the transaction failed: nothing of it was written
            log.warning("a batch of %d heartbeats failed (%s): applying them one by one",
                        len(batch), exc)
            return [self._execute(kind, rid, args, data)[0]
                    for identity, kind, rid, args, data, _ in batch]
        replies: list[bytes] = []
        for (identity, kind, rid, args, data, _), err in zip(batch, checked):
            result = err if err is not None else next(results)
            replies.append(self._error_reply(kind, rid, result) if isinstance(result, Exception)
                           else wire.encode_reply(rid, result.to_dict()))
        with self._count_lock:
            self.counters["heartbeat_batches"] += 1
            self.counters["heartbeats_batched"] += len(batch)
        return replies

    def _forward_one(self) -> bool:
        """Pass one lane's reply on to the ROUTER (this thread owns it)."""
        try:
            frames = self._replies.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self._in_flight -= 1
        self._reply(frames[0], frames[1], frames[2:])
        return True

    def _execute(self, kind: str, rid: str, args: dict, data: list, client: str = "") -> tuple[Any, list]:
        """Run one request's handler: (reply header, data frames); any failure is an error reply."""
        out: list = []
        try:
            wire.check_args(kind, args)
            if data and kind != "blob_write":
                raise wire.WireError(f"{kind} takes no data frames")
            if kind == "blob_write":  # the staging area bounds each client's share
                result, out = self._handlers[kind](args, data, client=client)
            # a recorded reply is found by kind and id: a reused id cannot replay another kind's
            elif kind in wire.WRITES:
                result, out = self._handlers[kind](args, data, f"{kind}/{rid}")
            else:
                result, out = self._handlers[kind](args, data)
            return wire.encode_reply(rid, result), out
        except Exception as exc:  # every failure becomes an error reply; the loop goes on
            return self._error_reply(kind, rid, exc), []

    def _error_reply(self, kind: str, rid: str, exc: BaseException) -> bytes:
        if isinstance(exc, wire.WireError):
            self._drop("bad_args")
        elif not isinstance(exc, StoreError):
            log.error("request %s failed", kind, exc_info=exc)
        name = wire.error_to_wire(exc)["type"]
        with self._count_lock:
            self.counters["errors"] += 1
            self.errors_by_type[name] = self.errors_by_type.get(name, 0) + 1
        return wire.encode_error(rid, exc)

    def _reply(self, identity: Any, reply: Any, out: list) -> None:
        self.counters["replies"] += 1
        self.counters["bytes_out"] += len(reply) + sum(len(f) for f in out)
        try:
            self._router.send_multipart([identity, reply, *out], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._drop("reply_queue_full")


def _z85_keys(auth: Any, folder: str) -> set[str]:
    """The z85 public keys the authenticator now admits (what ZAP gives as a session's User-Id)."""
    certs = getattr(auth, "certs", {}).get(ZAP_DOMAIN.decode())
    if certs is None:
        try:
            certs = zmq.auth.load_certificates(folder)
        except (OSError, ValueError):
            certs = {}
    return {k.decode("ascii") if isinstance(k, bytes) else str(k) for k in certs}


def _next_port(requested: str, bound: str) -> str:
    """Default doorbell endpoint: the request port + 1 on the same host (ephemeral with port 0)."""
    host, _, port = requested.rpartition(":")
    if port in ("0", "*"):
        return f"{host}:*" if host.startswith("tcp://") else "tcp://127.0.0.1:*"
    return f"{host}:{int(bound.rsplit(':', 1)[1]) + 1}"
