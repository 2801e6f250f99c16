"""The store as agents, launchers, the query CLI and the report see it: one small ``Protocol``.

Two implementations satisfy it: ``store.Store`` (the LMDB environment in a local directory) and
``store.service.RemoteStore`` (a client of ``launch/serve_store.py`` on another host). Code that takes
a ``StoreAPI`` cannot tell them apart, which is what lets an agent run next to the LMDB file or on
another machine, and lets tests drive an agent in-process against a real store.

``open_store(spec)`` is the one way to get either: a directory path, or ``tcp://HOST:PORT``.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from store.records import (AgentRecord, AgentState, ComponentRecord, ComponentWrite, Event,
                           ModelRecord, Publication, TaskRecord, TrialRecord)
from store.maintenance import VerifyResult
from store.txnops import TensorDict

REMOTE_SCHEMES = ("tcp://",)


@runtime_checkable
class StoreAPI(Protocol):
    """Exactly the calls the rest of the system makes on a store."""

    path: str
    readonly: bool

    # -- lifecycle (``with open_store(...) as st:`` closes it)
    def close(self) -> None: ...
    def __enter__(self) -> StoreAPI: ...
    def __exit__(self, *exc: object) -> None: ...

    # -- writes (each is one transaction: all of it or nothing)
    def commit(self, agent_id: str, lease_token: str, *,
               components: Sequence[ComponentWrite] = (), models: Sequence[ModelRecord] = (),
               state: AgentState | None = None, publish: Publication | None = None,
               trials: Sequence[TrialRecord] = (), event_kind: str = "published",
               event_data: dict | None = None) -> int | None: ...

    def ensure_root(self, model: ModelRecord, components: Sequence[ComponentWrite]) -> str: ...

    # -- leases (the store's clock decides liveness)
    def acquire_lease(self, agent_id: str, task: str, *, ttl: float, host: str, pid: int,
                      device: str, endpoint: str, preset: str, kind: str = "single") -> str: ...

    def heartbeat(self, agent_id: str, token: str, *, ttl: float, state: str | None = None,
                  progress: dict | None = None, endpoint: str | None = None) -> AgentRecord: ...

    def release_lease(self, agent_id: str, token: str, state: str = "stopped") -> None: ...

    # -- records
    def meta(self) -> dict: ...
    def root_model_id(self) -> str | None: ...
    def get_model(self, model_id: str) -> ModelRecord | None: ...
    def get_component(self, component_id: str) -> ComponentRecord | None: ...
    def get_task(self, task: str) -> TaskRecord | None: ...       # the pointer serving the task
    def tasks(self) -> list[TaskRecord]: ...                      # the serving pointer per task
    def pointers(self) -> list[TaskRecord]: ...                   # every (task, kind) pointer
    def published_models(self, kind: str | None = None) -> dict[str, ModelRecord]: ...
    def agents(self) -> list[AgentRecord]: ...
    def get_agent(self, agent_id: str) -> AgentRecord | None: ...
    def live_agents(self) -> list[AgentRecord]: ...
    def get_agent_state(self, agent_id: str) -> AgentState | None: ...
    def trials(self, agent: str | None = None, task: str | None = None) -> list[TrialRecord]: ...
    def models(self, agent: str | None = None) -> list[ModelRecord]: ...
    def events(self, after: int = 0, limit: int | None = None) -> list[Event]: ...
    def poll_events(self, after: int) -> list[Event]: ...  # never waits; a service client asks
                                                          # only when the doorbell rang
    def last_event_seq(self) -> int: ...

    # -- tensors (blobs are immutable and content-addressed, so a client may cache them)
    def load_component_tensors(self, component_id: str, momentum: bool = True
                               ) -> tuple[TensorDict, TensorDict]: ...
    def load_model_tensors(self, model_id: str) -> dict[str, tuple[TensorDict, TensorDict]]: ...
    def tensor_shapes(self, component_id: str) -> dict[str, tuple[str, tuple[int, ...]]]: ...

    # -- maintenance and numbers
    def check(self) -> VerifyResult: ...
    def verify(self) -> list[str]: ...
    def stats(self) -> dict: ...


def is_remote(spec: str) -> bool:
    return str(spec).startswith(REMOTE_SCHEMES)


def open_store(spec: str, *, readonly: bool = False, create: bool = False,
               keys: str | None = None) -> StoreAPI:
    """A directory opens the LMDB store here; ``tcp://HOST:PORT`` connects to a store service.

    ``create`` only applies to a directory (a service already owns its store); ``keys`` is the
    CURVE key folder for a service bound beyond loopback.
    """
    if is_remote(spec):
        from store.service.client import RemoteStore  # zmq only when a remote store is asked for
        return RemoteStore.connect(str(spec), readonly=readonly, keys=keys)
    from store.store import Store
    return Store.open(spec, readonly=readonly, create=create)
