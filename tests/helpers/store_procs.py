"""Child-process entry points for the store tests (spawned with multiprocessing's ``spawn``).

They live outside the test modules so that a spawned child imports only the store, numpy and
``helpers.store_records`` (fast start-up, no pytest).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from helpers.store_records import acquire_waiting, check_model_integrity, lease, make_root, publish_next
from store import Store


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
CRASH_TTL = 1.0  # the shortest lease the store allows (store.leases.MIN_TTL_S)


def _record(path: str, n: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(n))
    os.replace(tmp, path)


def crash_publisher_main(path: str, side_file: str, seed: int) -> None:
    """Resume from the store and publish forever; right before each commit call, record its number in
    ``<side_file>.inflight``; after the commit returns, in the side file.

    Both files are replaced atomically, so after a SIGKILL the side file names the last publish the
    store promised to keep, and an in-flight number one above it says the kill landed while that
    commit ran (or in the microseconds between its return and the record).
    """
    rng = np.random.default_rng(seed)
    with Store.open(path) as st:
        root = st.get_model(st.root_model_id())
        token = acquire_waiting(st, CRASH_AGENT, CRASH_TASK, ttl=CRASH_TTL)
        state = st.get_agent_state(CRASH_AGENT)
        n = state.next_model_id if state else 0
        parent = state.best_model_id if state else None
        while True:
            publish_next(st, CRASH_AGENT, token, CRASH_TASK, n, root, rng, parent, elems=2048,
                         before_commit=lambda: _record(f"{side_file}.inflight", n))
            _record(side_file, n)
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
