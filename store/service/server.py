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

import logging
import secrets
import threading
import time
from typing import Any, Callable

import zmq

from protocol.bus import process_context
from store.errors import StoreError
from store.service import wire
from store.service.handlers import Handlers
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


class StoreServer(Handlers):
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
        self._bell: threading.Thread | None = None
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
        pub.bind(self.pub_request or _next_port(self.bind_endpoint, self.endpoint))
        self.pub_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._last_seq = self.store.last_event_seq()
        # The doorbell thread owns the PUB socket from here on (handed over before it starts), so
        # beats keep coming while a long request (verify, a big commit, the LMDB write lock) holds
        # the request loop: clients must not take a busy service for a dead one.
        self._bell_wake = threading.Event()
        self._bell_stop = threading.Event()
        self._bell = threading.Thread(target=self._doorbell, args=(pub,), daemon=True,
                                      name="store-doorbell")
        self._bell.start()
        self.store.prune_replies(time.time() - REPLY_RETENTION_SECONDS)

    def _reload_keys(self, force: bool = False) -> None:
        stamp = authorized_stamp(self.keys.authorized_dir)
        if force or stamp != self._auth_stamp:
            self._auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=self.keys.authorized_dir)
            self._auth_stamp = stamp

    def close(self) -> None:
        if getattr(self, "_bell", None) is not None:
            self._bell_stop.set()
            self._bell_wake.set()
            self._bell.join(timeout=5)
            self._bell = None
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
                self.staging.expire()
                if self._auth is not None:
                    if not self._auth.is_alive():
                        raise StoreError("the CURVE authenticator (ZAP handler) stopped: the "
                                         "service stops rather than serve without it")
                    self._reload_keys()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY_SECONDS
                try:
                    self.store.prune_replies(time.time() - REPLY_RETENTION_SECONDS)
                except StoreError as exc:  # a full map must not stop the service: log, go on
                    log.warning("pruning recorded replies failed: %s", exc)

    def _check_seq(self) -> None:
        seq = self.store.last_event_seq()
        if seq != self._last_seq:
            self._last_seq = seq
            self._ring(wire.TOPIC_SEQ)

    def _ring(self, topic: bytes) -> None:
        """Ask the doorbell thread to announce the current sequence number now."""
        if topic == wire.TOPIC_SEQ:
            self.counters["doorbells"] += 1
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
        except wire.WireError as exc:
            self._drop("bad_header")
            rid = wire.request_id_of(header.buffer)
            if rid is not None:  # say why, so the client fails at once instead of timing out
                self._reply(identity, wire.encode_error(rid, wire.ServiceError(
                    f"request refused: {exc} (client and service versions differ?)")), [])
            return True
        if kind not in wire.SCHEMAS:
            self._drop("unknown_kind")
            self._reply(identity, wire.encode_error(rid, wire.ServiceError(
                f"this service does not know request {kind!r} (client and service versions "
                f"differ?)")), [])
            return True
        self.counters["requests"] += 1
        self.requests_by_kind[kind] = self.requests_by_kind.get(kind, 0) + 1
        out: list = []
        try:
            wire.check_args(kind, args)
            if data and kind != "blob_write":
                raise wire.WireError(f"{kind} takes no data frames")
            # a recorded reply is found by kind and id: a reused id cannot replay another kind's
            result, out = self._handlers[kind](args, data, f"{kind}/{rid}") \
                if kind in wire.WRITES else self._handlers[kind](args, data)
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
        self._reply(identity, reply, out)
        return True

    def _reply(self, identity: Any, reply: bytes, out: list) -> None:
        self.counters["replies"] += 1
        self.counters["bytes_out"] += len(reply) + sum(len(f) for f in out)
        try:
            self._router.send_multipart([identity, reply, *out], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._drop("reply_queue_full")
def _next_port(requested: str, bound: str) -> str:
    """Default doorbell endpoint: the request port + 1 on the same host (ephemeral with port 0)."""
    host, _, port = requested.rpartition(":")
    if port in ("0", "*"):
        return f"{host}:*" if host.startswith("tcp://") else "tcp://127.0.0.1:*"
    return f"{host}:{int(bound.rsplit(':', 1)[1]) + 1}"

