"""Builders of real store records for the store tests: a tiny root, child components and models,
leases and whole publishes through ``Store.commit`` (so every event comes from a real commit).

Everything is real: LMDB on disk, the store's own commit path; only numpy and the store are imported.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from protocol.tensors import RawTensor, blob_key
from store import (AgentState, ComponentWrite, LeaseHeld, ModelRecord, Publication, Store, TrialRecord,
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
                 rng: np.random.Generator, parent: str | None = None, elems: int = 64,
                 flops: dict[str, int] | None = None, before_commit=None) -> int:
    """Commit model n with its components, state and trial, and publish it; returns the seq.
    ``flops``: the trial's recorded FLOPs tally (default none, as a store written before trials had it).
    ``before_commit()`` runs right before the commit call (the crash test marks the commit in flight)."""
    writes = child_writes(agent, n, rng, elems)
    model = child_model(agent, task, n, writes, root, parent)
    state = AgentState(agent_id=agent, task=task, cycle=n, generation=0, population=[model.id],
                       best_model_id=model.id, next_component_id=2 * n + 2, next_model_id=n + 1,
                       offsprings={model.id: 0}, updated_at=time.time())
    trial = TrialRecord(id=f"{agent}:t{n}", agent=agent, task=task, cycle=n, generation=0,
                        parent=model.parent, model_id=model.id, mutations=["clone:head"],
                        hparams_diff={}, quality=0.5, score=0.5, accepted=True, seconds=0.1,
                        train_images=64, preset="test", preset_hash="h0", created_at=time.time(),
                        evals=[0.25, 0.5], parent_quality=0.4 if model.parent else None, final_lr=0.0,
                        **({"flops": flops} if flops is not None else {}))
    if before_commit is not None:
        before_commit()
    seq = st.commit(agent, token, components=writes, models=[model], state=state,
                    publish=pub(model), trials=[trial], event_data={"score": model.metrics["score"]})
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


def pub(model) -> Publication:
    """The publication an agent makes for ``model``: its class count and input spec."""
    return Publication(model.id, int(model.hparams["num_classes"]),
                       {k: v for k, v in model.hparams.items() if k.startswith("ds_")})
