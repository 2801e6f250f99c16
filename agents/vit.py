"""The ViT every path is assembled from: component layout, fresh initialisation, and `PathModel`.

A path (one task's model) is a flat set of named components (method.md 1.1) plus architecture hparams.
`PathModel` binds those components' tensors into a module WITHOUT copying them: trainable components
become `nn.Parameter`s over the caller's storage (optimizer steps write straight into the caller's
tensors), frozen components are used as plain tensors that autograd, `parameters()`, `state_dict()` and
`.to()` never see. Every stage in front of the first trainable component runs under `torch.no_grad()`,
so backward stops there: this is where a child that trains only its top layers saves compute.

The numerics follow vit_jax / timm exactly: pre-LN blocks, LayerNorm eps 1e-6, tanh-approximated GELU,
class token pooling, no dropout, no layer scale, no pre-logits. Blocks are timm's own `Block` (built on
the meta device, then given our tensors), so parity with `timm`'s VisionTransformer holds by construction
and is pinned by tests/test_vit.py.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# agents/__init__.py has already run here, which makes `import timm` work on CPU-only installs.
from timm.models.vision_transformer import Block

LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class VitConfig:
    """Fixed (never mutated) shape of the ViT family a swarm grows. `depth` = the root's block count."""

    name: str
    hidden: int
    mlp: int
    heads: int
    patch: int = 16
    depth: int = 12
    timm_name: str = ""

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"ViT config {self.name!r}: hidden {self.hidden} is not divisible by heads {self.heads}")
        if min(self.hidden, self.mlp, self.heads, self.patch) <= 0 or self.depth < 0:
            raise ValueError(f"ViT config {self.name!r}: sizes must be positive and depth >= 0")


# Depth here is the full depth of the matching timm checkpoint; a preset narrows it with
# `dataclasses.replace(cfg, depth=...)` (e.g. the VitT3 root keeps 3 of Ti/16's 12 blocks).
VIT_CONFIGS: dict[str, VitConfig] = {
    "ti": VitConfig("ti", hidden=192, mlp=768, heads=3, depth=12, timm_name="vit_tiny_patch16_224"),
    "b": VitConfig("b", hidden=768, mlp=3072, heads=12, depth=12, timm_name="vit_base_patch16_224"),
    "l": VitConfig("l", hidden=1024, mlp=4096, heads=16, depth=24, timm_name="vit_large_patch16_224"),
}


def vit_config(name: str, depth: int | None = None) -> VitConfig:
    """Registry lookup with an optional depth override; unknown names are a user error."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT config {name!r}; choose one of {sorted(VIT_CONFIGS)}")
    cfg = VIT_CONFIGS[name]
    return cfg if depth is None else dataclasses.replace(cfg, depth=depth)


def preset_vit(preset) -> VitConfig:
    """The architecture a preset grows: its budget's ViT with the root's depth (one place for it)."""
    return vit_config(preset.budget.vit, depth=preset.budget.depth)


# ----------------------------------------------------------------------------------------------------
# Component layout
# ----------------------------------------------------------------------------------------------------

_INDEXED_NAME = re.compile(r"^(encoderblock|residual_adapter)_(\d+)$")


def num_layers(hparams: Mapping[str, object]) -> int:
    layers = int(hparams["num_layers"])  # type: ignore[arg-type]
    if layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {layers}")
    return layers


def adapter_ids(hparams: Mapping[str, object]) -> list[int]:
    """Sorted layer ids that carry a residual adapter, parsed from `adapter_layers` ("" or e.g. "0_2")."""
    raw = str(hparams.get("adapter_layers", "") or "")
    if not raw:
        return []
    try:
        ids = sorted({int(part) for part in raw.split("_")})
    except ValueError:
        raise ValueError(f"adapter_layers must be layer ids joined by '_' (e.g. '0_2'), got {raw!r}") from None
    if ids[0] < 0:
        raise ValueError(f"adapter_layers holds a negative layer id: {raw!r}")
    return ids


def component_names(hparams: Mapping[str, object]) -> list[str]:
    """Component names of the model `hparams` describes, in forward order.

    Adapter ids at or above num_layers are ignored (the mutation code drops them; they would never run).
    """
    layers = num_layers(hparams)
    adapters = set(adapter_ids(hparams))
    names = ["cls", "embedding", "posembed_input"]
    for i in range(layers):
        if i in adapters:
            names.append(f"residual_adapter_{i}")
        names.append(f"encoderblock_{i}")
    return names + ["encoder_norm", "head"]


def image_grid(cfg: VitConfig, hparams: Mapping[str, object]) -> int:
    """Patches per image side for hparams' `ds_image_size`."""
    size = int(hparams["ds_image_size"])  # type: ignore[arg-type]
    if size <= 0 or size % cfg.patch:
        raise ValueError(f"ds_image_size must be a positive multiple of the patch size {cfg.patch}, got {size}")
    return size // cfg.patch


def param_shapes(name: str, cfg: VitConfig, hparams: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for one component (names are timm-like, see module docstring)."""
    d, m, p = cfg.hidden, cfg.mlp, cfg.patch
    if name == "cls":
        return {"token": (1, 1, d)}
    if name == "embedding":
        return {"weight": (d, 3, p, p), "bias": (d,)}
    if name == "posembed_input":
        grid = image_grid(cfg, hparams)
        return {"pos_embedding": (1, 1 + grid * grid, d)}
    if name == "encoder_norm":
        return {"weight": (d,), "bias": (d,)}
    if name == "head":
        return {"weight": (int(hparams["num_classes"]), d), "bias": (int(hparams["num_classes"]),)}  # type: ignore[arg-type]
    match = _INDEXED_NAME.match(name)
    if match and match.group(1) == "encoderblock":
        return {
            "norm1.weight": (d,), "norm1.bias": (d,),
            "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "norm2.weight": (d,), "norm2.bias": (d,),
            "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,),
            "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,),
        }
    if match:
        a = int(hparams["adapter_dim"])  # type: ignore[arg-type]
        return {
            "norm.weight": (d,), "norm.bias": (d,),
            "down.weight": (a, d), "down.bias": (a,),
            "up.weight": (d, a), "up.bias": (d,),
        }
    raise ValueError(f"unknown component name {name!r}")


# ----------------------------------------------------------------------------------------------------
# Fresh initialisation (method.md 1.4 and 6.1-6.2, i.e. the flax/vit_jax defaults)
# ----------------------------------------------------------------------------------------------------

def _uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator) -> Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> Tensor:
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def _lecun_normal(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    """flax `lecun_normal`: a standard normal truncated to [-2, 2], rescaled so the std is 1/sqrt(fan_in).

    0.8796... is the std of a standard normal truncated at +-2, which flax divides out.
    """
    scale = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(torch.empty(shape), 0.0, 1.0, -2.0, 2.0, generator=gen) * scale


def _xavier_uniform(shape: tuple[int, int], gen: torch.Generator, fused: int = 1) -> Tensor:
    """Glorot-uniform for a torch (out, in) kernel. `fused` = how many flax kernels are stacked along
    `out` (3 for qkv): flax initialises q, k and v as separate D x D kernels, so the bound uses out/fused."""
    fan_out, fan_in = shape[0] // fused, shape[1]
    return _uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)), gen)


def init_component(
    name: str, cfg: VitConfig, hparams: Mapping[str, object], generator: torch.Generator
) -> dict[str, Tensor]:
    """Fresh float32 CPU tensors for one component; deterministic given the generator's state.

    Blocks: xavier-uniform kernels (q/k/v each as its own D x D kernel), MLP biases N(0, 1e-6), attention
    biases 0. Adapter: LN 1/0, down = lecun-normal (truncated normal) + zero bias, up = zero (identity
    at insertion). Head zero, posemb N(0, 0.02), cls zero, patch embedding lecun-normal on 3*P*P.
    LayerNorms: weight 1, bias 0.
    """
    shapes = param_shapes(name, cfg, hparams)
    kind = _INDEXED_NAME.match(name).group(1) if _INDEXED_NAME.match(name) else name  # type: ignore[union-attr]
    out: dict[str, Tensor] = {}
    for tensor_name, shape in shapes.items():
        leaf = tensor_name.rsplit(".", 1)[-1]
        is_norm = tensor_name.startswith("norm") or kind == "encoder_norm"
        if is_norm:
            out[tensor_name] = torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        elif kind == "encoderblock" and leaf == "weight":
            out[tensor_name] = _xavier_uniform(shape, generator, fused=3 if "qkv" in tensor_name else 1)  # type: ignore[arg-type]
        elif kind == "encoderblock" and tensor_name.startswith("mlp."):
            out[tensor_name] = _normal(shape, 1e-6, generator)
        elif kind == "residual_adapter" and tensor_name == "down.weight":
            out[tensor_name] = _lecun_normal(shape, fan_in=shape[1], gen=generator)
        elif kind == "embedding" and leaf == "weight":
            out[tensor_name] = _lecun_normal(shape, fan_in=3 * cfg.patch * cfg.patch, gen=generator)
        elif kind == "posembed_input":
            out[tensor_name] = _normal(shape, 0.02, generator)
        else:  # cls, head, attention biases, adapter biases and up-projection, embedding bias
            out[tensor_name] = torch.zeros(shape)
    return out


def resize_posemb(posemb: Tensor, new_grid: int) -> Tensor:
    """Keep the class-token row, bilinearly resize the (G, G, D) grid to (new_grid, new_grid).

    Uses align_corners=False without antialiasing (timm's `resample_abs_pos_embed(..., 'bilinear',
    antialias=False)` computes the same). Returns the input itself when the grid already matches.
    """
    tokens, dim = posemb.shape[1] - 1, posemb.shape[2]
    grid = math.isqrt(tokens)
    if posemb.ndim != 3 or posemb.shape[0] != 1 or grid * grid != tokens:
        raise ValueError(f"position embedding must be (1, 1+G*G, D), got {tuple(posemb.shape)}")
    if grid == new_grid:
        return posemb
    cls_row, grid_rows = posemb[:, :1], posemb[:, 1:]
    image = grid_rows.reshape(1, grid, grid, dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(new_grid, new_grid), mode="bilinear", align_corners=False)
    grid_rows = image.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(posemb.dtype)
    return torch.cat([cls_row, grid_rows], dim=1)


# ----------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------

def count_params(cfg: VitConfig, hparams: Mapping[str, object]) -> dict[str, int]:
    """Number of parameters per component of the model `hparams` describes."""
    return {
        name: sum(math.prod(shape) for shape in param_shapes(name, cfg, hparams).values())
        for name in component_names(hparams)
    }


def count_flops(cfg: VitConfig, hparams: Mapping[str, object]) -> int:
    """Forward FLOPs for ONE image at hparams' image size, as 2 x multiply-accumulates.

    Counted: patch conv, qkv, attention scores (q.k), attention-weighted sum (p.v), output projection,
    MLP, adapters (down + up) and head. NOT counted: LayerNorm, softmax, GELU, bias and residual adds,
    position-embedding add. That is exactly what torch.utils.flop_counter.FlopCounterMode reports.
    """
    d, m = cfg.hidden, cfg.mlp
    grid = image_grid(cfg, hparams)
    tokens = 1 + grid * grid
    flops = 2 * grid * grid * d * 3 * cfg.patch * cfg.patch  # patch conv
    per_block = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d + 2 * 2 * tokens * d * m
    adapter = 2 * 2 * tokens * d * int(hparams.get("adapter_dim", 0) or 0)  # type: ignore[arg-type]
    layers = num_layers(hparams)
    flops += layers * per_block + sum(1 for i in adapter_ids(hparams) if i < layers) * adapter
    return flops + 2 * d * int(hparams["num_classes"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------

class _Tensors(nn.Module):
    """A component that is nothing but named tensors (cls token, position embedding)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))


class ResidualAdapter(nn.Module):
    """x + up(gelu_tanh(down(LN(x)))); identity while `up` is zero (its initial state)."""

    def __init__(self, dim: int, adapter_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.down = nn.Linear(dim, adapter_dim)
        self.up = nn.Linear(adapter_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.gelu(self.down(self.norm(x)), approximate="tanh"))


def _make_block(cfg: VitConfig) -> Block:
    return Block(
        dim=cfg.hidden,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp / cfg.hidden,
        qkv_bias=True,
        act_layer=partial(nn.GELU, approximate="tanh"),
        norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS),
    )


def _bind(module: nn.Module, component: str, tensors: Mapping[str, Tensor],
          shapes: Mapping[str, tuple[int, ...]], trainable: bool) -> dict[str, nn.Parameter]:
    """Replace `module`'s meta placeholders with the component's tensors, sharing their storage.

    Trainable tensors become `nn.Parameter`s over the same storage. Frozen ones are detached views (same
    memory, never any grad) set as plain attributes: invisible to parameters()/state_dict()/.to().
    """
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValueError(f"component {component!r} tensors do not match its layout: missing {missing}, unexpected {extra}")
    bound: dict[str, nn.Parameter] = {}
    for tensor_name, expected in shapes.items():
        tensor = tensors[tensor_name]
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"{component}.{tensor_name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
        owner_path, _, leaf = tensor_name.rpartition(".")
        owner = module.get_submodule(owner_path)
        placeholder = owner._parameters.pop(leaf)
        assert placeholder is not None and tuple(placeholder.shape) == tuple(expected), (component, tensor_name)
        if trainable:
            param = nn.Parameter(tensor.detach(), requires_grad=True)
            owner.register_parameter(leaf, param)
            bound[tensor_name] = param
        else:
            object.__setattr__(owner, leaf, tensor.detach())
    return bound


class PathModel(nn.Module):
    """One path's ViT over shared component tensors (see module docstring for the no-copy contract).

    Do not call `.to()`/`.half()` on it: place the component tensors on the device beforehand.
    """

    def __init__(self, cfg: VitConfig, hparams: Mapping[str, object],
                 params: Mapping[str, Mapping[str, Tensor]], trainable: Collection[str]) -> None:
        super().__init__()
        names = component_names(hparams)
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"parameters missing for components {missing}")
        strangers = sorted(set(trainable) - set(names))
        if strangers:
            raise ValueError(f"trainable components {strangers} are not part of this model")
        self.cfg = cfg
        self.hparams = dict(hparams)
        self.trainable_components = frozenset(trainable)
        layers, ids = num_layers(hparams), adapter_ids(hparams)
        with torch.device("meta"):  # placeholders only: every tensor is replaced by the caller's below
            self.cls = _Tensors(param_shapes("cls", cfg, hparams))
            self.embedding = nn.Conv2d(3, cfg.hidden, cfg.patch, stride=cfg.patch)
            self.posembed_input = _Tensors(param_shapes("posembed_input", cfg, hparams))
            self.adapters = nn.ModuleDict(
                {str(i): ResidualAdapter(cfg.hidden, int(hparams["adapter_dim"])) for i in ids if i < layers}  # type: ignore[arg-type]
            )
            self.blocks = nn.ModuleList([_make_block(cfg) for _ in range(layers)])
            self.encoder_norm = nn.LayerNorm(cfg.hidden, eps=LAYER_NORM_EPS)
            self.head = nn.Linear(cfg.hidden, int(hparams["num_classes"]))  # type: ignore[arg-type]

        modules: dict[str, nn.Module] = {"cls": self.cls, "embedding": self.embedding,
                                         "posembed_input": self.posembed_input,
                                         "encoder_norm": self.encoder_norm, "head": self.head}
        modules.update({f"residual_adapter_{i}": m for i, m in self.adapters.items()})
        modules.update({f"encoderblock_{i}": m for i, m in enumerate(self.blocks)})
        self._trainable: dict[tuple[str, str], nn.Parameter] = {}
        for name in names:
            bound = _bind(modules[name], name, params[name], param_shapes(name, cfg, hparams), name in trainable)
            self._trainable.update({(name, t): p for t, p in bound.items()})

        # Stages in forward order; the head is applied separately (forward_head).
        # The stem is stored as None (not a bound method) to keep the module free of reference cycles.
        stages: list[tuple[tuple[str, ...], nn.Module | None]] = [(("cls", "embedding", "posembed_input"), None)]
        for i in range(layers):
            if str(i) in self.adapters:
                stages.append(((f"residual_adapter_{i}",), self.adapters[str(i)]))
            stages.append(((f"encoderblock_{i}",), self.blocks[i]))
        stages.append((("encoder_norm",), self.encoder_norm))
        self._stages = stages
        first = next((k for k, (comps, _) in enumerate(stages) if self.trainable_components & set(comps)),
                     len(stages))
        # Components that run without autograd because nothing below them trains.
        self.frozen_prefix: tuple[str, ...] = tuple(c for comps, _ in stages[:first] for c in comps)
        self._first_trainable_stage = first

    def _stem(self, x: Tensor) -> Tensor:
        tokens = self.embedding(x).flatten(2).transpose(1, 2)
        cls = self.cls.token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.posembed_input.pos_embedding

    def _run(self, stage: nn.Module | None, h: Tensor) -> Tensor:
        return self._stem(h) if stage is None else stage(h)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D): encoder_norm output of the class token."""
        first = self._first_trainable_stage
        if x.requires_grad:
            first = 0  # the caller wants input gradients (e.g. saliency): keep the whole graph
        h = x
        if first > 0:
            with torch.no_grad():
                for _, stage in self._stages[:first]:
                    h = self._run(stage, h)
        for _, stage in self._stages[first:]:
            h = self._run(stage, h)
        return h[:, 0]

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def trainable_tensors(self) -> dict[tuple[str, str], nn.Parameter]:
        """(component, tensor name) -> the Parameter sharing storage with the caller's tensor."""
        return dict(self._trainable)
