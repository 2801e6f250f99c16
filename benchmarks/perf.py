#!/usr/bin/env python3
"""Performance ratios of the framework, all measured in one run (medians, warm-up excluded).

    python benchmarks/perf.py --quick            # under two minutes
    python benchmarks/perf.py                    # more repeats, demo-preset swarm runs
    python benchmarks/perf.py --smoke --out DIR  # the smallest run (the test suite's)

Writes ``OUT/perf.json`` and ``OUT/perf.md``. Every ratio > 1 means the first named is faster (or,
for bytes, larger):

* ``train_vs_bare_loop``: images/s of ``agents.training.train_child`` on a realistic child (top block
  and final norm cloned, fresh head, everything else shared and frozen), with an ``on_step`` that
  polls a real PeerBus as an agent does, / images/s of a hand-written PyTorch loop on the same
  PathModel with the same batches, steps, schedule, clipping and validations (validation included
  in both; the framework's best-checkpoint snapshots and bus polls are its own cost).
* ``cached_vs_uncached_top_only_child``: seconds of that child in ``train_child`` without a prefix
  cache / with the agent's cache already holding its frozen prefix (an earlier child with the same
  frozen components filled it); ``cold_cached_vs_uncached_top_only_child``: the same with a fresh cache
  whose fills the child pays.
* ``swarm_children_per_min_cached_vs_uncached``: children per minute of the 2-agent swarm / of the
  same swarm with ``--prefix-cache-mb 0`` (mean test accuracy of both reported beside it).
* ``top_only_vs_full_step_speed``: step time with every component trainable / step time with only
  the top block, final norm and head trainable (same bare loop, no validation).
* ``store_load_vs_torch_load_speed``: ``torch.load`` of a state-dict file / ``Store.load_model_tensors``
  + ``agents.view.from_raw``, for the same tensors (a published model's params and momentum).
* ``two_agents_vs_one_throughput``: children per minute of a 2-agent swarm (1 thread each) / of a
  1-agent swarm (1 thread), counted from the stores' trials (first child start to last child commit).
* ``store_bytes_vs_checkpoints``: bytes of every blob the store keeps for all tasks' current models
  (params + momentum, each distinct tensor once) / bytes of ``torch.save`` of each current model as a
  standalone state dict. The whole ``data.mdb`` (history included) is reported beside it.
* ``latency_ms.publish_to_peer_refresh_median``: commit returns in one process -> the other process
  has received the ``Published`` message and finished ``SystemView.refresh()``.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import common
from benchmarks.common import BenchmarkError, fmt, log, md_table, median

PUBLISHER, LISTENER, LATENCY_TASK = "bench~publisher", "bench~listener", "bench_latency"


@dataclass(frozen=True)
class Mode:
    swarm_preset: str     # preset of the 1-agent / 2-agent swarm runs
    swarm_cycles: int
    child_preset: str     # budget of the child in the training micro-benchmarks
    repeats: int          # timed rounds of each training variant
    load_repeats: int
    publishes: int


MODES = {
    "smoke": Mode("test", 1, "test", 2, 5, 10),
    "quick": Mode("test", 4, "demo", 5, 30, 50),
    "full": Mode("demo", 1, "demo", 9, 100, 200),
}
SWARM_TASKS = ("mnist5k", "glyphs_latin")  # same per-child cost: both have >= 2,048 train images


def _say(message: str) -> None:
    log("perf", message)


# ---- training: framework vs bare loop, top-only vs full ------------------------------------------

def _child(root, vit, preset, num_classes: int, clone_all: bool, seed: int):
    import torch

    from agents.vit import component_names
    from benchmarks.baselines import build_path, task_hparams

    h = task_hparams(preset, vit, num_classes)
    clone = set(component_names(h)) if clone_all else {f"encoderblock_{vit.depth - 1}", "encoder_norm"}
    return build_path(root, vit, h, clone=clone, agent="bench~child", task="bench",
                      gen=torch.Generator().manual_seed(seed))


def bare_loop(child, vit, data, batch_size: int, steps: int, validate_every: int,
              seed: int) -> common.Timing:
    """A hand-written loop over the same PathModel; returns its time (model build included)."""
    import torch
    import torch.nn.functional as F

    from taskdata.augment import augment_train
    from agents.training import lr_at
    from agents.vit import PathModel

    with common.Stopwatch() as watch:
        h = child.hparams
        trainable = {n for n, c in child.components.items() if not c.stored}
        model = PathModel(vit, h, {n: c.params for n, c in child.components.items()}, trainable)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=h["opt_lr"], momentum=h["opt_momentum"])
        gen = torch.Generator().manual_seed(seed)
        batches = data.batch_indices(batch_size, gen)
        size = h["ds_image_size"]
        val_x, val_y = data.val_inputs(size), data.val_y
        for step in range(steps):
            idx = next(batches)
            x = augment_train(data.train_x[idx], h, size, gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, h["opt_lr"], h["opt_lr_warmup_ratio"])
            loss = F.cross_entropy(model(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if validate_every and (step + 1) % validate_every == 0:
                with torch.inference_mode():
                    hits = sum(int((model(val_x[i:i + 512]).argmax(-1) == val_y[i:i + 512]).sum())
                               for i in range(0, len(val_y), 512))
                assert 0 <= hits <= len(val_y)
    return watch.timing


def measure_training(mode: Mode, root, task: str, seed: int) -> dict:
    import torch

    from taskdata import load_task
    from agents.training import TaskTensors, train_child
    from protocol.bus import PeerBus

    preset, vit = common.vit_for(mode.child_preset)
    b = preset.budget
    data = TaskTensors(load_task(task), torch.device("cpu"), b.validation_examples)
    sbv = preset.steps_between_validations(data.n_train)
    steps = sbv * b.validations_per_child

    bus = PeerBus("bench~trainer")  # an agent polls its bus between steps: part of its loop's cost

    def on_step() -> bool:
        bus.poll(0)
        return False

    def top_only_child(cache=None) -> common.Timing:
        """train_child on the top-only child (prefix cache off unless one is given)."""
        child = _child(root, vit, preset, data.num_classes, False, seed)
        with common.Stopwatch() as watch:
            result, _ = train_child(child, vit, data, batch_size=b.batch_size, on_step=on_step,
                                    steps_between_validations=sbv, validations=b.validations_per_child,
                                    threshold=-math.inf, score_of=float,
                                    gen=torch.Generator().manual_seed(seed), cache=cache)
        assert result.steps == steps
        return watch.timing

    def bare() -> common.Timing:
        return bare_loop(_child(root, vit, preset, data.num_classes, False, seed), vit, data,
                         b.batch_size, steps, sbv, seed)

    _say(f"train_child vs bare loop: {steps} steps x {b.batch_size} images, {mode.repeats} rounds")
    try:
        t = common.interleaved_times({"framework": top_only_child, "bare": bare}, mode.repeats)
        c = _cached_child_times(mode, top_only_child, top_only_child)
    finally:
        bus.close()
    images = steps * b.batch_size
    fw, bare_ = t["framework"], t["bare"]

    def step_time(clone_all: bool):
        return lambda: bare_loop(_child(root, vit, preset, data.num_classes, clone_all, seed), vit,
                                 data, b.batch_size, sbv, 0, seed)

    _say(f"top-only vs full fine-tuning: {sbv} steps x {b.batch_size} images, {mode.repeats} rounds")
    s = common.interleaved_times({"full": step_time(True), "top_only": step_time(False)}, mode.repeats)
    ms = {k: [1000 * x / sbv for x in common.wall(v)] for k, v in s.items()}
    return {"task": task, "child_preset": mode.child_preset, "batch_size": b.batch_size,
            "steps": steps, "validations": b.validations_per_child,
            "validation_examples": int(len(data.val_y)), "validation_included": "both",
            "framework_images_per_s": images / median(common.wall(fw)),
            "bare_images_per_s": images / median(common.wall(bare_)),
            "framework_seconds": common.wall(fw), "bare_seconds": common.wall(bare_),
            "framework_cpu_seconds": common.cpu(fw), "bare_cpu_seconds": common.cpu(bare_),
            "full_step_ms": median(ms["full"]), "top_only_step_ms": median(ms["top_only"]),
            "full_step_ms_all": ms["full"], "top_only_step_ms_all": ms["top_only"],
            "top_only_child_uncached_seconds": common.wall(c["uncached"]),
            "top_only_child_warm_cache_seconds": common.wall(c["warm"]),
            "top_only_child_cold_cache_seconds": common.wall(c["cold"]),
            "ratio_cached_top_only": median(common.wall(c["uncached"])) / median(common.wall(c["warm"])),
            "ratio_cold_cached_top_only": median(common.wall(c["uncached"])) / median(common.wall(c["cold"])),
            "ratio_train": median(common.wall(bare_)) / median(common.wall(fw)),
            "ratio_train_cpu_time": median(common.cpu(bare_)) / median(common.cpu(fw)),
            "ratio_top": median(ms["full"]) / median(ms["top_only"]),
            "ratio_top_cpu_time": median(common.cpu(s["full"])) / median(common.cpu(s["top_only"]))}


def _cached_child_times(mode: Mode, uncached: Callable[[], common.Timing],
                        train_with: Callable[[object], common.Timing]) -> dict:
    """Timings of one top-only child: no cache; a warm cache (the agent's cache already holds the
    child's frozen prefix because an earlier child of the lineage filled it: the steady state);
    a cold one (a fresh cache, its fills paid by this child)."""
    from agents.prefix_cache import PrefixCache

    warm = PrefixCache()
    _say(f"top-only child, prefix cache none / warm / cold: {mode.repeats} rounds")
    return common.interleaved_times({"uncached": uncached, "warm": lambda: train_with(warm),
                                     "cold": lambda: train_with(PrefixCache())}, mode.repeats)


# ---- store: load speed, bytes on disk --------------------------------------------------------------

def measure_store(store_path: str, tasks: list[str], repeats: int, workdir: str) -> dict:
    import torch

    from agents.roots import timm_state_dict
    from agents.view import from_raw
    from store import Store

    cpu = torch.device("cpu")
    with Store.open(store_path, readonly=True) as store:
        model_id = store.get_task(tasks[0]).model_id

        def store_load() -> dict:
            return {cid: ({n: from_raw(t, cpu) for n, t in p.items()},
                          {n: from_raw(t, cpu) for n, t in m.items()})
                    for cid, (p, m) in store.load_model_tensors(model_id).items()}

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

        def store_load_zero_copy() -> dict:
            """What from_raw could cost: wrap the buffers the store already copied out, no 2nd copy."""
            return {cid: tuple({n: torch.frombuffer(t.data, dtype=dtypes[t.dtype]).reshape(t.shape)
                                for n, t in d.items()} for d in pm)
                    for cid, pm in store.load_model_tensors(model_id).items()}

        loaded = store_load()
        assert all(torch.equal(a, b) for cid, pm in store_load_zero_copy().items()
                   for d, e in zip(pm, loaded[cid]) for a, b in zip(d.values(), e.values()))
        flat = {f"{cid}/{kind}/{n}": t for cid, pm in loaded.items()
                for kind, d in zip(("params", "momentum"), pm) for n, t in d.items()}
        pt_file = os.path.join(workdir, "model.pt")
        torch.save(flat, pt_file)
        again = torch.load(pt_file, map_location="cpu", weights_only=True)
        assert all(torch.equal(again[k], v) for k, v in flat.items())
        _say(f"store load vs torch.load: {len(flat)} tensors, {repeats} rounds")
        t = common.interleaved_times(
            {"store": store_load, "store_raw": lambda: store.load_model_tensors(model_id),
             "store_zero_copy": store_load_zero_copy,
             "torch": lambda: torch.load(pt_file, map_location="cpu", weights_only=True)},
            repeats, warmup=2)

        # bytes: distinct blobs of the current models vs standalone checkpoints of them
        blob_bytes, param_bytes, ckpt_bytes = {}, {}, 0
        for task in tasks:
            model = store.get_model(store.get_task(task).model_id)
            params = {}
            for cid in model.components:
                rec = store.get_component(cid)
                p, m = store.load_component_tensors(cid)
                for name, key in rec.tensors.items():
                    blob_bytes[key] = param_bytes[key] = p[name].nbytes
                for name, key in rec.momentum.items():
                    blob_bytes[key] = m[name].nbytes
                params[rec.name] = {n: from_raw(r, cpu) for n, r in p.items()}
            path = os.path.join(workdir, f"{task}.pt")
            torch.save(timm_state_dict(params, model.hparams), path)
            ckpt_bytes += os.path.getsize(path)
        stats = store.stats()
    return {"model_id": model_id, "tensors": len(flat),
            "tensor_bytes": sum(v.numel() * v.element_size() for v in flat.values()),
            "store_load_ms": 1000 * median(common.wall(t["store"])),
            "torch_load_ms": 1000 * median(common.wall(t["torch"])),
            "store_load_without_from_raw_ms": 1000 * median(common.wall(t["store_raw"])),
            "store_load_zero_copy_ms": 1000 * median(common.wall(t["store_zero_copy"])),
            "store_current_models_blob_bytes": sum(blob_bytes.values()),
            "store_current_models_param_bytes": sum(param_bytes.values()),
            "store_data_mdb_bytes": stats["file_bytes"], "store_used_bytes": stats["used_bytes"],
            "store_all_blob_bytes": stats["blob_bytes"], "store_counts": stats["counts"],
            "checkpoint_bytes": ckpt_bytes}


# ---- publish -> peer refresh latency -------------------------------------------------------------

def listener_main(store_path: str, endpoint: str, results, ready) -> None:
    """Spawned process: a SystemView + PeerBus loop, like an agent between training steps."""
    import torch

    from agents.view import SystemView
    from protocol.bus import PeerBus
    from protocol.messages import Bye, Hello, Published
    from store import Store

    torch.set_num_threads(1)
    with Store.open(store_path, readonly=True) as store, PeerBus(LISTENER) as bus:
        view = SystemView(store, LISTENER, torch.device("cpu"))
        view.refresh()
        bus.set_peers({PUBLISHER: endpoint})
        while True:
            for msg in bus.poll(1000):
                if isinstance(msg, Hello):
                    ready.set()
                elif isinstance(msg, Published):
                    view.refresh()
                    results.put((msg.seq, (time.time() - msg.time) * 1000.0,
                                 view.published[msg.task].id == msg.model_id))
                elif isinstance(msg, Bye):
                    return


def measure_latency(publishes: int, workdir: str, seed: int) -> dict:
    """Main process commits + announces (a new top block, norm and head each time); a spawned
    listener refreshes its view on each announcement and reports the delay."""
    import numpy as np

    from agents.vit import param_shapes
    from benchmarks.baselines import task_hparams
    from protocol.bus import PeerBus
    from protocol.messages import Bye, Hello, Published
    from protocol.tensors import RawTensor
    from store import ComponentWrite, ModelRecord, Publication, Store, component_id

    preset, vit = common.vit_for("test")
    path = os.path.join(workdir, "latency_store")
    common.ensure_store_with_root(path, "test", seed)
    rng = np.random.default_rng(seed)
    h = task_hparams(preset, vit, 10)
    fresh = [f"encoderblock_{vit.depth - 1}", "encoder_norm", "head"]
    ctx = mp.get_context("spawn")
    results, ready = ctx.Queue(), ctx.Event()
    with Store.open(path) as store, PeerBus(PUBLISHER) as bus:
        root = store.get_model(store.root_model_id())
        shared = [cid for cid in root.components if store.get_component(cid).name not in fresh]
        token = store.acquire_lease(PUBLISHER, LATENCY_TASK, ttl=600, host="localhost", pid=os.getpid(),
                                    device="cpu", endpoint=bus.endpoint, preset="test")
        proc = ctx.Process(target=listener_main, args=(path, bus.endpoint, results, ready))
        proc.start()
        latencies, consistent = [], True
        try:
            deadline = time.time() + 120
            while not ready.is_set():  # PUB/SUB drops what is sent before the SUB connected
                if time.time() > deadline or not proc.is_alive():
                    raise BenchmarkError("the latency listener never came up")
                bus.send(Hello(agent_id=PUBLISHER, task=LATENCY_TASK, endpoint=bus.endpoint,
                               pid=os.getpid(), host="localhost"))
                ready.wait(0.1)
            for i in range(publishes):
                writes = []
                for j, name in enumerate(fresh):
                    tensors = {t: RawTensor.from_numpy(rng.standard_normal(s, dtype=np.float32))
                               for t, s in param_shapes(name, vit, h).items()}
                    writes.append(ComponentWrite.build(component_id(PUBLISHER, 3 * i + j), name,
                                                       PUBLISHER, tensors))
                model = ModelRecord(id=f"{PUBLISHER}:m{i}", task=LATENCY_TASK, agent=PUBLISHER,
                                    components=shared + [w.record.id for w in writes], hparams=h,
                                    metrics={}, parent=None, preset="test", preset_hash=preset.hash,
                                    created_at=time.time())
                seq = store.commit(PUBLISHER, token, components=writes, models=[model], publish=Publication(model.id, int(model.hparams["num_classes"]), {k: v for k, v in model.hparams.items() if k.startswith("ds_")}))
                bus.send(Published(agent_id=PUBLISHER, task=LATENCY_TASK, model_id=model.id, seq=seq,
                                   time=time.time()))
                got_seq, ms, ok = results.get(timeout=30)
                assert got_seq == seq
                latencies.append(ms)
                consistent &= ok
            bus.send(Bye(agent_id=PUBLISHER, task=LATENCY_TASK, reason="done"))
            proc.join(10)
        finally:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    s = sorted(latencies)
    return {"publishes": publishes, "median_ms": median(latencies), "p90_ms": s[int(0.9 * (len(s) - 1))],
            "min_ms": s[0], "max_ms": s[-1], "view_saw_the_published_model": consistent,
            "new_components_per_publish": fresh}


# ---- main ------------------------------------------------------------------------------------------

def _mean_test(store_path: str, tasks: list[str]) -> float:
    from store import Store

    with Store.open(store_path, readonly=True) as store:
        pub = store.published_models()
        return sum(float(pub[t].metrics["test_quality"]) for t in tasks) / len(tasks)


def run(args, mode_name: str) -> dict:
    import torch

    from store import Store

    mode = MODES[mode_name]
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="perf_")
    out: dict = {"mode": mode_name, "settings": asdict(mode), "machine": common.machine_info(args.threads),
                 "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        one, two = os.path.join(work, "swarm1"), os.path.join(work, "swarm2")
        tasks = list(SWARM_TASKS)
        _say(f"swarm, 1 agent ({tasks[0]}), preset {mode.swarm_preset}, {mode.swarm_cycles} cycle(s)")
        run1 = common.run_swarm(one, tasks[:1], mode.swarm_preset, cycles=mode.swarm_cycles,
                                seed=args.seed, threads=1, prefix="perf")
        _say(f"swarm, 2 agents ({','.join(tasks)}), same preset")
        run2 = common.run_swarm(two, tasks, mode.swarm_preset, cycles=mode.swarm_cycles,
                                seed=args.seed, threads=1, prefix="perf")
        nocache = os.path.join(work, "swarm2_nocache")
        _say(f"swarm, 2 agents ({','.join(tasks)}), same preset, prefix cache off")
        run3 = common.run_swarm(nocache, tasks, mode.swarm_preset, cycles=mode.swarm_cycles,
                                seed=args.seed, threads=1, prefix="perf",
                                extra_args=["--prefix-cache-mb", "0"])
        c3 = common.swarm_throughput(nocache, tasks)
        c1, c2 = common.swarm_throughput(one, tasks[:1]), common.swarm_throughput(two, tasks)
        out["swarm"] = {"preset": mode.swarm_preset, "cycles": mode.swarm_cycles, "threads_per_agent": 1,
                        "one_agent": {**c1, "wall_seconds": run1.wall_seconds},
                        "two_agents": {**c2, "wall_seconds": run2.wall_seconds,
                                       "mean_test_accuracy": _mean_test(two, tasks)},
                        "two_agents_no_cache": {**c3, "wall_seconds": run3.wall_seconds,
                                                "mean_test_accuracy": _mean_test(nocache, tasks)}}
        _say(f"children/min: 1 agent {c1['children_per_min']:.1f}, 2 agents {c2['children_per_min']:.1f}")
        out["store"] = measure_store(two, tasks, mode.load_repeats, work)
        with Store.open(one, readonly=True) as store:
            root = common.load_root(store).root
        out["training"] = measure_training(mode, root, tasks[0], args.seed)
        _say(f"latency: {mode.publishes} publishes")
        out["latency"] = measure_latency(mode.publishes, work, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tr, st = out["training"], out["store"]
    out["ratios"] = {
        "train_vs_bare_loop": tr["ratio_train"],
        "top_only_vs_full_step_speed": tr["ratio_top"],
        "train_vs_bare_loop_cpu_time": tr["ratio_train_cpu_time"],
        "top_only_vs_full_step_speed_cpu_time": tr["ratio_top_cpu_time"],
        "store_load_vs_torch_load_speed": st["torch_load_ms"] / st["store_load_ms"],
        "two_agents_vs_one_throughput": out["swarm"]["two_agents"]["children_per_min"]
        / out["swarm"]["one_agent"]["children_per_min"],
        "cached_vs_uncached_top_only_child": tr["ratio_cached_top_only"],
        "cold_cached_vs_uncached_top_only_child": tr["ratio_cold_cached_top_only"],
        "swarm_children_per_min_cached_vs_uncached": out["swarm"]["two_agents"]["children_per_min"]
        / out["swarm"]["two_agents_no_cache"]["children_per_min"],
        "store_bytes_vs_checkpoints": st["store_current_models_blob_bytes"] / st["checkpoint_bytes"],
        "store_param_bytes_vs_checkpoints": st["store_current_models_param_bytes"] / st["checkpoint_bytes"],
        "store_file_bytes_vs_checkpoints": st["store_data_mdb_bytes"] / st["checkpoint_bytes"],
    }
    out["latency_ms"] = {"publish_to_peer_refresh_median": out["latency"]["median_ms"],
                         "publish_to_peer_refresh_p90": out["latency"]["p90_ms"]}
    return out


def markdown(r: dict) -> str:
    ra, tr, st, sw = r["ratios"], r["training"], r["store"], r["swarm"]
    rows = [
        ("train_vs_bare_loop", ra["train_vs_bare_loop"], ">= 0.95",
         f"{tr['framework_images_per_s']:.0f} vs {tr['bare_images_per_s']:.0f} images/s "
         f"({tr['steps']} steps x {tr['batch_size']}, {tr['validations']} validations in both); "
         f"by CPU time: {tr['ratio_train_cpu_time']:.3f}"),
        ("top_only_vs_full_step_speed", ra["top_only_vs_full_step_speed"], "> 1",
         f"{tr['full_step_ms']:.1f} ms vs {tr['top_only_step_ms']:.1f} ms per step; "
         f"by CPU time: {tr['ratio_top_cpu_time']:.3f}"),
        ("store_load_vs_torch_load_speed", ra["store_load_vs_torch_load_speed"], "> 1",
         f"{st['store_load_ms']:.2f} ms vs {st['torch_load_ms']:.2f} ms, {st['tensors']} tensors, "
         f"{st['tensor_bytes'] / 1e6:.1f} MB (store read alone: "
         f"{st['store_load_without_from_raw_ms']:.2f} ms; + torch.frombuffer on its buffers instead "
         f"of from_raw's extra copy: {st['store_load_zero_copy_ms']:.2f} ms)"),
        ("two_agents_vs_one_throughput", ra["two_agents_vs_one_throughput"], "~2 on 2 cores",
         f"{sw['two_agents']['children_per_min']:.1f} vs {sw['one_agent']['children_per_min']:.1f} "
         f"children/min ({sw['preset']} preset, 1 thread per agent; span overlap "
         f"{sw['two_agents']['overlap']:.2f}; union-span rate "
         f"{sw['two_agents']['children_per_min_union_span']:.1f})"),
        ("cached_vs_uncached_top_only_child", ra["cached_vs_uncached_top_only_child"], ">= 1.6",
         f"one child training its top block, norm and head ({tr['steps']} steps x {tr['batch_size']}, "
         f"{tr['validations']} validations): {median(tr['top_only_child_uncached_seconds']):.2f} s "
         f"without a cache vs {median(tr['top_only_child_warm_cache_seconds']):.2f} s with the agent's "
         f"cache already holding its frozen prefix (an earlier child of the lineage filled it)"),
        ("cold_cached_vs_uncached_top_only_child", ra["cold_cached_vs_uncached_top_only_child"], "> 1",
         f"the same child with a fresh cache, its fills included: "
         f"{median(tr['top_only_child_cold_cache_seconds']):.2f} s"),
        ("swarm_children_per_min_cached_vs_uncached", ra["swarm_children_per_min_cached_vs_uncached"],
         ">= 1.3", f"{sw['two_agents']['children_per_min']:.1f} vs "
         f"{sw['two_agents_no_cache']['children_per_min']:.1f} children/min (2 agents, "
         f"--prefix-cache-mb 0 for the second); mean test accuracy "
         f"{sw['two_agents']['mean_test_accuracy']:.4f} vs {sw['two_agents_no_cache']['mean_test_accuracy']:.4f}"),
        ("store_bytes_vs_checkpoints", ra["store_bytes_vs_checkpoints"], "< 1",
         f"{st['store_current_models_blob_bytes'] / 1e6:.2f} MB of distinct blobs (params + momentum) "
         f"vs {st['checkpoint_bytes'] / 1e6:.2f} MB of torch.save files"),
        ("store_param_bytes_vs_checkpoints", ra["store_param_bytes_vs_checkpoints"], "< 1",
         f"{st['store_current_models_param_bytes'] / 1e6:.2f} MB of distinct parameter blobs"),
        ("store_file_bytes_vs_checkpoints", ra["store_file_bytes_vs_checkpoints"], "-",
         f"whole data.mdb {st['store_data_mdb_bytes'] / 1e6:.2f} MB (all history, free pages)"),
    ]
    lat = r["latency"]
    rec = {**sw["two_agents"]["agents_recorded_refresh_latency_ms"]}
    lines = [f"# Performance ({r['mode']} mode)", "",
             f"Machine: {r['machine']['cpu_count']} cores (shared), torch {r['machine']['torch']}, "
             f"{r['machine']['torch_threads']} torch thread(s) for the micro-benchmarks, load average "
             f"at start {r['machine']['load_average_at_start']}. Ratios > 1: the first named is "
             f"faster (bytes: larger).", "",
             md_table(["ratio", "value", "target", "measured"],
                      [(n, fmt(v, 3), t, m) for n, v, t, m in rows], "lrll"), "",
             f"Publish -> peer refresh: median {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, "
             f"max {lat['max_ms']:.2f} ms over {lat['publishes']} publishes (commit returned -> "
             f"other process received `published` and finished `SystemView.refresh()`). The real "
             f"agents of the 2-agent run recorded (last announcement, includes waiting for the "
             f"current training step): {rec} ms.", "",
             "Share of each agent's span spent inside `train_child` (the rest is its work between "
             "children: building the child, test evaluation on publish, commits, refreshes): "
             + ", ".join(f"{t} {v:.2f}" for t, v in {**sw['one_agent']['train_fraction']}.items())
             + " (1 agent); "
             + ", ".join(f"{t} {v:.2f}" for t, v in sw['two_agents']['train_fraction'].items())
             + " (2 agents)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="perf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="under two minutes")
    size.add_argument("--smoke", action="store_true", help="smallest run, for the test suite")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the micro-benchmarks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="result directory")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise BenchmarkError("--threads must be >= 1")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    start = time.perf_counter()
    result = run(args, mode)
    result["harness_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    common.write_json(out / "perf.json", result)
    common.write_text(out / "perf.md", markdown(result))
    print(markdown(result))
    print(f"\nwrote {out / 'perf.json'} and {out / 'perf.md'} in {result['harness_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "perf.py", user_errors=(BenchmarkError,))
