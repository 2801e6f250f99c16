"""The method's properties (docs/method.md section 8) on a tiny real ViT and real data."""
from __future__ import annotations

import copy
import dataclasses
import math
import random

import pytest
import torch

import agents  # noqa: F401  (torchvision fix before timm)
from agents.config import MU_RANGE, resolve_preset
from taskdata import load_task
from agents.mutation import Mutator, incremental_mutation
from agents.paths import Component, ModelPath, copy_component
from agents.roots import root_random
from agents.scoring import Scorer, accounted_params, score
from agents.selection import best_path, select_parent
from agents.training import TaskTensors, accuracy, make_model_and_optimizer, train_child
from agents.vit import VIT_CONFIGS, PathModel, init_component

VIT = dataclasses.replace(VIT_CONFIGS["ti"], depth=3)
SIZE = 16  # one patch: the smallest legal image keeps these tests fast


def make_root(preset, seed: int = 0) -> ModelPath:
    h = preset.default_hparams(None)
    h.update(num_layers=3, ds_image_size=SIZE)
    params = root_random(VIT, h, seed)
    comps = {n: Component(n, "root", i, p, stored=True) for i, (n, p) in enumerate(params.items())}
    return ModelPath("root:m0", "root", "root", h, comps, stored=True)


def build(preset, parent: ModelPath, *, seed=0, task="uci_digits", lineage=None, frozen=None,
          num_classes=10, child_id="a:m1") -> ModelPath:
    mut = Mutator(preset, VIT, random.Random(seed), torch.Generator().manual_seed(seed))
    ds, _ = mut.sample_ds_hparams(None, num_classes)
    ds["ds_image_size"] = SIZE
    counter = iter(range(1000))
    lineage = lineage or {}
    root = lineage.get("root:m0", parent)

    def ancestors(p):
        while p is not None:
            yield p
            p = lineage.get(p.parent_id)

    return mut.build_child(parent, ds, agent_id="a", task=task, child_id=child_id,
                           next_component_id=lambda: next(counter), ancestors=ancestors,
                           is_frozen=frozen or (lambda c: c.owner != "a"),
                           root_posemb=root.components["posembed_input"].params["pos_embedding"],
                           device=torch.device("cpu"))


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    return TaskTensors(load_task("uci_digits"), torch.device("cpu"), 256)


def model_of(p: ModelPath) -> PathModel:
    return PathModel(VIT, p.hparams, {n: c.params for n, c in p.components.items()}, set())


def test_training_never_touches_frozen_components(digits):
    preset = resolve_preset("test")
    root = make_root(preset)
    before = {(n, k): t.clone() for n, c in root.components.items() for k, t in c.params.items()}
    child = build(preset, root)
    shared = [n for n, c in child.components.items() if c.owner == "root"]
    assert shared, "a child of the root must share frozen root components by reference"
    for n in shared:  # the same tensors in memory, not copies
        assert child.components[n] is root.components[n]
    model, opt, tensors = make_model_and_optimizer(child, VIT)
    frozen_ptrs = {t.data_ptr() for c in root.components.values() for t in c.params.values()}
    assert not frozen_ptrs & {p.data_ptr() for p in tensors.values()}
    result, _ = train_child(child, VIT, digits, batch_size=32, steps_between_validations=4,
                            validations=2, threshold=-math.inf, score_of=lambda q: q,
                            gen=torch.Generator().manual_seed(0))
    assert result.steps == 8 and result.accepted
    for (n, k), t in before.items():
        now = root.components[n].params[k]
        assert torch.equal(now, t), f"frozen {n}.{k} changed"
        assert now.grad is None
    trained = [c for c in child.components.values() if c.owner == "a"]
    assert any(not torch.equal(c.params[k], root.components[c.name].params[k])
               for c in trained if c.name in root.components for k in c.params)


def test_adapter_insertion_and_cloning_keep_the_output():
    preset = resolve_preset("test@base+adapters")  # no auto-tune: the stored probabilities hold
    root = make_root(preset)
    gen = torch.Generator().manual_seed(1)
    parent = build(preset, root)
    parent.components["head"].params = {k: torch.randn(v.shape, generator=gen)
                                        for k, v in parent.components["head"].params.items()}
    for c in parent.components.values():
        c.stored = True
    parent.hparams["_mu_|add:residual_adapter_1"] = 1.0
    parent.hparams["_mu_|clone:encoderblock_0"] = 1.0
    for k in list(parent.hparams):
        if k.startswith("_mu_|") and k not in ("_mu_|add:residual_adapter_1", "_mu_|clone:encoderblock_0"):
            parent.hparams[k] = 0.0
    parent.hparams["_mu_"] = 0.0
    lineage = {"root:m0": root, parent.id: parent}
    parent.parent_id = "root:m0"
    child = build(preset, parent, seed=2, lineage=lineage, child_id="a:m2",
                  frozen=lambda c: c.owner == "root" or c.key in {x.key for x in parent.components.values()})
    assert child.hparams["adapter_layers"] == "1"
    assert "add:residual_adapter_1" in child.mutations and "clone:encoderblock_0" in child.mutations
    blk = child.components["encoderblock_0"]
    assert blk.owner == "a" and blk.cloned_from == parent.components["encoderblock_0"].key
    assert blk is not parent.components["encoderblock_0"]
    x = torch.rand(4, 3, SIZE, SIZE, generator=gen) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model_of(parent)(x), model_of(child)(x))


def test_clone_carries_momentum_into_the_optimizer():
    preset = resolve_preset("test")
    root = make_root(preset)
    src = copy_component(root.components["encoderblock_2"], "b", 7)
    src.momentum = {k: torch.randn_like(v) for k, v in src.params.items()}
    clone = copy_component(src, "a", 8)
    assert clone.momentum is not src.momentum
    child = copy.copy(root)
    child.components = dict(root.components, encoderblock_2=clone)
    child.components["head"] = Component("head", "a", 9, init_component(
        "head", VIT, {**root.hparams, "num_classes": 10}, torch.Generator().manual_seed(0)))
    child.hparams = {**root.hparams, "num_classes": 10}
    _, opt, tensors = make_model_and_optimizer(child, VIT)
    for k, p in tensors.items():
        if k[0] == "encoderblock_2":
            buf = opt.state[p]["momentum_buffer"]
            assert torch.equal(buf, src.momentum[k[1]]) and buf.data_ptr() != src.momentum[k[1]].data_ptr()
        else:
            assert "momentum_buffer" not in opt.state[p]  # fresh components start without momentum


def test_learned_mutation_probabilities_walk_the_grid_and_are_inherited():
    preset = resolve_preset("test")
    mut = Mutator(preset, VIT, random.Random(3), torch.Generator())
    h = {"_mu_": 0.1}
    values, moves = [], 0
    for _ in range(3000):
        child = dict(h)  # inherited: the child starts from its parent's stored probability
        mut.do_mutate(child, "clone:cls")
        p_old, p_new = h.get("_mu_|clone:cls", 0.1), child["_mu_|clone:cls"]
        assert p_new in MU_RANGE
        assert abs(MU_RANGE.index(p_new) - MU_RANGE.index(p_old)) <= 1
        moves += p_new != p_old
        values.append(p_new)
        h = child
    # walked with probability µ = 0.1 (an index move happens on half the walks at the ends only)
    assert 0.05 < moves / 3000 < 0.11
    assert len(set(values)) > 5
    # forced actions fire without touching the stored probabilities
    assert mut.do_mutate(h, "clone:encoder_norm") and "_mu_|clone:encoder_norm" not in h
    # without auto-tune nothing is stored and µ is fixed
    base = Mutator(resolve_preset("test@base"), VIT, random.Random(3), torch.Generator())
    h2 = {"_mu_": 0.1}
    fired = sum(base.do_mutate(h2, "clone:cls") for _ in range(4000))
    assert "_mu_|clone:cls" not in h2 and 0.08 < fired / 4000 < 0.12


def test_incremental_mutation_moves_one_step():
    rng = random.Random(0)
    seen = {incremental_mutation(0.01, (0.005, 0.01, 0.02), rng) for _ in range(200)}
    assert seen == {0.005, 0.02}
    ends = [incremental_mutation(0.005, (0.005, 0.01, 0.02), rng) for _ in range(2000)]
    assert set(ends) == {0.005, 0.01} and 0.4 < ends.count(0.005) / 2000 < 0.6


def _paths(scores, agent="a", task="t"):
    return [ModelPath(f"{agent}:m{i}", agent, task, {}, {}, {"score": s}) for i, s in enumerate(scores)]


def test_parent_selection_decays_with_offsprings_and_falls_back_uniformly():
    own = _paths([0.9, 0.8])
    foreign = _paths([0.5, 0.4], agent="b", task="u") + [ModelPath("root:m0", "root", "root", {}, {})]
    rng = random.Random(0)
    assert all(select_parent(own, foreign, {}, rng) is own[0] for _ in range(200))
    picks = [select_parent(own, foreign, {"a:m0": 1}, rng).id for _ in range(4000)]
    assert abs(picks.count("a:m0") / 4000 - 0.5) < 0.04
    assert abs(picks.count("a:m1") / 4000 - 0.5) < 0.04
    picks = [select_parent(own, foreign, {"a:m0": 30, "a:m1": 30}, rng).id for _ in range(5000)]
    for pid in ("a:m0", "a:m1", "b:m0", "b:m1", "root:m0"):
        assert abs(picks.count(pid) / 5000 - 0.2) < 0.03  # uniform over every path in the system
    assert select_parent([], foreign, {}, rng).id in {"b:m0", "b:m1", "root:m0"}


def test_best_path_prefers_newest_on_ties():
    ps = _paths([0.7, 0.9, 0.9])
    assert best_path(ps).id == "a:m2"


def test_score_formula_and_accounted_params():
    preset = resolve_preset("test+penalty")
    root = make_root(preset)
    child = build(preset, root)
    lockers = {c.key: {"root"} for c in root.components.values()}
    lockers[root.components["encoderblock_1"].key].add("b")  # also used by another task
    expect = 0.0
    for c in child.components.values():
        users = {"a"} | lockers.get(c.key, set())
        expect += c.num_params() / len(users)
    assert accounted_params(child, lockers) == pytest.approx(expect)
    # a component shared by root + b + a counts a third
    blk = child.components["encoderblock_1"]
    assert blk.owner == "root"
    s = preset.scale_factor
    assert s < 1.0
    b = preset.budget
    got = score(0.8, expect, 1e7, preset)
    assert got == pytest.approx(0.8 * s ** (expect / b.p_ref) * s ** (1e7 / b.f_ref))
    scorer = Scorer(preset, VIT)
    terms = scorer.size_terms(child, lockers)
    assert scorer.score_fn(child, lockers)(0.8) == pytest.approx(
        score(0.8, terms["accounted_params"], terms["flops"], preset))
    assert score(0.8, expect, 1e7, resolve_preset("test")) == 0.8  # s = 1: plain accuracy


def test_child_is_kept_only_if_it_reaches_the_parent_and_keeps_the_best_checkpoint(digits):
    preset = resolve_preset("test")
    root = make_root(preset)
    child = build(preset, root, seed=5)
    result, _ = train_child(child, VIT, digits, batch_size=32, steps_between_validations=3,
                            validations=2, threshold=1.01, score_of=lambda q: q,
                            gen=torch.Generator().manual_seed(0))
    assert not result.accepted and result.score is None and len(result.evals) == 2
    assert result.quality == max(result.evals)  # recorded for the trial log even when dropped
    # Find a run whose validation accuracy goes down at the end: the kept params must be the best.
    for seed in range(12):
        child = build(preset, root, seed=seed)
        child.hparams["opt_lr"] = 0.5  # a large step makes late validations worse sometimes
        child.hparams["opt_lr_warmup_ratio"] = 0.0
        result, model = train_child(child, VIT, digits, batch_size=32, steps_between_validations=2,
                                    validations=5, threshold=-math.inf, score_of=lambda q: q,
                                    gen=torch.Generator().manual_seed(seed))
        assert result.accepted and result.quality == max(result.evals)
        again = accuracy(model, digits.val_inputs(SIZE), digits.val_y)
        assert again == pytest.approx(result.quality)
        if result.evals[-1] < max(result.evals):
            break
    else:
        pytest.fail("no run had a worse last validation; the best-checkpoint rule went untested")
