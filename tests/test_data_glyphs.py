"""Rendered glyph tasks: font coverage, determinism, real variation, learnable but not trivial."""
from __future__ import annotations

import os

import numpy as np
import pytest

import agents  # noqa: F401
from taskdata import load_task
from taskdata import glyphs

DEJAVU = "/usr/share/fonts/truetype/dejavu"
needs_dejavu = pytest.mark.skipif(not os.path.isdir(DEJAVU), reason="DejaVu fonts not installed")


def _nearest_centroid_accuracy(train_x, train_y, x, y, num_classes) -> float:
    flat = train_x.reshape(len(train_x), -1).astype(np.float32) / 255.0
    centroids = np.stack([flat[train_y == c].mean(axis=0) for c in range(num_classes)])
    probe = x.reshape(len(x), -1).astype(np.float32) / 255.0
    dist = (probe**2).sum(1)[:, None] - 2 * probe @ centroids.T + (centroids**2).sum(1)[None, :]
    return float((dist.argmin(axis=1) == y).mean())


def test_script_classes_are_the_alphabets():
    assert len(glyphs.SCRIPTS["latin"]) == 26
    assert len(glyphs.SCRIPTS["greek"]) == 24
    assert len(glyphs.SCRIPTS["cyrillic"]) == 33
    assert len(glyphs.SCRIPTS["hebrew"]) == 22
    assert len(glyphs.SCRIPTS["arabic"]) == 28
    assert ("Σ", "σ", "ς") in glyphs.SCRIPTS["greek"]
    assert ("מ", "ם") in glyphs.SCRIPTS["hebrew"]
    for forms in (f for classes in glyphs.SCRIPTS.values() for f in classes):
        assert len(set(forms)) == len(forms)
    letters = [ch for classes in glyphs.SCRIPTS.values() for forms in classes for ch in forms]
    assert len(letters) == len(set(letters)), "a letter form belongs to one class of one script"


@needs_dejavu
def test_font_coverage_skips_fonts_without_the_glyphs():
    hebrew = {os.path.basename(f.path) for f in glyphs.fonts_for_script("hebrew")}
    latin = {os.path.basename(f.path) for f in glyphs.fonts_for_script("latin")}
    assert "DejaVuSans.ttf" in hebrew and "DejaVuSans-Bold.ttf" in hebrew
    assert "DejaVuSerif.ttf" not in hebrew and "DejaVuSansMono.ttf" not in hebrew  # no Hebrew in these
    assert "DejaVuSerif.ttf" in latin and len(latin) >= 20
    assert hebrew < latin


@needs_dejavu
def test_rendering_is_deterministic_and_seed_dependent():
    fonts = glyphs.fonts_for_script("hebrew")
    small = (12, 3, 3)
    a = glyphs.render_script_task("hebrew", seed=7, fonts=fonts, per_class=small)
    b = glyphs.render_script_task("hebrew", seed=7, fonts=fonts, per_class=small)
    c = glyphs.render_script_task("hebrew", seed=8, fonts=fonts, per_class=small)
    assert a.arrays["train_x"].shape == (22 * 12, 28, 28, 1)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    assert not np.array_equal(a.arrays["train_x"], c.arrays["train_x"])
    assert not np.array_equal(a.arrays["train_y"], c.arrays["train_y"])


@needs_dejavu
def test_cached_task_equals_a_fresh_render():
    data = load_task("glyphs_hebrew")
    fresh = glyphs.render_script_task("hebrew", glyphs_seed("glyphs_hebrew"))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(fresh.arrays[f"{split}_x"], getattr(data, f"{split}_x"))
        np.testing.assert_array_equal(fresh.arrays[f"{split}_y"], getattr(data, f"{split}_y"))


@needs_dejavu
def test_glyph_task_shapes_splits_and_held_out_fonts():
    data = load_task("glyphs_greek")
    n = len(glyphs.SCRIPTS["greek"])
    assert data.synthetic is True and "rendered" in data.source and data.num_classes == n
    assert data.image_shape == (28, 28, 1)
    assert data.sizes() == {"train": n * glyphs.TRAIN_PER_CLASS, "val": n * glyphs.VAL_PER_CLASS,
                            "test": n * glyphs.TEST_PER_CLASS}
    for split in ("train", "val", "test"):
        counts = np.bincount(getattr(data, f"{split}_y"), minlength=n)
        assert (counts == counts[0]).all(), "classes are balanced in every split"
    assert data.class_names[0] == "Α/α"
    held = glyphs.held_out_fonts(glyphs.fonts_for_script("greek"), seed=glyphs_seed("glyphs_greek"))
    assert len(held) >= 4 and "held-out fonts" in data.source
    assert all(os.path.basename(f.path) in data.source for f in held)


def glyphs_seed(name: str) -> int:
    from taskdata.splits import task_seed

    return task_seed(name)


@needs_dejavu
@pytest.mark.parametrize("name", ["glyphs_latin", "glyphs_cyrillic", "glyphs_hebrew"])
def test_glyph_tasks_are_varied_and_learnable_but_not_trivial(name):
    data = load_task(name)
    chance = 1.0 / data.num_classes
    # Images of one class really differ: nearly all distinct, and far from their class mean.
    for c in (0, data.num_classes - 1):
        imgs = data.train_x[data.train_y == c].reshape(-1, 28 * 28).astype(np.float32)
        assert len({row.tobytes() for row in imgs.astype(np.uint8)}) == len(imgs)
        assert np.abs(imgs - imgs.mean(0)).mean() > 15.0
    # Background/foreground levels vary (contrast jitter) and noise is present.
    assert np.std(data.train_x[:, 0, 0, 0].astype(np.float32)) > 5.0
    val_acc = _nearest_centroid_accuracy(data.train_x, data.train_y, data.val_x, data.val_y, data.num_classes)
    test_acc = _nearest_centroid_accuracy(data.train_x, data.train_y, data.test_x, data.test_y, data.num_classes)
    assert 4 * chance < val_acc < 0.9, val_acc
    assert 3 * chance < test_acc < 0.9, test_acc


@needs_dejavu
def test_optional_arabic_script_renders():
    data = load_task("glyphs_arabic")
    assert data.num_classes == 28 and data.train_x.shape[1:] == (28, 28, 1)


def test_no_usable_font_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(glyphs, "FONT_GLOBS", ())
    monkeypatch.delenv("MUNET_FONT_DIRS", raising=False)
    from taskdata import TaskDataError

    with pytest.raises(TaskDataError, match="no installed font draws every hebrew letter"):
        load_task("glyphs_hebrew")
