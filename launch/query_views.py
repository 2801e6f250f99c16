"""``query.py agents``, ``trials`` and ``release``: the operator's view of a live (or finished) swarm.

Torch-free (query.py never loads the agent stack). Names match ``run_swarm.py``'s live table: state,
cycle, generation, children per minute (``children_per_min``, the agent's own heartbeat figure).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from agents.progress import cycle_position
from store import StoreAPI


def agent_state(rec, now: float) -> str:
    """running | finished | stopped | stale (says running, but its heartbeats stopped)."""
    if rec.state == "running":
        return "running" if rec.lease_live(now) else "stale"
    return rec.state or "unknown"


def agent_rows(st: StoreAPI, now: float | None = None) -> list[dict[str, Any]]:
    now = time.time() if now is None else now
    rows = []
    for rec in sorted(st.agents(), key=lambda a: (a.task, a.kind)):
        pr = rec.progress or {}
        state = st.get_agent_state(rec.agent_id)
        rows.append({
            "agent_id": rec.agent_id, "task": rec.task, "kind": rec.kind,
            "state": agent_state(rec, now),
            "host": rec.host, "pid": rec.pid, "device": rec.device, "preset": rec.preset,
            "heartbeat_age_s": round(now - rec.heartbeat_at, 1) if rec.heartbeat_at else None,
            "lease_expires_in_s": round(rec.lease_expiry - now, 1) if rec.lease_token else None,
            "cycle": state.cycle if state else pr.get("cycle"),
            "cycles": pr.get("cycles"),
            "generation": state.generation if state else pr.get("generation"),
            "generations": pr.get("generations"),
            "cycle_position": cycle_position(pr, state.generation if state else None),
            "children": pr.get("children"), "accepted": pr.get("accepted"),
            "children_per_min": pr.get("children_per_min"),
            "last_event": pr.get("last_event"),
        })
    return rows


def trial_rows(st: StoreAPI, task: str | None, last: int | None) -> list[dict[str, Any]]:
    trials = st.trials(task=task)
    if last is not None:
        trials = trials[-last:] if last > 0 else []
    return [{"id": t.id, "task": t.task, "cycle": t.cycle, "generation": t.generation,
             "parent": t.parent, "model_id": t.model_id, "mutations": list(t.mutations),
             "quality": t.quality, "score": t.score, "accepted": t.accepted, "seconds": t.seconds,
             "train_images": t.train_images, "preset": t.preset, "created_at": t.created_at,
             "evals": list(t.evals), "parent_quality": t.parent_quality, "final_lr": t.final_lr,
             "stopped": t.stopped}
            for t in trials]


SPARKS = "_.-=+*#"  # low to high, ASCII: a log or a C-locale terminal prints it too


def learning_curve(evals: list[float]) -> str:
    """A trial's validation accuracies in order as a sparkline scaled to their own range (what the
    replay tool judges stopping rules on), with the last value: '_=# 0.910'."""
    if not evals:
        return "-"
    lo, hi = min(evals), max(evals)
    marks = "".join(SPARKS[0 if hi == lo else round((e - lo) / (hi - lo) * (len(SPARKS) - 1))]
                    for e in evals)
    return f"{marks} {evals[-1]:.3f}"


def _age(x) -> str:
    return "-" if x is None else f"{x:.0f}s"


def cmd_agents(args: argparse.Namespace) -> int:
    from launch.query import format_table, open_store, print_json

    with open_store(args) as st:
        rows = agent_rows(st)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("(no agent has registered with this store yet)")
        return 0
    headers = ["task", "kind", "state", "host", "pid", "device", "heartbeat", "lease", "cycle", "gen",
               "children", "accepted", "ch/min", "preset"]
    table = [[r["task"], r["kind"], r["state"], r["host"], r["pid"], r["device"], _age(r["heartbeat_age_s"]),
              _age(r["lease_expires_in_s"]) if r["state"] == "running" else "-",
              f"{r['cycle']}/{r['cycles'] if r['cycles'] is not None else '?'}",
              r["cycle_position"],
              r["children"], r["accepted"], r["children_per_min"], r["preset"]] for r in rows]
    print(format_table(headers, table))
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    from launch.query import UsageError, format_table, open_store, print_json

    if args.last is not None and args.last < 0:
        raise UsageError("--last must be >= 0")
    with open_store(args) as st:
        if args.task is not None and args.task not in {a.task for a in st.agents()} | {t.task for t in st.tasks()}:
            known = ", ".join(sorted({a.task for a in st.agents()})) or "none"
            raise UsageError(f"unknown task {args.task!r} (tasks with agents: {known})")
        rows = trial_rows(st, args.task, args.last)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("(no trials yet)" + (f" for {args.task}" if args.task else ""))
        return 0
    headers = ["trial", "cycle", "gen", "parent", "quality", "parent_q", "score", "accepted", "seconds",
               "images", "curve", "preset", "mutations"]
    # counted from 1, as the agents' logs count (the JSON keeps the stored 0-based numbers)
    table = [[r["id"], r["cycle"] + 1, r["generation"] + 1, r["parent"] or "-", r["quality"],
              r["parent_quality"], r["score"],
              "yes" if r["accepted"] else ("stopped" if r["stopped"] else "no"), r["seconds"],
              r["train_images"], learning_curve(r["evals"]), r["preset"],
              " ".join(r["mutations"]) or "-"] for r in rows]
    print(format_table(headers, table))
    return 0


def register_agents(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("agents", help="every agent: state, host, pid, device, heartbeat, lease, progress")
    p.add_argument("--json", action="store_true")
    return p


def register_trials(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("trials", help="the trials log: every trained child, accepted or not")
    p.add_argument("task", nargs="?", default=None, help="only this task's trials")
    p.add_argument("--last", type=int, default=None, metavar="N", help="only the last N trials")
    p.add_argument("--json", action="store_true")
    return p


def cmd_release(args: argparse.Namespace) -> int:
    """End a task's lease whose holder is gone (killed on this host, or, with --force, elsewhere)."""
    from launch.query import UsageError, open_store
    from store.holders import holder_gone, this_host

    with open_store(args, readonly=False) as st:
        now = time.time()
        held = [a for a in st.live_agents() if (a.task, a.kind) == (args.task, args.kind)]
        if not held:
            known = {(a.task, a.kind) for a in st.agents()}
            if (args.task, args.kind) not in known:
                raise UsageError(f"task {args.task!r} has no {args.kind} agent in this store")
            print(f"task {args.task} has no live {args.kind} lease: nothing to release")
            return 0
        for a in held:
            here = a.host == this_host()
            if here and not holder_gone(a.host, a.pid, a.heartbeat_at, a.endpoint):
                raise UsageError(f"the {args.kind} agent of {args.task} (pid {a.pid} on this host) is still "
                                 f"running: stop it instead (Ctrl-C or SIGTERM)")
            if not here and not args.force:
                raise UsageError(f"the {args.kind} agent of {args.task} runs on {a.host} (pid {a.pid}), "
                                 f"which this host cannot check: its lease ends in {a.lease_expiry - now:.0f} s, "
                                 f"or pass --force once you know it is gone")
            st.release_lease(a.agent_id, a.lease_token, state="released")
            print(f"released the lease of {a.agent_id} (pid {a.pid} on {a.host}, "
                  f"{'gone' if here else 'forced'}): the task can be attached again")
    return 0


def register_release(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("release", help="end a task's lease whose agent is gone (a kill -9 leaves it live)")
    p.add_argument("task", help="the task whose lease to end")
    from store.records import AGENT_KINDS, SINGLE

    p.add_argument("--kind", default=SINGLE, choices=list(AGENT_KINDS))
    p.add_argument("--force", action="store_true",
                   help="also when the holder ran on another host (this host cannot check it)")
    return p
