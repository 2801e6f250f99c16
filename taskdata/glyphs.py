"""Rendered character-classification tasks (``glyphs_<script>``): one class per letter of a script.

Why rendered: no offline handwritten data exists here for non-Latin scripts, but the machine has fonts.
A task is only useful if it is not trivially separable, so every image varies in font face and weight,
case or letter form, stroke width, size, aspect, rotation, shear, position, blur, noise and contrast.

Classes (one per letter; the variants listed are drawn with equal probability):

* ``latin``: A..Z (26), each as upper or lower case.
* ``greek``: Alpha..Omega (24), upper or lower case; sigma also as final sigma.
* ``cyrillic``: the 33 letters of the Russian alphabet (including Yo), upper or lower case.
* ``hebrew``: alef..tav (22); kaf, mem, nun, pe, tsadi also as their final forms.
* ``arabic``: the 28 letters of the Arabic alphabet, isolated forms.

Fonts: every ``.ttf``/``.otf`` under ``/usr/share/fonts`` (plus folders in ``$MUNET_FONT_DIRS``,
colon-separated) that has a real glyph for every variant of every letter of the script; a glyph that
renders like the font's .notdef box (or renders empty) counts as missing. On a stock machine that is the
22 DejaVu faces for Latin (22), Greek (22) and Cyrillic (21), 8 DejaVu Sans faces for Hebrew, 6 for
Arabic. Installing more fonts adds variety (and changes the task, so the cache key includes the font set).

Splits: per class ``TRAIN_PER_CLASS``/``VAL_PER_CLASS``/``TEST_PER_CLASS`` images, each an independent
random draw. When a script has at least 4 fonts, a quarter of them (chosen with the task seed) are held
out and used only for the test split, so test accuracy measures generalisation to unseen typefaces;
train and validation share the remaining fonts. With fewer fonts, test uses all of them.

Determinism: all randomness comes from ``numpy.random.default_rng(task_seed(name))``; the same fonts and
library versions give identical arrays. Rendering: each (font, letter form, stroke width) is drawn once
with Pillow at 64x64 (bounding box centred), then all per-image distortions run batched in torch:
one affine ``grid_sample`` to 56x56, a per-image separable Gaussian blur, 2x2 average pooling to 28x28
(anti-aliasing), contrast mapping, Gaussian noise, rounding to uint8. White ink on dark background,
like MNIST.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskdata.cache import TaskDataError

GENERATOR_VERSION = 2
TRAIN_PER_CLASS = 240
VAL_PER_CLASS = 50
TEST_PER_CLASS = 60
IMAGE_SIZE = 28
CANVAS = 64  # glyph bank resolution
FONT_PX = 40  # font size at which the bank is drawn
STROKE_WIDTHS = (0, 1, 2)  # extra outline in bank pixels: from hairline to heavy strokes


def _stroke_choices(face: "FontFace") -> tuple[int, ...]:
    # Bold faces with the widest outline blur into blobs at 28 px: that would be label noise, not variety.
    return STROKE_WIDTHS[:2] if "bold" in face.style.lower() else STROKE_WIDTHS
# The built-in tasks draw with the DejaVu family only (present on every Debian/Ubuntu machine), so a
# package that happens to install more fonts (a browser pulls in Liberation) does not change the data.
# More typefaces are opt-in: MUNET_FONT_DIRS=/usr/share/fonts (the cache key includes the font set).
FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/*.ttf",)


def _pairs(upper: str, lower: str) -> list[tuple[str, ...]]:
    return [(u, l) for u, l in zip(upper, lower, strict=True)]


_GREEK_UPPER = "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ"
_GREEK_LOWER = "αβγδεζηθικλμνξοπρστυφχψω"
_RU_UPPER = "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"
_RU_LOWER = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
_HEBREW = "אבגדהוזחטיכלמנסעפצקרשת"
_HEBREW_FINALS = {"כ": "ך", "מ": "ם", "נ": "ן", "פ": "ף", "צ": "ץ"}
_ARABIC = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"

# Script name -> classes; each class is a tuple of the letter forms drawn for it.
SCRIPTS: dict[str, list[tuple[str, ...]]] = {
    "latin": _pairs("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"),
    "greek": [cls + ("ς",) if cls[1] == "σ" else cls for cls in _pairs(_GREEK_UPPER, _GREEK_LOWER)],
    "cyrillic": _pairs(_RU_UPPER, _RU_LOWER),
    "hebrew": [(c, _HEBREW_FINALS[c]) if c in _HEBREW_FINALS else (c,) for c in _HEBREW],
    "arabic": [(c,) for c in _ARABIC],
}


@dataclass(frozen=True)
class FontFace:
    path: str
    family: str
    style: str


def _candidate_font_paths() -> list[str]:
    patterns = list(FONT_GLOBS)
    for folder in filter(None, os.environ.get("MUNET_FONT_DIRS", "").split(os.pathsep)):
        patterns += [os.path.join(folder, "**", "*.ttf"), os.path.join(folder, "**", "*.otf")]
    found = {os.path.realpath(p) for pat in patterns for p in glob.glob(pat, recursive=True)}
    # Sort by file name (then path) so the order, and therefore the data, does not depend on where the
    # distribution happens to install fonts.
    return sorted(found, key=lambda p: (os.path.basename(p), p))


def _has_all_glyphs(font, letters: list[str]) -> bool:
    notdef = font.getmask("\U0010fffd")  # a private-use code point no text font maps
    notdef_key = (notdef.size, bytes(notdef))
    for ch in letters:
        mask = font.getmask(ch)
        if mask.size[0] == 0 or mask.size[1] == 0 or (mask.size, bytes(mask)) == notdef_key:
            return False
        if not any(bytes(mask)):
            return False
    return True


def fonts_for_script(script: str) -> list[FontFace]:
    """Fonts on this machine that can draw every letter form of ``script``."""
    from PIL import ImageFont

    letters = [form for cls in SCRIPTS[script] for form in cls]
    usable = []
    for path in _candidate_font_paths():
        try:
            font = ImageFont.truetype(path, FONT_PX, layout_engine=ImageFont.Layout.BASIC)
        except OSError:
            continue
        if _has_all_glyphs(font, letters):
            family, style = font.getname()
            usable.append(FontFace(path, family or Path(path).stem, style or ""))
    return usable


def glyph_cache_key(script: str, fonts: list[FontFace]) -> str:
    """Short digest of everything that determines the arrays, used in the cache file name."""
    desc = {
        "version": GENERATOR_VERSION,
        "script": script,
        "per_class": [TRAIN_PER_CLASS, VAL_PER_CLASS, TEST_PER_CLASS],
        "fonts": [(os.path.basename(f.path), os.path.getsize(f.path)) for f in fonts],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]


def describe_fonts(fonts: list[FontFace]) -> str:
    families = sorted({f.family for f in fonts})
    return f"{len(fonts)} local fonts ({', '.join(families)})"


@dataclass
class _GlyphBank:
    images: np.ndarray  # uint8 [N, CANVAS, CANVAS], glyph centred by its bounding box
    extent: np.ndarray  # float [N], the larger side of the glyph's bounding box in canvas pixels
    index: dict  # (font id, class id, form id, stroke id) -> row
    strokes_per_font: np.ndarray  # int [fonts], how many stroke widths each font was drawn with


def _render_bank(fonts: list[FontFace], classes: list[tuple[str, ...]]) -> _GlyphBank:
    """Draw every (font, class, form, stroke) once."""
    from PIL import Image, ImageDraw, ImageFont

    images, extents, index = [], [], {}
    for fi, face in enumerate(fonts):
        font = ImageFont.truetype(face.path, FONT_PX, layout_engine=ImageFont.Layout.BASIC)
        for ci, forms in enumerate(classes):
            for vi, ch in enumerate(forms):
                for si, stroke in enumerate(_stroke_choices(face)):
                    img = Image.new("L", (CANVAS, CANVAS), 0)
                    draw = ImageDraw.Draw(img)
                    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font, stroke_width=stroke)
                    origin = ((CANVAS - (right - left)) / 2 - left, (CANVAS - (bottom - top)) / 2 - top)
                    draw.text(origin, ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
                    index[(fi, ci, vi, si)] = len(images)
                    images.append(np.asarray(img))
                    extents.append(max(right - left, bottom - top))
    strokes = np.array([len(_stroke_choices(face)) for face in fonts], dtype=np.int64)
    return _GlyphBank(np.stack(images), np.asarray(extents, dtype=np.float64), index, strokes)


@dataclass
class _Draws:
    """Per-image random parameters of one split (all numpy, drawn in a fixed order)."""

    labels: np.ndarray
    bank_idx: np.ndarray
    theta: np.ndarray  # [N, 2, 3] affine from output to bank normalised coordinates
    blur_sigma: np.ndarray  # in output (28 px) pixels
    background: np.ndarray
    foreground: np.ndarray
    noise_std: np.ndarray


def _draw_split(rng: np.random.Generator, classes, font_ids, per_class, bank: _GlyphBank) -> _Draws:
    n_classes = len(classes)
    labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
    n = len(labels)
    font_pick = rng.choice(np.asarray(font_ids), size=n)
    form_u = rng.random(n)
    stroke_u = rng.random(n)
    bank_idx = np.array([
        bank.index[(int(f), int(c), int(u * len(classes[c])), int(v * bank.strokes_per_font[f]))]
        for f, c, u, v in zip(font_pick, labels, form_u, stroke_u)
    ], dtype=np.int64)

    return _distortions(rng, labels, bank_idx, bank.extent[bank_idx])


def _distortions(rng: np.random.Generator, labels: np.ndarray, bank_idx: np.ndarray,
                 extent: np.ndarray) -> _Draws:
    """Per-image geometry and photometry for images already assigned a bank row (fixed draw order)."""
    n = len(labels)
    # Geometry. A capital's height is ~29 px of the 64 px bank canvas; zoom so it spans ~18 of 28 px,
    # which keeps natural size differences (x vs X). Tall or wide glyphs (Arabic alef, Hebrew lamed,
    # Cyrillic shcha) are zoomed less so that their larger side fits in ~22 px and is not cut off.
    zoom = np.minimum((18.0 / IMAGE_SIZE) / (29.0 / CANVAS),
                      (22.0 / IMAGE_SIZE) / (extent / CANVAS))[:, None, None]
    scale = rng.uniform(0.8, 1.2, n)
    aspect = np.exp(rng.uniform(-0.12, 0.12, n))
    angle = np.deg2rad(rng.uniform(-15.0, 15.0, n))
    shear = rng.uniform(-0.3, 0.3, n)
    shift = rng.uniform(-0.12, 0.12, (n, 2))  # normalised units: about +-1.7 output pixels
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shr = np.zeros((n, 2, 2)); shr[:, 0, 0] = 1; shr[:, 1, 1] = 1; shr[:, 0, 1] = shear
    scl = np.zeros((n, 2, 2)); scl[:, 0, 0] = scale * aspect; scl[:, 1, 1] = scale / aspect
    forward = zoom * rot @ shr @ scl  # bank -> output
    inverse = np.linalg.inv(forward)
    theta = np.concatenate([inverse, -(inverse @ shift[:, :, None])], axis=2)

    return _Draws(
        labels=labels.astype(np.int64),
        bank_idx=bank_idx,
        theta=theta,
        blur_sigma=rng.uniform(0.0, 1.0, n),
        background=rng.uniform(0.0, 0.2, n),
        foreground=rng.uniform(0.65, 1.0, n),
        noise_std=rng.uniform(0.0, 0.06, n),
    )


def _gaussian_kernels(sigma, radius: int):
    import torch

    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device="cpu")
    sigma = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (taps[None, :] / sigma) ** 2)
    return k / k.sum(dim=1, keepdim=True)  # sigma ~ 0 gives a unit impulse


def _synthesize(bank: _GlyphBank, draws: _Draws, rng: np.random.Generator, chunk: int = 2048) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    out = np.empty((len(draws.labels), IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
    bank_t = torch.from_numpy(bank.images)
    hi = 2 * IMAGE_SIZE
    radius = 6
    # Pixel centres in normalised coordinates (align_corners=False); base rows are (x, y, 1) per pixel.
    centres = (2 * torch.arange(hi, dtype=torch.float32, device="cpu") + 1) / hi - 1
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    base = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.ones(hi * hi, device="cpu")], dim=1)
    for start in range(0, len(draws.labels), chunk):
        sl = slice(start, start + chunk)
        b = len(draws.labels[sl])
        ink = bank_t[torch.from_numpy(draws.bank_idx[sl])].float().div_(255.0)[:, None]
        theta = torch.from_numpy(draws.theta[sl]).float()
        # Same grid as F.affine_grid(align_corners=False), computed as one (pixels x 3) @ (3 x 2B) product,
        # which is several times faster on CPU than affine_grid's batched kernel.
        grid = torch.einsum("pk,bjk->bpj", base, theta).reshape(b, hi, hi, 2)
        ink = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Per-image separable blur: images become channels of one grouped convolution.
        k = _gaussian_kernels(torch.from_numpy(2.0 * draws.blur_sigma[sl]).float(), radius)
        ink = ink.reshape(1, b, hi, hi)
        ink = F.conv2d(F.pad(ink, (radius, radius, 0, 0)), k[:, None, None, :], groups=b)
        ink = F.conv2d(F.pad(ink, (0, 0, radius, radius)), k[:, None, :, None], groups=b)
        ink = F.avg_pool2d(ink.reshape(b, 1, hi, hi), 2)[:, 0]
        bg = torch.from_numpy(draws.background[sl]).float()[:, None, None]
        fg = torch.from_numpy(draws.foreground[sl]).float()[:, None, None]
        img = bg + (fg - bg) * ink.clamp(0.0, 1.0)
        noise = rng.standard_normal((b, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        img = img + torch.from_numpy(noise) * torch.from_numpy(draws.noise_std[sl]).float()[:, None, None]
        out[sl, :, :, 0] = img.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).numpy()
    return out


def _held_out_ids(rng: np.random.Generator, n_fonts: int) -> list[int]:
    """Font ids reserved for the test split: a seeded quarter when there are at least 4 fonts.

    This is the first draw from the task's generator, so it can be recomputed without rendering.
    """
    order = rng.permutation(n_fonts)
    n_held = n_fonts // 4 if n_fonts >= 4 else 0
    return sorted(order[:n_held].tolist())


def held_out_fonts(fonts: list[FontFace], seed: int) -> list[FontFace]:
    return [fonts[i] for i in _held_out_ids(np.random.default_rng(seed), len(fonts))]


@dataclass
class GlyphTask:
    arrays: dict[str, np.ndarray]
    fonts: list[FontFace]
    held_out_fonts: list[FontFace]
    class_names: list[str]


def render_script_task(
    script: str,
    seed: int,
    fonts: list[FontFace] | None = None,
    per_class: tuple[int, int, int] = (TRAIN_PER_CLASS, VAL_PER_CLASS, TEST_PER_CLASS),
) -> GlyphTask:
    """Render the train/val/test arrays of one script's task (deterministic given seed, fonts, sizes).

    ``per_class`` (train, val, test images per class) exists for quick checks; the registered tasks
    always use the module defaults.
    """
    if script not in SCRIPTS:
        raise TaskDataError(f"unknown glyph script {script!r}; known: {', '.join(sorted(SCRIPTS))}")
    classes = SCRIPTS[script]
    fonts = fonts_for_script(script) if fonts is None else fonts
    if not fonts:
        raise TaskDataError(
            f"no installed font draws every {script} letter; install one (e.g. apt-get install "
            f"fonts-dejavu-core) or point MUNET_FONT_DIRS at a folder of .ttf files"
        )
    rng = np.random.default_rng(seed)
    held = _held_out_ids(rng, len(fonts))
    test_ids = held if held else list(range(len(fonts)))
    train_ids = [i for i in range(len(fonts)) if i not in held]

    bank = _render_bank(fonts, classes)
    arrays: dict[str, np.ndarray] = {}
    for split, ids, count in zip(("train", "val", "test"), (train_ids, train_ids, test_ids), per_class):
        draws = _draw_split(rng, classes, ids, count, bank)
        arrays[f"{split}_x"] = _synthesize(bank, draws, rng)
        arrays[f"{split}_y"] = draws.labels
    return GlyphTask(
        arrays=arrays,
        fonts=fonts,
        held_out_fonts=[fonts[i] for i in held],
        class_names=["/".join(forms) for forms in classes],
    )
