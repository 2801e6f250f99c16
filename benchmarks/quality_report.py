#!/usr/bin/env python3
"""Combine quality runs into one page: the pretrained-root headline, the random-root table, and the
method extensions that were tried (each a swarm-only run on the same tasks, against the same
finetune-all reference).

    python benchmarks/quality_report.py                       # reads benchmarks/results/, writes quality.md

Inputs (all written by ``benchmarks/quality.py``): ``results/quality.json`` (pretrained root, the
headline), ``results/random-root/quality.json`` and ``results/extensions/*/quality.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.common import fmt, md_table
from benchmarks.quality import markdown


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def extensions_table(runs: list[tuple[str, dict]], reference: dict | None) -> str:
    """One row per tried preset: the swarm's mean and per-task test accuracy and its params."""
    tasks = runs[0][1]["tasks"]
    headers = ["run (swarm preset)", "mean test acc", "vs finetune-all (points)"] + tasks + [
        "total params", "acceptance", "wall s"]
    ref = reference["methods"]["finetune-all"] if reference else None
    rows = []
    for name, r in runs:
        s = r["methods"]["swarm"]
        acc = sum(s["accepted"].values()) / max(1, sum(s["children"].values()))
        delta = 100 * (s["mean_test_accuracy"] - ref["mean_test_accuracy"]) if ref else None
        rows.append([f"{name} (`{r['budget']['preset']}`)", fmt(s["mean_test_accuracy"]),
                     "-" if delta is None else f"{delta:+.2f}"] + [fmt(s["per_task"][t]) for t in tasks]
                    + [fmt(s["total_params"]), f"{acc:.2f}", fmt(s["wall_seconds"], 1)])
    if ref:
        rows.append(["finetune-all (reference)", fmt(ref["mean_test_accuracy"]), "0.00"]
                    + [fmt(ref["per_task"][t]) for t in tasks] + [fmt(ref["total_params"]), "-",
                                                                  fmt(ref["wall_seconds"], 1)])
    return md_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quality_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(common.RESULTS_DIR))
    p.add_argument("--out", default=None, help="default RESULTS/quality.md")
    args = p.parse_args(argv)
    res = Path(args.results)
    headline, random_root = _load(res / "quality.json"), _load(res / "random-root" / "quality.json")
    if headline is None:
        print(f"quality_report.py: error: {res / 'quality.json'} not found; run benchmarks/quality.py",
              file=sys.stderr)
        return 2
    parts = ["# Quality results", "",
             "Two full runs of `benchmarks/quality.py` on this machine (2 CPU cores): the pretrained "
             "root (the default, the headline) and a random root, each with the swarm and the three "
             "compute-matched baselines; then every method extension tried, as swarm-only runs on a "
             "4-task subset against the same finetune-all reference.", "",
             "## Pretrained root (`glyphs_cjk`, the default)", "", f"Command: `{headline['command']}`", "",
             markdown(headline).split("\n", 2)[2]]
    if random_root:
        parts += ["", "## Random root", "", f"Command: `{random_root['command']}`", "",
                  markdown(random_root).split("\n", 2)[2]]
    ext_dir = res / "extensions"
    runs = sorted(((d.name, r) for d in ext_dir.iterdir() if d.is_dir()
                   and (r := _load(d / "quality.json")) and "swarm" in r["methods"]),
                  key=lambda x: x[0]) if ext_dir.is_dir() else []
    if runs:
        ref = next((r for _, r in runs if "finetune-all" in r["methods"]), None)
        b = runs[0][1]["budget"]
        parts += ["", "## Method extensions tried", "",
                  f"Tasks {', '.join(runs[0][1]['tasks'])}; {b['cycles']} cycle(s), seed {b['seed']}, root "
                  f"`{(b.get('root') or {}).get('name')}`; every swarm and the reference trained the same "
                  f"images per task ({fmt(b['train_images_total'])} in all). Commands are in each "
                  "`extensions/NAME/quality.json`. These ran on the first version of the `cpu` budget "
                  "(1,024 validation examples, image sizes 16/32/48, 12 children per cycle; the same 96 "
                  "steps of 32 per child) and before `+continue` joined the default method, so their "
                  "`cpu` means the published µ2Net+ method. The budget was then cut to fit two full "
                  "runs in a session (512 validation examples, 10 children per cycle) and 16 px was "
                  "dropped from the image-size grid (children there scored 0.07-0.12 and were wasted).",
                  "", extensions_table(runs, ref)]
    out = Path(args.out) if args.out else res / "quality.md"
    common.write_text(out, "\n".join(parts))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "quality_report.py")
