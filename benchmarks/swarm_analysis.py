#!/usr/bin/env python3
"""Where a swarm's training images went, read from its store: why it scores what it scores.

    python benchmarks/swarm_analysis.py STORE [--out FILE.json]
    python benchmarks/swarm_analysis.py STORE STORE ... --out FILE.json --md FILE.md   # compare runs

Per task: children and acceptance; the images spent on the current model's own lineage (its same-task
ancestors, each child's images counted once) versus on children that were rejected or whose lineage
was abandoned; the children whose parent came from another task (or the root) and how many of those
lineages the current model descends from; what the current model owns, shares with other tasks, and
takes from the root. Torch-free: it reads records only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import common


def lineage(store, model_id: str) -> list:
    """The model and its ancestors (any task), newest first."""
    out, seen = [], set()
    while model_id and model_id not in seen:
        seen.add(model_id)
        m = store.get_model(model_id)
        if m is None:
            break
        out.append(m)
        model_id = m.parent
    return out


def analyse_task(store, task: str, published: dict) -> dict:
    pointer = store.get_task(task)
    trials = [t for t in store.trials() if t.task == task]
    line = lineage(store, pointer.model_id)
    own_line = {m.id for m in line if m.task == task}
    by_model = {t.model_id: t for t in trials if t.model_id}
    line_images = sum(by_model[m].train_images for m in own_line if m in by_model)
    total = sum(t.train_images for t in trials)
    foreign_parent = [t for t in trials if t.parent and store.get_model(t.parent)
                      and store.get_model(t.parent).task != task]
    model = published[task]
    users: dict[str, set] = {}
    for other, m in published.items():
        for cid in m.components:
            users.setdefault(cid, set()).add(other)
    owners = [store.get_component(cid).agent for cid in model.components]
    return {
        "children": len(trials), "accepted": sum(t.accepted for t in trials),
        "train_images": total, "final_lineage_images": line_images,
        "final_lineage_fraction": line_images / total if total else None,
        "rejected_images": sum(t.train_images for t in trials if not t.accepted),
        "final_lineage_length": len(own_line),
        "lineage_starts_from": next((m.task for m in line if m.task != task), None),
        "foreign_parent_children": len(foreign_parent),
        "foreign_parent_tasks": sorted({store.get_model(t.parent).task for t in foreign_parent}),
        "components": len(model.components),
        "components_owned": sum(1 for a in owners if a == model.agent),
        "components_from_root": sum(1 for a in owners if a == "root"),
        "components_from_other_tasks": sum(1 for a in owners if a not in (model.agent, "root")),
        "components_shared_with_other_tasks": sum(1 for cid in model.components if len(users[cid]) > 1),
        "model_hparams": {k: model.hparams.get(k) for k in ("num_layers", "adapter_layers", "ds_image_size",
                                                            "opt_lr", "opt_momentum")},
    }


def analyse(store_path: str) -> dict:
    from store import Store

    with Store.open(store_path, readonly=True) as store:
        published = store.published_models()
        tasks = sorted(published)
        per_task = {t: analyse_task(store, t, published) for t in tasks}
    total = sum(p["train_images"] for p in per_task.values())
    return {"store": store_path, "tasks": tasks, "per_task": per_task,
            "summary": {"train_images": total,
                        "final_lineage_fraction": sum(p["final_lineage_images"] for p in per_task.values()) / total,
                        "rejected_fraction": sum(p["rejected_images"] for p in per_task.values()) / total,
                        "acceptance": sum(p["accepted"] for p in per_task.values())
                        / max(1, sum(p["children"] for p in per_task.values())),
                        "foreign_parent_children": sum(p["foreign_parent_children"] for p in per_task.values()),
                        "components_owned_fraction": sum(p["components_owned"] for p in per_task.values())
                        / sum(p["components"] for p in per_task.values()),
                        **_outcome(store_path, tasks)}}


def _outcome(store_path: str, tasks: list[str]) -> dict:
    """What the run produced and what it cost: mean test accuracy of the published models, their
    validation-minus-test gap (selection noise), children stopped early, training FLOPs."""
    from store import Store

    with Store.open(store_path, readonly=True) as store:
        published, trials = store.published_models(), store.trials()
        presets = sorted({t.preset for t in trials})
    test = {t: float(published[t].metrics["test_quality"]) for t in tasks}
    gap = {t: float(published[t].metrics["quality"]) - test[t] for t in tasks}
    flops = [t.flops.get("total") for t in trials]
    return {"presets": presets, "mean_test_accuracy": sum(test.values()) / len(tasks),
            "test_accuracy": test, "val_test_gap_mean": sum(gap.values()) / len(tasks),
            "val_test_gap": gap, "children": len(trials),
            "stopped_early": sum(1 for t in trials if t.stopped),
            "train_flops": sum(flops) if all(f is not None for f in flops) else None}


def comparison_md(results: list[dict]) -> str:
    rows = []
    for r in results:
        s = r["summary"]
        rows.append([" ".join(s["presets"]), common.fmt(s["mean_test_accuracy"]),
                     common.fmt(100 * s["val_test_gap_mean"], 2), common.fmt(s["final_lineage_fraction"], 3),
                     common.fmt(s["rejected_fraction"], 3), s["children"], s["stopped_early"],
                     common.fmt(s["train_images"]),
                     "-" if s["train_flops"] is None else f"{s['train_flops'] / 1e12:.2f}T"])
    return common.md_table(["preset", "mean test acc", "val-test gap (points)", "final-lineage share of images",
                            "rejected share", "children", "stopped early", "train images", "train FLOPs"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="swarm_analysis.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    p.add_argument("--md", default=None, help="with several stores: write a comparison table here")
    args = p.parse_args(argv)
    from store import NotAStore

    try:
        results = [analyse(path) for path in args.stores]
    except NotAStore as exc:
        print(f"swarm_analysis.py: error: {exc}", file=sys.stderr)
        return 2
    result = results[0] if len(results) == 1 else {"stores": results}
    if len(results) > 1:
        table = comparison_md(results)
        print(table)
        if args.md:
            common.write_text(Path(args.md), f"# Swarm runs compared\n\nCommand: `python benchmarks/"
                              f"swarm_analysis.py {' '.join(args.stores)}`\n\n{table}\n")
    if args.out:
        common.write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "swarm_analysis.py")
