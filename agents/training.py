"""Training and evaluating one child (docs/method.md 3.3-3.4).

SGD with momentum (optionally Nesterov), gradients clipped to global norm 1.0, a warm-up/cosine
learning-rate schedule that starts at lr/1000, validation every B steps on a fixed validation subset,
and a snapshot of the trainable tensors (and their momentum) at every validation whose score reaches the
threshold. The child is kept iff a snapshot was taken, and it keeps the snapshot, not the last step.

The loop is a bare PyTorch loop on purpose: the data is already on the device as uint8 tensors, the
augmentation is batched, and nothing per step goes through Python beyond what a hand-written loop does.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from taskdata import TaskData
from taskdata.augment import augment_train, preprocess_eval, to_tensor
from agents import compute
from agents.paths import ModelPath
from agents.prefix_cache import PrefixCache, augment_is_identity, prefix_key
from agents.vit import PathModel, VitConfig, component_names


class TaskTensors:
    """A task's splits held on the agent's device as uint8 NCHW tensors (converted once)."""

    def __init__(self, data: TaskData, device: torch.device, validation_examples: int,
                 decision_examples: int | None = None):
        """``validation_examples``: the subset every validation uses; ``decision_examples``: the
        split +honest decides on (the first N validation images; None: the same subset)."""
        self.name, self.num_classes, self.device = data.name, data.num_classes, device
        self.train_x = to_tensor(data.train_x, device)
        self.train_y = torch.as_tensor(data.train_y, dtype=torch.long, device=device)
        n_val = min(len(data.val_y), validation_examples)
        self.val_x = to_tensor(data.val_x[:n_val], device)
        self.val_y = torch.as_tensor(data.val_y[:n_val], dtype=torch.long, device=device)
        self.test_x = to_tensor(data.test_x, device)
        self.test_y = torch.as_tensor(data.test_y, dtype=torch.long, device=device)
        n_dec = n_val if decision_examples is None else min(len(data.val_y), decision_examples)
        self.decision_x, self.decision_y = ((self.val_x, self.val_y) if n_dec == n_val else
                                            (to_tensor(data.val_x[:n_dec], device),
                                             torch.as_tensor(data.val_y[:n_dec], dtype=torch.long,
                                                             device=device)))
        self._val_inputs: dict[int, torch.Tensor] = {}

    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])

    def val_inputs(self, image_size: int) -> torch.Tensor:
        """Validation images preprocessed once per image size (the same subset every validation)."""
        if image_size not in self._val_inputs:
            self._val_inputs[image_size] = preprocess_eval(self.val_x, image_size)
        return self._val_inputs[image_size]

    def batch_indices(self, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        """Endless shuffled batches (a fresh permutation each epoch, drawn on CPU for determinism)."""
        n = self.n_train
        while True:
            perm = torch.randperm(n, generator=gen).to(self.device)
            for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                yield perm[i:i + batch_size]


def lr_at(step: int, total: int, lr: float, warmup_ratio: float) -> float:
    """Linear warm-up from lr/1000 to lr over int(ratio*T) steps, then cosine from lr to 0."""
    warm = int(warmup_ratio * total)
    if step < warm:
        start = lr / 1000.0
        return start + (lr - start) * step / warm
    decay = max(1, total - warm)
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step - warm, decay) / decay))


@torch.inference_mode()
def hits(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512,
         prep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per row: is the model's argmax the label (a bool tensor)."""
    out = [model(prep(x[i:i + batch]) if prep is not None else x[i:i + batch]).argmax(-1) == y[i:i + batch]
           for i in range(0, len(y), batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512,
             prep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    return hits(model, x, y, batch, prep).sum().item() / max(1, len(y))


def test_accuracy(model: PathModel, data: TaskTensors, image_size: int,
                  cache: PrefixCache | None = None, child: ModelPath | None = None) -> float:
    """Exact accuracy on the whole test split (never used for selection); through the agent's
    prefix cache when one is given with the model's path."""
    key = prefix_key(child, model, image_size) if cache is not None and child is not None else None
    if key is not None:
        h = cache.outputs(key, model, "test", data.test_x, image_size)
        cache.take_filled()  # a test-split fill is evaluation, not training: no child pays for it
        return accuracy(model.forward_suffix, h, data.test_y)
    return accuracy(model, data.test_x, data.test_y, prep=lambda xb: preprocess_eval(xb, image_size))


def make_model_and_optimizer(child: ModelPath, vit: VitConfig):
    """The child's module and an SGD over its trainable (not yet stored) components only.

    Frozen components get neither gradients nor optimizer state. Clones start from their parent's
    momentum buffer (docs/method.md 6.4); the learning-rate schedule always restarts.
    """
    h = child.hparams
    trainable = {n for n, c in child.components.items() if not c.stored}
    model = PathModel(vit, h, {n: c.params for n, c in child.components.items()}, trainable)
    tensors = model.trainable_tensors()
    opt = torch.optim.SGD(list(tensors.values()), lr=h["opt_lr"], momentum=h["opt_momentum"],
                          nesterov=bool(h["opt_nesterov"]) and h["opt_momentum"] > 0)
    for (cname, tname), p in tensors.items():
        mom = child.components[cname].momentum
        if mom is not None and tname in mom and mom[tname].shape == p.shape:
            opt.state[p]["momentum_buffer"] = mom[tname].to(p.device, torch.float32).clone()
    return model, opt, tensors


def sgd_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, lr: float) -> None:
    """One step of the method's optimiser: gradients clipped to global norm 1.0, at learning rate lr."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


@dataclass
class TrainResult:
    accepted: bool                 # a snapshot reached the threshold (docs/method.md 3.3)
    quality: float | None          # best validation accuracy seen
    score: float | None            # score at the kept snapshot (None if not accepted)
    snapshot_quality: float | None = None  # validation accuracy at the kept snapshot
    evals: list[float] = field(default_factory=list)
    steps: int = 0
    snapshot_step: int = 0          # steps trained when the kept snapshot was taken
    train_images: int = 0
    seconds: float = 0.0
    aborted: bool = False           # abandoned (shutdown): nothing is written, the child reruns
    stopped: str = ""               # why training ended before its last validation ("hurdle")
    flops: compute.FlopsTally = field(default_factory=compute.FlopsTally)
    lowest_trainable: str | None = None
    last_lr: float | None = None    # the learning rate of the last step (+honest runs record it)


class _Inputs:
    """Where a child's model inputs come from: images preprocessed per batch, or the frozen prefix's
    outputs from the agent's cache (exact; see agents/prefix_cache.py), plus what each costs.

    The training split is served from the cache only when augmentation is the identity (then the
    augmented batch equals the evaluation preprocessing bit for bit and draws nothing from the
    generator, so the seeded stream of batches is the same with and without a cache).
    """

    def __init__(self, child: ModelPath, model: PathModel, vit: VitConfig, data: "TaskTensors",
                 cache: PrefixCache | None, tally: compute.FlopsTally):
        h = child.hparams
        self.size, self.model, self.data, self.tally = h["ds_image_size"], model, data, tally
        self.key = prefix_key(child, model, self.size) if cache is not None else None
        self.cache = cache if self.key is not None else None
        prefix = model.frozen_prefix if self.cache is not None else ()
        self.train_cached = self.cache is not None and augment_is_identity(h)
        trainable = model.trainable_components
        self.step_flops = compute.train_flops_per_image(vit, h, trainable,
                                                        cached=prefix if self.train_cached else ())
        self.eval_flops = compute.forward_flops(vit, h, skip=prefix)
        self.prefix_flops = compute.forward_flops(vit, h) - compute.forward_flops(vit, h, skip=prefix)

    def _charge_fills(self) -> None:
        if self.cache is not None:
            self.tally.cache_fill += self.cache.take_filled() * self.prefix_flops

    def train_logits(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        self.tally.train += int(idx.shape[0]) * self.step_flops
        if self.train_cached:
            h = self.cache.outputs(self.key, self.model, "train", self.data.train_x, self.size, rows=idx)
            self._charge_fills()
            return self.model.forward_suffix(h)
        x = augment_train(self.data.train_x[idx], self.model.hparams, self.size, gen)
        return self.model(x)

    def val_accuracy(self) -> float:
        """Accuracy on the validation subset, charged as validation FLOPs."""
        labels = self.data.val_y
        self.tally.validation += len(labels) * self.eval_flops
        if self.cache is None:
            return accuracy(self.model, self.data.val_inputs(self.size), labels)
        h = self.cache.outputs(self.key, self.model, "val", self.data.val_x, self.size)
        self._charge_fills()
        return accuracy(self.model.forward_suffix, h, labels)

    def decision_accuracy(self) -> tuple[float, float]:
        """Accuracy on the decision split (+honest) and, from the same pass, on the validation
        subset (its first rows), charged as validation FLOPs."""
        x, labels = self.data.decision_x, self.data.decision_y
        if x is self.data.val_x:
            q = self.val_accuracy()
            return q, q
        self.tally.validation += len(labels) * self.eval_flops
        if self.cache is None:
            right = hits(self.model, x, labels, prep=lambda xb: preprocess_eval(xb, self.size))
        else:
            h = self.cache.outputs(self.key, self.model, "decision", x, self.size)
            self._charge_fills()
            right = hits(self.model.forward_suffix, h, labels)
        n_sub = len(self.data.val_y)
        return right.sum().item() / len(labels), right[:n_sub].sum().item() / max(1, n_sub)


def decision_accuracy(path: ModelPath, vit: VitConfig, data: TaskTensors,
                      cache: PrefixCache | None = None, like: Collection[str] = ()
                      ) -> tuple[float, float, compute.FlopsTally]:
    """A stored model's accuracy on the validation subset and on the decision split, and what it
    cost: the parent re-scored on exactly the images its child is judged on (+honest).

    ``like``: the child's trainable component names. The model is built as if those trained, so its
    frozen prefix (and prefix-cache entry) is the one the child shares with it: the prefix outputs of
    the decision split are then computed once for both. Nothing is trained here."""
    h = path.hparams
    model = PathModel(vit, h, {n: c.params for n, c in path.components.items()},
                      set(like) & set(path.components))
    model.eval()
    tally = compute.FlopsTally()
    inputs = _Inputs(path, model, vit, data, cache, tally)
    decision, subset = inputs.decision_accuracy()
    return subset, decision, tally


def train_child(
    child: ModelPath,
    vit: VitConfig,
    data: TaskTensors,
    *,
    batch_size: int,
    steps_between_validations: int,
    validations: int,
    threshold: float,
    score_of: Callable[[float], float],
    gen: torch.Generator,
    on_step: Callable[[], bool] | None = None,
    schedule: tuple[int, int] | None = None,
    stop_early: Callable[[int, float], bool] | None = None,
    cache: PrefixCache | None = None,
    total_steps: int | None = None,
    decide_threshold: float | None = None,
    lr_fn: Callable[[int], float] | None = None,
    ema_decay: float | None = None,
) -> tuple[TrainResult, PathModel]:
    """Train the child's trainable (not yet stored) components in place; return the kept result.

    ``score_of(quality)`` turns a validation accuracy into the child's score (size/compute penalty
    applied). ``on_step`` is called between steps; returning True abandons the child (e.g. Ctrl-C).
    ``schedule = (start, total)`` places the child's steps at ``start`` of one warm-up/cosine schedule
    of ``total`` steps (the ``+continue`` extension: a lineage shares one schedule, restarting only
    when it runs past its end); None restarts the schedule for this child (the reference's rule).
    ``stop_early(validation_number, score)`` is asked after each validation (1-based); True ends
    training there (``result.stopped = "hurdle"``, the ``+hurdle`` extension): the child keeps a
    snapshot it already took, and the images it did not use go to the next children.
    ``cache``: the agent's frozen-prefix activation cache (exact; None trains without one).
    ``total_steps``: train this many steps instead of ``steps_between_validations x validations``
    (the benchmarks' baselines spending a FLOPs budget), validating also after the last step.
    FLOPs are counted as they are spent (``result.flops``, agents/compute.py).

    ``decide_threshold`` (the ``+honest`` extension): the child is judged once, after its last step,
    on the decision split (``data.decision_x``) and accepted iff that score reaches this threshold
    (its parent re-scored on the same images); it keeps its last weights. The validations before
    then use the subset and only feed ``stop_early``; a child stopped early is rejected.
    ``lr_fn(step)`` replaces the schedule (the ``+polish`` child's decay to zero).
    ``ema_decay``: the weights judged and kept are an exponential moving average of the trainable
    tensors over the steps (the ``+polish`` child), not the last step's.
    """
    if decide_threshold is not None:
        return _train_decided(child, vit, data, batch_size=batch_size,
                              steps_between_validations=steps_between_validations,
                              validations=validations, threshold=threshold, score_of=score_of,
                              gen=gen, on_step=on_step, schedule=schedule, stop_early=stop_early,
                              cache=cache, total_steps=total_steps, decide_threshold=decide_threshold,
                              lr_fn=lr_fn, ema_decay=ema_decay)
    t0 = time.perf_counter()
    h = child.hparams
    model, opt, tensors, params, total, result, inputs, batches = _start(
        child, vit, data, cache, batch_size, steps_between_validations * validations
        if total_steps is None else total_steps, gen)
    best_threshold, snapshot = threshold, None
    model.train()
    for step in range(total):
        if on_step is not None and on_step():
            result.aborted = True
            break
        idx = next(batches)
        lr = _lr(step, total, h, schedule)
        sgd_step(opt, params, F.cross_entropy(inputs.train_logits(idx, gen), data.train_y[idx]), lr)
        result.steps += 1
        result.train_images += int(idx.shape[0])
        if (step + 1) % steps_between_validations == 0 or step + 1 == total:
            model.eval()
            q = inputs.val_accuracy()
            model.train()
            result.evals.append(q)
            s = score_of(q)
            if s >= best_threshold:  # >= : ties with the parent count as improvements
                best_threshold = s
                snapshot = {k: p.detach().clone() for k, p in tensors.items()}
                moms = {k: opt.state[p].get("momentum_buffer") for k, p in tensors.items()}
                snapshot_mom = {k: (m.detach().clone() if m is not None else None) for k, m in moms.items()}
                result.score, result.snapshot_quality = s, q
                result.snapshot_step = step + 1
            if stop_early is not None and step + 1 < total and stop_early(len(result.evals), s):
                result.stopped = "hurdle"
                break
    result.quality = max(result.evals) if result.evals else None
    if snapshot is not None and not result.aborted:
        result.accepted = True
        with torch.no_grad():
            for k, p in tensors.items():
                p.copy_(snapshot[k])
        for (cname, tname), m in snapshot_mom.items():
            comp = child.components[cname]
            if m is not None:
                comp.momentum = comp.momentum if comp.momentum is not None else {}
                comp.momentum[tname] = m
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result, model


def _start(child: ModelPath, vit: VitConfig, data: TaskTensors, cache: PrefixCache | None,
           batch_size: int, total: int, gen: torch.Generator):
    """What every training run of a child begins with: its module and optimiser, the result it
    fills, where its inputs come from (the prefix cache or the images) and its batches."""
    model, opt, tensors = make_model_and_optimizer(child, vit)
    result = TrainResult(accepted=False, quality=None, score=None)
    inputs = _Inputs(child, model, vit, data, cache, result.flops)
    result.lowest_trainable = next((n for n in component_names(child.hparams)
                                    if n in model.trainable_components), None)
    return (model, opt, tensors, list(tensors.values()), total, result, inputs,
            data.batch_indices(batch_size, gen))


def _lr(step: int, total: int, h: dict, schedule: tuple[int, int] | None) -> float:
    if schedule is None:
        return lr_at(step, total, h["opt_lr"], h["opt_lr_warmup_ratio"])
    return lr_at((schedule[0] + step) % schedule[1], schedule[1], h["opt_lr"], h["opt_lr_warmup_ratio"])


def polish_lr(start_lr: float, steps: int) -> Callable[[int], float]:
    """Cosine from ``start_lr`` (the lineage's learning rate where it stands) to exactly 0 at the
    last of ``steps`` steps: the +polish child ends annealed, as a fine-tuning run does."""
    last = max(1, steps - 1)
    return lambda step: 0.5 * start_lr * (1.0 + math.cos(math.pi * min(step, last) / last))


def _train_decided(child: ModelPath, vit: VitConfig, data: TaskTensors, *, batch_size: int,
                   steps_between_validations: int, validations: int, threshold: float,
                   score_of: Callable[[float], float], gen: torch.Generator,
                   on_step: Callable[[], bool] | None, schedule: tuple[int, int] | None,
                   stop_early: Callable[[int, float], bool] | None, cache: PrefixCache | None,
                   total_steps: int | None, decide_threshold: float,
                   lr_fn: Callable[[int], float] | None, ema_decay: float | None
                   ) -> tuple[TrainResult, PathModel]:
    """``train_child`` under +honest: one decision, on the decision split, after the last step.

    Subset validations run only where ``stop_early`` can act on them (the hurdle, against
    ``threshold``: the parent re-scored on the subset); the last weights (or their average) are
    what is judged and kept, so no maximum over noisy validations is ever recorded."""
    t0 = time.perf_counter()
    h = child.hparams
    model, opt, tensors, params, total, result, inputs, batches = _start(
        child, vit, data, cache, batch_size, steps_between_validations * validations
        if total_steps is None else total_steps, gen)
    # The average starts half-way (the late, low-learning-rate half of the run), so the weights the
    # child started from are not mixed into what it is judged on.
    ema, ema_from = None, total // 2
    model.train()
    for step in range(total):
        if on_step is not None and on_step():
            result.aborted = True
            break
        idx = next(batches)
        lr = lr_fn(step) if lr_fn is not None else _lr(step, total, h, schedule)
        result.last_lr = lr
        sgd_step(opt, params, F.cross_entropy(inputs.train_logits(idx, gen), data.train_y[idx]), lr)
        result.steps += 1
        result.train_images += int(idx.shape[0])
        if ema_decay is not None and step + 1 >= ema_from:
            with torch.no_grad():
                if ema is None:
                    ema = {k: p.detach().clone() for k, p in tensors.items()}
                else:
                    for k, p in tensors.items():
                        ema[k].mul_(ema_decay).add_(p.detach(), alpha=1.0 - ema_decay)
        if (stop_early is not None and step + 1 < total
                and (step + 1) % steps_between_validations == 0):
            model.eval()
            q = inputs.val_accuracy()
            model.train()
            result.evals.append(q)
            if stop_early(len(result.evals), score_of(q)):
                result.stopped = "hurdle"
                break
    model.eval()
    if not result.aborted and not result.stopped:
        if ema is not None:
            with torch.no_grad():
                for k, p in tensors.items():
                    p.copy_(ema[k])
        q, on_subset = inputs.decision_accuracy()
        result.evals.append(on_subset)  # the learning curve's last point, on the subset as the others
        s = score_of(q)
        result.quality, result.snapshot_quality, result.snapshot_step = q, q, result.steps
        if s >= decide_threshold:  # >= : a tie with the parent counts as an improvement
            result.accepted, result.score = True, s
            for (cname, tname), p in tensors.items():
                m = opt.state[p].get("momentum_buffer")
                if m is not None:
                    comp = child.components[cname]
                    comp.momentum = comp.momentum if comp.momentum is not None else {}
                    comp.momentum[tname] = m.detach().clone()
    result.seconds = time.perf_counter() - t0
    return result, model
