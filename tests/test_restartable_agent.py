"""What any supervisor (Ray, Slurm, a shell loop) needs of an agent it may restart, on real stores and
real processes: ``auto`` placement, the lease wait, the exit-code contract, signals, flags.

Exit codes (launch/common.py): 0 finished, 2 user error, 3 superseded: never restarted; 1 crash,
75 store unavailable, 143 SIGTERM before the end: restarted.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from helpers.swarm import make_store, read, run_cli, start, wait_for

from agents.agent import Agent, AgentOptions, agent_id_for
from agents.placement import local_address_toward, resolve_bind_host, resolve_device
from store import LeaseHeld, Store

TASK = "uci_digits"
AID = agent_id_for(TASK)


def test_auto_device_is_the_cpu_without_a_gpu_and_explicit_devices_pass_through():
    import torch

    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:3") == "cuda:3" and resolve_device("cpu") == "cpu"


def test_auto_bind_host_is_the_address_that_routes_to_the_store(monkeypatch):
    monkeypatch.delenv("MUNET_BIND_HOST", raising=False)
    assert resolve_bind_host("auto", "tcp://127.0.0.1:5710") == "127.0.0.1"
    assert resolve_bind_host("auto", "/some/store/dir") == "127.0.0.1"  # a directory: this host
    assert resolve_bind_host("10.1.2.3", "tcp://127.0.0.1:5710") == "10.1.2.3"
    other = local_address_toward("192.0.2.1")  # a documentation address: only the route is looked up
    assert other and other != "0.0.0.0"
    monkeypatch.setenv("MUNET_BIND_HOST", "127.0.0.5")
    assert resolve_bind_host("auto", "tcp://127.0.0.1:5710") == "127.0.0.5"


def _hold_lease(store: str, ttl: float, heartbeat: threading.Event | None = None):
    """Another holder of the task's lease (a process that died, or a live duplicate if it beats)."""
    st = Store.open(store)
    token = st.acquire_lease(AID, TASK, ttl=ttl, host="elsewhere", pid=999999, device="cpu",
                             endpoint="", preset="test")

    def beat():
        while not heartbeat.wait(0.3):
            st.heartbeat(AID, token, ttl=ttl)

    if heartbeat is not None:
        threading.Thread(target=beat, daemon=True).start()
    return st


def test_a_restarted_agent_waits_out_a_dead_holders_lease_then_resumes(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    _hold_lease(store, ttl=3.0).close()  # the holder died: it will never heartbeat again
    agent = Agent(AgentOptions(store=store, task=TASK, preset="test", cycles=1, threads=1,
                               wait_lease=20.0))
    t0 = time.monotonic()
    agent.run()
    assert agent.outcome == "finished" and time.monotonic() - t0 >= 2.0  # it did wait
    rec = read(store, lambda s: s.get_agent(AID))
    assert rec.pid == os.getpid() and rec.state == "finished"


def test_the_lease_wait_still_refuses_a_holder_that_keeps_heartbeating(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    beating = threading.Event()
    st = _hold_lease(store, ttl=2.0, heartbeat=beating)
    try:
        agent = Agent(AgentOptions(store=store, task=TASK, preset="test", cycles=1, threads=1,
                                   wait_lease=4.0))
        with pytest.raises(LeaseHeld):
            agent.run()
        assert read(store, lambda s: s.get_agent(AID)).pid == 999999  # the live holder kept it
    finally:
        beating.set()
        st.close()


def test_sigterm_before_the_end_exits_143_with_the_lease_released(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    agent = start("attach.py", "--store", store, "--task", TASK, "--preset", "test", "--cycles", "50",
                  "--threads", "1", log=str(tmp_path / "a.log"))
    try:
        wait_for(lambda: read(store, lambda s: (st := s.get_agent_state(AID)) and st.generation >= 1),
                 120, "a first committed generation")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(120) == 143  # preempted, not finished: a supervisor restarts it
    finally:
        if agent.poll() is None:
            agent.kill()
    assert read(store, lambda s: s.get_agent(AID)).state == "stopped"
    assert read(store, lambda s: s.live_agents()) == []  # released: the restart need not wait
    assert "Traceback" not in open(tmp_path / "a.log").read()


def test_attach_resumes_with_auto_placement_and_a_lease_wait(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    _hold_lease(store, ttl=2.0).close()
    r = run_cli("launch/attach.py", "--store", store, "--task", TASK, "--preset", "test",
                "--cycles", "1", "--threads", "1", "--device", "auto", "--bind-host", "auto",
                "--wait-lease", "30", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = read(store, lambda s: s.get_agent(AID))
    assert rec.device == "cpu" and rec.endpoint.startswith("tcp://127.0.0.1:") and rec.state == "finished"


@pytest.mark.parametrize("args, says", [
    (["--launcher", "ray", "--devices", "cuda:0"], "--gpus-per-agent"),
    (["--launcher", "slurm", "--gpus-per-agent", "0.5"], "whole"),
    (["--launcher", "ray", "--cpus-per-agent", "0"], "--cpus-per-agent"),
    (["--lease-ttl", "0"], "--lease-ttl"),
])
def test_cluster_launcher_flag_errors_are_one_line_exit_2(tmp_path, args, says):
    r = run_cli("launch/run_swarm.py", "--store", str(tmp_path / "s"), "--tasks", TASK,
                "--preset", "test", *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "s")  # nothing was created


def test_attach_refuses_a_negative_lease_wait(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    r = run_cli("launch/attach.py", "--store", store, "--task", TASK, "--wait-lease", "-1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_the_store_can_come_from_the_environment(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    r = run_cli("launch/attach.py", "--task", TASK, "--preset", "test", "--cycles", "0",
                env={"MUNET_STORE": store})
    assert r.returncode == 0, r.stderr  # 0 cycles to run, but it found the store and took the lease
    assert read(store, lambda s: s.get_agent(AID)).state == "finished"
