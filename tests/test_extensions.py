"""Method extensions beyond the reference (``+continue``, ``+probe``, ``+guard``) on a real tiny ViT."""
from __future__ import annotations

import random

import pytest
import torch

from agents.config import resolve_preset
from agents.probe import probe_accuracy, probe_pick
from agents.selection import select_parent
from agents.training import train_child
from test_method import VIT, build, digits, make_root  # noqa: F401  (digits is a fixture)


def _train(child, data, schedule):
    return train_child(child, VIT, data, batch_size=32, steps_between_validations=8, validations=2,
                       threshold=-float("inf"), score_of=lambda q: q, gen=torch.Generator().manual_seed(1),
                       schedule=schedule)


def _moved(child, before) -> float:
    head = child.components["head"].params
    return sum(float((head[k] - before[k]).norm()) for k in head)


def test_continue_places_a_child_on_its_lineage_schedule(digits):
    preset = resolve_preset("test")  # +continue is part of the default method
    assert preset.continue_schedule and not resolve_preset("test@base+autotune").continue_schedule
    root = make_root(preset)
    moved = {}
    for name, schedule in (("restart", None), ("start", (0, 16)), ("late", (10_000 - 16, 10_000))):
        child = build(preset, root, seed=3)
        before = {k: v.clone() for k, v in child.components["head"].params.items()}
        result, _ = _train(child, digits, schedule)
        assert result.steps == 16 and result.snapshot_step in (8, 16)
        moved[name] = _moved(child, before)
    # A child at the start of a 16-step schedule trains like a restarted one (same steps, same lr) ...
    assert moved["start"] == pytest.approx(moved["restart"], rel=1e-5)
    # ... and one at the end of a long lineage schedule takes tiny steps (the cosine tail).
    assert moved["late"] < 0.05 * moved["restart"]


def test_probe_prefers_features_that_separate_the_task(digits):
    preset = resolve_preset("test+probe")
    informative = make_root(preset, seed=0)
    blind = make_root(preset, seed=1)
    blind.id = "blind:m0"
    # A zero patch embedding makes every image the same token sequence: the features carry nothing.
    blind.components["embedding"].params = {k: torch.zeros_like(v)
                                            for k, v in blind.components["embedding"].params.items()}
    good, bad = probe_accuracy(informative, VIT, digits), probe_accuracy(blind, VIT, digits)
    assert good > 0.5 and bad < 0.2, (good, bad)
    cache: dict[str, float] = {}
    assert probe_pick([blind, informative], VIT, digits, random.Random(0), cache) is informative
    assert set(cache) == {"root:m0", "blind:m0"}
    # select_parent hands the fallback to the probe, only when no own path was accepted.
    picked = select_parent([], [blind, informative], {}, random.Random(0),
                           pick=lambda c: probe_pick(c, VIT, digits, random.Random(0), cache))
    assert picked is informative


def test_extension_names_resolve_and_change_the_hash():
    names = ["cpu@base", "cpu@base+continue", "cpu@base+probe", "cpu@base+guard", "cpu", "cpu+probe"]
    presets = [resolve_preset(n) for n in names]
    assert len({p.hash for p in presets}) == len(names)
    assert resolve_preset("cpu+guard").guard_foreign and not resolve_preset("cpu").guard_foreign
    assert resolve_preset("cpu+probe").probe_parents
    # an explicit +clock replaces the default method's +continue (else it would be a silent no-op)
    assert resolve_preset("cpu+clock").clock_schedule and not resolve_preset("cpu+clock").continue_schedule
    assert resolve_preset("cpu@base+clock").clock_schedule
