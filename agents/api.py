"""Use a grown model: the task's current model as a ``torch.nn.Module`` with its preprocessing.

    from agents.api import load_model, load_exported
    m = load_model("swarm-store", "mnist5k")            # from the store (read-only, never blocks agents)
    m = load_exported("mnist5k.safetensors")           # from `query.py export`, no store needed
    labels = m.predict(images_uint8_nhwc)              # numpy uint8 (N,H,W) or (N,H,W,C)
    probs = m.predict_proba(images_uint8_nhwc)
    m.module                                           # the PathModel (forward takes [-1,1] floats)
                                                       # or MultipathModel ({size: [-1,1] floats})
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from taskdata.augment import preprocess_eval, to_tensor
from agents.view import from_raw
from agents.multipath import MultipathModel, frozen_path_module
from agents.vit import PathModel, VitConfig, vit_config
from store import open_store
from agents.export import FORMAT, UnknownTask


class ModelFileError(ValueError):
    """The file is not a munet-swarm export (a user error)."""


@dataclass
class TaskModel:
    task: str
    model_id: str
    hparams: dict[str, Any]
    metrics: dict[str, Any]
    module: PathModel | MultipathModel
    device: torch.device

    @property
    def kind(self) -> str:
        return "multipath" if isinstance(self.module, MultipathModel) else "single"

    @property
    def image_sizes(self) -> list[int]:
        """Every input size the model reads (a multipath model's paths may differ)."""
        if isinstance(self.module, MultipathModel):
            return sorted(set(self.module.image_sizes))
        return [int(self.hparams["ds_image_size"])]

    @property
    def image_size(self) -> int:
        """The (main path's) input size."""
        if isinstance(self.module, MultipathModel):
            return self.module.image_sizes[0]
        return int(self.hparams["ds_image_size"])

    @property
    def num_classes(self) -> int:
        return int(self.hparams["num_classes"])

    def preprocess(self, images) -> torch.Tensor:
        """uint8 images (N,H,W) / (N,H,W,C) numpy or NCHW uint8 tensor -> model input in [-1, 1]."""
        if isinstance(images, np.ndarray):
            if images.ndim == 3:
                images = images[..., None]
            images = to_tensor(images, self.device)
        return preprocess_eval(images.to(self.device), self.image_size)

    @torch.inference_mode()
    def logits(self, images, batch_size: int = 512) -> torch.Tensor:
        if isinstance(self.module, MultipathModel):
            if isinstance(images, np.ndarray):
                images = to_tensor(images[..., None] if images.ndim == 3 else images, self.device)
            x = images.to(self.device)
            return torch.cat([self.module({s: preprocess_eval(x[i:i + batch_size], s)
                                           for s in self.image_sizes})
                              for i in range(0, len(x), batch_size)])
        x = self.preprocess(images)
        return torch.cat([self.module(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def predict_proba(self, images) -> np.ndarray:
        return torch.softmax(self.logits(images), -1).cpu().numpy()

    def predict(self, images) -> np.ndarray:
        return self.logits(images).argmax(-1).cpu().numpy()


def _vit_of(meta: dict) -> VitConfig:
    return vit_config(meta["vit"], depth=int(meta["depth"]))


def load_model(store_path: str, task: str, device: str = "cpu", keys: str | None = None,
               model_id: str | None = None) -> TaskModel:
    """The task's current published model (or the model ``model_id``), loaded from the store.

    ``store_path`` is a store directory or a store service (``tcp://HOST:PORT``, with ``keys`` the
    CURVE key folder when the service is beyond loopback)."""
    dev = torch.device(device)
    with open_store(store_path, readonly=True, keys=keys) as store:
        rec = store.get_task(task)
        if rec is None:
            raise UnknownTask(f"no published model for task {task!r}")
        model = store.get_model(model_id or rec.model_id)
        if model is None or model.task != task:
            raise UnknownTask(f"no model {model_id!r} of task {task!r} in the store")
        vit = _vit_of(store.get_model(store.root_model_id()).metrics)
        params = _params(store, model.id, dev)
        paths = [(store.get_model(r).hparams, _params(store, r, dev)) for r in model.refs]
    module = _module(vit, model.hparams, params, paths)
    return TaskModel(task, model.id, dict(model.hparams), dict(model.metrics), module, dev)


def _params(store, model_id: str, dev: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    model = store.get_model(model_id)
    tensors = store.load_model_tensors(model_id)
    names = {cid: store.get_component(cid).name for cid in model.components}
    return {names[cid]: {k: from_raw(v, dev, torch.float32) for k, v in p.items()}
            for cid, (p, _m) in tensors.items()}


def _module(vit: VitConfig, hparams: dict, params: dict, paths: list[tuple[dict, dict]]):
    if not paths:
        return PathModel(vit, hparams, params, trainable=set()).eval()
    frozen = [frozen_path_module(vit, h, {n: t for n, t in p.items() if k == 0 or n != "head"})
              for k, (h, p) in enumerate(paths)]
    return MultipathModel(hparams, frozen, params, trainable=False).eval()


def load_exported(path: str, device: str = "cpu") -> TaskModel:
    """A model from ``query.py export``: no store needed."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a munet-swarm export (format {meta.get('format')!r})")
    dev = torch.device(device)
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        comp, tname = key.split(".", 1)
        params.setdefault(comp, {})[tname] = t.to(dev)
    hparams = json.loads(meta["hparams"])
    paths = [(p["hparams"], {c.split("/", 1)[1]: v for c, v in params.items()
                             if c.startswith(f"path_{p['slot']}/")})
             for p in json.loads(meta.get("paths") or "[]")]
    own = {c: v for c, v in params.items() if "/" not in c}
    module = _module(_vit_of(json.loads(meta["vit"])), hparams, own, paths)
    return TaskModel(meta["task"], meta["model_id"], hparams, json.loads(meta["metrics"]), module, dev)
