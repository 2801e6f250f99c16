"""Swarms run by cluster engines, for real on this host (slow suite; `make test-slow` installs the
extras): a local Ray cluster (fake GPUs, a second node, a node killed without warning) and submitit's
local executor (real job processes, a real timeout that requeues a job).

Ray is started and stopped by handle (``benchmarks.cluster.ray_cluster``), never with ``ray stop``,
which would end every Ray process of the host.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from helpers.service_procs import start_service
from helpers.swarm import make_store, read, wait_for

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
submitit = pytest.importorskip("submitit")

from agents.agent import agent_id_for  # noqa: E402
from benchmarks.cluster import NODE_ARGS, node_loss, ray_cluster, start_launcher  # noqa: E402

TASKS = ["uci_digits", "glyphs_greek", "mnist5k"]


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cycle_ends(store: str, aid: str) -> list[int]:
    return [e.data.get("cycle") for e in read(store, lambda s: s.events())
            if e.kind == "cycle_end" and e.agent == aid]


@pytest.fixture(scope="module")
def gpu_cluster():
    """One head (no CPUs: agents never land there) and a node with 2 cores and 3 fake GPUs."""
    with ray_cluster(head_cpus=0) as cluster:
        cluster.add_node(num_cpus=2, num_gpus=3, **NODE_ARGS)
        yield cluster


def test_ray_swarm_through_a_keyed_service_one_gpu_each_survives_kill9(tmp_path, gpu_cluster):
    store, keys = str(tmp_path / "store"), str(tmp_path / "keys")
    make_store(store)
    svc = start_service(store, keys=keys)
    cycles = 3
    out = str(tmp_path / "launcher.log")
    proc = start_launcher(svc.endpoint, TASKS, "--keys", keys, "--launcher", "ray",
                          "--ray-address", gpu_cluster.address, "--preset", "test",
                          "--cycles", str(cycles), "--gpus-per-agent", "1", "--cpus-per-agent", "0.5",
                          "--lease-ttl", "5", "--logs", str(tmp_path / "logs"), log_path=out)
    victim = agent_id_for(TASKS[0])
    try:
        first = wait_for(lambda: read(store, lambda s: (a := s.get_agent(victim)) and
                                      a.state == "running" and s.trials(agent=victim) and a),
                         240, "the first agent to train a child")
        # Ray starts workers at nice 15; the agent's process runs at normal priority (root here)
        with open(f"/proc/{first.pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[16]) == 0
        os.kill(first.pid, signal.SIGKILL)  # the actor's process: Ray restarts it, the agent resumes
        code = _finish(proc, 600)
    finally:
        svc.stop()
    text = open(out).read()
    assert code == 0, text[-3000:]
    placed = re.findall(r"single agent for (\S+): node (\S+) pid \d+ gpu (\S+)", text)
    assert sorted(t for t, _, _ in placed) == sorted(TASKS)
    assert sorted(g for _, _, g in placed) == ["0", "1", "2"], placed  # each its own GPU
    after = read(store, lambda s: s.get_agent(victim))
    assert after.pid != first.pid and after.state == "finished"
    assert "restarted by Ray" in open(tmp_path / "logs" / f"{victim}.log").read()
    for task in TASKS:
        aid = agent_id_for(task)
        assert read(store, lambda s: s.get_agent_state(aid)).cycle == cycles
        assert _cycle_ends(store, aid) == list(range(1, cycles + 1))  # no cycle lost or repeated
        assert read(store, lambda s: s.get_agent(aid)).endpoint.split(":")[1].lstrip("/") != "0.0.0.0"
    assert read(store, lambda s: s.verify()) == []


def test_a_user_error_under_ray_is_final_not_retried(tmp_path, gpu_cluster):
    store = str(tmp_path / "store")
    make_store(store)
    out = str(tmp_path / "launcher.log")
    proc = start_launcher(store, ["no_such_task"], "--launcher", "ray", "--ray-address",
                          gpu_cluster.address, "--preset", "test", "--cycles", "1",
                          "--logs", str(tmp_path / "logs"), log_path=out)
    assert _finish(proc, 240) == 2
    text = open(out).read()
    assert "exited with code 2" in text and "restarted" not in text
    log = open(tmp_path / "logs" / f"{agent_id_for('no_such_task')}.log").read()
    assert log.count("error: unknown task") == 1 and "Traceback" not in log, log[-2000:]


def test_ray_node_loss_the_agent_trains_again_on_another_node(tmp_path):
    result = node_loss(tmp_path, lease_ttl=5.0, cycles=4, preset="test")
    assert result["finished"] and result["verify_problems"] == []
    before, after = result["moved"]["before"], result["moved"]["after"]
    assert before["pid"] != after["pid"] and before["endpoint"] != after["endpoint"]
    # the speed of it (against 2 x TTL + start-up) is measured by benchmarks/cluster.py


def _submitit_swarm(tmp_path, *extra: str, cycles: int) -> tuple[int, str, str]:
    store = str(tmp_path / "store")
    make_store(store)
    out = str(tmp_path / "launcher.log")
    proc = start_launcher(store, TASKS[:2], "--launcher", "slurm", "--slurm-executor", "local",
                          "--preset", "test", "--cycles", str(cycles), "--lease-ttl", "5",
                          "--logs", str(tmp_path / "logs"), *extra, log_path=out)
    return _finish(proc, 900), open(out).read(), store


def test_submitit_runs_two_agents_as_jobs(tmp_path):
    code, text, store = _submitit_swarm(tmp_path, cycles=2)
    assert code == 0, text[-3000:]
    assert len(re.findall(r"single agent for \S+: job \d+", text)) == 2
    for task in TASKS[:2]:
        assert read(store, lambda s: s.get_agent_state(agent_id_for(task))).cycle == 2
    assert read(store, lambda s: s.verify()) == []


def test_submitit_timeout_requeues_the_agents_and_they_resume(tmp_path):
    # a 1-minute limit with the warning 45 s before it: each job is signalled after about 15 s,
    # requeued by submitit, and its agent resumes from the store until its cycles are done
    cycles = 12
    code, text, store = _submitit_swarm(tmp_path, "--slurm-time", "1", "--slurm-signal-delay", "45",
                                        cycles=cycles)
    assert code == 0, text[-3000:]
    requeued = 0
    for task in TASKS[:2]:
        aid = agent_id_for(task)
        log = open(tmp_path / "logs" / f"{aid}.log").read()
        requeued += "Requeued" in log or "requeue" in log.lower()
        assert read(store, lambda s: s.get_agent_state(aid)).cycle == cycles
        assert _cycle_ends(store, aid) == list(range(1, cycles + 1))
    assert requeued >= 1, "no job was requeued: the swarm ended before the time limit"
    assert read(store, lambda s: s.verify()) == []
