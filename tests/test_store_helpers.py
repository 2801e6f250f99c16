"""Builders and child-process entry points shared by the store tests (no tests in this file).

Child entry points live here, not in the test modules, so that a spawned child imports only the
store and numpy (fast start-up, no pytest). Everything is real: LMDB on disk, spawned processes.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from protocol.tensors import RawTensor, blob_key
from store import (AgentState, ComponentWrite, LeaseHeld, ModelRecord, Store, TrialRecord,
                   component_id)

ROOT_AGENT = "root"
NUM_CLASSES = 3


def rt(array: Any, dtype: str = "float32") -> RawTensor:
    return RawTensor.from_numpy(np.asarray(array, dtype=dtype))


def random_tensor(rng: np.random.Generator, *shape: int) -> RawTensor:
    return rt(rng.standard_normal(shape, dtype=np.float32))


def make_root(st: Store, seed: int = 0, blocks: int = 2, width: int = 16) -> ModelRecord:
    """A tiny root model (cls, embedding, blocks, norm) written with ensure_root.

    Returns the model this call proposed; with seed != 0 its ids differ from the default root's,
    so racing callers can tell whose root won.
    """
    rng = np.random.default_rng(seed)
    names = ["cls", "embedding", *[f"encoderblock_{i}" for i in range(blocks)], "encoder_norm"]
    writes = [ComponentWrite.build(component_id(ROOT_AGENT, 100 * seed + i), name, ROOT_AGENT,
                                   {"weight": random_tensor(rng, width, width),
                                    "bias": rt(np.zeros(width))})
              for i, name in enumerate(names)]
    model = ModelRecord(id=f"{ROOT_AGENT}:m{seed}", task="root", agent=ROOT_AGENT,
                        components=[w.record.id for w in writes],
                        hparams={"num_classes": 0, "num_layers": blocks, "ds_image_size": 32},
                        metrics={}, parent=None, preset="test", preset_hash="h0",
                        created_at=time.time())
    st.ensure_root(model, writes)
    return model


def lease(st: Store, agent: str, task: str, ttl: float = 60.0, now: float | None = None) -> str:
    return st.acquire_lease(agent, task, ttl=ttl, host="localhost", pid=os.getpid(),
                            device="cpu", endpoint="tcp://127.0.0.1:1", preset="test", now=now)


def child_writes(agent: str, n: int, rng: np.random.Generator, elems: int = 64
                 ) -> list[ComponentWrite]:
    """Two fresh components for model n of ``agent`` (a head with momentum and a block clone)."""
    head = ComponentWrite.build(component_id(agent, 2 * n), "head", agent,
                                {"weight": random_tensor(rng, NUM_CLASSES, elems),
                                 "bias": rt(np.zeros(NUM_CLASSES))},  # identical everywhere: dedup
                                {"weight": random_tensor(rng, NUM_CLASSES, elems)})
    block = ComponentWrite.build(component_id(agent, 2 * n + 1), "encoderblock_1", agent,
                                 {"weight": random_tensor(rng, elems, 16),
                                  "bias": rt(np.zeros(16))},
                                 cloned_from=component_id(ROOT_AGENT, 3))
    return [head, block]


def child_model(agent: str, task: str, n: int, writes: list[ComponentWrite], root: ModelRecord,
                parent: str | None, created_at: float | None = None) -> ModelRecord:
    """Model n of ``agent``: root's first components shared, then the two new ones."""
    shared = root.components[:3]
    return ModelRecord(id=f"{agent}:m{n}", task=task, agent=agent,
                       components=[*shared, writes[1].record.id, writes[0].record.id],
                       hparams={"num_classes": NUM_CLASSES, "ds_image_size": 32, "num_layers": 2,
                                "adapter_layers": "", "opt_lr": 0.01},
                       metrics={"seq": n, "score": 0.5 + n / 1000, "quality": 0.5 + n / 1000,
                                "params": 1234, "num_cycles": 1},
                       parent=parent or root.id, preset="test", preset_hash="h0",
                       created_at=time.time() if created_at is None else created_at)


def publish_next(st: Store, agent: str, token: str, task: str, n: int, root: ModelRecord,
                 rng: np.random.Generator, parent: str | None = None, elems: int = 64) -> int:
    """Commit model n with its components, state and trial, and publish it; returns the seq."""
    writes = child_writes(agent, n, rng, elems)
    model = child_model(agent, task, n, writes, root, parent)
    state = AgentState(agent_id=agent, task=task, cycle=n, generation=0, population=[model.id],
                       best_model_id=model.id, next_component_id=2 * n + 2, next_model_id=n + 1,
                       offsprings={model.id: 0}, updated_at=time.time(), extra={"n": n})
    trial = TrialRecord(id=f"{agent}:t{n}", agent=agent, task=task, cycle=n, generation=0,
                        parent=model.parent, model_id=model.id, mutations=["clone:head"],
                        hparams_diff={}, quality=0.5, score=0.5, accepted=True, seconds=0.1,
                        train_images=64, preset="test", preset_hash="h0", created_at=time.time())
    seq = st.commit(agent, token, components=writes, models=[model], state=state,
                    publish=model.id, trials=[trial], event_data={"score": model.metrics["score"]})
    assert seq is not None
    return seq


def check_model_integrity(st: Store, model_id: str) -> int:
    """Load a model and re-hash every tensor against its component's blob key; returns #tensors."""
    loaded = st.load_model_tensors(model_id)
    count = 0
    for cid, (params, momentum) in loaded.items():
        record = st.get_component(cid)
        assert record is not None, f"component {cid} vanished"
        assert set(params) == set(record.tensors) and set(momentum) == set(record.momentum)
        for name, tensor in params.items():
            assert blob_key(tensor) == record.tensors[name], f"{cid}/{name} hash mismatch"
        for name, tensor in momentum.items():
            assert blob_key(tensor) == record.momentum[name], f"{cid}/{name} momentum mismatch"
        count += len(params) + len(momentum)
    return count


def acquire_waiting(st: Store, agent: str, task: str, ttl: float, deadline_s: float = 30.0) -> str:
    """Take a lease, waiting for a stale holder's lease to run out (as a restarted agent does)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return lease(st, agent, task, ttl=ttl)
        except LeaseHeld as exc:
            if time.monotonic() > deadline:
                raise
            time.sleep(min(max(exc.expires_in, 0.001), 0.5))


# ---- child process entry points --------------------------------------------------------------

def writer_main(path: str, agent: str, task: str, count: int, seed: int, go: Any) -> None:
    """Publish ``count`` models for ``task`` as fast as possible (contends for the write lock)."""
    rng = np.random.default_rng(seed)
    with Store.open(path) as st:
        root = st.get_model(st.root_model_id())
        token = lease(st, agent, task)
        if not go.wait(timeout=60):  # start together with the other writers, once readers run
            raise TimeoutError("no go signal from the test")
        parent = None
        for n in range(count):
            publish_next(st, agent, token, task, n, root, rng, parent)
            parent = f"{agent}:m{n}"
        st.release_lease(agent, token)


def reader_main(path: str, ready: Any, stop: Any, out_file: str) -> None:
    """Load published models until told to stop; assert integrity and monotone pointers."""
    last_seq_seen: dict[str, int] = {}
    last_event = 0
    loads = tensors = 0
    with Store.open(path, readonly=True) as st:
        ready.set()
        while True:
            stopping = stop.is_set()  # read before the pass, so one full pass follows the stop
            for task, model in st.published_models().items():
                seq = model.metrics["seq"]
                assert seq >= last_seq_seen.get(task, -1), f"{task} pointer went backwards"
                last_seq_seen[task] = seq
                tensors += check_model_integrity(st, model.id)
                loads += 1
            events = st.events(after=last_event)
            for event in events:
                assert event.seq == last_event + 1, "event log has a gap or is out of order"
                last_event = event.seq
            if stopping:
                break
    with open(out_file, "w") as f:
        json.dump({"loads": loads, "tensors": tensors, "last_event": last_event,
                   "last_seq_seen": last_seq_seen}, f)


CRASH_AGENT = "crasher"
CRASH_TASK = "crash_task"
CRASH_TTL = 0.2


def crash_publisher_main(path: str, side_file: str, seed: int) -> None:
    """Resume from the store and publish forever; after each commit returns, record its number.

    The side file is replaced atomically, so after a SIGKILL it names the last publish that the
    store promised to keep.
    """
    rng = np.random.default_rng(seed)
    with Store.open(path) as st:
        root = st.get_model(st.root_model_id())
        token = acquire_waiting(st, CRASH_AGENT, CRASH_TASK, ttl=CRASH_TTL)
        state = st.get_agent_state(CRASH_AGENT)
        n = state.next_model_id if state else 0
        parent = state.best_model_id if state else None
        while True:
            publish_next(st, CRASH_AGENT, token, CRASH_TASK, n, root, rng, parent, elems=2048)
            tmp = f"{side_file}.tmp"
            with open(tmp, "w") as f:
                f.write(str(n))
            os.replace(tmp, side_file)
            parent = f"{CRASH_AGENT}:m{n}"
            n += 1


def slow_writer_main(path: str, agent: str, task: str, count: int, pause: float) -> None:
    """Publish ``count`` models with a pause between them (for read-while-writing tests)."""
    rng = np.random.default_rng(7)
    with Store.open(path) as st:
        root = st.get_model(st.root_model_id())
        token = lease(st, agent, task)
        parent = None
        for n in range(count):
            publish_next(st, agent, token, task, n, root, rng, parent)
            parent = f"{agent}:m{n}"
            time.sleep(pause)


def root_racer_main(path: str, seed: int, ready: Any, go: Any, out_file: str) -> None:
    """Wait for the start signal, then try to create the root; record which root id won."""
    with Store.open(path) as st:
        ready.set()
        if not go.wait(timeout=60):
            raise TimeoutError("no go signal from the test")
        proposed = make_root(st, seed=seed)
        with open(out_file, "w") as f:
            json.dump({"proposed": proposed.id, "root": st.root_model_id()}, f)
