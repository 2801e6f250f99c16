"""Batched preprocessing and training augmentation on uint8 image tensors, on any device.

Task images live on the agent's device as one uint8 tensor N x C x H x W (``to_tensor``); a training
step indexes a batch and calls ``augment_train``, evaluation calls ``preprocess_eval``. Both return
float32 B x 3 x S x S in [-1, 1], the input convention of the method's ViT (x / 127.5 - 1, grey
replicated to three channels, plain bilinear resize to a square with ``align_corners=False`` and no
antialiasing).

``augment_train`` follows docs/method.md 3.5, in this order, each step only when its hparam enables it:

1. JPEG quality jitter (``ds_quality_delta`` = d): per image an integer quality q in [100(1-d), 100];
   approximated by what JPEG actually loses: 8x8 block DCT of the level-shifted image (YCbCr for
   colour), coefficients quantised with the standard luminance/chrominance tables scaled by q with the
   IJG rule, inverse DCT, rounded to 8 bit. Not modelled: chroma subsampling and entropy coding (the
   latter is lossless anyway).
2. Random crop (``ds_area_range_min`` a, ``ds_aspect_ratio_range_min`` r): area fraction ~ U[a, 1],
   aspect (width/height) ~ U[r, 1/r]; 10 candidate boxes per image, the first that fits is used, else
   the whole image (as ``sample_distorted_bounding_box`` does with a bounded number of attempts);
   continuous box coordinates instead of whole pixels.
3. Horizontal flip with p = 0.5 per image (``ds_flip_left_right``).
   Crop, flip and the resize to S x S are one ``affine_grid``/``grid_sample`` call for the batch. Without
   a crop the resize is ``F.interpolate`` (exactly what ``preprocess_eval`` does) and the flip an exact
   mirror, so with every augmentation off the output equals ``preprocess_eval`` bit for bit.
4. Colour, per image: brightness + U[-d, d] * 255; contrast (x - mean) * U[1-d, 1+d] + mean (mean per
   image and channel); saturation: blend with the luma image by U[1-d, 1+d]; hue: rotation of the
   chroma plane in YIQ space by U[-d, d] turns (an approximation of an HSV hue shift). Saturation and
   hue leave grey images unchanged, so grey batches skip them and stay one channel until the end.
5. Clip to [0, 255], x / 127.5 - 1, clip to [-1, 1], replicate grey to three channels.

Randomness: every random number is drawn on the CPU from the given ``torch.Generator`` and then moved to
the data's device, so a seed gives the same augmentation on CPU and GPU. There are no per-image Python
loops; the cost is a few batched tensor ops.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CROP_ATTEMPTS = 10

# JPEG (ITU T.81 Annex K) base quantisation tables, row-major in natural (not zig-zag) order.
_JPEG_LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]
_JPEG_CHROMA = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32

_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([
    [0.299, 0.587, 0.114],
    [0.595716, -0.274453, -0.321263],
    [0.211456, -0.522591, 0.311135],
], dtype=torch.float64, device="cpu")
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_RGB_TO_YCC = torch.tensor([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
], dtype=torch.float64, device="cpu")
_YCC_TO_RGB = torch.linalg.inv(_RGB_TO_YCC)


def _dct_matrix() -> torch.Tensor:
    """Orthonormal 8-point DCT-II; JPEG's forward DCT is exactly its 2-D form."""
    k = torch.arange(8, dtype=torch.float64, device="cpu")[:, None]
    n = torch.arange(8, dtype=torch.float64, device="cpu")[None, :]
    d = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d


_DCT = _dct_matrix()


# ------------------------------------------------------------------------------------------ interface
def to_tensor(x_uint8_nhwc: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 numpy (N, H, W, C) or (N, H, W) -> contiguous uint8 tensor (N, C, H, W) on ``device``."""
    x = np.asarray(x_uint8_nhwc)
    if x.dtype != np.uint8:
        raise ValueError(f"to_tensor expects uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise ValueError(f"to_tensor expects (N, H, W[, C]) with C in {{1, 3}}, got shape {x.shape}")
    # Copy to the device first and permute there: the layout change is then a device-side copy.
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).contiguous()


def preprocess_eval(x_uint8_nchw: torch.Tensor, image_size: int) -> torch.Tensor:
    """Validation/test preprocessing: bilinear resize to a square, [-1, 1], three channels."""
    _check_images(x_uint8_nchw)
    return _finalize(_resize(x_uint8_nchw.float(), image_size))


@dataclass(frozen=True)
class AugmentParams:
    """The ``ds_*`` hparams that ``augment_train`` reads, validated; absent keys mean 'off'."""

    area_range_min: float = 1.0
    aspect_ratio_range_min: float = 1.0
    flip_left_right: bool = False
    brightness_delta: float = 0.0
    contrast_delta: float = 0.0
    saturation_delta: float = 0.0
    hue_delta: float = 0.0
    quality_delta: float = 0.0

    @classmethod
    def from_hparams(cls, ds: Mapping[str, Any]) -> "AugmentParams":
        p = cls(**{f: ds[f"ds_{f}"] for f in cls.__dataclass_fields__ if f"ds_{f}" in ds})
        for name in ("area_range_min", "aspect_ratio_range_min"):
            if not 0.0 < float(getattr(p, name)) <= 1.0:
                raise ValueError(f"ds_{name} must be in (0, 1], got {getattr(p, name)}")
        for name, top in (("brightness_delta", 1.0), ("contrast_delta", 1.0), ("saturation_delta", 1.0),
                          ("hue_delta", 0.5), ("quality_delta", 0.99)):
            if not 0.0 <= float(getattr(p, name)) <= top:
                raise ValueError(f"ds_{name} must be in [0, {top}], got {getattr(p, name)}")
        return p

    @property
    def crops(self) -> bool:
        return self.area_range_min < 1.0 or self.aspect_ratio_range_min < 1.0


def augment_train(
    x_uint8_nchw: torch.Tensor,
    ds: Mapping[str, Any],
    image_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Training augmentation of one batch per docs/method.md 3.5 (see the module docstring)."""
    _check_images(x_uint8_nchw)
    p = AugmentParams.from_hparams(ds)
    b, c, h, w = x_uint8_nchw.shape
    device = x_uint8_nchw.device
    x = x_uint8_nchw.float()

    if p.quality_delta > 0:
        low = int(round(100 * (1 - p.quality_delta)))
        quality = torch.randint(low, 101, (b,), generator=generator, device="cpu")
        x = _jpeg_like(x, quality)

    flip = torch.rand(b, generator=generator, device="cpu") < 0.5 if p.flip_left_right else None
    if p.crops:
        theta = _crop_theta(b, h, w, p, generator, flip)
        grid = F.affine_grid(theta.to(device), [b, c, image_size, image_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        x = _resize(x, image_size)
        if flip is not None:
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(3), x)

    if p.brightness_delta > 0:
        delta = _uniform(b, -p.brightness_delta, p.brightness_delta, generator) * 255.0
        x = x + delta.to(device)[:, None, None, None]
    if p.contrast_delta > 0:
        factor = _uniform(b, 1 - p.contrast_delta, 1 + p.contrast_delta, generator).to(device)
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * factor[:, None, None, None] + mean
    if c == 3 and (p.saturation_delta > 0 or p.hue_delta > 0):
        x = _colour_matrix_apply(x, p, generator)
    return _finalize(x)


# ---------------------------------------------------------------------------------------- internals
def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, torch.Tensor) else ""
        raise ValueError(f"expected a uint8 tensor (B, C, H, W) with C in {{1, 3}}, got {dtype} {shape}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device="cpu")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def _finalize(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 255.0).div(127.5).sub(1.0).clamp(-1.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def _crop_theta(b: int, h: int, w: int, p: AugmentParams, generator: torch.Generator,
                flip: torch.Tensor | None) -> torch.Tensor:
    """Affine matrices (B, 2, 3) mapping output to input normalised coordinates for crop + flip."""
    k = CROP_ATTEMPTS
    cpu64 = {"dtype": torch.float64, "device": "cpu"}
    area = p.area_range_min + (1 - p.area_range_min) * torch.rand(b, k, generator=generator, **cpu64)
    lo, hi = p.aspect_ratio_range_min, 1.0 / p.aspect_ratio_range_min
    aspect = lo + (hi - lo) * torch.rand(b, k, generator=generator, **cpu64)
    box_w = torch.sqrt(area * h * w * aspect)
    box_h = torch.sqrt(area * h * w / aspect)
    fits = (box_w <= w) & (box_h <= h)
    first = torch.argmax(fits.to(torch.int8), dim=1)  # first fitting attempt (0 when none fits)
    any_fit = fits.any(dim=1)
    rows = torch.arange(b, device="cpu")
    box_w = torch.where(any_fit, box_w[rows, first], torch.full((b,), float(w), **cpu64))
    box_h = torch.where(any_fit, box_h[rows, first], torch.full((b,), float(h), **cpu64))
    offset = torch.rand(b, 2, generator=generator, **cpu64)
    x0 = offset[:, 0] * (w - box_w)
    y0 = offset[:, 1] * (h - box_h)
    # align_corners=False: normalised -1/+1 are the outer edges of the first/last pixel.
    scale_x = box_w / w
    scale_y = box_h / h
    if flip is not None:
        scale_x = torch.where(flip, -scale_x, scale_x)
    theta = torch.zeros(b, 2, 3, **cpu64)
    theta[:, 0, 0] = scale_x
    theta[:, 0, 2] = (2 * x0 + box_w) / w - 1
    theta[:, 1, 1] = scale_y
    theta[:, 1, 2] = (2 * y0 + box_h) / h - 1
    return theta.float()


def _jpeg_tables(quality: torch.Tensor) -> torch.Tensor:
    """(B, 2, 8, 8) luminance/chrominance quantisation steps for integer qualities 1..100 (IJG rule)."""
    q = quality.to(torch.float64).clamp(1, 100)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    base = torch.tensor([_JPEG_LUMA, _JPEG_CHROMA], dtype=torch.float64, device="cpu").reshape(1, 2, 8, 8)
    return torch.floor((base * scale[:, None, None, None] + 50.0) / 100.0).clamp(1.0, 255.0)


def _jpeg_like(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Blockwise DCT quantisation of float images in [0, 255] (B, C, H, W); returns rounded [0, 255]."""
    b, c, h, w = x.shape
    device = x.device
    pad_h, pad_w = (-h) % 8, (-w) % 8
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    hp, wp = x.shape[-2:]
    if c == 3:
        x = torch.einsum("ij,bjhw->bihw", _RGB_TO_YCC.to(device, torch.float32), x)
        x = torch.cat([x[:, :1] - 128.0, x[:, 1:]], dim=1)
    else:
        x = x - 128.0
    blocks = x.reshape(b, c, hp // 8, 8, wp // 8, 8).permute(0, 1, 2, 4, 3, 5)  # B C by bx 8 8
    dct = _DCT.to(device, torch.float32)
    coef = dct @ blocks @ dct.T
    tables = _jpeg_tables(quality).to(device, torch.float32)  # B 2 8 8
    step = tables[:, [0] + [1] * (c - 1)][:, :, None, None]  # channel 0 luma, others chroma
    coef = torch.round(coef / step) * step
    blocks = dct.T @ coef @ dct
    x = blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, hp, wp)
    if c == 3:
        x = torch.cat([x[:, :1] + 128.0, x[:, 1:]], dim=1)
        x = torch.einsum("ij,bjhw->bihw", _YCC_TO_RGB.to(device, torch.float32), x)
    else:
        x = x + 128.0
    return x[:, :, :h, :w].round().clamp(0.0, 255.0)


def _colour_matrix_apply(x: torch.Tensor, p: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Saturation then hue as one per-image 3x3 matrix on RGB."""
    b = x.shape[0]
    eye = torch.eye(3, dtype=torch.float64, device="cpu").expand(b, 3, 3)
    matrix = eye
    if p.saturation_delta > 0:
        f = _uniform(b, 1 - p.saturation_delta, 1 + p.saturation_delta, generator).to(torch.float64)
        # Every row of ``luma`` is the weights: luma @ rgb puts the luma value in all three channels.
        luma = torch.tensor(_LUMA_WEIGHTS, dtype=torch.float64, device="cpu").expand(3, 3)
        matrix = f[:, None, None] * eye + (1 - f)[:, None, None] * luma
    if p.hue_delta > 0:
        turns = _uniform(b, -p.hue_delta, p.hue_delta, generator).to(torch.float64)
        angle = 2 * math.pi * turns
        rot = torch.zeros(b, 3, 3, dtype=torch.float64, device="cpu")
        rot[:, 0, 0] = 1
        rot[:, 1, 1] = torch.cos(angle)
        rot[:, 1, 2] = -torch.sin(angle)
        rot[:, 2, 1] = torch.sin(angle)
        rot[:, 2, 2] = torch.cos(angle)
        matrix = (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ) @ matrix
    return torch.einsum("bij,bjhw->bihw", matrix.to(x.device, torch.float32), x)
