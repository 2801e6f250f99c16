"""The lazy system view (issue 18, item 4): an agent's memory follows what it trains, not the system.

Real LMDB stores, real views, a real in-process agent. ``CountingStore`` is the real ``Store`` with
its read calls counted (nothing is replaced). The other tasks' models are written through the store
API by benchmarks/scale.py's filler (``preset test`` shapes), so the benchmark's store is the one
these tests pin.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import subprocess
import sys
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch

import agents  # noqa: F401  (torchvision fix before timm)
from agents import generation as step
from agents.agent import Agent, AgentOptions, generation_rng
from agents.bootstrap import ensure_root
from agents.config import resolve_preset
from agents.paths import copy_component
from agents.scoring import accounted_params
from agents.view import SystemView, from_raw
from agents.vit import preset_vit
from benchmarks.scale import Weights, agent_of, publish_task
from store import Store

REPO = Path(__file__).resolve().parent.parent
TASK = "uci_digits"
CPU = torch.device("cpu")
OTHERS = 4


class CountingStore(Store):
    """The real store; every read the view makes is counted (per method, and momentum reads)."""

    def _count(self, what: str) -> None:
        self.__dict__.setdefault("calls", Counter())[what] += 1

    def get_model(self, model_id):
        self._count("get_model")
        return super().get_model(model_id)

    def get_component(self, component_id):
        self._count("get_component")
        return super().get_component(component_id)

    def tensor_shapes(self, component_id):
        self._count("tensor_shapes")
        return super().tensor_shapes(component_id)

    def published_models(self, kind=None):
        self._count("published_models")
        return super().published_models(kind)

    def load_component_tensors(self, component_id, momentum=True):
        self._count("load_component_tensors")
        if momentum:
            self._count("momentum")
        return super().load_component_tensors(component_id, momentum=momentum)

    def reads(self) -> Counter:
        return Counter(self.__dict__.get("calls", Counter()))

    def reset(self) -> None:
        self.__dict__["calls"] = Counter()


def grow(st: Store, preset_name: str = "test", others: int = OTHERS) -> None:
    """The root plus ``others`` published tasks: 1-2 cloned blocks each (bf16 momentum), their own
    norm and head, and one block shared with the previous task."""
    preset = resolve_preset(preset_name)
    vit = preset_vit(preset)
    ensure_root(st, preset, vit, seed=0)
    w, rng, prev = Weights(seed=1), random.Random(1), {}
    for i in range(1, others + 1):
        cloned = sorted(rng.sample(range(vit.depth), 1 + i % 2))
        shared = {n: k for n, k in prev.items() if int(n.rsplit("_", 1)[1]) not in cloned}
        prev = publish_task(st, preset, vit, w, i, cloned, dict(list(shared.items())[:1]))


@pytest.fixture()
def store(tmp_path):
    st = CountingStore.open(str(tmp_path / "store"), create=True)
    grow(st)
    st.reset()
    yield st
    st.close()


def test_a_refresh_reads_records_and_no_tensors(store):
    view = SystemView(store, "reader", CPU)
    view.refresh()
    reads = store.reads()
    assert reads["load_component_tensors"] == 0 and reads["tensor_shapes"] == 0
    assert view.loaded() == [] and view.loaded_bytes() == 0
    assert len(view.published) == OTHERS and view.root is not None
    # lockers from records: every published model's components, by the agents that publish them
    for p in view.published.values():
        for key in store.get_model(p.id).components:
            assert p.agent in view.lockers[key]
    assert all("root" in view.lockers[k] for k in store.get_model(view.root.id).components)
    # scoring needs shapes only: no tensor is read
    counted = {}
    for task, p in view.published.items():
        loaded = [store.load_component_tensors(c.key, momentum=False)[0] for c in p.ordered()]
        counted[task] = sum(math.prod(raw.shape) for d in loaded for raw in d.values())
    store.reset()
    for task, p in view.published.items():
        assert sum(c.num_params() for c in p.components.values()) == counted[task]
        assert accounted_params(p, view.lockers) > 0
    assert store.reads()["load_component_tensors"] == 0
    assert view.loaded() == []


def test_tensors_load_on_first_use_and_momentum_only_for_a_clone(store):
    view = SystemView(store, "reader", CPU)
    view.refresh()
    task, _ = agent_of(1)
    parent = view.published[task]
    own = [c for c in parent.ordered() if c.owner == parent.agent]
    comp = next(c for c in own if c.name.startswith("encoderblock_"))
    assert not comp.loaded
    weights = comp.params
    assert comp.loaded and store.reads()["load_component_tensors"] == 1 and store.reads()["momentum"] == 0
    assert comp.params is weights  # cached: a second use reads nothing
    assert store.reads()["load_component_tensors"] == 1
    stored, _ = store.load_component_tensors(comp.key, momentum=False)
    for name, raw in stored.items():
        assert torch.equal(weights[name], from_raw(raw, CPU, torch.float32))
    store.reset()
    clone = copy_component(comp, "reader", 0)  # a clone reads the stored (bfloat16) momentum
    assert store.reads()["momentum"] == 1
    _, mom = Store.load_component_tensors(store, comp.key)
    assert set(clone.momentum) == set(mom)
    for name, raw in mom.items():
        assert raw.dtype == "bfloat16"
        assert torch.equal(clone.momentum[name], from_raw(raw, CPU, torch.float32))
    assert clone.cloned_from == comp.key and clone.loaded
    assert not comp.momentum_loaded  # the frozen original does not keep the optimizer state
    store.reset()
    fresh = copy_component(comp, "reader", 1, momentum=False)  # multipath: no optimizer state
    assert fresh.momentum is None and store.reads()["momentum"] == 0


def test_prune_lets_go_of_what_no_live_path_uses(store):
    view = SystemView(store, "reader", CPU)
    view.refresh()
    paths = [view.root, *view.published.values()]
    for p in paths:
        view.materialize(p)
    keep = view.published[agent_of(1)[0]]
    other = next(c for p in paths for c in p.components.values()
                 if c.key not in {k.key for k in keep.components.values()})
    ref = weakref.ref(other.params[next(iter(other.params))])
    values = {k: v.clone() for k, v in other.params.items()}
    total = view.loaded_bytes()
    view.prune([keep])
    gc.collect()
    assert ref() is None, "a released tensor is still alive"
    assert {c.key for c in view.loaded()} == {c.key for c in keep.components.values()}
    kept_bytes = sum(v.numel() * v.element_size() for c in keep.components.values()
                     for v in c.params.values())
    assert view.loaded_bytes() == kept_bytes < total
    assert not other.loaded and other.num_params() == sum(v.numel() for v in values.values())
    store.reset()
    for k, v in other.params.items():  # used again: read again, the same values
        assert torch.equal(v, values[k])
    assert store.reads()["load_component_tensors"] == 1


def test_a_refresh_after_one_publish_reads_only_the_new_records(store):
    view = SystemView(store, "reader", CPU)
    view.refresh()
    store.reset()
    view.refresh()  # nothing moved: the pointers and the root id, no record
    reads = store.reads()
    assert reads["get_model"] == reads["get_component"] == reads["published_models"] == 0
    preset = resolve_preset("test")
    vit = preset_vit(preset)
    task, agent = agent_of(2)
    publish_task(store, preset, vit, Weights(seed=9), 2, cloned=[0], shared={}, seq=1)
    new = store.get_model(f"{agent}:m1")
    unseen = [k for k in new.components if k.split(":")[0] == agent]
    store.reset()
    view.refresh()
    reads = store.reads()
    assert reads["get_model"] == 1 and reads["get_component"] == len(unseen) == 3  # block, norm, head
    assert reads["load_component_tensors"] == reads["tensor_shapes"] == 0
    assert view.published[task].id == new.id
    for key in new.components:
        assert agent in view.lockers[key]


def _agent(path: str, st: Store, preset: str) -> Agent:
    agent = Agent(AgentOptions(store=path, task=TASK, preset=preset, seed=0, threads=1,
                               lease_ttl=30.0, heartbeat_every=30.0), store=st)
    agent.verbose = False
    agent._open()
    agent.view.refresh()
    return agent


def _full_view(st: Store, agent_id: str) -> SystemView:
    """What the eager view held: every published model and the root, params and momentum."""
    view = SystemView(st, agent_id, CPU)
    view.refresh()
    for p in [view.root, *view.published.values()]:
        for c in p.components.values():
            c.params, c.momentum  # noqa: B018 (loads)
    return view


def _summary(p: step.Proposal) -> dict:
    child = p.child
    return {"parent": p.parent.id, "mutations": list(child.mutations), "hparams": dict(child.hparams),
            "components": [(c.name, c.key, c.cloned_from, c.stored) for c in child.ordered()],
            "threshold": p.threshold, "schedule": p.schedule, "score": p.score_of(0.5),
            "counters": dataclasses.asdict(p.counters)}


@pytest.mark.parametrize("preset", ["test", "test+probe"])
def test_the_same_proposals_as_with_everything_in_memory(tmp_path, preset):
    """Same seeds, same choices: parents, mutations, clones, ids, thresholds and child tensors."""
    path = str(tmp_path / "store")
    with CountingStore.open(path, create=True) as st:
        grow(st, preset)
        agent = _agent(path, st, preset)
        try:
            lazy_ctx = agent.ctx
            full_ctx = dataclasses.replace(agent.ctx, view=_full_view(st, agent.agent_id), probe_cache={})
            seen_parents = set()
            for generation in range(8):
                out = []
                for ctx in (full_ctx, lazy_ctx):
                    rng, gen = generation_rng(0, agent.agent_id, 0, generation)
                    counters = step.Counters(0, generation, 0, 0, {}, 0)
                    out.append(step.propose(ctx, counters, [], rng, gen))
                full, lazy = out
                assert _summary(lazy) == _summary(full)
                for c_full, c_lazy in zip(full.child.ordered(), lazy.child.ordered()):
                    for k, v in c_full.params.items():
                        assert torch.equal(v, c_lazy.params[k]), (generation, c_full.name, k)
                    if c_full.momentum is not None or c_lazy.momentum is not None:
                        for k, v in c_full.momentum.items():
                            assert torch.equal(v, c_lazy.momentum[k])
                seen_parents.add(lazy.parent.id)
                lazy_ctx.view.prune([])
            if preset == "test":  # (+probe picks the root's features here every time)
                assert len(seen_parents) > 1, "the seeds should reach more than one parent"
            else:
                assert "select:probe" in lazy.child.mutations and len(full_ctx.probe_cache) == OTHERS + 1
            assert lazy_ctx.view.loaded() == []
        finally:
            agent._close()


def test_an_agents_generations_load_only_what_they_use(tmp_path):
    """A real agent generation: its view never holds the models it did not build on."""
    path = str(tmp_path / "store")
    with CountingStore.open(path, create=True) as st:
        grow(st, "test", others=6)
        agent = _agent(path, st, "test")
        try:
            assert agent.view.loaded() == []
            for _ in range(3):
                st.reset()
                first_id = agent.state.next_component_id
                agent.run_generation()
                parent = agent.view.path(st.trials(agent=agent.agent_id)[-1].parent)
                lineage = {c.key for p in agent.view.ancestors(parent) for c in p.components.values()}
                root = {c.key for c in agent.view.root.components.values()}
                own = {c.key for p in agent.population for c in p.components.values()}
                assert {c.key for c in agent.view.loaded()} <= lineage | root | own
                # momentum: read for a clone of a stored component, never otherwise
                assert st.reads()["momentum"] <= agent.state.next_component_id - first_id
                agent.view.prune(agent.population)
                assert {c.key for c in agent.view.loaded()} <= own
        finally:
            agent._close()


@pytest.mark.slow
def test_the_scale_benchmark_runs_small(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--preset", "test", "--tasks", "5",
         "--small", "2", "--eager-at", "2", "--cloned-blocks", "1-2", "--publishes", "2",
         "--dir", str(tmp_path), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for n in ("2", "5"):
        for key in ("agent_peak_rss_bytes", "refresh_ms", "store_bytes", "verify_seconds"):
            assert r["tasks"][n][key] is not None and r["tasks"][n][key] > 0, (n, key)
        assert r["tasks"][n]["verify_problems"] == 0
    for key in ("refresh_after_publish_ms", "gc_seconds", "peak_ratio_124_over_8", "targets", "config"):
        assert r[key] is not None, key
    assert r["gc_counts"]["models"] == 4  # the models replaced by the timed publishes (eager, last)
    assert "peak_rss_bytes" in r["eager"]["2"], r["eager"]["2"]
    assert r["tasks"]["5"]["view"]["loads"]["params"] > 0
