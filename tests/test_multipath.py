"""Multipath agents (µ4Net): the model's gradients and routing, the agent's proposals, and the kind in
a real store, through real processes and the store service.

The grown store these tests start from is real: two tasks' single-path agents each ran one cycle of
the test preset in this process (module fixture), and each test works on its own copy.
"""
from __future__ import annotations

import json
import random
import shutil
import signal

import numpy as np
import pytest
import torch

from agents import multipath_generation as mg
from agents import registry
from agents.agent import Agent, AgentOptions, agent_id_for, run_agent
from agents.api import load_exported, load_model
from agents.generation import Counters
from agents.multipath import MULTIPATH_DEFAULTS, MultipathModel, router_bias
from agents.vit import PathModel, init_component, vit_config
from helpers.service_procs import start_service
from helpers.store_records import child_model, child_writes, lease, make_root, pub
from helpers.swarm import read, run_cli, start, wait_for
from store import LeaseHeld, MissingReference, ModelRecord, Store
from taskdata import load_task

TASK, OTHER = "uci_digits", "glyphs_greek"
VIT = vit_config("ti", depth=2)


def _opts(path: str, task: str, kind: str = "single", cycles: int = 1, **kw) -> AgentOptions:
    return AgentOptions(store=path, task=task, preset="test", cycles=cycles, threads=1, lease_ttl=30.0,
                        heartbeat_every=30.0, kind=kind, **kw)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A store where two tasks' single-path agents ran one cycle each."""
    path = str(tmp_path_factory.mktemp("grown") / "store")
    with Store.open(path, create=True) as st:
        for task in (TASK, OTHER):
            run_agent(_opts(path, task), verbose=False, store=st)
    return path


@pytest.fixture()
def store_path(grown, tmp_path):
    path = str(tmp_path / "store")
    shutil.copytree(grown, path)
    return path


# ---- the model ------------------------------------------------------------------------------------

def _paths(n: int, classes: int = 5, seed: int = 0) -> list[PathModel]:
    """n frozen random single-path models (the first with a head of ``classes``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        h = {"num_layers": 2, "num_classes": classes if k == 0 else 3, "ds_image_size": 16 + 16 * (k % 2),
             "adapter_layers": "", "adapter_dim": 8}
        params = {name: init_component(name, VIT, h, g) for name in registry.component_names(h)}
        # a trained-looking head (a fresh one is zero): the main path's logits vary across classes
        params["head"]["weight"] = torch.randn(params["head"]["weight"].shape, generator=g) * 0.5
        out.append(PathModel(VIT, h, params, trainable=()).eval())
    return out


def _model(n: int, classes: int = 5, lr_mult: float = 0.05, seed: int = 0) -> MultipathModel:
    h = {**MULTIPATH_DEFAULTS, "num_paths": n, "num_classes": classes, "router_lr_mult": lr_mult}
    g = torch.Generator().manual_seed(seed)
    params = {name: init_component(name, VIT, h, g) for name in registry.component_names(h)}
    return MultipathModel(h, _paths(n, classes, seed), params, trainable=True)


def _inputs(model: MultipathModel, batch: int = 6, seed: int = 1) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s: torch.rand(batch, 3, s, s, generator=g) * 2 - 1 for s in set(model.image_sizes)}


def test_router_and_connector_shapes_match_the_registry_and_start_at_the_reference_values():
    m = _model(3)
    h = m.hparams
    for name in registry.component_names(h):
        assert {t: tuple(p.shape) for (c, t), p in m.trainable_tensors().items() if c == name} \
            == registry.param_shapes(name, VIT, h)
    assert registry.component_names(h) == ["router", "connector_1", "connector_2"]
    assert router_bias(2) == pytest.approx([np.log(4), 0.0]) and router_bias(3) == pytest.approx([np.log(8), 0, 0])
    w = torch.softmax(torch.tensor(router_bias(3)), -1)
    assert w.tolist() == pytest.approx([0.8, 0.1, 0.1])


def test_a_fresh_multipath_model_predicts_exactly_what_its_main_path_predicts():
    m = _model(3)
    x = _inputs(m)
    main = m.paths[0](x[m.image_sizes[0]])
    out = m(x)
    assert torch.allclose(out, 0.8 * main, atol=1e-6)
    assert torch.equal(out.argmax(-1), main.argmax(-1))


def test_decoupled_gradients_connectors_see_the_plain_sum_the_router_the_detached_logits():
    m = _model(3, lr_mult=0.2, seed=3)
    with torch.no_grad():  # a non-trivial state: connectors and router away from their init
        for p in m.trainable_tensors().values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    outs = m.path_outputs(_inputs(m))
    g = torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    params = m.trainable_tensors()

    (m.combine(outs) * g).sum().backward()
    got = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None

    logits = [outs[0]] + [c(f) for c, f in zip(m.connectors, outs[1:])]
    (g * sum(logits)).sum().backward()          # connectors: the plain sum, weight 1
    for k, p in params.items():
        if k[0].startswith("connector_"):
            assert torch.allclose(got[k], p.grad, atol=1e-6), k
        p.grad = None
    w = torch.softmax(m.router_linear(m.router.norm(outs[0])), -1)
    stacked = torch.stack([lg.detach() for lg in logits], -1)
    (0.2 * (g * torch.einsum("bcp,bp->bc", stacked, w)).sum()).backward()  # router: scaled by lr_mult
    for k, p in params.items():
        if k[0] == "router":
            assert torch.allclose(got[k], p.grad, atol=1e-6), k
            assert p.grad.abs().sum() > 0
    with torch.no_grad():  # the forward value is the router-weighted sum
        assert torch.allclose(m.combine(outs), torch.einsum("bcp,bp->bc", torch.stack(logits, -1), w),
                              atol=1e-5)
    assert all(p.grad is None for pm in m.paths for p in pm.parameters())  # nothing reaches a path


def test_routing_is_per_sample():
    m = _model(2, seed=4)
    with torch.no_grad():
        m.router_linear.weight.copy_(torch.randn(m.router_linear.weight.shape,
                                                 generator=torch.Generator().manual_seed(5)))
    outs = m.path_outputs(_inputs(m, batch=8))
    w = m.route(outs[0])
    assert w.shape == (8, 2) and torch.allclose(w.sum(-1), torch.ones(8))
    assert (w[:, 0].max() - w[:, 0].min()) > 1e-3  # different samples, different weights
    for i in range(8):  # each sample's output uses its own weights
        li = [outs[0][i], m.connectors[0](outs[1][i])]
        assert torch.allclose(m.combine([o[i:i + 1] for o in outs])[0], w[i, 0] * li[0] + w[i, 1] * li[1],
                              atol=1e-5)


# ---- the agent ------------------------------------------------------------------------------------

def _mp_agent(path: str, store: Store, seed: int = 0) -> Agent:
    agent = Agent(_opts(path, TASK, kind="multipath", seed=seed), store=store)
    agent._open()
    agent.view.refresh()
    agent.population = [agent.view.path(m) for m in agent.state.population]
    return agent


def test_frozen_paths_are_bit_identical_after_training(store_path):
    with Store.open(store_path) as st:
        main = st.published_models(kind="single")[TASK]
        before = {cid: {k: bytes(v.data) for k, v in p.items()}
                  for cid, (p, _) in st.load_model_tensors(main.id).items()}
        agent = _mp_agent(store_path, st)
        try:
            verdict = agent.run_generation()
            assert verdict.accepted and verdict.published is not None
            child = verdict.published
            assert child.kind == "multipath" and child.refs[0] == main.id
            in_memory = {c.key: {k: v.detach().numpy().tobytes() for k, v in c.params.items()}
                         for c in agent.view.path(main.id).components.values()}
            # the model runs the view's tensors (shared memory, no copy) and none of them trains
            model = mg.build_model(agent.vit, child, [agent.view.path(r) for r in child.refs], True)
            for c in agent.view.path(main.id).components.values():
                for t, v in c.params.items():
                    mod = model.paths[0].component_module(c.name)
                    owner, _, leaf = t.rpartition(".")
                    used = getattr(mod.get_submodule(owner) if owner else mod, leaf)
                    assert used.data_ptr() == v.data_ptr() and not used.requires_grad, (c.name, t)
            assert not any(t.requires_grad for pm in model.paths for t in pm.parameters())
        finally:
            agent._close()
        after = {cid: {k: bytes(v.data) for k, v in p.items()}
                 for cid, (p, _) in st.load_model_tensors(main.id).items()}
        assert after == before and in_memory == before
        rec = st.get_model(child.id)
        assert rec.kind == "multipath" and rec.refs == child.refs
        assert [st.get_component(c).name for c in rec.components] == ["router", "connector_1"]
        assert st.get_task(TASK).model_id in (main.id, child.id)  # the better score serves
        assert st.verify() == []


def _child_of(agent: Agent, parent, seed: int):
    c = agent.state
    return mg.propose(agent.ctx, Counters(c.cycle, c.generation, c.next_model_id, c.next_component_id,
                                          {}), [parent], random.Random(seed),
                      torch.Generator().manual_seed(seed))


def test_num_paths_two_three_two_adds_and_drops_a_connector(store_path):
    with Store.open(store_path) as st:
        agent = _mp_agent(store_path, st)
        try:
            first = agent.run_generation().published
            assert first.hparams["num_paths"] == 2 and len(first.refs) == 2
            first.hparams.update({"_mu_": 0.0, "_mu_|hp:num_paths": 1.0})
            first.current_score = first.score
            up = next(p.child for s in range(40) if (p := _child_of(agent, first, s)).child.hparams["num_paths"] == 3)
            assert registry.component_names(up.hparams) == ["router", "connector_1", "connector_2"]
            assert up.refs[:2] == first.refs and len(up.refs) == 3
            assert len({agent.view.path(r).task for r in up.refs}) == 3  # distinct tasks (root too)
            assert up.components["connector_1"].cloned_from == first.components["connector_1"].key
            assert "new:connector_2" in up.mutations and "new:router" in up.mutations  # n changed
            assert "hp:num_paths" in up.mutations
            up.stored, up.metrics = True, {"score": 0.5, "quality": 0.5}
            for comp in up.components.values():
                comp.stored = True
            down = next(p.child for s in range(40) if (p := _child_of(agent, up, s)).child.hparams["num_paths"] == 2)
            assert registry.component_names(down.hparams) == ["router", "connector_1"]
            assert down.refs == up.refs[:2] and "connector_2" not in down.components
            assert down.components["connector_1"].cloned_from == up.components["connector_1"].key
        finally:
            agent._close()


def test_router_lr_mult_is_mutated_on_its_grid(store_path):
    with Store.open(store_path) as st:
        agent = _mp_agent(store_path, st)
        try:
            first = agent.run_generation().published
            first.hparams.update({"_mu_": 0.0, "_mu_|hp:router_lr_mult": 1.0})
            first.current_score = first.score
            seen = {_child_of(agent, first, s).child.hparams["router_lr_mult"] for s in range(12)}
            grid = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]
            i = grid.index(first.hparams["router_lr_mult"])
            assert seen <= {grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)], grid[i]} and len(seen) >= 2
        finally:
            agent._close()


def test_single_and_multipath_agents_of_a_task_hold_leases_side_by_side(store_path):
    with Store.open(store_path) as st:
        a = lease(st, agent_id_for(TASK), TASK)
        b = st.acquire_lease(agent_id_for(TASK, "multipath"), TASK, ttl=60, host="h", pid=1, device="cpu",
                             endpoint="", preset="test", kind="multipath")
        assert a and b
        with pytest.raises(LeaseHeld):  # but still one live agent per (task, kind)
            st.acquire_lease("multipath~second", TASK, ttl=60, host="h", pid=1, device="cpu",
                             endpoint="", preset="test", kind="multipath")


# ---- the store keeps pinned paths ----------------------------------------------------------------

def _pinned_store(path: str, with_multipath: bool) -> tuple[str, str]:
    """Agent a publishes X, then Y (not descended from X); a multipath model may pin X."""
    rng = np.random.default_rng(0)
    with Store.open(path, create=True) as st:
        root = make_root(st)
        tok = lease(st, "a", "t")
        wx = child_writes("a", 0, rng)
        x = child_model("a", "t", 0, wx, root, None, created_at=1.0)
        st.commit("a", tok, components=wx, models=[x], publish=pub(x))
        if with_multipath:
            mtok = st.acquire_lease("mp", "t", ttl=60, host="h", pid=1, device="cpu", endpoint="",
                                    preset="test", kind="multipath")
            mw = child_writes("mp", 0, rng)
            m = ModelRecord(id="mp:m0", task="t", agent="mp", components=[w.record.id for w in mw],
                            hparams={"num_classes": 3, "num_paths": 2}, metrics={"score": 0.1},
                            parent=x.id, preset="test", preset_hash="h0", created_at=1.0,
                            kind="multipath", refs=[x.id, root.id])
            st.commit("mp", mtok, components=mw, models=[m], publish=pub(m))
        wy = child_writes("a", 1, rng)
        y = child_model("a", "t", 1, wy, root, None, created_at=1.0)  # parent: the root, not X
        st.commit("a", tok, components=wy, models=[y], publish=pub(y))
        st.gc(grace_seconds=0)
        assert st.verify() == []
        return x.id, "mp:m0"


def test_a_pinned_path_survives_gc_after_its_owner_moved_on(tmp_path):
    x, _ = _pinned_store(str(tmp_path / "without"), with_multipath=False)
    with Store.open(str(tmp_path / "without"), readonly=True) as st:
        assert st.get_model(x) is None  # nothing else keeps X: gc takes it
    x, m = _pinned_store(str(tmp_path / "with"), with_multipath=True)
    with Store.open(str(tmp_path / "with"), readonly=True) as st:
        assert st.get_model(x) is not None and st.load_model_tensors(x)
        assert st.get_task("t").kind == "single"  # Y scores 0.501 > the multipath model's 0.1
        assert st.published_models(kind="multipath")["t"].refs[0] == x


def test_a_model_cannot_pin_a_model_the_store_does_not_have(tmp_path):
    with Store.open(str(tmp_path / "s"), create=True) as st:
        root = make_root(st)
        tok = st.acquire_lease("mp", "t", ttl=60, host="h", pid=1, device="cpu", endpoint="",
                               preset="test", kind="multipath")
        m = ModelRecord(id="mp:m0", task="t", agent="mp", components=[], hparams={"num_paths": 2},
                        metrics={}, parent=root.id, preset="test", preset_hash="h0", created_at=1.0,
                        kind="multipath", refs=["a:m9"])
        with pytest.raises(MissingReference, match="a:m9"):
            st.commit("mp", tok, models=[m])


# ---- processes: attach, kill -9 and resume, the service, the CLI ---------------------------------

def test_attach_refuses_a_multipath_agent_before_the_task_has_a_model(store_path):
    r = run_cli("launch/attach.py", "--store", store_path, "--task", "glyphs_latin", "--kind", "multipath",
                "--preset", "test")
    assert r.returncode == 2 and "no single-path model" in r.stderr and len(r.stderr.splitlines()) == 1


def test_multipath_agent_resumes_after_kill_9(store_path, tmp_path):
    aid = agent_id_for(TASK, "multipath")
    args = ("--store", store_path, "--task", TASK, "--kind", "multipath", "--preset", "test",
            "--cycles", "4", "--threads", "1", "--lease-ttl", "2")
    proc = start("attach.py", *args, log=str(tmp_path / "first.log"))
    wait_for(lambda: read(store_path, lambda s: len(s.trials(agent=aid)) >= 2), 90, "two multipath trials")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed_at = read(store_path, lambda s: len(s.trials(agent=aid)))
    r = run_cli("launch/attach.py", *args, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    trials = read(store_path, lambda s: s.trials(agent=aid))
    state = read(store_path, lambda s: s.get_agent_state(aid))
    assert state.cycle == 4 and len(trials) > killed_at
    assert len({t.id for t in trials}) == len(trials)
    assert sorted((t.cycle, t.generation) for t in trials) == \
        sorted({(t.cycle, t.generation) for t in trials})  # no generation written twice
    assert read(store_path, lambda s: s.verify()) == []


def test_multipath_agent_through_the_store_service_and_everything_a_user_reads(store_path, tmp_path):
    svc = start_service(store_path)
    try:
        r = run_cli("launch/attach.py", "--store", svc.endpoint, "--task", TASK, "--kind", "multipath",
                    "--preset", "test", "--cycles", "1", "--threads", "1", timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    finally:
        svc.kill()
    with Store.open(store_path, readonly=True) as st:
        mp = st.published_models(kind="multipath")[TASK]
        served = st.get_task(TASK)
        assert st.verify() == []
    # seeded: the multipath model's validation score beats the single-path one, so it serves the task
    assert served.kind == "multipath" and served.model_id == mp.id
    rows = {r["task"]: r for r in json.loads(run_cli(
        "launch/query.py", "--store", store_path, "leaderboard", "--json").stdout)}
    assert rows[TASK]["kind"] == served.kind and set(rows[TASK]["kinds"]) == {"single", "multipath"}
    assert rows[OTHER]["kind"] == "single"
    show = run_cli("launch/query.py", "--store", store_path, "show", TASK).stdout
    assert f"path_0  {mp.refs[0]}" in show and "<- serves" in show
    agents = run_cli("launch/query.py", "--store", store_path, "agents").stdout
    assert "multipath" in agents
    html = str(tmp_path / "report.html")
    assert run_cli("launch/query.py", "--store", store_path, "report", "--out", html).returncode == 0
    report = json.loads((tmp_path / "report.json").read_text())
    borrowed = [read(store_path, lambda s: s.get_model(r).task) for r in mp.refs[1:]]
    assert report["sharing"]["borrows"] == {TASK: borrowed}
    row = report["sharing"]["matrix"][report["sharing"]["tasks"].index(TASK)]
    runs = {c["id"] for c, used in zip(report["sharing"]["components"], row) if used}
    assert set(read(store_path, lambda s: s.get_model(mp.refs[1]).components)) <= runs  # borrowed path drawn
    actions = {a["action"] for a in report["actions"]}
    assert {"new:router", "new:connector"} <= actions
    # predict / export / load_exported / the timm refusal, on the multipath model itself
    data = load_task(TASK)
    m = load_model(store_path, TASK, model_id=mp.id)
    acc = float((m.predict(data.test_x) == data.test_y).mean())
    assert acc == pytest.approx(mp.metrics["test_quality"], abs=1e-6)  # float32 mean: < 1 sample
    assert (load_model(store_path, TASK).predict(data.test_x) == m.predict(data.test_x)).all()  # served
    out = str(tmp_path / "m.safetensors")
    assert run_cli("launch/query.py", "--store", store_path, "export", TASK, "--out", out).returncode == 0
    assert (load_exported(out).predict(data.test_x) == m.predict(data.test_x)).all()
    r = run_cli("launch/query.py", "--store", store_path, "export", TASK, "--out", out, "--format", "timm")
    assert r.returncode == 2 and "multipath" in r.stderr and len(r.stderr.splitlines()) == 1
