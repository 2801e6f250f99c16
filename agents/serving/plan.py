"""The served system as one prefix tree: every served task's paths, each distinct frozen prefix once.

A path's forward is a chain of stages (``PathModel.stage_components``: the stem, then one stage per
block or adapter, then encoder_norm). A stage's output depends only on its input and its components'
tensors, and a published component never changes, so two paths whose first k stages use the same
component ids at the same image size compute the same tokens for the same image. The plan merges the
chains of every served path into a tree keyed by (image size, component ids of each stage) and runs
a batch down it: each node once, on the union of the images its tasks were asked about. A multipath
task contributes all its paths (main path first), so a borrowed path is the very node its owner's
task uses. The head, a multipath model's router and connectors, run per task at the leaves.

A plan is immutable once built: a server swaps in a new plan when the store changes, and a batch
that started on the old one finishes on it (``agents.serving.server``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from agents import registry
from agents.multipath import MultipathModel, trainable_flops
from agents.vit import PathModel
from taskdata.augment import preprocess_eval, to_tensor


@dataclass(frozen=True)
class TaskInfo:
    """What a client may know about a served task's model (``GET /v1/tasks``)."""

    task: str
    kind: str
    model_id: str
    num_classes: int
    labels: tuple[str, ...] | None
    image_sizes: tuple[int, ...]
    params: int
    flops_per_image: int
    val_accuracy: float | None
    test_accuracy: float | None
    published_at: float
    borrows: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "kind": self.kind, "model_id": self.model_id,
                "num_classes": self.num_classes, "labels": list(self.labels) if self.labels else None,
                "image_sizes": list(self.image_sizes), "params": self.params,
                "flops_per_image": self.flops_per_image, "val_accuracy": self.val_accuracy,
                "test_accuracy": self.test_accuracy, "published_at": self.published_at,
                "borrows": list(self.borrows)}


@dataclass
class ServedPath:
    """One path of a served model: its frozen module and the component ids of each of its stages."""

    module: PathModel
    stage_keys: list[tuple[str, ...]]

    @property
    def image_size(self) -> int:
        return int(self.module.hparams["ds_image_size"])


@dataclass
class ServedModel:
    """A task's model as the plan runs it: paths (main first) and, for multipath, the combiner."""

    info: TaskInfo
    paths: list[ServedPath]
    combiner: MultipathModel | None = None

    def head_flops(self) -> int:
        main = self.paths[0].module
        flops = int(registry.kind("head").flops(main.cfg, main.hparams))
        if self.combiner is not None:
            flops += trainable_flops(main.cfg, self.combiner.hparams)
        return flops


def stage_flops(path: PathModel, index: int) -> int:
    """Forward FLOPs of one image through one stage of ``path`` (the registry's count)."""
    per_component = registry.component_flops(path.cfg, path.hparams)
    return sum(per_component[c] for c in path.stage_components[index])


@dataclass(eq=False)
class _Node:
    path: PathModel | None            # a path that owns this stage (None for an image-size node)
    stage: int                        # its stage index in ``path``
    tasks: set[str] = field(default_factory=set)
    children: dict[tuple[str, ...], "_Node"] = field(default_factory=dict)
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (task, path slot) ending here


class Plan:
    """The prefix tree over ``models`` (task -> ServedModel); ``run`` answers a batch."""

    def __init__(self, models: Mapping[str, ServedModel], version: int = 0) -> None:
        self.models = dict(models)
        self.version = version
        self.roots: dict[int, _Node] = {}
        for task, model in self.models.items():
            for slot, path in enumerate(model.paths):
                node = self.roots.setdefault(path.image_size, _Node(None, -1))
                node.tasks.add(task)
                for index, keys in enumerate(path.stage_keys):
                    child = node.children.get(keys)
                    if child is None:
                        child = node.children[keys] = _Node(path.module, index)
                    child.tasks.add(task)
                    node = child
                node.consumers.append((task, slot))

    # ---- accounting -------------------------------------------------------------------------------
    def nodes(self) -> list[_Node]:
        out, stack = [], list(self.roots.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.path is not None:
                out.append(node)
        return out

    def flops(self, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Forward FLOPs of one image asked of ``tasks`` (default: all): each path on its own
        (``separate``), through the tree (``shared``), and their ratio: the speed-up the shared
        prefixes can give at most."""
        chosen = set(self.models if tasks is None else tasks)
        heads = sum(self.models[t].head_flops() for t in chosen)
        separate = heads + sum(stage_flops(p.module, i) for t in chosen for p in self.models[t].paths
                               for i in range(len(p.stage_keys)))
        shared = heads + sum(stage_flops(n.path, n.stage) for n in self.nodes() if n.tasks & chosen)
        return {"separate": float(separate), "shared": float(shared),
                "bound": separate / shared if shared else 1.0}

    # ---- inference --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, images: Sequence[np.ndarray], rows: Mapping[str, np.ndarray],
            device: torch.device) -> dict[str, Tensor]:
        """Logits of each task for the images it is asked about.

        ``images``: uint8 arrays (H, W, C) with C in {1, 3}, any sizes; ``rows[task]``: sorted
        indices into ``images``. Returns task -> (len(rows[task]), classes) float logits (CPU)."""
        rows = {t: np.asarray(r, dtype=np.int64) for t, r in rows.items() if len(r)}
        unknown = sorted(set(rows) - set(self.models))
        if unknown:
            raise KeyError(f"not served: {', '.join(unknown)}")
        feats: dict[tuple[str, int], tuple[np.ndarray, Tensor]] = {}

        def union(node: _Node) -> np.ndarray:
            parts = [rows[t] for t in node.tasks if t in rows]
            return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)

        def walk(node: _Node, h: Tensor, have: np.ndarray) -> None:
            for child in node.children.values():
                want = union(child)
                if not len(want):
                    continue
                x = h if len(want) == len(have) else h[torch.from_numpy(np.searchsorted(have, want)).to(h.device)]
                y = child.path.run_stage(child.stage, x)
                for consumer in child.consumers:
                    feats[consumer] = (want, y[:, 0])
                walk(child, y, want)

        for size, root in self.roots.items():
            want = union(root)
            if len(want):
                walk(root, model_inputs(images, want, size, device), want)

        out: dict[str, Tensor] = {}
        for task, want in rows.items():
            model = self.models[task]
            picked = []
            for slot in range(len(model.paths)):
                have, f = feats[(task, slot)]
                picked.append(f[torch.from_numpy(np.searchsorted(have, want)).to(f.device)])
            logits = model.paths[0].module.forward_head(picked[0])
            if model.combiner is not None:
                logits = model.combiner.combine([logits] + picked[1:])
            out[task] = logits.float().cpu()
        return out


def model_inputs(images: Sequence[np.ndarray], rows: np.ndarray, size: int,
                 device: torch.device) -> Tensor:
    """The rows' images preprocessed as every served model's evaluation does (``preprocess_eval``),
    resized to ``size``; images of one shape are converted together."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for pos, row in enumerate(rows):
        groups.setdefault(images[row].shape, []).append(pos)
    if len(groups) == 1:
        return preprocess_eval(to_tensor(np.stack([images[r] for r in rows]), device), size)
    out = torch.empty(len(rows), 3, size, size, device=device)
    for positions in groups.values():
        batch = np.stack([images[rows[p]] for p in positions])
        out[torch.tensor(positions, device=device)] = preprocess_eval(to_tensor(batch, device), size)
    return out
