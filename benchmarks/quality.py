#!/usr/bin/env python3
"""Quality benchmark: the swarm vs three compute-matched baselines on the same tasks and root.

    python benchmarks/quality.py --quick            # 4 small tasks, `test` preset, a few minutes
    python benchmarks/quality.py                    # mccb-offline (8 tasks), `demo` preset
    python benchmarks/quality.py --smoke --out DIR  # the smallest run (the test suite's)

The swarm runs as users run it (``launch/run_swarm.py`` in a subprocess, agents in parallel). Each
task's training budget is then read from the store: the training images of every child that task's
agent trained (accepted or not). Each baseline (``benchmarks/baselines.py``) gets exactly that many
training images per task (``joint``: their sum), starts from the same root tensors (read from the
swarm's store), uses the same splits, the preset's default hparams, the same validation subset and
cadence, keeps its best validation checkpoint and is scored on the test split, which nothing
selects on. Results: ``OUT/quality.json`` and ``OUT/quality.md``.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import BenchmarkError, fmt, log, md_table

ALL_METHODS = ("swarm", "finetune-all", "adapters", "joint")
QUICK_TASKS = ("uci_digits", "mnist5k", "glyphs_latin", "glyphs_greek")
MODES = {  # mode -> (tasks, preset, cycles); None = the benchmark's tasks / the preset's cycles
    "smoke": (("uci_digits", "mnist5k"), "test", 1),
    "quick": (QUICK_TASKS, "test", 4),
    "full": (None, "cpu", None),
}


def _say(message: str) -> None:
    log("quality", message)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quality.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="4 small tasks, test preset, 4 cycles")
    size.add_argument("--smoke", action="store_true", help="2 tasks, test preset, 1 cycle (< 1 min)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (overrides the mode's)")
    p.add_argument("--preset", default=None, help="preset of the swarm and the baselines")
    p.add_argument("--cycles", type=int, default=None, help="swarm cycles per agent")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"subset of {','.join(ALL_METHODS)} (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None,
                   help="root of the swarm and every baseline (run_swarm.py --root; default: the "
                        "preset's, glyphs_cjk for the demo and cpu budgets)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads for the baselines (default 2: the cores the swarm's agents "
                        "divide among themselves)")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="run the baselines at once, each in its own process (default on)")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="result directory")
    p.add_argument("--work", default=None, help="directory for the swarm's store (default: a temp dir, "
                                                "removed at the end)")
    return p


def resolve(args) -> tuple[list[str], str, int | None, list[str]]:
    from agents.config import resolve_preset
    from taskdata import benchmark_tasks

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    tasks, preset, cycles = MODES[mode]
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = list(tasks) if tasks else list(benchmark_tasks("mccb-offline"))
    if len(set(tasks)) != len(tasks) or not tasks:
        raise BenchmarkError("--tasks must name at least one task, each once")
    preset = args.preset or preset
    resolve_preset(preset)  # a bad name fails here, before anything runs
    cycles = args.cycles if args.cycles is not None else cycles
    if cycles is not None and cycles < 1:
        raise BenchmarkError("--cycles must be >= 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise BenchmarkError(f"unknown method(s) {bad}: choose from {', '.join(ALL_METHODS)}")
    return tasks, preset, cycles, methods


def analytic_images(preset, cycles: int | None, n_train: int) -> int:
    """What one agent's cycles consume when no swarm ran (every child trains its full budget)."""
    b = preset.budget
    per_child = preset.steps_between_validations(n_train) * b.validations_per_child * b.batch_size
    return per_child * b.children_per_cycle * (cycles if cycles is not None else b.cycles)


def swarm_method(store, tasks: list[str], vit, tensors, wall: float) -> dict:
    """The swarm's row: every task's current model, re-evaluated on its test split here."""
    from agents.training import test_accuracy
    from agents.vit import PathModel, count_flops

    view = common.load_root(store)
    budgets = {t: common.trial_budget(store, t) for t in tasks}
    per_task, flops, stored_test = {}, {}, {}
    for task in tasks:
        path = view.published[task]
        model = PathModel(vit, path.hparams, {n: c.params for n, c in path.components.items()}, ())
        per_task[task] = test_accuracy(model, tensors[task], path.hparams["ds_image_size"])
        stored_test[task] = path.metrics.get("test_quality")
        flops[task] = count_flops(vit, path.hparams)
    total, per_model = common.swarm_unique_params(store, tasks)
    return {"per_task": per_task, "total_params": total, "per_task_model_params": per_model,
            "per_task_flops": flops,
            "per_task_train_images": {t: b["train_images"] for t, b in budgets.items()},
            "per_task_test_accuracy_recorded_by_agent": stored_test,
            "children": {t: b["children"] for t, b in budgets.items()},
            "accepted": {t: b["accepted"] for t, b in budgets.items()},
            "train_seconds_sum": sum(b["train_seconds"] for b in budgets.values()),
            "wall_seconds": wall,
            "model_ids": {t: view.published[t].id for t in tasks},
            "hparams": {t: {k: view.published[t].hparams[k] for k in
                            ("num_layers", "adapter_layers", "ds_image_size", "opt_lr")} for t in tasks}}


def finish(method: dict, tasks: list[str]) -> dict:
    """Add the summary fields every method has (mean accuracy, params per task, mean FLOPs...)."""
    acc = [method["per_task"][t] for t in tasks]
    method["mean_test_accuracy"] = sum(acc) / len(acc)
    method["params_per_task"] = method["total_params"] / len(tasks)
    method["mean_flops_per_image"] = sum(method["per_task_flops"][t] for t in tasks) / len(tasks)
    method["train_images"] = sum(method["per_task_train_images"][t] for t in tasks)
    return method


def baseline_method(outcome) -> dict:
    pt = outcome.per_task
    return {"per_task": {t: o.test_accuracy for t, o in pt.items()},
            "total_params": outcome.total_params,
            "per_task_flops": {t: o.flops_per_image for t, o in pt.items()},
            "per_task_train_images": {t: o.train_images for t, o in pt.items()},
            "per_task_best_val_accuracy": {t: o.best_val_accuracy for t, o in pt.items()},
            "per_task_steps": {t: o.steps for t, o in pt.items()},
            "per_task_validations": {t: o.validations for t, o in pt.items()},
            "wall_seconds": outcome.wall_seconds}


def targets_line(methods: dict) -> str:
    """The issue's targets, judged on this run's numbers."""
    s, f = methods["swarm"], methods["finetune-all"]
    gap = 100 * (s["mean_test_accuracy"] - f["mean_test_accuracy"])
    share = 100 * s["total_params"] / f["total_params"]
    text = (f"Targets: swarm mean test accuracy >= finetune-all + 1.0 point ({fmt(s['mean_test_accuracy'])} "
            f"vs {fmt(f['mean_test_accuracy'])}: {gap:+.2f} points, {'met' if gap >= 1.0 else 'NOT met'}); "
            f"swarm total params <= 50% of finetune-all's ({share:.1f}%: "
            f"{'met' if share <= 50.0 else 'NOT met'})")
    if "joint" in methods:
        j = methods["joint"]
        text += (f"; against joint: {100 * (s['mean_test_accuracy'] - j['mean_test_accuracy']):+.2f} points "
                 f"at {100 * s['total_params'] / j['total_params']:.0f}% of its params")
    return text + "."


def root_line(root: dict | None) -> str:
    if not root:
        return "Root: not recorded."
    if root.get("kind") in (None, "random"):
        return f"Root: `{root.get('name')}` (random initialisation, seed of the run)."
    sha = (root.get("file_sha256") or "")[:12]
    acc = root.get("heldout_accuracy")
    return (f"Root: `{root.get('name')}` (file sha256 {sha}..., corpus {root.get('corpus') or '-'}"
            + (f", held-out pretraining accuracy {acc:.4f}" if isinstance(acc, float) else "") + "), the same "
            "tensors for the swarm and every baseline.")


def markdown(result: dict) -> str:
    tasks, methods = result["tasks"], result["methods"]
    b = result["budget"]
    mode = result["mode"] + (" mode with " + ", ".join(f"--{k} {v}" for k, v in result["overrides"].items())
                             if result["overrides"] else " mode")
    lines = [f"# Quality: swarm vs compute-matched baselines ({mode})", "",
             f"Preset `{b['preset']}`, {b['cycles']} cycle(s) per agent, seed {b['seed']}, "
             f"tasks: {', '.join(tasks)}. Budget per task = the training images the swarm's agent "
             f"consumed (every trained child, accepted or not); `joint` gets their sum. "
             f"Test accuracy on each task's test split (never used for selection).", "",
             root_line(b.get("root")), ""]
    headers = ["method", "mean test acc"] + tasks + ["total params", "params/task", "FLOPs/image",
                                                      "train images", "wall s"]
    rows = []
    for name, m in methods.items():
        rows.append([name, fmt(m["mean_test_accuracy"])] + [fmt(m["per_task"][t]) for t in tasks] +
                    [fmt(m["total_params"]), fmt(int(m["params_per_task"])),
                     fmt(int(m["mean_flops_per_image"])), fmt(m["train_images"]),
                     fmt(m["wall_seconds"], 1)])
    lines.append(md_table(headers, rows))
    if "swarm" in methods and "finetune-all" in methods:
        lines += ["", targets_line(methods)]
    ex = result.get("baseline_execution", {"processes_at_once": 1,
                                           "torch_threads_each": result["machine"]["torch_threads"]})
    lines += ["", "Wall time: the swarm's is the whole `run_swarm.py` run (process start-up, data "
                  "loading, agents sharing the cores); a baseline's is its training and test "
                  f"evaluation with the data already loaded, {ex['torch_threads_each']} torch thread(s), "
                  f"{ex['processes_at_once']} baseline process(es) sharing the cores at once."]
    return "\n".join(lines)


def _baseline(name, root, vit, preset, tensors, images, seed):
    from benchmarks.baselines import RUNNERS

    _say(f"{name}: training {len(tensors)} task(s)")
    return RUNNERS[name](root, vit, preset, tensors, images, seed, log=_say)


def _baseline_process(name, store_path, preset_name, root_spec, tasks, images, seed, threads):
    """One baseline in its own process: it reads the root and the tasks itself (nothing big is pickled)."""
    import torch

    from taskdata import load_task
    from agents.training import TaskTensors
    from store import Store

    torch.set_num_threads(threads)
    preset, vit = common.vit_for(preset_name, root_spec)
    with Store.open(store_path, readonly=True) as store:
        root = common.load_root(store).root
    tensors = {t: TaskTensors(load_task(t), torch.device("cpu"), preset.budget.validation_examples)
               for t in tasks}
    return _baseline(name, root, vit, preset, tensors, images, seed)


def _parallel_baselines(names, store_path, preset_name, args, tasks, images, threads) -> dict:
    """Each baseline in its own spawned process, one torch thread each: on a few cores, small matmuls
    scale better across processes than across threads. Their numbers do not depend on this."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    per = max(1, threads // len(names))
    with ProcessPoolExecutor(len(names), mp_context=mp.get_context("spawn")) as pool:
        futures = {n: pool.submit(_baseline_process, n, store_path, preset_name, args.root, tasks,
                                  images, args.seed, per) for n in names}
        return {n: f.result() for n, f in futures.items()}


def run(args) -> dict:
    tasks, preset_name, cycles, methods = resolve(args)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    import torch

    from taskdata import load_task
    from agents.training import TaskTensors
    from store import Store

    threads = max(1, args.threads)
    preset, vit = common.vit_for(preset_name, args.root)
    work = args.work or tempfile.mkdtemp(prefix="quality_")
    store_path = os.path.join(work, "swarm_store")
    if os.path.exists(store_path):
        raise BenchmarkError(f"{store_path} exists: pass an empty --work directory")
    os.makedirs(work, exist_ok=True)
    overrides = {k: getattr(args, k) for k in ("tasks", "preset", "cycles", "root")
                 if getattr(args, k) is not None}
    result: dict = {"mode": mode, "overrides": overrides, "tasks": tasks, "methods": {},
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": common.machine_info(threads)}
    try:
        swarm_wall = math.nan
        if "swarm" in methods:
            _say(f"swarm: {len(tasks)} agents, preset {preset_name}, cycles {cycles or 'preset'}")
            run_ = common.run_swarm(store_path, tasks, preset_name, cycles=cycles, seed=args.seed,
                                    root=args.root, prefix="quality")
            swarm_wall = run_.wall_seconds
            _say(f"swarm finished in {swarm_wall:.1f}s")
        else:
            common.ensure_store_with_root(store_path, preset_name, args.seed, args.root)
        torch.set_num_threads(threads)
        with Store.open(store_path, readonly=True) as store:
            view = common.load_root(store)
            root = view.root
            tensors = {t: TaskTensors(load_task(t), torch.device("cpu"),
                                      preset.budget.validation_examples) for t in tasks}
            if "swarm" in methods:
                images = {t: common.trial_budget(store, t)["train_images"] for t in tasks}
                result["methods"]["swarm"] = finish(swarm_method(store, tasks, vit, tensors, swarm_wall),
                                                    tasks)
                _say(f"swarm: mean test {result['methods']['swarm']['mean_test_accuracy']:.4f}")
            else:
                images = {t: analytic_images(preset, cycles, tensors[t].n_train) for t in tasks}
        result["budget"] = {"preset": preset_name, "preset_hash": preset.hash,
                            "cycles": cycles if cycles is not None else preset.budget.cycles,
                            "seed": args.seed, "batch_size": preset.budget.batch_size,
                            "image_size": preset.budget.image_size,
                            "validation_examples": preset.budget.validation_examples,
                            "train_images_per_task": images,
                            "train_images_total": sum(images.values()),
                            "root_model_id": root.id, "vit": vit.name, "depth": vit.depth,
                            "root": common.root_provenance(view)}
        baselines = [m for m in ALL_METHODS if m in methods and m != "swarm"]
        parallel = args.parallel and len(baselines) > 1
        result["baseline_execution"] = {
            "processes_at_once": len(baselines) if parallel else 1,
            "torch_threads_each": max(1, threads // len(baselines)) if parallel else threads}
        if parallel:
            outcomes = _parallel_baselines(baselines, store_path, preset_name, args, tasks, images, threads)
        else:
            outcomes = {name: _baseline(name, view.root, vit, preset, tensors, images, args.seed)
                        for name in baselines}
        for name in baselines:
            result["methods"][name] = finish(baseline_method(outcomes[name]), tasks)
            _say(f"{name}: mean test {result['methods'][name]['mean_test_accuracy']:.4f} "
                 f"in {outcomes[name].wall_seconds:.1f}s")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import agents  # noqa: F401  (must precede timm; bad presets and tasks are then user errors)

    start = time.perf_counter()
    result = run(args)
    result["harness_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    common.write_json(out / "quality.json", result)
    common.write_text(out / "quality.md", markdown(result))
    print(markdown(result))
    print(f"\nwrote {out / 'quality.json'} and {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "quality.py", user_errors=(BenchmarkError,))
