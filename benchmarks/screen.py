#!/usr/bin/env python3
"""Paired screening of method extensions over seeds (issue 24's protocol).

    python benchmarks/screen.py                         # 4 tasks x 3 seeds, the default arms
    python benchmarks/screen.py --arms cpu,cpu+honest --seeds 0 --out /tmp/screen

Every arm is a preset. For each seed, each arm's swarm runs on the same tasks, root and splits
(``quality.py --methods swarm``), and one finetune-all reference runs per seed at the cpu budget's
images per task, choosing its checkpoint on the decision split (the whole validation split up to
5,120 images) -- the images +honest decides on, so no arm sees better selection data than the
reference. Runs are resumable: a finished (arm, seed) run's ``quality.json`` is reused.

Reported per arm: mean test accuracy per seed, the validation-minus-test gap, and paired
differences, mean and standard error, against finetune-all and against the arm it extends (the
preset named before it in ``--arms``), over (task, seed) pairs and over seeds. A change is adopted
when it gains >= 0.5 points and >= 2 standard errors over its parent. Results: ``OUT/screen.json``
and ``OUT/screen.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import BenchmarkError, log, md_table

SCREEN_TASKS = ("fashion_mnist", "uci_digits", "glyphs_greek", "glyphs_hebrew")
DEFAULT_ARMS = ("cpu", "cpu+honest", "cpu+honest+polish")
REFERENCE = "finetune-all"
DECISION_EXAMPLES = 5_120  # agents.config.DECISION_EXAMPLES_CAP (not imported: no torch here)
ADOPT_POINTS, ADOPT_SE = 0.5, 2.0


def _say(message: str) -> None:
    log("screen", message)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="screen.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(SCREEN_TASKS), help="comma-separated tasks")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help="presets to compare, each judged against the one before it")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--cycles", type=int, default=1, help="swarm cycles per agent (default 1)")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "screen"), help="result directory")
    p.add_argument("--runs", default=None, metavar="DIR",
                   help="where each (arm, seed) run is kept and reused (default OUT/runs): screens "
                        "that share an arm or the reference share its runs")
    p.add_argument("--no-reference", action="store_true", help="skip the finetune-all reference")
    p.add_argument("--equal-flops", action="store_true",
                   help="instead of screening: for each arm and seed, run the arm's swarm and "
                        "finetune-all given exactly the training FLOPs the swarm spent on each task "
                        "(quality.py --comparisons flops), and report the paired difference "
                        "(OUT/equal-flops.json)")
    p.add_argument("--cache-check", default=None, metavar="ARM",
                   help="instead of screening: run ARM's swarm with and without the prefix cache "
                        "(first seed of --seeds), back to back, and report children and training "
                        "images per minute cached / uncached (OUT/cache-check.json)")
    return p


def run_dir(runs: Path, name: str, seed: int) -> Path:
    return runs / f"{name.replace('+', '_').replace('@', '-')}-s{seed}"


def _run(cmd: list[str], where: Path) -> dict:
    done = where / "quality.json"
    if done.exists():
        return json.loads(done.read_text())
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "log.txt", "w") as log_file:
        rc = subprocess.run(cmd, cwd=common.REPO, stdout=log_file, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise BenchmarkError(f"{' '.join(cmd)} failed with exit code {rc}: see {where / 'log.txt'}")
    return json.loads(done.read_text())


def swarm_run(arm: str, seed: int, tasks: list[str], cycles: int, runs: Path) -> dict:
    where = run_dir(runs, arm, seed)
    cmd = [sys.executable, "benchmarks/quality.py", "--methods", "swarm", "--comparisons", "images",
           "--tasks", ",".join(tasks), "--preset", arm, "--cycles", str(cycles), "--seed", str(seed),
           "--out", str(where)]
    return _run(cmd, where)


def reference_run(seed: int, tasks: list[str], cycles: int, preset: str, runs: Path) -> dict:
    where = run_dir(runs, REFERENCE, seed)
    cmd = [sys.executable, "benchmarks/quality.py", "--methods", REFERENCE, "--comparisons", "images",
           "--tasks", ",".join(tasks), "--preset", preset, "--cycles", str(cycles), "--seed", str(seed),
           "--validation-examples", str(DECISION_EXAMPLES), "--parallel", "--out", str(where)]
    return _run(cmd, where)


def paired(a: dict, b: dict, tasks: list[str], seeds: list[int]) -> dict | None:
    """a - b in points: mean and standard error over (task, seed) pairs and over seed means."""
    pairs = [100 * (a[s][t] - b[s][t]) for s in seeds for t in tasks if s in a and s in b]
    per_seed = [statistics.mean(100 * (a[s][t] - b[s][t]) for t in tasks) for s in seeds
                if s in a and s in b]
    if not pairs:
        return None

    def se(xs):
        return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None

    return {"mean_diff": statistics.mean(pairs), "se": se(pairs), "n_pairs": len(pairs),
            "per_seed": per_seed, "se_over_seeds": se(per_seed)}


def summarise(runs: dict, tasks: list[str], seeds: list[int], arms: list[str]) -> dict:
    """runs[name][seed] = that run's quality.json -> the screen's result."""
    acc = {name: {s: r["methods"][name if name == REFERENCE else "swarm"]["per_task"]
                  for s, r in by_seed.items()} for name, by_seed in runs.items()}
    methods = {}
    for name, by_seed in runs.items():
        key = name if name == REFERENCE else "swarm"
        m = {"per_seed": {s: r["methods"][key]["mean_test_accuracy"] for s, r in by_seed.items()},
             "per_task": acc[name],
             "val_test_gap": statistics.mean(r["val_test_gap_mean"][key] for r in by_seed.values()),
             "train_images": statistics.mean(r["methods"][key]["train_images"] for r in by_seed.values()),
             "train_flops": statistics.mean(r["methods"][key]["train_flops"] or 0 for r in by_seed.values())}
        m["mean_test_accuracy"] = statistics.mean(m["per_seed"].values())
        if key == "swarm":
            m["children"] = statistics.mean(sum(r["methods"]["swarm"]["children"].values())
                                            for r in by_seed.values())
            m["accepted"] = statistics.mean(sum(r["methods"]["swarm"]["accepted"].values())
                                            for r in by_seed.values())
            m["wall_seconds"] = statistics.mean(r["methods"]["swarm"]["wall_seconds"]
                                                for r in by_seed.values())
        methods[name] = m
    vs_reference = {a: paired(acc[a], acc[REFERENCE], tasks, seeds) for a in arms
                    if a in acc and REFERENCE in acc}
    vs_parent = {}
    for parent, arm in zip(arms, arms[1:]):
        if arm in acc and parent in acc:
            d = paired(acc[arm], acc[parent], tasks, seeds)
            if d is not None:
                d["parent"] = parent
                d["adopt"] = bool(d["se"] is not None and d["mean_diff"] >= ADOPT_POINTS
                                  and d["mean_diff"] >= ADOPT_SE * d["se"])
            vs_parent[arm] = d
    return {"tasks": tasks, "seeds": seeds, "arms": arms, "methods": methods,
            "paired": vs_reference, "vs_parent": vs_parent}


def markdown(result: dict, command: str) -> str:
    tasks, seeds, methods = result["tasks"], result["seeds"], result["methods"]
    lines = ["# Method screen: paired over seeds", "",
             f"Command: `{command}`", "",
             f"Tasks {', '.join(tasks)}; seeds {', '.join(map(str, seeds))}; the same root, splits and "
             f"decision images for every arm. Finetune-all chooses its checkpoint on the whole "
             f"validation split (up to {DECISION_EXAMPLES:,} images). Differences are in points: mean "
             f"and standard error over (task, seed) pairs.", ""]
    rows = []
    for name, m in methods.items():
        d = result["paired"].get(name)
        p = result["vs_parent"].get(name)
        rows.append([name, f"{m['mean_test_accuracy']:.4f}",
                     " / ".join(f"{m['per_seed'][s]:.4f}" for s in seeds if s in m["per_seed"]),
                     f"{100 * m['val_test_gap']:+.2f}",
                     "-" if d is None else f"{d['mean_diff']:+.2f} ± {d['se']:.2f}" if d["se"] else
                     f"{d['mean_diff']:+.2f}",
                     "-" if p is None else (f"{p['mean_diff']:+.2f} ± {p['se']:.2f} vs {p['parent']}"
                                            if p["se"] else f"{p['mean_diff']:+.2f} vs {p['parent']}")
                     + ("" if p is None else (" (adopt)" if p["adopt"] else "")),
                     f"{m['train_images']:,.0f}", f"{m['train_flops']:.3g}",
                     f"{m.get('children', 0):.0f}", f"{m.get('wall_seconds', 0):.0f}"])
    lines.append(md_table(["method", "mean test", "per seed", "val-test gap", "vs finetune-all",
                           "vs parent arm", "train images", "train FLOPs", "children", "wall s"], rows))
    return "\n".join(lines)


def equal_flops_run(arm: str, seed: int, tasks: list[str], cycles: int, runs: Path) -> dict:
    where = run_dir(runs, arm + "+eqflops", seed)
    cmd = [sys.executable, "benchmarks/quality.py", "--methods", f"swarm,{REFERENCE}", "--comparisons",
           "flops", "--tasks", ",".join(tasks), "--preset", arm, "--cycles", str(cycles), "--seed",
           str(seed), "--validation-examples", str(DECISION_EXAMPLES), "--out", str(where)]
    return _run(cmd, where)


def equal_flops(arms: list[str], seeds: list[int], tasks: list[str], cycles: int, runs: Path,
                out: Path) -> dict:
    """Each arm against finetune-all at the swarm's own training FLOPs, paired per (task, seed)."""
    result: dict = {"tasks": tasks, "seeds": seeds, "arms": {},
                    "command": " ".join([Path(sys.executable).name, *sys.argv])}
    for arm in arms:
        acc: dict = {"swarm": {}, REFERENCE: {}}
        flops: dict = {"swarm": [], REFERENCE: []}
        for seed in seeds:
            _say(f"equal FLOPs: seed {seed}, {arm}")
            eq = equal_flops_run(arm, seed, tasks, cycles, runs)["equal_flops"]
            for name in acc:
                acc[name][seed] = eq["methods"][name]["per_task"]
                flops[name].append(eq["methods"][name]["train_flops"])
        result["arms"][arm] = {
            "swarm_mean_test_accuracy": statistics.mean(statistics.mean(v.values()) for v in acc["swarm"].values()),
            f"{REFERENCE}_mean_test_accuracy": statistics.mean(statistics.mean(v.values())
                                                              for v in acc[REFERENCE].values()),
            "train_flops": {k: statistics.mean(v) for k, v in flops.items()},
            "paired": paired(acc["swarm"], acc[REFERENCE], tasks, seeds)}
        common.write_json(out / "equal-flops.json", result)
    return result


def cache_check(arm: str, seed: int, tasks: list[str], cycles: int, out: Path) -> dict:
    """One arm's swarm with its prefix cache and without it, back to back on the same machine."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="cache_check_"))
    result: dict = {"arm": arm, "seed": seed, "tasks": tasks, "cycles": cycles,
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": common.machine_info()}
    try:
        for label, extra in (("cached", []), ("uncached", ["--prefix-cache-mb", "0"])):
            _say(f"cache check: {arm}, {label}")
            store = str(work / label)
            run = common.run_swarm(store, tasks, arm, cycles=cycles, seed=seed, prefix="screen",
                                   extra_args=extra)
            result[label] = {**common.swarm_throughput(store, tasks), "wall_seconds": run.wall_seconds,
                             "flops_per_child": _flops_per_child(store, tasks)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    c, u = result["cached"], result["uncached"]
    result["children_per_min_cached_vs_uncached"] = c["children_per_min"] / u["children_per_min"]
    result["train_images_per_s_cached_vs_uncached"] = c["train_images_per_s"] / u["train_images_per_s"]
    common.write_json(out / "cache-check.json", result)
    return result


def _flops_per_child(store_path: str, tasks: list[str]) -> float:
    from store import Store

    with Store.open(store_path, readonly=True) as store:
        budgets = [common.trial_budget(store, t) for t in tasks]
    return sum(b["train_flops"] for b in budgets) / max(1, sum(b["children"] for b in budgets))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise BenchmarkError(f"--seeds must be integers joined by commas, got {args.seeds!r}") from None
    if not tasks or not arms or not seeds:
        raise BenchmarkError("--tasks, --arms and --seeds each need at least one value")
    out = Path(args.out)
    runs_dir = Path(args.runs) if args.runs else out / "runs"
    if args.cache_check:
        r = cache_check(args.cache_check, seeds[0], tasks, args.cycles, out)
        print(f"{args.cache_check}: children per minute cached / uncached "
              f"{r['children_per_min_cached_vs_uncached']:.3f}, training images per second "
              f"{r['train_images_per_s_cached_vs_uncached']:.3f}")
        return 0
    if args.equal_flops:
        r = equal_flops(arms, seeds, tasks, args.cycles, runs_dir, out)
        for arm, a in r["arms"].items():
            d = a["paired"]
            print(f"{arm}: swarm {a['swarm_mean_test_accuracy']:.4f} vs {REFERENCE} at its FLOPs "
                  f"{a[f'{REFERENCE}_mean_test_accuracy']:.4f}: {d['mean_diff']:+.2f} ± {d['se']:.2f} points")
        return 0
    runs: dict[str, dict[int, dict]] = {}
    start = time.perf_counter()
    for seed in seeds:  # seed-major: a stopped screen still has whole seeds
        if not args.no_reference:
            _say(f"seed {seed}: {REFERENCE}")
            runs.setdefault(REFERENCE, {})[seed] = reference_run(seed, tasks, args.cycles,
                                                                 arms[0].split("+")[0].split("@")[0],
                                                                 runs_dir)
        for arm in arms:
            _say(f"seed {seed}: swarm {arm}")
            runs.setdefault(arm, {})[seed] = swarm_run(arm, seed, tasks, args.cycles, runs_dir)
            _say(f"seed {seed}: {arm} mean test "
                 f"{runs[arm][seed]['methods']['swarm']['mean_test_accuracy']:.4f}")
        done = sorted({s for by_seed in runs.values() for s in by_seed})
        result = summarise(runs, tasks, done, arms)
        result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        result["harness_seconds"] = time.perf_counter() - start
        common.write_json(out / "screen.json", result)
        common.write_text(out / "screen.md", markdown(result, result["command"]))
    print((out / "screen.md").read_text())
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "screen.py", user_errors=(BenchmarkError,))
