"""Live progress of a swarm, read from the store's agent records (the agents' heartbeats).

On a terminal the table is redrawn in place; otherwise (CI, a pipe, a log file) it degrades to one line
per agent whenever that agent's progress changes, so logs stay readable.
"""
from __future__ import annotations

import time
from typing import TextIO

from agents.progress import cycle_position
from store import StoreAPI, open_store

COLUMNS = ("task", "state", "cycle", "gen", "score", "quality", "test", "params", "ch/min", "last event")


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


class ProgressView:
    def __init__(self, store_path: str, agents: list[tuple[str, str]], out: TextIO,
                 keys: str | None = None):
        """``agents``: (task, kind) pairs; a bare task name means its single-path agent."""
        self.agents = [(a, "single") if isinstance(a, str) else tuple(a) for a in agents]
        self.store_path, self.out, self.keys = store_path, out, keys
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._last_lines: dict[str, str] = {}
        self._drawn = 0
        self._t0 = time.time()
        self._store: StoreAPI | None = None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def rows(self, procs) -> list[tuple[str, ...]]:
        from agents.agent import agent_id_for  # same id rule as the agents

        if self._store is None:  # one read-only handle for the view's life (LMDB: once per process)
            self._store = open_store(self.store_path, readonly=True, keys=self.keys)
        records = {a.agent_id: a for a in self._store.agents()}
        rows = []
        for task, kind in self.agents:
            rec = records.get(agent_id_for(task, kind))
            pr = rec.progress if rec else {}
            proc = procs.get((task, kind), procs.get(task) if kind == "single" else None)
            state = rec.state if rec else "starting"
            if proc is not None and not proc.is_alive() and proc.exitcode not in (0, None):
                state = f"exit {proc.exitcode}"
            if rec is None and kind == "multipath":
                state = "waiting"  # for the task's single-path model
            rows.append((task if kind == "single" else f"{task} [{kind}]", state,
                         f"{pr.get('cycle', 0)}/{pr.get('cycles', '?')}",
                         cycle_position(pr),
                         _fmt(pr.get("best_score")), _fmt(pr.get("best_quality")),
                         _fmt(pr.get("best_test")), _fmt(pr.get("params")),
                         _fmt(pr.get("children_per_min"), 1), str(pr.get("last_event", ""))[:40]))
        return rows

    def update(self, procs, final: bool = False) -> None:
        rows = self.rows(procs)
        if self.tty:
            widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
            lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
            lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
            lines.append(f"elapsed {time.time() - self._t0:.0f}s")
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F")  # back to the table's first line
            self.out.write("".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            for r in rows:
                # print when state, cycle, generation or a result changed; the rate and the
                # last-event text change with every heartbeat and would flood a log
                key = " ".join(r[1:8])
                if self._last_lines.get(r[0]) != key or final:
                    self._last_lines[r[0]] = key
                    line = " ".join(f"{c}={v}" for c, v in zip(COLUMNS[1:], r[1:]))
                    self.out.write(f"[{time.time() - self._t0:6.0f}s] {r[0]}: {line}\n")
        self.out.flush()
