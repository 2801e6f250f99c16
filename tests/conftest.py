"""Shared fixtures: offline hub, a small thread budget, and a reaper for every child a test leaves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; children of children too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _is_helper(pid: int) -> bool:
    """multiprocessing's long-lived resource tracker is shared by all tests: leave it alone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


@pytest.fixture(autouse=True)
def reap_children():
    """Kill every process a test started and left running (agents, launchers, store writers)."""
    before = set(_descendants(os.getpid()))
    yield
    leftover = [p for p in _descendants(os.getpid()) if p not in before and not _is_helper(p)]
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in leftover:
        try:
            os.waitpid(pid, 0)
        except (ChildProcessError, OSError):
            pass


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launch/ script as a user would, capturing output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=e)
