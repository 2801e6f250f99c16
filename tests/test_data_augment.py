"""Batched preprocessing/augmentation: identity equals eval, ranges, flips, crops, colour, JPEG, seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import agents  # noqa: F401
from taskdata import augment_train, preprocess_eval, to_tensor
from taskdata.augment import _jpeg_like

ALL_OFF = {
    "ds_area_range_min": 1.0, "ds_aspect_ratio_range_min": 1.0, "ds_flip_left_right": False,
    "ds_brightness_delta": 0.0, "ds_contrast_delta": 0.0, "ds_saturation_delta": 0.0,
    "ds_hue_delta": 0.0, "ds_quality_delta": 0.0,
}
EVERYTHING = {
    "ds_area_range_min": 0.5, "ds_aspect_ratio_range_min": 0.75, "ds_flip_left_right": True,
    "ds_brightness_delta": 0.2, "ds_contrast_delta": 0.2, "ds_saturation_delta": 0.2,
    "ds_hue_delta": 0.2, "ds_quality_delta": 0.2,
}


def _images(b=16, c=1, h=28, w=28, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def _gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_tensor_layout():
    x = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    t = to_tensor(x, "cpu")
    assert t.shape == (2, 3, 3, 4) and t.dtype == torch.uint8 and t.is_contiguous()
    assert torch.equal(t[1, 2], torch.from_numpy(x[1, :, :, 2]))
    assert to_tensor(x[..., 0], "cpu").shape == (2, 1, 3, 4)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(x.astype(np.float32), "cpu")


def test_preprocess_eval_is_plain_bilinear_to_minus_one_one():
    x = _images(4, 1, 8, 8)
    out = preprocess_eval(x, 32)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    expected = F.interpolate(x.float(), size=(32, 32), mode="bilinear", align_corners=False) / 127.5 - 1
    torch.testing.assert_close(out[:, :1], expected, rtol=0, atol=1e-6)
    assert torch.equal(out[:, 0], out[:, 2]), "grey is replicated to three channels"
    const = torch.full((1, 3, 5, 7), 255, dtype=torch.uint8)
    assert torch.equal(preprocess_eval(const, 16), torch.ones(1, 3, 16, 16))
    assert torch.equal(preprocess_eval(torch.zeros_like(const), 16), -torch.ones(1, 3, 16, 16))


@pytest.mark.parametrize("channels, size_in, size_out",
                         [(1, 28, 32), (3, 28, 32), (1, 8, 16), (3, 32, 32), (1, 28, 20)])
def test_augmentation_off_equals_eval_exactly(channels, size_in, size_out):
    x = _images(8, channels, size_in, size_in)
    expected = preprocess_eval(x, size_out)
    assert torch.equal(augment_train(x, ALL_OFF, size_out, _gen()), expected)
    assert torch.equal(augment_train(x, {}, size_out, _gen()), expected), "absent keys mean 'off'"


@pytest.mark.parametrize("channels", [1, 3])
def test_full_augmentation_shape_range_and_determinism(channels):
    x = _images(32, channels)
    a = augment_train(x, EVERYTHING, 32, _gen(5))
    b = augment_train(x, EVERYTHING, 32, _gen(5))
    c = augment_train(x, EVERYTHING, 32, _gen(6))
    assert a.shape == (32, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b), "same generator seed -> same batch"
    assert not torch.equal(a, c)
    assert not torch.allclose(a, preprocess_eval(x, 32), atol=0.05)
    if channels == 1:
        assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 1], a[:, 2]), "grey stays grey"


def test_flip_without_crop_mirrors_exactly():
    x = _images(64, 3, 12, 12)
    out = augment_train(x, {"ds_flip_left_right": True}, 16, _gen(1))
    plain = preprocess_eval(x, 16)
    flipped = [torch.equal(o, p.flip(-1)) for o, p in zip(out, plain)]
    unchanged = [torch.equal(o, p) for o, p in zip(out, plain)]
    assert all(f or u for f, u in zip(flipped, unchanged))
    assert 16 < sum(flipped) < 48, "about half of the images are flipped"


def test_flip_with_crop_path_mirrors():
    # area_min just below 1 forces the grid_sample path with a nearly full box.
    x = _images(64, 1, 28, 28)
    ds = {"ds_flip_left_right": True, "ds_area_range_min": 0.9999}
    out = augment_train(x, ds, 28, _gen(2))
    plain = preprocess_eval(x, 28)
    err_same = (out - plain).abs().amax(dim=(1, 2, 3))
    err_flip = (out - plain.flip(-1)).abs().amax(dim=(1, 2, 3))
    is_flip = err_flip < 0.02
    assert ((err_same < 0.02) | is_flip).all()
    assert 16 < int(is_flip.sum()) < 48


def test_random_crop_zooms_into_the_image():
    # Left half black, right half white: a crop shows a varying share of white, never the exact eval image.
    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[..., 14:] = 255
    ds = {"ds_area_range_min": 0.05, "ds_aspect_ratio_range_min": 0.5}
    out = augment_train(x, ds, 32, _gen(3))
    white_share = (out[:, 0] > 0).float().mean(dim=(1, 2))
    assert white_share.min() < 0.2 and white_share.max() > 0.8, "small crops land in one half or the other"
    # Crop boxes respect the area range: a crop of area a has side ~sqrt(a); with a >= 0.05 the box is
    # at least ~6 px wide, so a 2 px wide stripe can never fill the output.
    stripe = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    stripe[..., 13:15] = 255
    bright = (augment_train(stripe, ds, 32, _gen(4))[:, 0] > 0.9).float().mean(dim=(1, 2))
    assert bright.max() < 0.6


def test_brightness_and_contrast():
    x = torch.full((64, 1, 8, 8), 100, dtype=torch.uint8)
    x[:, :, :4] = 150
    base = preprocess_eval(x, 8)
    bright = augment_train(x, {"ds_brightness_delta": 0.1}, 8, _gen(7))
    shift = (bright - base).mean(dim=(1, 2, 3))
    assert shift.abs().max() <= 0.1 * 2 + 1e-5 and shift.std() > 0.02  # +-0.1 of 255 is +-0.2 in [-1, 1]
    diff = bright - base
    assert torch.allclose(diff, diff[:, :1, :1, :1].expand_as(diff), atol=1e-5), "brightness is additive"
    contrast = augment_train(x, {"ds_contrast_delta": 0.2}, 8, _gen(8))
    torch.testing.assert_close(contrast.mean(dim=(1, 2, 3)), base.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    spread = (contrast[:, 0, 0, 0] - contrast[:, 0, 7, 0]) / (base[:, 0, 0, 0] - base[:, 0, 7, 0])
    assert 0.8 - 1e-5 <= spread.min() and spread.max() <= 1.2 + 1e-5 and spread.std() > 0.03


def test_saturation_and_hue_change_colour_not_grey():
    colour = torch.zeros(32, 3, 8, 8, dtype=torch.uint8)
    colour[:, 0] = 160  # moderate chroma: no channel clips under +-20% saturation or hue changes
    colour[:, 1] = 110
    colour[:, 2] = 90
    grey = torch.full((32, 3, 8, 8), 90, dtype=torch.uint8)
    for key in ("ds_saturation_delta", "ds_hue_delta"):
        ds = {key: 0.2}
        out = augment_train(colour, ds, 8, _gen(9))
        assert (out - preprocess_eval(colour, 8)).abs().amax(dim=(1, 2, 3)).min() > 0
        luma = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
        torch.testing.assert_close((out * luma).sum(1), (preprocess_eval(colour, 8) * luma).sum(1),
                                   atol=2e-3, rtol=0)  # both keep luma (YIQ rotation, luma blend)
        torch.testing.assert_close(augment_train(grey, ds, 8, _gen(9)), preprocess_eval(grey, 8),
                                   atol=1e-4, rtol=0)


def test_jpeg_like_quality_controls_the_error():
    g = torch.Generator().manual_seed(11)
    smooth = F.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 255, size=(28, 28), mode="bilinear")
    noisy = smooth + torch.randn(8, 3, 28, 28, generator=g) * 20
    x = noisy.clamp(0, 255).round()
    errors = []
    for q in (100, 90, 50, 10):
        out = _jpeg_like(x, torch.full((8,), q))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
        assert torch.equal(out, out.round())
        errors.append(float((out - x).abs().mean()))
    assert errors[0] < 1.5, "quality 100 is nearly lossless"
    assert errors[0] < errors[1] < errors[2] < errors[3]
    grey = x[:, :1]
    assert _jpeg_like(grey, torch.full((8,), 50)).shape == grey.shape
    odd = x[:, :, :27, :13]  # sizes that are not multiples of 8 are padded internally
    assert _jpeg_like(odd, torch.full((8,), 50)).shape == odd.shape
    out = augment_train(x.to(torch.uint8), {"ds_quality_delta": 0.5}, 28, _gen(12))
    assert not torch.equal(out, preprocess_eval(x.to(torch.uint8), 28))


def test_invalid_hparams_are_rejected():
    x = _images(2)
    for ds in ({"ds_area_range_min": 0.0}, {"ds_aspect_ratio_range_min": 1.5}, {"ds_hue_delta": 0.7},
               {"ds_brightness_delta": -0.1}):
        with pytest.raises(ValueError, match="ds_"):
            augment_train(x, ds, 16, _gen())
    with pytest.raises(ValueError, match="uint8"):
        augment_train(x.float(), {}, 16, _gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_result_on_gpu():
    x = _images(32, 3)
    cpu = augment_train(x, EVERYTHING, 32, _gen(13))
    gpu = augment_train(x.cuda(), EVERYTHING, 32, _gen(13)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-2, rtol=0)
    assert (gpu - cpu).abs().mean() < 1e-3
