"""The agent driven in this process, one generation at a time, against a real LMDB store.

What the subprocess tests cannot see: each step's typed values, the exact store state after one
generation, and that a fresh Agent on the same store continues from it (resume read from the store,
not from a log).
"""
from __future__ import annotations

import math

import pytest

from agents import generation as step
from agents.agent import Agent, AgentOptions, agent_id_for, generation_rng
from helpers.agents import open_agent
from store import Store, StoreAPI

TASK = "uci_digits"
AID = agent_id_for(TASK)


def _agent(store: Store, seed: int = 0) -> Agent:
    return open_agent(store, TASK, "test", seed)


@pytest.fixture()
def store(tmp_path):
    st = Store.open(str(tmp_path / "store"), create=True)
    yield st
    st.close()


def test_the_local_store_satisfies_the_store_protocol(store):
    assert isinstance(store, StoreAPI)


def test_one_generation_writes_one_trial_and_advances_the_counters(store):
    agent = _agent(store)
    try:
        assert agent.state.generation == 0 and agent.state.next_model_id == 0
        verdict = agent.run_generation()
        assert isinstance(verdict, step.Verdict)
        # the first child of an empty population descends from the root and is always accepted
        assert verdict.accepted and verdict.kept is not None and verdict.published is verdict.kept
        trials = store.trials(agent=AID)
        assert [t.id for t in trials] == [f"{AID}:m0"] and trials[0].accepted
        assert trials[0].parent == store.root_model_id()
        state = store.get_agent_state(AID)
        assert (state.cycle, state.generation, state.next_model_id) == (0, 1, 1)
        assert state.next_component_id == verdict.counters.next_component_id > 0
        assert state.population == [verdict.kept.id]
        task = store.get_task(TASK)
        assert task.model_id == verdict.kept.id and task.num_classes == 10
        assert set(task.data_spec) and all(k.startswith("ds_") for k in task.data_spec)
        model = store.get_model(verdict.kept.id)
        assert 0.0 <= model.metrics["quality"] <= 1.0 and "test_quality" in model.metrics
        assert model.metrics["score"] == pytest.approx(verdict.kept.metrics["score"])
        # every new component of the kept child was committed with it
        assert all(store.get_component(c) is not None for c in model.components)
        assert agent.progress.children == 1 and agent.progress.accepted == 1
        assert agent.progress.best_score == pytest.approx(model.metrics["score"])
        assert store.verify() == []
    finally:
        agent._close()


def test_a_new_agent_resumes_from_the_store_state(store):
    first = _agent(store)
    try:
        first.run_generation()
        first.run_generation()
    finally:
        first._close()
    after_two = store.get_agent_state(AID)
    assert after_two.generation == 2

    second = _agent(store)
    try:
        assert second.state == after_two  # read back from the store, nothing else
        second.run_generation()
    finally:
        second._close()
    ids = [t.id for t in store.trials(agent=AID)]
    assert ids == [f"{AID}:m0", f"{AID}:m1", f"{AID}:m2"]  # no id reused after the restart
    state = store.get_agent_state(AID)
    assert (state.generation, state.next_model_id) == (3, 3)
    assert state.next_component_id >= after_two.next_component_id


def test_the_steps_run_on_their_own_and_a_rejected_child_writes_only_its_trial(store):
    agent = _agent(store)
    try:
        agent.run_generation()  # a population of one
        s = agent.state
        counters = step.Counters(s.cycle, s.generation, s.next_model_id, s.next_component_id,
                                 dict(s.offsprings))
        rng, gen = generation_rng(0, AID, s.cycle, s.generation)
        proposal = step.propose(agent.ctx, counters, agent.population, rng, gen)
        assert proposal.counters.next_model_id == counters.next_model_id + 1
        assert counters.offsprings == dict(s.offsprings)  # the input is never changed
        # an unreachable threshold: the child cannot be accepted
        impossible = step.Proposal(proposal.parent, proposal.child, math.inf, proposal.schedule,
                                   proposal.lineage_start, proposal.score_of, proposal.counters)
        outcome = step.train(agent.ctx, impossible, gen)
        verdict = step.judge(agent.ctx, impossible, outcome, agent.population)
        assert not verdict.accepted and verdict.kept is None and verdict.published is None
        assert verdict.writes.components == [] and verdict.writes.models == []
        assert [t.accepted for t in verdict.writes.trials] == [False]
        assert verdict.population == agent.population
        before = store.stats()
        agent._apply(verdict)
        assert store.get_task(TASK).model_id == agent.population[0].id  # pointer unchanged
        assert store.stats()["counts"]["models"] == before["counts"]["models"]
        assert store.get_agent_state(AID).generation == 2
    finally:
        agent._close()


def test_the_same_seed_gives_the_same_trials(tmp_path):
    outcomes = []
    for run in range(2):
        with Store.open(str(tmp_path / f"s{run}"), create=True) as st:
            agent = _agent(st, seed=7)
            try:
                agent.run_generation()
                agent.run_generation()
            finally:
                agent._close()
            outcomes.append([(t.parent, t.mutations, t.hparams_diff, t.quality, t.accepted)
                             for t in st.trials(agent=AID)])
    assert outcomes[0] == outcomes[1]


def test_a_child_is_scored_under_the_sharing_snapshot_its_population_is_rescored_under(store):
    """The view refreshes while a child trains (a peer published and now shares components): the
    judge compares the child with its population under one snapshot, the one it re-scored them with."""
    agent = Agent(AgentOptions(store=store.path, task=TASK, preset="test+penalty", seed=0, threads=1,
                               lease_ttl=30.0, heartbeat_every=30.0), store=store)
    agent._open()
    try:
        agent.view.refresh()
        s = agent.state
        counters = step.Counters(s.cycle, s.generation, s.next_model_id, s.next_component_id, {}, 0)
        rng, gen = generation_rng(0, AID, 0, 0)
        proposal = step.propose(agent.ctx, counters, [], rng, gen)
        outcome = step.train(agent.ctx, proposal, gen)
        q = outcome.result.snapshot_quality
        assert outcome.result.accepted and q is not None
        # meanwhile another agent published a model sharing every root component this child shares
        shared = [c.key for c in proposal.child.components.values() if c.stored]
        assert shared
        agent.view.lockers = {k: set(v) | ({"agent~peer"} if k in shared else set())
                              for k, v in agent.view.lockers.items()}
        verdict = step.judge(agent.ctx, proposal, outcome, [])
        now = agent.ctx.scorer.score_fn(proposal.child, agent.view.lockers)(q)
        assert now != proposal.score_of(q)  # the snapshot matters under +penalty
        assert verdict.metrics.score == pytest.approx(now)
        assert verdict.writes.trials[0].score == pytest.approx(now)
    finally:
        agent._close()
