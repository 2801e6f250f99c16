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

FORMAT = "munet-swarm/1"
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL"}


class UnknownTask(StoreError):
    """The store has no published model for the task (a user error)."""


def export_task(store: Store, task: str, out_path: str) -> dict:
    """Write the task's current model to ``out_path`` atomically; return a summary."""
    rec = store.get_task(task)
    if rec is None:
        known = ", ".join(sorted(t.task for t in store.tasks())) or "none yet"
        raise UnknownTask(f"no published model for task {task!r} (published tasks: {known})")
    model = store.get_model(rec.model_id)
    root_id = store.root_model_id()
    root = store.get_model(root_id) if root_id else None
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
            header[f"{comp.name}.{tname}"] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                                              "data_offsets": [offset, offset + n]}
            chunks.append(t.data)
            offset += n
    vit = {k: root.metrics[k] for k in ("vit", "hidden", "depth", "patch")} if root else {}
    header["__metadata__"] = {
        "format": FORMAT, "task": task, "model_id": model.id, "agent": model.agent,
        "num_classes": str(rec.num_classes), "hparams": json.dumps(model.hparams, sort_keys=True),
        "metrics": json.dumps(model.metrics, sort_keys=True), "vit": json.dumps(vit),
        "components": json.dumps(components), "preset": model.preset,
        "preprocessing": "grey->3 channels, bilinear resize to ds_image_size square, x/127.5-1",
    }
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
            "tensors": len(header) - 1, "components": len(components)}
