"""The ViT every path is assembled from: component layout, fresh initialisation, and `PathModel`.

A path (one task's model) is a flat set of named components (docs/method.md 1.1) plus architecture hparams.
`PathModel` binds those components' tensors into a module WITHOUT copying them: trainable components
become `nn.Parameter`s over the caller's storage (optimizer steps write straight into the caller's
tensors), frozen components are used as plain tensors that autograd, `parameters()`, `state_dict()` and
`.to()` never see. Every stage in front of the first trainable component runs under `torch.no_grad()`,
so backward stops there: this is where a child that trains only its top layers saves compute.
`forward_prefix` / `forward_suffix` split the forward at that point, so the prefix output can be
computed once per image and cached (agents.prefix_cache).

The numerics follow vit_jax / timm exactly: pre-LN blocks, LayerNorm eps 1e-6, tanh-approximated GELU,
class token pooling, no dropout, no layer scale, no pre-logits. Blocks are timm's own `Block` (built on
the meta device, then given our tensors), so parity with `timm`'s VisionTransformer holds by construction
and is pinned by tests/test_vit.py.

Which components exist, their shapes and FLOPs are the component kinds of `agents.registry`; this module
registers each built-in kind's fresh init (and the posemb's seeding from the root). A kind registered
elsewhere runs inside `PathModel` as an x -> x stage at its slot when it registers a module.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents import compute, registry

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
# Component layout: the kinds, their shapes and FLOPs live in agents.registry (torch-free); these are
# the names the rest of the agent stack has always imported from here.
# ----------------------------------------------------------------------------------------------------

num_layers = registry.num_layers
image_grid = registry.image_grid


def adapter_ids(hparams: Mapping[str, object]) -> list[int]:
    """Sorted layer ids that carry a residual adapter, parsed from `adapter_layers` ("" or e.g. "0_2")."""
    return registry.layer_ids(hparams, "adapter_layers")


def component_names(hparams: Mapping[str, object]) -> list[str]:
    """Component names of the model `hparams` describes, in forward order (every registered kind).

    Adapter ids at or above num_layers are ignored (the mutation code drops them; they would never run).
    """
    return registry.component_names(hparams)


def param_shapes(name: str, cfg: VitConfig, hparams: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for one component (names are timm-like, see module docstring)."""
    return registry.param_shapes(name, cfg, hparams)


# ----------------------------------------------------------------------------------------------------
# Fresh initialisation (docs/method.md 1.4 and 6.1-6.2, i.e. the flax/vit_jax defaults)
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


def _norm(shape: tuple[int, ...], leaf: str) -> Tensor:
    """LayerNorm tensors: weight 1, bias 0."""
    return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)


def _zeros(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    return {t: torch.zeros(shape) for t, shape in shapes.items()}


# Each init draws from the generator in the order of its kind's tensors (the registry's shapes), so a
# seeded generator gives the same tensors every time; tests/test_vit.py pins the values' statistics.

@registry.register_init("cls")
def _init_cls(cfg: VitConfig, hparams: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    return _zeros(registry.kind("cls").shapes(cfg, hparams))


@registry.register_init("embedding")
def _init_embedding(cfg: VitConfig, hparams: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    shapes = registry.kind("embedding").shapes(cfg, hparams)
    return {"weight": _lecun_normal(shapes["weight"], fan_in=3 * cfg.patch * cfg.patch, gen=gen),
            "bias": torch.zeros(shapes["bias"])}


@registry.register_init("posembed_input")
def _init_posemb(cfg: VitConfig, hparams: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    shapes = registry.kind("posembed_input").shapes(cfg, hparams)
    return {t: _normal(shape, 0.02, gen) for t, shape in shapes.items()}


@registry.register_init("encoderblock")
def _init_block(cfg: VitConfig, hparams: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for tensor_name, shape in registry.kind("encoderblock").shapes(cfg, hparams).items():
        leaf = tensor_name.rsplit(".", 1)[-1]
        if tensor_name.startswith("norm"):
            out[tensor_name] = _norm(shape, leaf)
        elif leaf == "weight":
            out[tensor_name] = _xavier_uniform(shape, gen, fused=3 if "qkv" in tensor_name else 1)  # type: ignore[arg-type]
        elif tensor_name.startswith("mlp."):
            out[tensor_name] = _normal(shape, 1e-6, gen)
        else:  # attention biases
            out[tensor_name] = torch.zeros(shape)
    return out


@registry.register_init("residual_adapter")
def _init_adapter(cfg: VitConfig, hparams: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for tensor_name, shape in registry.kind("residual_adapter").shapes(cfg, hparams).items():
        if tensor_name.startswith("norm"):
            out[tensor_name] = _norm(shape, tensor_name.rsplit(".", 1)[-1])
        elif tensor_name == "down.weight":
            out[tensor_name] = _lecun_normal(shape, fan_in=shape[1], gen=gen)
        else:  # biases and the up-projection: the adapter is the identity at insertion
            out[tensor_name] = torch.zeros(shape)
    return out


@registry.register_init("encoder_norm")
def _init_encoder_norm(cfg: VitConfig, hparams: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    return {t: _norm(shape, t) for t, shape in registry.kind("encoder_norm").shapes(cfg, hparams).items()}


@registry.register_init("head")
def _init_head(cfg: VitConfig, hparams: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    return _zeros(registry.kind("head").shapes(cfg, hparams))


def init_component(
    name: str, cfg: VitConfig, hparams: Mapping[str, object], generator: torch.Generator
) -> dict[str, Tensor]:
    """Fresh float32 CPU tensors for one component (its kind's registered init); deterministic given
    the generator's state.

    Blocks: xavier-uniform kernels (q/k/v each as its own D x D kernel), MLP biases N(0, 1e-6), attention
    biases 0. Adapter: LN 1/0, down = lecun-normal (truncated normal) + zero bias, up = zero (identity
    at insertion). Head zero, posemb N(0, 0.02), cls zero, patch embedding lecun-normal on 3*P*P.
    LayerNorms: weight 1, bias 0.
    """
    kind = registry.kind_of(name)
    if kind.init is None:
        raise ValueError(f"component kind {kind.name!r} has no registered init (registry.register_init)")
    out = kind.init(cfg, hparams, generator)
    shapes = kind.shapes(cfg, hparams)
    got = {t: tuple(v.shape) for t, v in out.items()}
    if got != {t: tuple(s) for t, s in shapes.items()}:
        raise ValueError(f"init of {name!r} made tensors {got}, its kind's shapes are {shapes}")
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


@registry.register_root_seed("posembed_input")
def _posemb_from_root(root_posemb: Tensor, cfg: VitConfig, hparams: Mapping[str, object]) -> dict[str, Tensor]:
    """No ancestor at this image size: the root's posemb resized (docs/method.md 2.3 step 6)."""
    return {"pos_embedding": resize_posemb(root_posemb, image_grid(cfg, hparams))}


# ----------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------

def count_params(cfg: VitConfig, hparams: Mapping[str, object]) -> dict[str, int]:
    """Number of parameters per component of the model `hparams` describes."""
    return registry.component_params(cfg, hparams)


def count_flops(cfg: VitConfig, hparams: Mapping[str, object]) -> int:
    """Forward FLOPs for ONE image at hparams' image size, as 2 x multiply-accumulates: the sum of every
    component kind's registered share (registry.model_flops).

    Counted: patch conv, qkv, attention scores (q.k), attention-weighted sum (p.v), output projection,
    MLP, adapters (down + up) and head. NOT counted: LayerNorm, softmax, GELU, bias and residual adds,
    position-embedding add. That is exactly what torch.utils.flop_counter.FlopCounterMode reports.
    """
    return registry.model_flops(cfg, hparams)


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


# Kinds whose modules PathModel builds itself (timm parity, stable attribute names).
_BUILTIN_MODULES = frozenset(k.name for k in registry.BUILTIN_KINDS)


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

            # Kinds registered beyond the ViT's own (agents.registry) run as x -> x stages at their slot.
            self.extra = nn.ModuleDict({name: self._extra_module(name, cfg, hparams) for name in names
                                        if registry.kind_of(name).name not in _BUILTIN_MODULES})

        modules: dict[str, nn.Module] = {"cls": self.cls, "embedding": self.embedding,
                                         "posembed_input": self.posembed_input,
                                         "encoder_norm": self.encoder_norm, "head": self.head}
        modules.update({f"residual_adapter_{i}": m for i, m in self.adapters.items()})
        modules.update({f"encoderblock_{i}": m for i, m in enumerate(self.blocks)})
        modules.update(self.extra.items())
        self._component_modules = modules
        self._trainable: dict[tuple[str, str], nn.Parameter] = {}
        for name in names:
            bound = _bind(modules[name], name, params[name], param_shapes(name, cfg, hparams), name in trainable)
            self._trainable.update({(name, t): p for t, p in bound.items()})

        # Stages in forward order; the head is applied separately (forward_head).
        # The stem is stored as None (not a bound method) to keep the module free of reference cycles.
        # The grouping is agents.compute's, so the FLOPs model and the module agree on where the frozen
        # prefix ends.
        grouped = compute.stages(hparams)
        stages: list[tuple[tuple[str, ...], nn.Module | None]] = [(grouped[0], None)]
        stages += [(comps, modules[comps[0]]) for comps in grouped[1:]]
        self._stages = stages
        # Components that run without autograd because nothing below them trains.
        self.frozen_prefix: tuple[str, ...] = compute.frozen_prefix(hparams, self.trainable_components)
        first = next((k for k, (comps, _) in enumerate(stages) if self.trainable_components & set(comps)),
                     len(stages))
        self._first_trainable_stage = first
        # Top stages (encoder_norm) act on each token alone and only token 0 reaches the head (which is
        # not a stage), so a suffix made of them needs nothing of the prefix output but its class token.
        self._suffix_per_token = all(registry.kind_of(c).stage == registry.STAGE_TOP
                                     for comps, _ in stages[first:] for c in comps)

    @staticmethod
    def _extra_module(name: str, cfg: VitConfig, hparams: Mapping[str, object]) -> nn.Module:
        kind = registry.kind_of(name)
        if kind.module is None or kind.stage in (registry.STAGE_STEM, registry.STAGE_HEAD):
            raise ValueError(f"PathModel cannot run component {name!r}: its kind {kind.name!r} has no "
                             "registered x -> x module (registry.register_module) at a layer or top slot")
        return kind.module(cfg, hparams)

    def component_module(self, name: str) -> nn.Module:
        """The submodule that holds component `name`'s tensors."""
        return self._component_modules[name]

    def _stem(self, x: Tensor) -> Tensor:
        tokens = self.embedding(x).flatten(2).transpose(1, 2)
        cls = self.cls.token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.posembed_input.pos_embedding

    def _run(self, stage: nn.Module | None, h: Tensor) -> Tensor:
        return self._stem(h) if stage is None else stage(h)

    def _run_stages(self, h: Tensor, start: int, stop: int) -> Tensor:
        for _, stage in self._stages[start:stop]:
            h = self._run(stage, h)
        return h

    @property
    def first_trainable_stage(self) -> int:
        """Index of the first stage (the stem is stage 0) holding a trainable component; the number of
        stages when none does (only the head, or nothing, trains)."""
        return self._first_trainable_stage

    @property
    def has_frozen_prefix(self) -> bool:
        return self._first_trainable_stage > 0

    @property
    def prefix_keeps_cls_only(self) -> bool:
        """True when every stage from the first trainable one up is per-token (STAGE_TOP), so
        `forward_prefix` returns only the class token: the rest never reaches the head."""
        return self._suffix_per_token

    def _frozen(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._run_stages(x, 0, self._first_trainable_stage)

    def _suffix_features(self, h: Tensor) -> Tensor:
        return self._run_stages(h, self._first_trainable_stage, len(self._stages))[:, 0]

    def forward_prefix(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> the frozen stages' output without autograd: hidden tokens (B, T, D),
        or a contiguous (B, 1, D) when `prefix_keeps_cls_only`. A function of the image and the frozen
        components alone, which is what makes it cacheable (agents.prefix_cache)."""
        if not self.has_frozen_prefix:
            raise ValueError("this model has no frozen prefix: its stem holds a trainable component")
        h = self._frozen(x)
        return h[:, :1].contiguous() if self._suffix_per_token else h

    def forward_suffix(self, h: Tensor) -> Tensor:
        """`forward_prefix`'s output -> logits, with autograd through the trainable stages and head."""
        return self.forward_head(self._suffix_features(h))

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D): encoder_norm output of the class token."""
        if x.requires_grad or not self.has_frozen_prefix:
            # No prefix, or the caller wants input gradients (e.g. saliency): keep the whole graph.
            return self._run_stages(x, 0, len(self._stages))[:, 0]
        # All tokens go through the suffix here (not only the class token as in forward_prefix), so the
        # plain forward computes exactly what it always has.
        return self._suffix_features(self._frozen(x))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def trainable_tensors(self) -> dict[tuple[str, str], nn.Parameter]:
        """(component, tensor name) -> the Parameter sharing storage with the caller's tensor."""
        return dict(self._trainable)

    @property
    def stage_components(self) -> list[tuple[str, ...]]:
        """Component names of each stage in forward order (the stem first, encoder_norm last; the
        head is not a stage). A stage's output is a function of its input and these components'
        tensors alone, which is what lets a server compute a prefix shared by many paths once."""
        return [comps for comps, _ in self._stages]

    def run_stage(self, index: int, h: Tensor) -> Tensor:
        """Stage ``index`` alone: the image for the stem (0), the previous stage's tokens otherwise."""
        return self._run(self._stages[index][1], h)
