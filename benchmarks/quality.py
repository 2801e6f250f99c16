#!/usr/bin/env python3
"""Quality benchmark: the swarm vs three compute-matched baselines on the same tasks and root.

    python benchmarks/quality.py --quick            # 4 small tasks, `test` preset, a few minutes
    python benchmarks/quality.py                    # mccb-offline (8 tasks), `cpu` preset
    python benchmarks/quality.py --smoke --out DIR  # the smallest run (the test suite's)

The swarm runs as users run it (``launch/run_swarm.py`` in a subprocess, agents in parallel). Each
task's training budget is then read from the store, from every child that task's agent trained
(accepted or not). Two comparisons (``--comparisons``):

* ``images``: each baseline (``benchmarks/baselines.py``) trains exactly the swarm's training images
  per task (``joint``: their sum);
* ``flops``: each baseline gets, per task, the training FLOPs the swarm's children recorded (their
  ``flops["total"]``: training steps, validations and cache fills, ``agents.compute``) and trains as
  many images as that buys, validations included (``joint``: the sum). Skipped, with the reason in
  ``equal_flops.skipped``, when no swarm ran or its trials did not record FLOPs (an older store).

Every baseline starts from the same root tensors (read from the swarm's store), uses the same splits,
the preset's default hparams, the same validation subset and cadence, keeps its best validation
checkpoint and is scored on the test split, which nothing selects on. The gap between the kept
checkpoint's validation accuracy and its test accuracy (``val_test_gap``) measures how much the
selection on a small validation subset flatters each method. Results: ``OUT/quality.json`` and
``OUT/quality.md``.
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
COMPARISONS = ("images", "flops")
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
    p.add_argument("--comparisons", default=",".join(COMPARISONS),
                   help="baselines at equal training images, at equal training FLOPs, or both "
                        "(default images,flops)")
    p.add_argument("--validation-examples", type=int, default=None, metavar="N",
                   help="validation subset per task for the baselines, and for the swarm where "
                        "run_swarm.py takes the flag (default: the preset's)")
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
    p.add_argument("--swarm-store", default=None, metavar="DIR",
                   help="use this finished swarm's store instead of running the swarm (it must hold "
                        "the same tasks, preset and seed; read-only); the swarm's wall time is then "
                        "its trials' span")
    return p


def resolve(args) -> tuple[list[str], str, int | None, list[str]]:
    """Tasks, preset, cycles and methods; checks ``--comparisons`` and ``--validation-examples``."""
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
    if "swarm" not in methods and comparisons(args) == ["flops"]:
        raise BenchmarkError("--comparisons flops needs the swarm in --methods (its FLOPs are the budget)")
    if args.validation_examples is not None and args.validation_examples < 1:
        raise BenchmarkError("--validation-examples must be >= 1")
    return tasks, preset, cycles, methods


def comparisons(args) -> list[str]:
    """``--comparisons`` as a list in the canonical order (images first)."""
    chosen = [c.strip() for c in args.comparisons.split(",") if c.strip()]
    bad = [c for c in chosen if c not in COMPARISONS]
    if bad or not chosen:
        raise BenchmarkError(f"unknown comparison(s) {bad}: choose from {', '.join(COMPARISONS)}")
    return [c for c in COMPARISONS if c in chosen]


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
    per_task, flops, stored_test, best_val = {}, {}, {}, {}
    for task in tasks:
        path = view.published[task]
        model = PathModel(vit, path.hparams, {n: c.params for n, c in path.components.items()}, ())
        per_task[task] = test_accuracy(model, tensors[task], path.hparams["ds_image_size"])
        stored_test[task] = path.metrics.get("test_quality")
        best_val[task] = path.metrics.get("quality")  # the published model's best validation accuracy
        flops[task] = count_flops(vit, path.hparams)
    total, per_model = common.swarm_unique_params(store, tasks)
    return {"per_task": per_task, "total_params": total, "per_task_model_params": per_model,
            "per_task_flops": flops,
            "per_task_train_images": {t: b["train_images"] for t, b in budgets.items()},
            "per_task_train_flops": {t: b["train_flops"] for t, b in budgets.items()},
            "per_task_flops_tally": {t: b["flops"] for t, b in budgets.items()},
            "flops": common.add_flops([b["flops"] for b in budgets.values()]),
            "per_task_best_val_accuracy": best_val,
            "per_task_test_accuracy_recorded_by_agent": stored_test,
            "children": {t: b["children"] for t, b in budgets.items()},
            "accepted": {t: b["accepted"] for t, b in budgets.items()},
            "train_seconds_sum": sum(b["train_seconds"] for b in budgets.values()),
            "wall_seconds": wall,
            "model_ids": {t: view.published[t].id for t in tasks},
            "hparams": {t: {k: view.published[t].hparams[k] for k in
                            ("num_layers", "adapter_layers", "ds_image_size", "opt_lr")} for t in tasks}}


def finish(method: dict, tasks: list[str]) -> dict:
    """Add the summary fields every method has (mean accuracy, params per task, mean FLOPs...).

    ``train_flops``: every task's training compute, validations and cache fills included; None when
    a task's is unknown (a swarm whose trials recorded no FLOPs)."""
    acc = [method["per_task"][t] for t in tasks]
    method["mean_test_accuracy"] = sum(acc) / len(acc)
    method["params_per_task"] = method["total_params"] / len(tasks)
    method["mean_flops_per_image"] = sum(method["per_task_flops"][t] for t in tasks) / len(tasks)
    method["train_images"] = sum(method["per_task_train_images"][t] for t in tasks)
    per_task_flops = [method["per_task_train_flops"][t] for t in tasks]
    method["train_flops"] = None if None in per_task_flops else sum(per_task_flops)
    return method


def baseline_method(outcome) -> dict:
    pt = outcome.per_task
    return {"per_task": {t: o.test_accuracy for t, o in pt.items()},
            "total_params": outcome.total_params,
            "per_task_flops": {t: o.flops_per_image for t, o in pt.items()},
            "per_task_train_images": {t: o.train_images for t, o in pt.items()},
            "per_task_train_flops": {t: o.train_flops for t, o in pt.items()},
            "per_task_flops_tally": {t: o.flops for t, o in pt.items()},
            "flops": common.add_flops([o.flops for o in pt.values()]),
            "per_task_flops_budget": {t: o.flops_budget for t, o in pt.items()},
            "per_task_best_val_accuracy": {t: o.best_val_accuracy for t, o in pt.items()},
            "per_task_steps": {t: o.steps for t, o in pt.items()},
            "per_task_validations": {t: o.validations for t, o in pt.items()},
            "wall_seconds": outcome.wall_seconds}


def val_test_gaps(methods: dict, tasks: list[str]) -> tuple[dict, dict]:
    """Per method and task: best validation accuracy (of the kept checkpoint; the swarm's published
    model's ``quality``) minus test accuracy; and each method's mean over the tasks where both are
    known (None when none is)."""
    gaps, means = {}, {}
    for name, m in methods.items():
        val = m.get("per_task_best_val_accuracy") or {}
        gaps[name] = {t: (val[t] - m["per_task"][t]) if isinstance(val.get(t), (int, float)) else None
                      for t in tasks}
        known = [g for g in gaps[name].values() if g is not None]
        means[name] = sum(known) / len(known) if known else None
    return gaps, means


def equal_flops_row(method: dict, tasks: list[str]) -> dict:
    """What the equal-FLOPs comparison keeps of a method's result (the swarm's: its own run)."""
    keys = ("mean_test_accuracy", "train_flops", "train_images", "per_task", "per_task_train_flops",
            "per_task_train_images", "per_task_flops_tally", "flops", "per_task_flops_budget",
            "per_task_best_val_accuracy", "per_task_steps", "per_task_validations", "total_params",
            "wall_seconds")
    return {k: method[k] for k in keys if k in method}


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
             f"tasks: {', '.join(tasks)}. Test accuracy on each task's test split (never used for "
             f"selection). Train FLOPs: everything training cost (steps forward and backward, "
             f"validations, prefix-cache fills; `agents/compute.py`), the swarm's as its children "
             f"recorded them.", "",
             root_line(b.get("root")), ""]
    if methods:
        lines += ["### Equal training images", "",
                  "Budget per task = the training images the swarm's agent consumed (every trained "
                  "child, accepted or not); `joint` gets their sum.", ""]
        headers = ["method", "mean test acc"] + tasks + ["total params", "params/task", "FLOPs/image",
                                                          "train images", "train FLOPs", "wall s"]
        rows = []
        for name, m in methods.items():
            rows.append([name, fmt(m["mean_test_accuracy"])] + [fmt(m["per_task"][t]) for t in tasks] +
                        [fmt(m["total_params"]), fmt(int(m["params_per_task"])),
                         fmt(int(m["mean_flops_per_image"])), fmt(m["train_images"]),
                         fmt_flops(m.get("train_flops")), fmt(m["wall_seconds"], 1)])
        lines.append(md_table(headers, rows))
        if "swarm" in methods and "finetune-all" in methods:
            lines += ["", targets_line(methods)]
    ex = result.get("baseline_execution", {"processes_at_once": 1,
                                           "torch_threads_each": result["machine"]["torch_threads"]})
    lines += ["", "Wall time: the swarm's is the whole `run_swarm.py` run (process start-up, data "
                  "loading, agents sharing the cores); a baseline's is its training and test "
                  f"evaluation with the data already loaded, {ex['torch_threads_each']} torch thread(s), "
                  f"{ex['processes_at_once']} baseline process(es) sharing the cores at once."]
    lines += equal_flops_markdown(result)
    lines += gap_markdown(result)
    return "\n".join(lines)


def fmt_flops(x) -> str:
    """1.23e+14 style (FLOPs span too many orders of magnitude for thousands separators); '-' if unknown."""
    return "-" if x is None else f"{x:.3g}" if x < 1000 else f"{x:.3e}".replace("e+", "e")


def equal_flops_markdown(result: dict) -> list[str]:
    eq = result.get("equal_flops")
    if not eq:
        return []
    lines = ["", "### Equal training FLOPs", ""]
    if eq.get("skipped"):
        return lines + [f"Not run: {eq['skipped']}."]
    tasks = result["tasks"]
    lines += [f"Budget per task = the training FLOPs the swarm's children recorded (training steps "
              f"forward and backward, validations, cache fills: {fmt_flops(eq['flops_budget_total'])} "
              f"in all); `joint` gets their sum. A baseline trains as many images as its budget buys, "
              f"validation included, on the same validation cadence, with its cosine schedule over "
              f"its own step count.", ""]
    headers = ["method", "mean test acc"] + tasks + ["train FLOPs", "of budget", "train images",
                                                      "wall s"]
    rows = []
    for name, m in eq["methods"].items():
        share = (m["train_flops"] / eq["flops_budget_total"]
                 if m.get("train_flops") is not None and eq["flops_budget_total"] else None)
        rows.append([name, fmt(m["mean_test_accuracy"])] + [fmt(m["per_task"][t]) for t in tasks]
                    + [fmt_flops(m.get("train_flops")), "-" if share is None else f"{share:.4f}",
                       fmt(m["train_images"]), fmt(m.get("wall_seconds"), 1)])
    return lines + [md_table(headers, rows)]


def gap_markdown(result: dict) -> list[str]:
    """The validation-to-test gap tables (selection noise), one per comparison that has one."""
    tasks, out = result["tasks"], []
    sections = [("equal images", result.get("val_test_gap"), result.get("val_test_gap_mean"))]
    eq = result.get("equal_flops") or {}
    sections.append(("equal FLOPs", eq.get("val_test_gap"), eq.get("val_test_gap_mean")))
    for label, gaps, means in sections:
        if not gaps:
            continue
        if not out:
            n_val = result["budget"].get("validation_examples")
            n_swarm = result["budget"].get("swarm_validation_examples", n_val)
            swarm = f" (the swarm's: {fmt(n_swarm)})" if n_swarm != n_val else ""
            out += ["", "### Selection noise: validation minus test accuracy (points)", "",
                    f"Best validation accuracy of the kept checkpoint (the swarm: its published model's "
                    f"recorded `quality`) minus its test accuracy, in points, on validation subsets of "
                    f"at most {fmt(n_val)} images per task{swarm}. Positive: selection on the "
                    f"validation subset flatters the method.", ""]
        rows = [[f"{name} ({label})", _points(means.get(name))] + [_points(g.get(t)) for t in tasks]
                for name, g in gaps.items()]
        out += [md_table(["method", "mean"] + tasks, rows), ""]
    return out[:-1] if out else out


def _points(x) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def _baseline(name, root, vit, preset, tensors, images, seed, flops_budget=None):
    from benchmarks.baselines import RUNNERS

    what = "equal images" if flops_budget is None else "equal FLOPs"
    _say(f"{name} ({what}): training {len(tensors)} task(s)")
    return RUNNERS[name](root, vit, preset, tensors, images, seed, log=_say, flops_budget=flops_budget)


def _baseline_process(name, store_path, preset_name, root_spec, tasks, images, seed, threads,
                      validation_examples, flops_budgets):
    """One baseline in its own process, once per budget (None: the images budget): it reads the root
    and the tasks itself (nothing big is pickled)."""
    import torch

    from taskdata import load_task
    from agents.training import TaskTensors
    from store import Store

    torch.set_num_threads(threads)
    preset, vit = common.vit_for(preset_name, root_spec)
    with Store.open(store_path, readonly=True) as store:
        root = common.load_root(store).root
    tensors = {t: TaskTensors(load_task(t), torch.device("cpu"), validation_examples) for t in tasks}
    return [_baseline(name, root, vit, preset, tensors, images, seed, fb) for fb in flops_budgets]


def _run_baselines(names, parallel, store_path, preset_name, args, tasks, images, threads,
                   validation_examples, root, vit, preset, tensors, flops_budgets) -> dict:
    """Every baseline once per budget in ``flops_budgets`` (None: the images budget); returns
    {name: [outcome per budget]}. In parallel, each baseline runs in its own spawned process with
    threads divided among them (on a few cores, small matmuls scale better across processes than
    across threads); their numbers do not depend on this."""
    if not parallel:
        return {n: [_baseline(n, root, vit, preset, tensors, images, args.seed, fb) for fb in flops_budgets]
                for n in names}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    per = max(1, threads // len(names))
    with ProcessPoolExecutor(len(names), mp_context=mp.get_context("spawn")) as pool:
        futures = {n: pool.submit(_baseline_process, n, store_path, preset_name, args.root, tasks,
                                  images, args.seed, per, validation_examples, list(flops_budgets))
                   for n in names}
        return {n: f.result() for n, f in futures.items()}


def run(args) -> dict:
    tasks, preset_name, cycles, methods = resolve(args)
    chosen = comparisons(args)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    import torch

    from taskdata import load_task
    from agents.training import TaskTensors
    from store import Store

    threads = max(1, args.threads)
    preset, vit = common.vit_for(preset_name, args.root)
    n_val = args.validation_examples or preset.validation_examples  # +fullval: the whole split
    swarm_n_val = preset.validation_examples  # the swarm's method decides (+fullval: the whole split)
    if args.validation_examples is not None and "swarm" in methods:
        _say(f"the swarm validates on its preset's subset (at most {swarm_n_val}; +fullval for the "
             f"whole split), the baselines on at most {n_val}")
    work = args.work or tempfile.mkdtemp(prefix="quality_")
    store_path = args.swarm_store or os.path.join(work, "swarm_store")
    if args.swarm_store:
        _check_swarm_store(args.swarm_store, tasks, preset, args.seed)
    elif os.path.exists(store_path):
        raise BenchmarkError(f"{store_path} exists: pass an empty --work directory")
    os.makedirs(work, exist_ok=True)
    overrides = {k: getattr(args, k) for k in ("tasks", "preset", "cycles", "root", "validation_examples")
                 if getattr(args, k) is not None}
    result: dict = {"mode": mode, "overrides": overrides, "tasks": tasks, "comparisons": chosen,
                    "methods": {},
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": common.machine_info(threads)}
    try:
        swarm_wall = math.nan
        if "swarm" in methods and args.swarm_store:
            swarm_wall = _trial_span(args.swarm_store)
            _say(f"swarm: the finished store {args.swarm_store} (trials span {swarm_wall:.1f}s)")
        elif "swarm" in methods:
            _say(f"swarm: {len(tasks)} agents, preset {preset_name}, cycles {cycles or 'preset'}")
            run_ = common.run_swarm(store_path, tasks, preset_name, cycles=cycles, seed=args.seed,
                                    root=args.root, prefix="quality")
            swarm_wall = run_.wall_seconds
            _say(f"swarm finished in {swarm_wall:.1f}s")
        else:
            common.ensure_store_with_root(store_path, preset_name, args.seed, args.root)
        torch.set_num_threads(threads)
        flops_budget: dict | None = None
        with Store.open(store_path, readonly=True) as store:
            view = common.load_root(store)
            root = view.root
            tensors = {t: TaskTensors(load_task(t), torch.device("cpu"), n_val) for t in tasks}
            if "swarm" in methods:
                budgets = {t: common.trial_budget(store, t) for t in tasks}
                images = {t: b["train_images"] for t, b in budgets.items()}
                if all(b["train_flops"] is not None for b in budgets.values()):
                    flops_budget = {t: b["train_flops"] for t, b in budgets.items()}
                result["methods"]["swarm"] = finish(swarm_method(store, tasks, vit, tensors, swarm_wall),
                                                    tasks)
                _say(f"swarm: mean test {result['methods']['swarm']['mean_test_accuracy']:.4f}")
            else:
                images = {t: analytic_images(preset, cycles, tensors[t].n_train) for t in tasks}
        result["budget"] = {"preset": preset_name, "preset_hash": preset.hash,
                            "cycles": cycles if cycles is not None else preset.budget.cycles,
                            "seed": args.seed, "batch_size": preset.budget.batch_size,
                            "image_size": preset.budget.image_size,
                            "validation_examples": n_val,
                            "swarm_validation_examples": swarm_n_val,
                            "train_images_per_task": images,
                            "train_images_total": sum(images.values()),
                            "train_flops_per_task": flops_budget,
                            "train_flops_total": sum(flops_budget.values()) if flops_budget else None,
                            "root_model_id": root.id, "vit": vit.name, "depth": vit.depth,
                            "root": common.root_provenance(view)}
        baselines = [m for m in ALL_METHODS if m in methods and m != "swarm"]
        parallel = args.parallel and len(baselines) > 1
        result["baseline_execution"] = {
            "processes_at_once": len(baselines) if parallel else 1,
            "torch_threads_each": max(1, threads // len(baselines)) if parallel else threads}
        skipped = ("no swarm ran, so there is no FLOPs budget" if "swarm" not in methods else
                   "the swarm's trials recorded no FLOPs (a store written before they did)"
                   if flops_budget is None else None)
        runs = (["images"] if "images" in chosen else []) + \
               (["flops"] if "flops" in chosen and skipped is None else [])
        outcomes = _run_baselines(baselines, parallel, store_path, preset_name, args, tasks, images,
                                  threads, n_val, root, vit, preset, tensors,
                                  [flops_budget if r == "flops" else None for r in runs]) \
            if baselines and runs else {}
        if "images" in chosen:
            for name in baselines:
                out = outcomes[name][runs.index("images")]
                result["methods"][name] = finish(baseline_method(out), tasks)
                _say(f"{name}: mean test {result['methods'][name]['mean_test_accuracy']:.4f} "
                     f"in {out.wall_seconds:.1f}s")
        result["val_test_gap"], result["val_test_gap_mean"] = val_test_gaps(result["methods"], tasks)
        if "flops" in chosen:
            result["equal_flops"] = {"skipped": skipped} if skipped else equal_flops(
                result, {n: outcomes[n][runs.index("flops")] for n in baselines}, flops_budget)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _check_swarm_store(path: str, tasks: list[str], preset, seed: int) -> None:
    """A reused swarm store must be what this run would have made: every task's agent finished its
    cycles under this preset (by hash)."""
    from agents.agent import agent_id_for
    from store import open_store

    with open_store(path, readonly=True) as store:
        states = {s.task: s for s in (store.get_agent_state(agent_id_for(t)) for t in tasks) if s}
        missing = [t for t in tasks if t not in states]
        running = sorted(a.task for a in store.agents() if a.task in tasks and a.state != "finished")
        hashes = {t.preset_hash for t in store.trials()}
    if missing:
        raise BenchmarkError(f"--swarm-store {path} has no agent for {', '.join(missing)}")
    if running:
        raise BenchmarkError(f"--swarm-store {path}: the agents of {', '.join(running)} have not finished")
    if hashes != {preset.hash}:
        raise BenchmarkError(f"--swarm-store {path} was trained under preset hash(es) {sorted(hashes)}, "
                             f"not {preset.name} ({preset.hash})")


def _trial_span(path: str) -> float:
    from store import open_store

    with open_store(path, readonly=True) as store:
        trials = store.trials()
    return max(t.created_at for t in trials) - min(t.created_at - t.seconds for t in trials)


def equal_flops(result: dict, outcomes: dict, flops_budget: dict) -> dict:
    """The second comparison: every baseline on the swarm's training FLOPs per task, and the swarm."""
    tasks = result["tasks"]
    eq: dict = {"flops_budget_per_task": flops_budget, "flops_budget_total": sum(flops_budget.values()),
                "methods": {"swarm": equal_flops_row(result["methods"]["swarm"], tasks)}}
    for name, out in outcomes.items():
        eq["methods"][name] = equal_flops_row(finish(baseline_method(out), tasks), tasks)
        _say(f"{name} (equal FLOPs): mean test {eq['methods'][name]['mean_test_accuracy']:.4f}, "
             f"{eq['methods'][name]['train_images']} images in {out.wall_seconds:.1f}s")
    eq["val_test_gap"], eq["val_test_gap_mean"] = val_test_gaps(eq["methods"], tasks)
    return eq


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
