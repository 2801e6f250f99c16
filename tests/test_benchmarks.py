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
    proc = run_cli("benchmarks/quality.py", "--smoke", "--out", str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    tasks = result["tasks"]
    assert set(result["methods"]) == set(METHODS)
    budget = result["budget"]["train_images_per_task"]
    assert set(budget) == set(tasks) and all(v > 0 for v in budget.values())
    for name, m in result["methods"].items():
        for key in METHOD_KEYS:
            assert _finite_positive(m[key]), (name, key, m.get(key))
        assert set(m["per_task"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 and math.isfinite(a) for a in m["per_task"].values())
        # compute-matched: every method saw exactly the swarm's training images per task
        assert m["per_task_train_images"] == budget, name
    sw, ft = result["methods"]["swarm"], result["methods"]["finetune-all"]
    assert ft["total_params"] == 2 * ft["params_per_task"]
    assert sw["total_params"] < ft["total_params"]  # the swarm shares root components
    # the harness re-evaluates each published model on the test split: it matches what the agent stored
    for t in tasks:
        assert sw["per_task"][t] == pytest.approx(sw["per_task_test_accuracy_recorded_by_agent"][t])
    assert "| swarm |" in (tmp_path / "quality.md").read_text()


def test_quality_rejects_unknown_method(tmp_path):
    proc = run_cli("benchmarks/quality.py", "--smoke", "--methods", "swarm,nope", "--out", str(tmp_path),
                   timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr
    assert not (tmp_path / "quality.json").exists()
