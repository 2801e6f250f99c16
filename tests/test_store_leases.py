"""Leases: one live process per agent id and per task; stale leases can be taken over.

Staleness is simulated with the ``now`` arguments instead of sleeping.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

from helpers.store_records import lease, make_root, publish_next
from store import Conflict, LeaseHeld, LeaseLost, Store

T0 = 1_000_000.0  # a fixed clock for the lease tests


@pytest.fixture
def st(tmp_path):
    with Store.open(tmp_path / "store", create=True) as store:
        make_root(store)
        yield store


def test_fresh_lease_is_refused_with_holder_and_time_left(st):
    lease(st, "a", "t1", ttl=10, now=T0)
    with pytest.raises(LeaseHeld) as info:
        lease(st, "a", "t1", ttl=10, now=T0 + 4)
    assert info.value.expires_in == pytest.approx(6.0)
    assert "pid" in info.value.holder and len(str(info.value).splitlines()) == 1
    record = st.get_agent("a")
    assert record.state == "starting" and record.lease_expiry == T0 + 10


def test_takeover_after_expiry_revokes_the_old_holder(st):
    root = st.get_model(st.root_model_id())
    old = lease(st, "a", "t1", ttl=10, now=T0)
    publish_next(st, "a", old, "t1", 0, root, np.random.default_rng(0))
    new = lease(st, "a", "t1", ttl=10, now=T0 + 10.5)  # old holder stopped heartbeating
    assert new != old and st.get_agent("a").lease_token == new
    with pytest.raises(LeaseLost):
        st.heartbeat("a", old, ttl=10, now=T0 + 11)
    before = st.last_event_seq()
    with pytest.raises(LeaseLost):
        publish_next(st, "a", old, "t1", 1, root, np.random.default_rng(1), parent="a:m0")
    assert st.last_event_seq() == before and st.get_model("a:m1") is None
    with pytest.raises(LeaseLost):
        st.release_lease("a", old)
    publish_next(st, "a", new, "t1", 1, root, np.random.default_rng(1), parent="a:m0")
    assert st.published_models()["t1"].id == "a:m1"


def test_heartbeat_extends_and_reports_progress(st):
    token = lease(st, "a", "t1", ttl=10, now=T0)
    record = st.heartbeat("a", token, ttl=10, state="running", now=T0 + 8,
                          progress={"cycle": 1, "generation": 3, "best_score": 0.7},
                          endpoint="tcp://127.0.0.1:5555")
    assert record.lease_expiry == T0 + 18 and record.heartbeat_at == T0 + 8
    stored = st.get_agent("a")
    assert stored == record and stored.progress["generation"] == 3
    assert stored.endpoint == "tcp://127.0.0.1:5555" and stored.state == "running"
    with pytest.raises(LeaseHeld):  # still fresh thanks to the heartbeat
        lease(st, "a", "t1", ttl=10, now=T0 + 15)
    assert [a.agent_id for a in st.live_agents(now=T0 + 17)] == ["a"]
    assert st.live_agents(now=T0 + 19) == []


def test_release_frees_the_lease_and_keeps_the_record(st):
    token = lease(st, "a", "t1", ttl=100, now=T0)
    st.release_lease("a", token, state="finished")
    record = st.get_agent("a")
    assert record.state == "finished" and record.lease_expiry == 0.0 and record.pid > 0
    assert st.live_agents(now=T0) == []
    with pytest.raises(LeaseLost):  # a released token can no longer write
        st.commit("a", token)
    assert lease(st, "a", "t1", ttl=10, now=T0 + 1)  # immediately available again


def test_one_live_agent_per_task_and_one_task_per_agent(st):
    old = lease(st, "a", "t1", ttl=10, now=T0)
    with pytest.raises(LeaseHeld, match="'b'"):
        lease(st, "b", "t1", ttl=10, now=T0 + 1)
    with pytest.raises(Conflict, match="serves task"):
        lease(st, "a", "t2", ttl=10, now=T0 + 20)
    lease(st, "b", "t1", ttl=10, now=T0 + 11)  # a's lease is stale: b takes the task over
    assert st.get_agent("a").state == "superseded"
    with pytest.raises(LeaseLost):  # so the stale process cannot become a second writer of t1
        st.commit("a", old)
    lease(st, "c", "t2", ttl=10, now=T0 + 11)  # other tasks are independent
    assert sorted(a.agent_id for a in st.live_agents(now=T0 + 12)) == ["b", "c"]


def _try_lease(path: str, queue) -> None:
    with Store.open(path) as st:
        try:
            lease(st, "a", "t1", ttl=30)
            queue.put("acquired")
        except LeaseHeld as exc:
            queue.put(f"held:{exc.expires_in:.0f}")


def test_lease_is_refused_to_another_process(st):
    lease(st, "a", "t1", ttl=30, now=time.time())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_try_lease, args=(st.path, queue))
    proc.start()
    try:
        result = queue.get(timeout=60)
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    assert result.startswith("held:") and proc.exitcode == 0


def test_a_holder_on_this_host_is_gone_when_its_pid_is_dead_or_reused():
    import subprocess
    import time as _time

    from store.holders import holder_gone, this_host

    proc = subprocess.Popen(["sleep", "60"])
    try:
        _time.sleep(0.1)
        now = _time.time()
        assert not holder_gone(this_host(), proc.pid, heartbeat_at=now)          # it runs: alive
        # the pid's process started after the holder's last heartbeat: the pid was reused
        assert holder_gone(this_host(), proc.pid, heartbeat_at=now - 100)
        assert not holder_gone("another-host", proc.pid, heartbeat_at=now - 100)  # not ours to judge
    finally:
        proc.kill()
        proc.wait()
    assert holder_gone(this_host(), proc.pid, heartbeat_at=_time.time())           # no such process
    assert not holder_gone("another-host", proc.pid, heartbeat_at=_time.time())


def test_a_holder_whose_bus_socket_still_answers_is_alive_whatever_its_pid():
    """A container sharing this host's name and network but not its pids: the pid looks gone, the
    holder's socket still listens, so its lease is not taken over."""
    import socket
    import subprocess
    import time as _time

    from store.holders import holder_gone, this_host

    dead = subprocess.Popen(["true"])
    dead.wait()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        endpoint = f"tcp://127.0.0.1:{listening.getsockname()[1]}"
        assert not holder_gone(this_host(), dead.pid, heartbeat_at=_time.time(), endpoint=endpoint)
    assert holder_gone(this_host(), dead.pid, heartbeat_at=_time.time(), endpoint=endpoint)  # closed now
