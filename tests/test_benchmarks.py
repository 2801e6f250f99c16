"""Smoke test of the benchmark harnesses: their smallest modes run for real (a real swarm in a
subprocess, real training, a real store and bus) and write complete, finite results."""
from __future__ import annotations

import json
import math

import pytest
from helpers.swarm import run_cli

PERF_RATIOS = ("train_vs_bare_loop", "top_only_vs_full_step_speed", "store_load_vs_torch_load_speed",
               "two_agents_vs_one_throughput", "store_bytes_vs_checkpoints")
METHODS = ("swarm", "finetune-all", "adapters", "joint")
METHOD_KEYS = ("mean_test_accuracy", "total_params", "params_per_task", "mean_flops_per_image",
               "train_images", "wall_seconds")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_perf_smoke_writes_every_ratio(tmp_path):
    proc = run_cli("benchmarks/perf.py", "--smoke", "--out", str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "perf.json").read_text())
    for key in PERF_RATIOS:
        assert _finite_positive(result["ratios"][key]), (key, result["ratios"])
    assert _finite_positive(result["latency_ms"]["publish_to_peer_refresh_median"])
    assert result["latency"]["view_saw_the_published_model"] is True
    # a child that trains only its top layers must do less work per step than full fine-tuning
    assert result["ratios"]["top_only_vs_full_step_speed"] > 1.0
    # two tasks share the root: the store keeps less than two standalone checkpoints would
    assert result["ratios"]["store_bytes_vs_checkpoints"] < 1.0
    assert "store_load_vs_torch_load_speed" in (tmp_path / "perf.md").read_text()


@pytest.mark.slow
def test_quality_smoke_writes_every_method(tmp_path):
    proc = run_cli("benchmarks/quality.py", "--smoke", "--validation-examples", "128", "--out",
                   str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    tasks = result["tasks"]
    assert set(result["methods"]) == set(METHODS)
    assert result["comparisons"] == ["images", "flops"]
    assert result["budget"]["validation_examples"] == 128
    assert result["budget"]["swarm_validation_examples"] == 256  # the test preset's: the swarm's own
    budget = result["budget"]["train_images_per_task"]
    assert set(budget) == set(tasks) and all(v > 0 for v in budget.values())
    for name, m in result["methods"].items():
        for key in METHOD_KEYS:
            assert _finite_positive(m[key]), (name, key, m.get(key))
        assert set(m["per_task"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 and math.isfinite(a) for a in m["per_task"].values())
        # compute-matched: every method saw exactly the swarm's training images per task
        assert m["per_task_train_images"] == budget, name
        # train FLOPs: everything counted, per task and in all
        assert m["train_flops"] == sum(m["per_task_train_flops"].values()) == m["flops"]["total"]
        for t in tasks:
            tally = m["per_task_flops_tally"][t]
            assert tally["total"] == tally["train"] + tally["validation"] + tally["cache_fill"] > 0
        # selection noise: best validation minus test accuracy
        gaps = result["val_test_gap"][name]
        for t in tasks:
            assert gaps[t] == pytest.approx(m["per_task_best_val_accuracy"][t] - m["per_task"][t])
        assert result["val_test_gap_mean"][name] == pytest.approx(sum(gaps.values()) / len(tasks))
    sw, ft = result["methods"]["swarm"], result["methods"]["finetune-all"]
    assert ft["total_params"] == 2 * ft["params_per_task"]
    assert sw["total_params"] < ft["total_params"]  # the swarm shares root components
    # the harness re-evaluates each published model on the test split: it matches what the agent stored
    for t in tasks:
        assert sw["per_task"][t] == pytest.approx(sw["per_task_test_accuracy_recorded_by_agent"][t])
    # equal FLOPs: each baseline gets the swarm's recorded FLOPs per task (joint: their sum), spends
    # all but less than one step plus one validation of it, and never more
    flops_budget = result["budget"]["train_flops_per_task"]
    assert flops_budget == sw["per_task_train_flops"] and sw["train_flops"] == sum(flops_budget.values())
    eq = result["equal_flops"]
    assert set(eq["methods"]) == set(METHODS) and eq["flops_budget_per_task"] == flops_budget
    assert eq["methods"]["swarm"]["train_flops"] == sw["train_flops"]
    for name, m in eq["methods"].items():
        assert _finite_positive(m["mean_test_accuracy"]) and _finite_positive(m["train_images"])
        assert set(m["per_task"]) == set(tasks)
        assert set(eq["val_test_gap"][name]) == set(tasks)
        if name == "swarm":
            continue
        assert m["per_task_flops_budget"] == flops_budget
        steps, tallies = m["per_task_steps"], m["per_task_flops_tally"]
        if name == "joint":
            step = sum(tallies[t]["train"] for t in tasks) / steps[tasks[0]]
            val = sum(tallies[t]["validation"] for t in tasks) / m["per_task_validations"][tasks[0]]
            left = sum(flops_budget.values()) - m["train_flops"]
            assert 0 <= left < step + val + step / len(tasks), name  # a step's mix varies by an image
            continue
        for t in tasks:
            step = tallies[t]["train"] / steps[t]
            val = tallies[t]["validation"] / m["per_task_validations"][t]
            assert 0 <= flops_budget[t] - m["per_task_train_flops"][t] < step + val, (name, t)
    text = (tmp_path / "quality.md").read_text()
    assert "| swarm |" in text and "Equal training FLOPs" in text and "Selection noise" in text


@pytest.mark.parametrize("flag", ["--methods", "--comparisons"])
def test_quality_rejects_unknown_method(tmp_path, flag):
    proc = run_cli("benchmarks/quality.py", "--smoke", flag, "images,nope" if flag == "--comparisons"
                   else "swarm,nope", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr
    assert not (tmp_path / "quality.json").exists()


# ---- the baselines' FLOPs ----------------------------------------------------------------------

def test_steps_for_flops_is_the_most_a_budget_buys():
    from benchmarks.baselines import flops_of_steps, steps_for_flops

    for step, val, every in ((7, 5, 3), (10, 0, 1), (3, 40, 4)):
        costs = [flops_of_steps(s, step, val, every) for s in range(60)]
        for budget in range(0, 160):
            steps = steps_for_flops(budget, step, val, every)
            brute = max(s for s, c in enumerate(costs) if c <= budget)
            assert steps == brute, (budget, step, val, every)
            assert budget - flops_of_steps(steps, step, val, every) < step + val


@pytest.fixture(scope="module")
def small_setup(tmp_path_factory):
    """The `test` preset's random root (as a swarm would create it) and two small real tasks; one
    torch thread while they train (tiny matmuls: more threads only spin on a shared machine)."""
    import torch

    from agents.training import TaskTensors
    from benchmarks import common
    from store import Store
    from taskdata import load_task

    path = str(tmp_path_factory.mktemp("baselines") / "store")
    common.ensure_store_with_root(path, "test", 0)
    preset, vit = common.vit_for("test")
    with Store.open(path, readonly=True) as st:
        root = common.load_root(st).root
    tasks = {t: TaskTensors(load_task(t), torch.device("cpu"), 128) for t in ("uci_digits", "mnist5k")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root, vit, preset, tasks
    torch.set_num_threads(threads)


def test_baselines_count_flops_like_the_swarm_and_spend_a_flops_budget(small_setup):
    """Counting: what agents.training.train_child tallies for the same child. Equal FLOPs: the same
    loop as train_child (a budget of exactly what the images run cost reproduces it bit for bit),
    never over the budget and less than one step plus one validation under it; cheaper images buy
    more of them."""
    import math

    from agents import compute
    from agents.training import train_child
    from agents.vit import component_names
    from benchmarks import baselines as B

    root, vit, preset, tasks = small_setup
    uci = {"uci_digits": tasks["uci_digits"]}
    bs, n_val = preset.budget.batch_size, 128
    sbv = preset.steps_between_validations(uci["uci_digits"].n_train)
    quiet = lambda _: None  # noqa: E731
    ft = B.run_finetune_all(root, vit, preset, uci, {"uci_digits": 2 * sbv * bs}, 0, log=quiet)
    a = ft.per_task["uci_digits"]
    h = B.task_hparams(preset, vit, uci["uci_digits"].num_classes)
    everything = compute.train_flops_per_image(vit, h, component_names(h))
    assert a.flops == compute.FlopsTally(train=2 * sbv * bs * everything,
                                         validation=2 * n_val * compute.forward_flops(vit, h)).to_dict()
    assert a.train_flops == a.flops["total"] == ft.train_flops and a.flops_budget is None
    # the agents' own loop counts the same FLOPs for the same child
    gen = B.task_generator(0, "finetune-all", "uci_digits")
    child = B.build_path(root, vit, h, clone=set(component_names(h)), agent="bench~finetune-all",
                         task="uci_digits", gen=gen)
    result, _ = train_child(child, vit, uci["uci_digits"], batch_size=bs, steps_between_validations=sbv,
                            validations=2, threshold=-math.inf, score_of=float, gen=gen)
    assert result.flops.to_dict() == a.flops and result.quality == a.best_val_accuracy

    same = B.run_finetune_all(root, vit, preset, uci, None, 0, log=quiet,
                              flops_budget={"uci_digits": a.train_flops}).per_task["uci_digits"]
    assert (same.test_accuracy, same.best_val_accuracy, same.train_images, same.steps, same.flops) == \
        (a.test_accuracy, a.best_val_accuracy, a.train_images, a.steps, a.flops)
    assert same.flops_budget == a.train_flops

    budget = a.train_flops
    ad = B.run_adapters(root, vit, preset, uci, None, 0, log=quiet,
                        flops_budget={"uci_digits": budget}).per_task["uci_digits"]
    step = ad.flops["train"] // ad.steps
    val = ad.flops["validation"] // ad.validations
    assert step == bs * compute.train_flops_per_image(
        vit, {**h, "adapter_layers": "0_1_2", "adapter_dim": 32},
        {"residual_adapter_0", "residual_adapter_1", "residual_adapter_2", "encoder_norm", "head"})
    assert 0 <= budget - ad.train_flops < step + val
    assert ad.validations == -(-ad.steps // sbv) and ad.train_images > a.train_images

    both = {"uci_digits": budget // 2, "mnist5k": budget // 2}
    joint = B.run_joint(root, vit, preset, tasks, None, 0, log=quiet, flops_budget=both)
    steps = joint.per_task["uci_digits"].steps
    step = sum(o.flops["train"] for o in joint.per_task.values()) / steps
    val = sum(o.flops["validation"] for o in joint.per_task.values()) / joint.per_task["mnist5k"].validations
    assert 0 <= sum(both.values()) - joint.train_flops < step + val + everything * len(tasks)
    assert sum(o.train_images for o in joint.per_task.values()) == steps * bs
    assert all(o.train_images > 0 and o.flops_budget == budget // 2 for o in joint.per_task.values())


@pytest.mark.slow
def test_multipath_benchmark_smoke_writes_every_result_key(tmp_path):
    """benchmarks/multipath.py on a tiny grown store: the control run, the multipath run, the result
    keys the issue names, and the speed measurement."""
    base = str(tmp_path / "base")
    r = run_cli("launch/run_swarm.py", "--store", base, "--tasks", "uci_digits,glyphs_greek", "--preset",
                "test", "--cycles", "1", "--refresh", "0.5", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    r = run_cli("benchmarks/multipath.py", "--base", base, "--work", str(tmp_path / "work"), "--preset",
                "test", "--speed-task", "uci_digits", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "multipath.json").read_text())
    for task in ("uci_digits", "glyphs_greek"):
        row = res["tasks"][task]
        for key in ("single_path", "control", "multipath", "best"):
            assert 0.0 <= row[key] <= 1.0, (task, key)
        # the served model is the better validation score of the two kinds
        assert row["best"] in (row["single_path"], row["multipath"])
        assert set(res["router_weights"][task]) and all(0 < w < 1 for w in res["router_weights"][task].values())
    assert set(res["mean"]) >= {"single_path", "control", "best"}
    assert _finite_positive(res["speed"]["multipath_vs_top_block_per_image"])
    assert res["spent"]["multipath"]["children"] > 0 and res["spent"]["control"]["children"] > 0
    assert "router weight per borrowed task" in (out / "multipath.md").read_text()
