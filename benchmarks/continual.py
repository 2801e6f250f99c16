#!/usr/bin/env python3
"""Continual benchmark: tasks arrive one at a time; after each arrival every task seen so far is tested.

    python benchmarks/continual.py                       # mccb-offline (8 tasks), cpu preset, 1 cycle
    python benchmarks/continual.py --smoke --out DIR     # uci_digits, mnist5k, test preset (2-3 min)
    python benchmarks/continual.py --orders 0,1          # two seeded arrival orders, averaged
    python benchmarks/continual.py --tasks mnist5k,uci_digits,glyphs_greek --preset test

Protocol. The tasks (default the 8 of mccb-offline) arrive in an order shuffled by --order-seed (0;
--tasks alone keeps the order given). After arrival t, each method's model for every task seen so far
is scored on that task's test split: row t of an accuracy matrix R (R[t][j], j <= t). Methods:

  swarm              one store; at arrival t only task t's agent runs (launch/run_swarm.py with just
                     that task, on the live store, --cycles cycles of --preset); earlier agents are done.
                     Each seen task's model is whatever the store serves (agents.api.load_model).
  independent        finetune-all from the root, one model per task.
  sequential         one shared backbone fine-tuned on each arriving task in turn, one head per task;
                     earlier heads are kept and earlier tasks are scored with the current backbone.
  sequential-replay  the same, but half of each batch replays earlier tasks' training data, drawn
                     uniformly from their pooled training sets (each head trains on its own samples);
                     the checkpoint is chosen by the mean validation accuracy over the tasks seen.
  joint-warm         joint training on all tasks so far (batches drawn uniformly from their pooled
                     training data), warm-started from the previous arrival's joint model.
                     (replay and joint validate on every task seen, as often as baselines.run_joint
                     does: as often as the task with the largest share of a batch would be alone.)
  adapters           the frozen root plus residual adapters, a final-norm clone and a head per task.

Budget. Arrival t's budget is what task t's agent spent: the sum of its trials' flops["total"]
(agents.compute.FlopsTally: training forward+backward, validation forwards, prefix-cache fills). Each
baseline gets exactly that many FLOPs at arrival t, counted with agents.compute the same way (frozen
components forward only, validation passes included), by benchmarks/baselines.py's rule
(``flops_budget=``, ``steps_for_flops``): as many steps as the budget buys with a validation every
B steps (the agents' cadence) and after the last, never over the budget and less than one step plus
one validation short of it; what each really spent is reported. Every method starts from the swarm
store's root tensors and uses the same splits, validation subsets, test sets, default hparams and
best-validation-checkpoint rule (benchmarks/baselines.py pieces). Trials recorded before agents
counted FLOPs (flops == {}) are charged as full fine-tuning of their images plus their validations
(an upper bound), and the report says so. Without the swarm, the budget is an agent's cycles as if
every child fine-tuned everything.

Metrics (with T tasks, rows and columns in arrival order): ACC = mean_j R[T][j]; backward transfer
BWT = mean_{j<T} (R[T][j] - R[j][j]); forgetting = mean_{j<T} (max_{j<=l<T} R[l][j] - R[T][j]) (both
0.0 with one task); cumulative training FLOPs; unique parameters of everything a method keeps; wall
time (the swarm's: its run_swarm.py runs plus its evaluations; a baseline's: training and evaluation in
its own process, data preloaded, the baselines sharing the cores at once when --parallel).

Results: OUT/continual.json (`order`, with several orders also `orders`, and
methods.<method>.{final_mean_accuracy, bwt, forgetting, cumulative_train_flops, total_params, matrix,
wall_s}; with several orders every number is the mean over orders and the matrix the entry-wise mean
by arrival position), OUT/continual.md (tables), OUT/continual.svg (mean accuracy over the tasks seen,
per arrival and method) and OUT/continual-detail.json (per order: the budget per arrival, what each
method spent per arrival, the swarm's logits digests). Progress goes to stderr.

Run time. The default (8 tasks, cpu preset, 1 cycle per arrival, all 6 methods, one order) is sized
to finish well within 60 minutes on 2 quiet cores, so nothing is cut: one cycle is the smallest whole
budget an agent has (10 children of 96 steps). Arithmetic: a cpu cycle costs an agent about 0.9-1.5
TFLOPs (9.6 TFLOPs for the 8 tasks), which one agent with both cores trains at about 45 GFLOP/s: the
swarm phase is about 4 min of children plus ~10 s of start-up and evaluation per arrival, about 6 min.
Then the five baselines run at once, one process each: 5 x 9.6 TFLOPs plus about 4 TFLOPs of test
evaluation at about 47 GFLOP/s over both cores, about 18 min. About 25 minutes in all; under other
jobs' load it stretches with them. Add about 5 minutes the first time the glyphs_cjk root is built;
--orders 0,1 doubles it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from benchmarks import common
from benchmarks.common import BenchmarkError, fmt, md_table

ALL_METHODS = ("swarm", "independent", "sequential", "sequential-replay", "joint-warm", "adapters")
BASELINES = ALL_METHODS[1:]
SHARED_BACKBONE = ("sequential", "sequential-replay", "joint-warm")
METHOD_KEYS = ("final_mean_accuracy", "bwt", "forgetting", "cumulative_train_flops", "total_params",
               "matrix", "wall_s")
DEFAULT_PRESET, DEFAULT_CYCLES = "cpu", 1
SMOKE = (("uci_digits", "mnist5k"), "test", 1)
ADAPTER_DIM = 32  # as baselines.run_adapters
REPLAY_FRACTION = 0.5

_START = time.time()  # a baseline process is given its parent's, so every line counts from one start


def say(message: str) -> None:
    """One progress line on stderr, in benchmarks.common.log's format."""
    print(f"[continual {time.time() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---- metrics ------------------------------------------------------------------------------------

def check_matrix(r: Sequence[Sequence[float]]) -> None:
    """R must be lower-triangular by rows: row t holds the t+1 tasks seen after arrival t."""
    if not r:
        raise ValueError("empty accuracy matrix")
    for t, row in enumerate(r):
        if len(row) != t + 1:
            raise ValueError(f"row {t} of the accuracy matrix has {len(row)} entries, expected {t + 1}")


def final_mean_accuracy(r: Sequence[Sequence[float]]) -> float:
    """ACC: mean accuracy over every task after the last arrival."""
    check_matrix(r)
    return math.fsum(r[-1]) / len(r[-1])


def backward_transfer(r: Sequence[Sequence[float]]) -> float:
    """BWT = mean over j < T of R[T][j] - R[j][j] (negative: later arrivals hurt earlier tasks)."""
    check_matrix(r)
    last = len(r) - 1
    if last == 0:
        return 0.0
    return math.fsum(r[last][j] - r[j][j] for j in range(last)) / last


def forgetting(r: Sequence[Sequence[float]]) -> float:
    """Mean over j < T of the drop from task j's best accuracy before the last arrival to its last."""
    check_matrix(r)
    last = len(r) - 1
    if last == 0:
        return 0.0
    return math.fsum(max(r[l][j] for l in range(j, last)) - r[last][j] for j in range(last)) / last


def mean_accuracy_curve(r: Sequence[Sequence[float]]) -> list[float]:
    """Mean accuracy over the tasks seen, after each arrival."""
    check_matrix(r)
    return [math.fsum(row) / len(row) for row in r]


def summarize(matrix: list[list[float]], cumulative_flops: int, total_params: int, wall_s: float) -> dict:
    """The seven numbers continual.json holds per method."""
    return {"final_mean_accuracy": final_mean_accuracy(matrix), "bwt": backward_transfer(matrix),
            "forgetting": forgetting(matrix), "cumulative_train_flops": int(cumulative_flops),
            "total_params": int(total_params), "matrix": [list(row) for row in matrix],
            "wall_s": float(wall_s)}


def mean_over_orders(runs: Sequence[dict]) -> dict:
    """Several orders -> one method entry: every number averaged, the matrix entry-wise by position."""
    if len(runs) == 1:
        return {k: runs[0][k] for k in METHOD_KEYS}
    n = len(runs)
    matrix = [[math.fsum(run["matrix"][t][j] for run in runs) / n for j in range(t + 1)]
              for t in range(len(runs[0]["matrix"]))]
    out = {k: math.fsum(run[k] for run in runs) / n for k in METHOD_KEYS if k != "matrix"}
    out["cumulative_train_flops"] = int(round(out["cumulative_train_flops"]))
    out["total_params"] = int(round(out["total_params"]))
    out["matrix"] = matrix
    return {k: out[k] for k in METHOD_KEYS}


# ---- orders and options -----------------------------------------------------------------------

def arrival_order(tasks: Sequence[str], seed: int | None) -> list[str]:
    """The tasks shuffled by ``seed`` (None: as given)."""
    order = list(tasks)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="continual.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help=f"{','.join(SMOKE[0])}, preset {SMOKE[1]}, {SMOKE[2]} cycle (2-3 minutes on 2 cores)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks, in arrival order unless --order-seed/--orders is given "
                        "(default: the 8 mccb-offline tasks shuffled by --order-seed 0)")
    p.add_argument("--preset", default=None,
                   help=f"preset of the swarm's agents and the baselines' hparams (default "
                        f"{DEFAULT_PRESET}; --smoke: {SMOKE[1]})")
    p.add_argument("--cycles", type=int, default=None,
                   help=f"cycles of the arriving task's agent per arrival (default {DEFAULT_CYCLES})")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"subset of {','.join(ALL_METHODS)} (default all)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--order-seed", type=int, default=None,
                       help="seed of the arrival order (default 0; with --tasks: the order given)")
    order.add_argument("--orders", default=None,
                       help="comma-separated order seeds, e.g. 0,1: one full run per order, averaged")
    p.add_argument("--seed", type=int, default=0, help="seed of the swarm and the baselines (default 0)")
    p.add_argument("--root", default=None,
                   help="root of the swarm and every baseline (run_swarm.py --root; default: the "
                        "preset's, glyphs_cjk for the cpu and demo budgets, random for test)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads: the swarm's agent and the evaluations use them all; the "
                        "baselines divide them when they run at once (default 2)")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="run the baselines at once, each in its own process (default on)")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="result directory")
    p.add_argument("--work", default=None,
                   help="directory for the swarm's stores and logs (default: a temp dir, removed at "
                        "the end); must not hold a previous run's stores")
    return p


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def resolve(args) -> dict:
    """Every option checked before anything runs (a bad one is a BenchmarkError: exit 2)."""
    from agents.config import resolve_preset
    from taskdata import benchmark_tasks, known_task_names
    from taskdata.generic import parse_generic

    tasks, preset, cycles = SMOKE if args.smoke else (None, DEFAULT_PRESET, DEFAULT_CYCLES)
    if args.tasks is not None:
        tasks = _split(args.tasks)
        if not tasks:
            raise BenchmarkError("--tasks is empty")
    tasks = list(tasks) if tasks else list(benchmark_tasks("mccb-offline"))
    if len(set(tasks)) != len(tasks):
        raise BenchmarkError("--tasks names a task twice")
    known = set(known_task_names())
    bad = [t for t in tasks if t not in known and parse_generic(t) is None]
    if bad:
        raise BenchmarkError(f"unknown task(s) {', '.join(bad)}: choose from {', '.join(sorted(known))}, "
                             f"folder:PATH or npz:PATH")
    preset = args.preset or preset
    resolve_preset(preset, root=args.root)  # a bad name fails here
    cycles = args.cycles if args.cycles is not None else cycles
    if cycles < 1:
        raise BenchmarkError("--cycles must be >= 1")
    methods = _split(args.methods)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise BenchmarkError(f"unknown method(s) {unknown}: choose from {', '.join(ALL_METHODS)}")
    methods = [m for m in ALL_METHODS if m in methods]
    if args.orders is not None:
        try:
            seeds: list[int | None] = [int(s) for s in _split(args.orders)]
        except ValueError:
            raise BenchmarkError(f"--orders must be comma-separated integers, got {args.orders!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise BenchmarkError("--orders must name at least one seed, each once")
    elif args.order_seed is not None:
        seeds = [args.order_seed]
    else:
        seeds = [None if args.tasks is not None else 0]
    if args.threads < 1:
        raise BenchmarkError("--threads must be >= 1")
    return {"tasks": tasks, "preset": preset, "cycles": cycles, "methods": methods, "seeds": seeds}


# ---- budgets ------------------------------------------------------------------------------------

def _full_finetune_flops(vit, preset, data, images: int, validations: int) -> int:
    """FLOPs of fine-tuning everything on ``images`` at the default hparams, plus the validations."""
    from agents import compute
    from agents.vit import component_names
    from benchmarks.baselines import task_hparams

    h = task_hparams(preset, vit, data.num_classes)
    return (images * compute.train_flops_per_image(vit, h, component_names(h))
            + validations * len(data.val_y) * compute.forward_flops(vit, h))


def arrival_budget(store, task: str, vit, preset, data) -> dict:
    """What task ``task``'s agent spent (all its trials, accepted or not): the next baselines' budget."""
    from agents.agent import agent_id_for

    trials = store.trials(agent=agent_id_for(task))
    flops, estimated = 0, 0
    for tr in trials:
        total = tr.flops.get("total") if tr.flops else None
        if total is None:  # recorded before agents counted FLOPs: charged as full fine-tuning
            estimated += 1
            total = _full_finetune_flops(vit, preset, data, tr.train_images,
                                         len(tr.evals) or preset.budget.validations_per_child)
        flops += int(total)
    if not trials:
        raise BenchmarkError(f"task {task}'s agent recorded no trials: nothing to match the baselines to")
    return {"task": task, "flops": flops, "train_images": sum(t.train_images for t in trials),
            "children": len(trials), "estimated_trials": estimated,
            "train_seconds": sum(t.seconds for t in trials)}


def analytic_budget(task: str, vit, preset, cycles: int, data) -> dict:
    """Without the swarm: an agent's cycles as if every child fine-tuned everything."""
    b = preset.budget
    children = b.children_per_cycle * cycles
    steps = preset.steps_between_validations(data.n_train) * b.validations_per_child
    images = children * steps * b.batch_size
    return {"task": task, "flops": _full_finetune_flops(vit, preset, data, images,
                                                        children * b.validations_per_child),
            "train_images": images, "children": children, "estimated_trials": children,
            "train_seconds": 0.0}


# ---- the swarm ----------------------------------------------------------------------------------

def _safe(task: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "~" for ch in task)


def logits_digest(logits) -> str:
    """sha256 of a logits tensor's float32 bytes: equal digests = bit-identical predictions."""
    return hashlib.sha256(logits.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def evaluate_served(store_path: str, task: str, data) -> tuple[float, str]:
    """Test accuracy of the model the store serves for ``task`` (agents.api.load_model), and the
    digest of its test logits."""
    from agents.api import load_model

    model = load_model(store_path, task)
    logits = model.logits(data.test_x)
    acc = (logits.argmax(-1) == data.test_y).sum().item() / max(1, len(data.test_y))
    return acc, logits_digest(logits)


def run_swarm_arrivals(store_path: str, order: Sequence[str], preset_name: str, *, cycles: int,
                       seed: int, root: str | None, threads: int | None, tensors: Mapping[str, Any],
                       log_dir: str, on_arrival: Callable[[int, str], None] | None = None) -> dict:
    """The swarm under the protocol: at arrival t, ``run_swarm.py`` with task t alone on the live
    store; then every seen task's served model is tested. ``on_arrival(t, task)`` runs after each
    arrival's evaluation (tests use it to look at the store between arrivals)."""
    from agents.config import resolve_preset
    from agents.vit import preset_vit
    from store import Store

    preset = resolve_preset(preset_name, root=root)
    vit = preset_vit(preset)
    matrix, digests, budgets, walls = [], [], [], []
    for t, task in enumerate(order):
        say(f"swarm: arrival {t + 1}/{len(order)}: {task} ({cycles} cycle(s) of {preset_name})")
        run = common.run_swarm(store_path, [task], preset_name, cycles=cycles, seed=seed,
                               threads=threads, root=root, prefix="continual",
                               log_path=os.path.join(log_dir, f"arrival{t + 1}-{_safe(task)}.launcher.log"))
        start = time.perf_counter()
        row, digest = [], {}
        for j in order[:t + 1]:
            acc, digest[j] = evaluate_served(store_path, j, tensors[j])
            row.append(acc)
        with Store.open(store_path, readonly=True) as store:
            budgets.append(arrival_budget(store, task, vit, preset, tensors[task]))
        matrix.append(row)
        digests.append(digest)
        walls.append(run.wall_seconds + time.perf_counter() - start)
        b = budgets[-1]
        say(f"swarm: {task}: {b['children']} children, {b['flops'] / 1e12:.3f} TFLOPs, "
            f"{b['train_images']:,} images; mean test over {t + 1} task(s) "
            f"{math.fsum(row) / len(row):.4f}")
        if on_arrival is not None:
            on_arrival(t, task)
    with Store.open(store_path, readonly=True) as store:
        total, per_model = common.swarm_unique_params(store, list(order))
    return {**summarize(matrix, sum(b["flops"] for b in budgets), total, sum(walls)),
            "per_arrival_flops": [b["flops"] for b in budgets],
            "per_arrival_train_images": [b["train_images"] for b in budgets],
            "per_arrival_wall_s": walls, "per_task_model_params": per_model,
            "logits_sha256": digests, "budgets": budgets}


# ---- baselines ----------------------------------------------------------------------------------

def train_isolated(root, vit, preset, data, flops_budget: int, method: str, seed: int,
                   log: Callable[[str], None] = say) -> dict:
    """One task's own model on a FLOPs budget, by benchmarks/baselines.py itself: ``independent`` is
    ``run_finetune_all`` (every component trained), ``adapters`` is ``run_adapters`` (frozen root,
    adapters before every block, a clone of the final norm, a fresh head)."""
    from agents.vit import component_names, count_params
    from benchmarks.baselines import run_adapters, run_finetune_all, task_hparams

    if method == "independent":
        outcome = run_finetune_all(root, vit, preset, {data.name: data}, None, seed, log=log,
                                   flops_budget={data.name: flops_budget})
        h = task_hparams(preset, vit, data.num_classes)
        private = set(component_names(h))
    else:
        outcome = run_adapters(root, vit, preset, {data.name: data}, None, seed, adapter_dim=ADAPTER_DIM,
                               log=log, flops_budget={data.name: flops_budget})
        h = task_hparams(preset, vit, data.num_classes, adapter_dim=ADAPTER_DIM,
                         adapter_layers="_".join(str(i) for i in range(vit.depth)))
        private = {n for n in component_names(h) if n not in root.components or n == "encoder_norm"}
    out = outcome.per_task[data.name]
    counts = count_params(vit, h)
    return {"test": out.test_accuracy, "val": out.best_val_accuracy, "flops": out.train_flops,
            "images": out.train_images, "steps": out.steps, "validations": out.validations,
            "params": {n: counts[n] for n in component_names(h)}, "private": private}


class _Stream:
    """Endless shuffled training indices of one task, taken any number at a time."""

    def __init__(self, n: int, gen):
        import torch

        self.n, self.gen, self.torch = n, gen, torch
        self.perm, self.pos = torch.randperm(n, generator=gen), 0

    def take(self, k: int):
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm, self.pos = self.torch.randperm(self.n, generator=self.gen), 0
            part = self.perm[self.pos:self.pos + k]
            self.pos += len(part)
            k -= len(part)
            parts.append(part)
        return self.torch.cat(parts)


def _head_view(backbone, weight, bias):
    """The shared backbone's features through one task's head, as a module (for ``accuracy``)."""
    import torch.nn.functional as F
    from torch import nn

    class HeadView(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.weight, self.bias = backbone, weight, bias

        def forward(self, x):
            return F.linear(self.backbone.forward_features(x), self.weight, self.bias)

    return HeadView()


class SharedBackbone:
    """One trainable copy of the root's encoder plus one head per task, trained arrival by arrival."""

    def __init__(self, root, vit, preset, method: str, seed: int):
        import torch

        from agents.vit import PathModel, component_names
        from benchmarks.baselines import build_path, task_generator, task_hparams

        self.vit, self.preset, self.method, self.seed = vit, preset, method, seed
        self.h = task_hparams(preset, vit, 1)     # the backbone's hparams; its own 1-class head is unused
        self.size = int(self.h["ds_image_size"])
        self.backbone_names = [n for n in component_names(self.h) if n != "head"]
        gen = task_generator(seed, method, "backbone")
        path = build_path(root, vit, self.h, clone=set(self.backbone_names), agent=f"bench~{method}",
                          task=method, gen=gen)
        self.model = PathModel(vit, self.h, {n: c.params for n, c in path.components.items()},
                               trainable=self.backbone_names)
        self.backbone_params = list(self.model.trainable_tensors().values())
        self.heads: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.train_flops: dict[str, int] = {}      # per training image of the task (its own head)
        self.forward_flops: dict[str, int] = {}    # per evaluated image of the task

    def add_task(self, data, gen) -> None:
        import torch

        from agents import compute
        from agents.vit import component_names, init_component
        from benchmarks.baselines import task_hparams

        init = init_component("head", self.vit, {"num_classes": data.num_classes}, gen)
        self.heads[data.name] = (torch.nn.Parameter(init["weight"]), torch.nn.Parameter(init["bias"]))
        h = task_hparams(self.preset, self.vit, data.num_classes)
        self.train_flops[data.name] = compute.train_flops_per_image(self.vit, h, component_names(h))
        self.forward_flops[data.name] = compute.forward_flops(self.vit, h)

    def view(self, task: str):
        return _head_view(self.model, *self.heads[task])

    def total_params(self) -> int:
        from agents.vit import count_params

        counts = count_params(self.vit, self.h)
        return (sum(counts[n] for n in self.backbone_names)
                + sum(w.numel() + b.numel() for w, b in self.heads.values()))

    def train_arrival(self, tasks: Mapping[str, Any], fixed: dict[str, int],
                      pool: list[str], slots: int, train_heads: list[str], val_tasks: list[str],
                      flops_budget: int, gen) -> dict:
        """Train the backbone and ``train_heads`` for as many steps as ``flops_budget`` buys.

        Every batch holds ``fixed[task]`` images of each fixed task plus ``slots`` images drawn
        uniformly from the pooled training sets of ``pool``; each image's loss goes through its own
        task's head. Validation on ``val_tasks`` as benchmarks/baselines.py's joint run does it: as
        often as the task with the largest share of the batch would be validated alone (its cadence /
        its share), and after the last step; the kept checkpoint (backbone and heads) has the best
        mean validation accuracy (a later tie wins). Steps: ``baselines.steps_for_flops`` (the most
        the budget buys with those validations, a step priced at its dearest mix of heads, so the
        budget is never exceeded), the warm-up/cosine schedule spanning exactly those steps."""
        import torch

        from agents.training import accuracy, lr_at
        from benchmarks.baselines import multi_head_loss, steps_for_flops
        from taskdata.augment import augment_train

        b, h, size = self.preset.budget, self.h, self.size
        batch = sum(fixed.values()) + slots
        assert batch == b.batch_size, (fixed, slots)
        weights = [tasks[n].n_train for n in pool]
        total_w = sum(weights)
        share = {n: k / batch for n, k in fixed.items()}
        for n, w in zip(pool, weights):
            share[n] = share.get(n, 0.0) + slots * w / total_w / batch
        every = max(1, min(round(self.preset.steps_between_validations(tasks[n].n_train) / share[n])
                           for n in share if share[n] > 0))
        step_flops = (sum(k * self.train_flops[n] for n, k in fixed.items())
                      + slots * max((self.train_flops[n] for n in pool), default=0))
        val_flops = sum(len(tasks[n].val_y) * self.forward_flops[n] for n in val_tasks)
        total = max(1, steps_for_flops(flops_budget, step_flops, val_flops, every))
        params = self.backbone_params + [p for n in train_heads for p in self.heads[n]]
        opt = torch.optim.SGD(params, lr=h["opt_lr"], momentum=h["opt_momentum"],
                              nesterov=bool(h["opt_nesterov"]) and h["opt_momentum"] > 0)
        streams = {n: _Stream(tasks[n].n_train, gen) for n in list(fixed) + pool}
        pool_w = torch.tensor(weights, dtype=torch.float64) if slots else None
        order = list(tasks)
        spent, images, validations, best, best_val, snapshot = 0, 0, 0, -math.inf, {}, None
        self.model.train()
        for step in range(total):
            counts = dict(fixed)
            if slots:
                drawn = torch.multinomial(pool_w, slots, replacement=True, generator=gen)
                for i, k in enumerate(torch.bincount(drawn, minlength=len(pool)).tolist()):
                    counts[pool[i]] = counts.get(pool[i], 0) + k
            xs, ys, names = [], [], []
            for n in order:
                k = counts.get(n, 0)
                if k <= 0:
                    continue
                idx = streams[n].take(k)
                xs.append(augment_train(tasks[n].train_x[idx], h, size, gen))
                ys.append(tasks[n].train_y[idx])
                names.append(n)
                spent += k * self.train_flops[n]
                images += k
            lr = lr_at(step, total, h["opt_lr"], h["opt_lr_warmup_ratio"])
            for g in opt.param_groups:
                g["lr"] = lr
            loss = multi_head_loss(self.model.forward_features(torch.cat(xs)), self.heads,
                                   list(zip(names, ys)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if (step + 1) % every == 0 or step + 1 == total:
                self.model.eval()
                val = {n: accuracy(self.view(n), tasks[n].val_inputs(size), tasks[n].val_y)
                       for n in val_tasks}
                self.model.train()
                spent += val_flops
                validations += 1
                mean = math.fsum(val.values()) / len(val)
                if mean >= best:
                    best, best_val = mean, val
                    snapshot = [p.detach().clone() for p in params]
        if snapshot is not None:
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.copy_(s)
        self.model.eval()
        return {"flops": int(spent), "images": images, "steps": total, "validations": validations,
                "val": best_val}


def run_baseline(method: str, root, vit, preset, tensors: Mapping[str, Any], budgets: Sequence[int],
                 seed: int, log: Callable[[str], None] = say) -> dict:
    """One baseline over the arrivals (``tensors`` in arrival order, ``budgets[t]`` FLOPs at arrival t)."""
    from agents.training import test_accuracy
    from benchmarks.baselines import task_generator

    start = time.perf_counter()
    order = list(tensors)
    matrix, flops, images = [], [], []
    if method in ("independent", "adapters"):
        accs, params, shared = [], 0, {}
        for t, task in enumerate(order):
            out = train_isolated(root, vit, preset, tensors[task], budgets[t], method, seed,
                                 log=lambda _line: None)  # one line per arrival below instead
            accs.append(out["test"])
            matrix.append(list(accs))   # earlier models are untouched: their accuracy stands
            flops.append(out["flops"])
            images.append(out["images"])
            for comp, n in out["params"].items():
                if comp in out["private"]:
                    params += n
                else:
                    shared[comp] = n    # the frozen root part, counted once for all tasks
            log(f"{method} {t + 1}/{len(order)} {task}: test {out['test']:.4f} images {out['images']} "
                f"FLOPs {out['flops'] / max(1, budgets[t]):.3f} x budget")
        total_params = params + sum(shared.values())
    elif method in SHARED_BACKBONE:
        net = SharedBackbone(root, vit, preset, method, seed)
        for t, task in enumerate(order):
            gen = task_generator(seed, method, task)
            net.add_task(tensors[task], gen)
            seen, earlier = order[:t + 1], order[:t]
            b = preset.budget.batch_size
            if method == "sequential":
                plan = dict(fixed={task: b}, pool=[], slots=0, train_heads=[task], val_tasks=[task])
            elif method == "sequential-replay":
                replay = int(b * REPLAY_FRACTION) if earlier else 0
                plan = dict(fixed={task: b - replay}, pool=earlier, slots=replay, train_heads=seen,
                            val_tasks=seen)
            else:  # joint-warm
                plan = dict(fixed={}, pool=seen, slots=b, train_heads=seen, val_tasks=seen)
            out = net.train_arrival(tensors, flops_budget=budgets[t], gen=gen, **plan)
            row = [test_accuracy(net.view(j), tensors[j], net.size) for j in seen]
            matrix.append(row)
            flops.append(out["flops"])
            images.append(out["images"])
            log(f"{method} {t + 1}/{len(order)} {task}: mean test {math.fsum(row) / len(row):.4f} "
                f"images {out['images']} FLOPs {out['flops'] / max(1, budgets[t]):.3f} x budget")
        total_params = net.total_params()
    else:
        raise BenchmarkError(f"unknown baseline {method!r}")
    wall = time.perf_counter() - start
    return {**summarize(matrix, sum(flops), total_params, wall), "per_arrival_flops": flops,
            "per_arrival_train_images": images}


def _load_tensors(tasks: Sequence[str], preset) -> dict:
    import torch

    from agents.training import TaskTensors
    from taskdata import load_task

    return {t: TaskTensors(load_task(t), torch.device("cpu"), preset.budget.validation_examples)
            for t in tasks}


def _baseline_process(method: str, store_path: str, preset_name: str, root_spec: str | None,
                      order: list[str], budgets: list[int], seed: int, threads: int,
                      start: float) -> dict:
    """One baseline in its own process: it reads the root and the tasks itself."""
    import torch

    from store import Store

    global _START
    _START = start
    torch.set_num_threads(threads)
    preset, vit = common.vit_for(preset_name, root_spec)
    with Store.open(store_path, readonly=True) as store:
        root = common.load_root(store).root
    tensors = _load_tensors(order, preset)
    return run_baseline(method, root, vit, preset, tensors, budgets, seed)


def run_baselines(methods: Sequence[str], store_path: str, preset_name: str, root_spec: str | None,
                  order: list[str], budgets: list[int], seed: int, threads: int, parallel: bool,
                  root=None, tensors=None) -> tuple[dict, dict]:
    """Every baseline, each in its own spawned process when ``parallel`` (as benchmarks/quality.py)."""
    if not methods:
        return {}, {"processes_at_once": 0, "torch_threads_each": threads}
    if parallel and len(methods) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        per = max(1, threads // len(methods))
        with ProcessPoolExecutor(len(methods), mp_context=mp.get_context("spawn")) as pool:
            futures = {m: pool.submit(_baseline_process, m, store_path, preset_name, root_spec, order,
                                      budgets, seed, per, _START) for m in methods}
            out = {m: f.result() for m, f in futures.items()}
        return out, {"processes_at_once": len(methods), "torch_threads_each": per}
    preset, vit = common.vit_for(preset_name, root_spec)
    return ({m: run_baseline(m, root, vit, preset, {t: tensors[t] for t in order}, budgets, seed)
             for m in methods}, {"processes_at_once": 1, "torch_threads_each": threads})


# ---- one order ----------------------------------------------------------------------------------

def run_order(order: list[str], order_seed: int | None, cfg: dict, args, work: str, tensors: dict) -> dict:
    import torch

    from store import Store

    preset_name, cycles, methods = cfg["preset"], cfg["cycles"], cfg["methods"]
    label = "given" if order_seed is None else str(order_seed)
    order_dir = os.path.join(work, f"order-{label}")
    store_path = os.path.join(order_dir, "swarm_store")
    if os.path.exists(store_path):
        raise BenchmarkError(f"{store_path} exists: pass an empty --work directory")
    os.makedirs(order_dir, exist_ok=True)
    preset, vit = common.vit_for(preset_name, args.root)
    say(f"order {label}: {' -> '.join(order)}")
    detail: dict = {"order": order, "order_seed": order_seed, "methods": {}}
    torch.set_num_threads(args.threads)
    if "swarm" in methods:
        swarm = run_swarm_arrivals(store_path, order, preset_name, cycles=cycles, seed=args.seed,
                                   root=args.root, threads=args.threads, tensors=tensors,
                                   log_dir=order_dir)
        budgets = swarm.pop("budgets")
        detail["methods"]["swarm"] = swarm
        detail["budget_source"] = "swarm"
    else:
        common.ensure_store_with_root(store_path, preset_name, args.seed, args.root)
        budgets = [analytic_budget(t, vit, preset, cycles, tensors[t]) for t in order]
        detail["budget_source"] = "analytic"
    detail["arrival_budget"] = budgets
    estimated = sum(b["estimated_trials"] for b in budgets)
    if "swarm" in methods and estimated:
        say(f"warning: {estimated} trial(s) carry no flops record; charged as full fine-tuning")
    with Store.open(store_path, readonly=True) as store:
        view = common.load_root(store)
    detail["root"] = common.root_provenance(view)
    baselines = [m for m in methods if m != "swarm"]
    flops = [b["flops"] for b in budgets]
    if baselines:
        say(f"baselines {', '.join(baselines)}: {sum(flops) / 1e12:.3f} TFLOPs each over "
            f"{len(order)} arrival(s)")
    outcomes, execution = run_baselines(baselines, store_path, preset_name, args.root, order, flops,
                                        args.seed, args.threads, args.parallel, root=view.root,
                                        tensors=tensors)
    detail["baseline_execution"] = execution
    for m in baselines:
        detail["methods"][m] = outcomes[m]
        say(f"{m}: ACC {outcomes[m]['final_mean_accuracy']:.4f} BWT {outcomes[m]['bwt']:+.4f} "
            f"in {outcomes[m]['wall_s']:.1f}s")
    detail["methods"] = {m: detail["methods"][m] for m in methods}
    return detail


# ---- reports ------------------------------------------------------------------------------------

def svg_chart(curves: Mapping[str, Sequence[float]], *, title: str = "Mean test accuracy over the "
              "tasks seen", width: float = 640, height: float = 300) -> str:
    """A standalone SVG line chart: x = arrival (1..T), y = mean accuracy, one line per method."""
    from report.svg import GRID, MUTED, PRESET_PALETTE, Series, _legend, _marker, _svg, _t, nice_ticks

    colours = dict(zip(ALL_METHODS, PRESET_PALETTE))
    series = [Series(m, colours.get(m, PRESET_PALETTE[i % len(PRESET_PALETTE)]),
                     [(t + 1, y) for t, y in enumerate(ys)], step=False, marker="circle",
                     tips=[f"{m}, arrival {t + 1}: {y:.4f}" for t, y in enumerate(ys)])
              for i, (m, ys) in enumerate(curves.items())]
    ys = [y for s in series for _, y in s.points] or [0.0, 1.0]
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.08 or 0.05
    y_lo, y_hi = max(0.0, lo - pad), min(1.0, hi + pad) if hi <= 1.0 else hi + pad
    arrivals = max((len(s.points) for s in series), default=1)
    left, right = 54, 16
    body = [_t(left, 18, title, size=13, weight="600")]
    items, used = _legend(series, left, 34, width - right)
    body += items
    top, bottom = 34 + used + 4, height - 40
    plot_w, plot_h = width - left - right, bottom - top

    def px(x: float) -> float:  # 12 px inside the axes at both ends
        return left + 12 + ((plot_w - 24) * (x - 1) / (arrivals - 1) if arrivals > 1 else plot_w / 2 - 12)

    def py(y: float) -> float:
        return bottom - plot_h * (y - y_lo) / ((y_hi - y_lo) or 1.0)

    for tick in nice_ticks(y_lo, y_hi, 5):
        body.append(f"<line x1='{left}' y1='{py(tick):.1f}' x2='{left + plot_w}' y2='{py(tick):.1f}' "
                    f"stroke='{GRID}'/>")
        body.append(_t(left - 6, py(tick) + 4, f"{tick:g}", size=10, fill=MUTED, anchor="end"))
    for a in range(1, arrivals + 1):
        body.append(f"<line x1='{px(a):.1f}' y1='{bottom}' x2='{px(a):.1f}' y2='{bottom + 4}' "
                    f"stroke='{MUTED}'/>")
        body.append(_t(px(a), bottom + 16, str(a), size=10, fill=MUTED, anchor="middle"))
    body.append(f"<line x1='{left}' y1='{bottom}' x2='{left + plot_w}' y2='{bottom}' stroke='{MUTED}'/>")
    body.append(f"<line x1='{left}' y1='{top}' x2='{left}' y2='{bottom}' stroke='{MUTED}'/>")
    body.append(_t(left + plot_w / 2, height - 6, "arrival (tasks seen)", size=11, fill=MUTED,
                   anchor="middle"))
    body.append(_t(14, top + plot_h / 2, "mean test accuracy", size=11, fill=MUTED, anchor="middle",
                   extra=f"transform='rotate(-90 14 {top + plot_h / 2:.1f})'"))
    for s in series:
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        body.append(f"<polyline points='{coords}' fill='none' stroke='{s.colour}' "
                    f"stroke-width='{s.width}' stroke-linejoin='round'/>")
        for i, (x, y) in enumerate(s.points):
            body.append(_marker(s.marker, px(x), py(y), s.marker_size, s.colour, 1.0, s.tips[i]))
    svg = _svg(width, height, body, title)
    # report.svg leaves xmlns out (its figures live inside HTML); a standalone file needs it
    return svg.replace("<svg ", "<svg xmlns='http://www.w3.org/2000/svg' ", 1)


def markdown(result: dict, detail: dict) -> str:
    methods, orders = result["methods"], detail["orders"]
    cfg = detail["config"]
    several = len(orders) > 1
    lines = [f"# Continual: {len(result['order'])} tasks arriving one at a time", "",
             f"Preset `{cfg['preset']}`, {cfg['cycles']} cycle(s) of the arriving task's agent per "
             f"arrival, seed {cfg['seed']}. Order"
             + (f"s (seeds {', '.join(str(o['order_seed']) for o in orders)}; every number is the "
                f"mean over the orders, the matrix by arrival position):" if several else ":"),
             ""]
    lines += [f"- {' -> '.join(o['order'])}" for o in orders]
    lines += ["", "ACC: mean test accuracy over all tasks after the last arrival. BWT: mean over "
                  "earlier tasks of (accuracy at the end - accuracy right after the task arrived). "
                  "Forgetting: mean over earlier tasks of (best accuracy before the last arrival - "
                  "accuracy at the end). Every baseline gets the FLOPs the arriving task's agent "
                  "spent at each arrival (agents.compute, validation included).", ""]
    headers = ["method", "ACC", "BWT", "forgetting", "train FLOPs", "total params", "wall s"]
    rows = [[m, fmt(r["final_mean_accuracy"]), f"{r['bwt']:+.4f}", fmt(r["forgetting"]),
             f"{r['cumulative_train_flops'] / 1e12:.3f} T", fmt(r["total_params"]), fmt(r["wall_s"], 1)]
            for m, r in methods.items()]
    lines += [md_table(headers, rows), ""]
    arrivals = len(result["order"])
    lines += ["Mean test accuracy over the tasks seen, after each arrival:", "",
              md_table(["method"] + [str(a + 1) for a in range(arrivals)],
                       [[m] + [fmt(x) for x in mean_accuracy_curve(r["matrix"])]
                        for m, r in methods.items()]), ""]
    for o in orders:
        label = "" if not several else f" (order seed {o['order_seed']})"
        lines += [f"Budget per arrival{label} ({o['budget_source']}):", ""]
        brows = [[str(t + 1), b["task"], fmt(b["children"]), fmt(b["train_images"]),
                  f"{b['flops'] / 1e12:.4f} T"]
                 + [f"{o['methods'][m]['per_arrival_flops'][t] / max(1, b['flops']):.3f}"
                    for m in o["methods"] if m != "swarm"]
                 for t, b in enumerate(o["arrival_budget"])]
        lines += [md_table(["arrival", "task", "children", "swarm images", "FLOPs"]
                           + [f"{m} spent/budget" for m in o["methods"] if m != "swarm"], brows), ""]
        est = sum(b["estimated_trials"] for b in o["arrival_budget"])
        if est and o["budget_source"] == "swarm":
            lines += [f"{est} trial(s) had no FLOPs record and were charged as full fine-tuning of "
                      f"their images plus their validations (an upper bound).", ""]
    lines += ["Accuracy matrices (row t: after arrival t; column j: the j-th task to arrive):", ""]
    for m, r in methods.items():
        lines += [f"`{m}`:", "", md_table(["after"] + [str(j + 1) for j in range(arrivals)],
                                          [[str(t + 1)] + [fmt(x) for x in row] + [""] * (arrivals - t - 1)
                                           for t, row in enumerate(r["matrix"])]), ""]
    ex = orders[0].get("baseline_execution", {})
    lines += ["Wall time: the swarm's is its `run_swarm.py` runs (process start-up, data loading, one "
              "agent with every core) plus its evaluations; a baseline's is its training and test "
              f"evaluation with the data preloaded, {ex.get('torch_threads_each', '-')} torch thread(s), "
              f"{ex.get('processes_at_once', '-')} baseline process(es) sharing the cores at once."]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------

def run(args) -> tuple[dict, dict]:
    cfg = resolve(args)
    from agents.config import resolve_preset
    from taskdata import fetch_all

    preset = resolve_preset(cfg["preset"], root=args.root)
    orders = [(arrival_order(cfg["tasks"], s), s) for s in cfg["seeds"]]
    say(f"{len(cfg['tasks'])} task(s), preset {cfg['preset']}, {cfg['cycles']} cycle(s) per arrival, "
        f"methods {', '.join(cfg['methods'])}, {len(orders)} order(s)")
    with contextlib.redirect_stdout(sys.stderr):  # fetch lines and common.log's progress: stderr
        fetch_all(cfg["tasks"])
    tensors = _load_tensors(cfg["tasks"], preset)
    work = args.work or tempfile.mkdtemp(prefix="continual_")
    os.makedirs(work, exist_ok=True)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            details = [run_order(order, seed, cfg, args, work, tensors) for order, seed in orders]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result: dict = {"order": details[0]["order"]}
    if len(details) > 1:
        result["orders"] = [d["order"] for d in details]
    result["methods"] = {m: mean_over_orders([d["methods"][m] for d in details]) for m in cfg["methods"]}
    detail = {"config": {"preset": cfg["preset"], "preset_hash": preset.hash, "cycles": cfg["cycles"],
                         "seed": args.seed, "order_seeds": cfg["seeds"], "tasks": cfg["tasks"],
                         "methods": cfg["methods"], "root": args.root or preset.root,
                         "threads": args.threads, "parallel": args.parallel},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": common.machine_info(args.threads),
              "harness_seconds": time.perf_counter() - start, "orders": details}
    return result, detail


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import agents  # noqa: F401  (must precede timm; bad presets and tasks are then user errors)

    result, detail = run(args)
    out = Path(args.out)
    common.write_json(out / "continual.json", result)
    common.write_json(out / "continual-detail.json", detail)
    text = markdown(result, detail)
    common.write_text(out / "continual.md", text + "\n\n![mean accuracy per arrival](continual.svg)")
    common.write_text(out / "continual.svg", svg_chart(
        {m: mean_accuracy_curve(r["matrix"]) for m, r in result["methods"].items()}))
    print(text)
    print(f"\nwrote {out / 'continual.json'}, continual.md, continual.svg and continual-detail.json")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "continual.py", user_errors=(BenchmarkError,))
