"""A cache of frozen-prefix activations: a child that trains only its top pays only for its top.

`PathModel` runs every stage below its first trainable component without autograd (its frozen prefix,
`PathModel.forward_prefix`). That output is a function of three things only: the image, the frozen
components' tensors and the input size. Components are immutable once stored and named by
`Component.key` ("owner:cid"); the ViT has no dropout and its LayerNorms keep no running statistics, so
train and eval mode compute the same. Hence an entry keyed by (image size, the prefix's (name, key)
pairs, cls-only flag) and the split is exact: `forward_suffix(cached rows)` equals `forward(images)` up
to float rounding (BLAS blocks a chunk of 512 differently from a batch; about 1e-6, not bitwise).

Assumptions the key does not spell out: one cache serves one swarm's `VitConfig` (head count and patch
size are fixed per swarm) and one task's data: a split name means the same images each time (an entry
remembers which tensor it was filled from and is refilled if the caller passes another one).

When it is not used (the caller decides; `prefix_key` and `augment_is_identity` say which):
* the model has no frozen prefix (its stem trains, e.g. a full clone): `prefix_key` is None;
* training augmentation is not the identity: every step sees new pixels, so training batches cannot
  come from a cache (validation and test inputs still can, they are `preprocess_eval`'d);
* an entry would exceed the cap: the requested rows are computed and returned, nothing is stored.

Rows are filled on first request, not eagerly, so a cache never costs more prefix forwards than the
uncached path would have run (each row at most once while its entry lives).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from agents.config import DEFAULT_PREFIX_CACHE_MB
from agents.paths import ModelPath
from agents.vit import PathModel
from taskdata.augment import AugmentParams, preprocess_eval

DEFAULT_MAX_BYTES = DEFAULT_PREFIX_CACHE_MB << 20
CHUNK = 512  # images per prefix forward while filling: bounds the transient activation memory

PrefixKey = tuple[int, tuple[tuple[str, str], ...], bool]


def prefix_key(path: ModelPath, model: PathModel, image_size: int) -> PrefixKey | None:
    """What the prefix output of `model` (built from `path`) depends on besides the image; None when
    the model has no frozen prefix."""
    if not model.has_frozen_prefix:
        return None
    frozen = tuple((name, path.components[name].key) for name in model.frozen_prefix)
    return (int(image_size), frozen, model.prefix_keeps_cls_only)


def augment_is_identity(hparams: Mapping[str, Any]) -> bool:
    """True iff `augment_train` with these ds_* hparams returns `preprocess_eval`'s output bit for bit
    and draws nothing from its generator: every AugmentParams field at its default, which means off."""
    return AugmentParams.from_hparams(hparams) == AugmentParams()


class _Entry:
    """One split's prefix outputs, filled row by row as rows are asked for (``done`` marks them)."""

    __slots__ = ("outputs", "done", "source")

    def __init__(self, outputs: Tensor, source: tuple) -> None:
        self.outputs, self.source = outputs, source
        self.done = torch.zeros(outputs.shape[0], dtype=torch.bool, device=outputs.device)


def _source(images: Tensor) -> tuple:
    """Which tensor an entry was filled from (cheap identity, not a hash of the pixels)."""
    return (images.device, images.data_ptr(), tuple(images.shape))


class PrefixCache:
    """LRU over per-split prefix outputs (filled lazily, row by row), float32 on the images' device,
    at most `max_bytes` in all (an entry reserves its whole split when it is created)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[PrefixKey, str], _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.filled_images = 0  # images this cache ran through a prefix (entry fills and uncached rows)
        self._untaken = 0       # the same since the last take_filled()

    @property
    def bytes(self) -> int:
        return sum(e.outputs.nbytes for e in self._entries.values())

    @property
    def entries(self) -> int:
        return len(self._entries)

    def take_filled(self) -> int:
        """Images run through a prefix since the last call, so the caller can charge their FLOPs."""
        taken, self._untaken = self._untaken, 0
        return taken

    def clear(self) -> None:
        self._entries.clear()

    def outputs(self, key: PrefixKey | None, model: PathModel, split: str, images_uint8: Tensor,
                image_size: int, rows: Tensor | None = None) -> Tensor:
        """`model.forward_prefix(preprocess_eval(images_uint8[rows], image_size))`, served from the
        split's entry. `rows`: LongTensor of indices into the split, or None for all of it (then the
        stored tensor itself is returned: read it, never write into it).

        Rows are computed the first time they are asked for, never before: a child that draws 3,000
        of a split's 10,000 images pays for 3,000 prefix forwards, the same as without a cache, and
        every later step (and child with the same prefix) that draws them again pays nothing."""
        if key is None:
            raise ValueError("the model has no frozen prefix: nothing to cache (prefix_key returned None)")
        slot = (key, split)
        n = int(images_uint8.shape[0])
        shape = (1 if model.prefix_keeps_cls_only else 1 + (image_size // model.cfg.patch) ** 2, model.cfg.hidden)
        entry = self._entries.get(slot)
        if entry is None or entry.source != _source(images_uint8):
            self._entries.pop(slot, None)  # filled from other images under the same split name
            size = n * shape[0] * shape[1] * 4
            if size > self.max_bytes:  # never stored: compute just what was asked for
                self.misses += 1
                wanted = images_uint8 if rows is None else images_uint8[rows.to(images_uint8.device)]
                return self._run(model, wanted, image_size, shape)
            while self._entries and self.bytes + size > self.max_bytes:
                self._entries.popitem(last=False)
            with torch.inference_mode(False):
                entry = _Entry(torch.empty((n, *shape), dtype=torch.float32, device=images_uint8.device),
                               _source(images_uint8))
            self._entries[slot] = entry
        self._entries.move_to_end(slot)
        wanted = None if rows is None else rows.to(entry.outputs.device)
        missing = (~entry.done).nonzero().flatten() if wanted is None else \
            torch.unique(wanted[~entry.done[wanted]])
        if missing.numel():
            self.misses += 1
            with torch.inference_mode(False):
                entry.outputs[missing] = self._run(model, images_uint8[missing.to(images_uint8.device)],
                                                   image_size, shape)
                entry.done[missing] = True
        else:
            self.hits += 1
        return entry.outputs if wanted is None else entry.outputs[wanted]

    def _run(self, model: PathModel, images_uint8: Tensor, image_size: int, shape: tuple[int, int]) -> Tensor:
        """The prefix outputs (N, *shape) of `images_uint8`, CHUNK images at a time."""
        n = int(images_uint8.shape[0])
        # Filled outside inference mode even when the caller is in it (e.g. an accuracy pass): an
        # inference tensor could never be fed to a suffix that trains.
        with torch.inference_mode(False):
            out = torch.empty((n, *shape), dtype=torch.float32, device=images_uint8.device)
            for i in range(0, n, CHUNK):
                h = model.forward_prefix(preprocess_eval(images_uint8[i:i + CHUNK], image_size))
                if tuple(h.shape[1:]) != shape:  # assignment would broadcast a wrong token count silently
                    raise RuntimeError(f"prefix output {tuple(h.shape)}, expected (B, {shape[0]}, {shape[1]})")
                out[i:i + CHUNK] = h
        self.filled_images += n
        self._untaken += n
        return out
