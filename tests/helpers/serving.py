"""A small grown store for the serving tests: single-path models of two tasks, then a multipath
model for one of them (which then serves it), so the served system shares a whole path."""
from __future__ import annotations

import io

import numpy as np

SINGLE_TASK, MULTI_TASK = "glyphs_greek", "uci_digits"


def grow_serving_store(path: str) -> None:
    from agents.agent import AgentOptions, run_agent
    from store import Store

    def opts(task: str, kind: str = "single") -> AgentOptions:
        return AgentOptions(store=path, task=task, preset="test", cycles=1, threads=1, lease_ttl=30.0,
                            heartbeat_every=30.0, kind=kind)

    with Store.open(path, create=True) as st:
        for task in (MULTI_TASK, SINGLE_TASK):
            run_agent(opts(task), verbose=False, store=st)
        run_agent(opts(MULTI_TASK, "multipath"), verbose=False, store=st)
        kinds = {t.task: t.kind for t in st.tasks()}
    assert kinds == {SINGLE_TASK: "single", MULTI_TASK: "multipath"}, kinds


def images(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def probs_of(answer: dict) -> np.ndarray:
    """Class probabilities from an answer asked with top_k = every class."""
    out = []
    for pred in answer["predictions"]:
        row = np.zeros(len(pred["top"]))
        for entry in pred["top"]:
            row[entry["label"]] = entry["prob"]
        out.append(row)
    return np.array(out)
