"""Per-task agents: model assembly from shared components, mutations, training, scoring, task data.

torch and timm live in this package (never in ``store`` or ``protocol``).
"""
from agents._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
