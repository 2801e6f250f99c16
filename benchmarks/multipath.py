#!/usr/bin/env python3
"""Multipath agents on a grown system: do borrowed frozen models beat more single-path training?

    python benchmarks/multipath.py --base /work/runs/cpu+hurdle --work /work/runs/mp
    python benchmarks/multipath.py --base STORE --control-store DONE --work DIR   # reuse a control run

Protocol. ``--base`` is a finished swarm (the quality benchmark's: 8 tasks, ``--preset``, its cycles).
Two copies of it get the same added budget per task, one cycle of the preset (children_per_cycle
children of validations_per_child x B steps: the same training images for both kinds):

  control     every task's single-path agent runs one more cycle (run_swarm.py --cycles base+1);
  multipath   every task's multipath agent runs one cycle beside the finished single-path agents
              (run_swarm.py --kinds multipath --cycles 1).

Reported per task and in the mean, all on the test split (never used for selection): ``single_path``
(the base store's model), ``control`` (the control store's), ``multipath`` (the multipath agent's
best) and ``best`` (what the multipath store serves: the best validation score of the task's two
agents); trained and activated parameters and forward FLOPs per image of each multipath model; the
FLOPs each run spent; and which borrowed tasks each router weights most (mean per-sample weight on the
test split, per path).

Speed. ``speed.multipath_vs_top_block_per_image``: seconds per training image of a multipath child
(agents.multipath_generation.train: router + connectors on the paths' outputs, computed once per
image) against a single-path child that trains its top block, final norm and head with the prefix cache
(agents.training.train_child, augmentation off so the cache serves training batches), both on the
same task, in this process, one after the other; each is run twice and the second (warm cache) run is
the steady-state number; the first (cold: it fills the cache) is reported too.

Results: OUT/multipath.json and OUT/multipath.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _say(message: str) -> None:
    common.log("multipath", message)


def _copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs", "lock.mdb"))


def _tests(store_path: str, kind: str | None) -> dict[str, dict]:
    """Task -> the model record that ``kind``'s pointer names (None: the serving one)."""
    from store import Store

    with Store.open(store_path, readonly=True) as st:
        return {t: m for t, m in st.published_models(kind=kind).items()}


def _cycles(store_path: str) -> int:
    from store import Store

    with Store.open(store_path, readonly=True) as st:
        return max(s.cycle for s in (st.get_agent_state(a.agent_id) for a in st.agents()) if s)


def router_weights(store_path: str, model_id: str) -> dict:
    """Mean per-sample router weight of each path on the task's test split, by the path's task."""
    import torch

    from agents.api import load_model
    from store import Store
    from taskdata import load_task

    with Store.open(store_path, readonly=True) as st:
        rec = st.get_model(model_id)
        path_tasks = [st.get_model(r).task for r in rec.refs]
    m = load_model(store_path, rec.task, model_id=model_id)
    data = load_task(rec.task)
    from taskdata.augment import preprocess_eval, to_tensor

    x = to_tensor(data.test_x[..., None] if data.test_x.ndim == 3 else data.test_x, torch.device("cpu"))
    ws = []
    with torch.inference_mode():
        for i in range(0, len(x), 512):
            inputs = {s: preprocess_eval(x[i:i + 512], s) for s in m.image_sizes}
            outs = m.module.path_outputs(inputs)
            ws.append(m.module.route(outs[0]))
    w = torch.cat(ws).mean(0).tolist()
    return {"paths": path_tasks, "mean_weight": [round(v, 4) for v in w],
            "borrowed": {t: round(v, 4) for t, v in zip(path_tasks[1:], w[1:])}}


def measure_speed(store_path: str, task: str, preset_name: str, seed: int = 0) -> dict:
    """Seconds per training image: a multipath child vs a top-block single-path child (docstring)."""
    import torch

    from agents import multipath_generation as mg
    from agents.config import resolve_preset
    from agents.generation import Context, Counters
    from agents.methods import QualityScorer
    from agents.paths import copy_component
    from agents.prefix_cache import PrefixCache
    from agents.training import TaskTensors, train_child
    from agents.view import SystemView
    from agents.vit import preset_vit
    from store import Store
    from taskdata import load_task

    preset = resolve_preset(preset_name)
    vit = preset_vit(preset)
    b = preset.budget
    dev = torch.device("cpu")
    data = TaskTensors(load_task(task), dev, b.validation_examples)
    sbv = preset.steps_between_validations(data.n_train)
    out: dict = {"task": task, "top_block_steps_per_child": sbv * b.validations_per_child,
                 "batch_size": b.batch_size, "threads": torch.get_num_threads()}
    with Store.open(store_path, readonly=True) as st:
        view = SystemView(st, "bench~speed", dev)
        view.refresh()
        main = view.published[task]
        # single-path child: the task's model with its top block, final norm and head trainable
        top = {f"encoderblock_{int(main.hparams['num_layers']) - 1}", "encoder_norm", "head"}
        cache = PrefixCache()
        runs = []
        for attempt in range(2):
            comps = {n: (copy_component(c, "bench~speed", i) if n in top else c)
                     for i, (n, c) in enumerate(main.components.items())}
            h = {k: v for k, v in main.hparams.items()}
            for k in ("ds_area_range_min", "ds_aspect_ratio_range_min"):
                h[k] = 1.0
            h.update(ds_flip_left_right=False, ds_brightness_delta=0.0, ds_contrast_delta=0.0,
                     ds_saturation_delta=0.0, ds_hue_delta=0.0, ds_quality_delta=0.0)
            from agents.paths import ModelPath

            child = ModelPath("bench~speed:m0", "bench~speed", task, h, comps)
            r, _ = train_child(child, vit, data, batch_size=b.batch_size, steps_between_validations=sbv,
                               validations=b.validations_per_child, threshold=-1.0, score_of=float,
                               gen=torch.Generator().manual_seed(seed), cache=cache)
            runs.append(r.seconds / r.train_images)
        out["top_block_s_per_image"] = {"cold": runs[0], "warm": runs[1]}
        # multipath child: a fresh one from the task's model, the same paths both times
        ctx = Context("bench~speed", task, preset, vit, 1, data, view, QualityScorer(preset, vit),
                      probe_cache={}, prefix_cache=mg.PathOutputs(256 << 20))
        runs = []
        for attempt in range(2):
            p = mg.propose(ctx, Counters(0, 0, 0, 0, {}), [], random.Random(seed),
                           torch.Generator().manual_seed(seed))
            o = mg.train(ctx, p, torch.Generator().manual_seed(seed))
            runs.append(o.result.seconds / o.result.train_images)
        out["multipath_s_per_image"] = {"cold": runs[0], "warm": runs[1]}
        out["multipath_paths"] = [view.path(r).task for r in p.child.refs]
        out["multipath_steps_per_child"] = o.result.steps
    out["multipath_vs_top_block_per_image"] = out["top_block_s_per_image"]["warm"] / \
        out["multipath_s_per_image"]["warm"]
    out["multipath_vs_top_block_per_image_cold"] = out["top_block_s_per_image"]["cold"] / \
        out["multipath_s_per_image"]["cold"]
    return out


def _spent(store_path: str, agent_prefix: str, from_cycle: int) -> dict:
    """What the added cycle cost: the trials of ``agent_prefix`` agents from cycle ``from_cycle`` on."""
    from store import Store

    with Store.open(store_path, readonly=True) as st:
        trials = [t for t in st.trials() if t.agent.startswith(agent_prefix) and t.cycle >= from_cycle]
    flops = common.add_flops([t.flops for t in trials])
    return {"children": len(trials), "train_images": sum(t.train_images for t in trials),
            "flops": flops, "seconds": round(sum(t.seconds for t in trials), 1)}


def run(args) -> dict:
    base = args.base
    tasks = sorted(_tests(base, "single"))
    cycles = _cycles(base)
    _say(f"base {base}: {len(tasks)} tasks at {cycles} cycles, preset {args.preset}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.control_store:
        control = args.control_store
    else:
        control = str(work / "control")
        _copy(base, control)
        _say("control: one more single-path cycle per task")
        common.run_swarm(control, tasks, args.preset, cycles=cycles + 1, prefix="multipath",
                         log_path=str(work / "control.log"))
    mp_store = str(work / "multipath")
    if not args.reuse_multipath:
        _copy(base, mp_store)
        _say("multipath: one multipath cycle per task")
        t0 = time.perf_counter()
        common.run_swarm(mp_store, tasks, args.preset, cycles=args.multipath_cycles, prefix="multipath",
                         log_path=str(work / "multipath.log"), extra_args=["--kinds", "multipath"])
        mp_wall = time.perf_counter() - t0
    else:
        mp_wall = None
    base_m, control_m = _tests(base, "single"), _tests(control, "single")
    mp_m, best_m = _tests(mp_store, "multipath"), _tests(mp_store, None)
    per_task, weights, sizes = {}, {}, {}
    for t in tasks:
        per_task[t] = {"single_path": base_m[t].metrics.get("test_quality"),
                       "control": control_m[t].metrics.get("test_quality"),
                       "multipath": mp_m[t].metrics.get("test_quality") if t in mp_m else None,
                       "best": best_m[t].metrics.get("test_quality"),
                       "best_kind": best_m[t].kind,
                       "val": {"single_path": base_m[t].metrics.get("quality"),
                               "control": control_m[t].metrics.get("quality"),
                               "multipath": mp_m[t].metrics.get("quality") if t in mp_m else None}}
        if t in mp_m:
            m = mp_m[t].metrics
            sizes[t] = {"trained_params": m.get("params"), "activated_params": m.get("activated_params"),
                        "flops_per_image": m.get("flops"), "num_paths": mp_m[t].hparams.get("num_paths"),
                        "single_path_params": base_m[t].metrics.get("params"),
                        "single_path_flops_per_image": base_m[t].metrics.get("flops")}
            weights[t] = router_weights(mp_store, mp_m[t].id)
    mean = {k: sum(per_task[t][k] for t in tasks) / len(tasks)
            for k in ("single_path", "control", "best")}
    with_mp = [t for t in tasks if per_task[t]["multipath"] is not None]
    mean["multipath"] = sum(per_task[t]["multipath"] for t in with_mp) / max(1, len(with_mp))
    quality = json.loads((RESULTS / "quality.json").read_text()) if (RESULTS / "quality.json").exists() else {}
    joint = quality.get("methods", {}).get("joint", {}).get("mean_test_accuracy")
    speed = None
    if not args.no_speed:
        _say("speed: multipath child vs top-block child per training image")
        speed = measure_speed(mp_store, args.speed_task, args.preset)
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "base_store": base, "preset": args.preset, "base_cycles": cycles,
        "added_budget": {"control_cycles": 1, "multipath_cycles": args.multipath_cycles,
                         "note": "the control: one more single-path cycle per task; multipath: "
                                 "multipath_cycles cycles of the same number of children, each "
                                 "training STEPS_SCALE x the single-path child's steps; the FLOPs each "
                                 "spent are under spent"},
        "tasks": per_task, "mean": mean, "joint": joint,
        "gain_best_vs_single_path": mean["best"] - mean["single_path"],
        "gain_best_vs_control": mean["best"] - mean["control"],
        "router_weights": {t: w["borrowed"] for t, w in weights.items()},
        "router_detail": weights, "sizes": sizes,
        "spent": {"control": _spent(control, "agent~", cycles),
                  "multipath": _spent(mp_store, "multipath~", 0)},
        "multipath_wall_seconds": mp_wall,
        "speed": speed, "machine": common.machine_info(), "harness_seconds": time.time() - started,
    }


def markdown(r: dict) -> str:
    tasks = sorted(r["tasks"])
    rows = [[t, common.fmt(r["tasks"][t]["single_path"]), common.fmt(r["tasks"][t]["control"]),
             common.fmt(r["tasks"][t]["multipath"]), common.fmt(r["tasks"][t]["best"]),
             r["tasks"][t]["best_kind"],
             ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["router_weights"].get(t, {}).items(),
                                                         key=lambda kv: -kv[1])) or "-"]
            for t in tasks]
    rows.append(["**mean**", common.fmt(r["mean"]["single_path"]), common.fmt(r["mean"]["control"]),
                 common.fmt(r["mean"]["multipath"]), common.fmt(r["mean"]["best"]), "", ""])
    out = [f"# Multipath agents on a grown system\n\n`{r['command']}`\n",
           f"Base: `{r['base_store']}` ({r['base_cycles']} cycles of `{r['preset']}`); added per task: "
           f"one single-path cycle (control), {r['added_budget']['multipath_cycles']} multipath "
           f"cycle(s) of as many children (multipath). Joint backbone (quality benchmark): "
           f"{common.fmt(r['joint'])}.\n",
           common.md_table(["task", "single-path", "control (+1 cycle)", "multipath", "best of both",
                            "served kind", "router weight per borrowed task"], rows),
           "\nSizes of the multipath models (trained = router + connectors; activated = everything a "
           "forward runs):\n",
           common.md_table(["task", "paths", "trained", "activated", "FLOPs/image",
                            "single-path params", "single-path FLOPs/image"],
                           [[t, s["num_paths"], s["trained_params"], s["activated_params"],
                             s["flops_per_image"], s["single_path_params"],
                             s["single_path_flops_per_image"]] for t, s in sorted(r["sizes"].items())]),
           f"\nSpent: control {r['spent']['control']}, multipath {r['spent']['multipath']}.\n",
           (f"Speed on {r['speed']['task']}: a multipath child trains "
            f"{r['speed']['multipath_vs_top_block_per_image']:.1f}x faster per image than a top-block "
            f"child with the prefix cache (warm; cold, including the cache fills: "
            f"{r['speed']['multipath_vs_top_block_per_image_cold']:.1f}x).\n" if r["speed"] else "")]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a finished swarm store (not modified)")
    p.add_argument("--work", required=True, help="folder for the two copies and logs")
    p.add_argument("--control-store", default=None, help="a finished control run to reuse")
    p.add_argument("--reuse-multipath", action="store_true", help="reuse WORK/multipath as it is")
    p.add_argument("--preset", default="cpu+hurdle")
    p.add_argument("--speed-task", default="glyphs_greek")
    p.add_argument("--multipath-cycles", type=int, default=1, help="multipath cycles per task (default 1)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    r = run(args)
    out = Path(args.out)
    common.write_json(out / "multipath.json", r)
    common.write_text(out / "multipath.md", markdown(r))
    _say(f"mean test: single-path {r['mean']['single_path']:.4f}, control {r['mean']['control']:.4f}, "
         f"multipath {r['mean']['multipath']:.4f}, best {r['mean']['best']:.4f}; joint {r['joint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
