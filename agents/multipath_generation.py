"""One generation of a multipath agent (µ4Net): propose -> train -> judge, as agents/generation.py is
for the single-path agent, returning the same Proposal / Outcome / Verdict values.

Where this kind follows the reference and where it differs from our single-path method:
* Parent: the agent's own models best-first, each taken with probability 0.5^offsprings; when none is
  taken, the task's current single-path model is the parent and the child starts from the best own
  hparams (or the defaults). There is no draw over other tasks' models: they enter only as paths.
* Paths: path 0 is always the task's *current* single-path model (redrawn for every child, so it
  follows that agent's progress); paths 1-2 keep the parent's by slot, and a new slot draws uniformly
  from the other tasks' single-path models and the root (distinct tasks). Multipath models are leaves:
  no agent of either kind uses one as a parent or a path.
* Components: router and connectors are copied from the direct parent when their shapes match (and,
  for a connector, its path is the same), else start fresh; no clone: action, no adapters.
* Improvement: strict ``>`` against the parent's score (our single-path rule is ``>=``). A tie here
  would publish a model identical in accuracy but trained on a newer path 0, churn with no gain.
* Steps: ``STEPS_SCALE`` (16) times the single-path child's, as cheap as they are (agents/multipath.py).
* Optimiser: a fresh SGD state per child (no momentum inheritance: the reference stores none, and the
  few thousand parameters re-warm in a handful of steps); the schedule restarts for every child.
* Score: validation accuracy, no size or FLOPs term (the reference's; the paths are reused, not owned).
* Data: no augmentation (the reference's defaults are the identity, and only then is a path's output
  per image fixed, which is what lets every path run once per image: ``PathOutputs``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from agents import compute, registry
from agents.config import MU_RANGE
from agents.generation import Context, Counters, Outcome, Proposal, Verdict, Writes, finish
from agents.multipath import (MAX_POPULATION, STEPS_SCALE, frozen_path_module, MULTIPATH_DEFAULTS, MULTIPATH_RANGES, MultipathModel,
                              model_flops, path_flops, trainable_flops)
from agents.mutation import incremental_mutation
from agents.paths import Component, ModelPath, copy_component
from agents.progress import ChildMetrics
from agents.selection import best_path, retain
from agents.training import TrainResult, lr_at, sgd_step
from agents.vit import PathModel, VitConfig, init_component
from taskdata.augment import preprocess_eval

KIND = "multipath"
CHUNK = 512


# ---- frozen paths and their outputs -----------------------------------------------------------------

def frozen_path(vit: VitConfig, path: ModelPath) -> PathModel:
    """A published model as a frozen PathModel over the view's tensors (shared, not copied)."""
    return frozen_path_module(vit, path.hparams, {n: c.params for n, c in path.components.items()})


class PathOutputs:
    """Each frozen path's output for every image of a split, computed once: the main path's logits,
    another path's pooled features. Exact, because a path is immutable and sees no augmentation.
    Keyed by (model id, role, split); an entry remembers the image tensor it was computed from and is
    recomputed for another one (a cache serves one task's data). Least recently used entries go
    beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.filled_images = max_bytes, 0
        self._entries: OrderedDict[tuple[str, bool, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, model_id: str, main: bool, split: str, module: PathModel, images: torch.Tensor,
            image_size: int) -> torch.Tensor:
        key = (model_id, main, split)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is images:
            self._entries.move_to_end(key)
            return entry[1]
        with torch.no_grad():
            parts = []
            for i in range(0, len(images), CHUNK):
                x = preprocess_eval(images[i:i + CHUNK], image_size)
                parts.append(module(x) if main else module.forward_features(x))
        out = torch.cat(parts) if parts else torch.empty(0)
        self.filled_images += len(images)
        if out.numel() * out.element_size() <= self.max_bytes:
            self._entries[key] = (images, out)
            while sum(t.numel() * t.element_size() for _, t in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return out


# ---- propose ------------------------------------------------------------------------------------------

def _do_mutate(h: dict, action: str, rng: random.Random) -> bool:
    """The learned per-action probability, as the single-path Mutator does it (agents/mutation.py)."""
    mu = h.get("_mu_", MULTIPATH_DEFAULTS["_mu_"])
    p = h.get("_mu_|" + action, mu)
    if rng.random() < mu:
        p = incremental_mutation(p, MU_RANGE, rng)
    h["_mu_|" + action] = p
    return p > rng.random()


def mutate_hparams(h: dict, rng: random.Random) -> list[str]:
    """One pass over the multipath hparams (sorted, so ``_mu_`` first); returns what changed."""
    fired = []
    for key in sorted(MULTIPATH_RANGES):
        if key in h and _do_mutate(h, "hp:" + key, rng):
            new = incremental_mutation(h[key], MULTIPATH_RANGES[key], rng)
            if new != h[key]:
                fired.append("hp:" + key)
            h[key] = new
    return fired


def _select_own(population: list[ModelPath], offsprings: Mapping[str, int],
                rng: random.Random) -> ModelPath | None:
    ranked = sorted((p for p in population if p.score is not None), key=lambda p: (p.score, p.seq()),
                    reverse=True)
    return next((p for p in ranked if rng.random() < 0.5 ** offsprings.get(p.id, 0)), None)


def path_candidates(ctx: Context) -> list[ModelPath]:
    """Models another task's path may be drawn from: other tasks' single-path models and the root."""
    out = [ctx.view.root] if ctx.view.root is not None else []
    return out + [p for t, p in sorted(ctx.view.published.items()) if t != ctx.task]


def propose(ctx: Context, c: Counters, population: list[ModelPath], rng: random.Random,
            gen: torch.Generator) -> Proposal:
    view = ctx.view
    main = view.published.get(ctx.task)
    if main is None:
        raise RuntimeError(f"task {ctx.task!r} has no single-path model to build on")
    own = _select_own(population, c.offsprings, rng)
    best = best_path(population)
    if own is not None:
        parent, h = own, copy.deepcopy(own.hparams)
    else:
        parent = main
        h = copy.deepcopy(best.hparams) if best is not None else dict(MULTIPATH_DEFAULTS)
    h["num_classes"] = ctx.tensors.num_classes
    mutations = mutate_hparams(h, rng)
    n = int(h["num_paths"])
    inherited = list(parent.refs) if own is not None else []
    refs = [main.id]
    for k in range(1, n):
        if k < len(inherited):
            refs.append(inherited[k])
            continue
        taken = {view.path(r).task for r in refs}
        choices = [p for p in path_candidates(ctx) if p.task not in taken]
        if not choices:
            raise RuntimeError("no other task's model to borrow: a multipath model needs at least "
                               "one other published task or the root")
        refs.append(rng.choice(choices).id)
    ids = iter(range(c.next_component_id, c.next_component_id + 1 + n))
    comps: dict[str, Component] = {}
    for name in registry.component_names(h):
        old = parent.components.get(name) if own is not None else None
        slot = registry.split_component_name(name)[1]  # connector_k serves path k; the router: None
        same_path = slot is None or (slot < len(inherited) and inherited[slot] == refs[slot])
        fresh = init_component(name, ctx.vit, h, gen)
        if old is not None and same_path and old.shapes() == {k: tuple(v.shape) for k, v in fresh.items()}:
            # fresh optimiser state per child (module docstring): the parent's is not read
            comps[name] = copy_component(old, ctx.agent_id, next(ids), momentum=False)
        else:
            comps[name] = Component(name, ctx.agent_id, next(ids),
                                    {k: v.to(ctx.tensors.device) for k, v in fresh.items()})
            mutations.append(f"new:{name}")
    used = sum(1 for cp in comps.values() if not cp.stored)
    child = ModelPath(f"{ctx.agent_id}:m{c.next_model_id}", ctx.agent_id, ctx.task, h, comps,
                      parent_id=parent.id, preset=ctx.preset.name, preset_hash=ctx.preset.hash,
                      mutations=mutations, kind=KIND, refs=refs)
    offsprings = dict(c.offsprings)
    if own is not None:
        offsprings[own.id] = offsprings.get(own.id, 0) + 1
    counters = dataclasses.replace(c, next_model_id=c.next_model_id + 1,
                                   next_component_id=c.next_component_id + used,
                                   offsprings=offsprings)
    threshold = own.score if own is not None and own.score is not None else -math.inf
    return Proposal(parent, child, threshold, None, 0, float, counters)


# ---- train --------------------------------------------------------------------------------------------

def build_model(vit: VitConfig, child: ModelPath, paths: list[ModelPath], trainable: bool) -> MultipathModel:
    return MultipathModel(child.hparams, [frozen_path(vit, p) for p in paths],
                          {n: cp.params for n, cp in child.components.items()}, trainable)


def _outputs(ctx: Context, model: MultipathModel, paths: list[ModelPath], split: str,
             images: torch.Tensor, tally: compute.FlopsTally | None) -> list[torch.Tensor]:
    cache: PathOutputs = ctx.prefix_cache
    out = []
    for k, (p, module, size) in enumerate(zip(paths, model.paths, model.image_sizes)):
        before = cache.filled_images
        out.append(cache.get(p.id, k == 0, split, module, images, size))
        if tally is not None:
            tally.cache_fill += (cache.filled_images - before) * path_flops(ctx.vit, p.hparams, k == 0)
    return out


def train(ctx: Context, p: Proposal, gen: torch.Generator,
          should_stop: Callable[[], bool] | None = None) -> Outcome:
    """Train router and connectors on the paths' outputs; keep the best snapshot above threshold."""
    t0 = time.perf_counter()
    b, data, h = ctx.preset.budget, ctx.tensors, p.child.hparams
    paths = [ctx.view.path(r) for r in p.child.refs]
    model = build_model(ctx.vit, p.child, paths, trainable=True)
    tensors = model.trainable_tensors()
    params = list(tensors.values())
    opt = torch.optim.SGD(params, lr=h["opt_lr"], momentum=h["opt_momentum"],
                          nesterov=bool(h["opt_nesterov"]) and h["opt_momentum"] > 0)
    result = TrainResult(accepted=False, quality=None, score=None, lowest_trainable="router")
    train_out = _outputs(ctx, model, paths, "train", data.train_x, result.flops)
    val_out = _outputs(ctx, model, paths, "val", data.val_x, result.flops)
    step_flops = 2 * trainable_flops(ctx.vit, h)  # forward + weight gradients: nothing below trains
    every = STEPS_SCALE * ctx.preset.steps_between_validations(data.n_train)
    total = every * b.validations_per_child
    batches = data.batch_indices(b.batch_size, gen)
    best, snapshot = p.threshold, None
    for step in range(total):
        if should_stop is not None and should_stop():
            result.aborted = True
            break
        idx = next(batches)
        sgd_step(opt, params, F.cross_entropy(model.combine([o[idx] for o in train_out]), data.train_y[idx]),
                 lr_at(step, total, h["opt_lr"], h["opt_lr_warmup_ratio"]))
        result.steps += 1
        result.train_images += int(idx.shape[0])
        result.flops.train += int(idx.shape[0]) * step_flops
        if (step + 1) % every == 0 or step + 1 == total:
            with torch.no_grad():
                q = (model.combine(val_out).argmax(-1) == data.val_y).float().mean().item()
            result.flops.validation += len(data.val_y) * trainable_flops(ctx.vit, h)
            result.evals.append(q)
            if q > best:  # strict: see the module docstring
                best, result.score, result.snapshot_step = q, q, step + 1
                snapshot = {k: t.detach().clone() for k, t in tensors.items()}
    result.quality = max(result.evals) if result.evals else None
    if snapshot is not None and not result.aborted:
        result.accepted = True
        with torch.no_grad():
            for k, t in tensors.items():
                t.copy_(snapshot[k])
    result.seconds = time.perf_counter() - t0
    return Outcome(result, model)


def test_accuracy(ctx: Context, model: MultipathModel, paths: list[ModelPath]) -> float:
    out = _outputs(ctx, model, paths, "test", ctx.tensors.test_x, None)
    with torch.no_grad():
        return (model.combine(out).argmax(-1) == ctx.tensors.test_y).float().mean().item()


# ---- judge --------------------------------------------------------------------------------------------

def size_metrics(vit: VitConfig, child: ModelPath, paths: list[ModelPath]) -> dict:
    """Trained parameters (router + connectors), activated ones (those plus every path a forward
    runs: the main path with its head, the others headless) and forward FLOPs per image."""
    trained = sum(cp.num_params() for cp in child.components.values())
    activated = trained + sum(cp.num_params() for k, p in enumerate(paths)
                              for n, cp in p.components.items() if k == 0 or n != "head")
    return {"params": trained, "accounted_params": float(trained), "activated_params": activated,
            "flops": model_flops(vit, child.hparams, [p.hparams for p in paths])}


def judge(ctx: Context, p: Proposal, o: Outcome, population: list[ModelPath]) -> Verdict:
    r, child = o.result, p.child
    new_population, kept, published, components = list(population), None, None, []
    metrics = None
    if r.accepted:
        paths = [ctx.view.path(ref) for ref in child.refs]
        sizes = size_metrics(ctx.vit, child, paths)
        metrics = ChildMetrics(quality=r.quality, score=r.score, params=sizes["params"],
                               accounted_params=sizes["accounted_params"], flops=sizes["flops"],
                               num_cycles=p.counters.cycle + 1, steps=r.steps,
                               lineage_steps=r.snapshot_step)
        child.metrics = {**metrics.to_dict(), "activated_params": sizes["activated_params"]}
        child.created_at = time.time()
        new_population = retain(new_population + [child], MAX_POPULATION)
        if best_path(new_population) is child:
            metrics = dataclasses.replace(metrics, test_quality=test_accuracy(ctx, o.model, paths))
            child.metrics["test_quality"] = metrics.test_quality
            published = child
        if child in new_population:
            kept = child
            components = [cp for cp in child.ordered() if not cp.stored]
    counters, trial = finish(ctx, p, r, kept, r.score if r.accepted else r.quality,
                             image_size=None, augment=[])
    writes = Writes(components, [kept] if kept else [], [trial], published)
    return Verdict(r.accepted, kept, published, metrics, new_population, list(population),
                   counters, writes, r.quality, r.seconds)
