"""Create the root model in a store once (race-safe across processes) and check it fits a preset.

The root is the seed of the whole system: every component of it belongs to the agent id ``root`` and is
frozen for everyone. It is either a random initialisation (the reference's random-init root) or
imported from a local timm ViT checkpoint file.
"""
from __future__ import annotations

import time

from agents.config import Preset
from agents.root_source import RootSource, resolve_root
from agents.roots import root_from_timm_checkpoint, root_random
from agents.view import ROOT_AGENT, to_raw
from agents.vit import VitConfig
from store import ComponentWrite, ModelRecord, StoreAPI

ROOT_MODEL_ID = f"{ROOT_AGENT}:m0"


class RootMismatch(ValueError):
    """The store's root was built for another architecture than the requested preset."""


def ensure_root(store: StoreAPI, preset: Preset, vit: VitConfig, seed: int = 0,
                source: RootSource | None = None) -> str:
    """Return the store's root model id, creating the root first if the store has none.

    ``source`` is the already resolved ``preset.root`` (the launcher resolves it before it creates
    anything); without it the spec is resolved here, building the built-in root if needed.
    """
    root_id = store.root_model_id()
    if root_id is None:
        hparams = preset.default_hparams(None)
        hparams["num_layers"] = vit.depth
        if source is None:
            source = resolve_root(preset.root, vit, int(hparams["ds_image_size"]))
        if source.kind == "random":
            params = root_random(vit, hparams, seed)
        else:
            params = root_from_timm_checkpoint(source.path, vit, hparams)
        writes, keys = [], []
        for i, (name, tensors) in enumerate(params.items()):
            cid = f"{ROOT_AGENT}:{i}"
            writes.append(ComponentWrite.build(cid, name, ROOT_AGENT,
                                               {k: to_raw(v) for k, v in tensors.items()}))
            keys.append(cid)
        model = ModelRecord(
            id=ROOT_MODEL_ID, task="root", agent=ROOT_AGENT, components=keys, hparams=hparams,
            metrics={"vit": vit.name, "hidden": vit.hidden, "depth": vit.depth, "patch": vit.patch,
                     "source": "random" if source.kind == "random" else "timm-checkpoint",
                     **source.provenance()},
            parent=None, preset=preset.name, preset_hash=preset.hash, created_at=time.time())
        root_id = store.ensure_root(model, writes)
    rec = store.get_model(root_id)
    m = rec.metrics
    if (m.get("hidden"), m.get("depth"), m.get("patch")) != (vit.hidden, vit.depth, vit.patch):
        raise RootMismatch(
            f"the store's root is a {m.get('vit')} ViT with {m.get('depth')} blocks; preset "
            f"{preset.name!r} needs {vit.name} with {vit.depth}: use a preset of the same budget family")
    return root_id

