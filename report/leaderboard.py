"""The leaderboard: one row per task with a published model, the same for every view of a store.

``query.py leaderboard`` (table and ``--json``), the live table's numbers and the report (HTML and
JSON) all take their rows from ``leaderboard_rows``, so one store reads the same in each: the same
names and the same numbers for the same thing. Torch-free (records only).
"""
from __future__ import annotations

from typing import Any

from store import StoreAPI
from store.records import served

LEADERBOARD_KEYS = ("task", "model_id", "agent_id", "kind", "score", "quality", "test_quality",
                    "params", "accounted_params", "flops", "num_layers", "adapter_layers",
                    "image_size", "cycles", "parent_id", "updated_at")
EXTRA_KEYS = ("shared_components", "foreign_components", "num_components", "model_cycle",
              "borrows", "activated_params", "kinds")


def completed_cycles(st: StoreAPI, agent_id: str, fallback: Any) -> Any:
    """How far a task has come: its agent's completed cycles (the model's own cycle if unknown)."""
    state = st.get_agent_state(agent_id)
    return state.cycle if state is not None else fallback


def leaderboard_rows(st: StoreAPI) -> list[dict[str, Any]]:
    """One row per task with a published model, sorted by task (the `leaderboard --json` schema)."""
    every = st.pointers()
    pointers = served(every)  # the pointer that serves each task (what st.tasks() returns)
    published = st.published_models()
    users: dict[str, set[str]] = {}  # component id -> tasks whose current model uses it
    for task, model in published.items():
        for cid in model.components:
            users.setdefault(cid, set()).add(task)
    rows = []
    for task, model in sorted(published.items()):
        m, h = model.metrics, model.hparams
        row = {
            "task": task,
            "model_id": model.id,
            "agent_id": pointers[task].agent if task in pointers else model.agent,
            # the task is served by the best-scoring model of its agents (single, multipath)
            "kind": model.kind,
            "score": m.get("score"),
            "quality": m.get("quality"),
            "test_quality": m.get("test_quality"),
            "params": m.get("params"),
            "accounted_params": m.get("accounted_params"),
            "flops": m.get("flops"),
            "num_layers": h.get("num_layers", m.get("num_layers")),
            "adapter_layers": h.get("adapter_layers", m.get("adapter_layers")),
            "image_size": h.get("ds_image_size"),
            # cycles: how far the task has come (its agent's completed cycles); model_cycle: the
            # cycle that produced the current model (it stays put while no child beats it)
            "cycles": completed_cycles(st, pointers[task].agent if task in pointers else model.agent,
                                       m.get("num_cycles")),
            "model_cycle": m.get("num_cycles"),
            "parent_id": model.parent,
            "updated_at": pointers[task].updated_at if task in pointers else model.created_at,
            # a multipath model's borrowed paths: the tasks whose frozen models it runs
            "borrows": [st.get_model(r).task for r in model.refs[1:]],
            "activated_params": m.get("activated_params", m.get("params")),
            "kinds": {p.kind: {"model_id": p.model_id, "score": p.score}
                      for p in every if p.task == task},
        }
        creators = [st.get_component(cid).agent for cid in model.components]
        # sharing: components this model uses together with other tasks' current models, and
        # components that another task's agent created (reuse beyond the common root)
        row["shared_components"] = sum(1 for cid in model.components if len(users[cid]) > 1)
        row["foreign_components"] = sum(1 for a in creators if a not in (model.agent, "root"))
        row["num_components"] = len(model.components)
        rows.append({key: row[key] for key in (*LEADERBOARD_KEYS, *EXTRA_KEYS)})
    return rows
