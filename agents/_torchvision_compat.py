"""Make ``import timm`` work when torchvision's C extension does not match the installed torch.

Why: timm imports torchvision at import time. On a CPU-only machine the only torchvision wheel on PyPI
is a CUDA build; beside a CPU torch its ``_C`` extension fails to load, and torchvision's Python code
then dies registering fake kernels for ``torchvision::nms`` with
``RuntimeError: operator torchvision::nms does not exist``. Declaring the two missing operator schemas
lets the import finish; nothing in this project calls those operators (ViTs need none of them).

The fix only acts when the extension really cannot be loaded: with a matching torch/torchvision pair
(a normal GPU install) this module changes nothing. Import it before the first ``import timm``;
``agents`` does so in its package ``__init__``.
"""
from __future__ import annotations

import importlib.util
import os

_DONE = False
_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _extension_loads() -> bool:
    """True when torchvision's compiled ``_C`` library can be loaded next to this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision at all: timm will fail on its own, and say so clearly
    import torch

    folder = list(spec.submodule_search_locations)[0]
    for name in os.listdir(folder):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def ensure_torchvision_importable() -> None:
    """Declare ``torchvision::nms``/``qnms`` schemas if (and only if) torchvision's extension is broken."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    if _extension_loads():
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(op + _SCHEMA)
        except RuntimeError:
            pass  # already declared by someone else: fine
    # Keep the library object alive for the life of the process, otherwise the schemas are dropped.
    globals()["_LIBRARY"] = lib
