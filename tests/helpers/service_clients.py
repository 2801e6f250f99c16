"""Client-side pieces for the store-service tests: the same scripted calls against any StoreAPI,
and child-process entry points (a remote writer that commits through the service)."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from helpers.store_records import child_model, child_writes, make_root, pub
from store import (AgentState, ComponentWrite, LeaseHeld, ModelRecord, Publication, StoreError,
                   TrialRecord, component_id)


def take_lease(st: Any, agent: str, task: str, ttl: float = 60.0) -> str:
    return st.acquire_lease(agent, task, ttl=ttl, host="h", pid=1, device="cpu",
                            endpoint="tcp://127.0.0.1:1", preset="test")


def commit_model(st: Any, agent: str, token: str, task: str, n: int, root: ModelRecord,
                 rng: np.random.Generator, elems: int = 64, created_at: float = 1.0) -> int | None:
    writes = child_writes(agent, n, rng, elems)
    writes = [ComponentWrite.build(w.record.id, w.record.name, w.record.agent, w.tensors,
                                   w.momentum, cloned_from=w.record.cloned_from,
                                   created_at=created_at) for w in writes]
    model = child_model(agent, task, n, writes, root, None, created_at=created_at)
    state = AgentState(agent_id=agent, task=task, cycle=n, generation=0, population=[model.id],
                       best_model_id=model.id, next_component_id=2 * n + 2, next_model_id=n + 1,
                       offsprings={model.id: 0}, updated_at=created_at)
    trial = TrialRecord(id=f"{agent}:t{n}", agent=agent, task=task, cycle=n, generation=0,
                        parent=model.parent, model_id=model.id, mutations=["clone:head"],
                        hparams_diff={}, quality=0.5, score=0.5, accepted=True, seconds=0.1,
                        train_images=64, preset="test", preset_hash="h0", created_at=created_at)
    return st.commit(agent, token, components=writes, models=[model], state=state,
                     publish=pub(model), trials=[trial], event_data={"n": n})


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """('ok', value) or ('error', (class name, message)) of one call."""
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the point is to compare errors
        return "error", (type(exc).__name__, str(exc))


def scripted_calls(st: Any) -> list[tuple[str, tuple[str, Any]]]:
    """The same sequence of calls, with errors, on any StoreAPI; results made comparable
    (tokens, times and paths replaced by markers)."""
    rng = np.random.default_rng(7)
    out: list[tuple[str, tuple[str, Any]]] = []

    def rec(name: str, fn: Callable[[], Any]) -> Any:
        kind, value = outcome(fn)
        out.append((name, (kind, comparable(value))))
        return value if kind == "ok" else None

    rec("root_model_id empty", st.root_model_id)
    root = make_root(st)
    rec("root_model_id", st.root_model_id)
    rec("meta keys", lambda: sorted(st.meta()))
    token = rec("acquire", lambda: take_lease(st, "a1", "t1"))
    rec("acquire held", lambda: take_lease(st, "a2", "t1"))
    rec("acquire other task for a1", lambda: take_lease(st, "a1", "t2"))
    rec("commit 0", lambda: commit_model(st, "a1", token, "t1", 0, root, rng))
    rec("commit 1", lambda: commit_model(st, "a1", token, "t1", 1, root, rng))
    rec("commit bad token", lambda: commit_model(st, "a1", "nope", "t1", 2, root, rng))
    foreign = ComponentWrite.build(component_id("a9", 0), "head", "a9",
                                   {"w": child_writes("a9", 0, rng)[0].tensors["weight"]})
    rec("commit foreign component", lambda: st.commit("a1", token, components=[foreign]))
    dangling = ModelRecord(id="a1:m99", task="t1", agent="a1", components=["a1:12345"],
                           hparams={"num_classes": 3}, metrics={}, parent=None, preset="test",
                           preset_hash="h", created_at=1.0)
    rec("commit dangling model", lambda: st.commit("a1", token, models=[dangling]))
    rec("publish missing", lambda: st.commit("a1", token, publish=Publication("a1:m77", 3)))
    rec("publish not a Publication", lambda: st.commit("a1", token, publish="a1:m1"))
    rec("publish bad classes", lambda: st.commit("a1", token, publish=Publication("a1:m1", 0)))
    rec("rewrite immutable", lambda: commit_model(st, "a1", token, "t1", 1, root,
                                                  np.random.default_rng(99)))
    rec("heartbeat", lambda: st.heartbeat("a1", token, ttl=30, state="running",
                                          progress={"cycle": 1}).progress)
    rec("heartbeat lost", lambda: st.heartbeat("a1", "bad", ttl=30))
    rec("get_model", lambda: st.get_model("a1:m1"))
    rec("get_model none", lambda: st.get_model("zz"))
    rec("get_component", lambda: st.get_component("a1:0"))
    rec("get_component none", lambda: st.get_component("a1:999"))
    rec("get_task", lambda: st.get_task("t1"))
    rec("get_task none", lambda: st.get_task("t9"))
    rec("tasks", st.tasks)
    rec("published", st.published_models)
    rec("agents", st.agents)
    rec("get_agent", lambda: st.get_agent("a1"))
    rec("live", lambda: [a.agent_id for a in st.live_agents()])
    rec("agent_state", lambda: st.get_agent_state("a1"))
    rec("agent_state none", lambda: st.get_agent_state("a7"))
    rec("trials", st.trials)
    rec("trials filtered", lambda: st.trials(agent="a1", task="t9"))
    rec("models", st.models)
    rec("models of a1", lambda: st.models(agent="a1"))
    rec("events", st.events)
    rec("events after 1 limit 1", lambda: st.events(after=1, limit=1))
    rec("last seq", st.last_event_seq)
    rec("poll_events", lambda: [e.seq for e in st.poll_events(1)])
    rec("tensor_shapes", lambda: st.tensor_shapes("a1:0"))
    rec("tensor_shapes missing", lambda: st.tensor_shapes("a1:999"))
    rec("load component", lambda: tensors_of(st.load_component_tensors("a1:0")))
    rec("load component missing", lambda: st.load_component_tensors("a1:999"))
    rec("load model", lambda: {c: tensors_of(pm) for c, pm in
                               st.load_model_tensors("a1:m1").items()})
    rec("load model missing", lambda: st.load_model_tensors("nope"))
    rec("writable buffers", lambda: all(not memoryview(t.data).readonly for t in
                                        st.load_component_tensors("a1:0")[0].values()))
    rec("verify", st.verify)
    rec("stats counts", lambda: st.stats()["counts"])
    rec("release", lambda: st.release_lease("a1", token))
    rec("release again", lambda: st.release_lease("a1", token))
    rec("agent after release", lambda: st.get_agent("a1"))
    return out


def tensors_of(pair: tuple[dict, dict]) -> Any:
    return [{n: (t.dtype, t.shape, bytes(t.data)) for n, t in part.items()} for part in pair]


_VOLATILE = {"lease_token", "lease_expiry", "heartbeat_at", "updated_at", "time", "created_at",
             "path", "pid"}


def comparable(value: Any) -> Any:
    """Records as dicts without times and tokens; errors as (class, message)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: ("<v>" if k in _VOLATILE else comparable(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    if isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        return "<token>"
    return value


def remote_writer_main() -> None:
    """``python -m helpers.service_clients ENDPOINT AGENT TASK COUNT OUT``: commit COUNT models
    through the service as fast as possible (the fault tests kill the service meanwhile)."""
    from store.service.client import RemoteStore

    endpoint, agent, task, count, out = sys.argv[1:6]
    st = RemoteStore.connect(endpoint, cache_dir=os.environ["MUNET_BLOB_CACHE"])
    root = st.get_model(st.root_model_id())
    token = take_lease(st, agent, task, ttl=600)
    rng = np.random.default_rng(3)
    seqs = []
    t0 = time.time()
    for n in range(int(count)):
        seqs.append(commit_model(st, agent, token, task, n, root, rng, elems=4096))
        with open(out + ".progress", "w") as f:
            f.write(str(n + 1))
    st.release_lease(agent, token)
    with open(out, "w") as f:
        json.dump({"seqs": seqs, "retries": st.channel.retries, "seconds": time.time() - t0}, f)
    st.close()


if __name__ == "__main__":
    remote_writer_main()
