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

Compute is counted as the swarm counts its children (``agents.compute``): a training step costs its
images x ``train_flops_per_image`` of the method's trainable set (finetune-all: everything; adapters:
the adapters, the cloned ``encoder_norm`` and the head, over the frozen root; joint: the whole backbone
and the head of each image's own task), a validation costs the images validated x their forward FLOPs.
No baseline uses a prefix cache. Every ``TaskOutcome`` carries that tally (``flops``, ``train_flops``).

Two budgets: ``images`` per task (the equal-images comparison; the number of validations follows from
it) or ``flops_budget`` per task (the equal-FLOPs comparison; ``joint`` spends their sum). With a FLOPs
budget a method trains as many steps as the budget buys, validation included: it validates every
``steps_between_validations`` steps and once more after its last step when that does not fall on the
cadence, and its warm-up/cosine schedule spans exactly those steps, so a method whose images cost less
trains more of them. It stops less than one step plus one validation short of the budget
(``steps_for_flops``) and never goes over it.
"""
from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import agents  # noqa: F401  (must precede timm)
from agents.compute import FlopsTally, forward_flops, train_flops_per_image
from agents.config import Preset
from taskdata.augment import augment_train
from agents.paths import Component, ModelPath, copy_component
from agents.training import (TaskTensors, accuracy, lr_at,
                             test_accuracy, train_child)
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
    flops_per_image: int          # forward FLOPs of one image (inference cost)
    train_flops: int = 0          # everything this task's training cost: flops["total"]
    flops: dict[str, int] = field(default_factory=dict)  # FlopsTally.to_dict(): train, validation, ...
    flops_budget: int | None = None  # the FLOPs budget it was given (None: an images budget)


@dataclass
class MethodOutcome:
    method: str
    per_task: dict[str, TaskOutcome]
    total_params: int            # unique parameters of everything the method keeps
    wall_seconds: float          # training + test evaluation in this process (data preloaded)

    @property
    def train_flops(self) -> int:
        """Training compute over all tasks, validations included (joint: its per-task shares add up)."""
        return sum(o.train_flops for o in self.per_task.values())


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


def steps_for_flops(budget: int, step_flops: int, validation_flops: int, every: int) -> int:
    """The most training steps a FLOPs budget buys when each step costs ``step_flops`` and a
    validation of ``validation_flops`` follows every ``every`` steps and the last step.

    ``S`` steps cost ``S * step_flops + ceil(S / every) * validation_flops``; what is left of the budget
    is less than ``step_flops + validation_flops`` (the price of one more step).
    """
    if step_flops <= 0 or validation_flops < 0 or every < 1:
        raise ValueError("step_flops must be > 0, validation_flops >= 0 and every >= 1")
    period = every * step_flops + validation_flops
    full, rest = divmod(int(budget), period)
    extra = (rest - validation_flops) // step_flops if rest >= validation_flops + step_flops else 0
    return full * every + extra


def flops_of_steps(steps: int, step_flops: int, validation_flops: int, every: int) -> int:
    """What ``steps`` cost under ``steps_for_flops``'s rule (validations included)."""
    return steps * step_flops + -(-steps // every) * validation_flops


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


def _train_single(root: ModelPath, vit: VitConfig, preset: Preset, data: TaskTensors, images: int | None,
                  h: dict, clone: set[str], method: str, seed: int,
                  flops_budget: int | None = None) -> TaskOutcome:
    b = preset.budget
    sbv = preset.steps_between_validations(data.n_train)
    gen = task_generator(seed, method, data.name)
    child = build_path(root, vit, h, clone=clone, agent=f"bench~{method}", task=data.name, gen=gen)
    trainable = {n for n, c in child.components.items() if not c.stored}
    per_image = train_flops_per_image(vit, h, trainable)
    forward = forward_flops(vit, h)
    n_val = int(data.val_y.shape[0])
    start = time.perf_counter()
    if flops_budget is None:
        validations = validations_for(images, b.batch_size, sbv)
        result, model = train_child(child, vit, data, batch_size=b.batch_size,
                                    steps_between_validations=sbv, validations=validations,
                                    threshold=-math.inf, score_of=float, gen=gen)
    else:
        step_images = min(b.batch_size, data.n_train)  # what TaskTensors.batch_indices yields
        steps = steps_for_flops(flops_budget, step_images * per_image, n_val * forward, sbv)
        if steps < 1:
            raise ValueError(f"{method} {data.name}: a FLOPs budget of {flops_budget:,} buys no "
                             f"training step")
        result, model = train_child(child, vit, data, batch_size=b.batch_size,
                                    steps_between_validations=sbv, validations=0, total_steps=steps,
                                    threshold=-math.inf, score_of=float, gen=gen)
        validations = len(result.evals)
    test = test_accuracy(model, data, h["ds_image_size"])
    tally = result.flops  # counted by train_child as it trains, exactly as for the swarm's children
    assert tally.train == result.train_images * per_image and tally.cache_fill == 0
    return TaskOutcome(data.name, test, result.quality, result.train_images, result.steps, validations,
                       time.perf_counter() - start, count_flops(vit, h), tally.total, tally.to_dict(),
                       flops_budget)


def _budget_of(name: str, images: Mapping[str, int] | None, flops_budget: Mapping[str, int] | None
               ) -> tuple[int | None, int | None]:
    if flops_budget is not None:
        return None, int(flops_budget[name])
    if images is None:
        raise ValueError("give an images budget or a flops_budget")
    return images[name], None


def _log_task(log, method: str, name: str, out: TaskOutcome) -> None:
    log(f"{method} {name}: test {out.test_accuracy:.4f} val {out.best_val_accuracy:.4f} "
        f"images {out.train_images} steps {out.steps} FLOPs {out.train_flops:.3e}"
        + (f" (budget {out.flops_budget:.3e})" if out.flops_budget is not None else "")
        + f" {out.train_seconds:.1f}s")


def run_finetune_all(root: ModelPath, vit: VitConfig, preset: Preset, tasks: Mapping[str, TaskTensors],
                     images: Mapping[str, int] | None, seed: int, log=print, *,
                     flops_budget: Mapping[str, int] | None = None) -> MethodOutcome:
    """An independent copy of the whole root plus a head per task, every parameter trained.
    ``flops_budget`` (per task) replaces the ``images`` budget (see the module doc)."""
    start, per_task, total = time.perf_counter(), {}, 0
    for name, data in tasks.items():
        h = task_hparams(preset, vit, data.num_classes)
        clone = set(component_names(h))
        n_images, n_flops = _budget_of(name, images, flops_budget)
        out = _train_single(root, vit, preset, data, n_images, h, clone, "finetune-all", seed, n_flops)
        per_task[name] = out
        total += sum(count_params(vit, h).values())
        _log_task(log, "finetune-all", name, out)
    return MethodOutcome("finetune-all", per_task, total, time.perf_counter() - start)


def run_adapters(root: ModelPath, vit: VitConfig, preset: Preset, tasks: Mapping[str, TaskTensors],
                 images: Mapping[str, int] | None, seed: int, adapter_dim: int = 32, log=print, *,
                 flops_budget: Mapping[str, int] | None = None) -> MethodOutcome:
    """Frozen shared root; per task: adapters before every block, cloned encoder_norm, fresh head.
    ``flops_budget`` (per task) replaces the ``images`` budget (see the module doc)."""
    start, per_task, private = time.perf_counter(), {}, 0
    shared: dict[str, int] = {}
    for name, data in tasks.items():
        h = task_hparams(preset, vit, data.num_classes, adapter_dim=adapter_dim,
                         adapter_layers="_".join(str(i) for i in range(vit.depth)))
        n_images, n_flops = _budget_of(name, images, flops_budget)
        out = _train_single(root, vit, preset, data, n_images, h, {"encoder_norm"}, "adapters", seed,
                            n_flops)
        per_task[name] = out
        for comp, n in count_params(vit, h).items():
            if comp in root.components and comp != "encoder_norm":
                shared[comp] = n                  # the frozen root part, counted once for all tasks
            else:
                private += n
        _log_task(log, "adapters", name, out)
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


def _allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """``total`` images split over tasks in proportion to ``weights`` (cumulative floors: exact sum)."""
    names, whole = list(weights), sum(weights.values())
    out, cum, prev = {}, 0.0, 0
    for i, n in enumerate(names):
        cum += weights[n]
        c = total if i == len(names) - 1 else min(total, math.floor(total * cum / whole))
        out[n], prev = c - prev, c
    return out


def joint_flops_plan(flops_budget: Mapping[str, int], per_image: Mapping[str, int],
                     steps_between: Mapping[str, int], validation_flops: int, batch_size: int
                     ) -> tuple[int, dict[str, int], int]:
    """(steps, images per task, steps between validations) of a joint run on a FLOPs budget.

    The run spends the sum of the per-task budgets. Tasks share the images in proportion to what
    each task's own budget buys at its own training cost per image (validations aside), so each
    task is charged about its own budget. The validation cadence is the one an images budget gives
    (as often as the most often validated task would be alone: every ``steps_between / share``
    steps); the steps are the most the budget buys with a validation of all tasks every ``every``
    steps and after the last (``steps_for_flops``' rule).
    """
    weights = {n: flops_budget[n] / per_image[n] for n in flops_budget}
    if any(w <= 0 for w in weights.values()):
        raise ValueError("joint: every task needs a positive FLOPs budget")
    whole = sum(weights.values())
    every = max(1, min(round(steps_between[n] * whole / weights[n]) for n in weights))
    budget = sum(int(v) for v in flops_budget.values())

    def cost(steps: int) -> int:
        alloc = _allocate(steps * batch_size, weights)
        return sum(alloc[n] * per_image[n] for n in alloc) + -(-steps // every) * validation_flops

    mean_step = math.ceil(batch_size * sum(weights[n] * per_image[n] for n in weights) / whole)
    steps = steps_for_flops(budget, max(1, mean_step), validation_flops, every)
    while cost(steps + 1) <= budget:
        steps += 1
    while steps > 0 and cost(steps) > budget:
        steps -= 1
    return steps, _allocate(steps * batch_size, weights), every


def multi_head_loss(features: Tensor, heads: Mapping[str, tuple[Tensor, Tensor]],
                    batches: list[tuple[str, Tensor]]) -> Tensor:
    """Mean cross-entropy of a batch that concatenates several tasks' samples: ``features`` rows are
    ``batches`` in order (task name, its labels), each scored by its own task's head."""
    loss, offset = features.new_zeros(()), 0
    for name, y in batches:
        weight, bias = heads[name]
        loss = loss + F.cross_entropy(F.linear(features[offset:offset + len(y)], weight, bias), y,
                                      reduction="sum")
        offset += len(y)
    return loss / offset


def run_joint(root: ModelPath, vit: VitConfig, preset: Preset, tasks: Mapping[str, TaskTensors],
              images: Mapping[str, int] | None, seed: int, log=print, *,
              flops_budget: Mapping[str, int] | None = None) -> MethodOutcome:
    """One backbone (a trainable copy of the root) + one head per task, trained on mixed batches.

    Budget: every task gets exactly its own budget of training images, over the number of steps
    of the preset's batch size that their sum fills; each step's batch holds every task's share
    (proportional to its budget, so shares vary by one image from step to step). Validation: as many
    validations as the task with the most gets alone, each over every task's validation subset; the
    kept checkpoint (backbone and all heads together) is the one with the best mean validation
    accuracy. With ``flops_budget`` (per task) the run spends their sum instead (``joint_flops_plan``)
    and ``images`` is not used.

    Compute: an image of task n costs the whole backbone's forward and backward plus task n's head
    (``train_flops_per_image`` of task n's model, everything trainable); each task is charged its own
    images and the validations of its own subset, so the per-task tallies add up to the run's.
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

    task_h = {n: task_hparams(preset, vit, tasks[n].num_classes) for n in names}
    per_image = {n: train_flops_per_image(vit, task_h[n], component_names(task_h[n])) for n in names}
    val_flops = {n: int(tasks[n].val_y.shape[0]) * forward_flops(vit, task_h[n]) for n in names}
    sbv = {n: preset.steps_between_validations(tasks[n].n_train) for n in names}
    if flops_budget is None:
        if images is None:
            raise ValueError("give an images budget or a flops_budget")
        total_steps = max(1, round(sum(images[n] for n in names) / b.batch_size))
        validations = max(validations_for(images[n], b.batch_size, sbv[n]) for n in names)
        validations = min(validations, total_steps)
        every = max(1, total_steps // validations)
        total_steps = every * validations
        alloc = {n: images[n] for n in names}
    else:
        total_steps, alloc, every = joint_flops_plan({n: flops_budget[n] for n in names}, per_image, sbv,
                                                     sum(val_flops.values()), b.batch_size)
        if total_steps < 1:
            raise ValueError(f"joint: a FLOPs budget of {sum(flops_budget.values()):,} buys no step")
    streams = {n: _IndexStream(tasks[n].n_train, gen) for n in names}
    views = {n: _TaskHead(model, *heads[n]) for n in names}
    best_mean, best_val, snapshot = -math.inf, {}, None
    seen = {n: 0 for n in names}
    validated = 0
    model.train()
    for step in range(total_steps):
        xs, ys = [], []
        for n in names:
            share = alloc[n] * (step + 1) // total_steps - seen[n]  # cumulative: exact at the end
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
        drawn = [(n, y) for n, y in zip(names, ys) if y is not None]
        loss = multi_head_loss(model.forward_features(torch.cat(xs)), heads, drawn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % every == 0 or step + 1 == total_steps:  # the last step of an images budget
            model.eval()                                        # always falls on the cadence
            val = {n: accuracy(views[n], tasks[n].val_inputs(size), tasks[n].val_y) for n in names}
            model.train()
            validated += 1
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
        test = test_accuracy(views[n], tasks[n], size)
        tally = FlopsTally(train=seen[n] * per_image[n], validation=validated * val_flops[n])
        per_task[n] = TaskOutcome(n, test, best_val.get(n), seen[n], total_steps, validated,
                                  train_seconds, count_flops(vit, task_h[n]), tally.total, tally.to_dict(),
                                  None if flops_budget is None else int(flops_budget[n]))
        _log_task(log, "joint", n, per_task[n])
    counts = count_params(vit, h)
    total = sum(counts[n] for n in backbone_names) + sum(w.numel() + bb.numel() for w, bb in heads.values())
    return MethodOutcome("joint", per_task, total, time.perf_counter() - start)


RUNNERS = {"finetune-all": run_finetune_all, "adapters": run_adapters, "joint": run_joint}
