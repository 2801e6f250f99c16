"""The peer bus: one ZeroMQ PUB socket per agent, and one SUB socket connected to every other agent.

There is no broker. Each agent binds a PUB socket (loopback and an ephemeral port by default), records
its endpoint in the store, and connects its SUB socket to the endpoints of the other agents, which the
caller reads from the store and hands to ``set_peers`` (this package never touches the store).

Messages are hints: the store's event log is the truth. So the bus favours never blocking and never
crashing over delivery: sends that would block are dropped and counted, and anything malformed that
arrives (wrong frame count, bad msgpack, schema errors, a topic frame disagreeing with the payload) is
dropped and counted, never raised. PUB/SUB also loses whatever is sent before a subscription has
finished connecting (the "slow joiner"); a late or reconnecting peer catches up from the store.

A wire message is a multipart message of exactly two frames, ``[kind, payload]``, where ``kind`` is the
ASCII message kind (the subscription topic) and ``payload`` is ``messages.encode(msg)``. Tensors never
travel on the bus: a peer that hears of a new model reads its tensors from the store.

A frame larger than ``max_frame_bytes`` is refused by ZeroMQ itself (MAXMSGSIZE), before any memory is
spent on it. ZeroMQ treats that as a protocol violation and drops the connection for good, so the bus
watches its SUB socket's disconnect events and re-dials any peer it still wants on the next ``poll`` or
``set_peers``: one oversized message costs the messages in flight, never the peer.

A PeerBus is not thread-safe (ZeroMQ sockets are not): use it from one thread.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from types import TracebackType

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol.messages import Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)

LINGER_MS = 100  # pending messages get this long to leave on close; a dying agent must not hang
HIGH_WATER_MARK = 10_000  # messages queued per peer before zmq drops (PUB) or stops reading (SUB)
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024  # larger inbound frames: zmq drops the connection
MAX_DRAIN_PER_POLL = 10_000  # a flooding peer cannot keep poll() from returning
RECONNECT_IVL_MAX_MS = 2_000  # back off reconnecting to a dead peer instead of retrying every 100 ms
_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]", ""})

_context: zmq.Context | None = None
_context_pid: int | None = None
_context_lock = threading.Lock()


def process_context() -> zmq.Context:
    """The one zmq.Context of this process, created lazily.

    Guarded by pid: a ZeroMQ context must never be used across fork, so a child process (even one
    forked by mistake) gets a fresh context instead of inheriting its parent's.
    """
    global _context, _context_pid
    with _context_lock:
        if _context is None or _context_pid != os.getpid():
            _context = zmq.Context()
            _context_pid = os.getpid()
        return _context


def _is_valid_endpoint(endpoint: object) -> bool:
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://") or len(endpoint) > 512:
        return False
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


class PeerBus:
    """One agent's PUB socket plus a SUB socket subscribed to everything its peers publish."""

    def __init__(self, agent_id: str, host: str = "127.0.0.1", port: int = 0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if host in _WILDCARD_HOSTS:
            raise ValueError(
                f"PeerBus host {host!r} is a wildcard; bind one interface address (e.g. 127.0.0.1) "
                "so peers can connect to the endpoint this agent advertises"
            )
        if not 0 <= port < 65536:
            raise ValueError(f"PeerBus port {port} is outside 0..65535 (0 picks a free port)")
        self.agent_id = agent_id
        self.stats: dict[str, int] = {
            "sent": 0,
            "send_dropped": 0,
            "received": 0,
            "dropped_malformed": 0,
            "peers_invalid": 0,
            "redials": 0,
        }
        self._pid = os.getpid()
        self._peers: dict[str, str] = {}  # agent_id -> endpoint, as last given to set_peers
        self._connected: set[str] = set()  # endpoints the SUB socket is connected to
        self._closed = False
        self.max_frame_bytes = max_frame_bytes
        context = process_context()
        self._pub = context.socket(zmq.PUB)
        self._sub = context.socket(zmq.SUB)
        try:
            for sock in (self._pub, self._sub):
                sock.setsockopt(zmq.LINGER, LINGER_MS)
            self._pub.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
            self._sub.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
            self._sub.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
            self._sub.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            try:
                self._pub.bind(f"tcp://{host}:{port if port else '*'}")
            except zmq.ZMQError as exc:
                raise OSError(f"cannot bind the peer bus on {host}:{port or '*'}: {exc}") from None
            self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            # Disconnect events of the SUB side arrive here (an inproc PAIR socket), see _redial_cut.
            self._monitor = self._sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._monitor.setsockopt(zmq.LINGER, 0)
        except BaseException:
            self._pub.close(linger=0)
            self._sub.close(linger=0)
            raise

    @property
    def peers(self) -> dict[str, str]:
        """The peers the SUB socket is connected to (agent_id -> endpoint), self excluded."""
        return {agent: ep for agent, ep in self._peers.items() if ep in self._connected}

    def set_peers(self, endpoints: Mapping[str, str]) -> None:
        """Make the SUB socket follow exactly this set of peers (agent_id -> endpoint). Idempotent.

        New endpoints are connected, removed or changed ones disconnected; this agent's own id and
        endpoint are skipped. Invalid endpoints (from a damaged registry entry) are skipped and counted
        in ``stats["peers_invalid"]`` rather than raised, so one bad entry cannot stop an agent.
        """
        self._require_open()
        self._redial_cut()
        wanted: dict[str, str] = {}
        for agent, endpoint in endpoints.items():
            if agent == self.agent_id or endpoint == self.endpoint:
                continue
            if not _is_valid_endpoint(endpoint):
                self.stats["peers_invalid"] += 1
                log.warning("peer %r has an invalid endpoint %r; skipped", agent, endpoint)
                continue
            wanted[agent] = endpoint
        wanted_endpoints = set(wanted.values())  # two ids on one endpoint: one connection, no dupes
        for endpoint in sorted(self._connected - wanted_endpoints):
            try:
                self._sub.disconnect(endpoint)
            except zmq.ZMQError:  # already gone on zmq's side; our bookkeeping is what matters
                pass
            self._connected.discard(endpoint)
        for endpoint in sorted(wanted_endpoints - self._connected):
            try:
                self._sub.connect(endpoint)
            except zmq.ZMQError as exc:
                self.stats["peers_invalid"] += 1
                log.warning("cannot connect to peer endpoint %r: %s; skipped", endpoint, exc)
                continue
            self._connected.add(endpoint)
        self._peers = wanted

    def send(self, msg: Message) -> bool:
        """Publish a message without ever blocking; returns False (and counts) if it was dropped.

        Raises ProtocolError if ``msg`` itself is invalid: that is a bug in the caller, not the network.
        """
        return self._send_frames([msg.kind.encode("ascii"), encode(msg)])

    def _send_frames(self, frames: list) -> bool:
        self._require_open()
        try:
            self._pub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.stats["send_dropped"] += 1
            return False
        self.stats["sent"] += 1
        return True

    def poll(self, timeout_ms: int = 0) -> list[Message]:
        """Every valid message available now (waiting at most ``timeout_ms`` for the first one)."""
        self._require_open()
        self._redial_cut()
        received: list[Message] = []
        if not self._sub.poll(timeout_ms, zmq.POLLIN):
            return received
        for _ in range(MAX_DRAIN_PER_POLL):
            try:
                frames = self._sub.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                message = self._parse(frames)
            except ProtocolError as exc:
                self.stats["dropped_malformed"] += 1
                log.debug("dropped a malformed message: %s", exc)
                continue
            self.stats["received"] += 1
            received.append(message)
        return received

    @staticmethod
    def _parse(frames: list[zmq.Frame]) -> Message:
        if len(frames) != 2:
            raise ProtocolError(f"expected 2 frames (kind, payload), got {len(frames)}")
        message = decode(frames[1].buffer)
        if frames[0].bytes != message.kind.encode("ascii"):
            raise ProtocolError(f"topic frame does not match payload kind {message.kind!r}")
        return message

    def _redial_cut(self) -> None:
        """Re-dial every wanted peer whose established connection ZeroMQ dropped.

        A plain network error would be retried by ZeroMQ on its own, but a protocol violation (such as
        a frame over MAXMSGSIZE) ends that connection for good; re-dialing both kinds is harmless.
        """
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                return
            endpoint = event["endpoint"].decode("utf-8", "replace")
            if endpoint not in self._connected:
                continue
            try:
                self._sub.disconnect(endpoint)
            except zmq.ZMQError:  # the session may already be gone; connect below is what matters
                pass
            self._sub.connect(endpoint)
            self.stats["redials"] += 1
            log.info("re-dialed peer endpoint %s after ZeroMQ dropped the connection", endpoint)

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"PeerBus of agent {self.agent_id!r} is closed")
        if self._pid != os.getpid():
            raise RuntimeError("a PeerBus cannot be used in a forked child; create one per process")

    def close(self) -> None:
        """Close both sockets (pending sends get LINGER_MS). Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._pid == os.getpid():  # a forked child must not touch its parent's sockets
            self._sub.disable_monitor()
            self._monitor.close()
            self._sub.close()
            self._pub.close()

    def __enter__(self) -> PeerBus:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._connected)} peers"
        return f"PeerBus({self.agent_id!r}, {self.endpoint!r}, {state})"
