"""The analytic training-FLOPs model (agents/compute.py) against torch's FlopCounterMode on real
forward and backward passes of PathModel, for every child shape the swarm trains."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import agents  # noqa: F401  (before timm)
from agents import compute
from agents.vit import PathModel, component_names, count_flops, init_component, vit_config

TI3 = vit_config("ti", depth=3)


def _h(layers=3, size=32, classes=10, adapters="", adapter_dim=16) -> dict:
    return dict(num_layers=layers, adapter_layers=adapters, adapter_dim=adapter_dim, ds_image_size=size,
                num_classes=classes)


def _params(h: dict) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {n: {t: v + 0.05 * torch.randn(v.shape, generator=gen)
                for t, v in init_component(n, TI3, h, gen).items()} for n in component_names(h)}


def _measured(h: dict, trainable: set[str], batch: int = 3) -> tuple[int, int]:
    """(forward FLOPs, backward FLOPs) per image as FlopCounterMode counts one training step."""
    model = PathModel(TI3, h, _params(h), trainable)
    x = torch.rand(batch, 3, h["ds_image_size"], h["ds_image_size"]) * 2 - 1
    y = torch.arange(batch) % h["num_classes"]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops() // batch, bwd.get_total_flops() // batch


TOP = {"encoder_norm", "head"}
SHAPES = {
    "head only": (_h(), TOP),
    "top block": (_h(), TOP | {"encoderblock_2"}),
    "middle block": (_h(), TOP | {"encoderblock_1"}),
    "adapter before block 2": (_h(adapters="2"), TOP | {"residual_adapter_2"}),
    "adapters 0 and 2, block 1": (_h(adapters="0_2"), TOP | {"residual_adapter_0", "residual_adapter_2",
                                                             "encoderblock_1"}),
    "image size 48, top block": (_h(size=48), TOP | {"encoderblock_2"}),
    "new posemb only": (_h(size=48), TOP | {"posembed_input"}),
    "embedding only": (_h(), TOP | {"embedding"}),
    "full clone": (_h(), set(component_names(_h()))),
    "no blocks": (_h(layers=0), TOP),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_flops_match_the_flop_counter(shape):
    h, trainable = SHAPES[shape]
    fwd, bwd = _measured(h, trainable)
    assert fwd == compute.forward_flops(TI3, h) == count_flops(TI3, h)
    assert bwd == compute.backward_flops(TI3, h, trainable), shape
    assert compute.train_flops_per_image(TI3, h, trainable) == fwd + bwd


def test_a_cached_prefix_is_free_and_the_prefix_matches_the_models():
    h, trainable = SHAPES["top block"]
    prefix = compute.frozen_prefix(h, trainable)
    model = PathModel(TI3, h, _params(h), trainable)
    assert prefix == model.frozen_prefix == ("cls", "embedding", "posembed_input", "encoderblock_0",
                                             "encoderblock_1")
    full = compute.train_flops_per_image(TI3, h, trainable)
    cached = compute.train_flops_per_image(TI3, h, trainable, cached=prefix)
    assert full - cached == compute.forward_flops(TI3, h) - compute.forward_flops(TI3, h, prefix) > 0
    # the top-block child costs about half of full fine-tuning, a third of it with the cache
    everything = compute.train_flops_per_image(TI3, h, component_names(h))
    assert 0.45 < full / everything < 0.6 and cached / everything < 0.35
    h0, head_only = SHAPES["head only"]
    assert compute.frozen_prefix(h0, head_only) == tuple(n for n in component_names(h0)
                                                         if n not in ("encoder_norm", "head"))
    assert compute.frozen_prefix(h0, set(component_names(h0))) == ()


def test_tally_totals_its_parts():
    t = compute.FlopsTally(train=5, validation=3, cache_fill=2)
    assert t.total == 10 and t.to_dict() == {"train": 5, "validation": 3, "cache_fill": 2, "total": 10}
