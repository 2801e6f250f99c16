"""The peer bus on real ZeroMQ sockets over loopback: delivery, peer changes, hostile input, processes.

PUB/SUB loses what is sent before a subscription has connected (the slow joiner), so every test that
needs a delivery resends until it arrives, under a deadline, instead of sleeping.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from protocol.bus import PeerBus, process_context
from protocol.messages import MAX_MESSAGE_BYTES, Bye, Hello, Message, Published, encode

DEADLINE_S = 5.0


def published(agent_id: str, seq: int, task: str = "mnist5k") -> Published:
    return Published(agent_id=agent_id, task=task, model_id=f"{agent_id}:{seq}", seq=seq, score=0.5)


def resend_until(send: Callable[[], object], receiver: PeerBus,
                 accept: Callable[[Message], bool]) -> list[Message]:
    """Send repeatedly until ``receiver`` gets a message ``accept`` likes; returns everything polled."""
    got: list[Message] = []
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        send()
        got.extend(receiver.poll(timeout_ms=20))
        if any(accept(m) for m in got):
            return got
    raise AssertionError(f"no accepted message within {DEADLINE_S}s; got {got[-3:]}")


@pytest.fixture
def buses() -> Iterator[Callable[[str], PeerBus]]:
    """Factory of buses that are all closed at the end, whatever happens."""
    made: list[PeerBus] = []

    def make(agent_id: str, **kwargs: object) -> PeerBus:
        bus = PeerBus(agent_id, **kwargs)  # type: ignore[arg-type]
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.close()


@pytest.fixture
def raw_pub() -> Iterator[tuple[zmq.Socket, str]]:
    """A bare PUB socket standing in for a buggy or hostile peer."""
    sock = process_context().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # unlimited: the test controls volume and must lose nothing
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close()


def test_every_message_kind_travels_between_two_buses(buses: Callable[..., PeerBus]) -> None:
    alice, bob = buses("alice"), buses("bob")
    assert alice.endpoint.startswith("tcp://127.0.0.1:") and alice.endpoint != bob.endpoint
    bob.set_peers({"alice": alice.endpoint, "bob": bob.endpoint})
    assert bob.peers == {"alice": alice.endpoint}  # own entry skipped

    first = published("alice", 1)
    got = resend_until(lambda: alice.send(first), bob, lambda m: True)
    assert all(m == first for m in got)
    assert alice.stats["sent"] >= 1 and bob.stats["received"] == len(got)
    assert bob.stats["dropped_malformed"] == 0 and alice.poll() == []  # alice subscribes to nobody

    # the connection is up now: the other kinds arrive on the first send, equal to what was sent
    hello = Hello(agent_id="alice", task="mnist5k", endpoint=alice.endpoint, pid=os.getpid(),
                  host="localhost")
    bye = Bye(agent_id="alice", task="mnist5k", reason="finished")
    for msg in (hello, bye):
        assert alice.send(msg)
    got = []
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < 2 and time.monotonic() < deadline:
        got.extend(m for m in bob.poll(timeout_ms=50) if not isinstance(m, Published))
    assert got == [hello, bye]
    assert bob.stats["dropped_malformed"] == 0


def test_set_peers_joins_leaves_and_follows_a_changed_endpoint(buses: Callable[..., PeerBus]) -> None:
    hub, b, c = buses("hub"), buses("b"), buses("c")
    hub.set_peers({"b": b.endpoint})
    resend_until(lambda: b.send(published("b", 0)), hub, lambda m: m.agent_id == "b")

    # c joins: hub hears both.
    hub.set_peers({"b": b.endpoint, "c": c.endpoint})
    assert hub.peers == {"b": b.endpoint, "c": c.endpoint}
    resend_until(lambda: c.send(published("c", 0)), hub, lambda m: m.agent_id == "c")

    # b leaves: after hub has seen 20 of c's messages sent interleaved after b's, none of b's came.
    hub.set_peers({"c": c.endpoint})
    assert hub.peers == {"c": c.endpoint}
    hub.poll(timeout_ms=50)
    from_b, from_c = 0, 0
    deadline = time.monotonic() + DEADLINE_S
    seq = 1
    while from_c < 20 and time.monotonic() < deadline:
        b.send(published("b", seq))
        c.send(published("c", seq))
        seq += 1
        for msg in hub.poll(timeout_ms=10):
            from_b += msg.agent_id == "b"
            from_c += msg.agent_id == "c"
    assert from_c >= 20 and from_b == 0

    # c restarts on a new port under the same agent id: hub drops the old endpoint, connects the new.
    old_endpoint = c.endpoint
    c.close()
    c2 = buses("c")
    hub.set_peers({"c": c2.endpoint})
    assert hub.peers == {"c": c2.endpoint} and c2.endpoint != old_endpoint
    resend_until(lambda: c2.send(published("c", 1000)), hub, lambda m: m.seq == 1000)


def test_set_peers_is_idempotent_and_never_duplicates(buses: Callable[..., PeerBus]) -> None:
    hub, b = buses("hub"), buses("b")
    for _ in range(3):
        hub.set_peers({"b": b.endpoint, "b-alias": b.endpoint})  # one endpoint, two ids
    resend_until(lambda: b.send(published("b", 0)), hub, lambda m: True)
    hub.poll(timeout_ms=100)  # drain the resends still in flight

    marker = published("b", 777)
    b.send(marker)
    got: list[Message] = []
    deadline = time.monotonic() + DEADLINE_S
    while marker not in got and time.monotonic() < deadline:
        got.extend(hub.poll(timeout_ms=20))
    got.extend(hub.poll(timeout_ms=200))  # a duplicate connection would deliver a second copy
    assert got.count(marker) == 1


def test_invalid_peer_endpoints_are_skipped_and_counted(buses: Callable[..., PeerBus]) -> None:
    hub, b = buses("hub"), buses("b")
    hub.set_peers({
        "b": b.endpoint,
        "no-port": "tcp://127.0.0.1",
        "bad-scheme": "ipc:///tmp/x",
        "not-a-string": 5,  # type: ignore[dict-item]
        "zero-port": "tcp://127.0.0.1:0",
        "self": hub.endpoint,
    })
    assert hub.peers == {"b": b.endpoint}
    assert hub.stats["peers_invalid"] == 4
    resend_until(lambda: b.send(published("b", 1)), hub, lambda m: True)


def test_close_is_idempotent_and_bus_refuses_use_after(buses: Callable[..., PeerBus]) -> None:
    with PeerBus("ctx") as bus:
        assert "ctx" in repr(bus)
    bus.close()
    with pytest.raises(RuntimeError, match="closed"):
        bus.send(published("ctx", 1))
    with pytest.raises(RuntimeError, match="closed"):
        bus.poll()
    other = buses("other")
    assert other.poll(timeout_ms=0) == []


def test_bad_construction_and_invalid_sends_raise(buses: Callable[..., PeerBus]) -> None:
    for host in ("0.0.0.0", "*", ""):
        with pytest.raises(ValueError, match="wildcard"):
            PeerBus("x", host=host)
    with pytest.raises(ValueError, match="outside"):
        PeerBus("x", port=70000)
    taken = buses("first")
    port = int(taken.endpoint.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="cannot bind"):
        PeerBus("second", port=port)
    with pytest.raises(ValueError):  # ProtocolError: a caller bug, raised at the sender
        taken.send(Published(agent_id="first", task="t", model_id="m", seq="7"))  # type: ignore[arg-type]
    assert taken.stats["sent"] == 0


def _junk(rng: random.Random, valid_payload: bytes) -> list[bytes]:
    """One multipart message that no schema accepts; covers every way a frame set can be wrong."""
    choice = rng.randrange(9)
    if choice == 0:
        return [rng.randbytes(rng.randrange(0, 300))]  # a single frame
    if choice == 1:
        return [b"published", rng.randbytes(rng.randrange(0, 300))]  # random payload
    if choice == 2:
        return [b"published", valid_payload[: rng.randrange(len(valid_payload))]]  # truncated
    if choice == 3:
        return [b"hello", valid_payload]  # topic disagrees with payload kind
    if choice == 4:
        return [rng.randbytes(rng.randrange(1, 20)), valid_payload]  # random topic
    if choice == 5:  # a valid message followed by more frames (nothing but messages use the bus)
        return [b"published", valid_payload] + [rng.randbytes(rng.randrange(0, 50))
                                                for _ in range(rng.randrange(1, 5))]
    if choice == 6:
        return [b"published", b"\x00" * (MAX_MESSAGE_BYTES + 1)]  # over the payload bound
    if choice == 7:
        return [b""]
    return [rng.randbytes(rng.randrange(0, 30)) for _ in range(rng.randrange(3, 7))]


def test_fuzzed_frames_are_dropped_and_valid_messages_still_arrive(
        buses: Callable[..., PeerBus], raw_pub: tuple[zmq.Socket, str]) -> None:
    sock, endpoint = raw_pub
    bus = buses("victim")
    bus.set_peers({"fuzzer": endpoint})
    sync = published("fuzzer", -1)
    resend_until(lambda: sock.send_multipart([b"published", encode(sync)]), bus, lambda m: m == sync)
    bus.poll(timeout_ms=100)
    base_dropped = bus.stats["dropped_malformed"]
    assert base_dropped == 0

    rng = random.Random(31337)
    junk_sent, valid_sent, received = 0, [], []
    for i in range(3000):
        if i % 10 == 0:
            msg = published("fuzzer", i)
            sock.send_multipart([b"published", encode(msg)])
            valid_sent.append(msg)
        else:
            sock.send_multipart(_junk(rng, encode(published("fuzzer", i))))
            junk_sent += 1
        if i % 200 == 0:
            received.extend(bus.poll())  # never raises, whatever arrived
    deadline = time.monotonic() + DEADLINE_S
    while len(received) < len(valid_sent) and time.monotonic() < deadline:
        received.extend(bus.poll(timeout_ms=50))
    received.extend(bus.poll(timeout_ms=50))

    assert received == valid_sent  # all of them, in order, nothing else
    assert bus.stats["dropped_malformed"] == junk_sent
    assert bus.stats["received"] == len(valid_sent) + 1  # + the sync message


def test_frames_over_max_frame_bytes_are_dropped_by_zmq(
        buses: Callable[..., PeerBus], raw_pub: tuple[zmq.Socket, str]) -> None:
    sock, endpoint = raw_pub
    bus = buses("small", max_frame_bytes=4096)
    bus.set_peers({"fuzzer": endpoint})
    resend_until(lambda: sock.send_multipart([b"published", encode(published("fuzzer", 0))]), bus,
                 lambda m: True)
    bus.poll(timeout_ms=100)
    assert bus.stats["redials"] == 0
    # zmq itself refuses the oversized frame, so the bus never spends memory or a decode on it (the
    # malformed counter does not move). zmq also drops that connection for good; the bus notices and
    # re-dials, so the peer's later messages still arrive.
    sock.send_multipart([b"published", b"\x00" * 10_000])
    resend_until(lambda: sock.send_multipart([b"published", encode(published("fuzzer", 1))]), bus,
                 lambda m: m.seq == 1)
    assert bus.stats["dropped_malformed"] == 0
    assert bus.stats["redials"] == 1


def test_peer_restarting_on_the_same_port_is_heard_again(buses: Callable[..., PeerBus]) -> None:
    hub, b = buses("hub"), buses("b")
    hub.set_peers({"b": b.endpoint})
    resend_until(lambda: b.send(published("b", 1)), hub, lambda m: True)
    port = int(b.endpoint.rsplit(":", 1)[1])
    b.close()  # the connection breaks; zmq retries on its own and the bus re-dials once
    deadline = time.monotonic() + DEADLINE_S
    while hub.stats["redials"] == 0 and time.monotonic() < deadline:
        hub.poll(timeout_ms=20)
    assert hub.stats["redials"] == 1
    b_again = buses("b", port=port)
    assert b_again.endpoint == b.endpoint
    resend_until(lambda: b_again.send(published("b", 2)), hub, lambda m: m.seq == 2)
    assert hub.stats["redials"] == 1  # no redial storm while the peer was away


def _peer_process(agent_id: str, endpoints: mp.Queue, peer_maps: mp.Queue, reports: mp.Queue,
                  stop: mp.Event, deadline_s: float) -> None:
    """A peer in its own process: publish, listen, report whom it heard, keep publishing until told."""
    with PeerBus(agent_id) as bus:
        endpoints.put((agent_id, bus.endpoint))
        peers = peer_maps.get(timeout=deadline_s)
        bus.set_peers(peers)
        others = set(peers) - {agent_id}
        heard: dict[str, list[int]] = {}
        reported = False
        seq = 0
        deadline = time.monotonic() + deadline_s
        while not stop.is_set() and time.monotonic() < deadline:
            seq += 1
            bus.send(Published(agent_id=agent_id, task=f"task-{agent_id}", model_id=f"{agent_id}:{seq}",
                               seq=seq, score=seq / 1000))
            bus.send(Hello(agent_id=agent_id, task=f"task-{agent_id}", endpoint=bus.endpoint,
                           pid=os.getpid(), host="localhost"))  # another kind, interleaved
            for msg in bus.poll(timeout_ms=20):
                if isinstance(msg, Published):
                    ok = msg.task == f"task-{msg.agent_id}" and msg.model_id == f"{msg.agent_id}:{msg.seq}"
                    heard.setdefault(msg.agent_id, []).append(msg.seq if ok else -1)
            if not reported and others <= set(heard):
                reports.put((agent_id, heard, dict(bus.stats)))
                reported = True
        if not reported:
            reports.put((agent_id, heard, dict(bus.stats)))


def test_three_peers_in_three_processes_hear_each_other() -> None:
    ctx = mp.get_context("spawn")
    endpoints, peer_maps, reports = ctx.Queue(), ctx.Queue(), ctx.Queue()
    stop = ctx.Event()
    names = ["p0", "p1", "p2"]
    procs = [ctx.Process(target=_peer_process, args=(n, endpoints, peer_maps, reports, stop, 20.0),
                         daemon=True) for n in names]
    try:
        for proc in procs:
            proc.start()
        registry = dict(endpoints.get(timeout=20) for _ in names)
        assert set(registry) == set(names) and len(set(registry.values())) == 3
        for _ in names:
            peer_maps.put(registry)  # every peer gets the full map, itself included
        results = {}
        for _ in names:
            agent_id, heard, stats = reports.get(timeout=20)
            results[agent_id] = (heard, stats)
        stop.set()
        for proc in procs:
            proc.join(timeout=10)
            assert proc.exitcode == 0
    finally:
        stop.set()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    for agent_id, (heard, stats) in results.items():
        assert set(heard) == set(names) - {agent_id}, f"{agent_id} heard {sorted(heard)}"
        for sender, seqs in heard.items():
            assert -1 not in seqs, f"{agent_id} got a garbled message from {sender}"
            assert seqs == sorted(set(seqs)), "per-sender order must be preserved, without duplicates"
        assert stats["dropped_malformed"] == 0 and stats["send_dropped"] == 0
