"""One real agent on a real task against a real store: publishes, is killed -9, is refused a second
lease while the first is fresh, then resumes from the store and finishes its cycles."""
from __future__ import annotations

import os
import signal

from helpers.swarm import make_store, read, start, wait_for

from agents.agent import agent_id_for

TASK = "uci_digits"
AID = agent_id_for(TASK)


def test_agent_publishes_survives_kill9_and_resumes(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    args = ["--store", store, "--task", TASK, "--preset", "test", "--cycles", "3",
            "--lease-ttl", "10", "--threads", "1"]
    first = start("attach.py", *args, log=str(tmp_path / "first.log"))
    try:
        # wait until the agent committed at least one generation after its first publish
        wait_for(lambda: read(store, lambda s: (st := s.get_agent_state(AID)) and
                              (st.cycle * 10 + st.generation) >= 3 and s.get_task(TASK)),
                 120, "the first agent to publish and commit a few generations")
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    state_before = read(store, lambda s: s.get_agent_state(AID))
    assert read(store, lambda s: s.verify()) == []
    published = read(store, lambda s: s.get_task(TASK))
    assert published is not None

    # the dead agent's lease is still fresh: a second agent is refused with exit 2 and one line
    refused = start("attach.py", *args, log=str(tmp_path / "refused.log"))
    assert refused.wait(60) == 2
    err = open(tmp_path / "refused.log").read().strip().splitlines()
    assert len(err) == 1 and "lease" in err[0].lower(), err

    # after the lease expires, a new agent takes over and resumes where the store says
    wait_for(lambda: not read(store, lambda s: [a for a in s.live_agents() if a.agent_id == AID]),
             30, "the killed agent's lease to expire")
    second = start("attach.py", *args, log=str(tmp_path / "second.log"))
    assert second.wait(240) == 0, open(tmp_path / "second.log").read()[-3000:]
    log = open(tmp_path / "second.log").read()
    st = read(store, lambda s: s.get_agent_state(AID))
    assert st.cycle == 3 and st.generation == 0
    assert read(store, lambda s: s.verify()) == []
    trials = read(store, lambda s: s.trials(agent=AID))
    seen = sorted((t.cycle, t.generation) for t in trials)
    gens = 2  # children per cycle in the test preset
    assert seen == [(c, g) for c in range(3) for g in range(gens)], seen  # no gap, no repeat
    # the resumed agent started at the generation the store recorded, not from scratch
    resumed = next(line for line in log.splitlines() if line.startswith(f"[{TASK}] cycle"))
    assert (f"cycle {state_before.cycle + 1}/3 from generation {state_before.generation + 1} "
            in resumed), resumed
    first_child = next(line for line in log.splitlines() if " gen " in line)
    assert f"cycle {state_before.cycle + 1}/3 gen {state_before.generation + 1}/" in first_child
    final = read(store, lambda s: s.get_model(s.get_task(TASK).model_id))
    assert final.metrics["test_quality"] > 0.5  # 10 classes: chance is 0.1
    kinds = [e.kind for e in read(store, lambda s: s.events())]
    assert kinds.count("cycle_end") == 3 and "published" in kinds
    assert read(store, lambda s: s.get_agent(AID)).state == "finished"


def test_an_agent_whose_lease_was_taken_over_stops_without_writing(tmp_path):
    import time

    from store import Store

    store = str(tmp_path / "store")
    make_store(store)
    agent = start("attach.py", "--store", store, "--task", TASK, "--preset", "test", "--cycles", "50",
                  "--threads", "1", log=str(tmp_path / "a.log"))
    try:
        wait_for(lambda: read(store, lambda s: s.get_task(TASK)), 120, "a first publish")
        with Store.open(store) as st:  # a new holder whose clock says the old lease ran out
            st.acquire_lease(AID, TASK, ttl=3600, host="elsewhere", pid=1, device="cpu",
                             endpoint="", preset="test", now=time.time() + 1000)
            trials_at_takeover = len(st.trials(agent=AID))
        assert agent.wait(120) == 1
    finally:
        if agent.poll() is None:
            agent.kill()
    log = open(tmp_path / "a.log").read()
    assert "stopping:" in log and "Traceback" not in log, log[-2000:]
    assert len(read(store, lambda s: s.trials(agent=AID))) == trials_at_takeover
    assert read(store, lambda s: s.get_agent(AID)).host == "elsewhere"
    assert read(store, lambda s: s.verify()) == []
