"""The client's connection to a store service: request/reply with retries, and the doorbell.

Requests go out on DEALER sockets taken from a small pool (one per thread at a time: an agent's
heartbeat thread and its main loop call concurrently, and a ZeroMQ socket must not be shared).
A reply that does not come is a lost request (the service died, restarted, or the connection
dropped): the socket is thrown away and the same request, with the same id, is sent on a fresh one
after a backoff. Mutating requests are recorded by the service under their id, so resending one is
safe. The doorbell thread listens to the service's PUB socket: a heartbeat from a new service id (a
restart) or no heartbeat at all for a few seconds makes a waiting request count as lost at once
instead of after its reply timeout.

Give-up bound: a call raises ``StoreUnavailable`` (``wire.ServiceUnavailable``) once the service
has shown no sign of life (no reply, no doorbell beat) for ``retry_seconds`` since the call began
or since its last reply, or once it has been resending for that long: ``retry_seconds`` is
``$MUNET_STORE_RETRY_SECONDS``, default 120 s, and a call against a dead service ends within it
(plus a fraction of a second). A busy service is not a dead one: its doorbell beats every second
from its own thread, so a long ``verify`` is waited for (up to ``SLOW_REPLY_TIMEOUT``). Only where
the doorbell was never heard (its port blocked) does a slow request keep its own reply timeout.
A key revoked while connected (``AccessRevoked``, a user error) is final: every later call on the
channel raises it at once. After a give-up the channel counts as down: later calls get ``min(retry_seconds, 5 s)`` until the
service answers again, so an agent's shutdown (a last heartbeat, releasing its lease) does not wait
the whole bound once more for each call.

Connecting is checked once with ``hello``: CURVE refusals are silent in ZeroMQ, so the client
watches its socket's handshake events and gives up after ``connect_timeout`` with one line saying
what to check.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Sequence

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol.bus import process_context
from store.service import wire
from store.service.keys import ClientKeys

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RETRY_SECONDS = 120.0
DOWN_RETRY_SECONDS = 5.0
DEFAULT_REPLY_TIMEOUT = 30.0
SLOW_REPLY_TIMEOUT = 900.0
BEAT_STALE_SECONDS = 5.0
BACKOFF_START, BACKOFF_MAX = 0.1, 2.0


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class _Lost(Exception):
    """Internal: the request (or some of a pipeline) got no reply; resend on a fresh socket."""


class Channel:
    def __init__(self, endpoint: str, *, keys: ClientKeys | None = None,
                 connect_timeout: float | None = None, retry_seconds: float | None = None,
                 reply_timeout: float | None = None) -> None:
        self.endpoint = endpoint
        self.host = endpoint[len("tcp://"):].rpartition(":")[0]
        self.keys = keys
        self.connect_timeout = connect_timeout if connect_timeout is not None else \
            _env_float("MUNET_STORE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)
        self.retry_seconds = retry_seconds if retry_seconds is not None else \
            _env_float("MUNET_STORE_RETRY_SECONDS", DEFAULT_RETRY_SECONDS)
        self.reply_timeout = reply_timeout if reply_timeout is not None else \
            _env_float("MUNET_STORE_REPLY_TIMEOUT", DEFAULT_REPLY_TIMEOUT)
        self._ctx = process_context()
        self._lock = threading.Lock()
        self._free: list[zmq.Socket] = []
        self._closed = False
        self.server_id: str | None = None   # from the latest hello or heartbeat
        self.doorbell_seq = 0
        self.last_beat = 0.0
        self.retries = 0                    # requests resent after a loss (for tests, benchmarks)
        self.last_life = time.monotonic()   # the latest reply or doorbell message
        self.down = False                   # gave up on the service; no reply since
        self.revoked: BaseException | None = None  # the service revoked this client's key
        self._stop = threading.Event()
        self._sub_thread: threading.Thread | None = None
        self.hello: dict = {}

    # ---- sockets ---------------------------------------------------------------------------------

    def _new_socket(self, kind: int = zmq.DEALER) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_REPLY_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self.keys is not None:
            sock.curve_serverkey = self.keys.server_public
            sock.curve_publickey = self.keys.public
            sock.curve_secretkey = self.keys.secret
        return sock

    def _take(self) -> zmq.Socket:
        with self._lock:
            if self._closed:
                raise wire.ServiceUnavailable(f"the connection to {self.endpoint} is closed")
            if self.revoked is not None:  # a new socket's handshake would be refused in silence
                raise wire.AccessRevoked(str(self.revoked))
            if self._free:
                return self._free.pop()
        sock = self._new_socket()
        sock.connect(self.endpoint)
        return sock

    def _give(self, sock: zmq.Socket) -> None:
        with self._lock:
            if self._closed or len(self._free) >= 8:
                sock.close()
            else:
                self._free.append(sock)

    def close(self) -> None:
        self._stop.set()
        if self._sub_thread is not None:
            self._sub_thread.join(timeout=2)
        with self._lock:
            self._closed = True
            for sock in self._free:
                sock.close()
            self._free.clear()

    # ---- connecting ------------------------------------------------------------------------------

    def connect(self) -> dict:
        """Say hello (watching the handshake), then start listening to the doorbell."""
        sock = self._new_socket()
        events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED
        monitor = sock.get_monitor_socket(events)
        sock.connect(self.endpoint)
        rid = wire.new_request_id()
        sock.send_multipart([wire.encode_request("hello", rid, {})])
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + self.connect_timeout
        refused, failed = False, 0
        reply = None
        try:
            while reply is None and not refused and time.monotonic() < deadline:
                ready = dict(poller.poll(100))
                if monitor in ready:
                    event = parse_monitor_message(monitor.recv_multipart())["event"]
                    refused = event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    failed += event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
                if sock in ready:
                    frames = sock.recv_multipart()
                    got_id, ok, result = wire.decode_reply(frames[0])
                    if got_id == rid and ok:
                        reply = result
        finally:
            sock.disable_monitor()
            monitor.close()
            sock.close()
        if reply is None:
            raise wire.ServiceUnreachable(self._refusal(refused, failed))
        if not isinstance(reply, dict) or reply.get("version") != wire.VERSION:
            raise wire.ServiceUnreachable(f"{self.endpoint} answered, but not as a munet-swarm "
                                          f"store service of protocol {wire.VERSION}")
        self.hello = reply
        self.server_id = reply["server"]
        self.doorbell_seq = int(reply.get("seq", 0))
        self._sub_thread = threading.Thread(target=self._listen, args=(int(reply["pub_port"]),),
                                            name="store-doorbell", daemon=True)
        self._sub_thread.start()
        return reply

    def _refusal(self, refused: bool, failed: int) -> str:
        where = f"store service {self.endpoint}"
        if refused:
            return (f"{where} refused this client's key: add KEYDIR/client.key to the service's "
                    f"KEYDIR/authorized/ (or copy a client key pair it authorised)")
        if failed and self.keys is None:
            return (f"{where} refused the connection: it requires CURVE keys; pass --keys KEYDIR "
                    f"with a copy of its server.key, client.key and client.key_secret")
        if self.keys is not None:
            return (f"no answer from {where} within {self.connect_timeout:.0f} s: it is not "
                    f"running there, or it does not accept these keys (CURVE refusals are "
                    f"silent): check that KEYDIR/server.key is the service's own and that "
                    f"KEYDIR/client.key is in its authorized/ folder")
        return (f"no answer from {where} within {self.connect_timeout:.0f} s: start "
                f"launch/serve_store.py there, check the address, or pass --keys KEYDIR if the "
                f"service uses keys")

    def _listen(self, pub_port: int) -> None:
        sub = self._new_socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://{self.host}:{pub_port}")
        try:
            while not self._stop.is_set():
                if not sub.poll(200):
                    continue
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                    msg = wire.unpack_small(frames[-1])
                except (zmq.Again, wire.WireError, IndexError):
                    continue
                if not isinstance(msg, dict):
                    continue
                seq, server = msg.get("seq"), msg.get("server")
                if isinstance(seq, int) and not isinstance(seq, bool):
                    self.doorbell_seq = max(self.doorbell_seq, seq) if server == self.server_id \
                        else seq
                if isinstance(server, str):
                    self.server_id = server
                self.last_beat = self.last_life = time.monotonic()
        finally:
            sub.close()

    # ---- requests --------------------------------------------------------------------------------

    def _timeout(self, kind: str) -> float:
        return SLOW_REPLY_TIMEOUT if kind in wire.SLOW else self.reply_timeout

    def _service_gone(self, server_at_send: str | None) -> bool:
        """The doorbell says the service restarted, or stopped beating, since the send."""
        if self.server_id != server_at_send:
            return True
        return self.last_beat > 0 and time.monotonic() - self.last_beat > BEAT_STALE_SECONDS

    def call(self, kind: str, args: dict, frames: Sequence = (), *,
             request_id: str | None = None) -> tuple[Any, list]:
        """One request; returns (result, data frames) or raises the error the service replied."""
        out: list = []
        self.pipeline([(kind, args, frames)], lambda i, result, data: out.append((result, data)),
                      request_ids=[request_id or wire.new_request_id()])
        return out[0]

    def pipeline(self, requests: Sequence[tuple[str, dict, Sequence]],
                 on_reply: Callable[[int, Any, list], None], *, credit: int = wire.CREDIT,
                 request_ids: Sequence[str] | None = None) -> None:
        """Send ``requests`` keeping at most ``credit`` in flight; ``on_reply(i, result, frames)``
        for each in arrival order. Lost ones are resent (same ids) on a fresh socket after a
        backoff, until ``retry_seconds`` pass without progress. An error reply is raised."""
        ids = list(request_ids) if request_ids is not None else \
            [wire.new_request_id() for _ in requests]
        done: set[int] = set()
        backoff, lost_since, progress = BACKOFF_START, None, 0
        started = time.monotonic()
        slow = any(kind in wire.SLOW for kind, _, _ in requests)
        while len(done) < len(requests):
            sock = self._take()
            try:
                self._run(sock, requests, ids, done, on_reply, credit, started, slow)
            except _Lost:
                sock.close()
                self.retries += 1
                now = time.monotonic()
                if len(done) > progress:  # some replies came: the window starts again
                    progress, lost_since, backoff = len(done), None, BACKOFF_START
                lost_since = lost_since or now
                window = self._window()
                waited = max(now - lost_since, self._silent_for(started, slow))
                if waited >= window:
                    self._give_up(waited)
                time.sleep(max(0.0, min(backoff, window - waited)))
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            except BaseException:
                sock.close()  # an error or interrupt may leave replies in flight on this socket
                raise
            self._give(sock)

    def _window(self) -> float:
        """How long a call may go unanswered: ``retry_seconds``, or a few seconds while down."""
        return min(self.retry_seconds, DOWN_RETRY_SECONDS) if self.down else self.retry_seconds

    def _silent_for(self, started: float, slow: bool) -> float:
        """Seconds without a sign of life from the service during this call (0 for a slow
        request while the doorbell was never heard: then only its reply timeout counts)."""
        if slow and self.last_beat == 0:
            return 0.0
        return time.monotonic() - max(started, self.last_life)

    def _give_up(self, waited: float) -> None:
        self.down = True
        raise wire.ServiceUnavailable(
            f"store service {self.endpoint} has not answered for {waited:.0f} s (give-up bound "
            f"MUNET_STORE_RETRY_SECONDS={self.retry_seconds:g}); is it running?") from None

    def _run(self, sock: zmq.Socket, requests, ids, done: set[int], on_reply, credit: int,
             started: float, slow: bool) -> None:
        pending: dict[str, tuple[int, float, str | None]] = {}  # id -> (index, sent, server)
        todo = [i for i in range(len(requests)) if i not in done]
        todo.reverse()
        index_of = {ids[i]: i for i in todo}
        while todo or pending:
            while todo and len(pending) < credit:
                i = todo.pop()
                kind, args, frames = requests[i]
                sock.send_multipart([wire.encode_request(kind, ids[i], args), *frames],
                                    copy=False)
                pending[ids[i]] = (i, time.monotonic(), self.server_id)
            if not sock.poll(100):
                now = time.monotonic()
                for rid, (i, sent, server) in pending.items():
                    if now - sent > self._timeout(requests[i][0]) or self._service_gone(server):
                        raise _Lost()
                if self._silent_for(started, slow) > self._window():
                    raise _Lost()  # the caller gives up (its window has passed)
                continue
            frames = sock.recv_multipart(copy=False)
            self.last_life = time.monotonic()
            self.down = False
            try:
                rid, ok, result = wire.decode_reply(frames[0].buffer)
            except wire.WireError as exc:  # waiting would not help: the same bytes would come
                raise wire.ServiceError(f"unreadable reply from {self.endpoint}: {exc}") from None
            if rid not in pending:
                continue  # a late reply to a request already answered
            i = index_of[rid]
            del pending[rid]
            if not ok:
                error = wire.error_from_wire(result)
                if isinstance(error, wire.AccessRevoked):
                    self.revoked = error
                raise error
            on_reply(i, result, frames[1:])
            done.add(i)
