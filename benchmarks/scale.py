"""An agent's memory and refresh time as the system grows: 8 vs 124 published ViT-B tasks.

Fills a real LMDB store through the store API with a root (the preset's ViT: 12 ViT-B blocks, hidden
768, MLP 3072, patch embedding, position embedding, class token, final norm) and one published model
per task. Each task's model clones a few blocks (``--cloned-blocks``, default 2-4: bfloat16 momentum
stored with them, as the agents store it), the final norm and its head, shares one block cloned by the
previous task, and shares everything else with the root. Weights are synthetic: random bytes made
once, each cloned tensor made distinct by a few changed bytes (blobs are content-addressed).

Then, in a fresh subprocess per measurement (so the peak RSS, /proc/self/status VmHWM, is clean),
an agent-like reader: a real ``SystemView`` for task 0's agent on the CPU, refreshed, then one
generation's worth of work: pick a parent (``select_parent``), build the child (``Mutator``), and
materialise the parent and every component of the child. Measured at ``--small`` (8) tasks and at
``--tasks`` (124), for the lazy view and, where it fits in memory, the eager view it replaced (the
``SystemView`` of commit ``EAGER_VIEW_COMMIT``, read with ``git show``). Also: a refresh after one
other agent published (median over ``--publishes``), store bytes on disk, ``verify`` and ``gc``.

    python benchmarks/scale.py [--tasks 124] [--small 8] [--eager-at 8,32] [--cloned-blocks 2-4]
                               [--preset vit-b] [--dir DIR] [--out benchmarks/results/scale.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
EAGER_VIEW_COMMIT = "f0c8664"  # the last commit whose SystemView loaded every published model
NUM_CLASSES = 10


# ---- filling the store --------------------------------------------------------------------------

class Weights:
    """Random bytes made once per shape; ``tensor(shape, tag)`` returns a copy with its first bytes
    overwritten by ``tag`` (distinct content address, no new random numbers)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.base: dict[tuple, np.ndarray] = {}

    def array(self, shape: tuple[int, ...], dtype: str, tag: int) -> np.ndarray:
        key = (tuple(shape), dtype)
        if key not in self.base:
            a = self.rng.standard_normal(int(np.prod(shape)) or 1, dtype=np.float32)[:int(np.prod(shape))]
            self.base[key] = (a.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else a
        out = self.base[key].copy()
        if out.size:
            out.view(np.uint8)[:8] = np.frombuffer(np.int64(tag).tobytes(), np.uint8)[:min(8, out.nbytes)]
        return out.reshape(shape)

    def raw(self, shape, dtype: str, tag: int):
        from protocol.tensors import RawTensor
        a = self.array(shape, dtype, tag)
        return RawTensor(dtype, tuple(int(d) for d in shape), memoryview(a).cast("B"))


def agent_of(i: int) -> tuple[str, str]:
    from agents.agent import agent_id_for
    task = f"task{i:03d}"
    return task, agent_id_for(task)


def fill_root(st, preset, vit, w: Weights) -> str:
    from agents import registry
    from agents.view import ROOT_AGENT
    from store import ComponentWrite, ModelRecord

    h = preset.default_hparams(None)
    h["num_layers"] = vit.depth
    writes = []
    for i, name in enumerate(registry.root_component_names(vit)):
        shapes = registry.param_shapes(name, vit, h)
        writes.append(ComponentWrite.build(f"{ROOT_AGENT}:{i}", name, ROOT_AGENT,
                                           {k: w.raw(s, "float32", 10**12 + i * 100 + j)
                                            for j, (k, s) in enumerate(sorted(shapes.items()))}))
    model = ModelRecord(id=f"{ROOT_AGENT}:m0", task="root", agent=ROOT_AGENT,
                        components=[x.record.id for x in writes], hparams=h,
                        metrics={"vit": vit.name, "hidden": vit.hidden, "depth": vit.depth,
                                 "patch": vit.patch, "source": "random"},
                        parent=None, preset=preset.name, preset_hash=preset.hash, created_at=time.time())
    return st.ensure_root(model, writes)


def publish_task(st, preset, vit, w: Weights, i: int, cloned: list[int], shared: dict[str, str],
                 seq: int = 0, parent: str | None = None) -> dict[str, str]:
    """Task i's agent commits and publishes one model: ``cloned`` blocks, the final norm and the head
    are its own (with bfloat16 momentum), ``shared`` (name -> key) come from others, the rest from
    the root. Returns the keys of its cloned blocks (name -> key)."""
    from agents import registry
    from agents.vit import component_names
    from store import ComponentWrite, ModelRecord, Publication

    task, agent = agent_of(i)
    root = st.get_model(st.root_model_id())
    root_keys = {st.get_component(k).name: k for k in root.components}
    h = preset.default_hparams(NUM_CLASSES)
    h["num_layers"] = vit.depth
    own = {f"encoderblock_{b}" for b in cloned} | {"encoder_norm", "head"}
    writes, keys, mine = [], [], {}
    for name in component_names(h):
        if name in own:
            cid = f"{agent}:{seq * 1000 + len(writes)}"
            tag = (i * 1000 + seq * 100 + len(writes)) * 1000
            shapes = sorted(registry.param_shapes(name, vit, h).items())
            params = {k: w.raw(s, "float32", tag + j) for j, (k, s) in enumerate(shapes)}
            mom = {k: w.raw(s, "bfloat16", tag + 500 + j) for j, (k, s) in enumerate(shapes)}
            writes.append(ComponentWrite.build(cid, name, agent, params, mom,
                                               cloned_from=root_keys.get(name)))
            keys.append(cid)
            if name.startswith("encoderblock_"):
                mine[name] = cid
        else:
            keys.append(shared.get(name, root_keys[name]))
    model = ModelRecord(id=f"{agent}:m{seq}", task=task, agent=agent, components=keys, hparams=h,
                        metrics={"quality": 0.5, "score": 0.5}, parent=parent or root.id,
                        preset=preset.name, preset_hash=preset.hash, created_at=time.time())
    token = st.acquire_lease(agent, task, ttl=600, host=platform.node(), pid=os.getpid(), device="cpu",
                             endpoint="", preset=preset.name)
    st.commit(agent, token, components=writes, models=[model],
              publish=Publication(model.id, NUM_CLASSES, {k: v for k, v in h.items() if k.startswith("ds_")},
                                  score=0.5))
    st.release_lease(agent, token)
    return mine


def disk_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


# ---- the agent-like reader (one subprocess per measurement) ------------------------------------------

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _eager_view_class():
    src = subprocess.run(["git", "show", f"{EAGER_VIEW_COMMIT}:agents/view.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="eager_view_")) / "eager_view.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("eager_view", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SystemView


def measure(args) -> dict:
    """Run in a fresh process: refresh an agent's view, then one generation's loads; peak RSS."""
    import torch

    from agents.config import resolve_preset
    from agents.mutation import Mutator
    from agents.selection import select_parent
    from agents.vit import preset_vit
    from store import Store

    torch.set_num_threads(1)
    preset = resolve_preset(args.preset, root="random")
    vit = preset_vit(preset)
    base_rss = _status("VmRSS")
    view_cls = _eager_view_class() if args.view == "eager" else None
    if view_cls is None:
        from agents.view import SystemView as view_cls
    task, agent = agent_of(0)
    out: dict = {"view": args.view, "baseline_rss_bytes": base_rss}
    with Store.open(args.measure, readonly=not args.publishes) as st:
        view = view_cls(st, agent, torch.device("cpu"))
        t0 = time.perf_counter()
        view.refresh()
        out["refresh_ms"] = (time.perf_counter() - t0) * 1e3
        out["tasks"] = len(view.published)
        out["rss_after_refresh_bytes"] = _status("VmRSS")
        out["anon_after_refresh_bytes"] = _status("RssAnon")
        out["file_after_refresh_bytes"] = _status("RssFile")
        t0 = time.perf_counter()
        view.refresh()
        out["second_refresh_ms"] = (time.perf_counter() - t0) * 1e3
        # one generation: parent (own best first, as a running agent), child, every tensor it trains on
        rng, gen = random.Random(0), torch.Generator().manual_seed(0)
        own = view.published[task]
        parent = select_parent([own], view.foreign_paths(), {}, rng)
        mut = Mutator(preset, vit, rng, gen)
        ds, _ = mut.sample_ds_hparams(own, NUM_CLASSES)
        ids = iter(range(10_000, 20_000))
        t0 = time.perf_counter()
        child = mut.build_child(parent, ds, agent_id=agent, task=task, child_id=f"{agent}:m9999",
                                next_component_id=lambda: next(ids), ancestors=view.ancestors,
                                is_frozen=view.is_frozen, device=torch.device("cpu"),
                                root_posemb=lambda: view.root.components["posembed_input"]
                                .params["pos_embedding"])
        for p in (parent, child):
            for c in p.components.values():
                c.params  # noqa: B018 (materialise)
        out["generation_load_ms"] = (time.perf_counter() - t0) * 1e3
        out["child_mutations"] = list(child.mutations)
        out["child_params"] = sum(c.num_params() for c in child.components.values())
        out["peak_rss_bytes"] = _status("VmHWM")
        # VmHWM counts the store's memory-mapped pages this process touched (clean page cache,
        # shared by every reader on the host) as well as its own memory (anonymous: the tensors)
        out["anon_bytes"] = _status("RssAnon")
        out["file_bytes"] = _status("RssFile")
        if hasattr(view, "loaded_bytes"):
            out["view_loaded_bytes"] = view.loaded_bytes()
            out["loads"] = dict(view.loads)
            view.prune([own])
            out["view_loaded_bytes_after_prune"] = view.loaded_bytes()
        if args.publishes:
            out["refresh_after_publish_ms"] = _refresh_after_publish(st, view, preset, vit, args)
    return out


def _refresh_after_publish(st, view, preset, vit, args) -> list[float]:
    """Another agent publishes one model (one cloned block + norm + head); time this view's refresh."""
    w = Weights(seed=7)
    times = []
    n = args.n
    for r in range(args.publishes):
        i = n - 1 - r
        publish_task(st, preset, vit, w, i, cloned=[vit.depth - 1], shared={}, seq=1 + r, parent=None)
        before = dict(getattr(view, "loads", {}))
        t0 = time.perf_counter()
        view.refresh()
        times.append((time.perf_counter() - t0) * 1e3)
        if before:
            assert view.loads["params"] == before["params"], "a refresh loaded tensors"
    return times


def run_measure(store: str, n: int, view: str, args, publishes: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--measure", store, "--view", view, "--preset", args.preset,
           "--n", str(n), "--publishes", str(publishes)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"view": view, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the benchmark -----------------------------------------------------------------------------------

def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def run(args) -> dict:
    from agents.config import resolve_preset
    from agents.vit import preset_vit
    from store import Store

    preset = resolve_preset(args.preset, root="random")
    vit = preset_vit(preset)
    lo, hi = parse_range(args.cloned_blocks)
    hi = min(hi, vit.depth)
    eager_at = sorted(int(x) for x in args.eager_at.split(",") if x) if args.eager_at else []
    checkpoints = sorted({args.small, args.tasks, *eager_at})
    workdir = tempfile.mkdtemp(prefix="scale_", dir=args.dir)
    path = os.path.join(workdir, "store")
    w = Weights(seed=0)
    rng = random.Random(0)
    config = {"preset": preset.name, "vit": {"name": vit.name, "hidden": vit.hidden, "mlp": vit.mlp,
                                             "depth": vit.depth, "patch": vit.patch},
              "tasks": args.tasks, "small": args.small, "eager_at": eager_at,
              "cloned_blocks_per_task": [lo, hi],
              "per_task": "cloned blocks (float32 + bfloat16 momentum), encoder_norm and head own; one "
                          "block shared from the previous task's clones; the rest from the root",
              "publishes_timed": args.publishes, "machine": {"platform": platform.platform(),
                                                             "cpu_count": os.cpu_count()},
              "eager_view_commit": EAGER_VIEW_COMMIT}
    out: dict = {"config": config, "tasks": {}, "eager": {}}
    t_start = time.perf_counter()
    try:
        with Store.open(path, create=True) as st:
            fill_root(st, preset, vit, w)
        prev: dict[str, str] = {}
        fill_seconds = 0.0
        done = 0
        for n in checkpoints:
            t0 = time.perf_counter()
            with Store.open(path) as st:
                for i in range(done, n):
                    k = lo + (i % (hi - lo + 1))
                    cloned = sorted(rng.sample(range(vit.depth), k))
                    shared = {name: key for name, key in prev.items()
                              if int(name.rsplit("_", 1)[1]) not in cloned}
                    shared = dict(list(shared.items())[:1])
                    prev = publish_task(st, preset, vit, w, i, cloned, shared)
            done = n
            fill_seconds += time.perf_counter() - t0
            print(f"[scale] {n} tasks filled ({fill_seconds:.0f}s, {disk_bytes(path) / 2**30:.1f} GiB)",
                  flush=True)
            if n in eager_at:
                # (publishes: the eager view's refresh after one publish too, then the fill goes on)
                out["eager"][str(n)] = run_measure(path, n, "eager", args, publishes=args.publishes)
                print(f"[scale] eager view at {n}: {_brief(out['eager'][str(n)])}", flush=True)
            # the lazy view at every checkpoint (the eager one only where it fits in memory)
            lazy = run_measure(path, n, "lazy", args)
            print(f"[scale] lazy view at {n}: {_brief(lazy)}", flush=True)
            t0 = time.perf_counter()
            with Store.open(path, readonly=True) as st:
                problems = st.verify()
            verify_s = time.perf_counter() - t0
            out["tasks"][str(n)] = {
                "agent_peak_rss_bytes": lazy.get("peak_rss_bytes"),
                "agent_anon_bytes": lazy.get("anon_bytes"),
                "refresh_ms": lazy.get("refresh_ms"),
                "store_bytes": disk_bytes(path),
                "verify_seconds": verify_s, "verify_problems": len(problems),
                "view": lazy}
        # one more publish by another agent, then this agent's refresh (at the largest n)
        after = run_measure(path, args.tasks, "lazy", args, publishes=args.publishes)
        times = after.get("refresh_after_publish_ms", [])
        out["refresh_after_publish_ms"] = statistics.median(times) if times else None
        out["refresh_after_publish_ms_all"] = times
        t0 = time.perf_counter()
        with Store.open(path) as st:
            counts = st.gc(grace_seconds=0)
        out["gc_seconds"] = time.perf_counter() - t0
        out["gc_counts"] = counts
        out["fill_seconds"] = fill_seconds
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    small, big = out["tasks"].get(str(args.small), {}), out["tasks"].get(str(args.tasks), {})
    ratio = anon_ratio = None
    if small.get("agent_peak_rss_bytes") and big.get("agent_peak_rss_bytes"):
        ratio = big["agent_peak_rss_bytes"] / small["agent_peak_rss_bytes"]
        anon_ratio = big["agent_anon_bytes"] / small["agent_anon_bytes"]
    out["peak_ratio_124_over_8"] = ratio  # the key names the default sizes (--tasks/--small)
    out["anon_ratio_124_over_8"] = anon_ratio
    out["targets"] = {"peak_ratio<=1.5": ratio is not None and ratio <= 1.5,
                      "refresh_after_publish_ms<=100": out["refresh_after_publish_ms"] is not None
                      and out["refresh_after_publish_ms"] <= 100}
    eager = {k: v for k, v in out["eager"].items() if "peak_rss_bytes" in v}
    if eager:
        out["before_after"] = {
            k: {"eager_peak_rss_bytes": v["peak_rss_bytes"], "eager_anon_bytes": v["anon_bytes"],
                "eager_refresh_ms": v["refresh_ms"],
                "eager_refresh_after_publish_ms": statistics.median(v.get("refresh_after_publish_ms") or [0]),
                "lazy_peak_rss_bytes": out["tasks"].get(k, {}).get("agent_peak_rss_bytes"),
                "lazy_anon_bytes": out["tasks"].get(k, {}).get("agent_anon_bytes"),
                "lazy_refresh_ms": out["tasks"].get(k, {}).get("refresh_ms")}
            for k, v in eager.items()}
    out["total_seconds"] = time.perf_counter() - t_start
    return out


def _brief(m: dict) -> str:
    if "error" in m:
        return "error: " + m["error"].strip().splitlines()[-1]
    return (f"peak {m['peak_rss_bytes'] / 2**20:.0f} MiB, refresh {m['refresh_ms']:.0f} ms, "
            f"generation loads {m['generation_load_ms']:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=124)
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--eager-at", default="8,32", help="task counts to measure the eager view at ('' = none)")
    ap.add_argument("--cloned-blocks", default="2-4", help="blocks each task clones: LO-HI (cycled)")
    ap.add_argument("--preset", default="vit-b")
    ap.add_argument("--publishes", type=int, default=5, help="publishes timed for refresh-after-publish")
    ap.add_argument("--dir", default=None, help="where the store is made (a temporary folder in it)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--measure", help=argparse.SUPPRESS)   # internal: one measurement subprocess
    ap.add_argument("--view", default="lazy", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("eager",)}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
