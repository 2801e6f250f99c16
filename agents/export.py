"""Export a task's current model as one ``.safetensors`` file, without torch.

The file holds the model's parameters (momentum is training state and stays in the store) named
``<component>.<tensor>`` and, in the safetensors metadata, everything needed to rebuild the module
without the store: the architecture (ViT config and hparams), the task, the model and component ids
with their owners, metrics and the preprocessing. ``agents.api.load_exported`` reads it back.
A multipath model also carries its paths: path k's tensors are named ``path_<k>/<component>.<tensor>``
(the main path with its head, the borrowed ones without), and ``paths`` in the metadata says whose
models they are. This is method knowledge (hparams, timm names), so it lives with the agents, not in
the store, which only keeps records and tensors.

The file is written with the ``safetensors`` package's numpy API (no torch), from numpy arrays that
wrap the store's bytes.
"""
from __future__ import annotations

import json
import os
import tempfile

from safetensors.numpy import save

from agents.timm_names import TIMM_MODELS, timm_key
from store import StoreAPI
from store.errors import StoreError

FORMAT = "munet-swarm/1"


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


def _add_tensors(store: StoreAPI, model_id: str, prefix: str, tensors: dict, components: list,
                 rename, skip: tuple[str, ...] = ()) -> None:
    """Add one model's component tensors (as numpy arrays over the store's bytes) to ``tensors``."""
    model = store.get_model(model_id)
    loaded = store.load_model_tensors(model_id)
    for cid in model.components:
        comp = store.get_component(cid)
        if comp.name in skip:
            continue
        params, _momentum = loaded[cid]
        components.append({"name": prefix + comp.name, "id": cid, "owner": comp.agent})
        for tname in sorted(params):
            name = rename(comp.name, tname) if rename else f"{prefix}{comp.name}.{tname}"
            tensors[name] = params[tname].to_numpy()


def _canonical(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted (the writer orders metadata as a hash map
    does, differently in each process): equal models export to equal bytes. The header keeps its
    length, so every offset stays valid."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > n:  # cannot happen for a reordering; keep the writer's bytes rather than break them
        return data
    return data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:]


def export_task(store: StoreAPI, task: str, out_path: str, fmt: str = "munet",
                kind: str | None = None) -> dict:
    """Write the task's current model to ``out_path`` atomically; return a summary.

    ``fmt="timm"`` names tensors as timm's VisionTransformer does and puts the ``timm.create_model``
    arguments in the metadata (``timm_create_args``), for models without residual adapters.
    ``kind``: the model that agent kind publishes for the task (``single`` reaches the single-path
    model while a multipath model serves the task); None: the model that serves it.
    """
    rec = store.get_task(task)
    if rec is None:
        known = ", ".join(sorted(t.task for t in store.tasks())) or "none yet"
        raise UnknownTask(f"no published model for task {task!r} (published tasks: {known})")
    if kind is None:
        model = store.get_model(rec.model_id)
    else:
        model = store.published_models(kind=kind).get(task)
        if model is None:
            raise UnknownTask(f"task {task!r} has no published {kind} model (its model is "
                              f"{rec.model_id}); leave --kind out to export that one")
    root_id = store.root_model_id()
    root = store.get_model(root_id) if root_id else None
    vit = {k: root.metrics[k] for k in ("vit", "hidden", "depth", "patch")} if root else {}
    if fmt == "timm" and model.kind == "multipath":
        borrowed = ", ".join(store.get_model(r).task for r in model.refs[1:])
        raise NotTimmCompatible(
            f"model {model.id} of {task} is a multipath model (its task's model joined with frozen "
            f"models of {borrowed} by a router), which timm has no architecture for; export it in "
            "the default format and load it with agents.api.load_exported")
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
    tensors: dict = {}
    components: list[dict] = []
    _add_tensors(store, model.id, "", tensors, components,
                 (lambda c, t: timm_key(c, t)) if fmt == "timm" else None)
    paths = []
    for k, ref in enumerate(model.refs):
        path = store.get_model(ref)
        paths.append({"slot": k, "model_id": ref, "task": path.task, "agent": path.agent,
                      "hparams": path.hparams})
        _add_tensors(store, ref, f"path_{k}/", tensors, components, None,
                     skip=() if k == 0 else ("head",))
    metadata = {
        "format": FORMAT, "task": task, "model_id": model.id, "agent": model.agent,
        "num_classes": str(rec.num_classes), "hparams": json.dumps(model.hparams, sort_keys=True),
        "metrics": json.dumps(model.metrics, sort_keys=True), "vit": json.dumps(vit),
        "components": json.dumps(components), "preset": model.preset, "kind": model.kind,
        "preprocessing": "grey->3 channels, bilinear resize to ds_image_size square, x/127.5-1",
    }
    if paths:
        metadata["paths"] = json.dumps(paths, sort_keys=True)
    if timm_args is not None:
        metadata["format"] = FORMAT + "+timm"
        metadata["timm_create_model"] = json.dumps(timm_args, sort_keys=True)
    folder = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an export gets the mode any new file would
    try:  # written beside the target, then renamed over it: a reader never sees half a file
        with open(tmp, "wb") as f:
            f.write(_canonical(save(tensors, metadata=metadata)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"task": task, "model_id": model.id, "path": out_path, "bytes": os.path.getsize(out_path),
            "tensors": len(tensors), "components": len(components), "format": fmt,
            "timm_create_model": timm_args}
