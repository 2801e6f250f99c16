"""Typed records kept in the store, with strict conversion to and from plain msgpack-able dicts.

``to_dict()`` gives a dict of str keys and plain values; ``from_dict()`` accepts exactly the fields
of the record with exactly the right types and raises ``StoreCorrupt`` otherwise, so a damaged or
foreign value in LMDB is reported instead of propagating as a half-valid object. All times are unix
seconds (float). Tensors are never inside records: components map tensor names to blob keys.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

from protocol.tensors import RawTensor, blob_key
from store.errors import StoreCorrupt, StoreError


class _Invalid(Exception):
    """Internal: one field failed its type check (the message says how)."""


# ---- field checkers: each returns the normalised value or raises _Invalid -----------------------

def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"expected str, got {type(v).__name__}")
    return v


def _id(v: Any) -> str:
    if not _str(v):
        raise _Invalid("expected a non-empty str")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Invalid(f"expected int, got {type(v).__name__}")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Invalid(f"expected float, got {type(v).__name__}")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"expected bool, got {type(v).__name__}")
    return v


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _list_of(check: Callable[[Any], Any]) -> Callable[[Any], list]:
    def run(v: Any) -> list:
        if not isinstance(v, (list, tuple)):
            raise _Invalid(f"expected list, got {type(v).__name__}")
        return [check(x) for x in v]
    return run


def _map_of(check: Callable[[Any], Any]) -> Callable[[Any], dict]:
    def run(v: Any) -> dict:
        if not isinstance(v, dict):
            raise _Invalid(f"expected dict, got {type(v).__name__}")
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise _Invalid(f"expected str keys, got {type(k).__name__}")
            try:
                out[k] = check(x)
            except _Invalid as exc:
                raise _Invalid(f"[{k!r}]: {exc}") from None
        return out
    return run


def _scalar(v: Any) -> int | float | str | bool | None:
    """A flat hparam/metric value."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise _Invalid(f"expected int|float|str|bool|None, got {type(v).__name__}")


def _plain(v: Any) -> Any:
    """Any msgpack-able value with str map keys (free-form ``data``/``progress``/``hparams_diff`` dicts)."""
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return _map_of(_plain)(v)
    raise _Invalid(f"{type(v).__name__} is not a plain msgpack value")


def plain_value(value: Any, what: str) -> Any:
    """Check that ``value`` is plain msgpack data with str map keys; StoreError names ``what``."""
    try:
        return _plain(value)
    except _Invalid as exc:
        raise StoreError(f"{what}: {exc}") from None


_STR_MAP = _map_of(_str)
_SCALAR_MAP = _map_of(_scalar)
_PLAIN_MAP = _map_of(_plain)
_INT_MAP = _map_of(_int)
_STR_LIST = _list_of(_str)


# ---- the record base ------------------------------------------------------------------------------

class _Record:
    """Shared strict (de)serialisation; each record lists a checker per field in ``_SPEC``."""

    _SPEC: ClassVar[dict[str, Callable[[Any], Any]]]
    # Fields that older versions wrote and this one no longer has: accepted on decode and dropped.
    _RETIRED: ClassVar[frozenset[str]] = frozenset()
    # Fields that older versions did not write: filled with these values on decode.
    _ADDED: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self._SPEC}

    @classmethod
    def _decode(cls, data: Any, error: type[StoreError]) -> Any:
        if not isinstance(data, dict):
            raise error(f"{cls.__name__}: expected a map, got {type(data).__name__}")
        if cls._RETIRED:
            data = {k: v for k, v in data.items() if k not in cls._RETIRED}
        if cls._ADDED:
            data = {**cls._ADDED, **data}
        missing = sorted(set(cls._SPEC) - set(data))
        extra = sorted(str(k) for k in set(data) - set(cls._SPEC))
        if missing or extra:
            raise error(f"{cls.__name__}: missing fields {missing}, unexpected fields {extra}")
        values = {}
        for name, check in cls._SPEC.items():
            try:
                values[name] = check(data[name])
            except _Invalid as exc:
                raise error(f"{cls.__name__}.{name}: {exc}") from None
        return cls(**values)

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Strict decode of a stored value (raises StoreCorrupt)."""
        return cls._decode(data, StoreCorrupt)

    def validated(self) -> Any:
        """Return the normalised copy of this record, or raise StoreError naming the bad field.

        The store calls this before writing so that nothing it writes could fail to decode later.
        """
        return type(self)._decode(self.to_dict(), StoreError)


def _record(cls: type) -> type:
    """Class decorator: check at import time that ``_SPEC`` names exactly the dataclass fields."""
    names = [f.name for f in dataclasses.fields(cls)]
    if names != list(cls._SPEC):
        raise TypeError(f"{cls.__name__}._SPEC {list(cls._SPEC)} does not match fields {names}")
    return cls


# ---- agent kinds and published pointers -----------------------------------------------------------

SINGLE, MULTIPATH = "single", "multipath"
AGENT_KINDS = (SINGLE, MULTIPATH)


def _kind(v: Any) -> str:
    if _str(v) not in AGENT_KINDS:
        raise _Invalid(f"expected an agent kind {AGENT_KINDS}, got {v!r}")
    return v


def pointer_key(task: str, kind: str) -> str:
    """Key of a task's pointer for one agent kind (the single-path key is the task, as it always was)."""
    return task if kind == SINGLE else f"{task}\x1f{kind}"


def served(pointers: "Iterable[TaskRecord]") -> "dict[str, TaskRecord]":
    """Task -> the pointer that serves it: the highest score; a tie (or no score) goes to single."""
    out: dict[str, TaskRecord] = {}
    for p in pointers:
        cur = out.get(p.task)
        rank = (-float("inf") if p.score is None else p.score, p.kind == SINGLE)
        if cur is None or rank > (-float("inf") if cur.score is None else cur.score,
                                  cur.kind == SINGLE):
            out[p.task] = p
    return out


# ---- records --------------------------------------------------------------------------------------

def component_id(agent: str, n: int) -> str:
    """Global id of an agent's n-th component: ``"{agent}:{n}"``."""
    return f"{agent}:{int(n)}"


def parse_component_id(cid: str) -> tuple[str, int]:
    """Split ``"{agent}:{n}"``; raises ValueError for anything else."""
    agent, sep, n = cid.rpartition(":")
    if not sep or not agent or not n.isdigit():
        raise ValueError(f"component id {cid!r} is not of the form '<agent>:<n>'")
    return agent, int(n)


@_record
@dataclass(frozen=True)
class ComponentRecord(_Record):
    """One shareable unit of parameters (e.g. ``encoderblock_2``); immutable once stored."""

    id: str
    name: str
    agent: str
    tensors: dict[str, str]
    momentum: dict[str, str]
    created_at: float
    cloned_from: str | None

    _SPEC: ClassVar = {"id": _id, "name": _id, "agent": _id, "tensors": _STR_MAP,
                       "momentum": _STR_MAP, "created_at": _float, "cloned_from": _optional(_id)}


@_record
@dataclass(frozen=True)
class ModelRecord(_Record):
    """One model (a "path") of one task: components in forward order plus flat hparams/metrics.

    ``kind`` names the agent kind that made it (``single``: a single-path ViT; ``multipath``: frozen
    whole models joined by a router and connectors). ``refs`` are whole models this one runs by
    reference (a multipath model's paths, main path first): the store keeps them while this model
    lives, so they stay loadable after their owners publish better ones.
    """

    id: str
    task: str
    agent: str
    components: list[str]
    hparams: dict[str, Any]
    metrics: dict[str, Any]
    parent: str | None
    preset: str
    preset_hash: str
    created_at: float
    kind: str = SINGLE
    refs: list[str] = field(default_factory=list)

    _SPEC: ClassVar = {"id": _id, "task": _id, "agent": _id, "components": _list_of(_id),
                       "hparams": _SCALAR_MAP, "metrics": _SCALAR_MAP, "parent": _optional(_id),
                       "preset": _str, "preset_hash": _str, "created_at": _float,
                       "kind": _kind, "refs": _list_of(_id)}
    _ADDED: ClassVar = {"kind": SINGLE, "refs": []}


@_record
@dataclass(frozen=True)
class TaskRecord(_Record):
    """A published pointer: which model the ``kind`` agent of a task publishes now, with its score.

    A task has one pointer per agent kind; the task is served by the pointer with the highest score
    (``served``), so readers get the best model whichever kind made it.
    """

    task: str
    model_id: str
    agent: str
    num_classes: int
    data_spec: dict[str, Any]
    updated_at: float
    kind: str = SINGLE
    score: float | None = None

    _SPEC: ClassVar = {"task": _id, "model_id": _id, "agent": _id, "num_classes": _int,
                       "data_spec": _PLAIN_MAP, "updated_at": _float, "kind": _kind,
                       "score": _optional(_float)}
    _ADDED: ClassVar = {"kind": SINGLE, "score": None}

    @property
    def key(self) -> str:
        return pointer_key(self.task, self.kind)


@_record
@dataclass(frozen=True)
class AgentRecord(_Record):
    """Registration and lease of one agent id (kept after release, for history).

    One live lease per (task, kind): a task's single-path and multipath agents run side by side."""

    agent_id: str
    task: str
    host: str
    pid: int
    device: str
    endpoint: str
    preset: str
    lease_token: str
    lease_expiry: float
    heartbeat_at: float
    state: str
    progress: dict[str, Any]
    kind: str = SINGLE

    _SPEC: ClassVar = {"agent_id": _id, "task": _id, "host": _str, "pid": _int, "device": _str,
                       "endpoint": _str, "preset": _str, "lease_token": _str,
                       "lease_expiry": _float, "heartbeat_at": _float, "state": _str,
                       "progress": _PLAIN_MAP, "kind": _kind}
    _ADDED: ClassVar = {"kind": SINGLE}

    def lease_live(self, now: float) -> bool:
        return bool(self.lease_token) and self.lease_expiry > now


@_record
@dataclass
class AgentState(_Record):
    """What an agent needs to resume after kill -9; overwritten at each commit (so mutable)."""

    agent_id: str
    task: str
    cycle: int
    generation: int
    population: list[str]
    best_model_id: str | None
    next_component_id: int
    next_model_id: int
    offsprings: dict[str, int]
    updated_at: float
    cycle_images: int = 0   # training images the current cycle has spent (a cycle's budget, +hurdle)
    # where the task's data came from and its content fingerprint ({"spec", "fingerprint"}): a task
    # named NAME=npz:PATH resumes from a moved file, and refuses other data under its name
    source: dict[str, Any] = field(default_factory=dict)

    _SPEC: ClassVar = {"agent_id": _id, "task": _id, "cycle": _int, "generation": _int,
                       "population": _list_of(_id), "best_model_id": _optional(_id),
                       "next_component_id": _int, "next_model_id": _int, "offsprings": _INT_MAP,
                       "updated_at": _float, "cycle_images": _int, "source": _PLAIN_MAP}
    _RETIRED: ClassVar = frozenset({"extra"})  # a free-form map nothing read; old states still load
    _ADDED: ClassVar = {"cycle_images": 0, "source": {}}


@_record
@dataclass(frozen=True)
class TrialRecord(_Record):
    """One trained child (accepted or not): small metadata for the method report.

    The learning curve (``evals``: every validation accuracy, in order), the ``threshold`` score it had
    to reach (None: anything is kept), its lowest trainable component, image size and the training
    augmentations that were on let a replay tool judge stopping rules without training
    (benchmarks/replay_rules.py). ``flops`` is what the child cost (agents.compute.FlopsTally:
    train, validation, cache_fill, total); ``stopped`` says why training ended early ("" = it ran
    all its validations, "hurdle" = early rejection). Under +honest, ``quality`` is the child's
    accuracy on the decision split after its last step, ``parent_quality`` its parent's on the same
    images, and ``final_lr`` the learning rate it ended at.
    """

    id: str
    agent: str
    task: str
    cycle: int
    generation: int
    parent: str | None
    model_id: str | None
    mutations: list[str]
    hparams_diff: dict[str, Any]
    quality: float | None
    score: float | None
    accepted: bool
    seconds: float
    train_images: int
    preset: str
    preset_hash: str
    created_at: float
    evals: list[float] = dataclasses.field(default_factory=list)
    threshold: float | None = None
    lowest_trainable: str | None = None
    image_size: int | None = None
    augment: list[str] = dataclasses.field(default_factory=list)
    flops: dict[str, int] = dataclasses.field(default_factory=dict)
    stopped: str = ""
    parent_quality: float | None = None  # +honest: the parent re-scored on the child's decision images
    final_lr: float | None = None        # the learning rate of the child's last step (+honest)

    _SPEC: ClassVar = {"id": _id, "agent": _id, "task": _id, "cycle": _int, "generation": _int,
                       "parent": _optional(_id), "model_id": _optional(_id), "mutations": _STR_LIST,
                       "hparams_diff": _PLAIN_MAP, "quality": _optional(_float),
                       "score": _optional(_float), "accepted": _bool, "seconds": _float,
                       "train_images": _int, "preset": _str, "preset_hash": _str,
                       "created_at": _float, "evals": _list_of(_float), "threshold": _optional(_float),
                       "lowest_trainable": _optional(_str), "image_size": _optional(_int),
                       "augment": _STR_LIST, "flops": _INT_MAP, "stopped": _str,
                       "parent_quality": _optional(_float), "final_lr": _optional(_float)}
    _ADDED: ClassVar = {"evals": [], "threshold": None, "lowest_trainable": None, "image_size": None,
                        "augment": [], "flops": {}, "stopped": "", "parent_quality": None,
                        "final_lr": None}


@_record
@dataclass(frozen=True)
class Event(_Record):
    """One entry of the ordered event log (seq starts at 1 and has no gaps)."""

    seq: int
    kind: str
    task: str | None
    agent: str | None
    model_id: str | None
    time: float
    data: dict[str, Any]

    _SPEC: ClassVar = {"seq": _int, "kind": _id, "task": _optional(_str),
                       "agent": _optional(_str), "model_id": _optional(_str), "time": _float,
                       "data": _PLAIN_MAP}


# ---- a publication ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Publication:
    """What an agent asks the store to publish: the model that now serves its task, and what a reader
    needs to run it (class count, input spec). The agent says it; the store does not read hparams."""

    model_id: str
    num_classes: int
    data_spec: dict[str, Any] = field(default_factory=dict)
    score: float | None = None   # the model's score; the task is served by its best-scoring pointer

    def validated(self) -> Publication:
        try:
            _id(self.model_id)
            _int(self.num_classes)
            _optional(_float)(self.score)
            spec = _PLAIN_MAP(self.data_spec)
        except _Invalid as exc:
            raise StoreError(f"publication of {self.model_id!r} is invalid: {exc}") from None
        if self.num_classes < 1:
            raise StoreError(f"publication of {self.model_id}: num_classes must be >= 1, "
                             f"got {self.num_classes}")
        return dataclasses.replace(self, data_spec=spec)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "num_classes": self.num_classes,
                "data_spec": dict(self.data_spec), "score": self.score}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Publication:
        return cls(model_id=d["model_id"], num_classes=d["num_classes"],
                   data_spec=dict(d.get("data_spec") or {}), score=d.get("score")).validated()


# ---- component writes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ComponentWrite:
    """A component to commit together with its tensors.

    ``record.tensors``/``record.momentum`` may be left empty: the store computes the blob keys. If
    they are filled they must name the same tensors with the same keys (else StoreError).
    """

    record: ComponentRecord
    tensors: Mapping[str, RawTensor]
    momentum: Mapping[str, RawTensor] = field(default_factory=dict)
    #: set by ``build``, which hashed these very tensors: ``resolved`` then skips re-hashing
    #: (hashing is the largest CPU cost of a publish). ``verify`` still re-hashes every blob.
    keys_computed: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def build(cls, cid: str, name: str, agent: str, tensors: Mapping[str, RawTensor],
              momentum: Mapping[str, RawTensor] | None = None, *, cloned_from: str | None = None,
              created_at: float | None = None) -> ComponentWrite:
        """Make a write whose record already carries the blob keys of ``tensors``/``momentum``."""
        momentum = dict(momentum or {})
        record = ComponentRecord(
            id=cid, name=name, agent=agent,
            tensors={k: blob_key(t) for k, t in tensors.items()},
            momentum={k: blob_key(t) for k, t in momentum.items()},
            created_at=time.time() if created_at is None else float(created_at),
            cloned_from=cloned_from)
        return cls(record=record, tensors=dict(tensors), momentum=momentum, keys_computed=True)

    def resolved(self) -> tuple[ComponentRecord, dict[str, RawTensor]]:
        """The record with its blob keys filled in, and the blobs to write (key -> tensor)."""
        if self.keys_computed and set(self.tensors) == set(self.record.tensors) \
                and set(self.momentum) == set(self.record.momentum):
            blobs = {self.record.tensors[n]: t for n, t in self.tensors.items()}
            blobs.update({self.record.momentum[n]: t for n, t in self.momentum.items()})
            return self.record, blobs
        blobs: dict[str, RawTensor] = {}
        keys: dict[str, dict[str, str]] = {}
        for part, given, declared in (("tensors", self.tensors, self.record.tensors),
                                      ("momentum", self.momentum, self.record.momentum)):
            computed = {}
            for name, tensor in given.items():
                key = blob_key(tensor)
                computed[name] = key
                blobs[key] = tensor
            if declared and declared != computed:
                raise StoreError(f"component {self.record.id}: record.{part} does not match the "
                                 f"given tensors (names or content differ)")
            keys[part] = computed
        record = dataclasses.replace(self.record, tensors=keys["tensors"],
                                     momentum=keys["momentum"])
        return record, blobs
