"""User data: ``folder:PATH`` (one sub-folder per class) and ``npz:PATH`` (numpy arrays).

These are how a user's own tasks enter the swarm, so the rules are strict and every violation is a
``TaskDataError`` with one line naming the file and the fix.

``folder:PATH``
    Either ``PATH/<class>/<image>`` (then the seeded three-way split of ``splits.py`` applies), or
    the ImageFolder layouts with ``PATH/train/<class>/...``: ``train/`` alone (split three ways like
    class folders), ``train/`` + ``val/`` (test carved from ``train``), ``train/`` + ``test/`` (a
    validation slice carved from ``train``), or ``train/`` + ``val/`` + ``test/`` (used as given). Classes are the
    sub-folder names in sorted order (label = position), the union over the splits. Images are read
    with Pillow (any format it opens; files that are not images are an error, hidden files are
    skipped). Colour rule: if any image has colour (channels that differ anywhere), all are RGB
    (C=3); otherwise all are grey (C=1). Size rule: if sizes differ, every image is resized (bilinear)
    to the most common size; ties go to the largest area. 16-bit and float images are scaled to 8 bit.

``npz:PATH``
    Arrays ``x_train, y_train, x_test, y_test`` and optionally ``x_val, y_val``; x is uint8 with shape
    (N, H, W) or (N, H, W, C), C in {1, 3}; y holds non-negative integers. Without a validation pair,
    a validation slice is carved from train. ``num_classes`` = the largest label + 1, at most
    ``MAX_CLASSES`` (10,000), and every test label must occur in training. Pickled (object) arrays are
    refused: the file is opened with ``allow_pickle=False``; each array's header is checked against its
    bytes before numpy allocates anything.

Seeds for carving come from the task name's base name (``folder:`` / ``npz:`` plus the last path
component), so the same data in another directory splits the same way.
"""
from __future__ import annotations

import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskdata.cache import TaskDataError
from taskdata.splits import apply_three_way, task_seed, train_val_split

SPLIT_DIRS = ("train", "val", "test")
# A head of this many classes on a ViT-B is 31 MB; far beyond it is a labelling mistake (a label of
# 10**6 would build a 768 MB head and kill the agent). Checked before anything is written to a store.
MAX_CLASSES = 10_000
MAX_IMAGE_SIDE = 4096  # a folder image larger than this on a side is refused from its header


@dataclass
class GenericData:
    arrays: dict[str, np.ndarray]
    num_classes: int
    class_names: list[str] | None
    splits: str = ""  # how the train/val/test splits were made, for the line a user reads


def _generic_seed(kind: str, path: Path) -> int:
    return task_seed(f"{kind}:{path.resolve().name}")


# --------------------------------------------------------------------------------------------- folder
def _list_images(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image(path: Path) -> np.ndarray:
    """HxWxC uint8 array (C = 1 or 3) from any image Pillow can open."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if max(img.size) > MAX_IMAGE_SIDE or min(img.size) < 1:  # from the header: nothing decoded
                raise TaskDataError(f"image {path} is {img.size[0]}x{img.size[1]} pixels; folder: tasks "
                                    f"take images from 1 to {MAX_IMAGE_SIDE} pixels on a side")
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode.startswith("I") else max(float(arr.max()), 1.0)
                return np.rint(arr.clip(0, peak) * (255.0 / peak)).astype(np.uint8)[:, :, None]
            if img.mode in ("1", "L", "LA"):
                return np.asarray(img.convert("L"))[:, :, None]
            return np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError:
        raise TaskDataError(f"image {path} has far too many pixels (a decompression bomb?); folder: "
                            f"tasks take images up to {MAX_IMAGE_SIDE} pixels on a side") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise TaskDataError(f"cannot read image {path} ({exc}); folder: tasks need only image files "
                            "inside the class folders") from None


def _common_size(images: list[np.ndarray]) -> tuple[int, int]:
    counts = Counter(im.shape[:2] for im in images)
    return max(counts, key=lambda hw: (counts[hw], hw[0] * hw[1], hw))


def _to_uniform(images: list[np.ndarray]) -> np.ndarray:
    """Apply the colour and size rules and stack to N x H x W x C."""
    from PIL import Image

    colour = any(im.shape[2] == 3 and not (np.array_equal(im[..., 0], im[..., 1])
                                           and np.array_equal(im[..., 1], im[..., 2])) for im in images)
    size = _common_size(images)
    out = []
    for im in images:
        if colour and im.shape[2] == 1:
            im = np.repeat(im, 3, axis=2)
        elif not colour and im.shape[2] == 3:
            im = im[..., :1]  # all channels are equal: keep one
        if im.shape[:2] != size:
            pil = Image.fromarray(im[..., 0] if im.shape[2] == 1 else im)
            im = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BILINEAR))
            im = im[:, :, None] if im.ndim == 2 else im
        out.append(im)
    return np.stack(out)


def load_folder(path_text: str) -> GenericData:
    root = Path(path_text).expanduser()
    if not root.is_dir():
        raise TaskDataError(f"folder task path {root} is not a directory; give folder:PATH with one "
                            "sub-folder of images per class")
    split_roots = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
    # A train/ folder means the ImageFolder layouts (train/ alone, train/+val/, train/+test/,
    # train/+val/+test/); otherwise every sub-folder is a class.
    layout = split_roots if "train" in split_roots else {"all": root}

    class_names = sorted({d.name for r in layout.values() for d in _class_dirs(r)})
    if len(class_names) < 2:
        raise TaskDataError(f"{root} has {len(class_names)} class folder(s); a classification task "
                            "needs at least 2 sub-folders of images")
    if len(class_names) > MAX_CLASSES:
        raise TaskDataError(f"{root} has {len(class_names)} class folders; the limit is {MAX_CLASSES}")
    for split_root in layout.values():  # a class with no image can never be learned: say which
        empty = [d.name for d in _class_dirs(split_root) if not _list_images(d)]
        if empty:
            raise TaskDataError(f"{split_root}: class folder(s) {', '.join(empty[:5])} hold no images; "
                                "add images or remove the folder")
    label_of = {name: i for i, name in enumerate(class_names)}

    per_split_images: dict[str, list[np.ndarray]] = {}
    per_split_labels: dict[str, list[int]] = {}
    for split, split_root in layout.items():
        images, labels = [], []
        for class_dir in _class_dirs(split_root):
            for file in _list_images(class_dir):
                images.append(_read_image(file))
                labels.append(label_of[class_dir.name])
        if not images:
            raise TaskDataError(f"{split_root} holds no images; put image files in its class folders")
        per_split_images[split] = images
        per_split_labels[split] = labels

    for other in ("val", "test"):
        if "train" not in per_split_labels or other not in per_split_labels:
            continue
        unseen = sorted({class_names[y] for y in per_split_labels[other]}
                        - {class_names[y] for y in per_split_labels["train"]})
        if unseen:
            raise TaskDataError(f"{root}: {other} class(es) {', '.join(unseen[:5])} have no training "
                                "images (train/<class>/); a model cannot learn a class it never sees")

    # One colour/size decision over all splits so every split has the same H, W, C.
    everything = [im for ims in per_split_images.values() for im in ims]
    stacked = _to_uniform(everything)
    offsets = np.cumsum([0] + [len(v) for v in per_split_images.values()])
    x_by = {s: stacked[offsets[i]:offsets[i + 1]] for i, s in enumerate(per_split_images)}
    y_by = {s: np.asarray(per_split_labels[s], dtype=np.int64) for s in per_split_labels}

    seed = _generic_seed("folder", root)
    if "all" in x_by or set(x_by) == {"train"}:  # no split given: the seeded three-way split
        x_all, y_all = x_by.get("all", x_by.get("train")), y_by.get("all", y_by.get("train"))
        if len(x_all) < 3:
            raise TaskDataError(f"{root} has {len(x_all)} images; need at least 3 to split")
        arrays, how = apply_three_way(x_all, y_all, seed), "split 80/10/10 by a seeded shuffle"
    elif "test" not in x_by:  # train/ + val/: the test split is carved from train
        tr, te = train_val_split(len(x_by["train"]), seed ^ 0x7E57)
        arrays = {"train_x": x_by["train"][tr], "train_y": y_by["train"][tr], "val_x": x_by["val"],
                  "val_y": y_by["val"], "test_x": x_by["train"][te], "test_y": y_by["train"][te]}
        how = "train/ and val/ as given, test carved from train/"
    else:
        arrays = _with_validation(x_by["train"], y_by["train"], x_by.get("val"), y_by.get("val"),
                                  x_by["test"], y_by["test"], seed, str(root))
        how = "train/, val/ and test/ as given" if "val" in x_by else \
            "train/ and test/ as given, val carved from train/"
    return GenericData(arrays, len(class_names), class_names, how)


def _with_validation(x_tr, y_tr, x_va, y_va, x_te, y_te, seed: int, where: str) -> dict[str, np.ndarray]:
    if x_va is None:
        if len(x_tr) < 2:
            raise TaskDataError(f"{where}: need at least 2 training examples to carve a validation slice")
        tr, va = train_val_split(len(x_tr), seed)
        x_tr, y_tr, x_va, y_va = x_tr[tr], y_tr[tr], x_tr[va], y_tr[va]
    return {"train_x": x_tr, "train_y": y_tr, "val_x": x_va, "val_y": y_va, "test_x": x_te, "test_y": y_te}


# ------------------------------------------------------------------------------------------------ npz
def _check_x(x: np.ndarray, key: str, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise TaskDataError(f"{where}: {key} has dtype {x.dtype}, expected uint8 images (0..255)")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise TaskDataError(f"{where}: {key} has shape {x.shape}, expected (N, H, W) or (N, H, W, C) "
                            "with C in {1, 3}")
    if min(x.shape[1:3]) < 1:
        raise TaskDataError(f"{where}: {key} holds {x.shape[1]}x{x.shape[2]} images; images need at "
                            "least one pixel")
    return x


def _check_npz_headers(path: Path, where: str) -> None:
    """Every member's header against the bytes it holds, before numpy allocates what a header
    claims (a header may claim terabytes in a file of a few bytes)."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                except ValueError as exc:
                    raise TaskDataError(f"{where}: {info.filename} is not a numpy array ({exc})") from None
                header = f.tell()
            if dtype.hasobject:  # pickled objects: np.load(allow_pickle=False) refuses those itself
                continue
            claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if claimed != info.file_size - header:
                raise TaskDataError(f"{where}: {info.filename} says shape {shape} ({claimed:,} bytes) but "
                                    f"holds {info.file_size - header:,} bytes")


def _check_y(y: np.ndarray, n: int, key: str, where: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise TaskDataError(f"{where}: {key} has shape {y.shape}, expected ({n},) to match its images")
    if not np.issubdtype(y.dtype, np.integer):
        raise TaskDataError(f"{where}: {key} has dtype {y.dtype}, expected integer class labels")
    if n and y.min() < 0:
        raise TaskDataError(f"{where}: {key} has negative labels; labels must be 0..num_classes-1")
    return y.astype(np.int64)


def load_npz(path_text: str) -> GenericData:
    path = Path(path_text).expanduser()
    where = str(path)
    if not path.is_file():
        raise TaskDataError(f"npz task file {path} does not exist; give npz:PATH to a .npz with "
                            "x_train, y_train, x_test, y_test")
    try:
        _check_npz_headers(path, where)
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            need = {"x_train", "y_train", "x_test", "y_test"}
            if not need <= files:
                raise TaskDataError(f"{where} lacks {sorted(need - files)}; it needs x_train, y_train, "
                                    "x_test, y_test (and optionally x_val, y_val)")
            if ("x_val" in files) != ("y_val" in files):
                raise TaskDataError(f"{where} has only one of x_val/y_val; give both or neither")
            raw = {k: npz[k] for k in files if k in need | {"x_val", "y_val"}}
    except TaskDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise TaskDataError(f"cannot read {where} as a numpy .npz without pickles ({exc})") from None

    xs = {k: _check_x(raw[k], k, where) for k in raw if k.startswith("x_")}
    ys = {k: _check_y(raw[k], len(xs["x" + k[1:]]), k, where) for k in raw if k.startswith("y_")}
    shapes = {x.shape[1:] for x in xs.values()}
    if len(shapes) != 1:
        raise TaskDataError(f"{where}: image shapes differ between splits {sorted(shapes)}; "
                            "all splits need the same H, W, C")
    for k in ("x_train", "x_test"):
        if len(xs[k]) == 0:
            raise TaskDataError(f"{where}: {k} is empty")
    arrays = _with_validation(xs["x_train"], ys["y_train"], xs.get("x_val"), ys.get("y_val"),
                              xs["x_test"], ys["y_test"], _generic_seed("npz", path), where)
    num_classes = int(max(int(y.max()) for y in ys.values() if len(y))) + 1
    if num_classes < 2:
        raise TaskDataError(f"{where}: labels hold a single class; a classification task needs at least 2")
    if num_classes > MAX_CLASSES:
        raise TaskDataError(f"{where}: the largest label is {num_classes - 1:,}, so {num_classes:,} classes; "
                            f"the limit is {MAX_CLASSES:,} (labels must be 0..classes-1)")
    unseen = sorted(set(np.unique(ys["y_test"]).tolist()) - set(np.unique(ys["y_train"]).tolist()))
    if unseen:
        raise TaskDataError(f"{where}: test labels {unseen[:5]} never occur in y_train; a model cannot "
                            "learn a class it never sees")
    return GenericData(arrays, num_classes, None, "x_/y_ arrays as given" + (
        "" if "x_val" in xs else ", val carved from train"))


def parse_generic(name: str) -> tuple[str, str] | None:
    """('folder'|'npz', path) for a generic task name, else None."""
    for kind in ("folder", "npz"):
        prefix = kind + ":"
        if name.startswith(prefix):
            path = name[len(prefix):]
            if not path:
                raise TaskDataError(f"task {name!r} has no path; write {prefix}PATH")
            return kind, os.fspath(path)
    return None
