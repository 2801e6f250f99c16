"""In-memory components and paths (models), the unit an agent mutates, trains, scores and publishes.

A ``Component`` is one named piece of a ViT (``encoderblock_2``, ``head``...) owned by the agent that
created it. Its tensors live on the agent's device. Components loaded from the store are immutable:
frozen ones are shared *by reference* between every path that uses them; trainable ones are always
deep-copied into a new component before a child trains them. So nothing that was ever published is
written again, in memory or in the store.

A ``ModelPath`` is one model for one task: an ordered set of components plus hparams and metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from agents.vit import component_names


@dataclass(eq=False)
class Component:
    name: str
    owner: str                                  # creating agent id
    cid: int                                    # per-owner counter
    params: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None = None
    cloned_from: str | None = None              # key of the component this one was copied from
    stored: bool = False                        # committed to the store (then never written again)

    @property
    def key(self) -> str:
        return f"{self.owner}:{self.cid}"

    def num_params(self) -> int:
        return sum(t.numel() for t in self.params.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.params.items()}


@dataclass(eq=False)
class ModelPath:
    id: str                                     # model id "{agent}:m{n}"
    agent: str
    task: str
    hparams: dict[str, Any]
    components: dict[str, Component]            # component name -> Component
    metrics: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None
    preset: str = ""
    preset_hash: str = ""
    created_at: float = 0.0
    stored: bool = False
    mutations: list[str] = field(default_factory=list)  # what built it from its parent (trial log)
    current_score: float | None = None  # re-scored by this agent (its preset, today's sharing)
    kind: str = "single"                # "multipath": frozen whole models (``refs``) + router/connectors
    refs: list[str] = field(default_factory=list)  # a multipath model's paths (model ids), main first

    @property
    def score(self) -> float | None:
        """The score this agent ranks by: re-scored when known, else the recorded one."""
        return self.current_score if self.current_score is not None else self.metrics.get("score")

    def ordered(self) -> list[Component]:
        return [self.components[n] for n in component_names(self.hparams)]

    def seq(self) -> int:
        """Per-agent creation number (used for 'newest wins' ties)."""
        return int(self.id.rsplit(":m", 1)[1])


def copy_component(src: Component, owner: str, cid: int) -> Component:
    """Deep copy params and momentum under a new owner (a clone: same values, trainable)."""
    params = {k: v.detach().clone() for k, v in src.params.items()}
    momentum = None
    if src.momentum is not None:
        momentum = {k: v.detach().clone() for k, v in src.momentum.items()}
    return Component(src.name, owner, cid, params, momentum, cloned_from=src.key)
