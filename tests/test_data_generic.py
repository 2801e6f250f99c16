"""User data sources (folder:, npz:) and the restricted unpickler, on files the tests write."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import agents  # noqa: F401
from taskdata import TaskDataError, load_task
from taskdata.safe_pickle import load_numpy_pickle


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _grey(rng, h=12, w=12):
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- folder
def test_folder_of_class_folders_splits_deterministically(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        for i in range(20):
            _write_png(tmp_path / "pets" / cls / f"{i:02d}.png", _grey(rng))
    (tmp_path / "pets" / "dog" / ".DS_Store").write_bytes(b"hidden files are skipped")
    name = f"folder:{tmp_path / 'pets'}"
    data = load_task(name)
    assert data.num_classes == 3 and data.class_names == ["cat", "dog", "eel"]
    assert data.image_shape == (12, 12, 1) and sum(data.sizes().values()) == 60
    assert data.sizes() == {"train": 41, "val": 7, "test": 12}  # 20% test, 15% of the rest val
    assert data.synthetic is False and str(tmp_path / "pets") in data.source
    again = load_task(name)
    np.testing.assert_array_equal(data.test_x, again.test_x)
    np.testing.assert_array_equal(data.train_y, again.train_y)
    rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}  # noqa: E731
    assert not (rows(data.train_x) & rows(data.test_x)) and not (rows(data.val_x) & rows(data.test_x))
    # Labels follow the folders: every image of class "dog" is found under dog/.
    dog_images = {np.asarray(Image.open(p)).tobytes() for p in (tmp_path / "pets" / "dog").glob("*.png")}
    all_x = np.concatenate([data.train_x, data.val_x, data.test_x])[..., 0]
    all_y = np.concatenate([data.train_y, data.val_y, data.test_y])
    assert {x.tobytes() for x in all_x[all_y == 1]} == dog_images


def test_folder_colour_and_size_rules(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "mixed"
    for i in range(4):
        _write_png(root / "a" / f"{i}.png", _grey(rng, 10, 10))
        _write_png(root / "b" / f"{i}.png", _grey(rng, 10, 10))
    # One colour image of another size: everything becomes RGB at the most common size (10x10).
    colour = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    _write_png(root / "b" / "colour.png", colour)
    data = load_task(f"folder:{root}")
    assert data.image_shape == (10, 10, 3)
    grey_rgb = np.concatenate([data.train_x, data.val_x, data.test_x])
    is_grey = [(im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all() for im in grey_rgb]
    assert sum(not g for g in is_grey) == 1, "only the colour image has distinct channels"


def test_folder_with_official_splits(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "split"
    for split, n in (("train", 10), ("test", 3)):
        for cls in ("x", "y"):
            for i in range(n):
                _write_png(root / split / cls / f"{i}.png", _grey(rng, 8, 8))
    data = load_task(f"folder:{root}")
    assert data.class_names == ["x", "y"]
    assert data.sizes() == {"train": 17, "val": 3, "test": 6}  # val carved from train (15%)


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(TaskDataError, match="is not a directory"):
        load_task(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    _write_png(tmp_path / "one" / "only" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(TaskDataError, match="at least 2"):
        load_task(f"folder:{tmp_path / 'one'}")
    for cls in ("p", "q"):
        _write_png(tmp_path / "bad" / cls / "ok.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad" / "q" / "notes.txt").write_text("not an image")
    with pytest.raises(TaskDataError) as info:
        load_task(f"folder:{tmp_path / 'bad'}")
    assert "notes.txt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TaskDataError, match="has no path"):
        load_task("folder:")


# ------------------------------------------------------------------------------------------------ npz
def test_npz_with_and_without_validation(tmp_path):
    rng = np.random.default_rng(3)
    x_train = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8)
    y_train = np.arange(40) % 4
    x_test = rng.integers(0, 256, (8, 6, 6), dtype=np.uint8)
    y_test = np.arange(8) % 4
    np.savez(tmp_path / "plain.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    data = load_task(f"npz:{tmp_path / 'plain.npz'}")
    assert data.num_classes == 4 and data.image_shape == (6, 6, 1)
    assert data.sizes() == {"train": 34, "val": 6, "test": 8}
    np.testing.assert_array_equal(data.test_x[..., 0], x_test)  # the official test split is kept as is
    assert data.train_y.dtype == np.int64
    train_and_val = {r.tobytes() for r in np.concatenate([data.train_x, data.val_x])[..., 0]}
    assert train_and_val == {r.tobytes() for r in x_train}

    x_val = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "val.npz", x_train=np.repeat(x_train[..., None], 3, -1), y_train=y_train,
             x_test=np.repeat(x_test[..., None], 3, -1), y_test=y_test, x_val=x_val, y_val=np.array([0, 1, 2, 3, 9]))
    data = load_task(f"npz:{tmp_path / 'val.npz'}")
    assert data.num_classes == 10 and data.image_shape == (6, 6, 3)
    np.testing.assert_array_equal(data.val_x, x_val)


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.arange(4)}, "lacks"),
    ({"x_train": np.zeros((4, 5, 5), np.float32), "y_train": np.arange(4),
      "x_test": np.zeros((2, 5, 5), np.float32), "y_test": np.arange(2)}, "dtype float32"),
    ({"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.arange(3),
      "x_test": np.zeros((2, 5, 5), np.uint8), "y_test": np.arange(2)}, "y_train has shape"),
    ({"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.arange(4),
      "x_test": np.zeros((2, 6, 6), np.uint8), "y_test": np.arange(2)}, "image shapes differ"),
    ({"x_train": np.zeros((4, 5, 5, 2), np.uint8), "y_train": np.arange(4),
      "x_test": np.zeros((2, 5, 5, 2), np.uint8), "y_test": np.arange(2)}, "C in"),
    ({"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": -np.arange(4),
      "x_test": np.zeros((2, 5, 5), np.uint8), "y_test": np.arange(2)}, "negative labels"),
    ({"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.arange(4), "x_val": np.zeros((1, 5, 5), np.uint8),
      "x_test": np.zeros((2, 5, 5), np.uint8), "y_test": np.arange(2)}, "x_val/y_val"),
])
def test_malformed_npz_is_a_clear_error(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(TaskDataError, match=message) as info:
        load_task(f"npz:{path}")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_npz_that_is_not_an_archive_or_holds_pickles(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"definitely not a zip")
    with pytest.raises(TaskDataError, match="cannot read"):
        load_task(f"npz:{junk}")
    pickled = tmp_path / "objects.npz"
    objects = np.empty(2, dtype=object)
    objects[:] = [np.zeros(3), np.zeros(4)]
    np.savez(pickled, x_train=objects, y_train=np.arange(2), x_test=objects, y_test=np.arange(2))
    with pytest.raises(TaskDataError, match="without pickles"):
        load_task(f"npz:{pickled}")
    with pytest.raises(TaskDataError, match="does not exist"):
        load_task(f"npz:{tmp_path / 'absent.npz'}")


# ----------------------------------------------------------------------------------- restricted pickle
class _Exploit:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_restricted_unpickler_refuses_forbidden_globals(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(str(target)))
    with pytest.raises(TaskDataError, match="forbidden global (posix|os|nt).mkdir"):
        load_numpy_pickle(payload)
    assert not target.exists(), "the forbidden callable must never run"
    # A forbidden global hidden inside an otherwise valid array pickle is refused too.
    nested = pickle.dumps([np.arange(3), _Exploit(str(target))])
    with pytest.raises(TaskDataError, match="forbidden global"):
        load_numpy_pickle(nested)
    assert not target.exists()


def test_restricted_unpickler_reads_numpy_arrays():
    for array in (np.arange(12, dtype=np.int64), np.full((3, 4, 4), 7, np.uint8)):
        for protocol in (2, 4, 5):
            out = load_numpy_pickle(pickle.dumps(array, protocol=protocol))
            np.testing.assert_array_equal(out, array)
            assert out.dtype == array.dtype
    with pytest.raises(TaskDataError, match="expected a numeric numpy array"):
        load_numpy_pickle(pickle.dumps({"a": 1}))
    with pytest.raises(TaskDataError, match="cannot read numpy pickle"):
        load_numpy_pickle(gzip.compress(b"garbage"))


@pytest.mark.parametrize("splits, how", [
    (("train",), "split 80/10/10"),
    (("train", "val"), "test carved from train/"),
    (("train", "test"), "val carved from train/"),
    (("train", "val", "test"), "as given"),
])
def test_every_imagefolder_layout_is_read_and_says_how_it_was_split(tmp_path, splits, how):
    from PIL import Image

    root = tmp_path / "shapes"
    for split in splits:
        for c, cls in enumerate(("circle", "square", "star")):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.new("L", (12, 12), 40 * c + i).save(root / split / cls / f"{i}.png")
    data = load_task(f"shapes=folder:{root}")
    assert data.num_classes == 3 and data.class_names == ["circle", "square", "star"]  # not train/val
    assert min(len(data.train_x), len(data.val_x), len(data.test_x)) >= 1
    assert how in data.source
    given = {s: 18 for s in splits}
    if "val" in given:
        assert len(data.val_x) == 18
    if "test" in given:
        assert len(data.test_x) == 18
    assert len(data.train_x) + len(data.val_x) + len(data.test_x) == 18 * len(splits)
