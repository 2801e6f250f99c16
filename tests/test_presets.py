"""Presets resolve and hash deterministically; an agent re-attached with an extended preset resumes
from its task's published model and records the new preset on everything it trains."""
from __future__ import annotations

import pytest
from helpers.swarm import make_store, read, start

from agents.agent import agent_id_for
from agents.config import EXTENSIONS, PresetError, resolve_preset


def test_presets_resolve_and_hash_deterministically():
    a, b = resolve_preset("demo"), resolve_preset("demo")
    assert a.hash == b.hash and len(a.hash) == 12
    # the default: µ2Net+ as published plus +continue, +hurdle and +honest (the measured winners,
    # README "Presets")
    assert a.extensions == ("autotune", "adapters", "layers", "imagesize", "continue", "hurdle", "honest")
    assert resolve_preset("demo@base+autotune+adapters+layers+imagesize").extensions == (
        "autotune", "adapters", "layers", "imagesize")
    base = resolve_preset("demo@base")
    assert base.extensions == () and base.ranges() == {} and not base.mutate_adapters
    # extensions are a set: order of writing does not change the method or its hash
    assert (resolve_preset("demo@base+adapters+autotune").hash ==
            resolve_preset("demo@base+autotune+adapters").hash)
    hashes = {resolve_preset(n).hash for n in
              ["demo", "demo@base", "demo+penalty", "test", "vit-t3", "demo@base+autotune"]}
    assert len(hashes) == 6
    pen = resolve_preset("demo+penalty")
    assert pen.scale_factor < 1.0 and resolve_preset("demo").scale_factor == 1.0
    assert "num_layers" in a.ranges() and "num_layers" not in resolve_preset("demo@base+autotune").ranges()
    assert resolve_preset("vit-t3").budget.batch_size == 512  # the reference's budget, unchanged
    assert set(EXTENSIONS) >= set(pen.extensions)
    d = pen.to_dict()
    assert d["hash"] == pen.hash and d["extensions"] == list(pen.extensions)
    for bad in ["huge", "demo+turbo", "demo@bse", ""]:
        with pytest.raises(PresetError):
            resolve_preset(bad)


def test_reattached_with_an_extended_preset_resumes_from_the_published_model(tmp_path):
    store = str(tmp_path / "store")
    make_store(store)
    aid = agent_id_for("uci_digits")
    common = ["--store", store, "--task", "uci_digits", "--threads", "1", "--seed", "0"]
    first = start("attach.py", *common, "--preset", "test", "--cycles", "1", log=str(tmp_path / "1.log"))
    assert first.wait(180) == 0, open(tmp_path / "1.log").read()[-2000:]
    m1 = read(store, lambda s: s.get_task("uci_digits").model_id)
    after_first = read(store, lambda s: s.get_agent_state(aid))
    # where the extension will start: cycle 2 (index 1) at its first generation, its published model
    # as the whole population
    assert (after_first.cycle, after_first.generation) == (1, 0)
    assert after_first.population == [m1] and after_first.best_model_id == m1
    first_trials = read(store, lambda s: s.trials(agent=aid))

    second = start("attach.py", *common, "--preset", "test+penalty", "--cycles", "3",
                   log=str(tmp_path / "2.log"))
    assert second.wait(240) == 0, open(tmp_path / "2.log").read()[-2000:]
    ext = resolve_preset("test+penalty")
    trials = read(store, lambda s: s.trials(agent=aid))
    old = [t for t in trials if t.cycle == 0]
    new = [t for t in trials if t.cycle >= 1]
    assert {t.preset for t in old} == {"test"} and len(new) == 4
    assert sorted(old, key=lambda t: t.id) == sorted(first_trials, key=lambda t: t.id)
    assert {(t.preset, t.preset_hash) for t in new} == {("test+penalty", ext.hash)}
    # it resumed at cycle 2, generation 1: the old cycle's trials untouched, the new ones exactly the
    # generations still to do, numbered on from the stored counter
    assert sorted((t.cycle, t.generation) for t in new) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(int(t.id.rpartition(":m")[2]) >= after_first.next_model_id for t in new)
    # it continued from its published model: that is its population when the extension starts, and
    # the extension's children are built on it (the uniform fallback may also pick the root: method)
    assert m1 in [t.parent for t in new], [t.parent for t in new]
    models = read(store, lambda s: {m.id: m for m in s.models(agent=aid)})
    assert {models[t.model_id].preset for t in new if t.model_id} <= {"test+penalty"}
    assert read(store, lambda s: s.get_agent_state(aid)).cycle == 3
    assert read(store, lambda s: s.verify()) == []


def test_an_attached_agent_records_the_preset_hash_the_launcher_records():
    """attach.py builds AgentOptions without --root; run_swarm.py resolves the preset with root=None:
    both must be the same preset (one entry per preset in the report, not two)."""
    from agents.agent import Agent, AgentOptions

    for name in ("demo", "cpu", "test", "demo+penalty"):
        attached = Agent(AgentOptions(store="unused", task="uci_digits", preset=name))
        assert attached.preset.hash == resolve_preset(name, root=None).hash, name
