"""The store service under load (issue 18, item 3), on real service processes, sockets and LMDB.

- concurrency: a long ``verify`` no longer holds up a heartbeat or a read sent after it on the same
  connection (their replies overtake it); the single-threaded service (``--read-workers 0``)
  answers in arrival order, which is what the lanes fix;
- staging on disk: half a blob uploaded, the service killed and restarted, the client resumes from
  the offset reached; stale and unknown staging files are deleted on start;
- the host's blob cache keeps under its cap, evicts the least recently used first, and several
  processes evicting and reading at once never get a wrong blob;
- revoking a client key cuts that client's live session with a clear user error;
- a client of a dead service gives up within its bound with ``StoreUnavailable``;
- a smoke run of benchmarks/service_load.py with tiny bounds (slow).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from helpers import REPO
from helpers.service_clients import commit_model, take_lease
from helpers.service_procs import ENV, free_port, start_service
from helpers.store_records import child_writes, make_root, random_tensor
from helpers.swarm import run_cli, wait_for
from protocol.tensors import RawTensor, encode_blob
from store import ComponentWrite, Store, StoreError, StoreUnavailable, component_id
from store.service import keys as keymod
from store.service import wire
from store.service.blobcache import BlobCache, content_key
from store.service.client import RemoteStore


def connect(endpoint: str, tmp_path, name: str = "cache", **kw) -> RemoteStore:
    return RemoteStore.connect(endpoint, cache_dir=str(tmp_path / name), **kw)


# ---- reads beside a long verify ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A store whose verify re-hashes ~160 MB (long next to a heartbeat's few milliseconds)."""
    path = str(tmp_path_factory.mktemp("big") / "store")
    with Store.open(path, create=True) as st:
        make_root(st)
        token = st.acquire_lease("big", "tbig", ttl=600, host="h", pid=1, device="cpu",
                                 endpoint="tcp://127.0.0.1:1", preset="test")
        for c in range(10):  # fresh bytes per blob: content addressing must not dedupe them
            writes = [ComponentWrite.build(component_id("big", 4 * c + i), f"encoderblock_{i}",
                                           "big", {"weight": RawTensor.from_numpy(
                                               np.full((1024, 1024), 4 * c + i, np.float32))})
                      for i in range(4)]
            st.commit("big", token, components=writes)
    return path


def replies_in_order(endpoint: str, requests: list[tuple[str, dict]]) -> list[str]:
    """Send every request at once on ONE connection (ZeroMQ keeps their order to the service);
    return the kinds in the order their replies came."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    kind_of = {}
    try:
        for kind, args in requests:
            rid = wire.new_request_id()
            kind_of[rid] = kind
            sock.send_multipart([wire.encode_request(kind, rid, args)])
        order = []
        while len(order) < len(requests):
            assert sock.poll(120_000), f"no reply after {order}"
            rid, ok, result = wire.decode_reply(sock.recv_multipart()[0])
            assert ok, result
            order.append(kind_of[rid])
        return order
    finally:
        sock.close()


@pytest.mark.parametrize("workers", [4, 0])
def test_a_long_verify_does_not_hold_up_heartbeats_or_reads(tmp_path, big_store, workers):
    svc = start_service(big_store, extra=("--read-workers", str(workers)))
    try:
        with connect(svc.endpoint, tmp_path) as st:
            token = take_lease(st, f"hb{workers}", f"thb{workers}")
            assert st.health()["read_workers"] == workers
        beat = {"agent_id": f"hb{workers}", "token": token, "ttl": 60.0, "state": None,
                "progress": {"step": 1}, "endpoint": None}
        order = replies_in_order(svc.endpoint, [
            ("verify", {}), ("heartbeat", beat), ("last_event_seq", {}),
            ("get_model", {"model_id": "root:m0"}), ("heartbeat", beat)])
        if workers:  # the verify runs on its own thread: everything sent after it overtakes it
            assert order[-1] == "verify", order
        else:  # one thread, arrival order: the heartbeat waited for the whole verify
            assert order[0] == "verify", order
        with connect(svc.endpoint, tmp_path) as st:
            assert st.verify() == []
            agent = st.get_agent(f"hb{workers}")
            assert agent.progress == {"step": 1}  # both heartbeats applied
    finally:
        svc.kill()


def test_many_heartbeats_at_once_are_each_applied_and_answered(tmp_path):
    """Waiting heartbeats share one write transaction; each still gets its own reply (a lost
    lease its own error) and each agent's record moves."""
    svc = start_service(str(tmp_path / "s"))
    try:
        with connect(svc.endpoint, tmp_path) as st:
            tokens = {f"a{i}": take_lease(st, f"a{i}", f"t{i}") for i in range(40)}
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(svc.endpoint)
        want = {}
        for agent, token in tokens.items():
            rid = wire.new_request_id()
            want[rid] = agent
            bad = agent == "a7"
            sock.send_multipart([wire.encode_request("heartbeat", rid, {
                "agent_id": agent, "token": "stale" if bad else token, "ttl": 60.0,
                "state": "training", "progress": {"agent": agent}, "endpoint": None})])
        got = {}
        while len(got) < len(want):
            assert sock.poll(30_000)
            rid, ok, result = wire.decode_reply(sock.recv_multipart()[0])
            got[want[rid]] = (ok, result)
        sock.close()
        assert got["a7"][0] is False and got["a7"][1]["type"] == "LeaseLost"
        assert all(ok and result["progress"] == {"agent": a}
                   for a, (ok, result) in got.items() if a != "a7")
        with connect(svc.endpoint, tmp_path) as st:
            agents = {a.agent_id: a for a in st.agents()}
            assert agents["a3"].state == "training" and agents["a7"].progress != {"agent": "a7"}
    finally:
        svc.kill()


# ---- staged uploads survive a restart ---------------------------------------------------------------

def restart(store: str, port: int, pub: str):
    """The service again on its ports (a client's reconnecting socket may hold one briefly)."""
    for attempt in range(20):
        try:
            return start_service(store, port=port, pub=pub)
        except AssertionError as exc:
            if "Address already in use" not in str(exc) or attempt == 19:
                raise
            time.sleep(0.25)


def test_a_half_uploaded_blob_resumes_after_the_service_restarts(tmp_path):
    store = str(tmp_path / "served")
    port, pub = free_port(), f"tcp://127.0.0.1:{free_port()}"
    svc = start_service(store, port=port, pub=pub)
    elems = 2**20  # the head's weight and momentum: 12 MiB blobs
    try:
        st = connect(svc.endpoint, tmp_path, retry_seconds=60)
        root = make_root(st)
        token = take_lease(st, "a1", "t1")
        writes = child_writes("a1", 0, np.random.default_rng(11), elems)
        blob = encode_blob(writes[0].tensors["weight"])
        key, total = content_key(blob), len(blob)
        half = 6 * 2**20
        for offset in (0, 3 * 2**20):
            st.channel.call("blob_write", {"writes": [[key, offset, total]]},
                            [memoryview(blob)[offset:offset + 3 * 2**20]])
        assert st.channel.call("blob_missing", {"keys": [key]})[0]["missing"] == {key: half}
        staging = os.path.join(store, "service-staging")
        assert os.listdir(staging) == [f"{key}.{total}.part"]
        # leftovers a restart must clean: junk, and an upload untouched for longer than the TTL
        open(os.path.join(staging, "junk.tmp"), "w").close()
        stale = os.path.join(staging, f"{'e' * 64}.100.part")
        open(stale, "wb").write(b"x" * 10)
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        svc.kill()  # SIGKILL: no chance to tidy up
        svc = restart(store, port, pub)
        health = st.health()
        # staged space counts the bytes that arrived, not the size an upload declares
        assert health["uploads_recovered"] == 1 and health["staged_bytes"] == half
        assert sorted(os.listdir(staging)) == [f"{key}.{total}.part"]
        assert st.channel.call("blob_missing", {"keys": [key]})[0]["missing"] == {key: half}
        # the real commit (same tensors) resumes that blob from the offset reached
        uploaded_before = st.bytes_uploaded
        commit_model(st, "a1", token, "t1", 0, root, np.random.default_rng(11), elems=elems)
        health = st.health()
        all_blobs = {content_key(encode_blob(t)) for w in writes
                     for t in [*w.tensors.values(), *w.momentum.values()]}
        assert health["uploads_resumed"] >= 1
        new_bytes = st.bytes_uploaded - uploaded_before
        assert health["blob_bytes_staged"] == new_bytes
        assert new_bytes <= sum(len(encode_blob(t)) for w in writes for t in
                                [*w.tensors.values(), *w.momentum.values()]) - half
        assert os.listdir(staging) == []  # committed: nothing left staged
        st.close()
        with Store.open(store, readonly=True) as local:
            assert local.verify() == []
            assert local.get_model("a1:m0") is not None
            stored = local.blob_sizes(sorted(all_blobs))
            assert all(v is not None for v in stored.values())
    finally:
        svc.kill()


# ---- the host's blob cache is bounded ---------------------------------------------------------------

def _blobs(seed: int, count: int, elems: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for _ in range(count):
        blob = encode_blob(random_tensor(rng, elems))
        out[content_key(blob)] = blob
    return out


def test_the_blob_cache_stays_under_its_cap_and_evicts_the_least_recently_used(tmp_path):
    blobs = _blobs(1, 30, 25_000)  # ~100 KB each
    size = len(next(iter(blobs.values())))
    cache = BlobCache(str(tmp_path / "c"), max_bytes=10 * size + 100)
    keys = list(blobs)
    for key in keys[:8]:
        cache.put(key, blobs[key])
    hour_ago = time.time() - 3600
    for key in keys[:8]:  # all old; then reading keys[0] makes it the most recently used
        os.utime(cache.path(key), (hour_ago, hour_ago))
    assert bytes(cache.get(keys[0])) == blobs[keys[0]]
    for key in keys[8:12]:  # the 11th blob passes the cap of 10: back to 9, the oldest unread go
        cache.put(key, blobs[key])
        assert cache.size() <= cache.max_bytes
    assert cache.evicted == 2
    assert [cache.get(k) is None for k in keys[1:3]] == [True] * 2  # old and unread: evicted
    assert bytes(cache.get(keys[0])) == blobs[keys[0]]  # read recently: kept
    assert all(bytes(cache.get(k)) == blobs[k] for k in keys[3:12])
    for key in keys[12:]:
        cache.put(key, blobs[key])
        assert cache.size() <= cache.max_bytes
    assert bytes(cache.get(keys[-1])) == blobs[keys[-1]]
    # a damaged file is never served (and is dropped)
    with open(cache.path(keys[-1]), "r+b") as f:
        f.seek(size // 2)
        f.write(b"\x00\x01\x02")
    fresh = BlobCache(str(tmp_path / "c"), max_bytes=cache.max_bytes)
    assert fresh.get(keys[-1]) is None and not os.path.exists(cache.path(keys[-1]))


def test_the_cap_comes_from_the_environment_and_bad_values_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MUNET_BLOB_CACHE_MB", "3")
    assert BlobCache(str(tmp_path / "c")).max_bytes == 3 * 2**20
    monkeypatch.setenv("MUNET_BLOB_CACHE_MB", "lots")
    with pytest.raises(wire.ServiceUserError, match="MUNET_BLOB_CACHE_MB"):
        BlobCache(str(tmp_path / "c"))
    monkeypatch.delenv("MUNET_BLOB_CACHE_MB")
    assert BlobCache(str(tmp_path / "c")).max_bytes == 4096 * 2**20


CACHE_CHURN = r"""
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from test_service_load import _blobs
from store.service.blobcache import BlobCache
blobs = _blobs(2, 24, 25_000)
keys = sorted(blobs)
size = len(blobs[keys[0]])
cache = BlobCache(sys.argv[3], max_bytes=6 * size)
seed = int(sys.argv[4])
bad = hits = 0
for i in range(600):
    key = keys[(i * 7 + seed * 5) % len(keys)]
    got = cache.get(key)
    if got is None:
        cache.put(key, blobs[key])
    elif bytes(got) != blobs[key]:
        bad += 1
    else:
        hits += 1
print(bad, hits, cache.evicted)
"""


def test_several_processes_evicting_and_reading_never_get_a_wrong_blob(tmp_path):
    root = str(tmp_path / "shared")
    procs = [subprocess.Popen([sys.executable, "-c", CACHE_CHURN, REPO,
                               os.path.join(REPO, "tests"), root, str(seed)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [tuple(int(x) for x in o[0].split()) for o in outs]
    assert all(bad == 0 for bad, _, _ in results), results
    assert sum(hits for _, hits, _ in results) > 0 and sum(ev for _, _, ev in results) > 0
    size = len(next(iter(_blobs(2, 1, 25_000).values())))
    assert BlobCache(root, max_bytes=6 * size).size() <= 6 * size


# ---- revoking a key cuts live sessions --------------------------------------------------------------

def test_revoking_a_key_cuts_that_clients_live_session(tmp_path):
    keydir = str(tmp_path / "keys")
    svc = start_service(str(tmp_path / "served"), keys=keydir)
    try:
        folder = keymod.add_client(keydir, "box2")

        def admitted() -> bool:
            try:
                connect(svc.endpoint, tmp_path, "c", keys=folder, connect_timeout=1).close()
                return True
            except keymod.ServiceUserError:
                return False

        wait_for(admitted, 20, "the service to admit the new client")
        st = connect(svc.endpoint, tmp_path, "c", keys=folder, connect_timeout=5)
        other = connect(svc.endpoint, tmp_path, "o", keys=keydir, connect_timeout=5)
        assert st.meta()["schema_version"] >= 1  # connected and working
        os.remove(os.path.join(keydir, "authorized", "box2.key"))
        t0 = time.monotonic()
        with pytest.raises(wire.AccessRevoked) as caught:
            while time.monotonic() - t0 < 30:
                st.meta()  # the same open session: refused once the service reloads the keys
                time.sleep(0.05)
        assert time.monotonic() - t0 < 30
        assert isinstance(caught.value, keymod.ServiceUserError)  # a user error: exit 2
        assert "no longer authorises this client's key" in str(caught.value)
        with pytest.raises(wire.AccessRevoked):
            st.last_event_seq()
        assert other.meta()["schema_version"] >= 1  # the authorised client is unaffected
        assert other.health()["revoked"] >= 1  # the second call was refused by the client itself
        st.close()
        other.close()
    finally:
        svc.kill()


# ---- a dead service: a bounded give-up --------------------------------------------------------------

def test_a_client_of_a_killed_service_gives_up_within_its_bound(tmp_path):
    svc = start_service(str(tmp_path / "served"))
    bound = 3.0
    try:
        st = connect(svc.endpoint, tmp_path, retry_seconds=bound)
        assert st.last_event_seq() == 0
        # mid-session: the doorbell has beaten (a slow request on a channel that never heard it
        # waits for its own reply timeout instead: see store/service/channel.py)
        wait_for(lambda: st.channel.last_beat > 0, 10, "the service's doorbell")
        svc.kill()  # SIGKILL
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            st.last_event_seq()
        first = time.monotonic() - t0
        assert first < bound + 2.0, first
        assert isinstance(caught.value, StoreError) and "MUNET_STORE_RETRY_SECONDS" in str(
            caught.value)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            st.verify()  # a slow request is bounded the same way (the doorbell went quiet)
        assert time.monotonic() - t0 < bound + 2.0
        st.close()
    finally:
        svc.kill()


def test_the_give_up_bound_comes_from_the_environment(tmp_path, monkeypatch):
    svc = start_service(str(tmp_path / "served"))
    try:
        monkeypatch.setenv("MUNET_STORE_RETRY_SECONDS", "7.5")
        with connect(svc.endpoint, tmp_path) as st:
            assert st.channel.retry_seconds == 7.5
        monkeypatch.delenv("MUNET_STORE_RETRY_SECONDS")
        with connect(svc.endpoint, tmp_path) as st:
            assert st.channel.retry_seconds == 120.0
    finally:
        svc.kill()


# ---- command lines -----------------------------------------------------------------------------------

def test_bad_flags_are_one_line_user_errors(tmp_path):
    for args in (["launch/serve_store.py", "--store", str(tmp_path / "s"), "--read-workers", "99"],
                 ["benchmarks/service_load.py", "--agents", "0"]):
        proc = run_cli(*args, env={"PYTHONPATH": REPO})
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, \
            proc.stderr


@pytest.mark.slow
def test_the_load_benchmark_runs_with_tiny_bounds(tmp_path):
    out = tmp_path / "load.json"
    proc = run_cli("benchmarks/service_load.py", "--agents", "6", "--seconds", "2", "--models", "1",
                   "--components", "2", "--component-mb", "0.25", "--publish-every", "0.5",
                   "--load", "1", "--refresh", "1", "--repeats", "1", "--out", str(out), timeout=300,
                   env={"PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("agents", "failed_requests", "failed_requests_with_verify", "latency_ms",
                "latency_ms_with_verify", "requests_per_second", "requests_per_second_with_verify",
                "service_cpu_seconds", "service_cpu_seconds_with_verify", "targets",
                "baseline_single_thread", "before_after", "verify_ratio"):
        assert key in result, key
    assert result["agents"] == 6
    for kind in ("heartbeat", "last_event_seq", "published_models", "get_model", "get_component",
                 "manifest", "blob_read", "publish"):
        for section in (result["latency_ms"], result["latency_ms_with_verify"]):
            assert {"p50", "p99"} <= set(section[kind]), kind
    assert result["latency_ms_with_verify"]["verify"]["n"] >= 1
    assert set(result["targets"]) == {"no_failed_requests", "heartbeat_p99_ms<=50",
                                      "verify_ratio<=2"}
    base = result["baseline_single_thread"]
    assert {"latency_ms", "latency_ms_with_verify", "failed_requests"} <= set(base)
    assert result["failed_requests"] == 0 and result["failed_requests_with_verify"] == 0


def test_a_fully_written_upload_the_service_died_before_checking_is_checked_on_start(tmp_path):
    # kill -9 between the last chunk's write and its hash check leaves a full-size ``.part``: the
    # next service checks it (complete if it hashes right, deleted if not); else a client would be
    # told forever that zero bytes are missing
    from store.service.staging import Staging

    rng = np.random.default_rng(0)
    good = bytes(encode_blob(random_tensor(rng, 64, 64)))
    bad = bytearray(bytes(encode_blob(random_tensor(rng, 64, 64))))
    bad_key = content_key(bytes(bad))
    bad[-1] ^= 0xFF  # the bytes on disk no longer hash to the key they were staged under
    folder = tmp_path / "staging"
    folder.mkdir()
    (folder / f"{content_key(good)}.{len(good)}.part").write_bytes(good)
    (folder / f"{bad_key}.{len(bad)}.part").write_bytes(bytes(bad))
    staging = Staging(folder=str(folder))
    assert staging.is_complete(content_key(good)) and staging.offset(content_key(good)) == len(good)
    assert staging.tensor(content_key(good)) is not None
    assert not staging.is_complete(bad_key) and staging.offset(bad_key) == 0  # upload it again
    assert sorted(os.listdir(folder)) == [f"{content_key(good)}.{len(good)}.blob"]
