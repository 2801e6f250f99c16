"""An agent's view of the system: the root, every task's published model, and its own paths.

The store is the truth; this view is a cache of it. It is *lazy*: it holds the records of every
published model (component keys, names, owners, shapes, hparams, metrics) and loads a component's
tensors onto the agent's device only when something uses them (``Component.params``: the chosen
parent's components, the child's frozen ones when it trains, a multipath model's borrowed paths), and
a component's stored momentum only when it is cloned (``copy_component``). ``prune`` lets go of the
tensors no live path uses, so an agent's memory follows what it trains, not how many tasks exist.
Lockers, scoring, parent selection and building a child read records only.

Records are immutable (a model or component never changes once stored), so they are cached by id and
a refresh reads the pointers plus only the records it has not seen. Loaded components are cached by
key, so a frozen component used by many paths is one set of tensors in memory.
``lockers[key]`` is the set of agents whose published model (or the root) uses a component: a
component is frozen for this agent iff some *other* agent locks it (docs/method.md 1.5).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from agents.paths import Component, ModelPath
from protocol.tensors import RawTensor
from store import ComponentWrite, MissingReference, ModelRecord, Publication, StoreAPI
from store.records import SINGLE

ROOT_AGENT = "root"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
                 "uint8": torch.uint8, "bool": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
MAX_LINEAGE = 256


def to_raw(t: torch.Tensor, dtype: torch.dtype | None = None) -> RawTensor:
    """A CPU copy of ``t`` as raw little-endian bytes (bfloat16 travels as its 2-byte pattern)."""
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    t = t.cpu().contiguous()
    name = _DTYPE_NAMES[t.dtype]
    arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return RawTensor(name, tuple(t.shape), memoryview(np.ascontiguousarray(arr)).cast("B"))


def from_raw(r: RawTensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Wrap the store's bytes without copying when they are writable (the store's loads are)."""
    buf = r.data
    if isinstance(buf, bytes) or (isinstance(buf, memoryview) and buf.readonly):
        buf = bytearray(buf)  # torch.frombuffer needs writable memory
    t = torch.frombuffer(buf, dtype=_TORCH_DTYPES[r.dtype]) if len(buf) else \
        torch.empty(0, dtype=_TORCH_DTYPES[r.dtype])
    t = t.reshape(r.shape)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device)


def component_write(c: Component) -> ComponentWrite:
    """Tensors in float32; momentum in bfloat16 (half the bytes; only a starting point for clones)."""
    mom = {k: to_raw(v, torch.bfloat16) for k, v in (c.momentum or {}).items()}
    return ComponentWrite.build(c.key, c.name, c.owner, {k: to_raw(v) for k, v in c.params.items()},
                                mom, cloned_from=c.cloned_from)


def model_record(p: ModelPath) -> ModelRecord:
    return ModelRecord(id=p.id, task=p.task, agent=p.agent,
                       components=[c.key for c in p.ordered()], hparams=dict(p.hparams),
                       metrics=dict(p.metrics), parent=p.parent_id, preset=p.preset,
                       preset_hash=p.preset_hash, created_at=p.created_at or time.time(),
                       kind=p.kind, refs=list(p.refs))


def publication(p: ModelPath) -> Publication:
    """What readers of the published pointer need: the class count and the input (``ds_*``) spec."""
    return Publication(p.id, int(p.hparams["num_classes"]),
                       {k: v for k, v in p.hparams.items() if k.startswith("ds_")},
                       score=p.metrics.get("score"))


class SystemView:
    def __init__(self, store: StoreAPI, agent_id: str, device: torch.device):
        self.store, self.agent_id, self.device = store, agent_id, device
        self._components: dict[str, Component] = {}     # records; tensors once used
        self._has_momentum: dict[str, bool] = {}        # component key -> the store holds momentum
        self._paths: dict[str, ModelPath] = {}
        self.root: ModelPath | None = None
        self.published: dict[str, ModelPath] = {}       # task -> current model
        self.lockers: dict[str, set[str]] = {}
        self.last_refresh = 0.0
        # store reads so far (tests and benchmarks count them): tensors, shapes, records
        self.loads = {"params": 0, "momentum": 0, "shapes": 0, "models": 0, "components": 0}

    # ---- records ---------------------------------------------------------------------------
    def component(self, key: str) -> Component:
        """The component's record (name, owner, shapes); its tensors load on first use."""
        c = self._components.get(key)
        if c is None:
            rec = self.store.get_component(key)
            if rec is None:
                raise KeyError(f"component {key} is not in the store")
            self.loads["components"] += 1
            c = Component(rec.name, rec.agent, int(key.rsplit(":", 1)[1]), cloned_from=rec.cloned_from,
                          stored=True, source=self)
            self._has_momentum[key] = bool(rec.momentum)
            self._components[key] = c
        return c

    def path(self, model_id: str) -> ModelPath:
        """A stored model as records (no tensors are read until a component's ``params`` is)."""
        p = self._paths.get(model_id)
        if p is None:
            rec = self.store.get_model(model_id)
            if rec is None:
                raise KeyError(f"model {model_id} is not in the store")
            self.loads["models"] += 1
            comps = [self.component(k) for k in rec.components]
            p = ModelPath(rec.id, rec.agent, rec.task, dict(rec.hparams), {c.name: c for c in comps},
                          dict(rec.metrics), rec.parent, rec.preset, rec.preset_hash, rec.created_at,
                          stored=True, kind=rec.kind, refs=list(rec.refs))
            self._paths[model_id] = p
        return p

    # ---- tensors (agents.paths.TensorSource) ------------------------------------------------
    def load_params(self, c: Component) -> dict[str, torch.Tensor]:
        params, _ = self.store.load_component_tensors(c.key, momentum=False)
        self.loads["params"] += 1
        return {k: from_raw(v, self.device, torch.float32) for k, v in params.items()}

    def load_shapes(self, c: Component) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape from the blob headers (only for components something sizes: the
        scored paths, the parent's lineage), so a refresh touches no blob at all."""
        self.loads["shapes"] += 1
        return {k: tuple(shape) for k, (_, shape) in self.store.tensor_shapes(c.key).items()}

    def load_momentum(self, c: Component) -> dict[str, torch.Tensor] | None:
        """The stored optimizer state of a component (read only when it is cloned)."""
        if not self._has_momentum.get(c.key, True):
            return None
        _, mom = self.store.load_component_tensors(c.key, momentum=True)
        self.loads["momentum"] += 1
        # bfloat16 in the store: the float32 copy owns its memory (the read buffer is let go)
        out = {k: from_raw(v, self.device, torch.float32) for k, v in mom.items()}
        return {k: (t.clone() if mom[k].dtype == "float32" else t) for k, t in out.items()} or None

    def materialize(self, path: ModelPath, momentum: bool = False) -> ModelPath:
        """Load every component's tensors now (what training a child or running a path does anyway);
        ``momentum`` too, for a path used after its store is closed (clones read it)."""
        for c in path.components.values():
            c.params  # noqa: B018 (loads)
            if momentum:
                c.momentum  # noqa: B018
        return path

    def loaded(self) -> list[Component]:
        """Components whose tensors this view holds in memory."""
        return [c for c in self._components.values() if c.loaded or c.momentum_loaded]

    def loaded_bytes(self) -> int:
        total = 0
        for c in self.loaded():
            for group in (c._params or {}, c._momentum or {}):
                total += sum(t.numel() * t.element_size() for t in group.values())
        return total

    @contextlib.contextmanager
    def transient(self) -> Iterator[None]:
        """Tensors first loaded inside the block are let go at its end (e.g. probing candidates)."""
        before = {c.key for c in self.loaded()}
        try:
            yield
        finally:
            for c in self.loaded():
                if c.key not in before:
                    c.release()

    def remember(self, p: ModelPath) -> None:
        """Register a path this agent just committed (its components are now immutable)."""
        for c in p.components.values():
            c.stored = True
            self._components.setdefault(c.key, c)
        p.stored = True
        self._paths[p.id] = p

    def ancestors(self, p: ModelPath) -> Iterator[ModelPath]:
        """p, its parent, grandparent, ... (parents missing from the store end the walk)."""
        seen = 0
        while p is not None and seen < MAX_LINEAGE:
            yield p
            seen += 1
            if p.parent_id is None:
                return
            try:
                p = self.path(p.parent_id)
            except KeyError:
                # Garbage-collected ancestor: fall back to the root, as the reference does.
                p = self.root if (self.root is not None and p is not self.root) else None

    # ---- the published system --------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the pointers; only models and components not seen before are read (records are
        immutable), and no tensors at all."""
        root_id = self.store.root_model_id()
        self.root = self.path(root_id) if root_id else None
        # Single-path models only: multipath models are leaves (nobody's parent, path or locker).
        self.published = self._published()
        self.lockers = lockers_of(list(self.published.values()) + ([self.root] if self.root else []))
        self.last_refresh = time.time()

    def _published(self) -> dict[str, ModelPath]:
        """Task -> its single-path model. A pointer may move, and its old model be collected,
        between reading the pointers and the records: read them once more before calling it a
        broken store."""
        try:
            return self._resolve_pointers()
        except KeyError:
            try:
                return self._resolve_pointers()
            except KeyError:
                raise MissingReference("a task points to a missing model; run `query.py verify`") \
                    from None

    def _resolve_pointers(self) -> dict[str, ModelPath]:
        return {p.task: self.path(p.model_id) for p in self.store.pointers() if p.kind == SINGLE}

    def is_frozen(self, c: Component) -> bool:
        return bool(self.lockers.get(c.key, set()) - {self.agent_id})

    def foreign_paths(self) -> list[ModelPath]:
        """Root and other agents' published models: the uniform fallback's candidates."""
        out = [self.root] if self.root is not None else []
        out += [p for p in self.published.values() if p.agent != self.agent_id]
        return out

    def prune(self, keep: list[ModelPath], forget_cached: bool = False) -> None:
        """Drop cached records nothing in use refers to, and the tensors of every component that no
        kept path (nor a kept multipath model's paths, nor this agent's published model) uses: an
        agent holds in memory what it trains from, not the whole system.

        ``forget_cached`` also drops the published views, to be reloaded by the next refresh (after
        a commit found that the store no longer has something the cache still held)."""
        if forget_cached:
            self.published = {}
            self.refresh()
        live_paths = {p.id for p in keep} | {p.id for p in self.published.values()}
        live_paths |= {r for p in keep for r in p.refs}  # a kept multipath model's paths
        if self.root is not None:
            live_paths.add(self.root.id)
        known = list(self._components.values())
        self._paths = {k: v for k, v in self._paths.items() if k in live_paths}
        live = {c.key for p in self._paths.values() for c in p.components.values()}
        self._components = {k: v for k, v in self._components.items() if k in live}
        self._has_momentum = {k: v for k, v in self._has_momentum.items() if k in live}
        users = list(keep) + [self._paths[r] for p in keep for r in p.refs if r in self._paths]
        own = self.published.values()
        users += [p for p in own if p.agent == self.agent_id]
        used = {id(c) for p in users for c in p.components.values()}
        for c in known:
            if id(c) not in used:
                c.release()


def lockers_of(users: Iterable[ModelPath]) -> dict[str, set[str]]:
    """Component key -> the agents whose models (published ones and the root) use it."""
    lockers: dict[str, set[str]] = {}
    for p in users:
        for c in p.components.values():
            lockers.setdefault(c.key, set()).add(p.agent)
    return lockers
