"""The multipath model (µ4Net): a task's own frozen model plus 1-2 other tasks' frozen models, joined
by a per-sample router and zero-initialised connectors; only the router and connectors train.

    l_0 = path_0(x at its size)                      the task's single-path model, with its head
    f_k = path_k(x at its size), k >= 1              another task's model (or the root), headless
    w   = softmax(router(LayerNorm(l_0)))            per sample, over the paths
    out = sum_k w_k * l_k,  l_k = connector_k(f_k)   (forward value)

Gradients are decoupled: every connector gets the gradient of the plain sum (as if its weight were 1),
and the router gets its gradient through the detached path logits, scaled by ``router_lr_mult``
(a gradient scale, not a learning-rate scale: it acts before global-norm clipping). Connectors start
at zero and the router at weight 0.8 on the main path, so a fresh model predicts exactly what its
main path predicts.

The paths are whole published models referenced by id (``ModelRecord.refs``: main path first); their
tensors are the view's, shared with everything else that uses them, and they run without autograd. As
nothing below the router and connectors trains, a path's output for an image never changes, so the
trainer computes it once per image and split (agents/multipath_generation.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents import compute, registry
from agents.vit import PathModel, VitConfig

ROUTER_INIT_MAIN_WEIGHT = 0.8   # the main path's initial weight (fixed, not mutated)
ROUTER_NORM_EPS = 1e-6
MAX_POPULATION = 5              # the reference's population bound for this kind
# A multipath child trains this many times the steps of the preset's single-path child (same number
# of validations). Its steps cost almost nothing (router and connectors on the paths' outputs, which
# are computed once per image), and the linear connectors need them: on the benchmark's 8 tasks, with
# one borrowed path (mean over every borrowed task), 1x reached 0.9112 mean test accuracy, 4x 0.9147
# and 16x (1,536 steps of 32 images) 0.9171, against 0.9083 for the single-path models alone (the
# reference trains 4 epochs per child; 16x is 5-40 epochs here). See benchmarks/results/multipath.md.
STEPS_SCALE = 16
MULTIPATH_DEFAULTS = {          # the reference's multipath hparams (no adapters, no layer or size hparams)
    "_mu_": 0.2, "opt_lr": 0.02, "opt_lr_warmup_ratio": 0.02, "opt_momentum": 0.8,
    "opt_nesterov": True, "router_lr_mult": 0.05, "num_paths": 2,
}
MULTIPATH_RANGES = {
    "_mu_": [round(0.02 * i, 2) for i in range(1, 16)],
    "opt_lr": [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
    "opt_lr_warmup_ratio": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3],
    "opt_momentum": [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99],
    "opt_nesterov": [True, False],
    "router_lr_mult": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1],
    "num_paths": [2, 3],
}


def router_bias(num_paths: int, main_weight: float = ROUTER_INIT_MAIN_WEIGHT) -> list[float]:
    """Softmax logits giving the main path ``main_weight`` and the others equal shares."""
    return [math.log(main_weight / (1 - main_weight) * (num_paths - 1))] + [0.0] * (num_paths - 1)


@registry.register_init("router")
def _init_router(cfg: VitConfig, h: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    c, n = int(h["num_classes"]), int(h["num_paths"])
    return {"norm.weight": torch.ones(c), "norm.bias": torch.zeros(c), "weight": torch.zeros(n, c),
            "bias": torch.tensor(router_bias(n), dtype=torch.float32)}


@registry.register_init("connector")
def _init_connector(cfg: VitConfig, h: Mapping[str, object], gen: torch.Generator) -> dict[str, Tensor]:
    c = int(h["num_classes"])
    return {"weight": torch.zeros(c, cfg.hidden), "bias": torch.zeros(c)}


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Same value; the gradient flowing back through it is multiplied by ``scale``."""
    return scale * x + (1.0 - scale) * x.detach()


def _bind(module: nn.Module, tensors: Mapping[str, Tensor], trainable: bool) -> dict[str, nn.Parameter]:
    """Make the caller's tensors the module's parameters (same storage, no copy)."""
    bound = {}
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        p = nn.Parameter(t.detach(), requires_grad=trainable)
        owner.register_parameter(leaf, p)
        bound[name] = p
    return bound


class MultipathModel(nn.Module):
    """The combination of frozen paths. ``forward`` takes a dict {image size: (B, 3, S, S) in [-1, 1]}
    holding every size in ``image_sizes``; ``combine`` takes the paths' outputs (``path_outputs``)."""

    def __init__(self, hparams: Mapping[str, object], paths: Sequence[PathModel],
                 params: Mapping[str, Mapping[str, Tensor]], trainable: bool) -> None:
        super().__init__()
        n, c = int(hparams["num_paths"]), int(hparams["num_classes"])
        if len(paths) != n:
            raise ValueError(f"a multipath model with num_paths={n} needs {n} paths, got {len(paths)}")
        self.hparams = dict(hparams)
        self.paths = list(paths)  # plain list: the paths' tensors are the view's, never the optimizer's
        self.image_sizes = [int(p.hparams["ds_image_size"]) for p in self.paths]
        self.lr_mult = float(hparams["router_lr_mult"])
        with torch.device("meta"):
            self.router = nn.Sequential()
            self.router.add_module("norm", nn.LayerNorm(c, eps=ROUTER_NORM_EPS))
            self.router_linear = nn.Linear(c, n)
            self.connectors = nn.ModuleList([nn.Linear(p.cfg.hidden, c) for p in self.paths[1:]])
        rp = params["router"]
        self._trainable = {("router", f"norm.{t}"): p for t, p in _bind(
            self.router.norm, {t: rp[f"norm.{t}"] for t in ("weight", "bias")}, trainable).items()}
        self._trainable.update({("router", t): p for t, p in _bind(
            self.router_linear, {t: rp[t] for t in ("weight", "bias")}, trainable).items()})
        for k, conn in enumerate(self.connectors, start=1):
            name = f"connector_{k}"
            self._trainable.update({(name, t): p for t, p in _bind(conn, params[name], trainable).items()})
        if not trainable:
            self._trainable = {}

    def trainable_tensors(self) -> dict[tuple[str, str], nn.Parameter]:
        return dict(self._trainable)

    @torch.no_grad()
    def path_outputs(self, inputs: Mapping[int, Tensor]) -> list[Tensor]:
        """The main path's logits (B, C), then each other path's pooled features (B, D)."""
        main = self.paths[0](inputs[self.image_sizes[0]])
        return [main] + [p.forward_features(inputs[s]) for p, s in zip(self.paths[1:], self.image_sizes[1:])]

    def route(self, main_logits: Tensor) -> Tensor:
        """Per-sample path weights (B, num_paths), with the router's gradient scaled by lr_mult."""
        w = F.softmax(self.router_linear(self.router.norm(main_logits)), dim=-1)
        return scale_gradient(w, self.lr_mult)

    def combine(self, outputs: Sequence[Tensor]) -> Tensor:
        """Router-weighted sum of the paths' logits, with decoupled gradients (module docstring)."""
        logits = [outputs[0]] + [conn(f) for conn, f in zip(self.connectors, outputs[1:])]
        stacked = torch.stack(logits, dim=-1)                                  # (B, C, P)
        weighted = torch.einsum("bcp,bp->bc", stacked.detach(), self.route(outputs[0]))
        plain = stacked.sum(-1)
        return weighted + plain - plain.detach()

    def forward(self, inputs: Mapping[int, Tensor]) -> Tensor:
        return self.combine(self.path_outputs(inputs))


def frozen_path_module(vit: VitConfig, hparams: Mapping[str, object],
                       params: Mapping[str, Mapping[str, Tensor]]) -> PathModel:
    """A published single-path model (or the root, which has no head) as a frozen PathModel over the
    given tensors (no copy)."""
    h, params = dict(hparams), dict(params)
    if "head" not in params:  # a headless path (the root): a placeholder head nothing runs
        h["num_classes"] = 1
        params["head"] = {"weight": torch.zeros(1, vit.hidden), "bias": torch.zeros(1)}
    return PathModel(vit, h, params, trainable=()).eval()


def path_flops(vit: VitConfig, hparams: Mapping[str, object], main: bool) -> int:
    """Forward FLOPs of one image through a path: the main path with its head, the others headless."""
    h = dict(hparams)
    if h.get("num_classes") is None:  # the root has no head
        h["num_classes"] = 1
    flops = compute.forward_flops(vit, h)
    if not main:
        flops -= registry.kind("head").flops(vit, h)
    return int(flops)


def trainable_flops(vit: VitConfig, hparams: Mapping[str, object]) -> int:
    """Forward FLOPs of the router and connectors for one image."""
    return int(sum(registry.component_flops(vit, hparams).values()))


def model_flops(vit: VitConfig, hparams: Mapping[str, object],
                path_hparams: Sequence[Mapping[str, object]]) -> int:
    """Forward FLOPs of one image through the whole multipath model."""
    return trainable_flops(vit, hparams) + sum(
        path_flops(vit, h, k == 0) for k, h in enumerate(path_hparams))
