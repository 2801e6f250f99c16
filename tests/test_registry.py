"""The registry of component kinds and mutation actions: invariants over EVERY registered kind and
action, and a new kind (a trainable x -> x bridge at a layer slot) registered in-test
that the mutation, scoring, model and report code pick up with no change to the store."""
from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import agents  # noqa: F401  (torchvision fix before timm)
from agents import registry
from agents.config import resolve_preset
from agents.mutation import Mutator
from agents.paths import Component, ModelPath
from agents.roots import root_component_names, root_random
from agents.scoring import Scorer
from agents.view import SystemView, component_write, model_record, publication
from agents.vit import VIT_CONFIGS, PathModel, component_names, count_flops, init_component, param_shapes
from report.build import action_family, build_report
from report.svg import short_component_name
from store import ModelRecord, Store, TrialRecord

REPO = Path(__file__).resolve().parent.parent
VIT = dataclasses.replace(VIT_CONFIGS["ti"], depth=3)
SIZE = 16
AGENT = "agent~t"


def hparams(**over) -> dict:
    h = dict(num_layers=3, adapter_layers="0_2", adapter_dim=16, ds_image_size=32, num_classes=4)
    h.update(over)
    return h


def fresh_params(h: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: init_component(n, VIT, h, gen) for n in component_names(h)}


def kind_ids(kinds):
    return [k.name for k in kinds]


# ---- torch-free ---------------------------------------------------------------------------------

def test_registry_and_report_import_without_torch():
    code = ("import sys\n"
            "import agents.registry, report.build, report.svg, report.html\n"
            "from agents.registry import kinds, actions\n"
            "assert kinds() and actions()\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_one_parser_of_layer_lists_and_indexed_names():
    assert registry.parse_layer_ids("2_0_7") == [0, 2, 7]
    assert registry.parse_layer_ids("") == registry.parse_layer_ids(None) == []
    assert registry.format_layer_ids([2, 0, 2]) == "0_2"
    with pytest.raises(ValueError, match="adapter_layers"):
        registry.parse_layer_ids("0-2")
    with pytest.raises(ValueError, match="negative"):
        registry.parse_layer_ids("-1")
    assert registry.parse_layer_ids("0_x_-1_3", strict=False) == [0, 3]  # what a reader tolerates
    assert registry.split_component_name("encoderblock_11") == ("encoderblock", 11)
    assert registry.split_component_name("posembed_input") == ("posembed_input", None)
    assert registry.kind_of("residual_adapter_4").name == "residual_adapter"
    for bad in ("encoderblock", "head_1", "nothing_3", "encoderblock_x"):
        with pytest.raises(ValueError, match="unknown component name"):
            registry.kind_of(bad)


# ---- every kind -----------------------------------------------------------------------------------
# The single-path ViT's kinds; the multipath kinds (router, connector) have their own checks in
# tests/test_multipath.py.
SINGLE_KINDS = [k for k in registry.kinds() if k.method == "single"]


@pytest.mark.parametrize("kind", SINGLE_KINDS, ids=kind_ids(SINGLE_KINDS))
def test_every_kind_has_instances_shapes_matching_the_module_and_a_sane_init(kind):
    h = hparams()
    names = [n for n in component_names(h) if registry.kind_of(n) is kind]
    assert names, f"kind {kind.name} has no instance in the test model"
    assert kind.init is not None, f"kind {kind.name} has no registered init"
    model = PathModel(VIT, h, fresh_params(h), trainable=set(component_names(h)))
    for name in names:
        built = {t: tuple(p.shape) for t, p in model.component_module(name).named_parameters()}
        assert built == param_shapes(name, VIT, h), name
        first = init_component(name, VIT, h, torch.Generator().manual_seed(3))
        again = init_component(name, VIT, h, torch.Generator().manual_seed(3))
        assert {t: tuple(v.shape) for t, v in first.items()} == param_shapes(name, VIT, h)
        for t, v in first.items():
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), (name, t)
            assert torch.equal(v, again[t]), f"{name}.{t} init is not deterministic"
        assert registry.short_name(name) == short_component_name(name) != ""
        assert registry.slot(name) == kind.slot(registry.split_component_name(name)[1])
    assert kind.inherit in registry.INHERIT_RULES


def _module_flops(model: PathModel, x: torch.Tensor) -> tuple[dict[str, int], int]:
    """FLOPs per component, as torch's FlopCounterMode attributes them to our submodules."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    fqn = {id(m): f"PathModel.{n}" if n else "PathModel" for n, m in model.named_modules()}
    per = {name: sum(counts.get(fqn[id(model.component_module(name))], {}).values())
           for name in component_names(model.hparams)}
    return per, counter.get_total_flops()


@pytest.mark.parametrize("h", [hparams(), hparams(num_layers=0, ds_image_size=48, num_classes=10),
                               hparams(adapter_layers="1", adapter_dim=32, ds_image_size=64)])
def test_every_kinds_flops_sum_to_the_model_and_match_the_flop_counter(h):
    per_component = registry.component_flops(VIT, h)
    assert sum(per_component.values()) == count_flops(VIT, h) == registry.model_flops(VIT, h)
    x = torch.rand(1, 3, h["ds_image_size"], h["ds_image_size"], generator=torch.Generator().manual_seed(0))
    measured, total = _module_flops(PathModel(VIT, h, fresh_params(h), ()), x)
    assert total == count_flops(VIT, h)
    # the stem's tensors (cls, posemb) have no own call: everything the stem computes is the conv
    assert measured == per_component


def test_root_component_names_come_from_the_in_root_kinds():
    names = root_component_names(VIT)
    assert names == ["cls", "embedding", "posembed_input", "encoderblock_0", "encoderblock_1",
                     "encoderblock_2", "encoder_norm"]
    assert all(registry.kind_of(n).in_root for n in names)
    assert {k.name for k in registry.kinds() if not k.in_root} >= {"head", "residual_adapter"}


# ---- every action ---------------------------------------------------------------------------------

def make_root(preset) -> ModelPath:
    h = preset.default_hparams(None)
    h.update(num_layers=3, ds_image_size=SIZE)
    comps = {n: Component(n, "root", i, p, stored=True)
             for i, (n, p) in enumerate(root_random(VIT, h, 0).items())}
    return ModelPath("root:m0", "root", "root", h, comps, stored=True)


class Lineage:
    """Builds children the way an agent does, over an in-memory lineage."""

    def __init__(self, preset, root: ModelPath):
        self.preset, self.root = preset, root
        self.paths = {root.id: root}
        self.counter = iter(range(10_000))

    def ancestors(self, p):
        while p is not None:
            yield p
            p = self.paths.get(p.parent_id)

    def build(self, parent: ModelPath, *, seed: int, task: str = "t", child_id: str = f"{AGENT}:m1",
              ds_from: ModelPath | None = None) -> ModelPath:
        mut = Mutator(self.preset, VIT, random.Random(seed), torch.Generator().manual_seed(seed))
        ds, fired = mut.sample_ds_hparams(ds_from, 5)
        if ds_from is None:
            ds["ds_image_size"] = SIZE
        child = mut.build_child(parent, ds, agent_id=AGENT, task=task, child_id=child_id,
                                next_component_id=lambda: next(self.counter), ancestors=self.ancestors,
                                is_frozen=lambda c: c.stored,
                                root_posemb=self.root.components["posembed_input"].params["pos_embedding"],
                                device=torch.device("cpu"))
        child.mutations = fired + child.mutations
        return child

    def keep(self, child: ModelPath) -> ModelPath:
        for c in child.components.values():
            c.stored = True  # published: frozen from now on
        child.stored = True
        self.paths[child.id] = child
        return child


def quiet(h: dict) -> None:
    """Every action's probability to 0 (and µ itself), so only the action under test fires."""
    for k in list(h):
        if k.startswith("_mu_|"):
            h[k] = 0.0
    h["_mu_"] = 0.0


@pytest.fixture(scope="module")
def grown():
    """root -> p1 (task t, adapter at 1, image size 16): every component of p1 is published (frozen)."""
    preset = resolve_preset("test")
    root = make_root(preset)
    line = Lineage(preset, root)
    quiet(root.hparams)
    root.hparams["_mu_|add:residual_adapter_1"] = 1.0
    first = line.keep(line.build(root, seed=0, child_id=f"{AGENT}:m0"))
    quiet(root.hparams)
    assert first.hparams["adapter_layers"] == "1"
    return preset, line, first


def snapshot(paths) -> dict:
    return {(id(c), k): t.clone() for p in paths for c in p.components.values() if c.stored
            for k, t in c.params.items()}


def check_child(line: Lineage, parent: ModelPath, child: ModelPath, before: dict) -> None:
    """Invariants every child keeps, whatever fired."""
    lineage = list(line.ancestors(parent))
    assert list(child.components) == component_names(child.hparams)
    for name, c in child.components.items():
        kind = registry.kind_of(name)
        assert c.name == name and c.shapes() == param_shapes(name, VIT, child.hparams), name
        eligible = [a for a in lineage if kind.inherit != registry.INHERIT_FRESH
                    and (kind.inherit != registry.INHERIT_TASK or a.task == child.task)]
        holders = [a.components[name] for a in eligible if name in a.components]
        if any(c is h for h in holders):  # shared by reference: only frozen, never an always-cloned kind
            assert c.stored and not kind.always_clone, name
            assert f"clone:{name}" not in child.mutations
        elif c.cloned_from is not None:  # a private copy of an eligible ancestor's component
            source = next(h for h in holders if h.key == c.cloned_from)
            assert c.owner == AGENT and not c.stored
            assert all(torch.equal(c.params[k], source.params[k]) for k in c.params)
            assert all(c.params[k].data_ptr() != source.params[k].data_ptr() for k in c.params)
            if source.stored and not kind.always_clone:
                assert f"clone:{name}" in child.mutations, name
        else:  # fresh: nothing compatible to inherit
            assert c.owner == AGENT and not c.stored
            assert not [h for h in holders if h.shapes() == c.shapes()], name
            assert (f"new:{name}" in child.mutations) == kind.log_new, name
    for action in child.mutations:
        assert registry.action_for(action) is not None, f"unregistered action {action}"
    for (cid, k), t in before.items():  # frozen tensors untouched
        match = [c for p in [*lineage] for c in p.components.values() if id(c) == cid]
        assert not match or torch.equal(match[0].params[k], t)


def _decided_actions():
    """The single-path Mutator's decided actions (the multipath ones: tests/test_multipath.py)."""
    return [a for a in registry.actions() if a.scope != registry.SCOPE_LOG
            and a not in registry.MULTIPATH_HPARAM_ACTIONS]


@pytest.mark.parametrize("action", _decided_actions(), ids=[a.name for a in _decided_actions()])
def test_every_action_fires_and_the_child_keeps_the_invariants(grown, action):
    preset, line, parent = grown
    ranges = preset.ranges()
    instances = action.instances(parent.hparams, ranges)
    assert instances, f"{action.name} has nothing to act on in the test lineage"
    for instance in instances:
        h = parent.hparams
        quiet(h)
        h["_mu_|" + instance] = 1.0
        before = snapshot(line.paths.values())
        forced = registry.is_forced(instance)
        for seed in range(30):  # an hp step can land on the same value (grid end): try again
            generation = action.scope == registry.SCOPE_GENERATION
            child = line.build(parent, seed=seed, ds_from=parent if generation else None)
            check_child(line, parent, child, before)
            if instance in child.mutations:
                break
            if forced:  # decided without a draw and not logged: the copy is the evidence
                target = instance.partition(":")[2]
                assert child.components[target].cloned_from == parent.components[target].key
                break
        else:
            pytest.fail(f"{instance} never fired")
        assert registry.action_for(instance) is action
        if action.family == "add":
            name = instance.partition(":")[2]
            assert name in child.components and not child.components[name].stored
            listed = registry.layer_ids(child.hparams, registry.kind_of(name).layers_hparam)
            assert registry.split_component_name(name)[1] in listed
        if action.family == "hp":
            key = instance.partition(":")[2]
            assert child.hparams[key] != parent.hparams[key] and child.hparams[key] in ranges[key]
    quiet(parent.hparams)


@pytest.mark.parametrize("kind", SINGLE_KINDS, ids=kind_ids(SINGLE_KINDS))
def test_every_kind_is_fresh_when_no_ancestor_has_it(grown, kind):
    preset, line, parent = grown
    names = [n for n in component_names(parent.hparams) if registry.kind_of(n) is kind]
    orphan = ModelPath(f"{AGENT}:m7", AGENT, "t", dict(parent.hparams),
                       {n: c for n, c in parent.components.items() if n not in names},
                       parent_id=None, stored=True)
    quiet(orphan.hparams)
    child = line.build(orphan, seed=1)
    for name in names:
        c = child.components[name]
        assert c.owner == AGENT and c.cloned_from is None and c.shapes() == param_shapes(name, VIT, child.hparams)
        assert (f"new:{name}" in child.mutations) == kind.log_new


def test_a_head_is_never_inherited_from_another_task(grown):
    preset, line, parent = grown
    quiet(parent.hparams)
    parent.hparams["_mu_|clone:head"] = 1.0  # even a clone that would fire for the same task
    child = line.build(parent, seed=2, task="u")
    assert "new:head" in child.mutations and child.components["head"].cloned_from is None
    check_child(line, parent, child, snapshot(line.paths.values()))
    quiet(parent.hparams)


def test_report_families_cover_every_action(grown):
    preset, line, parent = grown
    ranges = preset.ranges()
    from agents.multipath import MULTIPATH_DEFAULTS, MULTIPATH_RANGES
    multipath = {**MULTIPATH_DEFAULTS, "num_paths": 3, "num_classes": 10}
    for action in registry.actions():
        instances = action.instances(parent.hparams, ranges) or action.instances(hparams(), ranges) \
            or action.instances(multipath, MULTIPATH_RANGES)
        assert instances, action.name
        for instance in instances:
            assert registry.action_for(instance) is action
            family = action_family(instance)
            assert family == (instance if action.family == "hp" else action.name)
            assert registry.action_label(family), family
    assert action_family("clone:gone_3") == "clone:gone"  # unregistered (older store): still grouped


# ---- a new kind, registered here only -----------------------------------------------------------

class Connector(nn.Module):
    """x + W x + b: a trainable bridge (identity while W and b are zero, its initial state)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


@pytest.fixture
def bridge():
    kind = registry.register_kind(registry.ComponentKind(
        "bridge", lambda cfg, h: {"proj.weight": (cfg.hidden, cfg.hidden), "proj.bias": (cfg.hidden,)},
        lambda cfg, h: 2 * registry.tokens(cfg, h) * cfg.hidden * cfg.hidden,
        stage=registry.STAGE_LAYER, rank=2, indexed=True, layers_hparam="bridge_layers",
        in_root=False, addable=lambda preset: True, log_new=False, label="bridge",
        description="trainable bridge"))
    registry.register_init("bridge")(
        lambda cfg, h, gen: {t: torch.zeros(s) for t, s in kind.shapes(cfg, h).items()})
    registry.register_module("bridge")(lambda cfg, h: Connector(cfg.hidden))
    yield kind
    registry.unregister_kind("bridge")
    assert "bridge_1" not in component_names(hparams(bridge_layers="1"))
    assert registry.action_for("add:bridge_1") is None


def test_a_new_kind_is_built_scored_stored_and_reported_with_no_change_to_the_store(bridge, tmp_path):
    assert component_names(hparams(adapter_layers="", bridge_layers="1_5"))[3:7] == [
        "encoderblock_0", "encoderblock_1", "bridge_1", "encoderblock_2"]
    preset = resolve_preset("test@base")  # no auto-tune: the stored probabilities hold
    root = make_root(preset)
    line = Lineage(preset, root)
    quiet(root.hparams)
    parent = line.keep(line.build(root, seed=0, child_id=f"{AGENT}:m0"))
    assert "bridge_layers" in parent.hparams and "bridge_1" not in parent.components
    quiet(parent.hparams)
    parent.hparams["_mu_|add:bridge_1"] = 1.0
    child = line.build(parent, seed=1, child_id=f"{AGENT}:m1")
    # mutation: the add action fired, the hparam lists it, the fresh component is trainable
    assert "add:bridge_1" in child.mutations and child.hparams["bridge_layers"] == "1"
    assert child.components["bridge_1"].owner == AGENT and not child.components["bridge_1"].stored
    check_child(line, parent, child, snapshot(line.paths.values()))
    # the model runs it at its slot (identity at insertion: same outputs as the parent)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    params = lambda p: {n: c.params for n, c in p.components.items()}  # noqa: E731
    model = PathModel(VIT, child.hparams, params(child), trainable={"bridge_1", "head"})
    assert model.frozen_prefix == ("cls", "embedding", "posembed_input", "encoderblock_0", "encoderblock_1")
    with torch.no_grad():
        assert torch.equal(model(x), PathModel(VIT, parent.hparams, params(parent), ())(x))
    # scoring prices it: its params and FLOPs are in the size terms
    terms = Scorer(preset, VIT).size_terms(child, {})
    d, t = VIT.hidden, 1 + (SIZE // VIT.patch) ** 2
    assert terms["flops"] == count_flops(VIT, parent.hparams) + 2 * t * d * d
    assert terms["params"] == sum(c.num_params() for c in parent.components.values()) + d * d + d

    # the store: commit root, parent and child as an agent does, read the child back, report on it
    with Store.open(tmp_path / "store", create=True) as st:
        st.ensure_root(ModelRecord(id=root.id, task="root", agent="root",
                                   components=[c.key for c in root.components.values()],
                                   hparams=root.hparams, metrics={}, parent=None, preset=preset.name,
                                   preset_hash=preset.hash, created_at=time.time()),
                       [component_write(c) for c in root.components.values()])
        token = st.acquire_lease(AGENT, "t", ttl=60, host="localhost", pid=os.getpid(), device="cpu",
                                 endpoint="tcp://127.0.0.1:1", preset=preset.name)
        for p, n in ((parent, 0), (child, 1)):
            p.metrics.update(quality=0.5 + n / 10, score=0.5 + n / 10)
            new = [component_write(c) for c in p.components.values() if c.owner == AGENT
                   and (p is parent or c is not parent.components.get(c.name))]
            trial = TrialRecord(id=f"{AGENT}:t{n}", agent=AGENT, task="t", cycle=1, generation=n,
                                parent=p.parent_id, model_id=p.id, mutations=list(p.mutations),
                                hparams_diff={}, quality=0.5 + n / 10, score=0.5 + n / 10, accepted=True,
                                seconds=0.1, train_images=32, preset=preset.name,
                                preset_hash=preset.hash, created_at=time.time())
            st.commit(AGENT, token, components=new, models=[model_record(p)], publish=publication(p),
                      trials=[trial])
        view = SystemView(st, "reader", torch.device("cpu"))
        view.refresh()
        back = view.published["t"]
        assert back.id == child.id and list(back.components) == component_names(back.hparams)
        assert torch.equal(back.components["bridge_1"].params["proj.weight"],
                           child.components["bridge_1"].params["proj.weight"])
        report = build_report(st)
    names = [c["name"] for c in report["sharing"]["components"]]
    assert names.index("encoderblock_1") < names.index("bridge_1") < names.index("encoderblock_2")
    rows = {a["action"]: a for a in report["actions"]}
    assert rows["add:bridge"]["children"] == 1 and rows["add:bridge"]["label"] == "insert a trainable bridge"
    assert short_component_name("bridge_1") == "bridge 1"
