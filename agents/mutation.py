"""Mutations: how a child is built from a parent (docs/method.md section 2).

Every action has its own mutation probability, stored in the child's hparams under ``_mu_|<action>``,
initialised from the global µ and random-walked over MU_RANGE with probability µ each time the action
is considered. Evolution then selects good probabilities along with good models.
Actions: ``hp:<hparam>`` (move one step on its grid), ``clone:<component>`` (make a private trainable
copy of a frozen component), ``add:residual_adapter_<i>`` (insert an identity-initialised adapter).
Layer drop / re-add is ``hp:num_layers``. The final norm is always cloned.
Which components a child has, how each is inherited, which actions exist and which hparams a child
(vs a generation) mutates all come from ``agents.registry``; nothing here names a component kind.
"""
from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from agents import registry
from agents.config import MU_RANGE, Preset
from agents.paths import Component, ModelPath, copy_component
from agents.vit import VitConfig, component_names, init_component


class MutationError(RuntimeError):
    """An inherited component has a shape the method cannot reconcile (a bug, not a user error)."""


def incremental_mutation(value: Any, values: Sequence[Any], rng: random.Random) -> Any:
    """Move one step up or down the grid with probability 1/2 each; at an end, stay with 1/2."""
    values = list(values)
    if value in values:
        i = values.index(value)
    else:  # a value from an older grid: continue from its nearest neighbour
        i = min(range(len(values)), key=lambda j: abs(float(values[j]) - float(value)))
    i += -1 if rng.random() < 0.5 else 1
    return values[max(0, min(len(values) - 1, i))]


class Mutator:
    """Samples data hparams per generation and builds children; owns the agent's RNGs."""

    def __init__(self, preset: Preset, vit: VitConfig, rng: random.Random, gen: torch.Generator):
        self.preset, self.vit, self.rng, self.gen = preset, vit, rng, gen
        self.ranges = preset.ranges()
        self.default_mu = preset.budget.mu

    # ---- the learned mutation probability ------------------------------------------------
    def do_mutate(self, h: dict[str, Any], action: str) -> bool:
        if registry.is_forced(action):
            return True
        mu = h.get("_mu_", self.default_mu)
        p = h.get("_mu_|" + action, mu)
        if "_mu_" in self.ranges:  # auto-tune on: random-walk this action's own probability
            if self.rng.random() < mu:
                p = incremental_mutation(p, MU_RANGE, self.rng)
            h["_mu_|" + action] = p
        return p > self.rng.random()

    # ---- generation-shared data hparams (docs/method.md 2.5) ------------------------------------
    def sample_ds_hparams(self, best: ModelPath | None, num_classes: int) -> tuple[dict[str, Any], list[str]]:
        defaults = self.preset.default_hparams(num_classes)
        ds = {k: v for k, v in defaults.items() if k.startswith("ds_")}
        fired: list[str] = []
        if best is not None:
            for k, v in best.hparams.items():
                if k.startswith("ds_") or k.startswith("_mu_|hp:ds_"):
                    ds[k] = v
            for k in sorted(self.ranges):
                if registry.hparam_scope(k) == registry.SCOPE_GENERATION and self.do_mutate(ds, "hp:" + k):
                    new = incremental_mutation(ds[k], self.ranges[k], self.rng)
                    if new != ds[k]:
                        fired.append("hp:" + k)
                    ds[k] = new
        ds["num_classes"] = num_classes
        return ds, fired

    # ---- building a child (docs/method.md 2.3) -------------------------------------------------
    def build_child(
        self,
        parent: ModelPath,
        ds: dict[str, Any],
        *,
        agent_id: str,
        task: str,
        child_id: str,
        next_component_id: Callable[[], int],
        ancestors: Callable[[ModelPath], Iterable[ModelPath]],
        is_frozen: Callable[[Component], bool],
        root_posemb: torch.Tensor | Callable[[], torch.Tensor],
        device: torch.device,
        mutate: bool = True,
    ) -> ModelPath:
        """``mutate=False``: the parent's hparams and components as they are (the +polish child),
        own components copied to train on; only always-cloned kinds are drawn for."""
        h = copy.deepcopy(parent.hparams)
        h.update(ds)
        fired: list[str] = []
        # +lockown: this agent's own stored components below the top block are shared like other
        # agents' frozen ones (trainable again only when their clone mutation fires).
        lockable = lockable_own(h) if self.preset.lock_own and mutate else frozenset()
        # 1. hyperparameters, in sorted order so a mutated µ already drives the later decisions.
        for k in sorted(self.ranges) if mutate else ():
            if registry.hparam_scope(k) == registry.SCOPE_CHILD and self.do_mutate(h, "hp:" + k):
                new = incremental_mutation(h[k], self.ranges[k], self.rng)
                if new != h[k]:
                    fired.append("hp:" + k)
                h[k] = new
        # 2. optional indexed kinds (adapters): only ever added; ids beyond the (possibly reduced)
        # depth are dropped.
        for kind in registry.kinds():
            if kind.layers_hparam is None:
                continue
            ids = registry.layer_ids(h, kind.layers_hparam)
            if mutate and kind.addable is not None and kind.addable(self.preset):
                for i in range(h["num_layers"]):
                    action = registry.add_action(registry.instance_name(kind.name, i))
                    if i not in ids and self.do_mutate(h, action):
                        ids.append(i)
                        fired.append(action)
            h[kind.layers_hparam] = registry.format_layer_ids(i for i in ids if i < h["num_layers"])

        # 3. components: nearest ancestor that has a compatible one; share frozen ones unless cloned.
        lineage = list(ancestors(parent))
        comps: dict[str, Component] = {}
        for name in component_names(h):
            kind = registry.kind_of(name)
            want = kind.shapes(self.vit, h)
            chosen = None
            for anc in (lineage if kind.inherit != registry.INHERIT_FRESH else ()):
                c = anc.components.get(name)
                if c is None:
                    continue
                if kind.inherit == registry.INHERIT_TASK and anc.task != task:
                    continue  # e.g. heads are never shared between tasks
                if c.shapes() != want:
                    if kind.reshapes:
                        continue
                    raise MutationError(f"{name} of {anc.id} has shapes {c.shapes()}, expected {want}")
                action = registry.clone_action(name)
                locked_own = name in lockable and c.stored and c.owner == agent_id
                if not (is_frozen(c) or locked_own):
                    chosen = copy_component(c, agent_id, next_component_id())
                elif (mutate or registry.is_forced(action)) and self.do_mutate(h, action):
                    chosen = copy_component(c, agent_id, next_component_id())
                    if not registry.is_forced(action):
                        fired.append(action)
                else:
                    chosen = c  # shared by reference: stays frozen, same tensors in memory
                break
            if chosen is None:
                chosen = self._fresh(name, h, agent_id, next_component_id(), root_posemb, device)
                if kind.log_new:
                    fired.append(registry.new_action(name))
            comps[name] = chosen
        child = ModelPath(child_id, agent_id, task, h, comps, parent_id=parent.id,
                     preset=self.preset.name, preset_hash=self.preset.hash, mutations=fired)
        return child

    def _fresh(self, name: str, h: dict, agent_id: str, cid: int,
               root_posemb: torch.Tensor | Callable[[], torch.Tensor], device: torch.device) -> Component:
        kind = registry.kind_of(name)
        if kind.root_seed is not None:
            if callable(root_posemb):  # the root's tensor is read only when a child needs it
                root_posemb = root_posemb()
            # e.g. no ancestor at this image size: start from the root's posemb resized (not a tuned one).
            fresh = kind.root_seed(root_posemb, self.vit, h)
        else:
            fresh = init_component(name, self.vit, h, self.gen)
        params = {k: v.to(device).contiguous() for k, v in fresh.items()}
        return Component(name, agent_id, cid, params)


def lockable_own(h: dict[str, Any]) -> frozenset[str]:
    """Components a +lockown child keeps frozen when it inherits them from its own lineage: every
    one in the stages below the top block (its adapter included), so the top block, the final
    norm and the head still train and everything beneath them is a cacheable prefix."""
    top = h["num_layers"] - 1
    names = component_names(h)

    def in_top(name: str) -> bool:
        stage = registry.kind_of(name).stage
        return stage != registry.STAGE_STEM and (stage != registry.STAGE_LAYER
                                                 or registry.split_component_name(name)[1] == top)

    first = next((i for i, n in enumerate(names) if in_top(n)), len(names))
    return frozenset(names[:first])


def hparams_diff(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [old, new]} for hparams that differ (µ probabilities left out: they drift constantly)."""
    out = {}
    for k in sorted(set(parent) | set(child)):
        if k.startswith("_mu_|"):
            continue
        if parent.get(k) != child.get(k):
            out[k] = [parent.get(k), child.get(k)]
    return out
