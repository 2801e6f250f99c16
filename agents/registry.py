"""The registry of component kinds and mutation actions: one place that says what a model is made of.

A path's parameters are a flat dict of named components (docs/method.md 1.1). Each name is an instance of
one registered **kind**: ``encoderblock_2`` is instance 2 of the indexed kind ``encoderblock``, ``head``
the one instance of the kind ``head``. A ``ComponentKind`` knows its tensor shapes, its forward FLOPs,
where it sits in the forward order, where it is present (every layer, only at the layer ids an hparam
lists, once), and how a child inherits it (``INHERIT_*``). Mutation actions (``clone:<component>``,
``add:<kind>_<i>``, ``hp:<hparam>``, and the ``new:<component>`` log of a fresh init) are registered
``MutationAction``\\ s; the report groups trials by their ``action_family``.

This module is torch-free, so the report and the query CLI read it without pulling in torch. The
torch parts of a kind (fresh initialisation, the ``nn.Module`` that runs an added kind, seeding a
component from the root's tensors) are attached by ``agents.vit`` through ``register_init`` /
``register_module`` / ``register_root_seed``; a new kind registers them the same way.

``vit.component_names``/``param_shapes``/``count_flops``/``init_component``, ``Mutator.build_child``,
``roots.root_component_names``, scoring and ``report`` all read this registry: a new kind (e.g. a
trainable connector of a multipath agent) is added by one ``register_kind`` call and nothing in the
store changes, because the store only ever sees component names and tensors.

Configs (``cfg``) are duck-typed: anything with ``hidden``, ``mlp``, ``heads`` and ``patch``
(``agents.vit.VitConfig``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# How a child gets a component (docs/method.md 2.3 step 5-6).
INHERIT_SHARED = "shared"   # nearest ancestor's: trainable ones copied, frozen ones shared unless cloned
INHERIT_TASK = "task"       # as shared, but only from ancestors of the child's own task (heads)
INHERIT_FRESH = "fresh"     # never inherited: always freshly initialised
INHERIT_RULES = (INHERIT_SHARED, INHERIT_TASK, INHERIT_FRESH)

# Forward-order stages; within a stage kinds sort by (index, rank).
STAGE_STEM, STAGE_LAYER, STAGE_TOP, STAGE_HEAD = 0, 1, 2, 3
_UNKNOWN_SLOT = (9, 0, 0)

# Action scopes.
SCOPE_CHILD = "child"            # decided per child with its own learned probability (build_child)
SCOPE_GENERATION = "generation"  # decided once per generation (sample_ds_hparams)
SCOPE_LOG = "log"                # not decided: records that something happened (``new:`` fresh inits)

Shapes = dict[str, tuple[int, ...]]


# ---- the one parser of layer-id lists and indexed names ------------------------------------------

def parse_layer_ids(raw: Any, key: str = "adapter_layers", *, strict: bool = True) -> list[int]:
    """Sorted, unique layer ids of a ``"0_2"``-style hparam ("" or None: none).

    ``strict`` raises ValueError on anything but non-negative ids joined by ``_``; with
    ``strict=False`` (readers of recorded data, e.g. the report) bad parts are skipped.
    """
    text = "" if raw is None else str(raw)
    if not text:
        return []
    ids: set[int] = set()
    for part in text.split("_"):
        try:
            value = int(part)
        except ValueError:
            if strict:
                raise ValueError(f"{key} must be layer ids joined by '_' (e.g. '0_2'), got {text!r}") from None
            continue
        if value < 0:
            if strict:
                raise ValueError(f"{key} holds a negative layer id: {text!r}")
            continue
        ids.add(value)
    return sorted(ids)


def format_layer_ids(ids: Iterable[int]) -> str:
    """Inverse of ``parse_layer_ids``: sorted ids joined by ``_``."""
    return "_".join(str(i) for i in sorted(set(ids)))


def layer_ids(hparams: Mapping[str, Any], key: str = "adapter_layers") -> list[int]:
    return parse_layer_ids(hparams.get(key, ""), key)


def split_component_name(name: str) -> tuple[str, int | None]:
    """``encoderblock_3`` -> (``encoderblock``, 3); ``posembed_input`` -> (``posembed_input``, None)."""
    stem, sep, tail = name.rpartition("_")
    if sep and stem and tail.isdigit() and tail == str(int(tail)):
        return stem, int(tail)
    return name, None


def instance_name(kind: str, index: int | None) -> str:
    return kind if index is None else f"{kind}_{index}"


def num_layers(hparams: Mapping[str, Any]) -> int:
    layers = int(hparams["num_layers"])
    if layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {layers}")
    return layers


def image_grid(cfg: Any, hparams: Mapping[str, Any]) -> int:
    """Patches per image side for hparams' ``ds_image_size``."""
    size = int(hparams["ds_image_size"])
    if size <= 0 or size % cfg.patch:
        raise ValueError(f"ds_image_size must be a positive multiple of the patch size {cfg.patch}, got {size}")
    return size // cfg.patch


def tokens(cfg: Any, hparams: Mapping[str, Any]) -> int:
    """Sequence length: class token + patch grid."""
    grid = image_grid(cfg, hparams)
    return 1 + grid * grid


# ---- kinds --------------------------------------------------------------------------------------

def _no_flops(cfg: Any, hparams: Mapping[str, Any]) -> int:
    return 0


@dataclass(eq=False)
class ComponentKind:
    """One kind of component. Instances are named ``name`` or, when ``indexed``, ``name_<i>``.

    Presence: a non-indexed kind is in every model; an indexed kind has one instance per layer
    ``i < num_layers``, or only at the ids listed in ``layers_hparam`` (then ``add:<name>_<i>`` inserts
    one and ``addable(preset)`` says when that action is on). ``instances`` overrides both.
    ``reshapes``: an ancestor's instance with other shapes (image size, adapter width, class count
    changed) is skipped while looking for one to inherit, instead of being an error.
    ``always_clone``: a frozen inherited instance is always copied (``clone:`` forced, not logged).
    ``log_new``: a fresh instance is logged as ``new:<component>`` (off when an ``add:`` already says so).
    """

    name: str
    shapes: Callable[[Any, Mapping[str, Any]], Shapes]
    flops: Callable[[Any, Mapping[str, Any]], int] = _no_flops
    # Backward cost model (agents.compute): the share of ``flops`` spent in ops without weights
    # (attention scores and the weighted sum), whose backward costs 2x their forward whenever a
    # gradient flows through them; and whether the kind normalises its input with its own LayerNorm
    # first, so a trainable instance computes its input-side gradients even with nothing below it
    # trainable (the norm's weight needs them).
    mixing_flops: Callable[[Any, Mapping[str, Any]], int] = _no_flops
    normed_input: bool = False
    stage: int = STAGE_LAYER
    rank: int = 0
    indexed: bool = False
    layers_hparam: str | None = None
    instances: Callable[[Mapping[str, Any]], Sequence[int | None]] | None = None
    inherit: str = INHERIT_SHARED
    reshapes: bool = False
    always_clone: bool = False
    in_root: bool = True
    addable: Callable[[Any], bool] | None = None
    log_new: bool = True
    label: str = ""
    description: str = ""
    # torch parts, attached by agents.vit (or by whoever registers a kind):
    method: str = "single"  # the model kind it belongs to (``model_kind``): single-path or multipath
    init: Callable[..., dict] | None = field(default=None, repr=False)          # (cfg, hparams, gen)
    module: Callable[..., Any] | None = field(default=None, repr=False)         # (cfg, hparams) -> x->x module
    root_seed: Callable[..., dict] | None = field(default=None, repr=False)     # (root_posemb, cfg, hparams)

    def __post_init__(self) -> None:
        if self.inherit not in INHERIT_RULES:
            raise ValueError(f"kind {self.name!r}: inherit must be one of {INHERIT_RULES}, got {self.inherit!r}")
        if split_component_name(self.name)[1] is not None:
            raise ValueError(f"kind name {self.name!r} must not end in _<digits>")
        if self.layers_hparam is not None and not self.indexed:
            raise ValueError(f"kind {self.name!r}: layers_hparam needs an indexed kind")
        if self.inherit == INHERIT_FRESH and self.always_clone:
            raise ValueError(f"kind {self.name!r}: a fresh-only kind cannot be always cloned")

    def indices(self, hparams: Mapping[str, Any]) -> list[int | None]:
        if self.instances is not None:
            return list(self.instances(hparams))
        if not self.indexed:
            return [None]
        layers = range(num_layers(hparams))
        if self.layers_hparam is None:
            return list(layers)
        listed = set(layer_ids(hparams, self.layers_hparam))
        return [i for i in layers if i in listed]

    def slot(self, index: int | None) -> tuple[int, int, int]:
        return (self.stage, index or 0, self.rank)

    def short(self, index: int | None) -> str:
        label = self.label or self.name
        return label if index is None else f"{label} {index}"

    def num_params(self, cfg: Any, hparams: Mapping[str, Any]) -> int:
        return sum(math.prod(s) for s in self.shapes(cfg, hparams).values())


_KINDS: dict[str, ComponentKind] = {}


def register_kind(kind: ComponentKind) -> ComponentKind:
    """Add a kind and its actions (``clone:``, ``add:``, ``new:`` as its rules allow)."""
    if kind.name in _KINDS:
        raise ValueError(f"component kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    label = kind.description or kind.label or kind.name
    if kind.inherit != INHERIT_FRESH:
        register_action(MutationAction("clone", kind.name, SCOPE_CHILD, f"clone a frozen {label}"))
    if kind.layers_hparam is not None:
        register_action(MutationAction("add", kind.name, SCOPE_CHILD, f"insert a {label}"))
    if kind.log_new:
        register_action(MutationAction("new", kind.name, SCOPE_LOG, f"fresh {label} (nothing to inherit)"))
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind and the actions it registered (tests register toy kinds and take them away)."""
    _KINDS.pop(name, None)
    for family in ("clone", "add", "new"):
        _ACTIONS.pop(f"{family}:{name}", None)


def _attach(kind_name: str, attr: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        setattr(kind(kind_name), attr, fn)
        return fn
    return decorator


def register_init(kind_name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(cfg, hparams, generator) -> {tensor name: tensor}`` fresh-initialises the kind."""
    return _attach(kind_name, "init")


def register_module(kind_name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(cfg, hparams) -> nn.Module`` (x -> x) that PathModel runs at the kind's slot."""
    return _attach(kind_name, "module")


def register_root_seed(kind_name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(root_posemb, cfg, hparams) -> tensors``: with no ancestor to inherit from, start
    from the root's tensors adapted to the child's hparams instead of a random init."""
    return _attach(kind_name, "root_seed")


def kind(name: str) -> ComponentKind:
    """The kind registered under ``name`` (a kind name, not a component name)."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown component kind {name!r}; registered: {sorted(_KINDS)}") from None


def kinds() -> list[ComponentKind]:
    """Every registered kind, in forward order."""
    return sorted(_KINDS.values(), key=lambda k: (k.stage, k.rank, k.name))


def find_kind(component: str) -> tuple[ComponentKind, int | None] | None:
    """(kind, index) of a component name, or None when no registered kind makes that name."""
    found = _KINDS.get(component)
    if found is not None and not found.indexed:
        return found, None
    stem, index = split_component_name(component)
    found = _KINDS.get(stem) if index is not None else None
    if found is not None and found.indexed:
        return found, index
    return None


def kind_of(component: str) -> ComponentKind:
    """The kind of a component name; ValueError for names no registered kind makes."""
    found = find_kind(component)
    if found is None:
        raise ValueError(f"unknown component name {component!r}")
    return found[0]


MULTIPATH_HPARAM = "num_paths"  # only a multipath model's hparams carry it


def model_kind(hparams: Mapping[str, Any]) -> str:
    """``multipath`` for a multipath model's hparams (frozen whole paths + router + connectors),
    ``single`` for a single-path ViT's: the two are made of different component kinds."""
    return "multipath" if MULTIPATH_HPARAM in hparams else "single"


def component_names(hparams: Mapping[str, Any]) -> list[str]:
    """Component names of the model ``hparams`` describes, in forward order."""
    method = model_kind(hparams)
    named = [(k.slot(i), instance_name(k.name, i)) for k in _KINDS.values() if k.method == method
             for i in k.indices(hparams)]
    return [name for _, name in sorted(named)]


def root_component_names(cfg: Any) -> list[str]:
    """Everything a root carries: every in-root kind at ``cfg.depth`` layers, nothing optional."""
    return [n for n in component_names({"num_layers": cfg.depth}) if kind_of(n).in_root]


def param_shapes(component: str, cfg: Any, hparams: Mapping[str, Any]) -> Shapes:
    return kind_of(component).shapes(cfg, hparams)


def component_params(cfg: Any, hparams: Mapping[str, Any]) -> dict[str, int]:
    """Number of parameters per component of the model ``hparams`` describes."""
    return {n: kind_of(n).num_params(cfg, hparams) for n in component_names(hparams)}


def component_flops(cfg: Any, hparams: Mapping[str, Any]) -> dict[str, int]:
    """Forward FLOPs of one image per component (2 x multiply-accumulates; see ``model_flops``)."""
    return {n: int(kind_of(n).flops(cfg, hparams)) for n in component_names(hparams)}


def model_flops(cfg: Any, hparams: Mapping[str, Any]) -> int:
    """Forward FLOPs for ONE image at hparams' image size: the sum of every component's share.

    Counted (the built-in kinds): patch conv, qkv, attention scores and weighted sum, output projection,
    MLP, adapters (down + up), head. Not counted: LayerNorm, softmax, GELU, bias and residual adds,
    position-embedding add: exactly what torch.utils.flop_counter.FlopCounterMode reports.
    """
    return sum(component_flops(cfg, hparams).values())


def slot(component: str) -> tuple[int, int, int]:
    """Forward position of a component name (unknown names sort last): for ordering report columns."""
    found = find_kind(component)
    return _UNKNOWN_SLOT if found is None else found[0].slot(found[1])


def short_name(component: str) -> str:
    """Report label: ``encoderblock_3`` -> ``block 3``; unknown names unchanged."""
    found = find_kind(component)
    return component if found is None else found[0].short(found[1])


# ---- actions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MutationAction:
    """A family of mutation actions: ``<family>:<target>``.

    ``family``: ``clone`` / ``add`` / ``new`` (target = a kind: instances name a component of it) or
    ``hp`` (target = an hparam name, or a prefix ending in ``*`` such as ``opt_*``).
    ``scope``: when it is decided (SCOPE_CHILD, SCOPE_GENERATION) or SCOPE_LOG for a record.
    """

    family: str
    target: str
    scope: str
    label: str

    @property
    def name(self) -> str:
        return f"{self.family}:{self.target}"

    @property
    def is_prefix(self) -> bool:
        return self.family == "hp" and self.target.endswith("*")

    def matches_hparam(self, key: str) -> bool:
        if self.family != "hp":
            return False
        return key.startswith(self.target[:-1]) if self.is_prefix else key == self.target

    def instances(self, hparams: Mapping[str, Any], ranges: Mapping[str, Any] = ()) -> list[str]:
        """The concrete action strings this family can produce for a child with ``hparams``."""
        if self.family == "hp":
            return [f"hp:{k}" for k in sorted(ranges) if hparam_action(k) is self]
        k = kind(self.target)
        if k.method != model_kind(hparams):
            return []
        if self.family == "add":
            present = set(k.indices(hparams))
            return [f"add:{instance_name(k.name, i)}" for i in range(num_layers(hparams)) if i not in present]
        return [f"{self.family}:{instance_name(k.name, i)}" for i in k.indices(hparams)]


_ACTIONS: dict[str, MutationAction] = {}


def register_action(action: MutationAction) -> MutationAction:
    if action.name in _ACTIONS:
        raise ValueError(f"mutation action {action.name!r} is already registered")
    _ACTIONS[action.name] = action
    return action


def unregister_action(name: str) -> None:
    _ACTIONS.pop(name, None)


def actions(scope: str | None = None) -> list[MutationAction]:
    return [a for a in _ACTIONS.values() if scope is None or a.scope == scope]


def hparam_action(key: str) -> MutationAction | None:
    """The ``hp:`` action that mutates ``key`` (an exact entry wins over a prefix)."""
    exact = _ACTIONS.get(f"hp:{key}")
    if exact is not None:
        return exact
    return next((a for a in _ACTIONS.values() if a.is_prefix and a.matches_hparam(key)), None)


def hparam_scope(key: str) -> str | None:
    """SCOPE_CHILD, SCOPE_GENERATION, or None for an hparam no action mutates."""
    action = hparam_action(key)
    return None if action is None else action.scope


def clone_action(component: str) -> str:
    return f"clone:{component}"


def add_action(component: str) -> str:
    return f"add:{component}"


def new_action(component: str) -> str:
    return f"new:{component}"


def is_forced(action: str) -> bool:
    """True for ``clone:`` of an always-cloned kind (decided without a draw, not logged)."""
    family, sep, target = action.partition(":")
    if family != "clone" or not sep:
        return False
    found = find_kind(target)
    return found is not None and found[0].always_clone


def action_for(action: str) -> MutationAction | None:
    """The registered family of a concrete action string, or None."""
    family, sep, target = action.partition(":")
    if not sep:
        return None
    if family == "hp":
        return hparam_action(target)
    found = find_kind(target)
    return _ACTIONS.get(f"{family}:{found[0].name}") if found is not None else None


def action_family(action: str) -> str:
    """Report grouping: ``clone:encoderblock_1`` -> ``clone:encoderblock``; ``hp:`` actions stay whole.

    Unregistered component actions (e.g. read from an older store) fall back to dropping a ``_<i>``
    suffix, so the grouping never depends on what this process has registered.
    """
    family, sep, target = action.partition(":")
    if not sep or family == "hp":
        return action
    found = find_kind(target)
    return f"{family}:{found[0].name if found else split_component_name(target)[0]}"


def action_label(action_or_family: str) -> str:
    """Human text for an action or family (empty when unregistered)."""
    registered = action_for(action_or_family) or _ACTIONS.get(action_or_family)  # instance or family
    if registered is None:
        return ""
    if registered.family == "hp" and registered.is_prefix:
        return f"{registered.label} ({action_or_family.partition(':')[2]})"
    return registered.label


# ---- the built-in ViT kinds (docs/method.md 1.1) -----------------------------------------------------

def _cls_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    return {"token": (1, 1, cfg.hidden)}


def _embedding_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    return {"weight": (cfg.hidden, 3, cfg.patch, cfg.patch), "bias": (cfg.hidden,)}


def _embedding_flops(cfg: Any, h: Mapping[str, Any]) -> int:
    grid = image_grid(cfg, h)
    return 2 * grid * grid * cfg.hidden * 3 * cfg.patch * cfg.patch


def _posemb_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    return {"pos_embedding": (1, tokens(cfg, h), cfg.hidden)}


def _block_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    d, m = cfg.hidden, cfg.mlp
    return {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,),
    }


def _block_flops(cfg: Any, h: Mapping[str, Any]) -> int:
    d, m, t = cfg.hidden, cfg.mlp, tokens(cfg, h)
    return 2 * t * d * 3 * d + _block_mixing_flops(cfg, h) + 2 * t * d * d + 2 * 2 * t * d * m


def _block_mixing_flops(cfg: Any, h: Mapping[str, Any]) -> int:
    """q.k scores and the p.v weighted sum: no weights, two activation operands."""
    d, t = cfg.hidden, tokens(cfg, h)
    return 2 * 2 * t * t * d


def _adapter_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    d, a = cfg.hidden, int(h["adapter_dim"])
    return {"norm.weight": (d,), "norm.bias": (d,), "down.weight": (a, d), "down.bias": (a,),
            "up.weight": (d, a), "up.bias": (d,)}


def _adapter_flops(cfg: Any, h: Mapping[str, Any]) -> int:
    return 2 * 2 * tokens(cfg, h) * cfg.hidden * int(h.get("adapter_dim", 0) or 0)


def _norm_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    return {"weight": (cfg.hidden,), "bias": (cfg.hidden,)}


def _head_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    classes = int(h["num_classes"])
    return {"weight": (classes, cfg.hidden), "bias": (classes,)}


def _head_flops(cfg: Any, h: Mapping[str, Any]) -> int:
    return 2 * cfg.hidden * int(h["num_classes"])


BUILTIN_KINDS = (
    ComponentKind("cls", _cls_shapes, stage=STAGE_STEM, rank=0, description="class token"),
    ComponentKind("embedding", _embedding_shapes, _embedding_flops, stage=STAGE_STEM, rank=1,
                  description="patch embedding"),
    ComponentKind("posembed_input", _posemb_shapes, stage=STAGE_STEM, rank=2, reshapes=True,
                  label="posembed", description="position embedding"),
    ComponentKind("residual_adapter", _adapter_shapes, _adapter_flops, stage=STAGE_LAYER, rank=0,
                  normed_input=True,
                  indexed=True, layers_hparam="adapter_layers", reshapes=True, in_root=False,
                  addable=lambda preset: bool(preset.mutate_adapters), log_new=False,
                  label="adapter", description="residual adapter"),
    ComponentKind("encoderblock", _block_shapes, _block_flops, _block_mixing_flops, normed_input=True,
                  stage=STAGE_LAYER, rank=1, indexed=True,
                  label="block", description="encoder block"),
    ComponentKind("encoder_norm", _norm_shapes, stage=STAGE_TOP, rank=0, always_clone=True,
                  label="norm", description="final LayerNorm"),
    ComponentKind("head", _head_shapes, _head_flops, stage=STAGE_HEAD, rank=0, inherit=INHERIT_TASK,
                  reshapes=True, in_root=False, description="classification head"),
)
for _kind in BUILTIN_KINDS:
    register_kind(_kind)


# ---- the multipath kinds (µ4Net; torch parts in agents/multipath.py) ------------------------------
# A multipath model runs 2-3 whole frozen published models ("paths"; the store keeps them as the
# model's ``refs``) and trains only these: a router that reads the main path's logits and weighs the
# paths per sample, and one connector per other path that maps its pooled features to the task's
# classes. Their FLOPs are their own; the paths' FLOPs are counted by agents/multipath.py.
# ``INHERIT_FRESH`` because the single-path Mutator never builds them: the multipath builder copies
# them from the direct parent when the shapes match (µ4Net has no clone: action), else starts fresh
# (logged as ``new:router`` / ``new:connector_<k>``: a connector starts fresh when its path is new).

def _router_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    c, n = int(h["num_classes"]), int(h["num_paths"])
    return {"norm.weight": (c,), "norm.bias": (c,), "weight": (n, c), "bias": (n,)}


def _router_flops(cfg: Any, h: Mapping[str, Any]) -> int:
    return 2 * int(h["num_classes"]) * int(h["num_paths"])


def _connector_shapes(cfg: Any, h: Mapping[str, Any]) -> Shapes:
    return {"weight": (int(h["num_classes"]), cfg.hidden), "bias": (int(h["num_classes"]),)}


def _connector_flops(cfg: Any, h: Mapping[str, Any]) -> int:
    return 2 * cfg.hidden * int(h["num_classes"])


MULTIPATH_KINDS = (
    ComponentKind("router", _router_shapes, _router_flops, stage=STAGE_HEAD, rank=1,
                  inherit=INHERIT_FRESH, reshapes=True, in_root=False, method="multipath",
                  description="multipath router (per-sample path weights)"),
    ComponentKind("connector", _connector_shapes, _connector_flops, stage=STAGE_HEAD, rank=0,
                  indexed=True, instances=lambda h: range(1, int(h["num_paths"])), reshapes=True,
                  inherit=INHERIT_FRESH,
                  in_root=False, method="multipath",
                  description="multipath connector (a borrowed path's features -> classes)"),
)
for _kind in MULTIPATH_KINDS:
    register_kind(_kind)

BUILTIN_HPARAM_ACTIONS = (
    MutationAction("hp", "_mu_", SCOPE_CHILD, "global mutation probability µ"),
    MutationAction("hp", "num_layers", SCOPE_CHILD, "drop or re-add the top encoder block"),
    MutationAction("hp", "adapter_dim", SCOPE_CHILD, "residual adapter width"),
    MutationAction("hp", "opt_*", SCOPE_CHILD, "optimizer hyperparameter"),
    MutationAction("hp", "ds_*", SCOPE_GENERATION, "data hyperparameter, shared by a generation"),
)
MULTIPATH_HPARAM_ACTIONS = (
    MutationAction("hp", "num_paths", SCOPE_CHILD, "multipath: add or drop a borrowed path (2-3)"),
    MutationAction("hp", "router_lr_mult", SCOPE_CHILD, "multipath: router gradient scale"),
)
for _action in BUILTIN_HPARAM_ACTIONS + MULTIPATH_HPARAM_ACTIONS:
    register_action(_action)
del _kind, _action
