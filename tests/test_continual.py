"""The continual benchmark (benchmarks/continual.py): its metrics, the swarm's zero forgetting pinned
on a real store, and its CLI (results, bad input)."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest
from helpers.swarm import run_cli

from benchmarks import continual

KEYS = {"final_mean_accuracy", "bwt", "forgetting", "cumulative_train_flops", "total_params", "matrix",
        "wall_s"}


# ---- metrics --------------------------------------------------------------------------------------

HAND = [[0.9],
        [0.7, 0.8],
        [0.6, 0.85, 0.5]]


def test_metrics_on_a_hand_made_matrix():
    assert continual.final_mean_accuracy(HAND) == pytest.approx((0.6 + 0.85 + 0.5) / 3)
    # BWT: task 1 fell 0.9 -> 0.6, task 2 rose 0.8 -> 0.85
    assert continual.backward_transfer(HAND) == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)
    # forgetting: from the best before the last arrival (0.9 for task 1, 0.8 for task 2) to the last
    assert continual.forgetting(HAND) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.85)) / 2)
    assert continual.mean_accuracy_curve(HAND) == pytest.approx([0.9, 0.75, 1.95 / 3])
    # the best of task 1 need not be right after it arrived
    peak = [[0.5], [0.9, 0.7], [0.6, 0.7, 0.8]]
    assert continual.forgetting(peak) == pytest.approx(((0.9 - 0.6) + 0.0) / 2)
    assert continual.backward_transfer(peak) == pytest.approx(((0.6 - 0.5) + 0.0) / 2)
    # nothing changes: exactly zero, not merely close
    still = [[0.25], [0.25, 0.5], [0.25, 0.5, 0.75]]
    assert continual.backward_transfer(still) == 0.0 and continual.forgetting(still) == 0.0
    # one task: nothing earlier to transfer to or forget
    assert continual.backward_transfer([[0.4]]) == 0.0 and continual.forgetting([[0.4]]) == 0.0
    assert continual.final_mean_accuracy([[0.4]]) == 0.4
    with pytest.raises(ValueError):
        continual.backward_transfer([[0.9], [0.8]])        # row 1 must have two entries
    with pytest.raises(ValueError):
        continual.final_mean_accuracy([])


def test_summary_orders_and_chart():
    s = continual.summarize(HAND, 10, 20, 1.5)
    assert set(s) == KEYS and s["matrix"] == HAND
    other = continual.summarize([[0.5], [0.5, 0.6], [0.4, 0.5, 0.6]], 30, 40, 2.5)
    mean = continual.mean_over_orders([s, other])
    assert set(mean) == KEYS
    assert mean["matrix"][2] == pytest.approx([0.5, 0.675, 0.55])
    assert mean["cumulative_train_flops"] == 20 and mean["total_params"] == 30
    assert mean["bwt"] == pytest.approx((s["bwt"] + other["bwt"]) / 2)
    tasks = ["a", "b", "c", "d", "e"]
    assert continual.arrival_order(tasks, None) == tasks
    assert continual.arrival_order(tasks, 3) == continual.arrival_order(tasks, 3)
    assert sorted(continual.arrival_order(tasks, 3)) == tasks
    svg = continual.svg_chart({"swarm": [0.9, 0.8], "sequential": [0.85, 0.6]})
    root = ET.fromstring(svg)                       # a well-formed standalone SVG file
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.count("<polyline") == 2 and "sequential" in svg


# ---- the baselines on a FLOPs budget -------------------------------------------------------------

def test_baselines_spend_each_arrivals_budget(tmp_path):
    """Every baseline in-process on two arrivals with a small budget: never over it, and its
    bookkeeping (matrix shape, parameters) as the protocol says."""
    import agents  # noqa: F401
    from benchmarks import common
    from store import Store

    common.ensure_store_with_root(str(tmp_path / "store"), "test", 0)
    with Store.open(str(tmp_path / "store"), readonly=True) as store:
        root = common.load_root(store).root
    preset, vit = common.vit_for("test")
    tensors = continual._load_tensors(["uci_digits", "mnist5k"], preset)
    budgets = [12 * 10**9, 15 * 10**9]
    runs = {m: continual.run_baseline(m, root, vit, preset, tensors, budgets, 0, log=lambda _: None)
            for m in continual.BASELINES}
    for name, r in runs.items():
        assert [len(row) for row in r["matrix"]] == [1, 2], name
        assert all(0.5 < s / b <= 1.0 for s, b in zip(r["per_arrival_flops"], budgets)), (name, r)
        assert r["cumulative_train_flops"] == sum(r["per_arrival_flops"])
    for name in ("independent", "adapters"):
        assert runs[name]["matrix"][1][0] == runs[name]["matrix"][0][0] and runs[name]["bwt"] == 0.0
    shared = runs["sequential"]["total_params"]
    assert all(runs[m]["total_params"] == shared for m in ("sequential-replay", "joint-warm"))
    assert shared < runs["adapters"]["total_params"] < runs["independent"]["total_params"]


# ---- the swarm never forgets ----------------------------------------------------------------------

def test_swarm_zero_forgetting_bit_identical(tmp_path):
    """Two arrivals on one live store (the test preset, one cycle each): the first task's served model
    gives bit-identical test logits before and after the second task's agent ran, so BWT is 0.0."""
    import torch

    import agents  # noqa: F401
    from agents.api import load_model
    from agents.config import resolve_preset
    from store import Store

    order = ["uci_digits", "mnist5k"]
    preset = resolve_preset("test")
    tensors = continual._load_tensors(order, preset)
    seen: list[dict] = []

    def snapshot(t, task):
        out = {}
        for j in order[:t + 1]:
            m = load_model(str(tmp_path / "store"), j)
            out[j] = (m.model_id, m.logits(tensors[j].test_x))
        seen.append(out)

    res = continual.run_swarm_arrivals(str(tmp_path / "store"), order, "test", cycles=1, seed=0,
                                       root=None, threads=2, tensors=tensors, log_dir=str(tmp_path),
                                       on_arrival=snapshot)
    before, after = seen[0]["uci_digits"], seen[1]["uci_digits"]
    assert before[0] == after[0]                      # the same model is served...
    assert torch.equal(before[1], after[1])           # ...with the same logits, bit for bit
    assert res["bwt"] == 0.0 and res["forgetting"] == 0.0
    assert res["matrix"][1][0] == res["matrix"][0][0]
    digests = res["logits_sha256"]
    assert digests[0]["uci_digits"] == digests[1]["uci_digits"] == continual.logits_digest(after[1])
    # the second agent really ran on the live store, and it is what the budget was read from
    with Store.open(str(tmp_path / "store"), readonly=True) as store:
        assert {t.task for t in store.trials()} == set(order)
    assert all(f > 0 for f in res["per_arrival_flops"])
    assert res["total_params"] > 0 and res["cumulative_train_flops"] == sum(res["per_arrival_flops"])


# ---- the CLI --------------------------------------------------------------------------------------

def _check_result(result: dict, methods: set[str], n: int) -> None:
    assert set(result) == {"order", "methods"}
    assert len(result["order"]) == n
    assert set(result["methods"]) == methods
    for name, m in result["methods"].items():
        assert set(m) == KEYS, name
        assert [len(row) for row in m["matrix"]] == list(range(1, n + 1)), name
        assert all(0.0 <= a <= 1.0 for row in m["matrix"] for a in row), name
        assert m["cumulative_train_flops"] > 0 and m["total_params"] > 0 and m["wall_s"] > 0, name
        for key in ("final_mean_accuracy", "bwt", "forgetting"):
            assert math.isfinite(m[key]), (name, key)


def test_cli_baselines_only_writes_results(tmp_path):
    """Without the swarm the budget is analytic: the smallest CLI run (one method, one process)."""
    out = tmp_path / "out"
    proc = run_cli("benchmarks/continual.py", "--smoke", "--methods", "sequential", "--no-parallel",
                   "--out", str(out), "--work", str(tmp_path / "work"), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "continual.json").read_text())
    _check_result(result, {"sequential"}, 2)
    assert result["methods"]["sequential"]["forgetting"] >= 0.0
    detail = json.loads((out / "continual-detail.json").read_text())["orders"][0]
    assert detail["budget_source"] == "analytic"
    spent = detail["methods"]["sequential"]["per_arrival_flops"]
    assert all(0.9 < s / b["flops"] <= 1.0 for s, b in zip(spent, detail["arrival_budget"]))
    assert "| sequential |" in (out / "continual.md").read_text()
    ET.fromstring((out / "continual.svg").read_text())
    assert "[continual" in proc.stderr and "[continual" not in proc.stdout  # progress on stderr


@pytest.mark.slow
def test_cli_smoke_writes_every_method(tmp_path):
    proc = run_cli("benchmarks/continual.py", "--smoke", "--out", str(tmp_path), timeout=420)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "continual.json").read_text())
    _check_result(result, set(continual.ALL_METHODS), 2)
    m = result["methods"]
    assert m["swarm"]["bwt"] == 0.0 and m["swarm"]["forgetting"] == 0.0
    assert m["sequential"]["forgetting"] >= 0.0
    for name in ("independent", "adapters"):          # their models never change either
        assert m[name]["bwt"] == 0.0 and m[name]["forgetting"] == 0.0, name
    assert m["swarm"]["total_params"] < m["independent"]["total_params"]   # tasks share the root
    detail = json.loads((tmp_path / "continual-detail.json").read_text())["orders"][0]
    budgets = [b["flops"] for b in detail["arrival_budget"]]
    assert detail["budget_source"] == "swarm" and all(b > 0 for b in budgets)
    for name in continual.BASELINES:       # the swarm's FLOPs at every arrival: never more, and
        spent = detail["methods"][name]["per_arrival_flops"]   # less than a step + a validation less
        assert all(0.9 < s / b <= 1.0 for s, b in zip(spent, budgets)), (name, spent, budgets)
    ET.fromstring((tmp_path / "continual.svg").read_text())


def test_cli_rejects_bad_input(tmp_path):
    for args in (["--methods", "swarm,nope"], ["--tasks", "nope"], ["--orders", "0,x"], ["--cycles", "0"]):
        proc = run_cli("benchmarks/continual.py", "--smoke", *args, "--out", str(tmp_path), timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("continual.py: error:"), args
    assert not (tmp_path / "continual.json").exists()
