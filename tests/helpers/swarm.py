"""Drivers for tests that run the launch/ scripts and real agent processes against a real store.

The environment the children get is this process's (so the session data cache that conftest sets
reaches them) plus an offline hub and unbuffered output.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from helpers import REPO

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def make_store(path: str, preset: str = "test") -> None:
    """A store with a root, as run_swarm.py makes it (so attach.py has something to attach to)."""
    import agents  # noqa: F401
    from agents.bootstrap import ensure_root
    from agents.config import resolve_preset
    from agents.vit import preset_vit
    from store import Store

    p = resolve_preset(preset)
    vit = preset_vit(p)
    with Store.open(path, create=True) as store:
        ensure_root(store, p, vit)


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launch/ script as a user would, capturing output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=e)


def start(script: str, *args: str, log: str | None = None) -> subprocess.Popen:
    """Start launch/<script> in the background, its output to ``log`` (or nowhere)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, os.path.join(REPO, "launch", script), *args], cwd=REPO,
                            env=ENV, stdout=out, stderr=subprocess.STDOUT)


def wait_for(cond, timeout: float, what: str, every: float = 0.2):
    """Poll ``cond`` until it returns something truthy; fail the test with ``what`` on timeout."""
    from store import NotAStore

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = cond()
        except NotAStore:  # the launcher is still creating the store
            got = None
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read(path: str, fn):
    """Open the store read-only, apply fn, close (each call sees the latest commits)."""
    from store import Store

    with Store.open(path, readonly=True) as s:
        return fn(s)


def check_progress(pairs: list[tuple[int, int]], state, gens: int) -> None:
    """The (cycle, generation) of the children trained are exactly what the stored ``state`` says
    was done: every finished cycle has generations 0..n-1 with no gap or repeat (n >= ``gens``: with
    +hurdle a cycle is an image budget and children stopped early leave room for more), the current
    cycle has 0..state.generation-1, and nothing lies beyond (each child is committed with the state
    it moves)."""
    by_cycle: dict[int, list[int]] = {}
    for c, g in pairs:
        by_cycle.setdefault(c, []).append(g)
    assert set(by_cycle) <= set(range(state.cycle + 1)), (sorted(by_cycle), state)
    for c in range(state.cycle):
        done = sorted(by_cycle.get(c, []))
        assert done == list(range(len(done))) and len(done) >= gens, (c, done)
    assert sorted(by_cycle.get(state.cycle, [])) == list(range(state.generation)), (by_cycle, state)
