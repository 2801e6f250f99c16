"""Images out of HTTP request bodies, with limits checked before anything large is decoded.

Accepted: PNG or JPEG bytes (a multipart upload, base64 strings in JSON, or a raw ``image/*`` body)
and a NumPy ``.npy`` array (uint8, (H, W), (H, W, C) or (N, H, W[, C]) with C in 1, 3, 4). Every
image becomes a uint8 array (H, W, C) with C in {1, 3}: RGBA loses its alpha, palette and other modes
are converted to RGB, greyscale stays one channel (the models' preprocessing makes three of it).

A bad input raises ``InputError`` with one message meant for the client (HTTP 400, or 413 for a
limit). An image's size is read from its header and checked before its pixels are decoded, and an
.npy header's shape is checked against the bytes that follow it, so a small body cannot claim a huge
allocation.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np

FORMATS = ("PNG", "JPEG")


class InputError(ValueError):
    """A request body this server will not read; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 256
    max_side: int = 2048           # pixels on either side of one image
    max_pixels: int = 4096 * 4096  # pixels in one request, all images together

    def check_count(self, n: int) -> None:
        if n == 0:
            raise InputError("no image in the request")
        if n > self.max_images:
            raise InputError(f"{n} images in one request; the limit is {self.max_images}", 413)

    def check_size(self, h: int, w: int, what: str) -> None:
        if h < 1 or w < 1:
            raise InputError(f"{what}: empty image ({h}x{w})")
        if h > self.max_side or w > self.max_side:
            raise InputError(f"{what}: {w}x{h} pixels; the limit is {self.max_side} on a side", 413)


def _channels(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def open_image(data: bytes, limits: Limits, what: str = "image"):
    """PNG or JPEG bytes -> a lazily decoded Pillow image whose size (from its header) is checked."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own bound, far above ours: refused from the header
        raise InputError(f"{what}: far too many pixels; the limit is {limits.max_side} on a side", 413) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(f"{what}: not a PNG or JPEG image") from None
    if img.format not in FORMATS:
        raise InputError(f"{what}: {img.format} images are not accepted (PNG or JPEG)")
    w, h = img.size
    limits.check_size(h, w, what)  # from the header, before a pixel is decoded
    return img


def to_array(img, what: str = "image") -> np.ndarray:
    """Decode an ``open_image`` result -> uint8 (H, W, C), C in {1, 3}."""
    from PIL import Image

    try:
        if img.mode in ("L", "I;16", "I", "F", "1"):
            img = img.convert("L")
        elif img.mode != "RGB":
            img = img.convert("RGB")
        return _channels(np.asarray(img, dtype=np.uint8))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{what}: cannot be decoded ({exc})") from None


def decode_images(files: list[tuple[bytes, str]], limits: Limits) -> list[np.ndarray]:
    """Encoded images (bytes, name for messages) -> arrays: every header and the request's pixel
    total are checked before any image is decoded (a few KB of PNG can claim gigabytes)."""
    limits.check_count(len(files))
    opened = [open_image(data, limits, what) for data, what in files]
    check_pixels(sum(img.size[0] * img.size[1] for img in opened), limits)
    return [to_array(img, what) for img, (_, what) in zip(opened, files)]


def from_base64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise InputError(f"{what}: expected a base64 string, got {type(text).__name__}")
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]  # a data URL
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: not valid base64") from None


def decode_npy(data: bytes, limits: Limits) -> list[np.ndarray]:
    """An .npy array of uint8 images -> a list of (H, W, C) arrays. (H, W) is one greyscale image;
    (H, W, C) one image when C is 1, 3 or 4, else a stack (N, H, W); (N, H, W, C) a stack."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
    except (ValueError, OSError, SyntaxError):
        raise InputError("not a .npy array (bad header)") from None
    if dtype != np.uint8:
        raise InputError(f".npy array of {dtype}: images must be uint8 (0-255)")
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if expected != len(data) - fp.tell():
        raise InputError(f".npy header says shape {shape} ({expected} bytes), the body holds "
                         f"{len(data) - fp.tell()} bytes after it")
    if any(int(d) < 0 for d in shape):
        raise InputError(f".npy shape {shape}: dimensions cannot be negative")
    stack = len(shape) == 4 or (len(shape) == 3 and shape[-1] not in (1, 3, 4))
    if len(shape) not in (2, 3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
        raise InputError(f".npy shape {shape}: expected (H, W), (H, W, C) or (N, H, W[, C]) with C "
                         "in 1, 3, 4")
    if stack:
        limits.check_count(shape[0])
    for i in range(shape[0] if stack else 1):
        hw = shape[1:3] if stack else shape[:2]
        limits.check_size(int(hw[0]), int(hw[1]), f"image {i}")
    try:
        arr = np.frombuffer(data, dtype=np.uint8, offset=fp.tell()).reshape(shape, order="F" if fortran else "C")
    except ValueError as exc:
        raise InputError(f".npy shape {shape}: {exc}") from None
    images = [_channels(a) for a in arr] if stack else [_channels(arr)]
    check_pixels(sum(a.shape[0] * a.shape[1] for a in images), limits)
    return images


def check_pixels(total: int, limits: Limits) -> None:
    if total > limits.max_pixels:
        raise InputError(f"{total} pixels in one request; the limit is {limits.max_pixels}", 413)
