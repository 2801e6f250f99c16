"""The three compute-matched baselines the swarm is compared with (benchmarks/quality.py).

Each starts from the swarm's own root (the same tensors, read from its store), uses the preset's
default hparams (lr 0.01, momentum 0.9, warm-up 0.1 then cosine, clip 1.0, batch size from the
budget, no augmentation, image size from the budget), the same validation subset and cadence, keeps
the best validation checkpoint, and reports accuracy on the test split:

* ``finetune-all``: one independent model per task, every parameter trainable;
* ``adapters``: residual adapters before every block, a fresh head and a clone of the final norm per
  task; the root itself stays frozen and is shared by all tasks;
* ``joint``: one backbone trained on every task at once (each batch mixes the tasks in proportion to
  their budgets), one head per task, checkpoint chosen by the mean validation accuracy over tasks.

The single-task baselines reuse ``agents.training.train_child`` itself, so they share the agents'
exact loop (schedule, clipping, snapshotting); ``joint`` needs several heads per step and has its own
loop built from the same pieces (``lr_at``, ``augment_train``, ``accuracy``).
"""
from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import agents  # noqa: F401  (must precede timm)
from agents.config import Preset
from taskdata.augment import augment_train
from agents.paths import Component, ModelPath, copy_component
from agents.training import TaskTensors, accuracy, lr_at, test_accuracy, train_child
from agents.vit import PathModel, VitConfig, component_names, count_flops, count_params, init_component

METHODS = ("finetune-all", "adapters", "joint")


@dataclass
class TaskOutcome:
    """What one method achieved on one task."""

    task: str
    test_accuracy: float
    best_val_accuracy: float | None
    train_images: int
    steps: int
    validations: int
    train_seconds: float
    flops_per_image: int


@dataclass
class MethodOutcome:
    method: str
    per_task: dict[str, TaskOutcome]
    total_params: int            # unique parameters of everything the method keeps
    wall_seconds: float          # training + test evaluation in this process (data preloaded)


def task_hparams(preset: Preset, vit: VitConfig, num_classes: int, **changes) -> dict:
    """The preset's default hparams for a task, as an agent's first child would have them."""
    h = preset.default_hparams(num_classes)
    h["num_layers"] = vit.depth
    h.update(changes)
    return h


def task_generator(seed: int, method: str, task: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{method}/{task}".encode()))


def validations_for(images: int, batch_size: int, steps_between: int) -> int:
    """How many validation periods of ``steps_between`` steps fit the image budget (at least one)."""
    return max(1, round(images / (batch_size * steps_between)))


def build_path(root: ModelPath, vit: VitConfig, h: dict, *, clone: set[str], agent: str, task: str,
               gen: torch.Generator) -> ModelPath:
    """A path over the root: root components are shared (frozen) unless named in ``clone`` (then
    a private trainable copy); components the root lacks (head, adapters) are freshly initialised."""
    comps: dict[str, Component] = {}
    for i, name in enumerate(component_names(h)):
        src = root.components.get(name)
        if src is not None and name not in clone:
            comps[name] = src                     # stored=True: frozen, never trained here
        elif src is not None:
            comps[name] = copy_component(src, agent, i)
        else:
            comps[name] = Component(name, agent, i, init_component(name, vit, h, gen))
    return ModelPath(f"{agent}:m0", agent, task, h, comps, parent_id=root.id)


def _train_single(root: ModelPath, vit: VitConfig, preset: Preset, data: TaskTensors, images: int,
                  h: dict, clone: set[str], method: str, seed: int) -> TaskOutcome:
    b = preset.budget
    sbv = preset.steps_between_validations(data.n_train)
    validations = validations_for(images, b.batch_size, sbv)
    gen = task_generator(seed, method, data.name)
    child = build_path(root, vit, h, clone=clone, agent=f"bench~{method}", task=data.name, gen=gen)
    start = time.perf_counter()
    result, model = train_child(child, vit, data, batch_size=b.batch_size, steps_between_validations=sbv,
                                validations=validations, threshold=-math.inf, score_of=float, gen=gen)
    test = test_accuracy(model, data, h["ds_image_size"])
    return TaskOutcome(data.name, test, result.quality, result.train_images, result.steps, validations,
                       time.perf_counter() - start, count_flops(vit, h))


def run_finetune_all(root: ModelPath, vit: VitConfig, preset: Preset, tasks: Mapping[str, TaskTensors],
                     images: Mapping[str, int], seed: int, log=print) -> MethodOutcome:
    """An independent copy of the whole root plus a head per task, every parameter trained."""
    start, per_task, total = time.perf_counter(), {}, 0
    for name, data in tasks.items():
        h = task_hparams(preset, vit, data.num_classes)
        clone = set(component_names(h))
        out = _train_single(root, vit, preset, data, images[name], h, clone, "finetune-all", seed)
        per_task[name] = out
        total += sum(count_params(vit, h).values())
        log(f"finetune-all {name}: test {out.test_accuracy:.4f} val {out.best_val_accuracy:.4f} "
            f"images {out.train_images} {out.train_seconds:.1f}s")
    return MethodOutcome("finetune-all", per_task, total, time.perf_counter() - start)


def run_adapters(root: ModelPath, vit: VitConfig, preset: Preset, tasks: Mapping[str, TaskTensors],
                 images: Mapping[str, int], seed: int, adapter_dim: int = 32, log=print) -> MethodOutcome:
    """Frozen shared root; per task: adapters before every block, cloned encoder_norm, fresh head."""
    start, per_task, private = time.perf_counter(), {}, 0
    shared: dict[str, int] = {}
    for name, data in tasks.items():
        h = task_hparams(preset, vit, data.num_classes, adapter_dim=adapter_dim,
                         adapter_layers="_".join(str(i) for i in range(vit.depth)))
        out = _train_single(root, vit, preset, data, images[name], h, {"encoder_norm"}, "adapters", seed)
        per_task[name] = out
        for comp, n in count_params(vit, h).items():
            if comp in root.components and comp != "encoder_norm":
                shared[comp] = n                  # the frozen root part, counted once for all tasks
            else:
                private += n
        log(f"adapters {name}: test {out.test_accuracy:.4f} val {out.best_val_accuracy:.4f} "
            f"images {out.train_images} {out.train_seconds:.1f}s")
    return MethodOutcome("adapters", per_task, sum(shared.values()) + private, time.perf_counter() - start)


# ---- joint training ------------------------------------------------------------------------------

class _IndexStream:
    """Endless shuffled training indices of one task, taken a variable number at a time.

    The joint loop gives each task exactly its budget over the run, so a task's share of a step
    varies by one image from step to step; ``TaskTensors.batch_indices`` has a fixed batch size.
    """

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen = n, gen
        self.perm, self.pos = torch.randperm(n, generator=gen), 0

    def take(self, k: int) -> Tensor:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            part = self.perm[self.pos:self.pos + k]
            self.pos += len(part)
            k -= len(part)
            parts.append(part)
        return torch.cat(parts) if len(parts) != 1 else parts[0]


class _TaskHead(nn.Module):
    """The shared backbone's features through one task's head (for ``accuracy``)."""

    def __init__(self, backbone: PathModel, weight: Tensor, bias: Tensor):
        super().__init__()
        self.backbone, self.weight, self.bias = backbone, weight, bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.backbone.forward_features(x), self.weight, self.bias)


def run_joint(root: ModelPath, vit: VitConfig, preset: Preset, tasks: Mapping[str, TaskTensors],
              images: Mapping[str, int], seed: int, log=print) -> MethodOutcome:
    """One backbone (a trainable copy of the root) + one head per task, trained on mixed batches.

    Budget: every task gets exactly its own budget of training images, over the number of steps
    of the preset's batch size that their sum fills; each step's batch holds every task's share
    (proportional to its budget, so shares vary by one image from step to step). Validation: as many
    validations as the task with the most gets alone, each over every task's validation subset; the
    kept checkpoint (backbone and all heads together) is the one with the best mean validation
    accuracy.
    """
    start = time.perf_counter()
    b = preset.budget
    names = list(tasks)
    h = task_hparams(preset, vit, 1)          # the backbone's hparams; its own 1-class head is unused
    size = h["ds_image_size"]
    gen = task_generator(seed, "joint", ",".join(names))
    backbone_names = [n for n in component_names(h) if n != "head"]
    path = build_path(root, vit, h, clone=set(backbone_names), agent="bench~joint", task="joint", gen=gen)
    params = {n: c.params for n, c in path.components.items()}
    model = PathModel(vit, h, params, trainable=backbone_names)
    heads: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for name in names:
        init = init_component("head", vit, {"num_classes": tasks[name].num_classes}, gen)
        heads[name] = (nn.Parameter(init["weight"]), nn.Parameter(init["bias"]))
    trainable = list(model.trainable_tensors().values()) + [p for wb in heads.values() for p in wb]
    opt = torch.optim.SGD(trainable, lr=h["opt_lr"], momentum=h["opt_momentum"],
                          nesterov=bool(h["opt_nesterov"]) and h["opt_momentum"] > 0)

    total_steps = max(1, round(sum(images[n] for n in names) / b.batch_size))
    validations = max(validations_for(images[n], b.batch_size,
                                      preset.steps_between_validations(tasks[n].n_train)) for n in names)
    validations = min(validations, total_steps)
    every = max(1, total_steps // validations)
    total_steps = every * validations
    streams = {n: _IndexStream(tasks[n].n_train, gen) for n in names}
    views = {n: _TaskHead(model, *heads[n]) for n in names}
    best_mean, best_val, snapshot = -math.inf, {}, None
    seen = {n: 0 for n in names}
    model.train()
    for step in range(total_steps):
        xs, ys = [], []
        for n in names:
            share = images[n] * (step + 1) // total_steps - seen[n]  # cumulative: exact at the end
            if share <= 0:
                ys.append(None)
                continue
            idx = streams[n].take(share)
            xs.append(augment_train(tasks[n].train_x[idx], h, size, gen))
            ys.append(tasks[n].train_y[idx])
            seen[n] += share
        lr = lr_at(step, total_steps, h["opt_lr"], h["opt_lr_warmup_ratio"])
        for g in opt.param_groups:
            g["lr"] = lr
        feats = model.forward_features(torch.cat(xs))
        loss, offset = feats.new_zeros(()), 0
        for n, y in zip(names, ys):
            if y is None:
                continue
            w, bias = heads[n]
            loss = loss + F.cross_entropy(F.linear(feats[offset:offset + len(y)], w, bias), y,
                                          reduction="sum")
            offset += len(y)
        loss = loss / offset
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % every == 0:
            model.eval()
            val = {n: accuracy(views[n], tasks[n].val_inputs(size), tasks[n].val_y) for n in names}
            model.train()
            mean = sum(val.values()) / len(val)
            if mean >= best_mean:  # same tie rule as the agents: a later equal checkpoint wins
                best_mean, best_val = mean, val
                snapshot = [p.detach().clone() for p in trainable]
    if snapshot is not None:
        with torch.no_grad():
            for p, s in zip(trainable, snapshot):
                p.copy_(s)
    model.eval()
    train_seconds = time.perf_counter() - start
    per_task = {}
    for n in names:
        hn = task_hparams(preset, vit, tasks[n].num_classes)
        test = test_accuracy(views[n], tasks[n], size)
        per_task[n] = TaskOutcome(n, test, best_val.get(n), seen[n], total_steps, validations,
                                  train_seconds, count_flops(vit, hn))
        log(f"joint {n}: test {test:.4f} val {best_val.get(n, math.nan):.4f} images {seen[n]}")
    counts = count_params(vit, h)
    total = sum(counts[n] for n in backbone_names) + sum(w.numel() + bb.numel() for w, bb in heads.values())
    return MethodOutcome("joint", per_task, total, time.perf_counter() - start)


RUNNERS = {"finetune-all": run_finetune_all, "adapters": run_adapters, "joint": run_joint}
