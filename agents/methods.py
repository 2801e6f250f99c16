"""Agent kinds: what one generation of an agent does, so a second kind is a registration.

A ``Method`` bundles the three generation steps (propose -> train -> judge, each returning the values
of agents/generation.py), how the kind scores a model, the activation cache it trains with, and how its
agent is named. ``single`` is the single-path µ2Net+/µ3Net agent (agents/generation.py); ``multipath``
the µ4Net agent that joins frozen whole models (agents/multipath_generation.py). The agent loop
(agents/agent.py: lease, view, cycles, commits) is the same for both.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agents import generation, multipath_generation
from agents.config import Preset
from agents.paths import ModelPath
from agents.prefix_cache import PrefixCache
from agents.scoring import Scorer
from agents.vit import VitConfig


class QualityScorer:
    """Score = validation accuracy, no size or compute term (the multipath kind's: its paths are
    borrowed, not owned, and what it trains is a few thousand parameters)."""

    def __init__(self, preset: Preset, vit: VitConfig):
        self.preset, self.vit = preset, vit

    def score_fn(self, path: ModelPath, lockers: Mapping[str, set[str]]) -> Callable[[float], float]:
        return float

    def rescore(self, path: ModelPath, lockers: Mapping[str, set[str]]) -> float | None:
        q = path.metrics.get("quality")
        return None if q is None else float(q)


@dataclass(frozen=True)
class Method:
    kind: str                      # ModelRecord.kind / AgentRecord.kind of what it makes
    id_prefix: str                 # agent id = f"{id_prefix}~{task}"
    propose: Callable[..., Any]
    train: Callable[..., Any]
    judge: Callable[..., Any]
    scorer: Callable[[Preset, VitConfig], Any]
    cache: Callable[[int], Any]    # cache_mb -> the activation cache its training uses (or None)
    cycle_by_images: bool          # +hurdle turns a cycle into an image budget
    needs_single_path: bool        # needs its task's single-path model before it can start
    description: str
    full_validation: bool = False  # judge children on the whole validation split (preset: a subset)


_METHODS: dict[str, Method] = {}


def register_method(m: Method) -> Method:
    if m.kind in _METHODS:
        raise ValueError(f"agent kind {m.kind!r} is already registered")
    _METHODS[m.kind] = m
    return m


def method(kind: str) -> Method:
    try:
        return _METHODS[kind]
    except KeyError:
        raise ValueError(f"unknown agent kind {kind!r}; known: {', '.join(sorted(_METHODS))}") from None


def kinds() -> list[str]:
    return sorted(_METHODS)


register_method(Method(
    "single", "agent", generation.propose, generation.train, generation.judge, Scorer,
    cache=lambda mb: PrefixCache(max_bytes=mb << 20) if mb > 0 else None,
    cycle_by_images=True, needs_single_path=False,
    description="single-path agent: grows its task's ViT from shared components (µ2Net+/µ3Net)"))
register_method(Method(
    "multipath", "multipath", multipath_generation.propose, multipath_generation.train,
    multipath_generation.judge, QualityScorer,
    # A multipath child runs its paths once per image whatever the cap: the cache holds path outputs
    # ((N, D) per split), not token activations, so 0 still keeps them (a cap of 0 would recompute
    # every path for every child, which no one wants).
    cache=lambda mb: multipath_generation.PathOutputs(max(mb, 64) << 20),
    cycle_by_images=False, needs_single_path=True,
    description="multipath agent: joins its task's model with other tasks' frozen models (µ4Net)",
    # Its validations cost a router and connectors per image on cached path outputs: the whole split
    # is as cheap as a subset, and it makes the strict-improvement rule choose on less noise.
    full_validation=True))
