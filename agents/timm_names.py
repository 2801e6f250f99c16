"""Component tensor names <-> timm VisionTransformer state-dict names (torch-free).

One place for the mapping, used by root import (``agents.roots``) and by ``export --format timm``.
``residual_adapters.{i}`` is this project's extension: timm's ViT has no adapters.
"""
from __future__ import annotations

import re

FIXED_PREFIX = {"embedding": "patch_embed.proj", "encoder_norm": "norm", "head": "head"}
_INDEXED = re.compile(r"^(blocks|residual_adapters)\.(\d+)\.(.+)$")
# timm model names of the ViT configs a store's root can have (agents.vit.VIT_CONFIGS).
TIMM_MODELS = {"ti": "vit_tiny_patch16_224", "b": "vit_base_patch16_224", "l": "vit_large_patch16_224"}


def timm_key(component: str, tensor_name: str) -> str:
    if component == "cls":
        return "cls_token"
    if component == "posembed_input":
        return "pos_embed"
    if component in FIXED_PREFIX:
        return f"{FIXED_PREFIX[component]}.{tensor_name}"
    kind, _, index = component.rpartition("_")
    prefix = {"encoderblock": "blocks", "residual_adapter": "residual_adapters"}[kind]
    return f"{prefix}.{index}.{tensor_name}"


def component_key(key: str) -> tuple[str, str] | None:
    """Inverse of ``timm_key``; None for keys that are no component of ours."""
    if key == "cls_token":
        return "cls", "token"
    if key == "pos_embed":
        return "posembed_input", "pos_embedding"
    match = _INDEXED.match(key)
    if match:
        kind = "encoderblock" if match.group(1) == "blocks" else "residual_adapter"
        return f"{kind}_{match.group(2)}", match.group(3)
    for component, prefix in FIXED_PREFIX.items():
        if key.startswith(prefix + "."):
            return component, key[len(prefix) + 1:]
    return None
