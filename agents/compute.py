"""Training compute, counted analytically per image from the registry (torch-free).

Why analytic: every method of the benchmarks (the swarm's children, fine-tuning, adapters, joint
training) must be charged on one scale, including work the swarm skips (the backward of frozen
components, a frozen prefix served from a cache). Counting by hand from the component kinds' FLOPs
gives that scale without running anything, and ``tests/test_compute.py`` pins it against torch's
``FlopCounterMode`` on real forward and backward passes.

Units: FLOPs = 2 x multiply-accumulates of the matmuls and convolutions, as ``registry.model_flops``
(LayerNorm, softmax, GELU and elementwise adds are not counted, as FlopCounterMode does not).

The backward model, per component at or above the lowest trainable one (nothing below it runs
backward at all, since ``PathModel`` runs that prefix without autograd):
* weighted ops (linear layers, the patch conv): the weight gradient costs one forward when the
  component trains; the input gradient costs one forward when a gradient must flow into its input,
  that is when something below it trains, or when it trains and normalises its input with its own
  LayerNorm (``ComponentKind.normed_input``: the norm's weight needs that gradient). The stem's input
  is the image, which never needs one.
* weight-free mixing ops (attention scores and the weighted sum, ``ComponentKind.mixing_flops``): 2x
  their forward whenever any gradient flows through them.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from agents import registry


def stages(hparams: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Component names grouped as ``PathModel`` runs them: the stem as one stage, then one stage per
    component up to ``encoder_norm`` (the head is applied after them)."""
    names = registry.component_names(hparams)
    stem = tuple(n for n in names if registry.kind_of(n).stage == registry.STAGE_STEM)
    rest = [(n,) for n in names if registry.kind_of(n).stage not in (registry.STAGE_STEM,
                                                                      registry.STAGE_HEAD)]
    return [stem] + rest


def frozen_prefix(hparams: Mapping[str, Any], trainable: Collection[str]) -> tuple[str, ...]:
    """Components in the stages before the first stage holding a trainable component (as
    ``PathModel.frozen_prefix``): what a prefix cache can serve."""
    out: list[str] = []
    for comps in stages(hparams):
        if set(comps) & set(trainable):
            break
        out.extend(comps)
    return tuple(out)


def forward_flops(cfg: Any, hparams: Mapping[str, Any], skip: Collection[str] = ()) -> int:
    """Forward FLOPs of one image, without the components in ``skip`` (a cached prefix)."""
    return sum(f for n, f in registry.component_flops(cfg, hparams).items() if n not in skip)


def backward_flops(cfg: Any, hparams: Mapping[str, Any], trainable: Collection[str]) -> int:
    """Backward FLOPs of one image when ``trainable`` components get gradients (see module doc)."""
    trainable = set(trainable)
    total, below = 0, False
    for name in registry.component_names(hparams):
        kind = registry.kind_of(name)
        trains = name in trainable
        if not (trains or below):
            continue
        fwd = int(kind.flops(cfg, hparams))
        mixing = int(kind.mixing_flops(cfg, hparams))
        grad_in = kind.stage != registry.STAGE_STEM and (below or (trains and kind.normed_input))
        total += (fwd - mixing) * (int(trains) + int(grad_in)) + 2 * mixing
        below = below or trains
    return total


def train_flops_per_image(cfg: Any, hparams: Mapping[str, Any], trainable: Collection[str],
                          cached: Collection[str] = ()) -> int:
    """Forward (less the ``cached`` prefix) plus backward FLOPs of one training image."""
    return forward_flops(cfg, hparams, cached) + backward_flops(cfg, hparams, trainable)


@dataclass
class FlopsTally:
    """FLOPs one training run spent, by where they went (all counted in ``total``)."""

    train: int = 0        # forward + backward of training steps
    validation: int = 0   # forward of validation passes
    cache_fill: int = 0   # forward of frozen prefixes run to fill an activation cache

    @property
    def total(self) -> int:
        return self.train + self.validation + self.cache_fill

    def to_dict(self) -> dict[str, int]:
        return {"train": self.train, "validation": self.validation, "cache_fill": self.cache_fill,
                "total": self.total}
