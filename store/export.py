"""Export a task's current model as one ``.safetensors`` file, without torch.

The file holds the model's parameters (momentum is training state and stays in the store) named
``<component>.<tensor>`` and, in the safetensors metadata, everything needed to rebuild the module
without the store: the architecture (ViT config and hparams), the task, the model and component ids
with their owners, metrics and the preprocessing. ``agents.api.load_exported`` reads it back.

The safetensors layout is simple enough to write directly: an 8-byte little-endian header length, a
JSON header (name -> dtype, shape, byte offsets; plus ``__metadata__``), then the raw bytes.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile

from store.errors import StoreError
from store.store import Store
from store.timm_names import TIMM_MODELS, timm_key

FORMAT = "munet-swarm/1"
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL"}


class UnknownTask(StoreError):
    """The store has no published model for the task (a user error)."""


class NotTimmCompatible(StoreError):
    """The model has parts timm's VisionTransformer does not have (residual adapters)."""


def timm_create_args(vit: dict, hparams: dict, num_classes: int) -> dict:
    """``timm.create_model(**args)`` that builds this model's exact architecture (tanh GELU, no dropout)."""
    return {"model_name": vit.get("timm_name") or TIMM_MODELS[vit["vit"]], "pretrained": False,
            "num_classes": int(num_classes), "img_size": int(hparams["ds_image_size"]),
            "depth": int(hparams["num_layers"]), "act_layer": "gelu_tanh", "global_pool": "token",
            "drop_rate": 0.0}


def export_task(store: Store, task: str, out_path: str, fmt: str = "munet") -> dict:
    """Write the task's current model to ``out_path`` atomically; return a summary.

    ``fmt="timm"`` names tensors as timm's VisionTransformer does and puts the ``timm.create_model``
    arguments in the metadata (``timm_create_args``), for models without residual adapters.
    """
    rec = store.get_task(task)
    if rec is None:
        known = ", ".join(sorted(t.task for t in store.tasks())) or "none yet"
        raise UnknownTask(f"no published model for task {task!r} (published tasks: {known})")
    model = store.get_model(rec.model_id)
    root_id = store.root_model_id()
    root = store.get_model(root_id) if root_id else None
    vit = {k: root.metrics[k] for k in ("vit", "hidden", "depth", "patch")} if root else {}
    timm_args = None
    if fmt == "timm":
        adapters = model.hparams.get("adapter_layers") or ""
        if adapters:
            raise NotTimmCompatible(
                f"model {model.id} of {task} has residual adapters before blocks "
                f"{adapters.replace('_', ', ')}, which timm's VisionTransformer does not have; export it "
                "in the default format and load it with agents.api.load_exported")
        if vit.get("vit") not in TIMM_MODELS:
            raise NotTimmCompatible(f"the store's root ViT config {vit.get('vit')!r} has no timm model name")
        timm_args = timm_create_args(vit, model.hparams, rec.num_classes)
    tensors = store.load_model_tensors(model.id)
    header: dict = {}
    chunks: list[bytes | memoryview] = []
    offset = 0
    components = []
    for cid in model.components:
        comp = store.get_component(cid)
        params, _momentum = tensors[cid]
        components.append({"name": comp.name, "id": cid, "owner": comp.agent})
        for tname in sorted(params):
            t = params[tname]
            n = len(t.data)
            name = timm_key(comp.name, tname) if fmt == "timm" else f"{comp.name}.{tname}"
            header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                                              "data_offsets": [offset, offset + n]}
            chunks.append(t.data)
            offset += n
    header["__metadata__"] = {
        "format": FORMAT, "task": task, "model_id": model.id, "agent": model.agent,
        "num_classes": str(rec.num_classes), "hparams": json.dumps(model.hparams, sort_keys=True),
        "metrics": json.dumps(model.metrics, sort_keys=True), "vit": json.dumps(vit),
        "components": json.dumps(components), "preset": model.preset,
        "preprocessing": "grey->3 channels, bilinear resize to ds_image_size square, x/127.5-1",
    }
    if timm_args is not None:
        header["__metadata__"]["format"] = FORMAT + "+timm"
        header["__metadata__"]["timm_create_model"] = json.dumps(timm_args, sort_keys=True)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    folder = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"task": task, "model_id": model.id, "path": out_path, "bytes": os.path.getsize(out_path),
            "tensors": len(header) - 1, "components": len(components), "format": fmt,
            "timm_create_model": timm_args}
