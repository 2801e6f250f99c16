"""One client cannot wedge publishing: the staging area counts bytes that arrived (not declared
sizes), bounds each client's share and number of uploads, drops stalled uploads fast, and an honest
client refused for room retries and then gives up as "store unavailable" (exit 75), not as a failure.
A real Staging (in memory and on disk) and a real service with real clients."""
from __future__ import annotations

import time

import numpy as np
import pytest

from helpers.service_clients import commit_model, take_lease
from helpers.service_procs import start_service
from helpers.store_records import make_root, random_tensor
from protocol.tensors import encode_blob
from store import StoreError, StoreUnavailable
from store.service import wire
from store.service.blobcache import content_key
from store.service.client import RemoteStore
from store.service.staging import Staging

MiB = 2**20


def blob(seed: int, n: int = 1024) -> bytes:
    return bytes(encode_blob(random_tensor(np.random.default_rng(seed), n)))


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_huge_declared_size_holds_only_the_bytes_sent(tmp_path, on_disk):
    staging = Staging(max_bytes=8 * MiB, folder=str(tmp_path / "s") if on_disk else None)
    with pytest.raises(StoreError, match="can never be staged"):  # more than any client may stage
        staging.write("a" * 64, 0, 2 * 2**30, memoryview(b"x"), "greedy")
    staging.write("a" * 64, 0, 7 * MiB, memoryview(b"x"), "greedy")  # declares 7 of 8 MiB, sends 1 byte
    assert staging.bytes == 1
    honest = blob(1, 256 * 1024)  # 1 MiB: fits beside it at once
    key = content_key(honest)
    assert staging.write(key, 0, len(honest), memoryview(honest), "honest") == len(honest)
    assert staging.is_complete(key) and staging.bytes == 1 + len(honest)


def test_each_client_has_a_share_and_an_upload_count(tmp_path):
    staging = Staging(max_bytes=4 * MiB, max_client_bytes=MiB, max_client_uploads=3)
    for i in range(3):
        staging.write(f"{i:064x}", 0, 100, memoryview(b"y" * 10), "a")
    with pytest.raises(wire.ServiceBusy, match="3 uploads"):
        staging.write(f"{9:064x}", 0, 100, memoryview(b"y"), "a")
    staging.write(f"{9:064x}", 0, 100, memoryview(b"y"), "b")  # another client is not held up
    big = f"{10:064x}"
    staging.write(big, 0, MiB, memoryview(b"z" * (MiB // 2)), "b")
    with pytest.raises(wire.ServiceBusy, match="its limit"):
        staging.write(big, MiB // 2, MiB, memoryview(b"z" * (MiB // 2)), "b")
    with pytest.raises(StoreError, match="can never be staged"):
        staging.write(f"{11:064x}", 0, 2 * MiB, memoryview(b"z"), "c")  # over any client's share


def test_a_stalled_upload_expires_fast_a_complete_one_waits_for_its_commit():
    staging = Staging(max_bytes=8 * MiB, ttl=600, partial_ttl=30)
    done = blob(2)
    staging.write(content_key(done), 0, len(done), memoryview(done), "a")
    staging.write("b" * 64, 0, 1000, memoryview(b"x" * 10), "a")
    assert staging.expire(now=time.time() + 31) == 1  # the stalled one
    assert staging.is_complete(content_key(done)) and staging.offset("b" * 64) == 0
    assert staging.expire(now=time.time() + 601) == 1


def test_the_greedy_probe_no_longer_blocks_an_honest_commit_through_the_service(tmp_path):
    """The probe from the field: one blob_write of 1 byte declaring 2 GiB, then an honest agent."""
    svc = start_service(str(tmp_path / "served"))
    try:
        greedy = RemoteStore.connect(svc.endpoint, cache_dir=str(tmp_path / "g"))
        with pytest.raises(StoreError, match="can never be staged"):  # 2 GiB: refused outright
            greedy.channel.call("blob_write", {"writes": [["f" * 64, 0, 2 * 2**30]]}, [memoryview(b"x")])
        # within its share (512 MiB of the default 2 GiB): accepted, and it holds one byte
        greedy.channel.call("blob_write", {"writes": [["f" * 64, 0, 500 * MiB]]}, [memoryview(b"x")])
        honest = RemoteStore.connect(svc.endpoint, cache_dir=str(tmp_path / "h"), retry_seconds=10)
        root = make_root(honest)
        token = take_lease(honest, "a1", "t1")
        t0 = time.monotonic()
        commit_model(honest, "a1", token, "t1", 0, root, np.random.default_rng(3), elems=64 * 1024)
        assert time.monotonic() - t0 < 10 and honest.health()["staged_bytes"] <= 1
        greedy.close()
        honest.close()
    finally:
        svc.kill()


def test_an_honest_client_kept_out_by_a_full_area_gives_up_as_unavailable(tmp_path):
    """StoreUnavailable (an engine-run agent exits 75 and is restarted later), not a failure."""
    svc = start_service(str(tmp_path / "served"), extra=("--staging-mib", "16"))
    try:
        filler = RemoteStore.connect(svc.endpoint, cache_dir=str(tmp_path / "f"))
        for offset in range(0, 16 * MiB, MiB):  # all but 64 KiB of the area, never completed
            n = MiB if offset < 15 * MiB else MiB - 64 * 1024
            filler.channel.call("blob_write", {"writes": [["e" * 64, offset, 16 * MiB]]},
                                [memoryview(b"x" * n)])
        honest = RemoteStore.connect(svc.endpoint, cache_dir=str(tmp_path / "h"), retry_seconds=3)
        root = make_root(honest) if honest.root_model_id() is None else None
        token = take_lease(honest, "a1", "t1")
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no room"):
            commit_model(honest, "a1", token, "t1", 0, root or honest.get_model(honest.root_model_id()),
                         np.random.default_rng(4), elems=64 * 1024)
        assert time.monotonic() - t0 < 3 + 10
        filler.close()
        honest.close()
    finally:
        svc.kill()


def test_complete_blobs_leave_the_clients_share_and_tallies_stay_exact_across_a_restart(tmp_path):
    """A commit larger than a client's share still goes through: a complete blob waiting for its
    commit no longer counts in the share. After a restart, the client that resumes an upload owns it."""
    folder = str(tmp_path / "s")
    staging = Staging(max_bytes=8 * MiB, max_client_bytes=MiB, folder=folder)
    blobs = [blob(10 + i, 200 * 1024) for i in range(3)]  # ~0.8 MiB each: 2.4 MiB, over a 1 MiB share
    for b in blobs:
        assert staging.write(content_key(b), 0, len(b), memoryview(b), "a") == len(b)
    assert staging._client_bytes.get("a", 0) == 0 and staging._client_uploads["a"] == 3
    half = blobs[0][:100_000]
    other = blob(20, 200 * 1024)
    staging.write(content_key(other), 0, len(other), memoryview(other[:100_000]), "b")
    again = Staging(max_bytes=8 * MiB, max_client_bytes=MiB, folder=folder)  # a restart
    assert again.bytes == sum(len(b) for b in blobs) + len(half)
    again.write(content_key(other), 100_000, len(other), memoryview(other[100_000:200_000]), "c")
    assert again._client_bytes == {"c": 200_000} and again._client_uploads == {"": 3, "c": 1}
    again.discard([content_key(b) for b in blobs] + [content_key(other)])
    assert again.bytes == 0 and again._client_bytes == {} and again._client_uploads == {}
