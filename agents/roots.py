"""Root models (the seed every path grows from) and the mapping between components and timm names.

A root is a component dict without a head (heads are per task): cls, embedding, posembed_input at the
requested image size, `cfg.depth` encoder blocks and encoder_norm. It is either freshly initialised
(`root_random`) or read from a local timm ViT state-dict file (`root_from_timm_checkpoint`), e.g. the
AugReg Ti/16 weights the VitT3 root uses (docs/method.md 1.3).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from agents import registry
from agents.vit import VitConfig, component_names, image_grid, init_component, param_shapes, resize_posemb
from agents.timm_names import component_key, timm_key


class CheckpointError(ValueError):
    """A root checkpoint file is missing, unreadable, or does not fit the ViT config."""


def timm_state_dict(params: Mapping[str, Mapping[str, Tensor]], hparams: Mapping[str, object]) -> dict[str, Tensor]:
    """timm VisionTransformer names for the components `hparams` uses (extra components are ignored).

    The tensors are the caller's own (no copies). Adapters appear as `residual_adapters.{i}.*`.
    """
    missing = [name for name in component_names(hparams) if name not in params]
    if missing:
        raise ValueError(f"cannot build a timm state dict: parameters missing for components {missing}")
    return {
        timm_key(name, tensor_name): tensor
        for name in component_names(hparams)
        for tensor_name, tensor in params[name].items()
    }


def params_from_timm_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Group a timm-named state dict into components; also returns the keys that map to no component."""
    params: dict[str, dict[str, Tensor]] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        target = component_key(key)
        if target is None:
            unmapped.append(key)
        else:
            params.setdefault(target[0], {})[target[1]] = tensor
    return params, unmapped


def root_component_names(cfg: VitConfig) -> list[str]:
    """Everything a root carries: every in-root kind (registry) at all `cfg.depth` layers; for the
    built-in kinds that is all blocks, no adapters, no head."""
    return registry.root_component_names(cfg)


def root_random(cfg: VitConfig, hparams: Mapping[str, object], seed: int) -> dict[str, dict[str, Tensor]]:
    """A randomly initialised root (VitT0-style), deterministic in `seed`; posemb at hparams' image size."""
    generator = torch.Generator().manual_seed(seed)
    return {name: init_component(name, cfg, hparams, generator) for name in root_component_names(cfg)}


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"root checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure is the same user error: not a readable state dict
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read root checkpoint {path}: {first_line}") from None
    for wrapper in ("state_dict", "model"):  # common training-script wrappings
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"root checkpoint {path} does not hold a tensor state dict")
    return state


def root_from_timm_checkpoint(path: str | Path, cfg: VitConfig, hparams: Mapping[str, object]) -> dict[str, dict[str, Tensor]]:
    """Import a root from a local timm ViT state dict (torch.save'd dict or .safetensors).

    Keeps the first `cfg.depth` blocks, resizes pos_embed to hparams' image grid (class row kept,
    bilinear grid) and drops the head. Tensors come back as float32, contiguous, on the CPU.
    """
    path = Path(path)
    state = _load_state_dict(path)
    components, unmapped = params_from_timm_state_dict(state)
    if unmapped:
        raise CheckpointError(
            f"{path.name} has tensors a plain pre-LN class-token ViT does not use (e.g. {unmapped[0]!r}); "
            f"it is not a {cfg.timm_name or 'timm ViT'} checkpoint")
    wanted = root_component_names(cfg)
    absent = [name for name in wanted if name not in components]
    if absent:
        raise CheckpointError(f"{path.name} lacks components {absent[:3]} needed by ViT config "
                              f"{cfg.name!r} with depth {cfg.depth}")
    grid = image_grid(cfg, hparams)
    root: dict[str, dict[str, Tensor]] = {}
    for name in wanted:
        tensors = {t: v.detach().to(torch.float32).contiguous() for t, v in components[name].items()}
        if name == "posembed_input":
            posemb = tensors.get("pos_embedding")
            tokens = -1 if posemb is None else posemb.shape[1] - 1
            if posemb is None or posemb.ndim != 3 or tokens < 1 or math.isqrt(tokens) ** 2 != tokens \
                    or posemb.shape[2] != cfg.hidden:
                raise CheckpointError(f"{path.name}: pos_embed must be (1, 1+G*G, {cfg.hidden}) with a class "
                                      f"token row, got {None if posemb is None else tuple(posemb.shape)}")
            tensors["pos_embedding"] = resize_posemb(posemb, grid).contiguous()
        expected = param_shapes(name, cfg, hparams)
        got = {t: tuple(v.shape) for t, v in tensors.items()}
        if got != {t: tuple(s) for t, s in expected.items()}:
            bad = sorted(set(got.items()) ^ set((t, tuple(s)) for t, s in expected.items()))[0]
            raise CheckpointError(f"{path.name}: component {name!r} does not fit ViT config {cfg.name!r} "
                                  f"(hidden {cfg.hidden}, mlp {cfg.mlp}, patch {cfg.patch}): mismatch at {bad}")
        root[name] = tensors
    return root
