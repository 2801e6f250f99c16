"""Properties that only a behaviour test can pin (each would pass a flag check with the feature
broken): the tie of the >= rule, +guard, +clock, momentum through the store, an agent's own catch-up
with what peers published, and the deterministic adapter refusal of the timm export."""
from __future__ import annotations

import math
import random

import pytest
import torch

import agents  # noqa: F401  (torchvision fix before timm)
from agents import generation as step
from agents.agent import Agent, AgentOptions, generation_rng
from agents.config import resolve_preset
from agents.paths import copy_component
from agents.training import make_model_and_optimizer, train_child
from agents.view import SystemView, component_write, from_raw, model_record, publication
from agents.vit import init_component
from helpers.swarm import run_cli
from store import Store
from test_method import VIT, build, digits, make_root  # noqa: F401  (digits: a fixture)

TASK, PEER = "uci_digits", "glyphs_greek"


def test_a_child_that_ties_its_threshold_is_accepted(digits):  # noqa: F811
    """>= : a child whose best score equals its parent's is kept (method 3.3)."""
    preset = resolve_preset("test")
    root = make_root(preset)

    def run(threshold):
        child = build(preset, root, seed=3)
        return train_child(child, VIT, digits, batch_size=32, steps_between_validations=3, validations=2,
                           threshold=threshold, score_of=lambda q: q,
                           gen=torch.Generator().manual_seed(0))[0]

    free = run(-math.inf)
    tie = run(max(free.evals))  # the same run, deterministic: its best equals the threshold
    assert tie.evals == free.evals
    assert tie.accepted and tie.score == max(free.evals)
    above = run(max(free.evals) + 1e-9)
    assert not above.accepted


def _agent(path: str, st: Store, task: str, preset: str = "test", seed: int = 0) -> Agent:
    agent = Agent(AgentOptions(store=path, task=task, preset=preset, seed=seed, threads=1,
                               lease_ttl=30.0, heartbeat_every=30.0), store=st)
    agent.verbose = False
    agent._open()
    agent.view.refresh()
    return agent


@pytest.fixture()
def grown(tmp_path):
    """A store where a peer task already published (so a foreign parent exists)."""
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        peer = _agent(path, st, PEER)
        try:
            peer.run_generation()
        finally:
            peer._close()
    return path


def _propose_with_parent(agent: Agent, population, want_foreign: bool):
    s = agent.state
    for seed in range(200):
        counters = step.Counters(s.cycle, s.generation, s.next_model_id, s.next_component_id,
                                 {p.id: 40 for p in population}, 0)  # own parents step aside
        p = step.propose(agent.ctx, counters, population, random.Random(seed),
                         torch.Generator().manual_seed(seed))
        if (p.parent.task != agent.ctx.task) == want_foreign:
            return p
    raise AssertionError("no proposal with the wanted kind of parent")


@pytest.mark.parametrize("preset", ["test", "test+guard"])
def test_guard_makes_a_child_of_another_task_beat_the_agents_best(grown, preset):
    with Store.open(grown) as st:
        agent = _agent(grown, st, TASK, preset=preset)
        try:
            best = agent.run_generation().published
            assert best is not None and best.score is not None
            agent.view.refresh()
            foreign = _propose_with_parent(agent, [best], want_foreign=True)
            own = _propose_with_parent(agent, [best], want_foreign=False)
        finally:
            agent._close()
    assert own.threshold == pytest.approx(best.score)  # own parent: its score, with or without guard
    if preset == "test+guard":
        assert foreign.threshold == pytest.approx(best.score)
    else:
        assert foreign.threshold == -math.inf  # a foreign parent is re-climbed from scratch


def test_clock_places_each_child_at_the_agents_position_in_one_schedule(tmp_path):
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        agent = _agent(path, st, TASK, preset="test+clock")
        try:
            assert agent.preset.clock_schedule and not agent.preset.continue_schedule
            b = agent.preset.budget
            child_steps = agent.preset.steps_between_validations(agent.ctx.tensors.n_train) \
                * b.validations_per_child
            total = agent.cycles * b.children_per_cycle * child_steps
            for cycle, generation in ((0, 0), (0, 1), (1, 0), (1, 1)):
                counters = step.Counters(cycle, generation, 0, 0, {}, 0)
                rng, gen = generation_rng(0, agent.agent_id, cycle, generation)
                p = step.propose(agent.ctx, counters, [], rng, gen)
                done = cycle * b.children_per_cycle + generation
                assert p.schedule == (min(done * child_steps, total - child_steps), total)
        finally:
            agent._close()


def test_a_clone_starts_from_the_momentum_its_parent_stored(tmp_path):
    """Momentum travels through the store (bfloat16) and seeds a clone's optimizer in a fresh view."""
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        agent = _agent(path, st, TASK)
        try:
            published = agent.run_generation().published
        finally:
            agent._close()
        fresh = SystemView(st, "reader", torch.device("cpu"))  # nothing shared with the agent's memory
        parent = fresh.path(published.id)
        with_mom = [c for c in parent.components.values() if c.momentum]
        assert with_mom, "the published child stored no momentum"
        comp = with_mom[0]
        _, stored = st.load_component_tensors(comp.key)
        for name, raw in stored.items():
            assert raw.dtype == "bfloat16"
            assert torch.equal(comp.momentum[name], from_raw(raw, torch.device("cpu"), torch.float32))
        clone = copy_component(comp, "reader", 0)
        parent.components[comp.name] = clone
        _, opt, tensors = make_model_and_optimizer(parent, agent.vit)
        for (cname, tname), p in tensors.items():
            if cname == comp.name:
                assert torch.equal(opt.state[p]["momentum_buffer"], comp.momentum[tname])


def test_an_agent_catches_up_with_what_peers_published_before_and_while_it_runs(tmp_path):
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        peer = _agent(path, st, PEER)
        try:
            first = peer.run_generation().published
            late = _agent(path, st, TASK)  # joins after the peer's publish
            try:
                late._refresh_view()
                assert late.view.published[PEER].id == first.id  # caught up from the store
                assert late._seen_seq == st.last_event_seq()
                second = None
                while second is None:  # the peer publishes again while the late agent runs
                    second = peer.run_generation().published
                late._next_log_poll = 0.0  # no bus message reaches it here: the event log must
                late.bus.poll = lambda timeout: []
                assert late._listen() is False
                assert late.view.published[PEER].id == second.id
                assert "in the log" in late.progress.last_event
            finally:
                late._close()
        finally:
            peer._close()


def test_export_timm_refuses_a_model_with_adapters_in_one_line(tmp_path):
    """Deterministic: the published model gets an adapter by construction, not by chance."""
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        agent = _agent(path, st, TASK)
        try:
            base = agent.run_generation().published
            h = dict(base.hparams, adapter_layers="1")
            comps = dict(base.components)
            comps["residual_adapter_1"] = type(next(iter(comps.values())))(
                "residual_adapter_1", agent.agent_id, 900,
                init_component("residual_adapter_1", agent.vit, h, torch.Generator().manual_seed(0)))
            child = type(base)(f"{agent.agent_id}:m900", agent.agent_id, TASK, h, comps,
                               dict(base.metrics, score=1.0), base.id, base.preset, base.preset_hash,
                               created_at=1.0)
            st.commit(agent.agent_id, agent.token, components=[component_write(comps["residual_adapter_1"])],
                      models=[model_record(child)], publish=publication(child))
        finally:
            agent._close()
    out = str(tmp_path / "m.safetensors")
    r = run_cli("launch/query.py", "--store", path, "export", TASK, "--out", out, "--format", "timm")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "residual adapters" in r.stderr and "blocks 1" in r.stderr
    r = run_cli("launch/query.py", "--store", path, "export", TASK, "--out", out)  # default format: fine
    assert r.returncode == 0, r.stderr


def test_clock_and_continue_together_are_refused_in_one_line():
    from agents.config import PresetError

    assert "continue" not in resolve_preset("demo+clock").extensions
    assert "continue" in resolve_preset("demo").extensions
    with pytest.raises(PresetError, match="choose one"):
        resolve_preset("demo+continue+clock")
