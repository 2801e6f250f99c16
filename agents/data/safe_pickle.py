"""A pickle reader that can rebuild plain numpy arrays and nothing else.

Why: animal_mnist ships its images as gzip-compressed pickles. Unpickling runs whatever callables the
file names, so a hostile or corrupted file is code execution. Two defences are used together: the file's
sha256 is checked against a pinned value before it is opened (see ``sources.py``), and the unpickler
below resolves only the handful of globals that numpy's own array pickles reference. Anything else
(``os.system``, ``builtins.eval``, a numpy function that is not a constructor, ...) is refused with
``TaskDataError`` before it can be called.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from agents.data.cache import TaskDataError


def _reconstruct_fn():
    # numpy 2 moved ``numpy.core`` to ``numpy._core``; old pickles still name the former. Resolve both
    # to the real function without importing the deprecated alias module (which warns).
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_fn(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_fn(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` knows only numpy's array reconstruction globals."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise TaskDataError(
                f"refusing to unpickle forbidden global {module}.{name}; only numpy arrays are allowed"
            ) from None


def load_numpy_pickle(data: bytes) -> np.ndarray:
    """Unpickle ``data`` with the restricted unpickler and require the result to be an ndarray."""
    try:
        obj = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except TaskDataError:
        raise
    except Exception as exc:  # malformed stream: pickle raises many types
        raise TaskDataError(f"cannot read numpy pickle: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, np.ndarray) or obj.dtype == object:
        raise TaskDataError(f"pickle holds {type(obj).__name__}, expected a numeric numpy array")
    return obj
