"""The launcher is only a launcher: killing it leaves the agents working; Ctrl-C stops them cleanly
and the same command resumes; bad input is one line and exit 2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers import REPO
from helpers.swarm import ENV, check_progress, read, run_cli, wait_for

from agents.agent import agent_id_for
from agents.config import resolve_preset

TASKS = ["uci_digits", "glyphs_greek"]


def _launch(store: str, log: str, cycles: int, new_session: bool = False, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "launch", "run_swarm.py"), "--store", store, "--tasks",
         ",".join(TASKS), "--preset", "test", "--cycles", str(cycles), *extra],
        cwd=REPO, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=new_session)


def _running(store: str) -> bool:
    live = read(store, lambda s: {a.agent_id for a in s.live_agents()})
    return all(agent_id_for(t) in live for t in TASKS) and bool(read(store, lambda s: s.tasks()))


def test_agents_finish_and_publish_after_the_launcher_is_killed(tmp_path):
    store = str(tmp_path / "store")
    launcher = _launch(store, str(tmp_path / "l.log"), cycles=3)
    try:
        wait_for(lambda: os.path.exists(store) and _running(store), 120, "agents running")
        launcher.kill()  # SIGKILL: no clean-up in the launcher at all
        launcher.wait()
        done = lambda: all(  # noqa: E731
            (rec := read(store, lambda s: s.get_agent(agent_id_for(t)))) and rec.state == "finished"
            for t in TASKS)
        wait_for(done, 240, "orphaned agents to finish their cycles")
    finally:
        if launcher.poll() is None:
            launcher.kill()
    for t in TASKS:
        assert read(store, lambda s: s.get_agent_state(agent_id_for(t))).cycle == 3
        assert read(store, lambda s: s.get_task(t)) is not None
    assert read(store, lambda s: s.verify()) == []


def _early(store: str) -> bool:
    states = [read(store, lambda s: s.get_agent_state(agent_id_for(t))) for t in TASKS]
    return all(st is not None and (st.cycle, st.generation) >= (0, 1) and st.cycle <= 1 for st in states)


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path):
    store = str(tmp_path / "store")
    launcher = _launch(store, str(tmp_path / "1.log"), cycles=3, new_session=True)
    try:
        # interrupt mid-run: every agent has trained a child and none is past its second cycle (of
        # 3), so the swarm cannot finish before the signal lands
        wait_for(lambda: os.path.exists(store) and _running(store) and _early(store), 120,
                 "agents training in their first cycle")
        os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground group
        assert launcher.wait(120) == 130
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert read(store, lambda s: s.live_agents()) == []  # leases released, not left to expire
    states = {t: read(store, lambda s: s.get_agent(agent_id_for(t))).state for t in TASKS}
    assert set(states.values()) <= {"stopped", "finished"}, states
    before = {t: read(store, lambda s: s.get_agent_state(agent_id_for(t))) for t in TASKS}
    assert any(st is not None and (st.cycle, st.generation) != (3, 0) for st in before.values())
    assert read(store, lambda s: s.verify()) == []
    again = _launch(store, str(tmp_path / "2.log"), cycles=3)
    assert again.wait(240) == 0, open(tmp_path / "2.log").read()[-2000:]
    gens = resolve_preset("test").budget.children_per_cycle
    for t in TASKS:
        after = read(store, lambda s: s.get_agent_state(agent_id_for(t)))
        assert after.cycle == 3
        trials = read(store, lambda s: s.trials(agent=agent_id_for(t)))
        pairs = [(x.cycle, x.generation) for x in trials]
        # resumed, nothing redone, nothing skipped: every cycle 0..n-1, n >= 2 (+hurdle may add)
        assert len(pairs) == len(set(pairs))
        check_progress(pairs, after, gens)
    assert read(store, lambda s: s.verify()) == []


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = [
        ["launch/run_swarm.py", "--store", str(tmp_path / "s"), "--tasks", "no_such_task"],
        ["launch/run_swarm.py", "--store", str(tmp_path / "s"), "--preset", "huge"],
        ["launch/run_swarm.py", "--store", str(tmp_path / "s"), "--preset", "demo+turbo"],
        ["launch/run_swarm.py", "--store", str(tmp_path / "s"), "--devices", "gpu0"],
        ["launch/run_swarm.py", "--store", str(tmp_path / "s"), "--devices", "cuda:7"],
        ["launch/run_swarm.py", "--store", str(tmp_path / "s"), "--tasks", "npz:/nonexistent.npz"],
        ["launch/attach.py", "--store", str(tmp_path / "nothing"), "--task", "uci_digits"],
        ["launch/query.py", "--store", str(tmp_path / "nothing"), "leaderboard"],
    ]
    for args in cases:
        r = run_cli(*args, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert not os.path.exists(tmp_path / "nothing")  # a bad command creates nothing


def test_root_imported_from_a_local_timm_checkpoint(tmp_path):
    import timm
    import torch

    from agents.view import from_raw

    ckpt = str(tmp_path / "vit_tiny.pth")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5)
    torch.save(ref.state_dict(), ckpt)
    store = str(tmp_path / "store")
    r = run_cli("launch/run_swarm.py", "--store", store, "--tasks", "uci_digits", "--preset", "test",
                "--cycles", "1", "--root", ckpt, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    root = read(store, lambda s: s.get_model(s.root_model_id()))
    assert root.metrics["source"] == "timm-checkpoint" and root.metrics["depth"] == 3
    names = read(store, lambda s: {s.get_component(c).name: c for c in root.components})
    assert "encoderblock_3" not in names  # only the first `depth` blocks are kept
    params, _ = read(store, lambda s: s.load_component_tensors(names["encoderblock_2"]))
    want = ref.state_dict()["blocks.2.mlp.fc1.weight"]
    assert torch.equal(from_raw(params["mlp.fc1.weight"], torch.device("cpu")), want)
    emb, _ = read(store, lambda s: s.load_component_tensors(names["embedding"]))
    assert torch.equal(from_raw(emb["weight"], torch.device("cpu")), ref.state_dict()["patch_embed.proj.weight"])
    assert read(store, lambda s: s.get_task("uci_digits")) is not None
    bad = run_cli("launch/run_swarm.py", "--store", str(tmp_path / "s2"), "--tasks", "uci_digits",
                  "--root", str(tmp_path / "missing.pth"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    bad = run_cli("launch/run_swarm.py", "--store", str(tmp_path / "s3"), "--tasks", "uci_digits",
                  "--root", str(tmp_path / "garbage.pth"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not os.path.exists(tmp_path / "s3")  # nothing created for a bad request


@pytest.mark.slow
def test_gc_with_no_grace_while_agents_run(tmp_path):
    """gc deletes everything no live model needs while agents keep committing: nothing breaks."""
    store = str(tmp_path / "store")
    launcher = _launch(store, str(tmp_path / "l.log"), cycles=4)
    runs = 0
    try:
        wait_for(lambda: os.path.exists(store) and _running(store), 120, "agents running")
        while launcher.poll() is None:
            r = run_cli("launch/query.py", "--store", store, "gc", "--grace", "0", timeout=60)
            assert r.returncode == 0, r.stderr
            runs += 1
        assert launcher.wait() == 0, open(tmp_path / "l.log").read()[-2000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert runs >= 3
    assert read(store, lambda s: s.verify()) == []
    for t in TASKS:
        assert read(store, lambda s: s.get_agent_state(agent_id_for(t))).cycle == 4
        assert read(store, lambda s: s.load_model_tensors(s.get_task(t).model_id))


def test_a_rerun_right_after_a_kill_9_of_everything_resumes_without_waiting_for_the_leases(tmp_path):
    """kill -9 of the launcher and every agent leaves live leases (TTL 60 s here); the same command
    run at once sees their holders gone from this host and takes them over within seconds."""
    import time

    store = str(tmp_path / "store")
    first = _launch(store, str(tmp_path / "1.log"), 12, True, "--lease-ttl", "60")
    try:
        wait_for(lambda: os.path.exists(store) and _running(store) and _early(store), 120,
                 "agents training in their first cycle")
        old = read(store, lambda s: {a.agent_id: a.pid for a in s.live_agents()})
        os.killpg(first.pid, signal.SIGKILL)  # the launcher and its agents (one process group)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert set(read(store, lambda s: {a.agent_id for a in s.live_agents()})) == set(old)  # still "live"
    started = time.monotonic()
    again = _launch(store, str(tmp_path / "2.log"), 12, True, "--lease-ttl", "60")
    try:
        def taken_over() -> bool:
            live = read(store, lambda s: {a.agent_id: a.pid for a in s.live_agents()})
            return set(live) == set(old) and all(live[a] != old[a] for a in old)

        wait_for(taken_over, 40, "the new agents holding the leases")
        assert time.monotonic() - started < 40  # not the 60 s the killed leases had left
        os.killpg(again.pid, signal.SIGINT)
        assert again.wait(120) == 130
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
    log = open(tmp_path / "2.log").read()
    assert "already has a live" not in log and log.count("is gone") >= len(TASKS), log[-3000:]
    assert read(store, lambda s: s.verify()) == []


def test_attach_right_after_a_kill_9_takes_the_dead_agents_lease_over(tmp_path):
    from helpers.swarm import make_store

    store = str(tmp_path / "store")
    make_store(store)
    aid = agent_id_for("uci_digits")

    def attach(log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "attach.py"), "--store", store,
                                 "--task", "uci_digits", "--preset", "test", "--cycles", "12",
                                 "--lease-ttl", "60"], cwd=REPO, env=ENV, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    first = attach(str(tmp_path / "1.log"))
    try:
        wait_for(lambda: any(a.agent_id == aid for a in read(store, lambda s: s.live_agents())), 120, "the agent")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    again = attach(str(tmp_path / "2.log"))
    try:
        wait_for(lambda: any(a.agent_id == aid and a.pid == again.pid
                             for a in read(store, lambda s: s.live_agents())), 40, "the lease taken over")
        os.killpg(again.pid, signal.SIGINT)
        again.wait(120)
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
    assert "is gone: taking the lease over" in open(tmp_path / "2.log").read()


def test_release_ends_a_dead_holders_lease_and_refuses_a_live_one(tmp_path):
    from helpers.swarm import make_store

    from store import Store
    from store.holders import this_host

    store = str(tmp_path / "store")
    make_store(store)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with Store.open(store) as st:  # a lease held by a live process of this host
            st.acquire_lease(agent_id_for("uci_digits"), "uci_digits", ttl=3600, host=this_host(),
                             pid=sleeper.pid, device="cpu", endpoint="", preset="test")
        r = run_cli("launch/query.py", "--store", store, "release", "uci_digits")
        assert r.returncode == 2 and "still running" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        r = run_cli("launch/query.py", "--store", store, "release", "nope")
        assert r.returncode == 2 and "no single agent" in r.stderr, r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    r = run_cli("launch/query.py", "--store", store, "release", "uci_digits")  # its holder is gone now
    assert r.returncode == 0 and "released the lease" in r.stdout, r.stderr
    assert read(store, lambda s: s.live_agents()) == []
    r = run_cli("launch/query.py", "--store", store, "release", "uci_digits")
    assert r.returncode == 0 and "nothing to release" in r.stdout
    with Store.open(store) as st:  # a holder on another host: refused unless --force
        st.acquire_lease(agent_id_for("uci_digits"), "uci_digits", ttl=3600, host="elsewhere", pid=1,
                         device="cpu", endpoint="", preset="test")
    r = run_cli("launch/query.py", "--store", store, "release", "uci_digits")
    assert r.returncode == 2 and "--force" in r.stderr, r.stderr
    r = run_cli("launch/query.py", "--store", store, "release", "uci_digits", "--force")
    assert r.returncode == 0 and read(store, lambda s: s.live_agents()) == []


@pytest.mark.parametrize("ttl", ["inf", "nan", "0", "-5", "0.5", "1e9"])
def test_a_lease_ttl_outside_1_to_3600_s_is_refused_everywhere(tmp_path, ttl):
    for script, flag in (("launch/attach.py", "--task"), ("launch/run_swarm.py", "--tasks")):
        r = run_cli(script, "--store", str(tmp_path / "s"), flag, "uci_digits", "--preset", "test",
                    "--lease-ttl", ttl)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "1 to 3600" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "s")
    from store import Store, StoreError

    with Store.open(str(tmp_path / "direct"), create=True) as st:  # the store itself, and so its service
        with pytest.raises(StoreError, match="1 to 3600"):
            st.acquire_lease("a", "t", ttl=float(ttl), host="h", pid=1, device="cpu", endpoint="", preset="p")


def test_the_store_service_enforces_the_lease_bound_on_the_wire(tmp_path):
    from helpers.service_procs import start_service

    from store import StoreError, open_store

    service = start_service(str(tmp_path / "store"))
    try:
        with open_store(service.endpoint) as st:
            for ttl in (float("inf"), float("nan"), 0.0, -5.0, 3601.0):
                with pytest.raises(StoreError, match="1 to 3600"):
                    st.acquire_lease("a", "t", ttl=ttl, host="h", pid=1, device="cpu", endpoint="", preset="p")
            token = st.acquire_lease("a", "t", ttl=30.0, host="h", pid=1, device="cpu", endpoint="", preset="p")
            with pytest.raises(StoreError, match="1 to 3600"):
                st.heartbeat("a", token, ttl=float("inf"))
            st.heartbeat("a", token, ttl=10.0)
    finally:
        service.stop()


def test_a_finished_store_says_there_is_nothing_to_do_and_shows_the_leaderboard(tmp_path):
    store = str(tmp_path / "store")
    cmd = ("launch/run_swarm.py", "--store", store, "--tasks", "uci_digits", "--preset", "test",
           "--cycles", "1", "--root", "random")
    first = run_cli(*cmd, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    # +hurdle makes a cycle an image budget: the live line shows images over that budget, not gen=3/2
    assert "k/2.0k img" in first.stdout, first.stdout[-2000:]
    trials = read(store, lambda s: len(s.trials()))
    again = run_cli(*cmd, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stdout and "agent~uci_digits:m" in again.stdout  # the leaderboard
    assert "swarm: 1 agents" not in again.stdout  # no agent was started
    assert read(store, lambda s: len(s.trials())) == trials
    more = run_cli(*cmd[:-4], "--cycles", "2", "--root", "random", timeout=240)  # raising --cycles grows it
    assert more.returncode == 0 and read(store, lambda s: len(s.trials())) > trials
    rows = run_cli("launch/query.py", "--store", store, "trials", "uci_digits")
    first_row = rows.stdout.splitlines()[2].split()
    assert first_row[1:3] == ["1", "1"]  # counted from 1, as the agents' logs count
