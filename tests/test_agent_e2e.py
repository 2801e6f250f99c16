"""One real agent on a real task against a real store: publishes, is killed -9, is refused a second
lease while the first is fresh, then resumes from the store and finishes its cycles.

Everything is judged on the store (agent state counters, trials, models, events), never on what the
agent prints: the output is for people and may change.
"""
from __future__ import annotations

import os
import signal
import time

from helpers.swarm import check_progress, make_store, read, start, wait_for

from agents.agent import agent_id_for
from agents.config import resolve_preset

TASK = "uci_digits"
AID = agent_id_for(TASK)


def _number(model_id: str) -> int:
    """n of a model or trial id ``"{agent}:m{n}"``."""
    return int(model_id.rpartition(":m")[2])


def test_agent_publishes_survives_kill9_and_resumes(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    # enough cycles that the resumed agent still runs when the third one starts (a cycle of the test
    # preset is two children: seconds)
    cycles, gens = 8, resolve_preset("test").budget.children_per_cycle
    args = ["--store", store, "--task", TASK, "--preset", "test", "--cycles", str(cycles),
            "--lease-ttl", "30", "--threads", "1"]  # 30 s: a loaded machine starts the refused agent in time
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
    killed_at = time.time()
    state_before = read(store, lambda s: s.get_agent_state(AID))
    assert read(store, lambda s: s.verify()) == []
    published = read(store, lambda s: s.get_task(TASK))
    assert published is not None
    # what the store holds of the dead agent is exactly what its state says it did: no trial
    # beyond its counters (nothing half-committed), none missing before them
    trials_before = {t.id: t for t in read(store, lambda s: s.trials(agent=AID))}
    check_progress([(t.cycle, t.generation) for t in trials_before.values()], state_before, gens)
    assert all(_number(t) < state_before.next_model_id for t in trials_before)
    models_before = {m.id: m for m in read(store, lambda s: s.models(agent=AID))}
    assert state_before.best_model_id in models_before
    assert set(state_before.population) <= set(models_before)

    # the dead agent's lease is still fresh by the store's clock, but its holder is gone from this
    # host: a second agent takes it over at once (not after the 30 s TTL) and resumes where the
    # store says; while it runs, a third is refused with exit 2 and one line, and writes nothing
    assert [a.pid for a in read(store, lambda s: s.live_agents())] == [first.pid]
    second = start("attach.py", *args, log=str(tmp_path / "second.log"))
    wait_for(lambda: [a.pid for a in read(store, lambda s: s.live_agents())] == [second.pid], 25,
             "the second agent holding the lease, well before the dead one's TTL ran out")
    assert "is gone: taking the lease over" in open(tmp_path / "second.log").read()
    refused = start("attach.py", *args, log=str(tmp_path / "refused.log"))
    assert refused.wait(60) == 2
    err = open(tmp_path / "refused.log").read().strip().splitlines()
    assert len(err) == 1 and "lease" in err[0].lower(), err
    assert second.wait(240) == 0, open(tmp_path / "second.log").read()[-3000:]
    st = read(store, lambda s: s.get_agent_state(AID))
    assert st.cycle == cycles and st.generation == 0
    assert read(store, lambda s: s.verify()) == []
    trials = read(store, lambda s: s.trials(agent=AID))
    seen = sorted((t.cycle, t.generation) for t in trials)
    check_progress(seen, st, gens)  # no gap, no repeat, every cycle done
    # the resumed agent started at the generation the store recorded, not from scratch: the dead
    # agent's trials and models are untouched, and everything new continues its counters
    assert {t.id: t for t in trials if t.id in trials_before} == trials_before
    new = sorted((t for t in trials if t.id not in trials_before), key=lambda t: (t.cycle, t.generation))
    done_before = {(t.cycle, t.generation) for t in trials_before.values()}
    assert [(t.cycle, t.generation) for t in new] == [p for p in seen if p not in done_before]
    assert all(t.created_at > killed_at for t in new)
    numbers = [_number(t.id) for t in new]  # the model counter continues from the stored one
    assert numbers == sorted(set(numbers)) and numbers[0] >= state_before.next_model_id
    models_after = {m.id: m for m in read(store, lambda s: s.models(agent=AID))}
    assert all(models_after[m] == models_before[m] for m in models_before)
    assert all(_number(m) >= state_before.next_model_id for m in set(models_after) - set(models_before))
    components = read(store, lambda s: {c for m in models_after.values() for c in m.components
                                        if s.get_component(c).agent == AID})
    assert max(int(c.rpartition(":")[2]) for c in components) < st.next_component_id
    final = read(store, lambda s: s.get_model(s.get_task(TASK).model_id))
    assert final.metrics["test_quality"] > 0.5  # 10 classes: chance is 0.1
    events = read(store, lambda s: s.events())
    cycle_ends = [e.data.get("cycle") for e in events if e.kind == "cycle_end"]
    assert cycle_ends == list(range(1, cycles + 1))  # each cycle ended once, in order
    assert "published" in [e.kind for e in events]
    assert read(store, lambda s: s.get_agent(AID)).state == "finished"


def test_an_agent_whose_lease_was_taken_over_stops_without_writing(tmp_path):
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
            taken = st.get_agent(AID)
            at_takeover = (st.trials(agent=AID), st.models(agent=AID), st.get_agent_state(AID),
                           st.last_event_seq())
        assert agent.wait(120) == 3  # superseded: a supervisor must not restart it
    finally:
        if agent.poll() is None:
            agent.kill()
    log = open(tmp_path / "a.log").read()
    assert "Traceback" not in log, log[-2000:]  # a clean stop, not a crash
    # the store refused everything the old holder tried after the takeover: no trial, model,
    # state or event of its own, and it did not release or overwrite the new holder's lease
    assert read(store, lambda s: (s.trials(agent=AID), s.models(agent=AID), s.get_agent_state(AID),
                                  s.last_event_seq())) == at_takeover
    record = read(store, lambda s: s.get_agent(AID))
    assert record.host == "elsewhere" and record.lease_token == taken.lease_token
    assert record.lease_expiry == taken.lease_expiry and record.state == taken.state
    assert read(store, lambda s: s.verify()) == []
