"""Early rejection (the ``+hurdle`` extension): stop a child at its first validation when it is far
below the score it must reach, and spend the images it would have used on more children.

Why at the first validation, relative to the parent: a child of its own task's model must reach that
parent's score to be kept (docs/method.md 3.3), and with ``+continue`` it starts from the parent's function,
so ``score(first validation) - threshold`` is a paired, low-noise signal of whether it will get there.
A child that is far behind after a quarter of its steps rarely catches up (calibrated by replaying
recorded learning curves: benchmarks/replay_rules.py, results in benchmarks/results/replay.json).

Short-horizon bias: a child that raised its learning rate or changed its image size pays for it early
(a hotter step, a re-learned position embedding) and may recover later, so those children get a looser
bar (``loose_margin``).

A child whose threshold is -inf (its parent is another task's model, so anything it reaches is
accepted) is never stopped: there is nothing to fall short of.

This module is torch-free: the replay tool evaluates the same ``HurdleRule`` on stored trials.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STOPPED_HURDLE = "hurdle"


@dataclass(frozen=True)
class HurdleRule:
    """After validation i (1-based, i <= len(margins)), stop when score < threshold - margins[i-1]
    (``loose_extra`` more for children the short-horizon bias penalises)."""

    margins: tuple[float, ...] = (0.03, 0.01, 0.01)
    loose_extra: float = 0.05

    def exempt_mutation(self, parent_hparams: Mapping[str, Any], child_hparams: Mapping[str, Any]) -> bool:
        """The child changed something whose cost shows early and may pay late (looser bar)."""
        raised_lr = float(child_hparams.get("opt_lr", 0)) > float(parent_hparams.get("opt_lr", 0))
        resized = child_hparams.get("ds_image_size") != parent_hparams.get("ds_image_size")
        return raised_lr or resized

    def stops(self, validation: int, score: float, threshold: float | None, loose: bool) -> bool:
        """True when the child should stop after validation number ``validation`` (1-based)."""
        if not 1 <= validation <= len(self.margins) or threshold is None or math.isinf(threshold):
            return False
        return score < threshold - self.margins[validation - 1] - (self.loose_extra if loose else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"margins": list(self.margins), "loose_extra": self.loose_extra}


# Calibrated by replaying 160 children of an 8-task `cpu` swarm (benchmarks/results/replay.json): the
# rule that saves the most images while stopping at most 5% of the children that were accepted.
DEFAULT_RULE = HurdleRule()
