"""The store service (store/service, launch/serve_store.py) as real processes on real sockets.

- conformance: the same scripted calls on a local Store and on a RemoteStore give the same results
  and the same errors (class and message), and both satisfy StoreAPI;
- a mutating request resent with the same id is applied once (commit, lease);
- late joiners: a client that connects after many events reads them all from the log, and the
  doorbell rings for commits made directly to the LMDB file by an agent on the service's host;
- a host's blob cache: a model is fetched once per host, several processes share the cache safely;
- faults: kill -9 the service during commits (the client waits, retries, nothing lost or doubled);
  a connection dropped mid-blob resumes the upload and the download; thousands of malformed
  frames are dropped and counted while the service keeps serving.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq

from helpers.service_clients import (commit_model, comparable, scripted_calls, take_lease,
                                     tensors_of)
from helpers.service_procs import ENV, Relay, free_port, start_service
from helpers.store_records import make_root
from store import Store, StoreAPI, StoreError
from store.api import open_store
from store.service import wire
from store.service.client import RemoteStore


@pytest.fixture
def service(tmp_path):
    svc = start_service(str(tmp_path / "served"))
    yield svc
    svc.kill()


def connect(svc_or_endpoint, tmp_path, name="cache", **kw) -> RemoteStore:
    endpoint = getattr(svc_or_endpoint, "endpoint", svc_or_endpoint)
    return RemoteStore.connect(endpoint, cache_dir=str(tmp_path / name), **kw)


def test_both_implementations_answer_the_same_calls_the_same_way(tmp_path, service):
    with Store.open(str(tmp_path / "local"), create=True) as local:
        expected = scripted_calls(local)
    with connect(service, tmp_path) as remote:
        assert isinstance(remote, StoreAPI)
        got = scripted_calls(remote)
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, want), (_, have) in zip(expected, got):
        assert have == want, name
    errors = {name: value[1][0] for name, value in expected if value[0] == "error"}
    assert {"LeaseHeld", "Conflict", "LeaseLost", "MissingReference", "StoreError"} \
        <= set(errors.values())
    for name in ("close", "commit", "load_model_tensors", "poll_events", "verify", "stats"):
        assert callable(getattr(RemoteStore, name)) and callable(getattr(Store, name))


def test_open_store_dispatches_and_readonly_refuses_writes(tmp_path, service):
    st = open_store(service.endpoint, readonly=True)
    try:
        assert isinstance(st, RemoteStore)
        with pytest.raises(StoreError, match="read-only"):
            take_lease(st, "a", "t")
    finally:
        st.close()
    with pytest.raises(wire.ServiceUserError, match="tcp://HOST:PORT"):
        open_store("tcp://nowhere")


def test_a_resent_commit_or_lease_is_applied_once(tmp_path, service):
    with connect(service, tmp_path) as st:
        root = make_root(st)
        rid = wire.new_request_id()
        args = {"agent_id": "a1", "task": "t1", "ttl": 60.0, "host": "h", "pid": 1,
                "device": "cpu", "endpoint": "", "preset": "test", "kind": "single"}
        token = st.channel.call("acquire_lease", args, request_id=rid)[0]
        assert st.channel.call("acquire_lease", args, request_id=rid)[0] == token  # not LeaseHeld
        calls = []
        real_call = st.channel.call

        def twice(kind, a, frames=(), *, request_id=None):
            if kind == "commit":  # the reply to the first send "was lost": send it again
                first = real_call(kind, a, frames, request_id=request_id)
                calls.append(first)
            return real_call(kind, a, frames, request_id=request_id)

        st.channel.call = twice
        seq = commit_model(st, "a1", token, "t1", 0, root, np.random.default_rng(0))
        st.channel.call = real_call
        assert calls and calls[0][0] == seq
        assert [e.kind for e in st.events()] == ["root", "published"]
        assert st.verify() == []


def test_late_joiner_reads_the_log_and_the_doorbell_rings_for_local_writers(tmp_path, service):
    with connect(service, tmp_path, "writer") as st:
        root = make_root(st)
        token = take_lease(st, "a1", "t1")
        rng = np.random.default_rng(1)
        for n in range(30):
            commit_model(st, "a1", token, "t1", n, root, rng)
    with connect(service, tmp_path, "late") as late:
        seen = late.poll_events(0)
        assert [e.seq for e in seen] == list(range(1, 32))
        assert late.poll_events(31) == []  # doorbell quiet: no request at all
        asked = late.health()["requests_by_kind"].get("events", 0)
        # an agent on the service's host commits straight into the LMDB file
        with Store.open(service.store) as local:
            token = take_lease(local, "b1", "t2")
            commit_model(local, "b1", token, "t2", 0, root, rng)
        deadline = time.time() + 5
        while time.time() < deadline and late.channel.doorbell_seq < 32:
            time.sleep(0.05)
        assert late.channel.doorbell_seq == 32
        assert [e.seq for e in late.poll_events(31)] == [32]
        assert late.health()["requests_by_kind"]["events"] == asked + 1


LOAD_SCRIPT = """
import sys, json
from store.service.client import RemoteStore
st = RemoteStore.connect(sys.argv[1], cache_dir=sys.argv[2])
t = st.load_model_tensors(sys.argv[3])
print(json.dumps({"fetched": st.bytes_fetched, "n": sum(len(p) + len(m) for p, m in t.values())}))
"""


def test_a_model_is_fetched_once_per_host_and_the_cache_is_shared_safely(tmp_path, service):
    with connect(service, tmp_path, "writer") as st:
        root = make_root(st)
        token = take_lease(st, "a1", "t1")
        commit_model(st, "a1", token, "t1", 0, root, np.random.default_rng(2), elems=65536)
    host_b = str(tmp_path / "host-b-cache")
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, service.endpoint, host_b,
                               "a1:m0"], env=ENV, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({r["n"] for r in results}) == 1
    with connect(service, tmp_path, "host-b-cache") as again:
        served = again.health()["blob_bytes_served"]
        loaded = again.load_model_tensors("a1:m0")
        assert again.bytes_fetched == 0 and again.cache.hits > 0
        assert again.health()["blob_bytes_served"] == served
        with Store.open(service.store, readonly=True) as local:
            assert {c: tensors_of(pm) for c, pm in loaded.items()} == \
                {c: tensors_of(pm) for c, pm in local.load_model_tensors("a1:m0").items()}
    leftovers = [f for _, _, files in os.walk(host_b) for f in files if f.startswith(".part-")]
    assert leftovers == []


def test_kill9_the_service_during_commits_loses_nothing_and_doubles_nothing(tmp_path):
    store = str(tmp_path / "served")
    port = free_port()
    svc = start_service(store, port=port)
    with connect(svc, tmp_path) as st:
        make_root(st)
    out = str(tmp_path / "writer.json")
    env = dict(ENV, MUNET_BLOB_CACHE=str(tmp_path / "wcache"), MUNET_STORE_REPLY_TIMEOUT="2")
    count = 40
    writer = subprocess.Popen([sys.executable, "-m", "helpers.service_clients", svc.endpoint,
                               "a1", "t1", str(count), out], env=env)
    try:
        for kill_at in (8, 22):
            while not os.path.exists(out + ".progress") or \
                    int(open(out + ".progress").read() or 0) < kill_at:
                assert writer.poll() is None, "writer ended early"
                time.sleep(0.01)
            svc.kill()  # SIGKILL, mid-stream: a commit may be in flight
            time.sleep(1.0)
            svc = start_service(store, port=port)
        assert writer.wait(120) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
        svc.kill()
    result = json.load(open(out))
    assert result["retries"] >= 1  # a kill between two requests costs no resend at all
    with Store.open(store, readonly=True) as local:
        assert local.verify() == []
        published = [e for e in local.events() if e.kind == "published"]
        assert [e.model_id for e in published] == [f"a1:m{n}" for n in range(count)]
        assert result["seqs"] == [e.seq for e in published]
        assert len(local.trials()) == count


def test_a_dropped_connection_mid_blob_resumes_the_upload_and_the_download(tmp_path, service):
    host, port = service.endpoint[6:].rsplit(":", 1)
    relay = Relay((host, int(port)), throttle=0.002)
    env_timeout = os.environ.get("MUNET_STORE_REPLY_TIMEOUT")
    os.environ["MUNET_STORE_REPLY_TIMEOUT"] = "1.5"
    try:
        with connect(service, tmp_path, "direct") as direct:
            root = make_root(direct)
            token = take_lease(direct, "a1", "t1")
        st = RemoteStore.connect(relay.endpoint, cache_dir=str(tmp_path / "relayed"))
        # hello went through the relay; the doorbell comes straight from the service port
        rng = np.random.default_rng(5)
        elems = 3 * 2**20 // 4  # one 12 MiB tensor per component: three chunks each
        import threading

        def cut_when(nbytes):
            while relay.bytes < nbytes:
                time.sleep(0.005)
            relay.drop()

        cutter = threading.Thread(target=cut_when, args=(relay.bytes + 6 * 2**20,))
        cutter.start()
        commit_model(st, "a1", token, "t1", 0, root, rng, elems=elems)
        cutter.join()
        with connect(service, tmp_path, "direct") as direct:
            health = direct.health()
            blob_bytes = sum(v for v in direct.stats()["counts"].values()) and \
                direct.stats()["blob_bytes"]
        assert relay.drops == 1 and st.channel.retries >= 1
        assert health["uploads_resumed"] >= 1
        uploaded = health["blob_bytes_staged"]
        assert uploaded < 1.5 * st.bytes_uploaded  # resumed, not restarted from zero
        served_before = health["blob_bytes_served"]
        cutter = threading.Thread(target=cut_when, args=(relay.bytes + 6 * 2**20,))
        cutter.start()
        fresh = RemoteStore.connect(relay.endpoint, cache_dir=str(tmp_path / "fresh"))
        loaded = fresh.load_model_tensors("a1:m0")
        cutter.join()
        assert relay.drops == 2 and fresh.channel.retries >= 1
        with connect(service, tmp_path, "direct") as direct:
            served = direct.health()["blob_bytes_served"] - served_before
            assert {c: tensors_of(pm) for c, pm in loaded.items()} == \
                {c: tensors_of(pm) for c, pm in direct.load_model_tensors("a1:m0").items()}
        assert fresh.bytes_fetched < served < 1.5 * fresh.bytes_fetched + wire.CHUNK_BYTES * wire.CREDIT
        assert blob_bytes > 0
        st.close()
        fresh.close()
    finally:
        if env_timeout is None:
            os.environ.pop("MUNET_STORE_REPLY_TIMEOUT", None)
        else:
            os.environ["MUNET_STORE_REPLY_TIMEOUT"] = env_timeout
        relay.close()


def _junk(rng: random.Random) -> list[bytes]:
    """One malformed request of a random sort."""
    sort = rng.randrange(8)
    good = {"v": wire.VERSION, "kind": "meta", "id": "x1", "args": {}}
    if sort == 0:
        return [rng.randbytes(rng.randrange(0, 200))]
    if sort == 1:
        return [msgpack.packb(rng.choice([1, "s", [1, 2], None, 3.5]))]
    if sort == 2:
        return [msgpack.packb({**good, "v": rng.choice([0, 2, "1", True])})]
    if sort == 3:
        return [msgpack.packb({**good, "kind": rng.choice(["drop_all", "", "x" * 500])})]
    if sort == 4:
        return [msgpack.packb({**good, "args": {"model_id": rng.randrange(10)}}) ]
    if sort == 5:
        return [msgpack.packb({**good, "kind": "blob_read",
                               "args": {"reads": [["k" * 64, -1, 2**40]]}})]
    if sort == 6:
        return [msgpack.packb(good)] + [b"x"] * rng.randrange(70, 200)  # too many frames
    return [msgpack.packb({**good, "kind": "blob_write", "id": "w",
                           "args": {"writes": [["ab" * 32, 5, 10]]}}), b"12345"]


def test_thousands_of_malformed_frames_are_dropped_and_counted(tmp_path, service):
    ctx = zmq.Context.instance()
    rng = random.Random(11)
    sent = 3000
    with connect(service, tmp_path) as st:
        before = st.health()
        fuzz = ctx.socket(zmq.DEALER)
        fuzz.linger = 0
        fuzz.connect(service.endpoint)
        for _ in range(sent):
            fuzz.send_multipart(_junk(rng))
        huge = ctx.socket(zmq.DEALER)  # a frame over the size cap: zmq drops that connection
        huge.linger = 0
        huge.connect(service.endpoint)
        huge.send(b"\0" * (wire.MAX_FRAME_BYTES + 1))
        deadline = time.time() + 60
        while time.time() < deadline:
            h = st.health()
            if h["requests"] + h["dropped"] - before["requests"] - before["dropped"] \
                    >= sent - 10:
                break
            time.sleep(0.2)
        assert st.meta()["schema_version"] >= 1  # still serving
        h = st.health()
        assert h["dropped"] - before["dropped"] >= sent * 0.5
        assert set(h["dropped_by_reason"]) >= {"bad_header", "unknown_kind", "too_many_frames",
                                               "bad_args"}
        assert service.proc.poll() is None
        fuzz.close()
        huge.close()


def test_a_request_of_another_version_or_kind_gets_an_error_reply_not_silence(service):
    """A client of another version must fail at once with a reason, not wait out its timeout."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(service.endpoint)
    try:
        for header in ({"v": wire.VERSION + 1, "kind": "meta", "id": "other-client", "args": {}},
                       {"v": wire.VERSION, "kind": "teleport", "id": "new-client", "args": {}}):
            sock.send_multipart([msgpack.packb(header)])
            assert sock.poll(5000), f"no reply to {header}"
            rid, ok, err = wire.decode_reply(sock.recv_multipart()[0])
            assert rid == header["id"] and not ok
            assert "versions differ" in wire.error_from_wire(err).args[0]
    finally:
        sock.close()
