"""Served models from the store: records through the lazy view, tensors only for the served paths.

The loader keeps one ``SystemView`` (agent id ``serve``, which owns nothing, so everything is frozen
for it). A component's tensors are loaded once, on first use, and shared by every path and every plan
that uses it; after a swap, ``release_unused`` lets go of what no served path uses any more (a batch
still running on the old plan keeps its own references until it ends).
"""
from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from agents.multipath import MultipathModel, frozen_path_module, model_flops
from agents.paths import ModelPath
from agents import compute
from agents.serving.plan import ServedModel, ServedPath, TaskInfo
from agents.view import SystemView
from agents.vit import VitConfig, vit_config
from store import StoreAPI, TaskRecord
from store.records import MULTIPATH

SERVE_AGENT = "serve"


def labels_of(hparams: dict, metrics: dict) -> tuple[str, ...] | None:
    """Class names a model carries (``class_names`` in its metrics: a JSON list, as the agent
    records it), if any and if they match its class count."""
    try:
        names = json.loads(metrics.get("class_names") or "null")
    except (TypeError, ValueError):
        return None
    if isinstance(names, list) and len(names) == int(hparams.get("num_classes", -1)):
        return tuple(str(n) for n in names)
    return None


class ModelLoader:
    def __init__(self, store: StoreAPI, device: torch.device) -> None:
        self.store, self.device = store, device
        self.view = SystemView(store, SERVE_AGENT, device)
        root_id = store.root_model_id()
        if root_id is None:
            raise LookupError("the store has no root model yet: nothing to serve")
        root = store.get_model(root_id)
        self.vit: VitConfig = vit_config(root.metrics["vit"], depth=int(root.metrics["depth"]))
        self._kept: list[ModelPath] = []

    def _path(self, model_id: str, main: bool) -> ServedPath:
        p = self.view.path(model_id)
        params = {n: c.params for n, c in p.components.items() if main or n != "head"}
        module = frozen_path_module(self.vit, p.hparams, params)
        keys = [tuple(p.components[c].key for c in comps) for comps in module.stage_components]
        return ServedPath(module, keys)

    def load(self, pointer: TaskRecord) -> ServedModel:
        """The model ``pointer`` serves, bound to the view's (shared) tensors."""
        record = self.view.path(pointer.model_id)
        h, m = record.hparams, record.metrics
        if record.kind == MULTIPATH:
            paths = [self._path(ref, k == 0) for k, ref in enumerate(record.refs)]
            own = {n: c.params for n, c in record.components.items()}
            combiner = MultipathModel(h, [p.module for p in paths], own, trainable=False).eval()
            flops = model_flops(self.vit, h, [self.view.path(r).hparams for r in record.refs])
            borrows = tuple(self.view.path(r).task or "root" for r in record.refs[1:])
            used = [record] + [self.view.path(r) for r in record.refs]
        else:
            paths, combiner = [self._path(record.id, True)], None
            flops = compute.forward_flops(self.vit, h)
            borrows, used = (), [record]
        params = sum(c.num_params() for c in {c.key: c for p in used
                                             for c in p.components.values()}.values())
        info = TaskInfo(
            task=pointer.task, kind=record.kind, model_id=record.id, num_classes=int(h["num_classes"]),
            labels=labels_of(h, m), image_sizes=tuple(p.image_size for p in paths), params=int(params),
            flops_per_image=int(flops), val_accuracy=_num(m.get("quality")),
            test_accuracy=_num(m.get("test_quality")), published_at=float(pointer.updated_at),
            borrows=borrows)
        return ServedModel(info, paths, combiner)

    def release_unused(self, serving: Iterable[str]) -> None:
        """Let go of every component tensor the models ``serving`` (ids) do not use."""
        keep = [self.view.path(mid) for mid in serving]
        self.view.prune(keep)


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
