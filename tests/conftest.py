"""Shared set-up: an offline hub, a private data cache for the session, and a reaper for every child
a test leaves.

Caches. The suite never reads or writes the user's caches (``~/.cache/munet-swarm``, pip's, torch's,
the model hub's). Before any test module is imported (so before any test, fixture or child process
runs) ``MUNET_DATA_DIR`` and ``XDG_CACHE_HOME`` are pointed at one temporary directory for the whole
session, removed when the session ends; every child inherits them through the environment (the
drivers in ``helpers.swarm`` pass ``os.environ`` on). Building the task caches there is a cost paid
once per session, on first use by whichever test (or agent) loads a task first: about 15 s of CPU in
all (uci_digits 0.6 s, mnist5k 1 s, fashion_mnist 1.6 s, animal_mnist 1 s, each glyphs script 1-2 s),
so nothing is pre-built. No test needs the pretrained ``glyphs_cjk`` root (minutes to build): the
``test`` preset's root is random, and the slow corpus test in test_root.py fetches its fonts into its
own ``tmp_path``. A test that wants another cache passes ``cache_dir=`` or its own
``MUNET_DATA_DIR``; ``test_suite_caches.py`` proves the session's is not under the home directory.

Imports. ``tests/`` is on ``sys.path`` (pytest's ``prepend`` import mode puts it there; it is also
inserted here), so test modules import shared code as ``helpers.<module>``; the repository root is
there too, for the project's packages.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _path in (TESTS, REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)

SESSION_CACHE = tempfile.mkdtemp(prefix="munet-test-cache-")
os.environ["MUNET_DATA_DIR"] = os.path.join(SESSION_CACHE, "data")  # taskdata's cache (and roots/)
os.environ["XDG_CACHE_HOME"] = os.path.join(SESSION_CACHE, "xdg")  # pip, torch hub, HF hub, fontconfig


def pytest_unconfigure(config) -> None:
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


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
