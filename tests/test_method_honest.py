"""Issue 24's method extensions on a real agent, store and data: +honest, +polish, +lockown.

- +honest decides once, on the child's last weights, on the decision split, against its parent
  re-scored on exactly those images (and records both);
- the +polish child continues the best model unmutated and ends at learning rate 0;
- under +lockown the lineage's own inherited components below the top block are shared, frozen and
  bit-identical after the child trained.
"""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from agents import generation as step
from agents.agent import Agent, generation_rng
from agents.config import PresetError, resolve_preset
from agents.mutation import Mutator, lockable_own
from agents.paths import Component, ModelPath
from agents.roots import root_random
from agents.training import accuracy, polish_lr, train_child, TaskTensors
from agents.vit import VIT_CONFIGS, PathModel
from helpers.agents import open_agent
from store import Store
from taskdata import load_task
from taskdata.augment import preprocess_eval

TASK = "mnist5k"  # 600 validation images: the decision split is larger than the test budget's subset


def _agent(store: Store, preset: str) -> Agent:
    return open_agent(store, TASK, preset)


def _decision_accuracy(path: ModelPath, agent: Agent) -> float:
    data, size = agent.ctx.tensors, int(path.hparams["ds_image_size"])
    model = PathModel(agent.vit, path.hparams, {n: c.params for n, c in path.components.items()}, ())
    model.eval()
    return accuracy(model, data.decision_x, data.decision_y, prep=lambda x: preprocess_eval(x, size))


@pytest.fixture()
def store(tmp_path):
    st = Store.open(str(tmp_path / "store"), create=True)
    yield st
    st.close()


def test_polish_implies_honest_and_the_decision_split_is_the_whole_validation_split():
    p = resolve_preset("test+polish")
    assert p.honest and p.polish and not p.lock_own
    assert p.decision_examples == 5_120 and p.validation_examples == 256
    assert resolve_preset("cpu").honest  # the default method decides honestly
    without = resolve_preset("cpu@base+autotune+adapters+layers+imagesize+continue+hurdle")
    assert without.decision_examples == 512  # without +honest: the subset
    assert p.polish_images(10_000) >= p.child_images(10_000)
    with pytest.raises(PresetError):
        resolve_preset("test+polished")


def test_honest_judges_the_last_weights_against_the_parent_rescored_on_the_same_images(store):
    agent = _agent(store, "test+honest")
    try:
        data = agent.ctx.tensors
        assert len(data.val_y) == 256 and len(data.decision_y) == 600
        first = agent.run_generation()  # from the root: nothing to beat
        assert first.accepted and first.published is not None
        parent = agent.population[0]
        # its recorded quality is its last weights' accuracy on the decision split, not a maximum
        assert parent.metrics["quality"] == pytest.approx(_decision_accuracy(parent, agent))
        s = agent.state
        counters = step.Counters(s.cycle, s.generation, s.next_model_id, s.next_component_id,
                                 dict(s.offsprings), s.cycle_images)
        rng, gen = generation_rng(0, agent.agent_id, s.cycle, s.generation)
        proposal = step.propose(agent.ctx, counters, agent.population, rng, gen)
        assert proposal.parent is parent  # one own model, never had children: it is the parent
        again = _decision_accuracy(parent, agent)
        assert proposal.parent_quality == pytest.approx(again)
        assert proposal.decide == pytest.approx(again)  # scale factor 1: score = quality
        outcome = step.train(agent.ctx, proposal, gen)
        r = outcome.result
        if not r.stopped:
            # judged once, after the last step, on the decision split, with the weights it ends with
            assert r.snapshot_step == r.steps
            assert r.quality == pytest.approx(accuracy(
                outcome.model, data.decision_x, data.decision_y,
                prep=lambda x: preprocess_eval(x, int(proposal.child.hparams["ds_image_size"]))))
            assert r.accepted == (r.quality >= proposal.decide)
        verdict = step.judge(agent.ctx, proposal, outcome, agent.population)
        trial = verdict.writes.trials[0]
        assert trial.parent_quality == pytest.approx(again) and trial.quality == r.quality
        assert trial.final_lr is not None
        # the parent's re-score is cached per model and charged to the child that needed it
        assert parent.id in agent.ctx.parent_scores and trial.flops["validation"] > 0
    finally:
        agent._close()


def test_the_polish_child_continues_the_best_model_and_ends_at_learning_rate_zero(store):
    assert polish_lr(0.01, 10)(9) == 0.0 and polish_lr(0.01, 10)(0) == pytest.approx(0.01)
    agent = _agent(store, "test+polish")
    try:
        while agent.state.cycle == 0 and agent.state.generation < 8:
            best_before = agent.population[0].id if agent.population else None
            v = agent.run_generation()
            if "polish" in v.writes.trials[0].mutations:
                break
        else:
            pytest.fail("no polish child in the first cycle")
        trial = v.writes.trials[0]
        assert trial.parent == best_before and trial.hparams_diff == {}
        assert trial.final_lr == 0.0 and trial.stopped == ""
        budget = agent.preset.budget
        cycle_images = budget.children_per_cycle * agent.preset.child_images(agent.ctx.tensors.n_train)
        assert agent.state.cycle_images >= cycle_images  # it spent what the cycle had left
    finally:
        agent._close()


VIT = dataclasses.replace(VIT_CONFIGS["ti"], depth=3)
SIZE = 16


def _stored(path: ModelPath) -> ModelPath:
    for c in path.components.values():
        c.stored = True
    path.stored = True
    return path


def test_lockown_shares_the_lineage_below_the_top_block_and_leaves_it_bit_identical():
    preset = resolve_preset("test@base+lockown")
    h = preset.default_hparams(10)
    h.update(num_layers=3, ds_image_size=SIZE)
    params = root_random(VIT, h, 0)
    root = ModelPath("root:m0", "root", "root", h,
                     {n: Component(n, "root", i, p, stored=True) for i, (n, p) in enumerate(params.items())},
                     stored=True)
    counter = iter(range(1000))
    lineage = {root.id: root}

    def ancestors(p):
        while p is not None:
            yield p
            p = lineage.get(p.parent_id)

    def child_of(parent, cid, seed):
        mut = Mutator(preset, VIT, random.Random(seed), torch.Generator().manual_seed(seed))
        ds, _ = mut.sample_ds_hparams(None, 10)
        ds["ds_image_size"] = SIZE
        return mut.build_child(parent, ds, agent_id="a", task="uci_digits", child_id=cid,
                               next_component_id=lambda: next(counter), ancestors=ancestors,
                               is_frozen=lambda c: c.owner != "a",
                               root_posemb=params["posembed_input"]["pos_embedding"],
                               device=torch.device("cpu"))

    first = child_of(root, "a:m0", 0)
    for name in list(first.components):  # a lineage that owns every block
        c = first.components[name]
        if c.owner != "a":
            first.components[name] = Component(name, "a", next(counter),
                                               {k: t.clone() for k, t in c.params.items()})
    first.parent_id = root.id
    first.hparams.update({f"_mu_|clone:{n}": 0.0 for n in first.components})
    lineage[first.id] = _stored(first)
    child = child_of(first, "a:m1", 1)
    locked = lockable_own(child.hparams)
    assert {"encoderblock_0", "encoderblock_1", "embedding"} <= locked
    assert "encoderblock_2" not in locked and "encoder_norm" not in locked
    for name in locked & set(first.components):
        assert child.components[name] is first.components[name], f"{name} was copied"
    trainable = {n for n, c in child.components.items() if not c.stored}
    assert {"encoderblock_2", "encoder_norm", "head"} <= trainable and not trainable & locked
    before = {(n, k): t.clone() for n in locked for k, t in child.components[n].params.items()}
    data = TaskTensors(load_task("uci_digits"), torch.device("cpu"), 128)
    result, model = train_child(child, VIT, data, batch_size=32, steps_between_validations=4,
                                validations=2, threshold=-math.inf, score_of=lambda q: q,
                                gen=torch.Generator().manual_seed(0))
    assert result.accepted and result.steps == 8
    assert set(model.frozen_prefix) == locked  # the whole locked lineage is a cacheable prefix
    for (n, k), t in before.items():
        assert torch.equal(child.components[n].params[k], t), f"frozen {n}.{k} changed"
    assert not torch.equal(child.components["encoderblock_2"].params[next(iter(
        child.components["encoderblock_2"].params))], first.components["encoderblock_2"].params[next(iter(
            first.components["encoderblock_2"].params))])
