"""``+probe``: choose a fallback parent by how well its frozen features fit this task, not by chance.

The reference draws the fallback parent uniformly from every published model (docs/method.md 3.2); with
many tasks most draws are models of unrelated tasks. This extension replaces that draw: each candidate's
features (the class token after ``encoder_norm``, the candidate's own image size) are computed for a
few hundred training and validation images, a ridge-regression linear probe is solved in closed form,
and the candidate with the best probe accuracy on the validation images is the parent. It costs a
forward pass over ~768 images per candidate, a fraction of one child's training.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from typing import ContextManager

import torch

from taskdata.augment import preprocess_eval
from agents.paths import ModelPath
from agents.training import TaskTensors
from agents.vit import PathModel, VitConfig, init_component

PROBE_TRAIN = 512
PROBE_VAL = 256
RIDGE = 1e-2


@torch.inference_mode()
def _features(path: ModelPath, vit: VitConfig, x_uint8: torch.Tensor, num_classes: int) -> torch.Tensor:
    h = dict(path.hparams)
    h["num_classes"] = num_classes
    params = {n: c.params for n, c in path.components.items() if n != "head"}
    params["head"] = init_component("head", vit, h, torch.Generator())  # unused: features only
    model = PathModel(vit, h, params, ())
    model.eval()
    size = int(h["ds_image_size"])
    return torch.cat([model.forward_features(preprocess_eval(x_uint8[i:i + 256], size))
                      for i in range(0, len(x_uint8), 256)])


def ridge_probe_accuracy(path: ModelPath, vit: VitConfig, train_x: torch.Tensor, train_y: torch.Tensor,
                         val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int) -> float:
    """Accuracy on (val_x, val_y) of a closed-form ridge probe fitted on ``path``'s frozen features
    of (train_x, train_y), features standardised on the training images."""
    f_tr = _features(path, vit, train_x, num_classes).double()
    f_va = _features(path, vit, val_x, num_classes).double()
    mean, std = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_va = (f_tr - mean) / std, (f_va - mean) / std
    f_tr = torch.cat([f_tr, torch.ones(len(f_tr), 1, dtype=f_tr.dtype, device=f_tr.device)], 1)
    f_va = torch.cat([f_va, torch.ones(len(f_va), 1, dtype=f_va.dtype, device=f_va.device)], 1)
    y = torch.nn.functional.one_hot(train_y, num_classes).double()
    gram = f_tr.T @ f_tr + RIDGE * len(f_tr) * torch.eye(f_tr.shape[1], dtype=f_tr.dtype, device=f_tr.device)
    w = torch.linalg.solve(gram, f_tr.T @ y)
    return float(((f_va @ w).argmax(1) == val_y).double().mean())


def probe_accuracy(path: ModelPath, vit: VitConfig, data: TaskTensors) -> float:
    """Validation accuracy of a closed-form ridge probe on ``path``'s frozen features."""
    n_tr, n_va = min(PROBE_TRAIN, data.n_train), min(PROBE_VAL, len(data.val_y))
    return ridge_probe_accuracy(path, vit, data.train_x[:n_tr], data.train_y[:n_tr], data.val_x[:n_va],
                                data.val_y[:n_va], data.num_classes)


def probe_pick(candidates: Sequence[ModelPath], vit: VitConfig, data: TaskTensors, rng: random.Random,
               cache: dict[str, float],
               each: Callable[[], ContextManager] = contextlib.nullcontext) -> ModelPath:
    """The candidate with the best probe accuracy (ties drawn with ``rng``); ``cache`` keeps the
    accuracy per model id (published models are immutable, so a probe is computed once per model).
    Each probe runs inside ``each()`` (an agent's ``view.transient``: one candidate's tensors in
    memory at a time)."""
    scores = []
    for p in candidates:
        if p.id not in cache:
            with each():
                cache[p.id] = probe_accuracy(p, vit, data)
        scores.append(cache[p.id])
    best = max(scores)
    return rng.choice([p for p, s in zip(candidates, scores) if s == best])
