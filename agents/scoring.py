"""Score = quality x s^(accounted_params / P_ref) x s^(flops / F_ref)  (docs/method.md 3.7).

Accounted params split every shared component among the agents that use it, so reusing what others
built is cheap and a private copy pays in full. FLOPs are counted analytically from the component
kinds' registered shares (``agents.registry.model_flops``: forward pass of one image at the path's
image size, 2 x multiply-adds), so a newly registered kind is priced with no change here.
With s = 1 the score is plain validation accuracy.
"""
from __future__ import annotations

from collections.abc import Mapping

from agents.config import Preset
from agents.paths import ModelPath
from agents.registry import model_flops
from agents.vit import VitConfig


def accounted_params(path: ModelPath, lockers: Mapping[str, set[str]]) -> float:
    """Sum over components of num_params / |agents locking it ∪ {path's agent}|."""
    total = 0.0
    for c in path.components.values():
        users = set(lockers.get(c.key, ())) | {path.agent}
        total += c.num_params() / len(users)
    return total


def total_params(path: ModelPath) -> int:
    return sum(c.num_params() for c in path.components.values())


def score(quality: float, accounted: float, flops: float, preset: Preset) -> float:
    s = preset.scale_factor
    if s >= 1.0:
        return float(quality)
    b = preset.budget
    return float(quality * s ** (accounted / b.p_ref) * s ** (flops / b.f_ref))


class Scorer:
    """Binds a path's size terms once, so a validation turns into a score with one multiply."""

    def __init__(self, preset: Preset, vit: VitConfig):
        self.preset, self.vit = preset, vit

    def size_terms(self, path: ModelPath, lockers: Mapping[str, set[str]]) -> dict[str, float]:
        return {"params": total_params(path), "accounted_params": accounted_params(path, lockers),
                "flops": model_flops(self.vit, path.hparams)}

    def score_fn(self, path: ModelPath, lockers: Mapping[str, set[str]]):
        terms = self.size_terms(path, lockers)
        return lambda q: score(q, terms["accounted_params"], terms["flops"], self.preset)

    def rescore(self, path: ModelPath, lockers: Mapping[str, set[str]]) -> float | None:
        """A path's *current* score: accounted params change as other agents publish."""
        q = path.metrics.get("quality")
        return None if q is None else self.score_fn(path, lockers)(q)
