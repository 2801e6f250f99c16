"""Spending compute where it pays (issue 16): the prefix cache inside the trainer, FLOPs counted as
they are spent, learning curves in every trial, and +hurdle early rejection with an image budget.

Real training on a real task (uci_digits), a real LMDB store for the agent-level tests."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from agents import compute
from agents.agent import Agent, AgentOptions, agent_id_for
from agents.config import resolve_preset
from agents.hurdle import HurdleRule
from agents.paths import Component, ModelPath
from agents.prefix_cache import PrefixCache
from agents.roots import root_random
from agents import training
from agents.training import TaskTensors, train_child
from agents.vit import component_names, init_component, preset_vit
from store import Store
from taskdata import load_task

PRESET = resolve_preset("test")
VIT = preset_vit(PRESET)
TASK = "uci_digits"


@pytest.fixture(scope="module")
def data() -> TaskTensors:
    return TaskTensors(load_task(TASK), torch.device("cpu"), 256)


def _child(trainable: set[str], size: int = 32, adapters: str = "") -> ModelPath:
    """A root (frozen, stored) with fresh trainable components on top, as build_child makes them."""
    h = PRESET.default_hparams(10)
    h.update(ds_image_size=size, adapter_layers=adapters)
    root = root_random(VIT, h, seed=3)
    gen = torch.Generator().manual_seed(4)
    comps = {}
    for i, name in enumerate(component_names(h)):
        params = root.get(name) if name in root and name not in ("posembed_input",) else None
        if params is None:
            params = init_component(name, VIT, h, gen)
        comps[name] = Component(name, "root" if name not in trainable else "agent~x", i,
                                {k: v.clone() for k, v in params.items()}, stored=name not in trainable)
    return ModelPath("agent~x:m0", "agent~x", TASK, h, comps)


def _train(child: ModelPath, data: TaskTensors, cache: PrefixCache | None, **kw):
    return train_child(child, VIT, data, batch_size=32, steps_between_validations=8, validations=2,
                       threshold=-math.inf, score_of=lambda q: q, gen=torch.Generator().manual_seed(5),
                       cache=cache, **kw)


TOP = {"encoder_norm", "head"}
SHAPES = {"head only": (TOP, 32, ""), "top block": (TOP | {"encoderblock_2"}, 32, ""),
          "adapter": (TOP | {"residual_adapter_1"}, 32, "1"),
          "image size 48": (TOP | {"encoderblock_2"}, 48, ""),
          "full clone": (set(component_names(PRESET.default_hparams(10))), 32, "")}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_through_the_cache_equals_training_without_it(shape, data):
    trainable, size, adapters = SHAPES[shape]
    plain, cached = _child(trainable, size, adapters), _child(trainable, size, adapters)
    cache = PrefixCache()
    r0, m0 = _train(plain, data, None)
    r1, m1 = _train(cached, data, cache)
    assert r0.steps == r1.steps == 16 and r0.train_images == r1.train_images
    assert r1.evals == pytest.approx(r0.evals, abs=1.5 / len(data.val_y))  # at most one flip
    for name in trainable & set(plain.components):
        for t, v in plain.components[name].params.items():
            torch.testing.assert_close(cached.components[name].params[t], v, rtol=0, atol=2e-4,
                                       msg=f"{shape} {name}.{t}")
    assert training.test_accuracy(m1, data, size, cache=cache, child=cached) == pytest.approx(
        training.test_accuracy(m0, data, size), abs=2 / len(data.test_y))
    # FLOPs: counted as spent; the cache never costs more than running the prefix every time
    h = plain.hparams
    assert r0.flops.train == 16 * 32 * compute.train_flops_per_image(VIT, h, m0.trainable_components)
    assert r0.flops.validation == 2 * len(data.val_y) * compute.forward_flops(VIT, h)
    assert r0.flops.cache_fill == 0
    if shape == "full clone":
        assert r1.flops.to_dict() == r0.flops.to_dict() and cache.entries == 0
    else:
        assert 0 < r1.flops.total < r0.flops.total
        prefix = compute.forward_flops(VIT, h) - compute.forward_flops(VIT, h, skip=m1.frozen_prefix)
        # every distinct row drawn (train) and the validation subset, filled once
        assert r1.flops.cache_fill % prefix == 0 and r1.flops.cache_fill // prefix <= 16 * 32 + len(data.val_y)
    assert r0.lowest_trainable == r1.lowest_trainable == next(n for n in component_names(h) if n in trainable)


def test_a_child_stopped_by_the_hurdle_keeps_its_snapshot_and_saves_its_images(data):
    child = _child(TOP | {"encoderblock_2"})
    asked = []

    def stop_early(validation, score):
        asked.append((validation, score))
        return True

    result, _ = train_child(child, VIT, data, batch_size=32, steps_between_validations=8, validations=4,
                            threshold=0.0, score_of=lambda q: q, gen=torch.Generator().manual_seed(5),
                            stop_early=stop_early)
    assert result.stopped == "hurdle" and len(asked) == 1 and asked[0][0] == 1
    assert result.steps == 8 and result.train_images == 8 * 32 and len(result.evals) == 1
    assert result.accepted  # threshold 0: the snapshot taken at validation 1 counts
    assert result.flops.train == 8 * 32 * compute.train_flops_per_image(VIT, child.hparams,
                                                                        TOP | {"encoderblock_2"})


def test_the_hurdle_rule():
    rule = HurdleRule(margins=(0.04,), loose_extra=0.04)
    assert rule.stops(1, 0.80, 0.85, loose=False) and not rule.stops(1, 0.82, 0.85, loose=False)
    assert not rule.stops(1, 0.80, 0.85, loose=True) and rule.stops(1, 0.76, 0.85, loose=True)
    assert not rule.stops(2, 0.10, 0.85, loose=False)        # only at its rung
    assert not rule.stops(1, 0.10, None, loose=False)        # nothing to fall short of
    assert not rule.stops(1, 0.10, -math.inf, loose=False)
    base = {"opt_lr": 0.01, "ds_image_size": 32}
    assert rule.exempt_mutation(base, {**base, "opt_lr": 0.02})
    assert rule.exempt_mutation(base, {**base, "ds_image_size": 48})
    assert not rule.exempt_mutation(base, {**base, "opt_lr": 0.005})


def _agent(store: Store, preset: str) -> Agent:
    agent = Agent(AgentOptions(store=store.path, task=TASK, preset=preset, seed=0, threads=1,
                               lease_ttl=30.0, heartbeat_every=30.0, cycles=1), store=store)
    agent.verbose = False
    return agent


@pytest.mark.parametrize("preset", ["test", "test@base+autotune+adapters+layers+imagesize+continue+hurdle"])
def test_trials_record_curves_and_flops_and_a_hurdle_cycle_is_an_image_budget(tmp_path, preset):
    with Store.open(str(tmp_path / "store"), create=True) as store:
        agent = _agent(store, preset)
        agent._open()
        # a bar no child of its own task can clear: every one of them stops at its first validation
        agent.ctx = copy.copy(agent.ctx)
        object.__setattr__(agent.ctx, "hurdle", HurdleRule(margins=(-2.0,), loose_extra=0.0))
        try:
            agent._run_cycle()
        finally:
            agent._close()
        trials = store.trials(agent=agent_id_for(TASK))
        b = agent.preset.budget
        per_child = agent.preset.child_images(agent.ctx.tensors.n_train)
        assert sum(t.train_images for t in trials) >= b.children_per_cycle * per_child
        stopped = [t for t in trials if t.stopped == "hurdle"]
        assert stopped and len(trials) > b.children_per_cycle  # freed images bought more children
        for t in trials:
            assert t.flops["total"] == t.flops["train"] + t.flops["validation"] + t.flops["cache_fill"] > 0
            assert t.image_size in b.image_sizes and t.lowest_trainable is not None
            if t.stopped:
                assert len(t.evals) == 1 and t.threshold is not None
                assert t.train_images == per_child // b.validations_per_child
            else:
                assert len(t.evals) == b.validations_per_child
            if not agent.preset.honest:  # the reference's rule: the best validation is recorded
                assert t.quality == pytest.approx(max(t.evals))
            elif t.stopped:  # +honest: a stopped child is never judged
                assert t.quality is None
            else:  # judged on its last weights (uci_digits: the decision split is the subset)
                assert t.quality == pytest.approx(t.evals[-1])
        first = trials[0]
        assert first.threshold is None and not first.stopped  # the root's child: anything is kept
        assert store.get_agent_state(agent_id_for(TASK)).cycle == 1


def test_anneal_keeps_a_lineage_schedule_up_with_the_agents_clock(data):
    """+anneal: a child's place in the agent's one schedule is max(its lineage's steps, the share of
    the budget spent), never past the point where it would run beyond the end (a restart)."""
    from agents import generation as step

    def place(preset_name: str, lineage_steps: int, cycle: int, cycle_images: int):
        preset = resolve_preset(preset_name)
        ctx = step.Context("agent~x", TASK, preset, VIT, 2, data, view=None, scorer=None, probe_cache={})
        parent = ModelPath("agent~x:m0", "agent~x", TASK, {}, {}, metrics={"lineage_steps": lineage_steps})
        counters = step.Counters(cycle, 0, 1, 1, {}, cycle_images)
        return step._schedule(ctx, parent, counters)

    preset = resolve_preset("test+anneal")
    b = preset.budget
    child_steps = preset.steps_between_validations(data.n_train) * b.validations_per_child
    total = 2 * b.children_per_cycle * child_steps
    half = b.children_per_cycle * child_steps * b.batch_size  # images of one whole cycle
    # behind the clock: moved up to it; ahead of it: its own lineage position stands
    assert place("test+anneal", 0, 1, 0) == ((total // 2, total), 0)
    assert place("test+anneal", total // 2 + 3, 1, 0) == ((total // 2 + 3, total), total // 2 + 3)
    # the budget's last child ends the schedule instead of wrapping into a restart
    assert place("test+anneal", 0, 1, half) == ((total - child_steps, total), 0)
    # +continue alone keeps the lineage's position whatever the clock says
    assert place("test", 0, 1, half) == ((0, total), 0)
