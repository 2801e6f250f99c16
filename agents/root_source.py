"""``--root`` as a user types it: where a store's root model comes from.

    random                  a random initialisation (the reference's random-init root)
    PATH                    a local timm ViT checkpoint (.safetensors, or a torch.save'd state dict)
    glyphs_cjk              the built-in offline pretrained root, built on first use (agents.pretrain)
    NAME                    a root built on this machine with ``launch/make_root.py --name NAME``
    timm:MODEL_NAME         timm's pretrained weights through its own hub loading (needs the network;
                            with HF_HUB_OFFLINE=1 or no connection it fails at once, one line)

Everything but ``random`` resolves to a local checkpoint file, which ``agents.roots`` imports (first
``depth`` blocks, posemb resized, head dropped). The store's root record keeps the spec, the file's
sha256 and the corpus, so every result can say what it started from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agents.roots import CheckpointError
from agents.vit import VitConfig

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class RootSource:
    spec: str                    # what the user typed
    kind: str                    # random | file | built | timm
    path: Path | None = None     # the checkpoint file (None for random)
    card: dict | None = None     # a built root's card

    def provenance(self) -> dict:
        """What the store's root record and the benchmark results say about the root."""
        from agents.pretrain import file_sha256

        out = {"root_spec": self.spec, "root_kind": self.kind}
        if self.path is not None:
            out["root_file_sha256"] = (self.card or {}).get("file_sha256") or file_sha256(self.path)
        if self.card is not None:
            out["root_corpus"] = self.card["corpus"].get("name")
            out["root_key"] = self.card.get("key")
            out["root_heldout_accuracy"] = self.card.get("heldout_test_accuracy")
        return out


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(".") or spec.endswith((".safetensors", ".pth", ".pt", ".bin"))


def resolve_root(spec: str, vit: VitConfig, image_size: int, *, build: bool = True,
                 cache_dir=None, log=print) -> RootSource:
    """Resolve ``spec`` to a RootSource; builds the built-in root if needed and ``build`` is set.

    Raises CheckpointError (a user error) with one line for anything that cannot be had.
    """
    spec = spec.strip()
    if not spec:
        raise CheckpointError("--root is empty: use random, a checkpoint file, glyphs_cjk, a built root "
                              "name, or timm:MODEL_NAME")
    if spec == "random":
        return RootSource(spec, "random")
    if spec.startswith(TIMM_PREFIX):
        return RootSource(spec, "timm", _timm_weights(spec[len(TIMM_PREFIX):], cache_dir, log))
    path = Path(spec).expanduser()
    if path.is_file():
        return RootSource(spec, "file", path)
    if _looks_like_path(spec):
        raise CheckpointError(f"--root {spec}: no such checkpoint file")
    from agents import pretrain

    if spec == pretrain.BUILTIN_ROOT:
        recipe = pretrain.recipe_for(spec, vit, image_size)
        if not build:
            found = [r for r in pretrain.find_built(spec, cache_dir) if _fits(r.card, vit, image_size)]
            if not found:
                raise CheckpointError(f"root {spec} for ViT-{vit.name} x{vit.depth} at {image_size} px is "
                                      "not built yet: run launch/make_root.py")
            return RootSource(spec, "built", found[0].path, found[0].card)
        built = pretrain.build_root(recipe, cache_dir, log=log)
        return RootSource(spec, "built", built.path, built.card)
    found = [r for r in pretrain.find_built(spec, cache_dir) if _fits(r.card, vit, None)]
    if found:
        return RootSource(spec, "built", found[0].path, found[0].card)
    names = pretrain.built_names(cache_dir)
    raise CheckpointError(
        f"unknown root {spec!r}: use random, a checkpoint file, {pretrain.BUILTIN_ROOT}, timm:MODEL_NAME, "
        f"or a root built with launch/make_root.py --name NAME for ViT-{vit.name} with >= {vit.depth} "
        f"blocks (built here: {', '.join(names) or 'none'})")


def _fits(card: dict, vit: VitConfig, image_size: int | None) -> bool:
    r = card.get("recipe", {})
    return (r.get("vit") == vit.name and int(r.get("depth", -1)) >= vit.depth
            and (image_size is None or r.get("image_size") == image_size))


def _timm_weights(model_name: str, cache_dir, log) -> Path:
    """timm's pretrained weights for ``model_name`` saved once as a local safetensors file."""
    from agents.pretrain import roots_dir

    if not model_name:
        raise CheckpointError("--root timm: needs a model name, e.g. timm:vit_tiny_patch16_224.augreg_in21k")
    target = roots_dir(cache_dir) / "timm" / f"{model_name.replace('/', '_')}.safetensors"
    if target.is_file():
        return target
    import agents  # noqa: F401  (torchvision shim before timm)
    import timm

    base = model_name.split(".", 1)[0]
    if not timm.is_model(base):
        raise CheckpointError(f"--root timm:{model_name}: timm has no model {base!r}")
    log(f"root: downloading timm weights for {model_name}")
    try:
        model = timm.create_model(model_name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure is the same user error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        offline = " (HF_HUB_OFFLINE=1 is set: set HF_HUB_OFFLINE=0 to download)" \
            if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise CheckpointError(f"--root timm:{model_name}: cannot get pretrained weights{offline}: "
                              f"{first[:160]}; or pass a local checkpoint file") from None
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, target)
    return target
