"""Frozen-prefix cache: cached training equals uncached training for every child shape, LRU and cap,
keys, fill counting, and the augmentation check that decides when training batches may be cached."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import agents  # noqa: F401  (before timm)
from agents.paths import Component, ModelPath, copy_component
from agents.prefix_cache import CHUNK, PrefixCache, augment_is_identity, prefix_key
from agents.vit import PathModel, component_names, init_component, vit_config
from taskdata.augment import augment_train, preprocess_eval

TI3 = vit_config("ti", depth=3)
ALL = object()  # "every component trains"


def hparams(size: int = 32, adapters: str = "", classes: int = 3) -> dict:
    return dict(num_layers=3, adapter_layers=adapters, adapter_dim=16, ds_image_size=size, num_classes=classes)


def make_path(hp: dict, seed: int = 0) -> ModelPath:
    """Fresh components plus noise, so zero-initialised heads and adapters take part in the comparison."""
    gen = torch.Generator().manual_seed(seed)
    components = {}
    for cid, name in enumerate(component_names(hp)):
        fresh = init_component(name, TI3, hp, gen)
        params = {t: v + 0.05 * torch.randn(v.shape, generator=gen) for t, v in fresh.items()}
        components[name] = Component(name, "root", cid, params, stored=True)
    return ModelPath(id="a:m1", agent="a", task="t", hparams=hp, components=components)


def build(path: ModelPath, trainable) -> PathModel:
    names = set(component_names(path.hparams)) if trainable is ALL else trainable
    return PathModel(TI3, path.hparams, {n: c.params for n, c in path.components.items()}, names)


def uint8_images(n: int, side: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: PathModel, logits: torch.Tensor, target: torch.Tensor):
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(logits, target).backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.trainable_tensors().items()}


# Child shapes: (hparams, trainable, cls-only prefix). Sources are 28 px so that preprocessing resizes.
SHAPES = {
    "head_only": (hparams(), {"encoder_norm", "head"}, True),
    "top_block": (hparams(), {"encoderblock_2", "encoder_norm", "head"}, False),
    "adapter_before_block_2": (hparams(adapters="2"), {"residual_adapter_2", "encoder_norm", "head"}, False),
    "size_48_frozen_posemb": (hparams(size=48), {"encoderblock_1", "encoderblock_2", "encoder_norm", "head"},
                              False),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cached_logits_and_gradients_equal_the_plain_forward(shape):
    hp, trainable, cls_only = SHAPES[shape]
    size = hp["ds_image_size"]
    path = make_path(hp, seed=len(shape))
    model = build(path, trainable)
    assert model.has_frozen_prefix and model.prefix_keeps_cls_only is cls_only
    assert "posembed_input" in model.frozen_prefix and not set(model.frozen_prefix) & trainable
    images = uint8_images(40, side=28)
    target = torch.arange(40) % 3
    cache, key = PrefixCache(), prefix_key(path, model, size)
    tokens = 1 if cls_only else 1 + (size // 16) ** 2
    # a batch with a repeat (6 distinct rows are computed, no more), the split (the other 34), the
    # batch again (nothing computed)
    filled_after = []
    for rows in (torch.tensor([5, 0, 33, 5, 17, 39, 2]), None, torch.tensor([39, 5])):
        picked = images if rows is None else images[rows]
        ref_logits, ref_grads = loss_and_grads(model, model(preprocess_eval(picked, size)), target[:len(picked)])
        cached = cache.outputs(key, model, "train", images, size, rows)
        assert cached.shape == (len(picked), tokens, 192) and cached.dtype == torch.float32
        assert not cached.requires_grad
        logits, grads = loss_and_grads(model, model.forward_suffix(cached), target[:len(picked)])
        assert ref_logits.abs().max() > 0.1  # not zeros against zeros
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        assert grads.keys() == ref_grads.keys() and {c for c, _ in grads} == trainable
        for k, grad in grads.items():
            assert grad.abs().max() > 0, k
            torch.testing.assert_close(grad, ref_grads[k], rtol=0, atol=1e-5, msg=f"{shape} {k}")
        filled_after.append(cache.filled_images)
    assert filled_after == [6, 40, 40]
    assert (cache.misses, cache.hits, cache.filled_images, cache.entries) == (2, 1, 40, 1)
    assert cache.bytes == 40 * tokens * 192 * 4


def test_a_full_clone_has_no_prefix_and_no_key():
    path = make_path(hparams())
    model = build(path, ALL)
    assert model.first_trainable_stage == 0 and not model.has_frozen_prefix
    assert model.frozen_prefix == () and prefix_key(path, model, 32) is None
    with pytest.raises(ValueError, match="no frozen prefix"):
        model.forward_prefix(preprocess_eval(uint8_images(2), 32))
    with pytest.raises(ValueError, match="no frozen prefix"):
        PrefixCache().outputs(None, model, "train", uint8_images(2), 32)


def test_prefix_and_suffix_compose_to_forward_for_every_split_point():
    path = make_path(hparams(adapters="1"), seed=3)
    x = preprocess_eval(uint8_images(6), 32)
    expected = build(path, set()).eval()(x)
    names = component_names(path.hparams)
    for first in range(3, len(names)):  # the first trainable component after the stem, up to the head
        model = build(path, {names[first], "head"})
        assert model.first_trainable_stage == first - 2  # the stem's three components are stage 0
        torch.testing.assert_close(model.forward_suffix(model.forward_prefix(x)), expected, rtol=0, atol=1e-6)


def test_a_split_larger_than_one_chunk_is_filled_in_chunks():
    path = make_path(hparams(), seed=4)
    model = build(path, {"encoder_norm", "head"})
    images = uint8_images(CHUNK + 9, seed=2)
    cache = PrefixCache()
    cached = cache.outputs(prefix_key(path, model, 32), model, "train", images, 32)
    assert cached.shape == (CHUNK + 9, 1, 192) and cache.take_filled() == CHUNK + 9
    tail = torch.arange(CHUNK - 3, CHUNK + 9)  # rows on both sides of the chunk boundary
    torch.testing.assert_close(model.forward_suffix(cached[tail]), model(preprocess_eval(images[tail], 32)),
                               rtol=0, atol=1e-5)


def test_lru_eviction_under_a_cap_and_the_too_big_entry():
    path = make_path(hparams(), seed=5)
    model = build(path, {"encoder_norm", "head"})
    key = prefix_key(path, model, 32)
    splits = {name: uint8_images(10, seed=i) for i, name in enumerate(("train", "val", "test"))}
    entry = 10 * 1 * 192 * 4  # cls-only: 768 B per image
    cache = PrefixCache(max_bytes=2 * entry)
    cache.outputs(key, model, "train", splits["train"], 32)
    cache.outputs(key, model, "val", splits["val"], 32)
    cache.outputs(key, model, "train", splits["train"], 32)  # train is now the most recently used
    cache.outputs(key, model, "test", splits["test"], 32)    # evicts val
    assert (cache.entries, cache.bytes, cache.hits, cache.misses) == (2, 2 * entry, 1, 3)
    cache.outputs(key, model, "train", splits["train"], 32)
    assert cache.hits == 2 and cache.take_filled() == 30
    cache.outputs(key, model, "val", splits["val"], 32)
    assert cache.misses == 4 and cache.take_filled() == 10  # val was gone, so it was filled again

    tiny = PrefixCache(max_bytes=entry - 1)
    rows = torch.tensor([9, 1, 4])
    got = tiny.outputs(key, model, "train", splits["train"], 32, rows)
    assert (tiny.entries, tiny.bytes, tiny.take_filled(), tiny.filled_images) == (0, 0, 3, 3)
    torch.testing.assert_close(got, model.forward_prefix(preprocess_eval(splits["train"][rows], 32)),
                               rtol=0, atol=1e-6)
    assert tiny.outputs(key, model, "train", splits["train"], 32).shape == (10, 1, 192)
    assert tiny.take_filled() == 10 and tiny.take_filled() == 0 and tiny.misses == 2
    cache.clear()
    assert (cache.entries, cache.bytes) == (0, 0)


def test_other_images_under_the_same_split_name_refill_the_entry():
    path = make_path(hparams(), seed=6)
    model = build(path, {"encoder_norm", "head"})
    key, cache = prefix_key(path, model, 32), PrefixCache()
    first, second = uint8_images(8, seed=1), uint8_images(8, seed=2)
    cache.outputs(key, model, "train", first, 32)
    got = cache.outputs(key, model, "train", second, 32)
    torch.testing.assert_close(got, model.forward_prefix(preprocess_eval(second, 32)), rtol=0, atol=1e-6)
    assert (cache.misses, cache.hits, cache.entries) == (2, 0, 1)


def test_an_entry_filled_in_inference_mode_can_still_train_a_suffix():
    path = make_path(hparams(), seed=7)
    model = build(path, {"encoderblock_2", "encoder_norm", "head"})
    key, cache, images = prefix_key(path, model, 32), PrefixCache(), uint8_images(6)
    with torch.inference_mode():
        cache.outputs(key, model, "train", images, 32)  # e.g. first filled by an accuracy pass
    F.cross_entropy(model.forward_suffix(cache.outputs(key, model, "train", images, 32)),
                    torch.arange(6) % 3).backward()
    assert model.blocks[2].attn.qkv.weight.grad is not None


def test_the_key_follows_frozen_identities_and_image_size_only():
    hp = hparams(adapters="2")
    path = make_path(hp)
    model = build(path, {"residual_adapter_2", "encoder_norm", "head"})
    key = prefix_key(path, model, 32)
    assert key == (32, tuple((n, f"root:{i}") for i, n in enumerate(component_names(hp)[:5])), False)
    assert [n for n, _ in key[1]] == list(model.frozen_prefix)

    def with_component(name: str) -> ModelPath:
        components = dict(path.components, **{name: copy_component(path.components[name], "b", 99)})
        return ModelPath(id="b:m1", agent="b", task="t", hparams=hp, components=components)

    assert prefix_key(with_component("encoderblock_1"), model, 32) != key  # a frozen component changed
    assert prefix_key(with_component("embedding"), model, 32) != key
    assert prefix_key(with_component("residual_adapter_2"), model, 32) == key  # a trainable one did
    assert prefix_key(with_component("head"), model, 32) == key

    big = make_path(hparams(size=48, adapters="2"))
    big_key = prefix_key(big, build(big, {"residual_adapter_2", "encoder_norm", "head"}), 48)
    assert big_key[0] == 48 and big_key != key
    head_only = prefix_key(path, build(path, {"head"}), 32)
    assert head_only[2] is True and head_only[1][-1] == ("encoder_norm", "root:7")


def test_augmentation_off_is_exactly_preprocess_eval_and_draws_nothing():
    off = dict(ds_area_range_min=1.0, ds_aspect_ratio_range_min=1.0, ds_flip_left_right=False,
               ds_brightness_delta=0.0, ds_contrast_delta=0.0, ds_saturation_delta=0.0, ds_hue_delta=0.0,
               ds_quality_delta=0.0, ds_image_size=32)
    assert augment_is_identity(off) and augment_is_identity({"ds_image_size": 48})
    for side, size in ((28, 32), (32, 32), (32, 48)):
        for channels in (1, 3):
            x = torch.randint(0, 256, (5, channels, side, side), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(side + channels))
            gen = torch.Generator().manual_seed(11)
            state = gen.get_state()
            assert torch.equal(augment_train(x, off, size, gen), preprocess_eval(x, size))
            assert torch.equal(gen.get_state(), state)
    for name, value in (("ds_area_range_min", 0.5), ("ds_aspect_ratio_range_min", 0.75),
                        ("ds_flip_left_right", True), ("ds_brightness_delta", 0.1), ("ds_contrast_delta", 0.1),
                        ("ds_saturation_delta", 0.1), ("ds_hue_delta", 0.05), ("ds_quality_delta", 0.2)):
        assert not augment_is_identity(dict(off, **{name: value})), name
    with pytest.raises(ValueError, match="ds_hue_delta"):
        augment_is_identity(dict(off, ds_hue_delta=0.9))
