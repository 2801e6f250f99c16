"""In-memory components and paths (models), the unit an agent mutates, trains, scores and publishes.

A ``Component`` is one named piece of a ViT (``encoderblock_2``, ``head``...) owned by the agent that
created it. Its tensors live on the agent's device. Components loaded from the store are immutable:
frozen ones are shared *by reference* between every path that uses them; trainable ones are always
deep-copied into a new component before a child trains them. So nothing that was ever published is
written again, in memory or in the store.

A ``ModelPath`` is one model for one task: an ordered set of components plus hparams and metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from agents.vit import component_names


class TensorSource(Protocol):
    """Where a stored component's tensors come from when first used (the agent's ``SystemView``)."""

    def load_params(self, c: Component) -> dict[str, torch.Tensor]: ...
    def load_momentum(self, c: Component) -> dict[str, torch.Tensor] | None: ...
    def load_shapes(self, c: Component) -> dict[str, tuple[int, ...]]: ...


class Component:
    """A component's record (name, owner, shapes) and, once used, its tensors.

    A component read from the store starts as a record only: ``params`` loads its tensors through
    ``source`` on first access, and the stored optimizer state is read only for a clone
    (``copy_component``; only the clone keeps it). ``release`` lets go of the tensors again (the next
    access reloads the same values: stored components are immutable). A component built in memory (``source`` None)
    holds its tensors for its whole life. ``shapes``/``num_params`` never load the tensors (a record
    asks its source for the shapes once: the store reads them from the blob headers).
    """

    __slots__ = ("name", "owner", "cid", "cloned_from", "stored", "_params", "_momentum",
                 "_momentum_known", "_shapes", "source")

    def __init__(self, name: str, owner: str, cid: int, params: dict[str, torch.Tensor] | None = None,
                 momentum: dict[str, torch.Tensor] | None = None, cloned_from: str | None = None,
                 stored: bool = False, *, source: TensorSource | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        if params is None and source is None:
            raise ValueError(f"component {name} of {owner}: tensors or a source to load them from")
        self.name, self.owner, self.cid = name, owner, cid   # owner: creating agent; cid: its counter
        self.cloned_from = cloned_from                       # key of the component copied from
        self.stored = stored                                 # committed (then never written again)
        self.source = source
        self._params = params
        self._momentum = momentum
        self._momentum_known = params is not None or momentum is not None
        self._shapes = dict(shapes) if shapes is not None else None

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "record"
        return f"Component({self.name!r}, {self.key!r}, {state})"

    @property
    def key(self) -> str:
        return f"{self.owner}:{self.cid}"

    @property
    def params(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            self._params = self.source.load_params(self)
        return self._params

    @params.setter
    def params(self, value: dict[str, torch.Tensor]) -> None:
        self._params, self._shapes = value, None

    @property
    def momentum(self) -> dict[str, torch.Tensor] | None:
        if not self._momentum_known:
            self._momentum = self.source.load_momentum(self) if self.source is not None else None
            self._momentum_known = True
        return self._momentum

    @momentum.setter
    def momentum(self, value: dict[str, torch.Tensor] | None) -> None:
        self._momentum, self._momentum_known = value, True

    @property
    def loaded(self) -> bool:
        """Its tensors are in memory (a record-only component is not)."""
        return self._params is not None

    @property
    def momentum_loaded(self) -> bool:
        return self._momentum_known and self._momentum is not None

    def momentum_copy(self) -> dict[str, torch.Tensor] | None:
        """Fresh tensors of the momentum for a clone: a copy of what is in memory, else read from
        the source and *not* kept here (the frozen original never needs its optimizer state)."""
        if self._momentum_known:
            return None if self._momentum is None else \
                {k: v.detach().clone() for k, v in self._momentum.items()}
        return self.source.load_momentum(self) if self.source is not None else None

    def release(self) -> bool:
        """Let go of the tensors if they can be loaded again; True if something was let go."""
        if self.source is None or not (self._params is not None or self._momentum is not None):
            return False
        if self._params is not None and self._shapes is None:
            self._shapes = {k: tuple(v.shape) for k, v in self._params.items()}
        self._params, self._momentum, self._momentum_known = None, None, False
        return True

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._params is not None:
            return {k: tuple(v.shape) for k, v in self._params.items()}
        if self._shapes is None:  # a record: the shapes come from the store, not the tensors
            self._shapes = dict(self.source.load_shapes(self))
        return dict(self._shapes)


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


def copy_component(src: Component, owner: str, cid: int, momentum: bool = True) -> Component:
    """Deep copy params and momentum under a new owner (a clone: same values, trainable).

    ``momentum=False``: the clone starts with no optimizer state (the source's is not even read)."""
    params = {k: v.detach().clone() for k, v in src.params.items()}
    return Component(src.name, owner, cid, params, src.momentum_copy() if momentum else None,
                     cloned_from=src.key)
