"""Per-task agents: model assembly from shared components, mutations, training, scoring, task data.

torch and timm live in this package (never in ``store`` or ``protocol``), but importing the package
itself costs neither: ``agents.registry`` (component kinds and mutation actions) is torch-free, so the
report and the query CLI can read it. The torchvision fix that ``import timm`` needs on CPU-only
installs is armed here and runs on the first ``import torchvision`` (or now, if that already
happened), before timm's import of torchvision goes on.
"""
import importlib.abc as _abc
import sys as _sys

from agents._torchvision_compat import ensure_torchvision_importable


class _TorchvisionFix(_abc.MetaPathFinder):
    """Applies the fix when torchvision is first imported, then steps aside (finds nothing itself)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            if self in _sys.meta_path:
                _sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None


if "torchvision" in _sys.modules:
    ensure_torchvision_importable()
else:
    _sys.meta_path.insert(0, _TorchvisionFix())
