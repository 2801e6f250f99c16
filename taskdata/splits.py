"""Fixed, seeded train/validation/test splits.

The rule (the same for every task, so results are comparable across machines):

* A source's own test split (and validation split, if it has one) is used as is.
* Otherwise the examples are shuffled once with the task's seed and the test slice is carved first,
  then the validation slice from what remains; train is the rest. The method's reference uses 5% slices
  on large TFDS sets; the offline sets here are small (1,797 to 10,000 images), so the slices are bigger
  to make the accuracies meaningful: test = 20% of all examples, validation = 15% of the remainder
  (e.g. 5,000 images -> 3,400 / 600 / 1,000).
* A source with an official test split but no validation split gets its validation slice (15% of the
  official train split) carved the same way.
* Every split keeps the shuffled order (it is not re-sorted), so no split is ordered by class even when
  the source file is (animal_mnist is stored class by class).

The task's seed is the CRC-32 of its name: stable across machines, Python versions and processes
(unlike ``hash()``), and different per task. Shuffles use ``numpy.random.default_rng(seed)`` whose
PCG64 stream is specified and platform independent.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

TEST_FRACTION = 0.20
VAL_FRACTION = 0.15


def task_seed(name: str) -> int:
    """Deterministic per-task seed."""
    return zlib.crc32(name.encode("utf-8"))


@dataclass(frozen=True)
class SplitIndices:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _slice_size(n: int, fraction: float) -> int:
    # At least one example per carved slice whenever there is anything to carve and something left over.
    return max(1, int(round(n * fraction))) if n >= 2 else 0


def three_way_split(n: int, seed: int) -> SplitIndices:
    """Shuffle ``range(n)`` once and carve test, then validation, from it."""
    if n < 3:
        raise ValueError(f"need at least 3 examples to carve train/val/test, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = _slice_size(n, TEST_FRACTION)
    n_val = _slice_size(n - n_test, VAL_FRACTION)
    return SplitIndices(
        test=order[:n_test],
        val=order[n_test : n_test + n_val],
        train=order[n_test + n_val :],
    )


def train_val_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation slice out of an official train split (the source has its own test split)."""
    if n < 2:
        raise ValueError(f"need at least 2 training examples to carve a validation slice, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = _slice_size(n, VAL_FRACTION)
    return order[n_val:], order[:n_val]


def apply_three_way(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    idx = three_way_split(len(x), seed)
    return {
        "train_x": x[idx.train], "train_y": y[idx.train],
        "val_x": x[idx.val], "val_y": y[idx.val],
        "test_x": x[idx.test], "test_y": y[idx.test],
    }
