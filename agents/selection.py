"""Parent selection and retention (docs/method.md 3.2, 3.6).

Own paths are tried best-first, each accepted with probability 0.5^offsprings (a path that already
had many children steps aside); when none is accepted the parent is drawn uniformly from everything
published in the system plus the agent's own paths. That uniform fallback is the only route by which
knowledge moves between tasks, and a new agent's first parent always comes from it.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from agents.paths import ModelPath


def best_path(population: Sequence[ModelPath]) -> ModelPath | None:
    """Highest score; ties go to the most recent path."""
    scored = [p for p in population if p.score is not None]
    return max(scored, key=lambda p: (p.score, p.seq())) if scored else None


def select_parent(own: Sequence[ModelPath], foreign: Sequence[ModelPath], offsprings: Mapping[str, int],
                  rng: random.Random, pick: Callable[[list[ModelPath]], ModelPath] | None = None) -> ModelPath:
    """``pick`` replaces the uniform fallback draw (the ``+probe`` extension, agents/probe.py)."""
    ranked = sorted((p for p in own if p.score is not None), key=lambda p: (p.score, p.seq()),
                    reverse=True)
    for p in ranked:
        if rng.random() < 0.5 ** offsprings.get(p.id, 0):
            return p
    candidates = {p.id: p for p in list(foreign) + list(own)}
    if not candidates:
        raise RuntimeError("no parent candidates: the store has no root model")
    if pick is not None:
        return pick([candidates[k] for k in sorted(candidates)])
    return candidates[rng.choice(sorted(candidates))]


def retain(population: list[ModelPath], max_size: int | None) -> list[ModelPath]:
    """Keep the top ``max_size`` paths by score (newest first on ties); all of them if unbounded."""
    if not max_size or len(population) <= max_size:
        return population
    return sorted(population, key=lambda p: (p.score, p.seq()), reverse=True)[:max_size]
