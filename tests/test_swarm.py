"""The swarm as users run it: real agent processes, real ZeroMQ, one real store.

- three agents on three real tasks finish well under a minute; every task published; verify clean;
- a fourth agent attached while they run joins, hears their announcements and publishes;
- an exported model predicts exactly like the store's, and its test accuracy is the recorded one;
- a task attached later starts from another task's published model and reuses its components.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import time

import numpy as np
import pytest
from helpers.swarm import make_store, read, run_cli, start, wait_for

from agents.agent import agent_id_for
from taskdata import load_task

TASKS = ["uci_digits", "mnist5k", "glyphs_latin"]


def digits_copy(path: str) -> str:
    """The UCI digits as a user's npz task (another task name, same kind of data)."""
    d = load_task("uci_digits")
    np.savez(path, x_train=d.train_x, y_train=d.train_y, x_val=d.val_x, y_val=d.val_y,
             x_test=d.test_x, y_test=d.test_y)
    return f"npz:{path}"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarm")
    store = str(tmp / "store")
    fourth = digits_copy(str(tmp / "digits_copy.npz"))
    t0 = time.time()
    launcher = start("run_swarm.py", "--store", store, "--tasks", ",".join(TASKS), "--preset", "test",
                     "--cycles", "3", log=str(tmp / "swarm.log"))
    attached = None
    try:
        # attach a fourth agent once the swarm has published something
        wait_for(lambda: read(store, lambda s: len(s.tasks()) >= 1) if os.path.exists(store) else 0,
                 90, "the swarm's first publish")
        attached = start("attach.py", "--store", store, "--task", fourth, "--preset", "test",
                         "--cycles", "2", "--threads", "1", log=str(tmp / "attach.log"))
        live_agents = run_cli("launch/query.py", "--store", store, "agents", "--json")  # while they run
        code = launcher.wait(240)
        swarm_seconds = time.time() - t0
        attach_code = attached.wait(240)
    finally:
        for p in (launcher, attached):
            if p is not None and p.poll() is None:
                p.kill()
    return {"store": store, "code": code, "seconds": swarm_seconds, "attach_code": attach_code,
            "live_agents": live_agents,
            "fourth": fourth, "tmp": tmp, "log": open(tmp / "swarm.log").read()}


def test_three_agents_finish_publish_and_verify(swarm):
    assert swarm["code"] == 0, swarm["log"][-3000:]
    assert swarm["seconds"] < 60 * 2.5, swarm["seconds"]  # 'well under a minute' alone; CI shares cores
    published = read(swarm["store"], lambda s: s.published_models())
    assert set(TASKS) <= set(published)
    for t in TASKS:
        st = read(swarm["store"], lambda s: s.get_agent_state(agent_id_for(t)))
        assert st.cycle == 3
        assert published[t].metrics["test_quality"] is not None
    assert read(swarm["store"], lambda s: s.verify()) == []
    table = swarm["log"][swarm["log"].rindex("task "):]  # the final leaderboard
    for t in TASKS:
        assert f"\n{t} " in table


def test_attached_agent_joins_hears_announcements_and_publishes(swarm):
    assert swarm["attach_code"] == 0, open(swarm["tmp"] / "attach.log").read()[-3000:]
    aid = agent_id_for(swarm["fourth"])
    rec = read(swarm["store"], lambda s: s.get_agent(aid))
    assert rec.state == "finished"
    assert rec.progress.get("announcements", 0) >= 1  # it heard the others' publishes over ZeroMQ
    assert rec.progress.get("refresh_latencies_ms")
    assert read(swarm["store"], lambda s: s.get_task(swarm["fourth"])) is not None


def test_leaderboard_json_has_the_contract_keys(swarm):
    r = run_cli("launch/query.py", "--store", swarm["store"], "leaderboard", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    keys = {"task", "model_id", "agent_id", "score", "quality", "test_quality", "params",
            "accounted_params", "flops", "num_layers", "adapter_layers", "image_size", "cycles",
            "parent_id", "updated_at"}
    assert {row["task"] for row in rows} >= set(TASKS)
    for row in rows:
        assert keys <= set(row)
        assert 0.0 <= row["test_quality"] <= 1.0 and row["params"] > 0 and row["flops"] > 0


def test_export_predicts_like_the_store_and_matches_test_quality(swarm, tmp_path):
    from agents.api import load_exported, load_model

    out = str(tmp_path / "uci.safetensors")
    r = run_cli("launch/query.py", "--store", swarm["store"], "export", "uci_digits", "--out", out)
    assert r.returncode == 0, r.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask  # what any new file gets, not 0600
    from_store = load_model(swarm["store"], "uci_digits")
    from_file = load_exported(out)
    data = load_task("uci_digits")
    a, b = from_store.logits(data.test_x), from_file.logits(data.test_x)
    assert np.array_equal(a.numpy(), b.numpy())
    acc = float((from_file.predict(data.test_x) == data.test_y).mean())
    assert acc == pytest.approx(from_store.metrics["test_quality"], abs=1e-9)
    bad = run_cli("launch/query.py", "--store", swarm["store"], "export", "no_such_task", "--out", out)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def _first_trial(store: str, task: str, seed: int, log: str):
    """Attach a new agent for ``task`` with ``seed``; return it (still running) and its first trial."""
    aid = agent_id_for(task)
    proc = start("attach.py", "--store", store, "--task", task, "--preset", "test", "--cycles", "1",
                 "--seed", str(seed), "--threads", "2", log=log)
    trials = wait_for(lambda: read(store, lambda s: s.trials(agent=aid)) or proc.poll() is not None,
                      120, f"the first child of seed {seed}")
    assert trials is not True, open(log).read()[-2000:]  # it exited before training a child
    return proc, min(trials, key=lambda t: (t.cycle, t.generation))


def _outcome(t) -> tuple:
    """What a trial record says was decided and measured (its id and timing aside)."""
    return (t.cycle, t.generation, t.parent, t.model_id, t.mutations, t.hparams_diff, t.accepted,
            t.train_images, t.preset_hash)


def test_a_new_task_starts_from_another_tasks_model_and_shares_its_components(tmp_path):
    base = str(tmp_path / "base")
    make_store(base)
    first = start("attach.py", "--store", base, "--task", "uci_digits", "--preset", "test",
                  "--cycles", "3", "--threads", "2", log=str(tmp_path / "a.log"))
    assert first.wait(180) == 0, open(tmp_path / "a.log").read()[-2000:]
    donor = read(base, lambda s: s.get_task("uci_digits").model_id)
    task = digits_copy(str(tmp_path / "copy.npz"))
    aid = agent_id_for(task)
    # A new agent's first parent is drawn uniformly from the system's published models (docs/method.md
    # 3.2): here the donor or the root. Find a seed whose first child the donor parents by running
    # the agent on copies of the same store and reading its first trial (the outcome), not by
    # re-deriving the agent's random draws.
    for seed in range(8):
        store = str(tmp_path / f"try{seed}")
        shutil.copytree(base, store)
        second, first_trial = _first_trial(store, task, seed, str(tmp_path / f"b{seed}.log"))
        if first_trial.parent == donor:
            break
        second.kill()
        second.wait()
    else:
        raise AssertionError("no seed in 0..7 gave the donor as the first parent")
    assert first_trial.parent in {donor, read(base, lambda s: s.root_model_id())}
    assert second.wait(180) == 0, open(tmp_path / f"b{seed}.log").read()[-2000:]
    # The same seed on another copy of the same store makes the same first child: choices are a
    # function of (seed, agent, cycle, generation) and the store, which is what resume relies on.
    again_store = str(tmp_path / "again")
    shutil.copytree(base, again_store)
    again, again_trial = _first_trial(again_store, task, seed, str(tmp_path / "again.log"))
    again.kill()
    again.wait()
    assert _outcome(again_trial) == _outcome(first_trial)
    assert again_trial.quality == pytest.approx(first_trial.quality, abs=1e-6)

    model = read(store, lambda s: s.get_model(s.get_task(task).model_id))
    creators = read(store, lambda s: {s.get_component(c).agent for c in model.components})
    donor_agent = agent_id_for("uci_digits")
    lineage_has_donor = False
    m = model
    while m is not None:
        lineage_has_donor |= m.id == donor
        m = read(store, lambda s: s.get_model(m.parent)) if m.parent else None
    assert lineage_has_donor, "the new task's model does not descend from the other task's model"
    donor_rec = read(store, lambda s: s.get_model(donor))
    donor_made = read(store, lambda s: [c for c in donor_rec.components
                                        if s.get_component(c).agent == donor_agent])
    # every donor-made component is either shared by reference (frozen) or was cloned by the
    # new agent; the shared ones are the cross-task reuse the method exists for
    shared = set(model.components) & set(donor_made)
    assert donor_agent in creators and shared, (creators, donor_made)
    assert read(store, lambda s: s.verify()) == []


def test_agents_view_live_and_after_the_swarm(swarm):
    live = swarm["live_agents"]
    assert live.returncode == 0, live.stderr
    rows = {r["task"]: r for r in json.loads(live.stdout)}
    assert set(TASKS) <= set(rows)
    running = [r for r in rows.values() if r["state"] == "running"]
    assert running and all(r["pid"] > 0 and r["lease_expires_in_s"] > 0 and r["device"] == "cpu"
                           for r in running)
    after = {r["task"]: r for r in json.loads(run_cli("launch/query.py", "--store", swarm["store"],
                                                      "agents", "--json").stdout)}
    for t in TASKS:
        assert after[t]["state"] == "finished" and after[t]["cycle"] == 3 and after[t]["preset"] == "test"
        trials = json.loads(run_cli("launch/query.py", "--store", swarm["store"], "trials", t,
                                    "--json").stdout)
        # test preset: 2 children's images per cycle; +hurdle (default) may buy more children with
        # the images it saves by stopping some early
        assert len(trials) == after[t]["children"] >= 3 * 2
        assert len({(tr["cycle"], tr["generation"]) for tr in trials}) == len(trials)
        assert sum(tr["accepted"] for tr in trials) == after[t]["accepted"]


def test_attach_to_a_task_that_is_done_says_so(swarm):
    r = run_cli("launch/attach.py", "--store", swarm["store"], "--task", "uci_digits", "--preset", "test",
                "--cycles", "3")
    assert r.returncode == 0
    assert r.stderr.strip() == ("attach.py: task uci_digits is already at cycle 3 of 3; nothing to do "
                                "(raise --cycles above 3 to continue it)")


def test_export_timm_format_loads_into_timms_own_model(swarm, tmp_path):
    import safetensors.torch
    import timm
    import torch
    from safetensors import safe_open

    from agents.api import load_model

    # A store grown by the base method alone never has adapters (they can only be inherited from a
    # parent that has them): its model is timm-compatible for sure.
    base_store = str(tmp_path / "base_store")
    r = run_cli("launch/run_swarm.py", "--store", base_store, "--tasks", "uci_digits", "--preset",
                "test@base", "--cycles", "1", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [dict(r, store=swarm["store"]) for r in json.loads(
        run_cli("launch/query.py", "--store", swarm["store"], "leaderboard", "--json").stdout)]
    rows += [dict(r, store=base_store) for r in json.loads(
        run_cli("launch/query.py", "--store", base_store, "leaderboard", "--json").stdout)]
    plain = [r for r in rows if not r["adapter_layers"]]
    with_adapters = [r for r in rows if r["adapter_layers"]]
    assert base_store in {r["store"] for r in plain}
    for row in plain:
        out = str(tmp_path / f"{len(os.listdir(tmp_path))}.safetensors")
        r = run_cli("launch/query.py", "--store", row["store"], "export", row["task"], "--out", out,
                    "--format", "timm")
        assert r.returncode == 0, r.stderr
        assert "timm.create_model('vit_tiny_patch16_224'" in r.stdout and "act_layer='gelu_tanh'" in r.stdout
        with safe_open(out, "pt") as f:
            args = json.loads(f.metadata()["timm_create_model"])
        name = args.pop("model_name")
        model = timm.create_model(name, **args).eval()
        model.load_state_dict(safetensors.torch.load_file(out))  # strict: every key is timm's own
        ours = load_model(row["store"], row["task"])
        x = (np.random.default_rng(0).random((16, 28, 28)) * 255).astype(np.uint8)
        xt = torch.nn.functional.interpolate(torch.from_numpy(x).float()[:, None].repeat(1, 3, 1, 1),
                                             size=(args["img_size"],) * 2, mode="bilinear",
                                             align_corners=False) / 127.5 - 1
        with torch.no_grad():
            assert torch.allclose(model(xt), ours.module(xt), atol=1e-5)
            assert np.array_equal(model(xt).argmax(-1).numpy(), ours.predict(x))
    for row in with_adapters:
        r = run_cli("launch/query.py", "--store", row["store"], "export", row["task"], "--out",
                    str(tmp_path / "x.safetensors"), "--format", "timm")
        assert r.returncode == 2 and "residual adapters" in r.stderr and not (tmp_path / "x.safetensors").exists()
