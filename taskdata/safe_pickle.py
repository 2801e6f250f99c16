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

from taskdata.cache import TaskDataError


def _reconstruct_fn():
    # numpy 2 moved ``numpy.core`` to ``numpy._core``; old pickles still name the former. Resolve both
    # to the real function without importing the deprecated alias module (which warns).
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _frombuffer_fn():
    try:
        from numpy._core.numeric import _frombuffer  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles store raw bytes as latin-1 text."""
    if encoding != "latin1" or not isinstance(text, str):
        raise TaskDataError(f"refusing _codecs.encode with encoding {encoding!r}; only latin1 bytes are allowed")
    return text.encode("latin1")


# Exactly the globals numpy's own array pickles use (protocols 2 to 5, numpy 1.x and 2.x module names).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_fn(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_fn(),
    ("numpy.core.numeric", "_frombuffer"): _frombuffer_fn(),
    ("numpy._core.numeric", "_frombuffer"): _frombuffer_fn(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
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
