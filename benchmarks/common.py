"""Shared pieces of the benchmark harnesses: machine info, timing, result files, swarm runs, the root.

Both harnesses (``quality.py``, ``perf.py``) run the swarm the way a user does, as a
``launch/run_swarm.py`` subprocess, and then read what it did from its store (trials, current models).
Everything here is measurement plumbing; the things being measured live in ``agents`` and ``store``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never wait on a model hub

from store.codec import json_safe

RESULTS_DIR = REPO / "benchmarks" / "results"


class BenchmarkError(RuntimeError):
    """A benchmark could not run (bad option, a swarm run failed); one line, actionable."""


# ---- output ------------------------------------------------------------------------------------

_T0 = time.perf_counter()


def log(prefix: str, message: str) -> None:
    """One progress line with the seconds since the harness started (stdout, flushed)."""
    print(f"[{prefix} {time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What the numbers were measured on (cores are shared with whatever else ran at the time)."""
    import lmdb
    import numpy as np
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "lmdb": lmdb.__version__,
            "torch_threads": threads if threads is not None else torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in load]}




def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)  # a reader never sees half a result file


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one character per column, 'l' or 'r' (default: first l)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


# ---- timing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Seconds of one timed run: wall clock and this process's CPU time.

    On a machine shared with other jobs the wall clock swings with their load; the CPU time of a
    single-threaded run mostly does not, so both are kept and reported.
    """

    wall: float
    cpu: float


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.timing``."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timing = Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
                      ) -> dict[str, list[Timing]]:
    """Run each function ``warmup`` times, then ``repeats`` rounds of A, B, ... in turn.

    A function may return a ``Timing`` of the part it wants timed (its set-up excluded); for any
    other return value the whole call is timed. Interleaving matters on a shared machine: a burst
    of foreign load hits every variant in the same round instead of biasing whichever ran during
    it. Returns every timed run per name (warm-up excluded).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[Timing]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with Stopwatch() as sw:
                own = fn()
            times[name].append(own if isinstance(own, Timing) else sw.timing)
    return times


def wall(ts: Sequence[Timing]) -> list[float]:
    return [t.wall for t in ts]


def cpu(ts: Sequence[Timing]) -> list[float]:
    return [t.cpu for t in ts]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


# ---- swarm runs ----------------------------------------------------------------------------------

@dataclass
class SwarmRun:
    store: str
    tasks: list[str]
    preset: str
    cycles: int | None
    wall_seconds: float
    command: list[str]
    log: str


def run_swarm(store: str, tasks: Sequence[str], preset: str, *, cycles: int | None = None,
              seed: int = 0, threads: int | None = None, root: str | None = None,
              log_path: str | None = None,
              timeout: float | None = None, prefix: str = "bench",
              progress_every: float = 15.0, extra_args: Sequence[str] = ()) -> SwarmRun:
    """Run ``launch/run_swarm.py`` as a subprocess until every agent finished; print progress.

    ``extra_args`` go to run_swarm.py as they are (flags this function has no keyword for).

    The launcher's own output goes to ``log_path``; a one-line summary read from the store (children
    trained so far) is printed every ``progress_every`` seconds. The process is killed if anything
    goes wrong here, so no agent outlives the harness.
    """
    cmd = [sys.executable, str(REPO / "launch" / "run_swarm.py"), "--store", store,
           "--tasks", ",".join(tasks), "--preset", preset, "--seed", str(seed), "--refresh", "0.5"]
    if cycles is not None:
        cmd += ["--cycles", str(cycles)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if root is not None:
        cmd += ["--root", root]
    cmd += list(extra_args)
    log_path = log_path or os.path.join(os.path.dirname(os.path.abspath(store)),
                                        os.path.basename(store) + ".launcher.log")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            next_report = start + progress_every
            while proc.poll() is None:
                time.sleep(0.2)
                now = time.perf_counter()
                if timeout is not None and now - start > timeout:
                    raise BenchmarkError(f"swarm run in {store} exceeded {timeout:.0f}s; see {log_path}")
                if now >= next_report:
                    next_report = now + progress_every
                    log(prefix, f"swarm {','.join(tasks)}: {swarm_children_so_far(store)} children "
                                f"trained after {now - start:.0f}s")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-2000:]
        raise BenchmarkError(f"run_swarm.py exited with {proc.returncode} (log {log_path}):\n{tail}")
    return SwarmRun(store, list(tasks), preset, cycles, wall, cmd, log_path)


def swarm_children_so_far(store_path: str) -> int | str:
    from store import Store

    if not os.path.isfile(os.path.join(store_path, "data.mdb")):
        return "no"
    try:
        with Store.open(store_path, readonly=True) as s:
            return len(s.trials())
    except Exception:  # the launcher may be creating the store right now: progress only
        return "?"


FLOPS_KEYS = ("train", "validation", "cache_fill", "total")


def add_flops(tallies: Sequence[dict[str, int] | None]) -> dict[str, int] | None:
    """The sum of FLOPs tallies (``agents.compute.FlopsTally.to_dict()``); None if any is unknown
    (None or empty: a trial written before trials recorded FLOPs)."""
    if any(not t or "total" not in t for t in tallies):
        return None
    return {k: sum(int(t.get(k, 0)) for t in tallies) for k in FLOPS_KEYS}


def trial_budget(store, task: str) -> dict[str, Any]:
    """Training images, FLOPs, children and training seconds of one task's agent, from its trials.

    ``flops`` sums the trials' FLOPs tallies and ``train_flops`` is its total (everything the children
    cost: training steps, validations, cache fills); both None when a trial did not record them.
    """
    from agents.agent import agent_id_for

    trials = store.trials(agent=agent_id_for(task))
    flops = add_flops([t.flops for t in trials])
    return {"train_images": sum(t.train_images for t in trials), "children": len(trials),
            "flops": flops, "train_flops": flops["total"] if flops is not None else None,
            "accepted": sum(1 for t in trials if t.accepted),
            "train_seconds": sum(t.seconds for t in trials),
            "first_start": min((t.created_at - t.seconds for t in trials), default=math.nan),
            "last_end": max((t.created_at for t in trials), default=math.nan)}


def swarm_throughput(store_path: str, tasks: list[str]) -> dict:
    """Throughput from the trials (no process start-up, no data loading).

    Each agent's rate is its children / (its first child's start -> its last child's commit);
    the system's rate is the sum over agents, valid while their spans overlap (``overlap`` is the
    shared part of the spans over their union; 1.0 = they ran side by side the whole time). The
    rate over the union of the spans is reported too. ``train_fraction`` = time inside
    ``train_child`` / span: the rest is the agent's own work between children (building the child,
    test evaluation on publish, commits, view refreshes).
    """
    from store import Store

    with Store.open(store_path, readonly=True) as store:
        budgets = {t: trial_budget(store, t) for t in tasks}
        recorded = {a.task: a.progress.get("refresh_latency_ms") for a in store.agents()}
    spans = {t: b["last_end"] - b["first_start"] for t, b in budgets.items()}
    if any(b["children"] < 2 for b in budgets.values()):
        raise BenchmarkError(f"too few children in {store_path} to time: run more cycles")
    union = max(b["last_end"] for b in budgets.values()) - min(b["first_start"] for b in budgets.values())
    shared = min(b["last_end"] for b in budgets.values()) - max(b["first_start"] for b in budgets.values())
    children = sum(b["children"] for b in budgets.values())
    return {"children": children,
            "children_per_min": sum(60.0 * b["children"] / spans[t] for t, b in budgets.items()),
            "children_per_min_union_span": 60.0 * children / union,
            "train_images_per_s": sum(b["train_images"] / spans[t] for t, b in budgets.items()),
            "overlap": max(0.0, shared) / union, "span_seconds": spans,
            "train_fraction": {t: b["train_seconds"] / spans[t] for t, b in budgets.items()},
            "per_task_children": {t: b["children"] for t, b in budgets.items()},
            "agents_recorded_refresh_latency_ms": recorded}


def component_param_count(store, component_id: str) -> int:
    """Parameters of one stored component, from blob headers (no tensor bytes are read)."""
    return sum(math.prod(shape) for _dtype, shape in store.tensor_shapes(component_id).values())


def swarm_unique_params(store, tasks: Sequence[str]) -> tuple[int, dict[str, int]]:
    """Unique parameters over every task's current model (a shared component counts once),
    and each model's own full parameter count."""
    seen: dict[str, int] = {}
    per_model: dict[str, int] = {}
    for task in tasks:
        pointer = store.get_task(task)
        if pointer is None:
            raise BenchmarkError(f"task {task} has no published model in {store.path}")
        model = store.get_model(pointer.model_id)
        n = 0
        for cid in model.components:
            if cid not in seen:
                seen[cid] = component_param_count(store, cid)
            n += seen[cid]
        per_model[task] = n
    return sum(seen.values()), per_model


# ---- the root ------------------------------------------------------------------------------------

def vit_for(preset_name: str, root: str | None = None):
    """(Preset, VitConfig) exactly as an agent resolves them."""
    import agents  # noqa: F401  (must precede timm)
    from agents.config import resolve_preset
    from agents.vit import preset_vit

    preset = resolve_preset(preset_name, root=root)
    return preset, preset_vit(preset)


def root_provenance(view) -> dict:
    """What every method started from: the store root's spec, file hash and corpus."""
    m = view.root.metrics
    return {"name": m.get("root_spec", m.get("source")), "kind": m.get("root_kind"),
            "file_sha256": m.get("root_file_sha256"), "corpus": m.get("root_corpus"),
            "heldout_accuracy": m.get("root_heldout_accuracy"), "model_id": view.root.id}


def ensure_store_with_root(path: str, preset_name: str, seed: int, root: str | None = None) -> None:
    """A store holding only the root a swarm with this preset and seed would create."""
    from agents.bootstrap import ensure_root
    from store import Store

    preset, vit = vit_for(preset_name, root)
    with Store.open(path, create=True) as store:
        ensure_root(store, preset, vit, seed=seed)


def load_root(store):
    """A view whose ``root`` is the store's root on the CPU, tensors and momentum loaded (the view
    loads lazily, and callers use the root after the store is closed)."""
    import torch

    from agents.view import SystemView

    view = SystemView(store, "bench~reader", torch.device("cpu"))
    view.refresh()
    if view.root is None:
        raise BenchmarkError(f"store {store.path} has no root model")
    view.materialize(view.root, momentum=True)
    return view
