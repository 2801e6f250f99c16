"""The continual-development report as plain data: what the living system is and what each method
extension (preset) and each mutation action contributed to it.

``build_report(store)`` reads only store records (trials, models, components, events, tasks) and
returns a dict of plain JSON values; ``report.html`` draws the same dict as a page, so the
JSON file and the pictures can never disagree. torch-free by design: of the agent stack the report
imports only ``agents.registry`` (torch-free), for component kinds (forward order, labels), the
``adapter_layers`` parser and action families; preset names are parsed here instead of being
resolved through agents.config.

Definitions used throughout (the page repeats them for its readers):
- a child is *accepted* when its best validation score reached its parent's score (children of
  another task's model, or of the root, are always accepted: there is nothing to compare with);
- the *score gain* of an accepted child is ``child score - parent model's recorded score`` and is
  defined only when the parent is a model of the same task; other accepted children are counted
  as ``accepted_foreign`` (or ``gain_unknown`` when the parent record has no score). The *quality
  gain* is the same difference of validation accuracies: unlike the score it does not change scale
  when a preset switches the size/compute penalty on (a ``+penalty`` child is compared with a
  parent whose recorded score had no penalty, so its score gain reads low);
- compute is what the trials recorded: ``train_images``, wall ``seconds`` and training FLOPs
  (``flops["total"]``: steps forward and backward, validations and prefix-cache fills, counted by
  ``agents.compute``) per trained child. ``train_flops`` sums them and is None (unknown) when a trial
  of the group recorded none (written before trials did); ``flops_per_accepted_child`` divides it by
  the accepted children, as ``train images per accepted child`` does the images. A child that applied
  several actions counts fully for each of them in the per-action rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from agents import registry
from store.errors import MissingReference
from report.leaderboard import leaderboard_rows
from store.records import ComponentRecord, Event, ModelRecord, TrialRecord
from store.api import StoreAPI

ROOT_TASK = "root"
NO_ACTION = "(none)"  # a child trained again with unchanged architecture and hparams


def action_family(action: str) -> str:
    """``clone:encoderblock_1`` -> ``clone:encoderblock``; hyperparameter actions stay whole
    (the registry's grouping: ``agents.registry.action_family``)."""
    return registry.action_family(action)


def parse_preset_name(name: str) -> dict[str, Any]:
    """``BUDGET[@base][+ext...]`` -> {budget, method, extensions} as the user layered it.

    ``method`` is ``"default"`` (µ2Net+ as published) or ``"base"`` (clone actions only);
    ``extensions`` are the layers added on top, in the order written.
    """
    head, *adds = name.strip().split("+")
    base = head.endswith("@base")
    return {"budget": head[: -len("@base")] if base else head,
            "method": "base" if base else "default",
            "extensions": [a for a in adds if a]}


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def trial_flops(trial: TrialRecord) -> int | None:
    """What a trained child cost in FLOPs (its ``flops["total"]``); None when it did not record it."""
    flops = getattr(trial, "flops", None) or {}
    total = flops.get("total")
    return int(total) if isinstance(total, (int, float)) and not isinstance(total, bool) else None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class _Tally:
    """Counts of one group of trials (one preset, or one action under one preset)."""

    trials: int = 0
    accepted: int = 0
    accepted_foreign: int = 0
    gain_unknown: int = 0
    gains: list[float] = field(default_factory=list)
    quality_gains: list[float] = field(default_factory=list)
    train_images: int = 0
    seconds: float = 0.0
    train_flops: int | None = 0   # None once a trial without recorded FLOPs is added

    def add(self, trial: TrialRecord, gain: _Gain) -> None:
        self.trials += 1
        self.train_images += trial.train_images
        self.seconds += trial.seconds
        flops = trial_flops(trial)
        self.train_flops = None if flops is None or self.train_flops is None else self.train_flops + flops
        if not trial.accepted:
            return
        self.accepted += 1
        if gain.foreign:
            self.accepted_foreign += 1
            return
        if gain.score is None:
            self.gain_unknown += 1
        else:
            self.gains.append(gain.score)
        if gain.quality is not None:
            self.quality_gains.append(gain.quality)

    def as_dict(self, count_key: str = "trials") -> dict[str, Any]:
        return {count_key: self.trials, "accepted": self.accepted,
                "acceptance_rate": _rate(self.accepted, self.trials),
                "accepted_foreign": self.accepted_foreign, "gain_n": len(self.gains),
                "gain_unknown": self.gain_unknown, "mean_score_gain": _mean(self.gains),
                "mean_quality_gain": _mean(self.quality_gains),
                "train_images": self.train_images, "seconds": round(self.seconds, 4),
                "train_flops": self.train_flops,
                "flops_per_accepted_child": _per_accepted(self.train_flops, self.accepted)}


def _per_accepted(flops: int | None, accepted: int) -> float | None:
    return flops / accepted if flops is not None and accepted else None


def _compute(trials: list[TrialRecord]) -> dict[str, Any]:
    """Children, accepted, training images and FLOPs of some trials (see the module doc)."""
    flops = [trial_flops(t) for t in trials]
    total = None if None in flops else sum(flops)
    accepted = sum(1 for t in trials if t.accepted)
    return {"children": len(trials), "accepted": accepted,
            "train_images": sum(t.train_images for t in trials), "train_flops": total,
            "flops_per_accepted_child": _per_accepted(total, accepted)}


@dataclass(frozen=True)
class _Gain:
    """What an accepted child improved over its parent (None where not defined)."""

    foreign: bool              # parent is another task's model, the root, or unknown root-like
    score: float | None = None
    quality: float | None = None


class _Snapshot:
    """Everything the report needs, read once; lookups by id afterwards cost no store access."""

    def __init__(self, st: StoreAPI) -> None:
        self.path = st.path
        self.stats = st.stats()
        self.root_id = st.root_model_id()
        self.trials = st.trials()
        self.models = {m.id: m for m in st.models()}
        self.events = st.events()
        self.pointers = {t.task: t for t in st.tasks()}
        self.agents = st.agents()
        self.leaderboard = {row["task"]: row for row in leaderboard_rows(st)}
        published = st.published_models()
        self.published = {task: published[task] for task in sorted(published)}
        self.components: dict[str, ComponentRecord] = {}
        self.params: dict[str, int] = {}
        for model in self.published.values():
            for cid in self.runs(model):
                if cid not in self.components:
                    record = st.get_component(cid)
                    if record is None:
                        raise MissingReference(f"model {model.id} refers to missing component "
                                               f"{cid}")
                    self.components[cid] = record
                    self.params[cid] = sum(math.prod(shape) for _, shape
                                           in st.tensor_shapes(cid).values())
        self.trial_by_id = {t.id: t for t in self.trials}
        times = [e.time for e in self.events] + [t.created_at for t in self.trials]
        self.t0 = min(times) if times else time.time()

    def runs(self, model: ModelRecord) -> list[str]:
        """Every component a forward of ``model`` runs: its own, then its paths' (a multipath model
        runs whole frozen models of its own and other tasks, the ones it borrows from)."""
        out = list(model.components)
        for ref in model.refs:
            path = self.models.get(ref)
            if path is None:
                raise MissingReference(f"model {model.id} runs model {ref}, which is missing")
            out += [c for c in path.components if c not in out]
        return out

    def borrows(self, model: ModelRecord) -> list[str]:
        """The tasks whose frozen models a multipath model borrows (its paths beyond the main one)."""
        return [self.models[r].task for r in model.refs[1:] if r in self.models]

    def agent_task(self, agent: str) -> str:
        """Which task an agent works for (the root agent's 'task' is ``root``)."""
        for record in self.agents:
            if record.agent_id == agent:
                return record.task
        for model in self.models.values():
            if model.agent == agent:
                return model.task
        return ROOT_TASK if agent == ROOT_TASK else agent

    def gain_of(self, trial: TrialRecord) -> _Gain:
        """Score and quality gain over a same-task parent's recorded metrics."""
        parent = self.models.get(trial.parent) if trial.parent else None
        if parent is None:
            return _Gain(foreign=trial.parent is None or trial.parent == self.root_id)
        if parent.task != trial.task:
            return _Gain(foreign=True)
        return _Gain(False, _difference(trial.score, parent.metrics.get("score")),
                     _difference(trial.quality, parent.metrics.get("quality")))


def _difference(after: Any, before: Any) -> float | None:
    a, b = _finite(after), _finite(before)
    return None if a is None or b is None else a - b


def _lineage(snap: _Snapshot, model: ModelRecord) -> list[dict[str, Any]]:
    """The current model, its parent, ... back to the root (parents may belong to other tasks)."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    node: ModelRecord | None = model
    wanted: str | None = model.id
    while wanted is not None and wanted not in seen:
        seen.add(wanted)
        node = snap.models.get(wanted)
        if node is None:
            chain.append({"model_id": wanted, "missing": True})
            break
        trial = snap.trial_by_id.get(node.id)
        chain.append({"model_id": node.id, "task": node.task, "agent": node.agent,
                      "preset": node.preset, "preset_hash": node.preset_hash,
                      "score": _finite(node.metrics.get("score")),
                      "quality": _finite(node.metrics.get("quality")),
                      "mutations": list(trial.mutations) if trial else [],
                      "created_at": node.created_at})
        wanted = node.parent
    return chain


def _task_rows(snap: _Snapshot) -> list[dict[str, Any]]:
    """One row per published task: the leaderboard's row (report.leaderboard: the same names and
    numbers as ``query.py leaderboard``) plus what only the report shows. Its compute (``children`` ...
    ``flops_per_accepted_child``) is every child trained for the task, by whichever agent, accepted
    or not."""
    rows = []
    by_task: dict[str, list[TrialRecord]] = {}
    for trial in snap.trials:
        by_task.setdefault(trial.task, []).append(trial)
    for task, model in snap.published.items():
        own = sum(snap.params[c] for c in model.components
                  if snap.components[c].agent == model.agent)
        total = sum(snap.params[c] for c in model.components)
        pointer = snap.pointers.get(task)
        row = {key: (_finite(v) if key in ("score", "quality", "test_quality") else v)
               for key, v in snap.leaderboard[task].items()}
        rows.append({
            **row, "preset": model.preset, "preset_hash": model.preset_hash,
            "num_classes": pointer.num_classes if pointer else model.hparams.get("num_classes"),
            "own_params": own, "reused_params": total - own,
            **_compute(by_task.get(task, [])),
            "lineage": _lineage(snap, model)})
    return rows


_TIMELINE_KINDS = ("published", "cycle_end")


def _timeline(snap: _Snapshot) -> tuple[dict[str, list], dict[str, list]]:
    """Per task: the events with the metrics of the model they name; and every trained child."""
    timeline: dict[str, list[dict[str, Any]]] = {task: [] for task in snap.published}
    event: Event
    for event in snap.events:
        if event.task is None or event.task == ROOT_TASK:
            continue
        model = snap.models.get(event.model_id) if event.model_id else None
        metrics = model.metrics if model else {}
        timeline.setdefault(event.task, []).append({
            "time": event.time, "t": event.time - snap.t0, "kind": event.kind, "seq": event.seq,
            "model_id": event.model_id, "preset": model.preset if model else None,
            "score": _finite(metrics.get("score")), "quality": _finite(metrics.get("quality"))})
    children: dict[str, list[dict[str, Any]]] = {task: [] for task in timeline}
    for trial in snap.trials:
        children.setdefault(trial.task, []).append({
            "t": trial.created_at - snap.t0, "id": trial.id, "preset": trial.preset,
            "quality": _finite(trial.quality), "score": _finite(trial.score),
            "accepted": trial.accepted})
    return timeline, children


def _sharing(snap: _Snapshot) -> dict[str, Any]:
    """Tasks against the components their current models use (the layer-sharing map)."""
    used_by: dict[str, list[str]] = {}
    for task, model in snap.published.items():
        for cid in snap.runs(model):  # a multipath model's row also shows the paths it runs
            used_by.setdefault(cid, []).append(task)
    components = []
    for cid, tasks in used_by.items():
        record = snap.components[cid]
        components.append({"id": cid, "name": record.name, "creator": record.agent,
                           "creator_task": snap.agent_task(record.agent),
                           "cloned_from": record.cloned_from, "params": snap.params[cid],
                           "used_by": tasks})
    # root's components first within a slot, then the creators' own (and clones) by agent
    components.sort(key=lambda c: (_slot(c["name"]), c["creator"] != "root", c["creator"],
                                   c["id"]))
    task_names = list(snap.published)
    matrix = [[task in c["used_by"] for c in components] for task in task_names]
    borrows = {t: snap.borrows(m) for t, m in snap.published.items() if m.refs}
    return {"tasks": task_names, "components": components, "matrix": matrix, "borrows": borrows}


def _slot(name: str) -> tuple[int, int, int]:
    """Forward position of a component name, so the grid's columns read like the network."""
    return registry.slot(name)


def _method_tables(snap: _Snapshot) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per preset and per (action family, preset): counts, acceptance, mean gain, compute."""
    order: list[tuple[str, str]] = []
    presets: dict[tuple[str, str], _Tally] = {}
    best: dict[tuple[str, str], dict[str, float]] = {}
    actions: dict[tuple[str, str, str], _Tally] = {}
    for trial in snap.trials:
        key = (trial.preset, trial.preset_hash)
        if key not in presets:
            order.append(key)
            presets[key], best[key] = _Tally(), {}
        gain = snap.gain_of(trial)
        presets[key].add(trial, gain)
        score = _finite(trial.score)
        if score is not None and score > best[key].get(trial.task, -math.inf):
            best[key][trial.task] = score
        for family in sorted({action_family(a) for a in trial.mutations} or {NO_ACTION}):
            actions.setdefault((family, *key), _Tally()).add(trial, gain)
    published: dict[tuple[str, str], int] = {}
    for event in snap.events:
        model = snap.models.get(event.model_id) if event.model_id else None
        if event.kind == "published" and model is not None:
            published[(model.preset, model.preset_hash)] = \
                published.get((model.preset, model.preset_hash), 0) + 1
    preset_rows = []
    for key in order:
        trials = [t for t in snap.trials if (t.preset, t.preset_hash) == key]
        preset_rows.append({
            "name": key[0], "hash": key[1], **parse_preset_name(key[0]),
            "agents": sorted({t.agent for t in trials}), "tasks": sorted({t.task for t in trials}),
            **presets[key].as_dict(), "published": published.get(key, 0),
            "best_score": dict(sorted(best[key].items())),
            "first_at": trials[0].created_at, "last_at": trials[-1].created_at})
    rank = {key: i for i, key in enumerate(order)}
    action_rows = [{"action": family, "label": registry.action_label(family), "preset": name,
                    "hash": phash, **tally.as_dict(count_key="children")}
                   for (family, name, phash), tally
                   in sorted(actions.items(), key=lambda kv: (kv[0][0], rank[kv[0][1:]]))]
    return preset_rows, action_rows


def build_report(st: StoreAPI, *, now: float | None = None) -> dict[str, Any]:
    """The whole report as a dict of plain JSON values (see the module docstring for terms)."""
    snap = _Snapshot(st)
    timeline, children = _timeline(snap)
    presets, actions = _method_tables(snap)
    counts = snap.stats["counts"]
    agent_tasks = {a.agent_id: a.task for a in snap.agents}
    agent_tasks.setdefault("root", ROOT_TASK)
    return {
        "generated_at": time.time() if now is None else now,
        "store": snap.path,
        "summary": {"tasks": len(snap.published), "agents": counts.get("agents", 0),
                    "models": counts.get("models", 0), "trials": len(snap.trials),
                    "events": len(snap.events), "components": counts.get("components", 0),
                    "blob_bytes": snap.stats.get("blob_bytes"), "root_model_id": snap.root_id,
                    "started_at": snap.t0, "presets": len(presets)},
        "agents": agent_tasks,
        "tasks": _task_rows(snap),
        "timeline": timeline,
        "children": children,
        "sharing": _sharing(snap),
        "presets": presets,
        "actions": actions,
    }
