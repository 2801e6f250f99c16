"""One generation of an agent: the path of one child, as four steps (docs/method.md 3.1-3.8).

    propose(ctx, counters, population, rng, gen) -> Proposal   parent, data hparams, child, threshold
    train(ctx, proposal, gen, should_stop)       -> Outcome    the trained child, or aborted
    judge(ctx, proposal, outcome, population)    -> Verdict    accepted? kept? published?
    verdict.writes                               -> Writes     what the one store transaction holds

Each step takes what it needs as arguments and returns a small frozen value; nothing here reads or
writes the agent object, so a step can be run (and tested) on its own. What the steps do change in
place is the child they build (its metrics, its mutation log), the population's current scores (a
cache of ``scorer.rescore``) and the probe cache. The agent applies a verdict to its state and
commits ``Writes`` in one transaction (agents/agent.py).

Names: a child is *accepted* when a snapshot reached its threshold, *kept* when it also survives
``retain`` into the population, *published* when it becomes the agent's best.

Determinism: ``rng``/``gen`` are seeded per (seed, agent, cycle, generation), and the steps draw from
them in a fixed order (data hparams, parent, child, then training batches), so a resumed agent
replays the same choices for the same generation.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from agents import compute
from agents.config import POLISH_EMA_DECAY, Preset
from agents.hurdle import DEFAULT_RULE, HurdleRule
from agents.mutation import Mutator, hparams_diff
from agents.paths import ModelPath
from agents.prefix_cache import PrefixCache
from agents.probe import probe_pick
from agents.progress import ChildMetrics
from agents.scoring import Scorer
from agents.selection import best_path, retain, select_parent
from agents.training import (TaskTensors, TrainResult, decision_accuracy, lr_at, polish_lr,
                             test_accuracy, train_child)
from agents.view import SystemView
from agents.vit import PathModel, VitConfig
from store import TrialRecord
from taskdata.augment import AugmentParams


@dataclass(frozen=True)
class Context:
    """What every step reads: fixed for the agent's life (the view refreshes itself in place)."""

    agent_id: str
    task: str
    preset: Preset
    vit: VitConfig
    cycles: int
    tensors: TaskTensors
    view: SystemView
    scorer: Scorer
    probe_cache: dict[str, float]  # model id -> probe accuracy (+probe), a cache, not state
    prefix_cache: PrefixCache | None = None  # frozen-prefix activations (exact), None = off
    hurdle: HurdleRule = DEFAULT_RULE        # used when the preset has +hurdle
    # +honest: model id -> (subset accuracy, decision-split accuracy). A stored model never changes,
    # so each parent is re-scored once per agent life; a cache, not state.
    parent_scores: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Counters:
    """The part of the agent's resumable state a generation advances."""

    cycle: int
    generation: int
    next_model_id: int
    next_component_id: int
    offsprings: dict[str, int]
    cycle_images: int = 0  # training images spent in this cycle so far


@dataclass(frozen=True)
class Proposal:
    parent: ModelPath
    child: ModelPath                 # built, untrained; its new components are not yet stored
    threshold: float                 # the score the child must reach to be kept
    schedule: tuple[int, int] | None  # (start, total) of a shared learning-rate schedule
    lineage_start: int               # steps the child's same-task lineage trained before it
    score_of: Callable[[float], float]  # validation accuracy -> the child's score (size terms bound)
    counters: Counters               # the counters after this proposal took its ids
    decide: float | None = None      # +honest: the score to reach on the decision split, after the
    #                                  last step (``threshold`` then only feeds the hurdle)
    parent_quality: float | None = None  # +honest: the parent re-scored on the decision split
    polish_steps: int | None = None  # +polish: this child is the cycle's polish child, of this many steps
    start_lr: float | None = None    # +polish: the learning rate its cosine to zero starts from
    rescore_flops: compute.FlopsTally | None = None  # what re-scoring the parent cost (+honest)


@dataclass(frozen=True)
class Outcome:
    result: TrainResult
    model: PathModel


@dataclass(frozen=True)
class Writes:
    """Everything one generation commits, in one transaction."""

    components: list            # of agents.paths.Component, not yet stored
    models: list[ModelPath]
    trials: list[TrialRecord]
    publish: ModelPath | None


@dataclass(frozen=True)
class Verdict:
    accepted: bool                 # the child reached its threshold (it may still be retained out)
    kept: ModelPath | None         # the child, when it stays in the population
    published: ModelPath | None    # the child, when it became the agent's best
    metrics: ChildMetrics | None   # the accepted child's metrics (what its record stores)
    population: list[ModelPath]
    previous: list[ModelPath]      # the population before this child (restored if it is dropped)
    counters: Counters
    writes: Writes
    quality: float | None
    seconds: float


class _Ids:
    """Component numbers handed out while one child is built."""

    def __init__(self, first: int) -> None:
        self.next = first

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def _threshold(ctx: Context, parent: ModelPath, best: ModelPath | None) -> float:
    if parent.task == ctx.task:
        score = ctx.scorer.rescore(parent, ctx.view.lockers)
        return -math.inf if score is None else score
    if ctx.preset.guard_foreign and best is not None and best.score is not None:
        # +guard: a child of another task's model joins only if it already beats our best, so the
        # budget is not spent re-climbing from a fresh head.
        return best.score
    return -math.inf


def _schedule(ctx: Context, parent: ModelPath, c: Counters) -> tuple[tuple[int, int] | None, int]:
    b = ctx.preset.budget
    child_steps = ctx.preset.steps_between_validations(ctx.tensors.n_train) * b.validations_per_child
    agent_steps = ctx.cycles * b.children_per_cycle * child_steps
    if ctx.preset.continue_schedule:
        # +continue: one schedule over everything this agent trains, shared by a same-task lineage.
        start = int(parent.metrics.get("lineage_steps", 0)) if parent.task == ctx.task else 0
        if ctx.preset.anneal_schedule:
            # +anneal: never behind the agent's clock (images spent / budget), and never past the
            # point where this child would run beyond the schedule's end (which would restart it).
            spent = c.cycle * b.children_per_cycle * child_steps * b.batch_size + c.cycle_images
            clock = spent // b.batch_size
            position = min(max(start, clock), agent_steps - child_steps)
            return (position, agent_steps), start
        return (start, agent_steps), start
    if ctx.preset.clock_schedule:
        # +clock: a child trains at the agent's position in its whole budget, so the last children
        # of the last cycle anneal whatever lineage is best by then.
        done = c.cycle * b.children_per_cycle + c.generation
        return (min(done * child_steps, agent_steps - child_steps), agent_steps), 0
    return None, 0


def propose(ctx: Context, c: Counters, population: list[ModelPath], rng: random.Random,
            gen: torch.Generator) -> Proposal:
    """Sample data hparams, pick a parent, build the child (docs/method.md 2.5, 3.2, 2.3)."""
    view = ctx.view
    mut = Mutator(ctx.preset, ctx.vit, rng, gen)
    best = best_path(population)
    ds, ds_fired = mut.sample_ds_hparams(best, ctx.tensors.num_classes)
    probed = []

    def pick(candidates):
        probed.append(True)
        return probe_pick(candidates, ctx.vit, ctx.tensors, rng, ctx.probe_cache, each=view.transient)

    polish_steps = _polish_steps(ctx, c, best)
    if polish_steps is not None:
        parent, ds, ds_fired = best, {}, []  # the best model, continued as it is
    else:
        parent = select_parent(population, view.foreign_paths(), c.offsprings, rng,
                               pick=pick if ctx.preset.probe_parents else None)
    ids = _Ids(c.next_component_id)
    child = mut.build_child(
        parent, ds, agent_id=ctx.agent_id, task=ctx.task,
        child_id=f"{ctx.agent_id}:m{c.next_model_id}", next_component_id=ids.take,
        ancestors=view.ancestors, is_frozen=view.is_frozen,
        root_posemb=lambda: view.root.components["posembed_input"].params["pos_embedding"],
        device=ctx.tensors.device, mutate=polish_steps is None)
    child.mutations = (["polish"] if polish_steps is not None else []) + ds_fired + child.mutations \
        + (["select:probe"] if probed else [])
    offsprings = dict(c.offsprings)
    if parent.agent == ctx.agent_id:
        offsprings[parent.id] = offsprings.get(parent.id, 0) + 1
    schedule, lineage_start = _schedule(ctx, parent, c)
    counters = dataclasses.replace(c, next_model_id=c.next_model_id + 1,
                                   next_component_id=ids.next, offsprings=offsprings)
    threshold = _threshold(ctx, parent, best)
    honest = _honest_thresholds(ctx, parent, child, threshold) if ctx.preset.honest else {}
    start_lr = None
    if polish_steps is not None:
        h = child.hparams
        start_lr = h["opt_lr"] if schedule is None else lr_at(schedule[0] % schedule[1], schedule[1],
                                                               h["opt_lr"], h["opt_lr_warmup_ratio"])
    return Proposal(parent, child, honest.get("threshold", threshold), schedule, lineage_start,
                    ctx.scorer.score_fn(child, view.lockers), counters, decide=honest.get("decide"),
                    parent_quality=honest.get("parent_quality"), polish_steps=polish_steps,
                    start_lr=start_lr, rescore_flops=honest.get("flops"))


def _polish_steps(ctx: Context, c: Counters, best: ModelPath | None) -> int | None:
    """+polish: the steps of this cycle's polish child when this generation is its turn, else None.

    Its turn comes when another ordinary child would eat into the images kept for it (a cycle by
    images, +hurdle), or at the cycle's last child (a cycle by count); it trains what the cycle
    has left. No polish without an own best model to continue."""
    p = ctx.preset
    if not p.polish or best is None or best.agent != ctx.agent_id:
        return None
    b, n = p.budget, ctx.tensors.n_train
    child = p.child_images(n)
    if not p.hurdle:
        return child // b.batch_size if c.generation == b.children_per_cycle - 1 else None
    remaining = b.children_per_cycle * child - c.cycle_images
    if remaining - child >= p.polish_images(n):
        return None
    return max(p.steps_between_validations(n), remaining // b.batch_size)


def _honest_thresholds(ctx: Context, parent: ModelPath, child: ModelPath, threshold: float) -> dict:
    """+honest: a same-task parent re-scored on the child's images, under this sharing snapshot:
    on the subset (what the hurdle compares the child's early validations with) and on the
    decision split (what the child's last weights must reach). Another task's parent is not
    comparable on this task: the threshold stands (-inf, or our best under +guard)."""
    if parent.task != ctx.task:
        return {"threshold": threshold, "decide": threshold}
    flops = compute.FlopsTally()
    if parent.id not in ctx.parent_scores:
        trainable = [n for n, comp in child.components.items() if not comp.stored]
        sub, dec, flops = decision_accuracy(parent, ctx.vit, ctx.tensors, ctx.prefix_cache, like=trainable)
        ctx.parent_scores[parent.id] = (sub, dec)
    sub, dec = ctx.parent_scores[parent.id]
    score_of = ctx.scorer.score_fn(parent, ctx.view.lockers)
    return {"threshold": score_of(sub), "decide": score_of(dec), "parent_quality": dec, "flops": flops}


def train(ctx: Context, p: Proposal, gen: torch.Generator,
          should_stop: Callable[[], bool] | None = None) -> Outcome:
    """Train the child's new components; keep its best snapshot at or above the threshold."""
    b = ctx.preset.budget
    stop_early = None
    if ctx.preset.hurdle:
        loose = ctx.hurdle.exempt_mutation(p.parent.hparams, p.child.hparams)
        stop_early = lambda validation, score: ctx.hurdle.stops(validation, score, p.threshold, loose)  # noqa: E731
    polish = p.polish_steps is not None
    result, model = train_child(
        p.child, ctx.vit, ctx.tensors, batch_size=b.batch_size,
        steps_between_validations=ctx.preset.steps_between_validations(ctx.tensors.n_train),
        validations=b.validations_per_child, threshold=p.threshold,
        score_of=p.score_of, gen=gen,
        on_step=should_stop, schedule=p.schedule, stop_early=None if polish else stop_early,
        cache=ctx.prefix_cache, total_steps=p.polish_steps, decide_threshold=p.decide,
        lr_fn=polish_lr(p.start_lr, p.polish_steps) if polish else None,
        ema_decay=POLISH_EMA_DECAY if polish else None)
    if p.rescore_flops is not None:  # the parent's re-score is part of what judging this child cost
        result.flops.validation += p.rescore_flops.validation
        result.flops.cache_fill += p.rescore_flops.cache_fill
    return Outcome(result, model)


def augment_flags(hparams: dict) -> list[str]:
    """The training augmentations a child's data hparams switch on (for its trial record)."""
    a = AugmentParams.from_hparams(hparams)
    flags = [("crop", a.crops), ("flip", a.flip_left_right), ("brightness", a.brightness_delta > 0),
             ("contrast", a.contrast_delta > 0), ("saturation", a.saturation_delta > 0),
             ("hue", a.hue_delta > 0), ("jpeg", a.quality_delta > 0)]
    return [name for name, on in flags if on]


def judge(ctx: Context, p: Proposal, o: Outcome, population: list[ModelPath]) -> Verdict:
    """Decide the child's fate (docs/method.md 3.3, 3.6) and say what to write.

    Population scores are recomputed first: other agents may have published while the child
    trained, which changes every path's accounted parameters.
    """
    r, child = o.result, p.child
    lockers = ctx.view.lockers  # one sharing snapshot for the population and the child
    for path in population:
        path.current_score = ctx.scorer.rescore(path, lockers)
    new_population, kept, published, components, metrics = list(population), None, None, [], None
    if r.accepted:
        terms = ctx.scorer.size_terms(child, lockers)
        # Training scored the child under the sharing of its proposal; peers may have published
        # since (the view refreshes while a child trains), so it is re-scored under the snapshot its
        # population was just re-scored with: the comparison below is like for like.
        r = dataclasses.replace(r, score=ctx.scorer.score_fn(child, lockers)(r.snapshot_quality))
        metrics = ChildMetrics(quality=r.quality, score=r.score, **terms,
                               num_cycles=p.counters.cycle + 1, steps=r.steps,
                               lineage_steps=p.lineage_start + r.snapshot_step)
        child.metrics, child.created_at = metrics.to_dict(), time.time()  # ranks it below
        new_population = retain(new_population + [child], ctx.preset.budget.max_population)
        if best_path(new_population) is child:
            test = test_accuracy(o.model, ctx.tensors, child.hparams["ds_image_size"],
                                 cache=ctx.prefix_cache, child=child)
            metrics = dataclasses.replace(metrics, test_quality=test)
            child.metrics = metrics.to_dict()
            published = child
        if child in new_population:
            kept = child
            components = [comp for comp in child.ordered() if not comp.stored]
    score = r.score if r.accepted else (None if r.quality is None else p.score_of(r.quality))
    counters, trial = finish(ctx, p, r, kept, score, image_size=int(child.hparams["ds_image_size"]),
                             augment=augment_flags(child.hparams))
    writes = Writes(components, [kept] if kept else [], [trial], published)
    return Verdict(r.accepted, kept, published, metrics, new_population, list(population),
                   counters, writes, r.quality, r.seconds)


def finish(ctx: Context, p: Proposal, r: TrainResult, kept: ModelPath | None, score: float | None, *,
           image_size: int | None, augment: list[str]) -> tuple[Counters, TrialRecord]:
    """The counters after a child and its trial record (every agent kind judges with these)."""
    child = p.child
    counters = dataclasses.replace(p.counters, generation=p.counters.generation + 1,
                                   cycle_images=p.counters.cycle_images + r.train_images)
    trial = TrialRecord(
        id=child.id, agent=ctx.agent_id, task=ctx.task, cycle=counters.cycle,
        generation=counters.generation - 1, parent=p.parent.id,
        model_id=kept.id if kept else None, mutations=list(child.mutations),
        hparams_diff=hparams_diff(p.parent.hparams, child.hparams), quality=r.quality,
        score=score, accepted=r.accepted, seconds=round(r.seconds, 4),
        train_images=r.train_images, preset=ctx.preset.name, preset_hash=ctx.preset.hash,
        created_at=time.time(), evals=list(r.evals),
        threshold=None if math.isinf(p.threshold) else p.threshold,
        lowest_trainable=r.lowest_trainable, image_size=image_size, augment=augment,
        flops=r.flops.to_dict(), stopped=r.stopped, parent_quality=p.parent_quality,
        final_lr=r.last_lr)
    return counters, trial


def dropped(v: Verdict) -> Verdict:
    """The verdict when the store refused the child (``gc`` removed something it shares): the
    trial stays, marked not accepted; the population is as before the child (a member the child
    pushed out by ``retain`` comes back); counters still advance."""
    population = list(v.previous)
    trial = dataclasses.replace(v.writes.trials[0], model_id=None, accepted=False)
    return dataclasses.replace(v, accepted=False, kept=None, published=None, metrics=None,
                               population=population,
                               writes=Writes([], [], [trial], None))
